//! `credlock lambda-extension`: credlock inside an AWS Lambda execution environment, as an
//! external extension of the credlock layer (`layer/`). Lambda starts every file in
//! `/opt/extensions/` as an external extension, named after the file ("Lambda extensions",
//! AWS Lambda Developer Guide).
//!
//! What it does, in order (Init phase, "Lambda Extensions API", AWS Lambda Developer Guide):
//! 1. takes the function's own credentials from the environment (`AWS_ACCESS_KEY_ID`,
//!    `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`: "Defined runtime environment variables"),
//!    and re-executes itself without them, keeping them in a pipe ([`crate::cli::lambda`]);
//! 2. registers with the Extensions API (`AWS_LAMBDA_RUNTIME_API`) for INVOKE and SHUTDOWN;
//! 3. the role: `CREDLOCK_ROLE_ARN`, else the caller's role from `sts:GetCallerIdentity` (an
//!    assumed-role ARN has no path: a role with a path needs `CREDLOCK_ROLE_ARN`);
//! 4. discovers the environment with the configured sources once (echo for a VPC function's
//!    NAT egress, static, s3, boot provider; there is no IMDS in Lambda, so `imds` is skipped);
//! 5. `sts:AssumeRole` with the rendered session policy for a session of 15 min to 1 h (role
//!    chaining caps it at one hour: AWS STS API Reference, "AssumeRole", DurationSeconds);
//! 6. serves that locked set on a loopback container-credentials endpoint to holders of a
//!    random token, then writes the token to a 0600 file: the exec wrapper waits for that file
//!    and hands the runtime the endpoint instead of the raw credentials.
//!
//! Any failure after 2 and before the token is written is reported with
//! `/extension/init/error` and the process exits non-zero: the wrapper then finds no token and
//! refuses to start the runtime (fail closed).
//!
//! Then the event loop: a frozen environment runs no timers ("Lambda execution environment
//! lifecycle"), so the set is refreshed on INVOKE when it would not outlast the invocation by
//! the serve margin, and on a request to the endpoint that finds it within the margin (the
//! environment is thawed while the SDK asks). SHUTDOWN ends the process with 0.
//!
//! The endpoint answers `GET /credentials` with exactly one `Authorization: <token>`, with the
//! JSON the SDKs' container credential provider reads (`AccessKeyId`, `SecretAccessKey`,
//! `Token`, `Expiration`, plus `RoleArn`; "Container credential provider", AWS SDKs and Tools
//! Reference Guide). No token: 401; a wrong or repeated one: 403; then other methods 405, other
//! paths 404; no servable set: 503. No answer ever carries a raw credential.

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::Full;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::clock::Clock;
use crate::credentials::{LockedCredentials, imds_timestamp};
use crate::identity::RoleArn;
use crate::proxy::local_text as text;
use crate::sts::{AssumeRequest, AwsIssuer, Issuer, StsErrorCode};

/// Where the endpoint listens unless `CREDLOCK_LAMBDA_LISTEN` says otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9170";
/// Where the token is written unless `CREDLOCK_LAMBDA_TOKEN_FILE` says otherwise.
pub const DEFAULT_TOKEN_FILE: &str = "/tmp/credlock/token";
/// The one path the endpoint answers.
pub const PATH: &str = "/credentials";
/// The Extensions API's prefix under `http://${AWS_LAMBDA_RUNTIME_API}`.
const API: &str = "/2020-01-01/extension";
/// AssumeRole's DurationSeconds bounds for a chained role (AWS STS API Reference, "AssumeRole").
pub const MIN_SESSION: Duration = Duration::from_secs(900);
pub const MAX_SESSION: Duration = Duration::from_secs(3600);
/// A function runs at most 15 minutes ("Configure Lambda function timeout"): a deadline
/// further away than that is not believed.
const MAX_INVOCATION: Duration = Duration::from_secs(900);

/// What the extension reads from its environment.
#[derive(Debug, Clone)]
pub struct Settings {
    pub runtime_api: String,
    pub listen: SocketAddr,
    pub token_file: PathBuf,
    pub role_arn: Option<RoleArn>,
    pub function_name: String,
    pub region: String,
}

impl Settings {
    /// From variables looked up with `var` (the process environment in production).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Settings, String> {
        let get = |k: &str| var(k).filter(|v| !v.is_empty());
        let runtime_api = get("AWS_LAMBDA_RUNTIME_API")
            .ok_or("AWS_LAMBDA_RUNTIME_API is not set: not in Lambda")?;
        let listen_text = get("CREDLOCK_LAMBDA_LISTEN").unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| format!("CREDLOCK_LAMBDA_LISTEN={listen_text:?} is not IP:PORT"))?;
        if !listen.ip().is_loopback() {
            return Err(format!(
                "CREDLOCK_LAMBDA_LISTEN={listen_text:?} is not a loopback address"
            ));
        }
        let token_file = PathBuf::from(
            get("CREDLOCK_LAMBDA_TOKEN_FILE").unwrap_or_else(|| DEFAULT_TOKEN_FILE.into()),
        );
        if !token_file.is_absolute() || token_file.parent().is_none() {
            return Err(format!(
                "CREDLOCK_LAMBDA_TOKEN_FILE={:?} is not an absolute file path",
                token_file.display()
            ));
        }
        let role_arn = match get("CREDLOCK_ROLE_ARN") {
            Some(text) => Some(
                RoleArn::parse(&text)
                    .ok_or_else(|| format!("CREDLOCK_ROLE_ARN={text:?} is not an IAM role ARN"))?,
            ),
            None => None,
        };
        let region = get("AWS_REGION")
            .or_else(|| get("AWS_DEFAULT_REGION"))
            .ok_or("AWS_REGION is not set")?;
        Ok(Settings {
            runtime_api,
            listen,
            token_file,
            role_arn,
            function_name: get("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|| "function".into()),
            region,
        })
    }
}

/// The session length: the configured one within what AssumeRole allows a chained role.
pub fn session_duration(configured: Duration) -> Duration {
    configured.clamp(MIN_SESSION, MAX_SESSION)
}

/// How much must be left of the held set at an INVOKE: the serve margin plus what is left of
/// the invocation, so the set stays servable to its end; never more than half the session
/// (a fresh set always satisfies it: no refresh on every INVOKE) nor less than the margin.
pub fn needed_at_invoke(
    margin: Duration,
    invocation_left: Duration,
    session: Duration,
) -> Duration {
    (margin + invocation_left.min(MAX_INVOCATION))
        .min(session / 2)
        .max(margin)
}

/// Whether a set with `remaining` left must be replaced to have `needed`.
pub fn should_refresh(remaining: Duration, needed: Duration) -> bool {
    remaining <= needed
}

/// What is left of an invocation whose deadline is `deadline_ms` (Unix milliseconds).
pub fn invocation_left(deadline_ms: u64, now: SystemTime) -> Duration {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Duration::from_millis(deadline_ms.saturating_sub(now_ms)).min(MAX_INVOCATION)
}

/// An event from `/extension/event/next` ("Lambda Extensions API", "Next").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Invoke {
        deadline_ms: u64,
        request_id: String,
    },
    Shutdown {
        reason: String,
    },
}

pub fn parse_event(body: &[u8]) -> Result<Event, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        event_type: String,
        deadline_ms: Option<u64>,
        request_id: Option<String>,
        shutdown_reason: Option<String>,
    }
    let raw: Raw =
        serde_json::from_slice(body).map_err(|e| format!("an event that is not JSON: {e}"))?;
    match raw.event_type.as_str() {
        "INVOKE" => Ok(Event::Invoke {
            deadline_ms: raw
                .deadline_ms
                .ok_or("an INVOKE event without deadlineMs")?,
            request_id: raw.request_id.unwrap_or_default(),
        }),
        "SHUTDOWN" => Ok(Event::Shutdown {
            reason: raw.shutdown_reason.unwrap_or_default(),
        }),
        other => Err(format!("an event of unknown type {other:?}")),
    }
}

/// What the `Authorization` headers of a request are worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Missing,
    Refused,
    Granted,
}

/// Exactly one `Authorization` equal to `token`, compared in constant time (as digests, so
/// neither the length nor a prefix shows in the timing).
pub fn authorize(headers: &HeaderMap, token: &str) -> Auth {
    let mut given = headers.get_all(header::AUTHORIZATION).iter();
    match (given.next(), given.next()) {
        (None, _) => Auth::Missing,
        (Some(_), Some(_)) => Auth::Refused,
        (Some(value), None) => {
            let a: [u8; 32] = Sha256::digest(value.as_bytes()).into();
            let b: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            let diff = a
                .iter()
                .zip(b.iter())
                .fold(0u8, |acc, (x, y)| acc | (x ^ y));
            if diff == 0 {
                Auth::Granted
            } else {
                Auth::Refused
            }
        }
    }
}

/// The answer to a request that does not get the set, if it does not: authorization first,
/// then the method, then the path.
pub fn refusal(method: &Method, path: &str, auth: Auth) -> Option<Response<Full<Bytes>>> {
    let head = method == Method::HEAD;
    match auth {
        Auth::Missing => {
            return Some(text(
                StatusCode::UNAUTHORIZED,
                "credlock: an Authorization token is required\n",
                head,
            ));
        }
        Auth::Refused => {
            return Some(text(
                StatusCode::FORBIDDEN,
                "credlock: the token is not trusted\n",
                head,
            ));
        }
        Auth::Granted => {}
    }
    if method != Method::GET && !head {
        return Some(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "credlock: GET only\n",
            head,
        ));
    }
    (path != PATH).then(|| text(StatusCode::NOT_FOUND, "credlock: not found\n", head))
}

/// `[\w+=,.@-]` of `name`, after `prefix`, at most 64 characters (STS's RoleSessionName and
/// SourceIdentity limits, AWS STS API Reference, "AssumeRole").
pub fn sts_name(prefix: &str, name: &str) -> String {
    let cleaned: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(*c))
        .collect();
    let mut out = format!("{prefix}{cleaned}");
    out.truncate(64);
    out
}

/// The locked set and how to renew it (`I`: [`AwsIssuer`] but in tests).
pub struct Lock<I: Issuer = AwsIssuer> {
    issuer: I,
    request: AssumeRequest,
    role: RoleArn,
    margin: Duration,
    clock: Arc<dyn Clock>,
    held: tokio::sync::Mutex<Option<LockedCredentials>>,
}

impl<I: Issuer> Lock<I> {
    pub fn new(
        issuer: I,
        request: AssumeRequest,
        role: RoleArn,
        margin: Duration,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Lock {
            issuer,
            request,
            role,
            margin,
            clock,
            held: tokio::sync::Mutex::new(None),
        }
    }

    pub fn role(&self) -> &RoleArn {
        &self.role
    }

    pub fn margin(&self) -> Duration {
        self.margin
    }

    pub fn session(&self) -> Duration {
        self.request.duration
    }

    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// AssumeRole, and without SourceIdentity if that alone was refused (a role that does not
    /// trust sts:SetSourceIdentity), as `credlock credentials` does.
    async fn assume(&self) -> Result<LockedCredentials, String> {
        let within = |request: AssumeRequest| async move {
            tokio::time::timeout(ASSUME_TIMEOUT, self.issuer.assume(&request))
                .await
                .unwrap_or_else(|_| {
                    Err(crate::sts::StsError {
                        code: StsErrorCode::Timeout,
                        message: "no answer in time".into(),
                    })
                })
        };
        let mut result = within(self.request.clone()).await;
        if let Err(e) = &result
            && e.code == StsErrorCode::AccessDenied
            && self.request.source_identity.is_some()
        {
            let plain = AssumeRequest {
                source_identity: None,
                ..self.request.clone()
            };
            result = within(plain).await;
        }
        result
            .map(|issued| issued.credentials)
            .map_err(|e| format!("sts:AssumeRole on {}: {e}", self.role))
    }

    /// The held set with more than `needed` left, renewed first if it has not; on a failed
    /// renewal the held set if it is still servable (more than the serve margin left).
    pub async fn ensure(&self, needed: Duration) -> Result<LockedCredentials, String> {
        let mut held = self.held.lock().await;
        let now = self.clock.now();
        if let Some(set) = held.as_ref()
            && !should_refresh(set.remaining(now), needed)
        {
            return Ok(set.clone());
        }
        match self.assume().await {
            Ok(set) => {
                tracing::info!(
                    expiration = %imds_timestamp(set.expiration),
                    "locked set renewed"
                );
                *held = Some(set.clone());
                Ok(set)
            }
            Err(e) => match held.as_ref() {
                Some(set) if set.remaining(self.clock.now()) > self.margin => {
                    tracing::warn!(error = %e, "renewal failed; the held set is still servable");
                    Ok(set.clone())
                }
                _ => Err(e),
            },
        }
    }
}

#[path = "lambda_api.rs"]
mod api;
pub use api::ExtensionsApi;

/// Whether the runtime will start through credlock's wrapper: `AWS_LAMBDA_EXEC_WRAPPER` names
/// it, or `CREDLOCK_LAMBDA_CUSTOM_BOOTSTRAP=1` says the function's own bootstrap runs it (the
/// `provided` runtimes ignore the variable). Otherwise the runtime would start with the raw
/// credentials beside a locked set nobody uses: the init fails instead.
pub fn wrapper_in_place(var: impl Fn(&str) -> Option<String>) -> Result<(), String> {
    if var("CREDLOCK_LAMBDA_CUSTOM_BOOTSTRAP").as_deref() == Some("1") {
        return Ok(());
    }
    let wrapper = var("AWS_LAMBDA_EXEC_WRAPPER").unwrap_or_default();
    if Path::new(&wrapper).file_name() == Some(std::ffi::OsStr::new("credlock-wrapper")) {
        return Ok(());
    }
    Err(format!(
        "AWS_LAMBDA_EXEC_WRAPPER is {wrapper:?}, not /opt/credlock-wrapper: the runtime would start with the function's raw credentials (set it; or CREDLOCK_LAMBDA_CUSTOM_BOOTSTRAP=1 when the function's bootstrap runs the wrapper itself)"
    ))
}

/// The longest one AssumeRole may take: the endpoint and the event loop wait on it.
const ASSUME_TIMEOUT: Duration = Duration::from_secs(10);

/// The error type reported when no locked set can be had at init.
pub const INIT_ERROR_TYPE: &str = "Extension.CredlockNoLockedCredentials";

/// A fresh random token: 32 bytes as 64 lowercase hex digits.
pub fn new_token() -> String {
    let mut raw = [0u8; 32];
    rand::fill(&mut raw);
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves the endpoint on `listener` for holders of `token`, for as long as the process runs.
pub async fn serve(listener: tokio::net::TcpListener, lock: Arc<Lock>, token: Arc<str>) {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (lock, token) = (lock.clone(), token.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (lock, token) = (lock.clone(), token.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(
                        answer(&lock, &token, req.method(), req.uri().path(), req.headers()).await,
                    )
                }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "endpoint: connection ended");
            }
        });
    }
}

/// One request's answer: a refusal, the set (renewed first when within the serve margin), or
/// 503 when no servable set can be had.
pub async fn answer<I: Issuer>(
    lock: &Lock<I>,
    token: &str,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Response<Full<Bytes>> {
    if let Some(refused) = refusal(method, path, authorize(headers, token)) {
        return refused;
    }
    match lock.ensure(lock.margin).await {
        Ok(set) => crate::endpoint::document(&set, Some(&lock.role), method == Method::HEAD),
        Err(e) => {
            tracing::error!(error = %e, "endpoint: no servable locked set");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "credlock: no locked credentials\n",
                method == Method::HEAD,
            )
        }
    }
}

/// The token file's directory: made 0700 if absent; else it must be a directory of this
/// user's that no one else may enter (not a symlink).
fn private_dir(dir: &Path) -> Result<(), String> {
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir()
        || meta.uid() != nix::unistd::getuid().as_raw()
        || meta.permissions().mode() & 0o077 != 0
    {
        return Err(format!(
            "{} is not a directory of this user's with mode 0700",
            dir.display()
        ));
    }
    Ok(())
}

/// The token in a new 0600 file beside `path` (O_EXCL), renamed over it: the wrapper never
/// sees half a token.
pub fn write_token(path: &Path, content: &str) -> Result<(), String> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("/"));
    private_dir(dir)?;
    let tmp = dir.join(format!(".credlock-token.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let written = file
        .write_all(content.as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests build times around the real clock
#[path = "lambda_tests.rs"]
mod tests;
