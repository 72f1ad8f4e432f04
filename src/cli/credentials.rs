//! `credlock credentials`: print a locked set once and exit, for what the proxy does not reach
//! (an SDK's `credential_process`, a CI runner, an on-premises host, a script).
//!
//! Where the set comes from:
//! - **A credlock running here** (its admin listener answers `/status`): the instance's
//!   credentials are locked already, and the lock itself denies assuming the role again with
//!   them, so the set is read from credlock's own IMDS listener (locked), never assumed again.
//!   Asking for another role there fails with a message that says why.
//! - **Otherwise**: the SDK's default chain gives the source credentials (environment, profile,
//!   container, IMDS) and the Region; the role is `--role-arn`, or the caller's own role from
//!   `sts:GetCallerIdentity` (an assumed-role session; a path is not visible there, so a role
//!   with a path needs `--role-arn`). The environment comes from the configured discovery
//!   sources, run once as `credlock run` runs them (on a host without IMDS the `imds`, `ec2`
//!   and `boot_provider` sources fail and the others count: `echo`, `static`, `s3`). Then
//!   `sts:AssumeRole` with the session policy, as the daemon does.
//!
//! A `credential_process` runs once per SDK client or CLI call, so an unexpired set is reused
//! from a cache: one 0600 file per role and environment in `$XDG_RUNTIME_DIR/credlock/`, or,
//! without a runtime directory (services, cron), in `/tmp/credlock-<uid>/`, a 0700 directory
//! that must belong to the user (one that does not, or is a symlink, is refused: another user
//! could have planted it). A cached set is used only with more than `lock.serve_margin_seconds`
//! left. `--no-cache` turns it off.
//!
//! Output formats: `credential-process` (the JSON the SDKs' `credential_process` reads:
//! `Version` 1, `AccessKeyId`, `SecretAccessKey`, `SessionToken`, `Expiration` in RFC 3339;
//! "Sourcing credentials with an external process", AWS SDKs and Tools Reference Guide),
//! `env` (shell `export` lines) and `json`. Errors are one line on stderr and a non-zero exit,
//! as an SDK expects of a credential process. No raw credential is ever printed.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::app;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::credentials::imds_timestamp;
use crate::discovery;
use crate::environment::Environment;
use crate::identity::{InstanceIdentity, RoleArn};
use crate::imds::Imds;
use crate::policy;
use crate::sts::{AssumeRequest, AwsIssuer, Issuer, StsErrorCode};
use crate::upstream::{Upstream, UpstreamClient};

/// How the set is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    CredentialProcess,
    Env,
    Json,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub format: Format,
    pub role_arn: Option<String>,
    pub no_cache: bool,
    /// The cache directory (default: see the module doc).
    pub cache_dir: Option<PathBuf>,
}

/// A locked set as it is printed and cached. `Debug` shows no secret.
#[derive(Clone, Serialize, Deserialize)]
pub struct Set {
    #[serde(rename = "AccessKeyId")]
    pub access_key_id: String,
    #[serde(rename = "SecretAccessKey")]
    pub secret_access_key: String,
    #[serde(rename = "SessionToken")]
    pub session_token: String,
    #[serde(rename = "Expiration")]
    pub expiration: String,
    #[serde(rename = "RoleArn")]
    pub role_arn: String,
    /// Where it came from: `credlock` (the running daemon's), `sts` (assumed now), `cache`.
    #[serde(rename = "Source", default)]
    pub source: String,
}

impl std::fmt::Debug for Set {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Set")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .field("role_arn", &self.role_arn)
            .finish_non_exhaustive()
    }
}

/// Prints the set in `format`.
pub fn render(set: &Set, format: Format) -> String {
    match format {
        Format::CredentialProcess => serde_json::json!({
            "Version": 1,
            "AccessKeyId": set.access_key_id,
            "SecretAccessKey": set.secret_access_key,
            "SessionToken": set.session_token,
            "Expiration": set.expiration,
        })
        .to_string(),
        Format::Json => serde_json::to_string_pretty(set).unwrap_or_default(),
        Format::Env => format!(
            "export AWS_ACCESS_KEY_ID={}\nexport AWS_SECRET_ACCESS_KEY={}\nexport AWS_SESSION_TOKEN={}\nexport AWS_CREDENTIAL_EXPIRATION={}",
            shell_quote(&set.access_key_id),
            shell_quote(&set.secret_access_key),
            shell_quote(&set.session_token),
            shell_quote(&set.expiration)
        ),
    }
}

/// Single-quoted for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The whole command. `Err`: one line naming the cause.
pub async fn run(config: &Config, options: &Options) -> Result<String, String> {
    if let Some(ancestor) = nested_in_itself() {
        return Err(format!(
            "credlock credentials is running inside itself (process {ancestor}): the default chain's profile runs credlock credentials as its credential_process; give it a source profile (AWS_PROFILE=...) in the credential_process command"
        ));
    }
    let wanted = match &options.role_arn {
        Some(text) => Some(
            RoleArn::parse(text)
                .ok_or_else(|| format!("--role-arn {text:?} is not an IAM role ARN"))?,
        ),
        None => None,
    };
    if let Some(set) = from_running_credlock(config, wanted.as_ref()).await? {
        return Ok(render(&set, options.format));
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let Some(region) = sdk.region().map(|r| r.to_string()) else {
        return Err("no AWS Region: set AWS_REGION (or a profile's region)".into());
    };
    let Some(provider) = sdk.credentials_provider() else {
        return Err("the SDK's default chain has no credentials provider".into());
    };
    let issuer =
        AwsIssuer::from_sdk_config(&sdk, config.lock.sts_endpoint.as_deref(), clock.clone());
    let role = match wanted {
        Some(role) => role,
        None => {
            let arn = issuer.caller_arn().await.map_err(|e| {
                format!("sts:GetCallerIdentity with the default chain's credentials: {e}")
            })?;
            role_of_session(&arn).ok_or_else(|| {
                format!(
                    "the default chain's credentials are {arn}, not a role session: pass --role-arn"
                )
            })?
        }
    };
    let host = host_id();
    let environment = discover(config, &region, &role, &host, provider, &[]).await?;
    let template = app::load_template(config).map_err(|e| e.to_string())?;
    let policy = policy::render(&template, &environment, &role).map_err(|e| e.to_string())?;

    let cache = if options.no_cache {
        None
    } else {
        Some(cache_file(
            options.cache_dir.as_deref(),
            &role,
            &format!("{}\n{:?}", policy.text, config.lock.session_tags),
            config.lock.session_duration,
        )?)
    };
    let now = clock.now();
    if let Some(path) = &cache
        && let Some(mut set) = read_cache(path, now, config.lock.serve_margin)
    {
        set.source = "cache".into();
        return Ok(render(&set, options.format));
    }

    let request = AssumeRequest {
        role_arn: role.to_string(),
        session_name: session_name(&host),
        policy: policy.text,
        duration: config.lock.session_duration,
        source_identity: config
            .lock
            .source_identity
            .then(|| crate::refresh::source_identity(&host)),
        tags: config.lock.session_tags.clone().into_iter().collect(),
    };
    let mut result = issuer.assume(&request).await;
    if let Err(e) = &result
        && e.code == StsErrorCode::AccessDenied
        && request.source_identity.is_some()
    {
        let plain = AssumeRequest {
            source_identity: None,
            ..request.clone()
        };
        result = issuer.assume(&plain).await;
    }
    let issued = result.map_err(|e| {
        let hint = if e.code == StsErrorCode::AccessDenied {
            " (the role must trust the caller; and credentials locked by credlock may not assume their own role again: use them as they are)"
        } else {
            ""
        };
        format!("sts:AssumeRole on {role}: {e}{hint}")
    })?;
    let c = issued.credentials;
    let set = Set {
        access_key_id: c.access_key_id.clone(),
        secret_access_key: c.secret_access_key().expose().to_string(),
        session_token: c.token().expose().to_string(),
        expiration: imds_timestamp(c.expiration),
        role_arn: role.to_string(),
        source: "sts".into(),
    };
    if let Some(path) = &cache
        && let Err(e) = write_cache(path, &set)
    {
        // The set is good; only reuse is lost.
        eprintln!(
            "credlock: warning: cannot write the cache {}: {e}",
            path.display()
        );
    }
    Ok(render(&set, options.format))
}

/// The set of a credlock running here, read through its own IMDS listener (locked already).
/// `Ok(None)`: none answers.
async fn from_running_credlock(
    config: &Config,
    wanted: Option<&RoleArn>,
) -> Result<Option<Set>, String> {
    #[derive(Deserialize)]
    struct Status {
        ready: bool,
        lock: Lock,
    }
    #[derive(Deserialize)]
    struct Lock {
        role_arn: Option<String>,
    }
    // Only a listener root or the credlock user holds counts: any local user could bind a
    // free port and answer with credentials of its own choosing (credential injection).
    // Under systemd the sockets are credlock.socket's, made by PID 1 as root.
    let listener = config
        .listen
        .first()
        .ok_or("no server.listen address to read the set from")?;
    let trusted = |addr: std::net::SocketAddr| {
        let owner = listener_uid(addr);
        owner.is_some_and(|uid| uid == 0 || Some(uid) == credlock_uid())
    };
    if listener_uid(config.admin_listen).is_none() {
        return Ok(None);
    }
    if listener_uid(*listener).is_none() {
        return Err(format!(
            "credlock's admin listener {} answers, but nothing listens on {listener} (server.listen) to read its locked set from",
            config.admin_listen
        ));
    }
    let untrusted: Vec<String> = [config.admin_listen, *listener]
        .into_iter()
        .filter(|a| !trusted(*a))
        .map(|a| a.to_string())
        .collect();
    if !untrusted.is_empty() {
        return Err(format!(
            "a process that is neither root nor the credlock user listens on {}, credlock's address: not asking it for credentials",
            untrusted.join(" and ")
        ));
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("http://{}/status", config.admin_listen);
    let Ok(response) = http.get(&url).send().await else {
        return Ok(None);
    };
    let status: Status = response
        .json()
        .await
        .map_err(|e| format!("{url} answered, but not with credlock's status: {e}"))?;
    let Some(locked) = status.lock.role_arn.filter(|_| status.ready) else {
        return Err(format!(
            "credlock runs here ({url}) but holds no locked set yet: try again once it is ready (/readyz)"
        ));
    };
    if let Some(wanted) = wanted
        && RoleArn::parse(&locked)
            .is_none_or(|l| l.name != wanted.name || l.account != wanted.account)
    {
        return Err(format!(
            "credlock runs here and locks {locked}: this host's credentials are locked already and the lock denies assuming {wanted} with them; ask for {locked}, or run where credlock does not"
        ));
    }
    let upstream = Upstream {
        authority: listener
            .to_string()
            .parse()
            .map_err(|_| format!("cannot address {listener}"))?,
    };
    let imds = Imds::new(UpstreamClient::new(&upstream, Duration::from_secs(2)));
    let name = imds
        .role_name()
        .await
        .map_err(|e| format!("reading the locked set from credlock on {listener}: {e}"))?;
    let set = imds
        .source_credentials(&name)
        .await
        .map_err(|e| format!("reading the locked set from credlock on {listener}: {e}"))?;
    Ok(Some(Set {
        access_key_id: set.access_key_id,
        secret_access_key: set.secret_access_key.expose().to_string(),
        session_token: set.token.expose().to_string(),
        expiration: imds_timestamp(set.expiration),
        role_arn: locked,
        source: "credlock".into(),
    }))
}

/// The pid of an ancestor that is `credlock credentials` too (a profile whose
/// `credential_process` runs credlock, resolved by credlock's own default chain: it would
/// recurse without end).
fn nested_in_itself() -> Option<u32> {
    let mut pid = std::process::id();
    for _ in 0..16 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The parent pid is the second field after the parenthesised command name.
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        if ppid <= 1 {
            return None;
        }
        let cmdline = std::fs::read(format!("/proc/{ppid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.len() > 1 && args[0].ends_with(b"credlock") && args[1] == b"credentials" {
            return Some(ppid);
        }
        pid = ppid;
    }
    None
}

/// The uid of the socket listening on `addr`, from `/proc/net/tcp` or `/proc/net/tcp6`
/// (readable by every user); `None`: nothing listens there.
fn listener_uid(addr: std::net::SocketAddr) -> Option<u32> {
    let file = if addr.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let table = std::fs::read_to_string(file).ok()?;
    listening_uid(&table, addr)
}

/// [`listener_uid`] on a table's text: the `local_address` column is the address in the
/// kernel's byte order per 32-bit word, printed as hex words, then `:PORT` in hex; `st` 0A is
/// LISTEN; `uid` is the eighth column (proc_net_tcp.rst, "Linux kernel documentation").
fn listening_uid(table: &str, addr: std::net::SocketAddr) -> Option<u32> {
    let wanted = proc_address(addr);
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.len() > 7 && cols[3] == "0A" && cols[1].eq_ignore_ascii_case(&wanted))
            .then(|| cols[7].parse().ok())
            .flatten()
    })
}

fn proc_address(addr: std::net::SocketAddr) -> String {
    let words: Vec<u32> = match addr.ip() {
        std::net::IpAddr::V4(ip) => vec![u32::from_ne_bytes(ip.octets())],
        std::net::IpAddr::V6(ip) => ip
            .octets()
            .chunks(4)
            .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    let hex: String = words.iter().map(|w| format!("{w:08X}")).collect();
    format!("{hex}:{:04X}", addr.port())
}

/// The uid of the `credlock` system user, when it exists.
fn credlock_uid() -> Option<u32> {
    nix::unistd::User::from_name("credlock")
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

/// `arn:aws:sts::123456789012:assumed-role/NAME/SESSION` -> the role's ARN (without a path:
/// GetCallerIdentity does not show it).
pub fn role_of_session(arn: &str) -> Option<RoleArn> {
    let session = crate::identity::AssumedRoleArn::parse(arn)?;
    // A role name has no '/': anything else is not a role session's ARN.
    if session.role.contains('/') {
        return None;
    }
    RoleArn::parse(&format!(
        "arn:{}:iam::{}:role/{}",
        session.partition, session.account, session.role
    ))
}

/// This host, for the session name and SourceIdentity: its hostname, reduced to what STS
/// allows (`[\w+=,.@-]`), at most 40 characters.
fn host_id() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let cleaned: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(*c))
        .take(40)
        .collect();
    if cleaned.len() < 2 {
        "unknown-host".into()
    } else {
        cleaned
    }
}

fn session_name(host: &str) -> String {
    format!("credlock-cli-{host}")
}

/// The configured sources but `skip`, once, merged; the identity they see is `host`'s (this
/// host, or a Lambda function). One source failing is a warning while another finds something.
pub async fn discover(
    config: &Config,
    region: &str,
    role: &RoleArn,
    host: &str,
    provider: aws_credential_types::provider::SharedCredentialsProvider,
    skip: &[discovery::SourceKind],
) -> Result<Environment, String> {
    let identity = InstanceIdentity {
        instance_id: host.to_string(),
        region: region.to_string(),
        role: role.clone(),
        assumed_with: None,
    };
    let imds = Arc::new(Imds::new(UpstreamClient::new(
        &config.upstream,
        config.upstream_timeout,
    )));
    let mut context = discovery::context(config, imds, identity, provider).await;
    context.host = Some(host.to_string());
    let mut merged = Environment::default();
    let mut failures = Vec::new();
    for kind in discovery::enabled_sources(&config.discovery) {
        if skip.contains(&kind) {
            continue;
        }
        match discovery::run_source(kind, &context).await {
            Ok(e) => merged.merge(&e),
            Err(e) => failures.push(format!("{}: {e}", kind.label())),
        }
    }
    if merged.is_empty() {
        return Err(format!(
            "no discovery source found the environment of {host} ({}): configure discovery.static, echo, s3 or a boot provider",
            failures.join("; ")
        ));
    }
    for failure in &failures {
        tracing::warn!(source = %failure, "a discovery source failed; the others count");
    }
    Ok(merged)
}

/// The cache file for a role and what it is locked with (the session policy, which holds the
/// environment and the template, and the tags) and session length, its directory made safe.
fn cache_file(
    dir: Option<&Path>,
    role: &RoleArn,
    locked_with: &str,
    duration: Duration,
) -> Result<PathBuf, String> {
    let uid = nix::unistd::getuid().as_raw();
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(runtime) => PathBuf::from(runtime).join("credlock"),
            None => PathBuf::from(format!("/tmp/credlock-{uid}")),
        },
    };
    if std::fs::symlink_metadata(&dir).is_err() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot make the cache directory {}: {e}", dir.display()))?;
    }
    let meta = std::fs::symlink_metadata(&dir)
        .map_err(|e| format!("the cache directory {}: {e}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "the cache directory {} is not a directory of this user's with mode 0700 (another user may have made it): remove it, or pass --no-cache",
            dir.display()
        ));
    }
    let mut hash = Sha256::new();
    hash.update(role.to_string().as_bytes());
    hash.update(b"\n");
    hash.update(locked_with.as_bytes());
    hash.update(format!("\n{}", duration.as_secs()).as_bytes());
    let digest = hash.finalize();
    let name: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    Ok(dir.join(format!("credentials-{name}.json")))
}

/// A cached set with more than `margin` left, from a file of this user's that no one else can
/// read; anything else is ignored (and replaced).
fn read_cache(path: &Path, now: SystemTime, margin: Duration) -> Option<Set> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_file()
        || meta.uid() != nix::unistd::getuid().as_raw()
        || meta.permissions().mode() & 0o077 != 0
    {
        return None;
    }
    let set: Set = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let expires = humantime::parse_rfc3339(&set.expiration).ok()?;
    (expires.duration_since(now).ok()? > margin).then_some(set)
}

/// Written to a new 0600 file beside it, then renamed over it: a reader never sees half a set.
fn write_cache(path: &Path, set: &Set) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let written = file
        .write_all(&serde_json::to_vec(set).unwrap_or_default())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // the cache's tests work around the real time
#[path = "credentials_tests.rs"]
mod tests;
