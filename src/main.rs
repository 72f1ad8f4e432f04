//! `credlock`: run the proxy, check a config, print the session policy or the discovered
//! environment, explain whether a call passes the lock, publish a fleet's environment to S3.
//! Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 invalid configuration; `explain`, `audit`
//! and `publish-environment` say theirs in their help.
// One exception, with its reason: `release_free_memory` (malloc_trim). The library crate
// forbids unsafe code outright.
#![deny(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use credlock::app;
use credlock::cli::audit::{AuditArgs, audit};
use credlock::cli::discover::{check_config, print_discovery, print_policy};
use credlock::cli::endpoint_token::{EndpointTokenArgs, endpoint_token};
use credlock::cli::explain::{ExplainArgs, explain};
use credlock::cli::lambda::{LambdaArgs, lambda_extension};
use credlock::cli::publish::{PublishArgs, publish_environment};
use credlock::cli::{CommonArgs, CredentialsArgs, credentials_command};
use credlock::config::{self, Config, EXIT_CONFIG, LogFormat, Overrides};
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
    /// As root: a token for the loopback container-credentials endpoint ([containers.endpoint])
    /// for one user: a 0400 file the user owns (for AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE),
    /// and its SHA-256 in the digests file the endpoint trusts. --revoke takes it away.
    /// Exit: 0 done, 1 failed, 2 usage.
    EndpointToken(EndpointTokenArgs),
    /// In an AWS Lambda execution environment, as the credlock layer's external extension:
    /// lock the function's credentials and serve them on a loopback endpoint (see layer/).
    LambdaExtension(LambdaArgs),
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
        Command::EndpointToken(args) => return endpoint_token(args),
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
        Command::LambdaExtension(l) => (&l.common, Vec::new(), None),
        Command::PublishEnvironment(_) | Command::EndpointToken(_) => return ExitCode::from(2),
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
    // multi-threaded one pays on every request (measured in benches/README.md).
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
            Command::CheckConfig(_) => check_config(&config),
            Command::Policy(_) => print_policy(config).await,
            Command::Discover(_) => print_discovery(config).await,
            Command::Explain(args) => explain(config, args).await,
            Command::Audit(args) => audit(config, args).await,
            Command::PublishEnvironment(_) | Command::EndpointToken(_) => ExitCode::from(2),
            Command::Credentials(args) => credentials_command(config, args).await,
            Command::LambdaExtension(args) => lambda_extension(config, args).await,
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
