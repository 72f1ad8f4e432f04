//! `credlock explain`: would this call pass the lock? The session policy credlock would inject
//! here (or a given one) evaluated against one request context.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::discover::policy_here;
use super::{CommonArgs, EXIT_CANNOT_RUN};
use crate::config::Config;

#[derive(Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The action, as IAM names it (s3:GetObject)
    #[arg(long, value_name = "SERVICE:ACTION")]
    pub action: String,
    /// The resource ARN [default: any resource]
    #[arg(long, value_name = "ARN")]
    pub resource: Option<String>,
    /// The caller's address as AWS sees it (aws:SourceIp); absent for calls through a VPC endpoint
    #[arg(long, value_name = "IP")]
    pub source_ip: Option<std::net::IpAddr>,
    /// The VPC of a call through a VPC endpoint (aws:SourceVpc)
    #[arg(long, value_name = "VPC-ID")]
    pub vpc: Option<String>,
    /// The VPC endpoint of the call (aws:SourceVpce)
    #[arg(long, value_name = "VPCE-ID")]
    pub vpce: Option<String>,
    /// An AWS service makes the call on the caller's behalf (aws:ViaAWSService = true)
    #[arg(long)]
    pub via_aws_service: bool,
    /// Evaluate this policy document instead of the one credlock would inject here
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
}

pub async fn explain(config: Config, args: ExplainArgs) -> ExitCode {
    use crate::evaluate::{PolicyDocument, RequestContext, evaluate};
    let (text, origin) = match &args.policy {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => (text, path.display().to_string()),
            Err(e) => {
                eprintln!("credlock: cannot read {}: {e}", path.display());
                return ExitCode::from(EXIT_CANNOT_RUN);
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
                return ExitCode::from(EXIT_CANNOT_RUN);
            }
        },
    };
    let document = match PolicyDocument::parse(&text) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("credlock: {origin}: {e}");
            return ExitCode::from(EXIT_CANNOT_RUN);
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
