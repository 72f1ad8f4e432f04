//! `credlock`: run the proxy, check a config, print the session policy or the discovered
//! environment, explain whether a call passes the lock, publish a fleet's environment to S3.
//! Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 invalid configuration; `explain`, `audit`
//! and `publish-environment` say theirs in their help.
// One exception, with its reason: `release_free_memory` (malloc_trim). The library crate
// forbids unsafe code outright.
#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use credlock::config::{self, Config, EXIT_CONFIG, LogFormat, Overrides};
use credlock::{
    app, discovery, imds::Imds, policy, sts::ImdsSourceProvider, upstream::UpstreamClient,
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    version,
    about = "EC2 metadata proxy that locks instance-role credentials to the instance's network"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve IMDS on the listeners, locking role credentials.
    Run(RunArgs),
    /// Validate the configuration and exit (0 valid, 78 invalid).
    CheckConfig(CommonArgs),
    /// Print the session policy credlock would inject on this instance (no AssumeRole).
    Policy(CommonArgs),
    /// Print the environment each discovery source finds, and the merged result.
    Discover(CommonArgs),
    /// Would this call pass the lock? Evaluates the session policy credlock would inject here
    /// (or --policy FILE) and says which statement and condition decided.
    /// Exit: 0 allowed, 1 denied, 2 usage, 3 cannot evaluate (no policy), 78 invalid config.
    Explain(ExplainArgs),
    /// Read CloudTrail logs: calls of locked sessions denied by the lock (theft signals), and
    /// calls of instance-profile sessions the lock would deny (rollout readiness).
    /// Exit: 0 nothing found, 1 findings, 2 usage, 3 cannot run, 78 invalid config.
    Audit(AuditArgs),
    /// On a management host, not on the instances: compute the account's environment with the
    /// ec2 source's code and write it to S3 for the instances' s3 source, only when it changed.
    /// One line per document: unchanged, updated or failed. Flags may come from the
    /// environment (CREDLOCK_PUBLISH_*, lists comma-separated); AWS credentials and Region
    /// from the SDK's default chain.
    /// Exit: 0 every document unchanged or updated, 1 any failed, 2 usage.
    PublishEnvironment(PublishArgs),
    /// Print a locked credential set once and exit: for an SDK's credential_process, CI
    /// runners, on-premises hosts and scripts the proxy does not reach. Source credentials
    /// and Region from the SDK's default chain; the environment from the configured
    /// discovery sources; on a host where credlock runs, its own (locked) set. An unexpired
    /// set is reused from a 0600 cache file ($XDG_RUNTIME_DIR/credlock, else
    /// /tmp/credlock-<uid>). Exit: 0 printed, 1 failed (one line on stderr), 78 invalid config.
    Credentials(CredentialsArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CredentialsFormat {
    /// The JSON an SDK's credential_process reads (Version 1)
    CredentialProcess,
    /// Shell export lines
    Env,
    /// JSON with the role and where the set came from
    Json,
}

#[derive(Args)]
struct CredentialsArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[arg(long, value_enum, default_value = "credential-process")]
    format: CredentialsFormat,
    /// The role to lock [default: the caller's own role, from sts:GetCallerIdentity]
    #[arg(long, value_name = "ARN")]
    role_arn: Option<String>,
    /// Neither read nor write the cache
    #[arg(long)]
    no_cache: bool,
    /// The cache directory [default: $XDG_RUNTIME_DIR/credlock, else /tmp/credlock-<uid>]
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PublishScope {
    /// The VPCs named with --vpc
    Vpc,
    /// Every VPC of the account in the Region
    Region,
    /// The VPCs carrying --tag-key (with --tag-value, when given)
    Tagged,
}

#[derive(Args)]
struct PublishArgs {
    /// The bucket the instances read
    #[arg(long, env = "CREDLOCK_PUBLISH_BUCKET", value_name = "BUCKET")]
    bucket: String,
    /// The object key; {account}, {region} and {vpc} are filled in ({vpc}: one document per --vpc)
    #[arg(long, env = "CREDLOCK_PUBLISH_KEY", value_name = "KEY")]
    key: String,
    /// The account that must own the bucket [default: the caller's]
    #[arg(
        long,
        env = "CREDLOCK_PUBLISH_EXPECTED_BUCKET_OWNER",
        value_name = "ACCOUNT"
    )]
    expected_bucket_owner: Option<String>,
    /// The Region to describe and write to [default: the SDK's, e.g. AWS_REGION]
    #[arg(long, env = "CREDLOCK_PUBLISH_REGION", value_name = "REGION")]
    region: Option<String>,
    /// Which VPCs the environment covers, as the ec2 source's scope
    #[arg(long, value_enum, env = "CREDLOCK_PUBLISH_SCOPE")]
    scope: PublishScope,
    /// A VPC of the vpc scope (repeatable; a publisher does not read its own VPC from IMDS)
    #[arg(
        long = "vpc",
        value_name = "VPC-ID",
        env = "CREDLOCK_PUBLISH_VPCS",
        value_delimiter = ','
    )]
    vpcs: Vec<String>,
    /// The tag of the tagged scope
    #[arg(long, env = "CREDLOCK_PUBLISH_TAG_KEY", value_name = "KEY")]
    tag_key: Option<String>,
    /// The tag's value [default: any value]
    #[arg(long, env = "CREDLOCK_PUBLISH_TAG_VALUE", value_name = "VALUE")]
    tag_value: Option<String>,
    /// An IPv4 address or CIDR added to every document (repeatable), e.g. a shared egress proxy
    #[arg(
        long,
        value_name = "CIDR",
        env = "CREDLOCK_PUBLISH_IPV4",
        value_delimiter = ','
    )]
    ipv4: Vec<String>,
    /// An IPv6 address or CIDR added to every document (repeatable)
    #[arg(
        long,
        value_name = "CIDR",
        env = "CREDLOCK_PUBLISH_IPV6",
        value_delimiter = ','
    )]
    ipv6: Vec<String>,
    /// EC2 endpoint URL [default: the SDK's, or AWS_ENDPOINT_URL_EC2]
    #[arg(long, value_name = "URL")]
    ec2_endpoint: Option<String>,
    /// S3 endpoint URL, path-style addressing [default: the SDK's, or AWS_ENDPOINT_URL_S3]
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// STS endpoint URL [default: the SDK's, or AWS_ENDPOINT_URL_STS]
    #[arg(long, value_name = "URL")]
    sts_endpoint: Option<String>,
}

#[derive(Args)]
struct AuditArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// CloudTrail log files or directories (S3 delivery format, gzipped or not, or one event
    /// per line), read recursively
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Environment documents (the boot-provider format, `credlock discover`'s `merged`): a file
    /// named after an instance (i-....json) applies to it, any other to every instance; a
    /// directory holds such files. Repeatable. Required off an instance.
    #[arg(long, value_name = "FILE|DIR")]
    environment: Vec<PathBuf>,
    /// The instance role (for the lock's self-assume deny) [default: this instance's role]
    #[arg(long, value_name = "ARN")]
    role: Option<String>,
    /// Print one JSON object instead of tables
    #[arg(long)]
    json: bool,
    /// Groups kept per list; beyond it the smallest are dropped and counted
    #[arg(long, value_name = "N", default_value_t = credlock::audit::DEFAULT_MAX_GROUPS)]
    max_groups: usize,
}

#[derive(Args)]
struct ExplainArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The action, as IAM names it (s3:GetObject)
    #[arg(long, value_name = "SERVICE:ACTION")]
    action: String,
    /// The resource ARN [default: any resource]
    #[arg(long, value_name = "ARN")]
    resource: Option<String>,
    /// The caller's address as AWS sees it (aws:SourceIp); absent for calls through a VPC endpoint
    #[arg(long, value_name = "IP")]
    source_ip: Option<std::net::IpAddr>,
    /// The VPC of a call through a VPC endpoint (aws:SourceVpc)
    #[arg(long, value_name = "VPC-ID")]
    vpc: Option<String>,
    /// The VPC endpoint of the call (aws:SourceVpce)
    #[arg(long, value_name = "VPCE-ID")]
    vpce: Option<String>,
    /// An AWS service makes the call on the caller's behalf (aws:ViaAWSService = true)
    #[arg(long)]
    via_aws_service: bool,
    /// Evaluate this policy document instead of the one credlock would inject here
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
}

/// `explain` and `audit`: cannot run (no policy or environment to judge with, nothing read).
const EXIT_EXPLAIN_FAILED: u8 = 3;

#[derive(Args)]
struct CommonArgs {
    /// TOML configuration file [default: /etc/credlock/credlock.toml when present]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Upstream IMDS URL [default: http://169.254.169.254]
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// plain or json
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// error, warn, info, debug, trace, or a tracing filter
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// IMDS listener address, repeatable [default: 127.0.0.1:8169 and [::1]:8169]
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// Admin listener address, loopback only [default: 127.0.0.1:9169]
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Runs off an instance: no credlock configuration is read.
    let cli = match cli.command {
        Command::PublishEnvironment(args) => return publish_environment(args),
        command => Cli { command },
    };
    let (common, listen, admin_listen) = match &cli.command {
        Command::Run(r) => (&r.common, r.listen.clone(), r.admin_listen.clone()),
        Command::CheckConfig(c) | Command::Policy(c) | Command::Discover(c) => {
            (c, Vec::new(), None)
        }
        Command::Explain(e) => (&e.common, Vec::new(), None),
        Command::Audit(a) => (&a.common, Vec::new(), None),
        Command::Credentials(c) => (&c.common, Vec::new(), None),
        Command::PublishEnvironment(_) => return ExitCode::from(2),
    };
    let overrides = Overrides {
        listen,
        admin_listen,
        upstream: common.upstream.clone(),
        log_format: common.log_format.clone(),
        // A credential process's stderr is for its one error line: only warnings and errors
        // unless asked.
        log_level: common
            .log_level
            .clone()
            .or_else(|| matches!(cli.command, Command::Credentials(_)).then(|| "warn".to_string())),
    };
    let config = match config::load(common.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("credlock: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    init_logging(&config);
    // Listeners systemd passes (credlock.socket), taken before any thread exists: reading them
    // clears LISTEN_FDS/LISTEN_PID from the environment.
    let inherited = match &cli.command {
        Command::Run(_) => app::inherited_listeners(),
        _ => Vec::new(),
    };
    // One thread, like an nginx worker: a metadata proxy's work is short and I/O-bound, and a
    // single-threaded scheduler saves the cross-thread wake-ups and work stealing a
    // multi-threaded one pays on every request (0.70x -> 0.83x nginx's throughput, issue 7).
    // The AWS SDK calls, a few a day, share it; blocking work goes to tokio's blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("credlock: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run(_) => run(config, inherited).await,
            Command::CheckConfig(_) => {
                if let Err(e) = config::check_access_names(&config.access) {
                    eprintln!("credlock: invalid configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG as u8);
                }
                let d = &config.discovery;
                if d.ec2.is_some() && d.s3.is_none() && d.boot_provider.is_none() {
                    eprintln!(
                        "credlock: warning: the ec2 source is enabled without an s3 or boot_provider source: on a fleet, every instance calling EC2 Describe* shares the account's 20/s refill; publish once with credlock publish-environment and use the s3 source"
                    );
                }
                let ecs = config.ecs.as_ref().map_or(String::new(), |e| {
                    format!(
                        ", ECS tasks {:?} -> agent http://{} (AssumeRole <= {}/s)",
                        e.listen, e.agent.authority, e.assume_rate
                    )
                });
                println!(
                    "configuration OK: listen {:?}, admin {}, upstream http://{}, sources {:?}{ecs}",
                    config.listen,
                    config.admin_listen,
                    config.upstream.authority,
                    discovery::enabled_sources(&config.discovery)
                );
                ExitCode::SUCCESS
            }
            Command::Policy(_) => print_policy(config).await,
            Command::Discover(_) => print_discovery(config).await,
            Command::Explain(args) => explain(config, args).await,
            Command::Audit(args) => audit(config, args).await,
            Command::PublishEnvironment(_) => ExitCode::from(2),
            Command::Credentials(args) => credentials(config, args).await,
        }
    })
}

fn init_logging(config: &Config) {
    let filter = std::env::var("CREDLOCK_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(&config.log_level));
    // Colour only on a terminal: in the journal, escape codes split `key=value` fields apart.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Plain => builder.init(),
    }
}

async fn run(config: Config, inherited: Vec<std::net::TcpListener>) -> ExitCode {
    let running = match app::start_inherited(config, inherited).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("credlock: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("credlock: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    if let Some(e) = &running.admin_error {
        notify(&[sd_notify::NotifyState::Status(&format!(
            "admin listener unavailable: {e}"
        ))]);
    }
    tokio::spawn(trim_after_floods(
        running
            .metrics
            .open_connections
            .with_label_values(&["imds"]),
    ));
    let mut ready = running.ready.clone();
    tokio::spawn(async move {
        if ready.wait_for(|r| *r).await.is_ok() {
            tracing::info!("holding locked credentials: ready");
            notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status("holding locked credentials"),
            ]);
        }
    });
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) {
        let period = Duration::from_micros(usec / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                notify(&[sd_notify::NotifyState::Watchdog]);
                tokio::time::sleep(period).await;
            }
        });
    }
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    let _ = running.shutdown.send(true);
    let _ = running.task.await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// A flood of connections (a local user opening hundreds of them, issue 14) makes the heap grow
/// by 10-20 MB; once they close, the memory is free but glibc keeps it: long-lived allocations
/// made meanwhile pin the heap's top, so its automatic trim cannot shrink it. The free pages are
/// handed back with malloc_trim(3) (a walk of the heap, about a millisecond) when, at a check
/// every 5 s, either the resident size grew by `GROWTH_KB` since the last trim (connections
/// opened and closed quickly), or the open connections fell by `FELL` from their high point
/// (a flood that held its connections has ended).
async fn trim_after_floods(open: prometheus::IntGauge) {
    const GROWTH_KB: u64 = 4 * 1024;
    const FELL: i64 = 128;
    let mut settled = resident_kb();
    let mut high = open.get();
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (now_kb, now_open) = (resident_kb(), open.get());
        high = high.max(now_open);
        let grew = matches!((now_kb, settled), (Some(n), Some(s)) if n >= s + GROWTH_KB);
        if grew || high - now_open >= FELL {
            release_free_memory();
            settled = resident_kb();
            high = now_open;
            tracing::debug!(before_kb = ?now_kb, after_kb = ?settled, "free memory handed back");
        } else if let (Some(n), Some(s)) = (now_kb, settled)
            && n < s
        {
            settled = Some(n);
        }
    }
}

/// VmRSS of this process in kB (`/proc/self/status`).
fn resident_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Returns the heap's free pages to the kernel.
///
/// Why unsafe code: glibc's malloc_trim is the only way to release free memory in the middle of
/// the heap (its automatic trim only shrinks the top), and no safe wrapper exists in a
/// well-kept crate. It takes no argument that refers to memory of ours.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_memory() {
    // SAFETY: malloc_trim(3) takes a padding size, touches only glibc's own heap under its own
    // lock, and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Identity plus one run of every enabled source.
async fn discover_once(
    config: &Config,
) -> Result<
    (
        credlock::identity::InstanceIdentity,
        Vec<(
            discovery::SourceKind,
            Result<credlock::environment::Environment, String>,
        )>,
    ),
    String,
> {
    let imds = Arc::new(Imds::new(UpstreamClient::new(
        &config.upstream,
        config.upstream_timeout,
    )));
    let configured = config
        .lock
        .role_arn
        .as_deref()
        .and_then(credlock::identity::RoleArn::parse);
    let identity = imds
        .identity(configured.as_ref())
        .await
        .map_err(|e| format!("cannot learn the instance identity from IMDS: {e}"))?;
    let source = ImdsSourceProvider::new(imds.clone());
    let ctx = app::discovery_context(
        config,
        imds,
        identity.clone(),
        aws_credential_types::provider::SharedCredentialsProvider::new(source),
    )
    .await;
    let mut results = Vec::new();
    for kind in discovery::enabled_sources(&config.discovery) {
        results.push((kind, discovery::run_source(kind, &ctx).await));
    }
    Ok((identity, results))
}

/// The session policy credlock would inject here: discovery once, then the template.
/// `Err((exit code, message))`.
async fn policy_here(
    config: &Config,
) -> Result<(policy::SessionPolicy, credlock::identity::RoleArn), (ExitCode, String)> {
    let template = app::load_template(config)
        .map_err(|e| (ExitCode::from(EXIT_CONFIG as u8), e.to_string()))?;
    let (identity, results) = discover_once(config)
        .await
        .map_err(|e| (ExitCode::FAILURE, e))?;
    let mut env = credlock::environment::Environment::default();
    for (kind, result) in &results {
        match result {
            Ok(e) => env.merge(e),
            Err(e) => eprintln!("credlock: source {} failed: {e}", kind.label()),
        }
    }
    policy::render(&template, &env, &identity.role)
        .map(|p| (p, identity.role))
        .map_err(|e| (ExitCode::FAILURE, e.to_string()))
}

async fn print_policy(config: Config) -> ExitCode {
    match policy_here(&config).await {
        Ok((p, role)) => {
            println!("{}", p.text);
            eprintln!(
                "credlock: {} characters of {} for role {role}",
                p.characters,
                policy::MAX_POLICY_CHARS,
            );
            ExitCode::SUCCESS
        }
        Err((code, e)) => {
            eprintln!("credlock: {e}");
            code
        }
    }
}

async fn explain(config: Config, args: ExplainArgs) -> ExitCode {
    use credlock::evaluate::{PolicyDocument, RequestContext, evaluate};
    let (text, origin) = match &args.policy {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => (text, path.display().to_string()),
            Err(e) => {
                eprintln!("credlock: cannot read {}: {e}", path.display());
                return ExitCode::from(EXIT_EXPLAIN_FAILED);
            }
        },
        None => match policy_here(&config).await {
            Ok((p, role)) => (
                p.text,
                format!("the session policy credlock would inject here for {role}"),
            ),
            Err((_, e)) => {
                eprintln!(
                    "credlock: {e}\ncredlock: off an instance, give the policy with --policy FILE (credlock policy > FILE on an instance)"
                );
                return ExitCode::from(EXIT_EXPLAIN_FAILED);
            }
        },
    };
    let document = match PolicyDocument::parse(&text) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("credlock: {origin}: {e}");
            return ExitCode::from(EXIT_EXPLAIN_FAILED);
        }
    };
    let request = RequestContext {
        action: args.action.clone(),
        resource: args.resource.clone(),
        source_ip: args.source_ip,
        source_vpc: args.vpc.clone(),
        source_vpce: args.vpce.clone(),
        via_aws_service: Some(args.via_aws_service),
        ..RequestContext::default()
    };
    let evaluation = evaluate(&document, &request);
    let absent = || "(absent)".to_string();
    println!(
        "{}: {}{}",
        if evaluation.allowed() {
            "ALLOW"
        } else {
            "DENY"
        },
        evaluation.decision,
        evaluation
            .statement
            .as_ref()
            .map(|s| format!(" by {s}"))
            .unwrap_or_default()
    );
    println!(
        "request: {} on {}, aws:SourceIp {}, aws:SourceVpc {}, aws:SourceVpce {}, aws:ViaAWSService {}",
        request.action,
        request.resource.as_deref().unwrap_or("any resource"),
        request.source_ip.map_or_else(absent, |ip| ip.to_string()),
        request.source_vpc.clone().unwrap_or_else(absent),
        request.source_vpce.clone().unwrap_or_else(absent),
        args.via_aws_service
    );
    println!("policy: {origin}");
    for reason in &evaluation.reasons {
        println!("  {reason}");
    }
    if evaluation.allowed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn credentials(config: Config, args: CredentialsArgs) -> ExitCode {
    use credlock::cli::credentials::{Format, Options, run};
    let options = Options {
        format: match args.format {
            CredentialsFormat::CredentialProcess => Format::CredentialProcess,
            CredentialsFormat::Env => Format::Env,
            CredentialsFormat::Json => Format::Json,
        },
        role_arn: args.role_arn,
        no_cache: args.no_cache,
        cache_dir: args.cache_dir,
    };
    match run(&config, &options).await {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("credlock: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn print_discovery(config: Config) -> ExitCode {
    let (identity, results) = match discover_once(&config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("credlock: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut merged = credlock::environment::Environment::default();
    let mut sources = serde_json::Map::new();
    for (kind, result) in &results {
        let value = match result {
            Ok(e) => {
                merged.merge(e);
                serde_json::json!({ "environment": e })
            }
            Err(e) => serde_json::json!({ "error": e }),
        };
        sources.insert(kind.label().to_string(), value);
    }
    let out = serde_json::json!({
        "instance_id": identity.instance_id,
        "region": identity.region,
        "role_arn": identity.role.to_string(),
        "sources": sources,
        "merged": merged,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    if results.iter().all(|(_, r)| r.is_err()) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

async fn audit(config: Config, args: AuditArgs) -> ExitCode {
    use credlock::audit::{AuditOptions, audit_paths, render_table};
    use credlock::rollout::{Environments, LockJudge};
    let cannot = |e: String| {
        eprintln!("credlock: {e}");
        ExitCode::from(EXIT_EXPLAIN_FAILED)
    };
    if args.max_groups == 0 {
        eprintln!("credlock: --max-groups must be at least 1");
        return ExitCode::from(2);
    }
    let template = match app::load_template(&config) {
        Ok(t) => t,
        Err(e) => return cannot(e.to_string()),
    };
    let given_role = match args
        .role
        .as_deref()
        .map(|r| (r, credlock::identity::RoleArn::parse(r)))
    {
        Some((_, Some(role))) => Some(role),
        Some((text, None)) => {
            eprintln!("credlock: --role {text:?} is not an IAM role ARN");
            return ExitCode::from(2);
        }
        None => None,
    };
    let (envs, role) = if args.environment.is_empty() {
        // On an instance: this instance's environment, for every instance's calls.
        match discover_once(&config).await {
            Ok((identity, results)) => {
                let mut envs = Environments::default();
                for (kind, result) in &results {
                    match result {
                        Ok(e) => envs.fleet.merge(e),
                        Err(e) => eprintln!("credlock: source {} failed: {e}", kind.label()),
                    }
                }
                (envs, given_role.unwrap_or(identity.role))
            }
            Err(e) => {
                return cannot(format!(
                    "{e}\ncredlock: off an instance, give the environment with --environment (documents in the boot-provider format)"
                ));
            }
        }
    } else {
        match Environments::load(&args.environment) {
            // Off an instance the role is only needed for the self-assume deny.
            Ok(envs) => (
                envs,
                given_role.unwrap_or_else(|| {
                    credlock::identity::RoleArn::derived("aws", "000000000000", "instance-role")
                }),
            ),
            Err(e) => return cannot(e),
        }
    };
    let judge = LockJudge::new(template, role, envs);
    let options = AuditOptions {
        max_groups: args.max_groups,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let paths = args.paths.clone();
    // Blocking reads on the runtime's one thread: nothing else runs in this command.
    let report = audit_paths(&paths, &judge, &options);
    // The table lists skipped files itself; JSON keeps stdout to the one object.
    if args.json || report.files_read == 0 {
        for skipped in &report.skipped {
            eprintln!("credlock: skipped {}: {}", skipped.path, skipped.reason);
        }
    }
    if report.files_read == 0 {
        return cannot("no CloudTrail file could be read".into());
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", render_table(&report));
    }
    if report.denied_locked.is_empty() && report.would_deny.is_empty() && report.dropped_groups == 0
    {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn publish_environment(args: PublishArgs) -> ExitCode {
    use credlock::config::{Ec2Scope, StaticEnvironment};
    use credlock::publish::{self, Options};
    let filter = std::env::var("CREDLOCK_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let usage = |e: String| {
        eprintln!("credlock: {e}");
        ExitCode::from(2)
    };
    let scope = match args.scope {
        PublishScope::Vpc => Ec2Scope::Vpcs(args.vpcs.clone()),
        PublishScope::Region => Ec2Scope::Region,
        PublishScope::Tagged => match &args.tag_key {
            Some(key) => Ec2Scope::Tagged {
                key: key.clone(),
                value: args.tag_value.clone(),
            },
            None => return usage("--scope tagged needs --tag-key".into()),
        },
    };
    if !matches!(args.scope, PublishScope::Vpc) && !args.vpcs.is_empty() {
        return usage("--vpc is for --scope vpc".into());
    }
    if !matches!(args.scope, PublishScope::Tagged)
        && (args.tag_key.is_some() || args.tag_value.is_some())
    {
        return usage("--tag-key and --tag-value are for --scope tagged".into());
    }
    let options = Options {
        bucket: args.bucket,
        key: args.key,
        expected_bucket_owner: args.expected_bucket_owner,
        region: args.region,
        scope,
        additions: StaticEnvironment {
            ipv4: args.ipv4,
            ipv6: args.ipv6,
            ..StaticEnvironment::default()
        },
        ec2_endpoint: args.ec2_endpoint,
        s3_endpoint: args.s3_endpoint,
        sts_endpoint: args.sts_endpoint,
    };
    if let Err(e) = publish::validate(&options) {
        return usage(e);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("credlock: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcomes = runtime.block_on(publish::run(&options, &credlock::clock::SystemClock));
    for outcome in &outcomes {
        println!("{outcome}");
    }
    if outcomes.iter().any(publish::Outcome::failed) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
