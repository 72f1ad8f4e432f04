//! The per-process access policy on the request path (issue 15): which [`Ask`] a classified
//! request is, the decision, its answer, its metric and its log line.
//!
//! The caller's [`Identity`] is found once per connection (`peer.rs`, at accept) and travels in
//! each request to the handler. A request without one, while rules exist, is unidentified: the
//! gate fails closed.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Mutex, PoisonError};

use arc_swap::ArcSwap;
use http::StatusCode;

use crate::access::{Ask, Caller, Identity, Policy, Unidentified, Verdict};
use crate::metrics::Metrics;
use crate::route::Route;

/// How many (caller, locked set) and (caller, rule) pairs are remembered as already logged.
/// When full the memory starts again: at worst a line is repeated, never memory unbounded.
const LOGGED_CAPACITY: usize = 4096;

/// At most this many pids of the caller's cgroup in a log line.
const MAX_PIDS: usize = 8;

/// The `rule` label when no rule matched an identified caller, and when an unidentified caller
/// met no `unidentified = true` rule (denied). Rule names cannot contain parentheses.
pub const NO_RULE: &str = "(none)";
pub const UNIDENTIFIED_DEFAULT: &str = "(unidentified)";

/// The caller's gids (primary and supplementary, NSS), cached by whoever provides them.
pub type GroupsOf = Box<dyn Fn(u32) -> Vec<u32> + Send + Sync>;

/// The policy and what deciding needs. Present in the proxy state only when rules exist: with
/// none, nothing here runs and connections are not even identified.
pub struct AccessControl {
    pub policy: ArcSwap<Policy>,
    groups_of: GroupsOf,
    /// credlock's own uid and cgroup: its readiness probe (`/readyz` asks its own listener for
    /// credentials) is not a caller. Only credlock, or root, has a socket of both.
    own: Option<(u32, String)>,
    logged: Mutex<HashSet<u64>>,
    /// The `rule` labels: the rules in order, then [`NO_RULE`], then [`UNIDENTIFIED_DEFAULT`]
    /// (rule names do not change after start: `refresh` only re-resolves names).
    labels: Vec<String>,
    /// Their `credlock_access_decisions_total` series per decision ([`DECISIONS`] order),
    /// resolved once: the request path never hashes a label set.
    counters: Vec<[prometheus::IntCounter; 3]>,
    /// The cgroup v2 mount: the log lines name the processes in the caller's cgroup.
    cgroup_root: Option<std::path::PathBuf>,
}

impl AccessControl {
    pub fn new(
        policy: Policy,
        groups_of: GroupsOf,
        own: Option<(u32, String)>,
        metrics: &Metrics,
    ) -> Self {
        let mut labels: Vec<String> = policy.rule_names().into_iter().map(str::to_owned).collect();
        labels.extend([NO_RULE.to_owned(), UNIDENTIFIED_DEFAULT.to_owned()]);
        let counters = labels
            .iter()
            .map(|rule| {
                DECISIONS.map(|d| {
                    metrics
                        .access_decisions
                        .with_label_values(&[rule.as_str(), d])
                })
            })
            .collect();
        AccessControl {
            labels,
            counters,
            policy: ArcSwap::from_pointee(policy),
            groups_of,
            own,
            logged: Mutex::new(HashSet::new()),
            cgroup_root: None,
        }
    }

    /// Log lines name the processes in the caller's cgroup under this cgroup v2 mount.
    pub fn with_cgroup_root(mut self, root: Option<std::path::PathBuf>) -> Self {
        self.cgroup_root = root;
        self
    }

    /// The processes in the caller's cgroup (its `cgroup.procs`, up to [`MAX_PIDS`]), for log
    /// lines only. sock_diag names the socket's cgroup, not its process, and a socket's pid
    /// would need other users' `/proc/<pid>/fd`, closed to credlock. A service's cgroup mostly
    /// holds one process or a few, so this names the caller or narrows it down; read once per
    /// line logged (a few KiB at most), never per request. Best effort: `-` when unreadable.
    fn pids(&self, who: &Identity) -> String {
        use std::io::Read;
        let (
            Some(root),
            Identity::Identified(Caller {
                cgroup: Some(cgroup),
                ..
            }),
        ) = (&self.cgroup_root, who)
        else {
            return "-".into();
        };
        let mut text = String::new();
        let read = std::fs::File::open(
            root.join(cgroup.trim_start_matches('/'))
                .join("cgroup.procs"),
        )
        .and_then(|f| f.take(4096).read_to_string(&mut text));
        if read.is_err() {
            return "-".into();
        }
        let pids: Vec<&str> = text.split_whitespace().collect();
        match pids.len() {
            0 => "-".into(),
            n if n <= MAX_PIDS => pids.join(","),
            n => format!("{},... ({n}+ processes)", pids[..MAX_PIDS].join(",")),
        }
    }

    /// The decision for one request. `Err((status, body))`: answer locally with it, never
    /// forward. `Ok(rule)`: handle the request as without a policy, for the class of the rule
    /// that matched (configuration order; `None`: no rule, or credlock's own probe), whose
    /// `role` (if it has one) serves the credential routes.
    pub fn check(
        &self,
        who: Option<&Identity>,
        route: &Route<'_>,
        has_token: bool,
    ) -> Result<Option<usize>, (StatusCode, &'static str)> {
        let Some(ask) = ask_of(route) else {
            return Ok(None);
        };
        let who = who.unwrap_or(&Identity::Unidentified(Unidentified::LookupFailed));
        if self.is_own(who) {
            return Ok(None);
        }
        let policy = self.policy.load();
        let groups = match who {
            Identity::Identified(caller) if policy.needs_groups() => (self.groups_of)(caller.uid),
            _ => Vec::new(),
        };
        let decision = policy.decide(who, &ask, has_token, &groups);
        let fallbacks = self.labels.len() - 2;
        let index = match (decision.rule, who) {
            (Some(i), _) if i < fallbacks => i,
            (None, Identity::Unidentified(_)) => fallbacks + 1,
            _ => fallbacks,
        };
        let rule = self.labels[index].as_str();
        let (d, answer) = match decision.verdict {
            Verdict::Allow => (0, None),
            Verdict::NotFound => (1, Some((StatusCode::NOT_FOUND, "404 - Not Found\n"))),
            Verdict::TokenRequired => (2, Some((StatusCode::UNAUTHORIZED, "401 - Unauthorized\n"))),
        };
        self.counters[index][d].inc();
        let label = DECISIONS[d];
        if answer.is_some() && self.first_time(&(describe(who), rule, label)) {
            let (uid, unit) = describe(who);
            tracing::info!(
                rule,
                decision = label,
                uid,
                unit,
                pids = %self.pids(who),
                "access policy: request answered locally (logged once per caller and rule)"
            );
        }
        match answer {
            Some(answer) => Err(answer),
            None => Ok(decision.rule),
        }
    }

    /// Logs, once per (uid, unit, locked set), which caller received which locked set: the
    /// access key id joins a CloudTrail event to the process. Never the secret or the token.
    /// `role`: the ARN of the set's role when it is a class role (`None`: the instance role).
    pub fn served(&self, who: Option<&Identity>, role: Option<&str>, access_key_id: &str) {
        let Some(who) = who else { return };
        if self.is_own(who) {
            return;
        }
        if self.first_time(&(describe(who), access_key_id)) {
            let (uid, unit) = describe(who);
            tracing::info!(
                uid,
                unit,
                pids = %self.pids(who),
                role = role.unwrap_or("instance role"),
                access_key_id,
                "locked credentials served to a caller"
            );
        }
    }

    /// credlock itself: its uid in its own cgroup.
    fn is_own(&self, who: &Identity) -> bool {
        matches!((who, &self.own), (Identity::Identified(caller), Some((uid, cgroup)))
            if caller.uid == *uid && caller.cgroup.as_deref() == Some(cgroup.as_str()))
    }

    fn first_time(&self, key: &impl Hash) -> bool {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        let mut logged = self.logged.lock().unwrap_or_else(PoisonError::into_inner);
        if logged.len() >= LOGGED_CAPACITY {
            logged.clear();
        }
        logged.insert(hasher.finish())
    }
}

/// One rule's counts, for `/status` (from `credlock_access_decisions_total`).
#[derive(Debug, serde::Serialize, PartialEq, Eq)]
pub struct RuleStatus {
    pub rule: String,
    pub allowed: u64,
    pub denied: u64,
    pub token_required: u64,
}

const DECISIONS: [&str; 3] = ["allowed", "denied", "token_required"];

impl AccessControl {
    /// The rules in order, then the two fallbacks, with their counts.
    pub fn status(&self) -> Vec<RuleStatus> {
        self.labels
            .iter()
            .zip(&self.counters)
            .map(|(rule, [allowed, denied, token_required])| RuleStatus {
                rule: rule.clone(),
                allowed: allowed.get(),
                denied: denied.get(),
                token_required: token_required.get(),
            })
            .collect()
    }
}

/// uid (or -1) and unit (or the unidentified reason) for log lines.
fn describe(who: &Identity) -> (i64, String) {
    match who {
        Identity::Identified(c) => (
            i64::from(c.uid),
            c.unit.clone().unwrap_or_else(|| "-".into()),
        ),
        Identity::Unidentified(reason) => (-1, format!("unidentified ({})", reason.label())),
    }
}

/// What a classified request asks for; `None` for requests the classifier already refused
/// (they never reach the upstream anyway).
pub fn ask_of<'a>(route: &Route<'a>) -> Option<Ask<'a>> {
    Some(match *route {
        Route::Token => Ask::Token,
        Route::RoleListing { .. } => Ask::CredentialListing,
        Route::Credentials { .. } => Ask::Credentials,
        Route::Passthrough { target } => {
            let path = target.split_once('?').map_or(target, |(p, _)| p);
            // The classifier lets through only one credential form as passthrough: the
            // instance identity credentials (`identity-credentials/ec2/...`). Anything naming
            // credentials is governed by `credentials`, never by a metadata prefix.
            if crate::route::contains_ignore_case(path.as_bytes(), b"credentials") {
                Ask::IdentityCredentials
            } else {
                Ask::Metadata { path }
            }
        }
        Route::Refused(_) => return None,
    })
}

#[cfg(all(test, feature = "daemon"))]
mod tests {
    use super::*;
    use crate::access::{AccessConfig, Caller, Directory};
    use http::Method;

    struct NoDirectory;
    impl Directory for NoDirectory {
        fn uid_of(&self, _: &str) -> Option<u32> {
            None
        }
        fn gid_of(&self, _: &str) -> Option<u32> {
            None
        }
        fn groups_of_uid(&self, _: u32) -> Option<Vec<u32>> {
            None
        }
    }

    fn control(toml_text: &str, metrics: &Metrics) -> AccessControl {
        let cfg: AccessConfig = toml::from_str::<toml::Table>(toml_text)
            .ok()
            .and_then(|t| t.get("access").cloned())
            .map(|v| v.try_into().unwrap())
            .unwrap();
        let (policy, _) = Policy::compile(&cfg, &NoDirectory, false).unwrap();
        AccessControl::new(
            policy,
            Box::new(|_| Vec::new()),
            Some((999, "/system.slice/credlock.service".into())),
            metrics,
        )
    }

    fn caller(uid: u32, unit: &str) -> Identity {
        Identity::Identified(Caller {
            uid,
            unit: Some(unit.into()),
            cgroup: None,
            pid: None,
        })
    }

    #[test]
    fn classified_requests_map_to_asks() {
        let ask = |target| ask_of(&crate::route::classify(&Method::GET, target));
        assert_eq!(
            ask("/latest/meta-data/iam/security-credentials/"),
            Some(Ask::CredentialListing)
        );
        assert_eq!(
            ask("/latest/meta-data/iam/security-credentials/r"),
            Some(Ask::Credentials)
        );
        assert_eq!(
            ask("/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance"),
            Some(Ask::IdentityCredentials)
        );
        assert_eq!(
            ask("/latest/meta-data/placement/region?x=1"),
            Some(Ask::Metadata {
                path: "/latest/meta-data/placement/region"
            })
        );
        assert_eq!(ask("/latest/meta-data/%2e%2e/"), None);
        let put = ask_of(&crate::route::classify(&Method::PUT, "/latest/api/token"));
        assert_eq!(put, Some(Ask::Token));
    }

    #[test]
    fn a_denied_caller_gets_imds_style_answers_and_is_counted_by_rule() {
        let metrics = Metrics::new();
        let gate = control(
            "[[access.rule]]\nname = \"web\"\nunits = [\"nginx.service\"]\ncredentials = \"deny\"\n\
             metadata = [\"/latest/meta-data/placement/\"]\n\
             [[access.rule]]\nname = \"v2only\"\nunits = [\"worker.service\"]\nrequire_token = true\n",
            &metrics,
        );
        let web = caller(33, "nginx.service");
        let creds =
            crate::route::classify(&Method::GET, "/latest/meta-data/iam/security-credentials/r");
        let az = crate::route::classify(
            &Method::GET,
            "/2021-01-03/meta-data/placement/availability-zone",
        );
        let iid = crate::route::classify(&Method::GET, "/latest/meta-data/instance-id");
        assert_eq!(
            gate.check(Some(&web), &creds, true).err().map(|a| a.0),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(gate.check(Some(&web), &az, false), Ok(Some(0)));
        assert_eq!(
            gate.check(Some(&web), &iid, false).err().map(|a| a.0),
            Some(StatusCode::NOT_FOUND)
        );
        let worker = caller(1000, "worker.service");
        assert_eq!(
            gate.check(Some(&worker), &creds, false).err().map(|a| a.0),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(gate.check(Some(&worker), &creds, true), Ok(Some(1)));
        // credlock's own readiness probe (its uid in its cgroup) is not judged; its uid
        // elsewhere is.
        let own = Identity::Identified(Caller {
            uid: 999,
            unit: Some("credlock.service".into()),
            cgroup: Some("/system.slice/credlock.service".into()),
            pid: None,
        });
        assert_eq!(gate.check(Some(&own), &creds, true), Ok(None));
        let elsewhere = caller(999, "other.service");
        assert_eq!(
            gate.check(Some(&elsewhere), &creds, true),
            Ok(None),
            "no rule: allowed"
        );
        let own_uid_web = Identity::Identified(Caller {
            uid: 999,
            unit: Some("nginx.service".into()),
            cgroup: Some("/system.slice/nginx.service".into()),
            pid: None,
        });
        assert_eq!(
            gate.check(Some(&own_uid_web), &creds, true)
                .err()
                .map(|a| a.0),
            Some(StatusCode::NOT_FOUND)
        );
        // No identity at all while rules exist: unidentified, denied (no rule names it).
        assert_eq!(
            gate.check(None, &creds, true).err().map(|a| a.0),
            Some(StatusCode::NOT_FOUND)
        );
        let count =
            |rule: &str, d: &str| metrics.access_decisions.with_label_values(&[rule, d]).get();
        assert_eq!((count("web", "denied"), count("web", "allowed")), (3, 1));
        assert_eq!(
            (
                count("v2only", "token_required"),
                count("v2only", "allowed")
            ),
            (1, 1)
        );
        assert_eq!(count(UNIDENTIFIED_DEFAULT, "denied"), 1);
        let status = gate.status();
        let names: Vec<&str> = status.iter().map(|r| r.rule.as_str()).collect();
        assert_eq!(names, ["web", "v2only", NO_RULE, UNIDENTIFIED_DEFAULT]);
        assert_eq!(
            (
                status[0].allowed,
                status[0].denied,
                status[0].token_required
            ),
            (1, 3, 0)
        );
    }

    #[test]
    fn log_lines_name_the_processes_of_the_callers_cgroup() {
        let metrics = Metrics::new();
        let root = std::env::temp_dir().join(format!("credlock-gate-pids-{}", std::process::id()));
        let one = root.join("system.slice/one.service");
        let many = root.join("system.slice/many.service");
        std::fs::create_dir_all(&one).unwrap();
        std::fs::create_dir_all(&many).unwrap();
        std::fs::write(one.join("cgroup.procs"), "4242\n").unwrap();
        let lots: String = (100..120).map(|p| format!("{p}\n")).collect();
        std::fs::write(many.join("cgroup.procs"), lots).unwrap();
        let gate = control("[[access.rule]]\nname = \"a\"\n", &metrics)
            .with_cgroup_root(Some(root.clone()));
        let in_cgroup = |path: &str| {
            Identity::Identified(Caller {
                uid: 1,
                unit: None,
                cgroup: Some(path.into()),
                pid: None,
            })
        };
        assert_eq!(gate.pids(&in_cgroup("/system.slice/one.service")), "4242");
        assert_eq!(
            gate.pids(&in_cgroup("/system.slice/many.service")),
            "100,101,102,103,104,105,106,107,... (20+ processes)"
        );
        assert_eq!(gate.pids(&in_cgroup("/system.slice/gone.service")), "-");
        assert_eq!(
            gate.pids(&Identity::Unidentified(Unidentified::SocketGone)),
            "-"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
