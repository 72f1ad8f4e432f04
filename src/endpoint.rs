//! The loopback container-credentials endpoint (`[containers.endpoint]`, opt-in): the instance
//! role's locked set, the one the IMDS listener serves, for a process the firewall does not
//! redirect or a user who prefers it. An SDK is pointed at it with
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:<port>/credentials` and
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=<its token file>`; it sends the file's content as
//! the `Authorization` header and reads `AccessKeyId`, `SecretAccessKey`, `Token` and
//! `Expiration` from the JSON answer ("Container credential provider", AWS SDKs and Tools
//! Reference Guide).
//!
//! Invariants:
//! - Nothing without a trusted token: no `Authorization` is 401, an untrusted one 403, before
//!   the path or method is even looked at, and neither answer carries anything but a line of
//!   text. A token is trusted when its SHA-256 is in the digests file (`credlock
//!   endpoint-token` writes it, root only, with each token in a 0400 file of its user): credlock
//!   never holds a token itself.
//! - The digests file decides who gets credentials, so it is trusted only while no local user
//!   could have written it: a regular file with one link (no symlink), owned by root or
//!   credlock's own uid, writable by its owner only, every directory above it root's or
//!   credlock's and writable by its owner only ([`trusted_directory`]). Otherwise every token
//!   is refused (403), loudly, until it is fixed.
//! - No user can listen on the endpoint's port first and collect the tokens SDKs send: the port
//!   must be one only root may bind (below `net.ipv4.ip_unprivileged_port_start`), so it comes
//!   from credlock.socket; credlock, with no capability, cannot bind it itself, and without the
//!   socket the endpoint is off (logged), the IMDS listener unaffected.
//! - Only the locked set is ever served, and only while servable (outside the serving margin):
//!   503 without one, as on the IMDS listener.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use crate::clock::Clock;
use crate::credentials::{CredentialStore, LockedCredentials, imds_timestamp};
use crate::identity::RoleArn;
use crate::metrics::{EndpointResult, Metrics};
use crate::proxy::local_text as text;
use crate::refresh::LockStatus;

/// The one path the endpoint answers (the `FULL_URI` users are given).
pub const PATH: &str = "/credentials";
/// How often the digests file's metadata is looked at again (a change is re-read).
const RECHECK: Duration = Duration::from_secs(2);
/// The stamp of a digests file that does not exist.
const ABSENT: (u64, u64, u64, i128, u32, u32) = (0, 0, 0, 0, 0, 0);
/// A digests file larger than this is refused (a line per user is about 80 bytes).
const MAX_TOKENS_FILE: u64 = 256 * 1024;

/// The endpoint's state.
pub struct Endpoint {
    pub store: Arc<CredentialStore>,
    pub lock_status: Arc<ArcSwap<LockStatus>>,
    pub clock: Arc<dyn Clock>,
    pub serve_margin: Duration,
    pub metrics: Arc<Metrics>,
    pub tokens: Tokens,
}

/// The trusted tokens' digests, read from a file and re-read when it changes.
pub struct Tokens {
    path: PathBuf,
    /// The uid the file may belong to besides root: credlock's own.
    own_uid: u32,
    state: Mutex<TokenState>,
}

#[derive(Default)]
struct TokenState {
    checked: Option<Instant>,
    /// What the file looked like when read: (device, inode, size, mtime ns, mode, uid).
    stamp: Option<(u64, u64, u64, i128, u32, u32)>,
    /// Digest -> the label after it (the user `credlock endpoint-token` wrote it for).
    digests: HashMap<[u8; 32], String>,
    /// Why nothing is trusted now, if so.
    problem: Option<String>,
}

/// What a presented token is.
#[derive(Debug, PartialEq, Eq)]
pub enum Trust {
    /// In the digests file, with its label.
    Trusted(String),
    Untrusted,
}

impl Tokens {
    pub fn new(path: PathBuf, own_uid: u32) -> Tokens {
        Tokens {
            path,
            own_uid,
            state: Mutex::new(TokenState::default()),
        }
    }

    /// Whether `token` (the `Authorization` value's bytes) is trusted now.
    pub fn trust(&self, token: &[u8]) -> Trust {
        let digest: [u8; 32] = Sha256::digest(token).into();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.is_none_or(|at| at.elapsed() >= RECHECK) {
            self.refresh(&mut state);
        }
        match (&state.problem, state.digests.get(&digest)) {
            (None, Some(label)) => Trust::Trusted(label.clone()),
            _ => Trust::Untrusted,
        }
    }

    /// How many tokens are trusted, or why none is (for the log at start).
    pub fn summary(&self) -> Result<usize, String> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.is_none_or(|at| at.elapsed() >= RECHECK) {
            self.refresh(&mut state);
        }
        match &state.problem {
            Some(p) => Err(p.clone()),
            None => Ok(state.digests.len()),
        }
    }

    fn refresh(&self, state: &mut TokenState) {
        state.checked = Some(Instant::now());
        match self.read_if_changed(state.stamp) {
            Ok(None) => {}
            Ok(Some((stamp, digests))) => {
                if state.problem.is_some() || state.stamp != Some(stamp) {
                    tracing::info!(file = %self.path.display(), tokens = digests.len(), "endpoint tokens read");
                }
                *state = TokenState {
                    checked: state.checked,
                    stamp: Some(stamp),
                    digests,
                    problem: None,
                };
            }
            Err(problem) => {
                if state.problem.as_ref() != Some(&problem) {
                    tracing::error!(file = %self.path.display(), error = %problem, "endpoint tokens not trusted: every request is refused until this is fixed");
                }
                *state = TokenState {
                    checked: state.checked,
                    problem: Some(problem),
                    ..TokenState::default()
                };
            }
        }
    }

    /// The digests, when the file changed since `seen`; `Err` when it may not be trusted.
    #[allow(clippy::type_complexity)]
    fn read_if_changed(
        &self,
        seen: Option<(u64, u64, u64, i128, u32, u32)>,
    ) -> Result<Option<((u64, u64, u64, i128, u32, u32), HashMap<[u8; 32], String>)>, String> {
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        trusted_directory(dir, self.own_uid)?;
        // O_NOFOLLOW: a symlink is refused at open, and the checks are on what was opened
        // (O_NONBLOCK: a FIFO planted there cannot hold the open).
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&self.path);
        let mut file = match opened {
            Ok(f) => f,
            // No token issued yet: nothing is trusted, and nothing is wrong.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((seen != Some(ABSENT)).then(|| (ABSENT, HashMap::new())));
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(format!("{} is a symlink", self.path.display()));
            }
            Err(e) => return Err(format!("{}: {e}", self.path.display())),
        };
        let m = file.metadata().map_err(|e| e.to_string())?;
        if !m.file_type().is_file() {
            return Err(format!("{} is not a regular file", self.path.display()));
        }
        // A second name elsewhere would let whoever could write there change it.
        if m.nlink() != 1 {
            return Err(format!("{} has {} links", self.path.display(), m.nlink()));
        }
        self.safe(&self.path, m.uid(), m.mode())?;
        let mtime = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
        let stamp = (m.dev(), m.ino(), m.size(), mtime, m.mode(), m.uid());
        if seen == Some(stamp) {
            return Ok(None);
        }
        if m.size() > MAX_TOKENS_FILE {
            return Err(format!(
                "{} is larger than {MAX_TOKENS_FILE} bytes",
                self.path.display()
            ));
        }
        Ok(Some((stamp, parse(&read_all(&mut file)?))))
    }

    /// Owned by root or credlock, writable by the owner only.
    fn safe(&self, path: &Path, uid: u32, mode: u32) -> Result<(), String> {
        if uid != 0 && uid != self.own_uid {
            return Err(format!(
                "{} is owned by uid {uid}, not root or credlock's uid {}",
                path.display(),
                self.own_uid
            ));
        }
        if mode & 0o022 != 0 {
            return Err(format!(
                "{} is writable by group or others (mode {:o})",
                path.display(),
                mode & 0o7777
            ));
        }
        Ok(())
    }
}

/// Checks that no user but root (or `trusted_uid`) could change what `dir` names: every
/// directory on the path from `/`, as given, is owned by root or `trusted_uid` and writable by
/// its owner only, or is a root-owned sticky directory such as `/tmp` (whose entries others
/// cannot rename or remove). A symlink on the path is followed only from such a directory (so
/// no one else can change it), and its target's path must pass too. Then no one else can swap
/// a component between this check and a use of the path.
pub fn trusted_directory(dir: &Path, trusted_uid: u32) -> Result<(), String> {
    let absolute = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("the current directory: {e}"))?
            .join(dir)
    };
    let check = |path: &Path, m: &std::fs::Metadata| -> Result<(), String> {
        if !m.file_type().is_dir() {
            return Err(format!("{} is not a directory", path.display()));
        }
        let sticky_root = m.uid() == 0 && m.mode() & 0o1000 != 0;
        if m.uid() != 0 && m.uid() != trusted_uid {
            return Err(format!(
                "{} is owned by uid {}, not root{}",
                path.display(),
                m.uid(),
                if trusted_uid == 0 {
                    String::new()
                } else {
                    format!(" or uid {trusted_uid}")
                }
            ));
        }
        if m.mode() & 0o022 != 0 && !sticky_root {
            return Err(format!(
                "{} is writable by group or others (mode {:o})",
                path.display(),
                m.mode() & 0o7777
            ));
        }
        Ok(())
    };
    let lstat =
        |p: &Path| std::fs::symlink_metadata(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut at = PathBuf::from("/");
    check(&at, &lstat(&at)?)?;
    for part in absolute.components().skip(1) {
        match part {
            std::path::Component::Normal(name) => at.push(name),
            std::path::Component::ParentDir => {
                at.pop();
                continue;
            }
            _ => continue,
        }
        let m = lstat(&at)?;
        if m.file_type().is_symlink() {
            // Its directory passed: no one else can change the link. Where it leads must pass.
            let target =
                std::fs::canonicalize(&at).map_err(|e| format!("{}: {e}", at.display()))?;
            trusted_directory(&target, trusted_uid)?;
            at = target;
            continue;
        }
        check(&at, &m)?;
    }
    Ok(())
}

fn read_all(file: &mut File) -> Result<String, String> {
    let mut text = String::new();
    file.take(MAX_TOKENS_FILE)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot be read as text: {e}"))?;
    Ok(text)
}

/// `<64 hex digits of SHA-256> <label>` per line; `#` comments and blank lines skipped. A
/// malformed line is skipped with a warning (it trusts nothing); the others stand.
pub fn parse(text: &str) -> HashMap<[u8; 32], String> {
    let mut digests = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (hex, label) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        match decode_digest(hex) {
            Some(d) => {
                digests.insert(d, label.trim().to_string());
            }
            None => tracing::warn!(
                line = n + 1,
                "endpoint tokens: not a SHA-256 digest; line skipped"
            ),
        }
    }
    digests
}

fn decode_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Lowercase hex of SHA-256 (the digests file's form).
pub fn digest_hex(token: &[u8]) -> String {
    Sha256::digest(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Handles one request on the endpoint; never fails.
pub async fn handle(endpoint: Arc<Endpoint>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (result, response) = answer(&endpoint, req.method(), req.uri().path(), req.headers());
    endpoint
        .metrics
        .endpoint_requests
        .with_label_values(&[result.label()])
        .inc();
    response
}

/// The decision, apart from the connection: `(metric result, response)`.
pub fn answer(
    endpoint: &Endpoint,
    method: &Method,
    path: &str,
    headers: &http::HeaderMap,
) -> (EndpointResult, Response<Full<Bytes>>) {
    let head = method == Method::HEAD;
    let mut given = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(token), None) = (given.next(), given.next()) else {
        let status = if headers.contains_key(header::AUTHORIZATION) {
            (EndpointResult::Forbidden, StatusCode::FORBIDDEN)
        } else {
            (EndpointResult::Unauthorized, StatusCode::UNAUTHORIZED)
        };
        return (
            status.0,
            text(
                status.1,
                "credlock: an Authorization token is required\n",
                head,
            ),
        );
    };
    let Trust::Trusted(label) = endpoint.tokens.trust(token.as_bytes()) else {
        tracing::debug!("endpoint: a token that is not trusted");
        return (
            EndpointResult::Forbidden,
            text(
                StatusCode::FORBIDDEN,
                "credlock: the token is not trusted\n",
                head,
            ),
        );
    };
    if method != Method::GET && !head {
        return (
            EndpointResult::Refused,
            text(StatusCode::METHOD_NOT_ALLOWED, "credlock: GET only\n", head),
        );
    }
    if path != PATH {
        return (
            EndpointResult::Refused,
            text(StatusCode::NOT_FOUND, "credlock: not found\n", head),
        );
    }
    let now = endpoint.clock.now();
    let Some(set) = endpoint.store.servable(now, endpoint.serve_margin) else {
        return (
            EndpointResult::Unavailable,
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "credlock: no locked credentials yet\n",
                head,
            ),
        );
    };
    let role = endpoint.lock_status.load().role_arn.clone();
    tracing::debug!(user = %label, "endpoint: locked set served");
    (EndpointResult::Served, document(&set, role.as_ref(), head))
}

/// A locked set in the container credential provider's format (`AccessKeyId`,
/// `SecretAccessKey`, `Token`, `Expiration`, and `RoleArn` when known; "Container credential
/// provider", AWS SDKs and Tools Reference Guide), never cached by a client in between: the
/// endpoint's answer, and the Lambda extension's.
pub fn document(
    set: &LockedCredentials,
    role: Option<&RoleArn>,
    head: bool,
) -> Response<Full<Bytes>> {
    let mut body = serde_json::json!({
        "AccessKeyId": set.access_key_id,
        "SecretAccessKey": set.secret_access_key().expose(),
        "Token": set.token().expose(),
        "Expiration": imds_timestamp(set.expiration),
    });
    if let Some(role) = role {
        body["RoleArn"] = serde_json::Value::String(role.to_string());
    }
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let length = bytes.len();
    let mut response = Response::new(Full::new(if head {
        Bytes::new()
    } else {
        Bytes::from(bytes)
    }));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The first port an unprivileged process may bind (`net.ipv4.ip_unprivileged_port_start`,
/// 1024 unless lowered); the endpoint's port must be below it.
pub fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(1024)
}

#[cfg(test)]
#[path = "endpoint_tests.rs"]
mod tests;
