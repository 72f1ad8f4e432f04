//! `credlock check-config`, `policy` and `discover`: what credlock would do on this instance,
//! without assuming a role.

use std::process::ExitCode;
use std::sync::Arc;

use crate::config::{self, Config, EXIT_CONFIG};
use crate::environment::Environment;
use crate::identity::{InstanceIdentity, RoleArn};
use crate::{
    app, discovery, imds::Imds, policy, sts::ImdsSourceProvider, upstream::UpstreamClient,
};

/// Identity plus one run of every enabled source.
pub async fn discover_once(
    config: &Config,
) -> Result<
    (
        InstanceIdentity,
        Vec<(
            discovery::SourceKind,
            Result<Environment, discovery::SourceError>,
        )>,
    ),
    String,
> {
    let imds = Arc::new(Imds::new(UpstreamClient::new(
        &config.upstream,
        config.upstream_timeout,
    )));
    let configured = config.lock.role_arn.as_deref().and_then(RoleArn::parse);
    let identity = imds
        .identity(configured.as_ref())
        .await
        .map_err(|e| format!("cannot learn the instance identity from IMDS: {e}"))?;
    let source = ImdsSourceProvider::new(imds.clone());
    let ctx = discovery::context(
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
pub async fn policy_here(
    config: &Config,
) -> Result<(policy::SessionPolicy, RoleArn), (ExitCode, String)> {
    let template = app::load_template(config)
        .map_err(|e| (ExitCode::from(EXIT_CONFIG as u8), e.to_string()))?;
    let (identity, results) = discover_once(config)
        .await
        .map_err(|e| (ExitCode::FAILURE, e))?;
    let mut env = Environment::default();
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

pub async fn print_policy(config: Config) -> ExitCode {
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

pub async fn print_discovery(config: Config) -> ExitCode {
    let (identity, results) = match discover_once(&config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("credlock: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut merged = Environment::default();
    let mut sources = serde_json::Map::new();
    for (kind, result) in &results {
        let value = match result {
            Ok(e) => {
                merged.merge(e);
                serde_json::json!({ "environment": e })
            }
            Err(e) => serde_json::json!({ "error": e.to_string() }),
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

/// `credlock check-config`: the configuration is valid (names resolve), with a warning for a
/// fleet-unfriendly source choice.
pub fn check_config(config: &Config) -> ExitCode {
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
    let ecs: String = config
        .ecs
        .iter()
        .chain(&config.pod_identity)
        .map(|e| {
            let what = match e.kind {
                crate::config::AgentKind::Ecs => "ECS tasks",
                crate::config::AgentKind::PodIdentity => "EKS Pod Identity",
            };
            format!(
                ", {what} {:?} -> agent http://{} (AssumeRole <= {}/s)",
                e.listen, e.agent.authority, e.assume_rate
            )
        })
        .collect();
    println!(
        "configuration OK: listen {:?}, admin {}, upstream http://{}, sources {:?}{ecs}",
        config.listen,
        config.admin_listen,
        config.upstream.authority,
        discovery::enabled_sources(&config.discovery)
    );
    ExitCode::SUCCESS
}
