//! `credlock audit`: CloudTrail logs judged by the lock (theft signals and rollout readiness).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::discover::discover_once;
use super::{CommonArgs, EXIT_CANNOT_RUN};
use crate::app;
use crate::config::Config;

#[derive(Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// CloudTrail log files or directories (S3 delivery format, gzipped or not, or one event
    /// per line), read recursively
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Environment documents (the boot-provider format, `credlock discover`'s `merged`): a file
    /// named after an instance (i-....json) applies to it, any other to every instance; a
    /// directory holds such files. Repeatable. Required off an instance.
    #[arg(long, value_name = "FILE|DIR")]
    pub environment: Vec<PathBuf>,
    /// The instance role (for the lock's self-assume deny) [default: this instance's role]
    #[arg(long, value_name = "ARN")]
    pub role: Option<String>,
    /// Print one JSON object instead of tables
    #[arg(long)]
    pub json: bool,
    /// Groups kept per list; beyond it the smallest are dropped and counted
    #[arg(long, value_name = "N", default_value_t = crate::audit::DEFAULT_MAX_GROUPS)]
    pub max_groups: usize,
}

pub async fn audit(config: Config, args: AuditArgs) -> ExitCode {
    use crate::audit::{AuditOptions, audit_paths, render_table};
    use crate::rollout::{Environments, LockJudge};
    let cannot = |e: String| {
        eprintln!("credlock: {e}");
        ExitCode::from(EXIT_CANNOT_RUN)
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
        .map(|r| (r, crate::identity::RoleArn::parse(r)))
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
                    crate::identity::RoleArn::derived("aws", "000000000000", "instance-role")
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
