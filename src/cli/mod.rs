//! Commands of the `credlock` binary that are more than wiring (`main.rs` parses the command
//! line, starts logging and the runtime, and calls them). Each returns the process's exit code.

pub mod audit;
pub mod credentials;
pub mod discover;
pub mod endpoint_token;
pub mod explain;
pub mod lambda;
pub mod publish;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::Config;

/// `explain` and `audit`: cannot run (no policy or environment to judge with, nothing read).
pub const EXIT_CANNOT_RUN: u8 = 3;

#[derive(Args)]
pub struct CommonArgs {
    /// TOML configuration file [default: /etc/credlock/credlock.toml when present]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Upstream IMDS URL [default: http://169.254.169.254]
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// plain or json
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// error, warn, info, debug, trace, or a tracing filter
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum CredentialsFormat {
    /// The JSON an SDK's credential_process reads (Version 1)
    CredentialProcess,
    /// Shell export lines
    Env,
    /// JSON with the role and where the set came from
    Json,
}

#[derive(Args)]
pub struct CredentialsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[arg(long, value_enum, default_value = "credential-process")]
    pub format: CredentialsFormat,
    /// The role to lock [default: the caller's own role, from sts:GetCallerIdentity]
    #[arg(long, value_name = "ARN")]
    pub role_arn: Option<String>,
    /// Neither read nor write the cache
    #[arg(long)]
    pub no_cache: bool,
    /// The cache directory [default: $XDG_RUNTIME_DIR/credlock, else /tmp/credlock-<uid>]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// `credlock credentials`: prints the set, or one line naming the cause on stderr.
pub async fn credentials_command(config: Config, args: CredentialsArgs) -> ExitCode {
    use credentials::{Format, Options, run};
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
