//! `credlock lambda-extension`: the command that runs [`crate::lambda`] as the layer's
//! external extension. The steps, the endpoint and the event loop are described there; this
//! is the order they run in, and the first locked set.
//!
//! The function's raw credentials are in the extension's environment, which any process of
//! the same user can read in `/proc/PID/environ` for as long as the process lives: the
//! function's code runs as that user. So before anything else the extension moves them into a
//! pipe and replaces itself (same PID, same arguments) with a copy whose environment lacks
//! them; the copy reads them from the pipe on its standard input ([`source_credentials`]).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use crate::cli::CommonArgs;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::credentials::imds_timestamp;
use crate::discovery::{self, SourceKind};
use crate::lambda::{
    Event, ExtensionsApi, INIT_ERROR_TYPE, Lock, Settings, invocation_left, needed_at_invoke,
    new_token, serve, session_duration, sts_name, write_token,
};
use crate::sts::{AssumeRequest, AwsIssuer};

#[derive(Args)]
pub struct LambdaArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The name registered with the Extensions API: the file name Lambda started in
    /// /opt/extensions
    #[arg(long, value_name = "NAME", default_value = "credlock")]
    pub extension_name: String,
}

/// The raw variables the copy is started without (`AWS_ACCESS_KEY` and `AWS_SECURITY_TOKEN`
/// are older names of the same values).
const RAW_VARIABLES: [&str; 5] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY",
    "AWS_SECURITY_TOKEN",
];
/// Set in the copy's environment: its source credentials are on standard input.
const FROM_STDIN: &str = "CREDLOCK_LAMBDA_SOURCE";

#[derive(serde::Serialize, serde::Deserialize)]
struct Source {
    key: String,
    secret: String,
    token: Option<String>,
}

/// The function's credentials. In the first process: moved to a pipe, then the process
/// re-executes itself without them (this returns only on failure). In the copy: read back.
fn source_credentials() -> Result<aws_credential_types::Credentials, String> {
    use std::io::{Read, Write};
    use std::os::unix::process::CommandExt;
    let from = |s: Source| {
        aws_credential_types::Credentials::new(s.key, s.secret, s.token, None, "lambda-environment")
    };
    if std::env::var_os(FROM_STDIN).is_some() {
        // Not dumpable: the function's code runs as this user and could otherwise read this
        // process's memory (/proc/PID/mem, ptrace) or a core dump of it. execve reset the flag,
        // so it is set here, before the credentials are read.
        nix::sys::prctl::set_dumpable(false)
            .map_err(|e| format!("cannot make the process undumpable: {e}"))?;
        let mut text = String::new();
        std::io::stdin()
            .take(64 * 1024)
            .read_to_string(&mut text)
            .map_err(|e| format!("reading the function's credentials back: {e}"))?;
        let source: Source = serde_json::from_str(&text)
            .map_err(|_| "the function's credentials did not come back whole".to_string())?;
        return Ok(from(source));
    }
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (Some(key), Some(secret)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) else {
        return Err("the function's credentials are not in the environment".into());
    };
    let source = Source {
        key,
        secret,
        token: var("AWS_SESSION_TOKEN"),
    };
    let (reader, mut writer) = std::io::pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
    // A few kB: within the pipe's buffer, so the write completes before anyone reads.
    writer
        .write_all(&serde_json::to_vec(&source).unwrap_or_default())
        .map_err(|e| format!("cannot write to the pipe: {e}"))?;
    drop(writer);
    let mut command = std::process::Command::new("/proc/self/exe");
    command
        .args(std::env::args_os().skip(1))
        .env(FROM_STDIN, "stdin")
        .stdin(reader);
    for name in RAW_VARIABLES {
        command.env_remove(name);
    }
    let e = command.exec();
    Err(format!(
        "cannot re-execute without the raw credentials: {e}"
    ))
}

fn fail(e: &str) -> ExitCode {
    eprintln!("credlock: lambda extension: {e}");
    ExitCode::FAILURE
}

/// The whole extension; the exit code: 0 after SHUTDOWN, 1 otherwise.
pub async fn lambda_extension(config: Config, args: LambdaArgs) -> ExitCode {
    let settings = match Settings::from_vars(|k| std::env::var(k).ok()) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let source = source_credentials();
    // A token left by an earlier process must not let the wrapper start the runtime.
    if let Err(e) = std::fs::remove_file(&settings.token_file)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return fail(&format!(
            "cannot remove {}: {e}",
            settings.token_file.display()
        ));
    }
    let api = match ExtensionsApi::register(&settings.runtime_api, &args.extension_name).await {
        Ok(api) => api,
        Err(e) => return fail(&e),
    };
    tracing::info!(
        name = args.extension_name,
        "registered with the Extensions API"
    );
    let ready = match (
        source,
        crate::lambda::wrapper_in_place(|k| std::env::var(k).ok()),
    ) {
        (Ok(source), Ok(())) => init(&config, &settings, source).await,
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    let (lock, listener) = match ready {
        Ok(ready) => ready,
        Err(e) => {
            tracing::error!(error = %e, "no locked credentials: failing the init");
            api.report("init", INIT_ERROR_TYPE, &e).await;
            return fail(&e);
        }
    };
    let token: Arc<str> = new_token().into();
    let lock = Arc::new(lock);
    tokio::spawn(serve(listener, lock.clone(), token.clone()));
    if let Err(e) = write_token(&settings.token_file, &token) {
        api.report("init", INIT_ERROR_TYPE, &e).await;
        return fail(&e);
    }
    tracing::info!(listen = %settings.listen, token_file = %settings.token_file.display(), "serving the locked set");
    let code = events(&api, &lock).await;
    let _ = std::fs::remove_file(&settings.token_file);
    code
}

/// The event loop until SHUTDOWN (0) or an Extensions API failure (1).
async fn events(api: &ExtensionsApi, lock: &Lock) -> ExitCode {
    loop {
        match api.next().await {
            Ok(Event::Invoke {
                deadline_ms,
                request_id,
            }) => {
                let left = invocation_left(deadline_ms, lock.now());
                let needed = needed_at_invoke(lock.margin(), left, lock.session());
                tracing::debug!(request_id, left_ms = left.as_millis() as u64, "INVOKE");
                if let Err(e) = lock.ensure(needed).await {
                    tracing::error!(error = %e, "no servable locked set: the endpoint answers 503");
                }
            }
            Ok(Event::Shutdown { reason }) => {
                tracing::info!(reason, "SHUTDOWN");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                tracing::error!(error = %e, "the event loop ends");
                return fail(&e);
            }
        }
    }
}

/// The bound endpoint listener and the first locked set (steps 2-5 of [`crate::lambda`]).
async fn init(
    config: &Config,
    settings: &Settings,
    source: aws_credential_types::Credentials,
) -> Result<(Lock, tokio::net::TcpListener), String> {
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(settings.region.clone()))
        .credentials_provider(source.clone())
        .load()
        .await;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let issuer =
        AwsIssuer::from_sdk_config(&sdk, config.lock.sts_endpoint.as_deref(), clock.clone());
    let role = match &settings.role_arn {
        Some(role) => role.clone(),
        None => {
            let arn = issuer.caller_arn().await.map_err(|e| {
                format!("sts:GetCallerIdentity with the function's credentials: {e}")
            })?;
            crate::cli::credentials::role_of_session(&arn).ok_or_else(|| {
                format!(
                    "the function's credentials are {arn}, not a role session: set CREDLOCK_ROLE_ARN"
                )
            })?
        }
    };
    let host = sts_name("", &settings.function_name);
    let provider = aws_credential_types::provider::SharedCredentialsProvider::new(source);
    // Lambda has no instance metadata service.
    if discovery::enabled_sources(&config.discovery).contains(&SourceKind::Imds) {
        tracing::warn!("discovery.imds is on, but Lambda has no IMDS: skipped");
    }
    let environment = crate::cli::credentials::discover(
        config,
        &settings.region,
        &role,
        &host,
        provider,
        &[SourceKind::Imds],
    )
    .await?;
    let template = crate::app::load_template(config).map_err(|e| e.to_string())?;
    let policy =
        crate::policy::render(&template, &environment, &role).map_err(|e| e.to_string())?;
    let request = AssumeRequest {
        role_arn: role.to_string(),
        session_name: sts_name("credlock-lambda-", &settings.function_name),
        policy: policy.text,
        duration: session_duration(config.lock.session_duration),
        source_identity: config
            .lock
            .source_identity
            .then(|| sts_name("credlock-", &settings.function_name)),
        tags: config.lock.session_tags.clone().into_iter().collect(),
    };
    let margin = config.lock.serve_margin;
    let lock = Lock::new(issuer, request, role, margin, clock);
    let first = lock.ensure(margin).await?;
    tracing::info!(
        role = %lock.role(),
        expiration = %imds_timestamp(first.expiration),
        "locked set held"
    );
    Ok((lock, listener))
}
