//! `[containers.ecs]` and `[containers.pod_identity]`: credlock in front of the ECS agent's
//! task-credential endpoint or the EKS Pod Identity Agent (`container.rs`), and
//! `[containers.endpoint]`. Each is off unless its table is there.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Upstream, invalid, millis, parse_addr, parse_upstream_key};
pub use crate::container::AgentKind;
use crate::identity::RoleArn;

/// Where ecs-init points `169.254.170.2:80` today: the agent's credential endpoint
/// ("Amazon ECS container agent configuration", Amazon ECS Developer Guide).
pub const DEFAULT_AGENT: &str = "http://127.0.0.1:51679";
/// Where credlock listens for the traffic the firewall sends it instead.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:51680";
/// The EKS Pod Identity Agent: port 80 of 169.254.170.23 and [fd00:ec2::23] on the node's host
/// network ("EKS Pod Identity considerations", Amazon EKS User Guide). credlock asks it at the
/// IPv4 address, the Host its target-host check accepts.
pub const DEFAULT_POD_AGENT: &str = "http://169.254.170.23:80";
/// Where credlock listens for pods' traffic: the agent's own addresses (they exist on every
/// node that runs the agent, so neither a DNAT to loopback, which the kernel cannot do for IPv6,
/// nor route_localnet is needed), at a port below 1024: pods send their service-account token,
/// which EKS Auth exchanges for the role's raw credentials, so no user may listen there first.
pub const DEFAULT_POD_LISTEN: [&str; 2] = ["169.254.170.23:923", "[fd00:ec2::23]:923"];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ContainersSection {
    ecs: Option<AgentSection>,
    pod_identity: Option<AgentSection>,
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
struct AgentSection {
    enabled: Option<bool>,
    listen: Option<Vec<String>>,
    agent: Option<String>,
    agent_timeout_ms: Option<u64>,
    assume_rate: Option<f64>,
    max_tasks: Option<usize>,
    /// `[containers.pod_identity]` only: role ARNs with their paths.
    roles: Option<Vec<String>>,
}

/// The validated `[containers.ecs]` or `[containers.pod_identity]`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub kind: AgentKind,
    pub listen: Vec<SocketAddr>,
    pub agent: Upstream,
    pub agent_timeout: Duration,
    /// AssumeRole calls per second for task sets (a token bucket of twice this).
    pub assume_rate: f64,
    /// Locked task sets held at most.
    pub max_tasks: usize,
    /// Pod Identity: the roles whose path is not `/`. A pod's role is known only by name
    /// (from its session's ARN); a name listed here is assumed at this ARN, any other at
    /// `role/<name>`.
    pub roles: Vec<RoleArn>,
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

/// `[containers.ecs]` and `[containers.pod_identity]`, in that order.
pub(super) fn validate(
    c: ContainersSection,
    taken: &[SocketAddr],
) -> Result<(Option<AgentConfig>, Option<AgentConfig>), ConfigError> {
    let ecs = validate_agent(c.ecs, AgentKind::Ecs, taken)?;
    let mut taken = taken.to_vec();
    taken.extend(ecs.iter().flat_map(|e| e.listen.iter().copied()));
    let pods = validate_agent(c.pod_identity, AgentKind::PodIdentity, &taken)?;
    Ok((ecs, pods))
}

fn validate_agent(
    section: Option<AgentSection>,
    kind: AgentKind,
    taken: &[SocketAddr],
) -> Result<Option<AgentConfig>, ConfigError> {
    let Some(e) = section else { return Ok(None) };
    if e.enabled == Some(false) {
        return Ok(None);
    }
    let key = |field: &str| format!("containers.{}.{field}", kind.section());
    let listen_raw = e.listen.unwrap_or_else(|| match kind {
        AgentKind::Ecs => vec![DEFAULT_LISTEN.into()],
        AgentKind::PodIdentity => DEFAULT_POD_LISTEN.iter().map(|a| a.to_string()).collect(),
    });
    if listen_raw.is_empty() {
        return Err(invalid(
            &key("listen"),
            "[]",
            "at least one address is needed",
        ));
    }
    let listen = listen_raw
        .iter()
        .map(|a| parse_addr(&key("listen"), a))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(a) = listen.iter().find(|a| a.port() != 0 && taken.contains(a)) {
        return Err(invalid(
            &key("listen"),
            a,
            "must differ from server.listen, server.admin_listen and the other containers listeners",
        ));
    }
    if kind == AgentKind::PodIdentity
        && let Some(a) = listen.iter().find(|a| a.port() == 0 || a.port() >= 1024)
    {
        return Err(invalid(
            &key("listen"),
            a,
            "the port must be below 1024, one only root may bind: pods send their service-account token here, and EKS Auth exchanges it for raw credentials, so no user may listen first (hold it with credlock.socket)",
        ));
    }
    let roles = match (kind, e.roles) {
        (_, None) => Vec::new(),
        (AgentKind::Ecs, Some(_)) => {
            return Err(invalid(
                &key("roles"),
                "[...]",
                "only [containers.pod_identity] takes roles: ECS answers name the role",
            ));
        }
        (AgentKind::PodIdentity, Some(list)) => list
            .iter()
            .map(|r| {
                RoleArn::parse(r)
                    .ok_or_else(|| invalid(&key("roles"), r, "must be an IAM role ARN"))
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let default_agent = match kind {
        AgentKind::Ecs => DEFAULT_AGENT,
        AgentKind::PodIdentity => DEFAULT_POD_AGENT,
    };
    let agent_raw = e.agent.unwrap_or_else(|| default_agent.into());
    let agent_url = if agent_raw.contains("://") {
        agent_raw.clone()
    } else {
        format!("http://{agent_raw}")
    };
    let agent = parse_upstream_key(&key("agent"), &agent_url)?;
    let agent_timeout = millis(
        &key("agent_timeout_ms"),
        e.agent_timeout_ms.unwrap_or(2000),
        50..=30_000,
    )?;
    let assume_rate = e.assume_rate.unwrap_or(5.0);
    if !(0.1..=100.0).contains(&assume_rate) {
        return Err(invalid(
            &key("assume_rate"),
            assume_rate,
            "must be between 0.1 and 100 AssumeRole calls per second (STS's account quota is shared by the fleet)",
        ));
    }
    let max_tasks = e.max_tasks.unwrap_or(256);
    if !(1..=65_536).contains(&max_tasks) {
        return Err(invalid(
            &key("max_tasks"),
            max_tasks,
            "must be between 1 and 65536",
        ));
    }
    Ok(Some(AgentConfig {
        kind,
        listen,
        agent,
        agent_timeout,
        assume_rate,
        max_tasks,
        roles,
    }))
}
