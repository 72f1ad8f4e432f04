//! `[containers.ecs]`: credlock in front of the ECS agent's task-credential endpoint
//! (`container.rs`). Off unless the table is there.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Upstream, invalid, millis, parse_addr, parse_upstream_key};

/// Where ecs-init points `169.254.170.2:80` today: the agent's credential endpoint
/// ("Amazon ECS container agent configuration", Amazon ECS Developer Guide).
pub const DEFAULT_AGENT: &str = "http://127.0.0.1:51679";
/// Where credlock listens for the traffic the firewall sends it instead.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:51680";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ContainersSection {
    ecs: Option<EcsSection>,
    endpoint: Option<EndpointSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct EndpointSection {
    enabled: Option<bool>,
    listen: Option<String>,
    tokens: Option<PathBuf>,
}

/// Where the opt-in container-credentials endpoint listens (`[containers.endpoint]`).
/// A port below 1024: only root may bind it, so no user can listen there first and collect
/// the tokens SDKs send (systemd's credlock.socket binds it for credlock).
pub const DEFAULT_ENDPOINT_LISTEN: &str = "127.0.0.1:982";
/// The token digests `credlock endpoint-token` writes and the endpoint trusts.
pub const DEFAULT_ENDPOINT_TOKENS: &str = "/etc/credlock/endpoint-tokens";

/// The validated `[containers.endpoint]`: the instance's locked set in the container
/// credential format, to holders of a token (`endpoint.rs`).
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub listen: SocketAddr,
    pub tokens: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct EcsSection {
    enabled: Option<bool>,
    listen: Option<Vec<String>>,
    agent: Option<String>,
    agent_timeout_ms: Option<u64>,
    assume_rate: Option<f64>,
    max_tasks: Option<usize>,
}

/// The validated `[containers.ecs]`.
#[derive(Debug, Clone)]
pub struct EcsConfig {
    pub listen: Vec<SocketAddr>,
    pub agent: Upstream,
    pub agent_timeout: Duration,
    /// AssumeRole calls per second for task sets (a token bucket of twice this).
    pub assume_rate: f64,
    /// Locked task sets held at most.
    pub max_tasks: usize,
}

/// `[containers.endpoint]`: loopback only, since the SDKs accept a plain-http
/// `AWS_CONTAINER_CREDENTIALS_FULL_URI` only to a loopback host ("Container credential
/// provider", AWS SDKs and Tools Reference Guide).
pub(super) fn validate_endpoint(
    c: &mut ContainersSection,
    taken: &[SocketAddr],
) -> Result<Option<EndpointConfig>, ConfigError> {
    let Some(e) = c.endpoint.take() else {
        return Ok(None);
    };
    if e.enabled == Some(false) {
        return Ok(None);
    }
    let raw = e.listen.unwrap_or_else(|| DEFAULT_ENDPOINT_LISTEN.into());
    let listen = parse_addr("containers.endpoint.listen", &raw)?;
    if !listen.ip().is_loopback() {
        return Err(invalid(
            "containers.endpoint.listen",
            raw,
            "must be a loopback address (SDKs send a token over plain http only to loopback)",
        ));
    }
    if listen.port() == 0 || listen.port() >= 1024 {
        return Err(invalid(
            "containers.endpoint.listen",
            listen,
            "the port must be below 1024, one only root may bind: any user could listen on another first and collect the tokens SDKs send (hold it with credlock.socket)",
        ));
    }
    if taken.contains(&listen) {
        return Err(invalid(
            "containers.endpoint.listen",
            listen,
            "must differ from the other listeners",
        ));
    }
    let tokens = e
        .tokens
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ENDPOINT_TOKENS));
    if !tokens.is_absolute() {
        return Err(invalid(
            "containers.endpoint.tokens",
            tokens.display(),
            "must be an absolute path",
        ));
    }
    Ok(Some(EndpointConfig { listen, tokens }))
}

pub(super) fn validate(
    c: ContainersSection,
    taken: &[SocketAddr],
) -> Result<Option<EcsConfig>, ConfigError> {
    let Some(e) = c.ecs else { return Ok(None) };
    if e.enabled == Some(false) {
        return Ok(None);
    }
    let listen_raw = e.listen.unwrap_or_else(|| vec![DEFAULT_LISTEN.into()]);
    if listen_raw.is_empty() {
        return Err(invalid(
            "containers.ecs.listen",
            "[]",
            "at least one address is needed",
        ));
    }
    let listen = listen_raw
        .iter()
        .map(|a| parse_addr("containers.ecs.listen", a))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(a) = listen.iter().find(|a| a.port() != 0 && taken.contains(a)) {
        return Err(invalid(
            "containers.ecs.listen",
            a,
            "must differ from server.listen and server.admin_listen",
        ));
    }
    let agent_raw = e.agent.unwrap_or_else(|| DEFAULT_AGENT.into());
    let agent_url = if agent_raw.contains("://") {
        agent_raw.clone()
    } else {
        format!("http://{agent_raw}")
    };
    let agent = parse_upstream_key("containers.ecs.agent", &agent_url)?;
    let agent_timeout = millis(
        "containers.ecs.agent_timeout_ms",
        e.agent_timeout_ms.unwrap_or(2000),
        50..=30_000,
    )?;
    let assume_rate = e.assume_rate.unwrap_or(5.0);
    if !(0.1..=100.0).contains(&assume_rate) {
        return Err(invalid(
            "containers.ecs.assume_rate",
            assume_rate,
            "must be between 0.1 and 100 AssumeRole calls per second (STS's account quota is shared by the fleet)",
        ));
    }
    let max_tasks = e.max_tasks.unwrap_or(256);
    if !(1..=65_536).contains(&max_tasks) {
        return Err(invalid(
            "containers.ecs.max_tasks",
            max_tasks,
            "must be between 1 and 65536",
        ));
    }
    Ok(Some(EcsConfig {
        listen,
        agent,
        agent_timeout,
        assume_rate,
        max_tasks,
    }))
}
