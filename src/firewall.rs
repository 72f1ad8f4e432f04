//! Whether the firewall that forces every process through credlock is in place.
//!
//! Reading the ruleset needs `CAP_NET_ADMIN`, which credlock never holds. The firewall's own
//! units (`credlock-firewall apply`, and its periodic check, which also re-applies removed
//! rules) run as root and write what they found to a small state file; credlock reads that
//! file, shows it in `/status` and `/metrics`, and counts a missing, partial or stale firewall
//! as not ready. The file's format, `key=value` lines:
//!
//! ```text
//! checked=1764600000        # unix seconds of the check that wrote it
//! backend=nft               # nft | iptables | none
//! ipv4=strict               # strict | boot | missing | partial
//! ipv6=off                  # strict | boot | missing | partial | off
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// The firewall's periodic check writes at least this often; an older file means the check
/// itself stopped, and nothing is known.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// Where the firewall units write their state (a root-owned directory on /run).
pub const DEFAULT_STATE_FILE: &str = "/run/credlock-firewall/state";

/// One address family's rules, as the last check found them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FamilyState {
    /// Every uid but credlock's service is redirected, root included.
    Strict,
    /// The boot-mode rules: root still reaches IMDS directly until credlock is ready.
    Boot,
    /// No rules for this family.
    Missing,
    /// Some of the rules, not all.
    Partial,
    /// Deliberately not loaded (IPv6 off or absent from the kernel).
    Off,
    /// No state file, a stale one, or one that cannot be read.
    Unknown,
}

impl FamilyState {
    pub const ALL: [FamilyState; 6] = [
        Self::Strict,
        Self::Boot,
        Self::Missing,
        Self::Partial,
        Self::Off,
        Self::Unknown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Boot => "boot",
            Self::Missing => "missing",
            Self::Partial => "partial",
            Self::Off => "off",
            Self::Unknown => "unknown",
        }
    }

    /// Whether every process of this family is forced through credlock (boot mode counts: only
    /// root is exempt, and only until credlock is ready).
    pub fn enforced(self) -> bool {
        matches!(self, Self::Strict | Self::Boot | Self::Off)
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.label() == s && *f != Self::Unknown)
    }
}

/// The firewall's state as credlock sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FirewallState {
    pub backend: String,
    pub ipv4: FamilyState,
    pub ipv6: FamilyState,
    /// Seconds since the check that wrote the file.
    pub checked_seconds_ago: Option<u64>,
    /// Why the state is unknown, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl FirewallState {
    pub fn unknown(problem: impl Into<String>) -> Self {
        FirewallState {
            backend: "unknown".into(),
            ipv4: FamilyState::Unknown,
            ipv6: FamilyState::Unknown,
            checked_seconds_ago: None,
            problem: Some(problem.into()),
        }
    }

    pub fn enforced(&self) -> bool {
        self.ipv4.enforced() && self.ipv6.enforced()
    }

    pub fn families(&self) -> [(&'static str, FamilyState); 2] {
        [("ipv4", self.ipv4), ("ipv6", self.ipv6)]
    }
}

/// Parses the state file's text as read at `now`. Unknown keys are ignored (a newer firewall
/// script may add some); a missing or invalid required key, or a stale check, gives
/// [`FamilyState::Unknown`] for both families.
pub fn parse(text: &str, now: SystemTime) -> FirewallState {
    let mut checked = None;
    let (mut backend, mut ipv4, mut ipv6) = (None, None, None);
    for line in text.lines().map(str::trim) {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "checked" => checked = value.parse::<u64>().ok(),
            "backend" => backend = Some(value.to_string()),
            "ipv4" => ipv4 = FamilyState::parse(value),
            "ipv6" => ipv6 = FamilyState::parse(value),
            _ => {}
        }
    }
    let (Some(checked), Some(backend), Some(ipv4), Some(ipv6)) = (checked, backend, ipv4, ipv6)
    else {
        return FirewallState::unknown(
            "the firewall state file lacks a valid checked, backend, ipv4 or ipv6 line",
        );
    };
    if ipv4 == FamilyState::Off {
        return FirewallState::unknown(
            "the firewall state file says ipv4=off, which is never valid",
        );
    }
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(checked);
    let age = now.duration_since(at).unwrap_or(Duration::ZERO);
    if age > STALE_AFTER {
        let mut state = FirewallState::unknown(format!(
            "the firewall's last check was {}s ago: its periodic check is not running",
            age.as_secs()
        ));
        state.backend = backend;
        state.checked_seconds_ago = Some(age.as_secs());
        return state;
    }
    FirewallState {
        backend: backend
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(16)
            .collect(),
        ipv4,
        ipv6,
        checked_seconds_ago: Some(age.as_secs()),
        problem: None,
    }
}

/// Where credlock learns the firewall's state, and whether readiness depends on it.
#[derive(Debug, Clone)]
pub struct FirewallWatch {
    pub state_file: PathBuf,
    /// A firewall that is not enforced (or unknown) makes credlock not ready.
    pub required: bool,
}

impl FirewallWatch {
    /// `required: None` is "auto": required when the state file's directory exists, that is
    /// when credlock-firewall has run on this boot (on an instance it always has; `credlock
    /// run` for a demo or a test has none).
    pub fn new(state_file: PathBuf, required: Option<bool>) -> Self {
        let required = required.unwrap_or_else(|| {
            state_file
                .parent()
                .is_some_and(|dir| dir.as_os_str().is_empty() || dir.is_dir())
        });
        FirewallWatch {
            state_file,
            required,
        }
    }

    pub fn read(&self, now: SystemTime) -> FirewallState {
        read(&self.state_file, now)
    }
}

/// Reads and parses the state file (at most 4 KiB of it).
pub fn read(path: &Path, now: SystemTime) -> FirewallState {
    use std::io::Read as _;
    let mut text = String::new();
    match std::fs::File::open(path).and_then(|f| f.take(4096).read_to_string(&mut text)) {
        Ok(_) => parse(&text, now),
        Err(e) => FirewallState::unknown(format!("cannot read {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_fresh_file_gives_each_family_its_state() {
        let s = parse(
            "checked=1000\nbackend=nft\nipv4=strict\nipv6=off\nfuture=1\n",
            at(1010),
        );
        assert_eq!((s.ipv4, s.ipv6), (FamilyState::Strict, FamilyState::Off));
        assert_eq!(
            (s.backend.as_str(), s.checked_seconds_ago),
            ("nft", Some(10))
        );
        assert!(s.enforced());
        let s = parse(
            "checked=1000\nbackend=iptables\nipv4=boot\nipv6=missing\n",
            at(1000),
        );
        assert_eq!(s.ipv6, FamilyState::Missing);
        assert!(!s.enforced());
        let s = parse(
            "checked=1000\nbackend=nft\nipv4=partial\nipv6=strict\n",
            at(1000),
        );
        assert!(!s.enforced());
    }

    #[test]
    fn stale_incomplete_or_invalid_files_are_unknown_and_not_enforced() {
        for (text, now) in [
            (
                "checked=1000\nbackend=nft\nipv4=strict\nipv6=strict\n",
                1061,
            ),
            ("backend=nft\nipv4=strict\nipv6=strict\n", 1000),
            (
                "checked=1000\nbackend=nft\nipv4=STRICT\nipv6=strict\n",
                1000,
            ),
            (
                "checked=1000\nbackend=nft\nipv4=unknown\nipv6=strict\n",
                1000,
            ),
            ("checked=1000\nbackend=nft\nipv4=off\nipv6=strict\n", 1000),
            ("checked=x\nbackend=nft\nipv4=strict\nipv6=strict\n", 1000),
            ("", 1000),
            ("\u{0}\u{1}garbage", 1000),
        ] {
            let s = parse(text, at(now));
            assert_eq!(
                (s.ipv4, s.ipv6),
                (FamilyState::Unknown, FamilyState::Unknown),
                "{text:?}"
            );
            assert!(!s.enforced() && s.problem.is_some(), "{text:?}");
        }
    }

    #[test]
    fn a_missing_file_is_unknown_and_auto_requires_it_only_where_the_firewall_ran() {
        let dir = std::env::temp_dir().join(format!("credlock-fw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("state");
        let watch = FirewallWatch::new(file.clone(), None);
        assert!(watch.required);
        assert_eq!(watch.read(at(0)).ipv4, FamilyState::Unknown);
        std::fs::write(&file, "checked=5\nbackend=nft\nipv4=strict\nipv6=strict\n").unwrap();
        assert!(watch.read(at(6)).enforced());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!FirewallWatch::new(dir.join("state"), None).required);
        assert!(FirewallWatch::new(dir.join("state"), Some(true)).required);
    }
}
