//! Configuration: a TOML file plus command-line flags, validated into [`Config`] before any
//! socket is bound. Every rejection names the key, the value and why (`ConfigError`), and
//! `main` exits with [`EXIT_CONFIG`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// `EX_CONFIG` from sysexits.h: the configuration is invalid.
pub const EXIT_CONFIG: i32 = 78;
pub const DEFAULT_CONFIG_PATH: &str = "/etc/credlock/credlock.toml";
pub const DEFAULT_TEMPLATE_PATH: &str = "/usr/share/credlock/policy-templates/session-policy.json";

/// A rejected setting: `key=value is not valid: why`.
#[derive(Debug, thiserror::Error)]
#[error("{key}={value:?} is not valid: {why}")]
pub struct ConfigError {
    pub key: String,
    pub value: String,
    pub why: String,
}

fn invalid(key: &str, value: impl std::fmt::Display, why: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        value: value.to_string(),
        why: why.into(),
    }
}

/// The validated configuration every component is built from.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub admin_listen: SocketAddr,
    pub upstream: Upstream,
    pub upstream_timeout: Duration,
    pub max_connections: usize,
    pub drain_timeout: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    pub lock: LockConfig,
    pub discovery: DiscoveryConfig,
    pub policy_template: Option<PathBuf>,
    /// Where the firewall units report whether the rules are in place.
    pub firewall_state_file: PathBuf,
    /// Whether readiness needs the firewall enforced; `None`: auto (see
    /// [`crate::firewall::FirewallWatch::new`]).
    pub firewall_required: Option<bool>,
    /// The per-process access policy (`[[access.rule]]`), validated; empty: no policy.
    pub access: crate::access::AccessConfig,
    /// `[containers.ecs]`: locked ECS task credentials; `None`: off.
    pub ecs: Option<AgentConfig>,
    /// `[containers.pod_identity]`: locked EKS Pod Identity credentials; `None`: off.
    pub pod_identity: Option<AgentConfig>,
    /// `[containers.endpoint]`: the locked set for token holders on loopback; `None`: off.
    pub endpoint: Option<EndpointConfig>,
}

#[path = "config_containers.rs"]
mod containers;
pub use containers::{AgentConfig, AgentKind, DEFAULT_ENDPOINT_TOKENS, EndpointConfig};
#[path = "config_discovery.rs"]
mod discovery_section;
pub use discovery_section::{DiscoveryConfig, Ec2Scope, S3Config, StaticEnvironment};
use discovery_section::{DiscoverySection, validate_discovery};

pub use crate::upstream::Upstream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Clone)]
pub struct LockConfig {
    pub role_arn: Option<String>,
    pub session_duration: Duration,
    /// Mark sessions with SourceIdentity `credlock-<instance id>` (default on; see
    /// `refresh::source_identity`).
    pub source_identity: bool,
    pub session_tags: BTreeMap<String, String>,
    /// Never serve a locked set with less than this left; fail closed instead.
    pub serve_margin: Duration,
    /// A re-lock for an environment that only gained entries is spread uniformly over this
    /// window (the set being served still works everywhere it did); one that lost entries
    /// re-locks at once. See `refresh.rs`, "Fleet budget".
    pub relock_spread: Duration,
    /// An STS endpoint URL (e.g. an interface VPC endpoint); `None`: the SDK's regional one,
    /// or `AWS_ENDPOINT_URL_STS`.
    pub sts_endpoint: Option<String>,
}

// ---- the file format ------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    server: ServerSection,
    log: LogSection,
    lock: LockSection,
    discovery: DiscoverySection,
    policy: PolicySection,
    firewall: FirewallSection,
    access: crate::access::AccessConfig,
    containers: containers::ContainersSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FirewallSection {
    state_file: Option<PathBuf>,
    required: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ServerSection {
    listen: Option<Vec<String>>,
    admin_listen: Option<String>,
    upstream: Option<String>,
    upstream_timeout_ms: Option<u64>,
    max_connections: Option<usize>,
    drain_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LogSection {
    format: Option<String>,
    level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LockSection {
    role_arn: Option<String>,
    session_duration_seconds: Option<u64>,
    source_identity: Option<bool>,
    session_tags: BTreeMap<String, String>,
    serve_margin_seconds: Option<u64>,
    relock_spread_seconds: Option<u64>,
    sts_endpoint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PolicySection {
    template: Option<PathBuf>,
}

/// Flags that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Vec<String>,
    pub admin_listen: Option<String>,
    pub upstream: Option<String>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
}

/// Reads `path` (or the default path when it exists), applies `overrides`, validates.
pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
    let file = match path {
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
    };
    let text = match &file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| invalid("--config", p.display(), format!("cannot read: {e}")))?,
        None => String::new(),
    };
    from_toml(&text, overrides)
}

/// Parses and validates TOML text with flag overrides.
pub fn from_toml(text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| {
        let span = e.span().and_then(|s| text.get(s)).unwrap_or("").to_string();
        invalid("config file", span, e.message().to_string())
    })?;
    validate(file, overrides)
}

fn validate(file: FileConfig, ov: &Overrides) -> Result<Config, ConfigError> {
    let listen_raw = if ov.listen.is_empty() {
        file.server
            .listen
            .unwrap_or_else(|| vec!["127.0.0.1:8169".into(), "[::1]:8169".into()])
    } else {
        ov.listen.clone()
    };
    if listen_raw.is_empty() {
        return Err(invalid(
            "server.listen",
            "[]",
            "at least one address is needed",
        ));
    }
    let listen = listen_raw
        .iter()
        .map(|a| parse_addr("server.listen", a))
        .collect::<Result<Vec<_>, _>>()?;

    let admin_raw = ov
        .admin_listen
        .clone()
        .or(file.server.admin_listen)
        .unwrap_or_else(|| "127.0.0.1:9169".into());
    let admin_listen = parse_addr("server.admin_listen", &admin_raw)?;
    if !admin_listen.ip().is_loopback() {
        return Err(invalid(
            "server.admin_listen",
            admin_raw,
            "the admin listener must be on a loopback address",
        ));
    }
    if admin_listen.port() != 0 && listen.contains(&admin_listen) {
        return Err(invalid(
            "server.admin_listen",
            admin_raw,
            "must differ from every server.listen address",
        ));
    }

    let upstream_raw = ov
        .upstream
        .clone()
        .or(file.server.upstream)
        .unwrap_or_else(|| "http://169.254.169.254".into());
    let upstream = parse_upstream(&upstream_raw)?;

    let upstream_timeout = millis(
        "server.upstream_timeout_ms",
        file.server.upstream_timeout_ms.unwrap_or(1000),
        50..=30_000,
    )?;
    let drain_timeout = millis(
        "server.drain_timeout_ms",
        file.server.drain_timeout_ms.unwrap_or(5000),
        0..=60_000,
    )?;
    // Each open connection costs about 22 KiB (hyper's 8 KiB read and write buffers, its task);
    // 512 keeps a flood that holds every slot near 11 MiB, far below the unit's MemoryMax=64M,
    // and a new client takes the slot of the one idle longest when all are held.
    let max_connections = file.server.max_connections.unwrap_or(512);
    if !(1..=65_536).contains(&max_connections) {
        return Err(invalid(
            "server.max_connections",
            max_connections,
            "must be between 1 and 65536",
        ));
    }

    let format_raw = ov
        .log_format
        .clone()
        .or(file.log.format)
        .unwrap_or_else(|| "plain".into());
    let log_format = match format_raw.as_str() {
        "plain" => LogFormat::Plain,
        "json" => LogFormat::Json,
        _ => {
            return Err(invalid(
                "log.format",
                format_raw,
                "must be \"plain\" or \"json\"",
            ));
        }
    };
    let log_level = ov
        .log_level
        .clone()
        .or(file.log.level)
        .unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        return Err(invalid(
            "log.level",
            log_level,
            "must be a level (error, warn, info, debug, trace) or a tracing filter",
        ));
    }

    let mut containers = file.containers;
    let taken = [listen.as_slice(), &[admin_listen]].concat();
    let endpoint = containers::validate_endpoint(&mut containers, &taken)?;
    let (ecs, pod_identity) = containers::validate(containers, &taken)?;
    if let Some(e) = &endpoint
        && ecs
            .iter()
            .chain(&pod_identity)
            .any(|a| a.listen.contains(&e.listen))
    {
        return Err(invalid(
            "containers.endpoint.listen",
            e.listen,
            "must differ from containers.ecs.listen and containers.pod_identity.listen",
        ));
    }
    Ok(Config {
        listen,
        admin_listen,
        upstream,
        upstream_timeout,
        max_connections,
        drain_timeout,
        log_format,
        log_level,
        lock: validate_lock(file.lock)?,
        discovery: validate_discovery(file.discovery)?,
        policy_template: file.policy.template,
        firewall_state_file: file
            .firewall
            .state_file
            .unwrap_or_else(|| PathBuf::from(crate::firewall::DEFAULT_STATE_FILE)),
        firewall_required: file.firewall.required,
        access: validate_access(file.access)?,
        ecs,
        pod_identity,
        endpoint,
    })
}

/// The rules' shape (names, globs, prefixes, ARNs) is checked here, with names resolved as at
/// run time: a user or group that does not exist yet is not an error here (see
/// [`check_access_names`]).
fn validate_access(
    access: crate::access::AccessConfig,
) -> Result<crate::access::AccessConfig, ConfigError> {
    crate::access::Policy::compile(&access, &crate::peer::SystemDirectory, false)
        .map_err(access_error)?;
    Ok(access)
}

/// `check-config`: every user and group name in the rules must resolve now.
pub fn check_access_names(access: &crate::access::AccessConfig) -> Result<(), ConfigError> {
    crate::access::Policy::compile(access, &crate::peer::SystemDirectory, true)
        .map(|_| ())
        .map_err(access_error)
}

fn access_error(e: crate::access::AccessError) -> ConfigError {
    match e {
        crate::access::AccessError::Invalid { key, value, why } => ConfigError { key, value, why },
    }
}

fn validate_lock(lock: LockSection) -> Result<LockConfig, ConfigError> {
    if let Some(arn) = &lock.role_arn
        && crate::identity::RoleArn::parse(arn).is_none()
    {
        return Err(invalid(
            "lock.role_arn",
            arn,
            "must look like arn:<partition>:iam::<12-digit account>:role/[path/]name",
        ));
    }
    let duration = lock.session_duration_seconds.unwrap_or(3600);
    if !(900..=3600).contains(&duration) {
        return Err(invalid(
            "lock.session_duration_seconds",
            duration,
            "must be between 900 and 3600 (AssumeRole from instance credentials is role chaining, capped at one hour)",
        ));
    }
    let margin = lock.serve_margin_seconds.unwrap_or(300);
    if margin >= duration / 2 {
        return Err(invalid(
            "lock.serve_margin_seconds",
            margin,
            format!(
                "must be less than half the session duration ({} s)",
                duration / 2
            ),
        ));
    }
    if lock.session_tags.len() > 50 {
        return Err(invalid(
            "lock.session_tags",
            lock.session_tags.len(),
            "STS accepts at most 50 session tags",
        ));
    }
    for (k, v) in &lock.session_tags {
        let ok = |s: &str, max: usize| {
            s.chars().count() <= max
                && s.chars()
                    .all(|c| c.is_alphanumeric() || c.is_whitespace() || "_.:/=+-@".contains(c))
        };
        if k.is_empty() || !ok(k, 128) || k.to_ascii_lowercase().starts_with("aws:") {
            return Err(invalid(
                "lock.session_tags",
                k,
                "a tag key is 1-128 letters, digits, spaces or _.:/=+-@ and may not start with aws:",
            ));
        }
        // AWS's data-perimeter governance policies reserve the `dp:` tag prefix for their own
        // exception tags ("Establishing a data perimeter on AWS", data-perimeter-policy-examples):
        // a credlock tag there could exempt its sessions from an organisation's perimeter.
        if k.to_ascii_lowercase().starts_with("dp:") {
            return Err(invalid(
                "lock.session_tags",
                k,
                "the dp: prefix is reserved by AWS's data-perimeter policies (their exception tags); choose another key",
            ));
        }
        if !ok(v, 256) {
            return Err(invalid(
                &format!("lock.session_tags.{k}"),
                v,
                "a tag value is 0-256 letters, digits, spaces or _.:/=+-@",
            ));
        }
    }
    if let Some(url) = &lock.sts_endpoint {
        check_url("lock.sts_endpoint", url)?;
    }
    let spread = lock.relock_spread_seconds.unwrap_or(300);
    if spread > 3600 {
        return Err(invalid(
            "lock.relock_spread_seconds",
            spread,
            "must be between 0 and 3600",
        ));
    }
    Ok(LockConfig {
        relock_spread: Duration::from_secs(spread),
        sts_endpoint: lock.sts_endpoint,
        role_arn: lock.role_arn,
        session_duration: Duration::from_secs(duration),
        source_identity: lock.source_identity.unwrap_or(true),
        session_tags: lock.session_tags,
        serve_margin: Duration::from_secs(margin),
    })
}

/// `vpc-` / `vpce-` followed by 8 or 17 lowercase hex digits.
pub fn is_aws_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|hex| {
        matches!(hex.len(), 8 | 17)
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn check_url(key: &str, url: &str) -> Result<(), ConfigError> {
    match url.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("https" | "http")) && u.authority().is_some() => {
            Ok(())
        }
        _ => Err(invalid(key, url, "must be an http(s):// URL")),
    }
}

fn parse_addr(key: &str, raw: &str) -> Result<SocketAddr, ConfigError> {
    raw.parse()
        .map_err(|_| invalid(key, raw, "must be IP:PORT (IPv6 as [ADDR]:PORT)"))
}

fn parse_upstream(raw: &str) -> Result<Upstream, ConfigError> {
    parse_upstream_key("server.upstream", raw)
}

/// A plain-HTTP peer credlock forwards to (IMDS, the ECS agent): `http://HOST[:PORT]`.
fn parse_upstream_key(key: &str, raw: &str) -> Result<Upstream, ConfigError> {
    let uri: http::Uri = raw.parse().map_err(|_| invalid(key, raw, "not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(invalid(
            key,
            raw,
            "must be an http:// URL (the peer speaks plain HTTP)",
        ));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid(key, raw, "must not have a path or query"));
    }
    let Some(authority) = uri.authority().cloned() else {
        return Err(invalid(key, raw, "has no host"));
    };
    Ok(Upstream { authority })
}

fn millis(
    key: &str,
    v: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Duration, ConfigError> {
    if range.contains(&v) {
        Ok(Duration::from_millis(v))
    } else {
        Err(invalid(
            key,
            v,
            format!("must be between {} and {}", range.start(), range.end()),
        ))
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
