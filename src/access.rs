//! Who may get what: the per-process access policy (issue 15), pure.
//!
//! Ordered rules from `[[access.rule]]`, first match wins. A rule selects identified callers by
//! systemd unit (glob), user and group; or, with `unidentified = true`, only callers that could
//! not be identified, which never inherit another class's rights. With no rules at all every
//! caller keeps today's behaviour. [`Policy::decide`] is the one decision, from (identity,
//! request) to a [`Verdict`]; name resolution (NSS) comes in through [`Directory`] so that
//! everything here is testable without a system.

use serde::Deserialize;

/// Rule names are log fields and metric labels: short, plain.
const MAX_RULE_NAME_LEN: usize = 32;
/// systemd's `UNIT_NAME_MAX`.
const MAX_UNIT_GLOB_LEN: usize = 256;
/// Metadata prefixes are written under this version; they match under every version.
const LATEST: &str = "/latest";

/// What identification (sock_diag) produced for a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// The systemd (system-manager) unit derived from the socket's cgroup v2 path, e.g.
    /// "nginx.service", "user@1000.service", "session-3.scope"; `None` when not under a unit.
    pub unit: Option<String>,
    /// The cgroup v2 path, for logs only.
    pub cgroup: Option<String>,
    /// Best effort, for logs only.
    pub pid: Option<u32>,
}

/// Who is calling, as far as credlock could tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Identified(Caller),
    Unidentified(Unidentified),
}

/// Why a connection could not be identified. Every reason lands in the same class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unidentified {
    /// The sock_diag lookup failed or found no socket owner.
    LookupFailed,
    /// The client socket was gone before it could be looked up.
    SocketGone,
    /// Forwarded (container) traffic: the socket is in another network namespace.
    Forwarded,
}

impl Unidentified {
    /// Every reason (the closed label set).
    pub const ALL: [Unidentified; 3] = [
        Unidentified::LookupFailed,
        Unidentified::SocketGone,
        Unidentified::Forwarded,
    ];

    /// The log field and metric label.
    pub fn label(self) -> &'static str {
        match self {
            Unidentified::LookupFailed => "lookup_failed",
            Unidentified::SocketGone => "socket_gone",
            Unidentified::Forwarded => "forwarded",
        }
    }
}

/// What a request asks for (from [`crate::route::classify`]'s result).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask<'a> {
    /// `PUT /latest/api/token`: always allowed.
    Token,
    /// `.../iam/security-credentials[-extended]/`.
    CredentialListing,
    /// A role's credentials (any role name).
    Credentials,
    /// `/<version>/meta-data/identity-credentials/...`: credentials too, governed by
    /// `credentials` (but not by `require_token`).
    IdentityCredentials,
    /// Any other accepted path (no query), e.g. "/2021-01-03/meta-data/placement/az".
    Metadata { path: &'a str },
}

/// The `[access]` section.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
}

/// One `[[access.rule]]`, as written.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// A log field and metric label: `[A-Za-z0-9_-]{1,32}`, unique.
    pub name: String,
    /// Globs (`*` and `?` only) on the caller's systemd unit.
    #[serde(default)]
    pub units: Vec<String>,
    /// User names or numeric uids.
    #[serde(default)]
    pub users: Vec<String>,
    /// Group names or numeric gids (primary or supplementary membership of the caller's user).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Match only connections that could not be identified (no selector allowed then).
    #[serde(default)]
    pub unidentified: bool,
    /// Default: allow.
    #[serde(default)]
    pub credentials: Option<Allowance>,
    /// Default: allow.
    #[serde(default)]
    pub metadata: Option<MetadataAccess>,
    /// Tokenless (IMDSv1) credential requests get IMDS's 401.
    #[serde(default)]
    pub require_token: bool,
    /// Another IAM role for this class (validated here; served by `class_role.rs`).
    #[serde(default)]
    pub role: Option<String>,
}

/// `"allow"` or `"deny"`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Allowance {
    Allow,
    Deny,
}

/// `"allow"`, `"deny"`, or a list of path prefixes written under `/latest/`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "MetadataForm")]
pub enum MetadataAccess {
    Allow,
    Deny,
    Prefixes(Vec<String>),
}

/// The TOML forms of [`MetadataAccess`].
#[derive(Deserialize)]
#[serde(untagged, expecting = "\"allow\", \"deny\" or a list of path prefixes")]
enum MetadataForm {
    Word(Allowance),
    Prefixes(Vec<String>),
}

impl From<MetadataForm> for MetadataAccess {
    fn from(form: MetadataForm) -> Self {
        match form {
            MetadataForm::Word(Allowance::Allow) => MetadataAccess::Allow,
            MetadataForm::Word(Allowance::Deny) => MetadataAccess::Deny,
            MetadataForm::Prefixes(prefixes) => MetadataAccess::Prefixes(prefixes),
        }
    }
}

/// Name resolution (NSS), injected so that the policy stays pure.
pub trait Directory {
    fn uid_of(&self, user: &str) -> Option<u32>;
    fn gid_of(&self, group: &str) -> Option<u32>;
    /// Primary gid plus supplementary gids of the user with this uid (getpwuid + getgrouplist).
    fn groups_of_uid(&self, uid: u32) -> Option<Vec<u32>>;
}

/// A rejected rule: `access.rule[N].KEY="VALUE" is not valid: WHY` (`key` carries the
/// `access.rule[N].` part), the crate's config error format.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{key}={value:?} is not valid: {why}")]
    Invalid {
        key: String,
        value: String,
        why: String,
    },
}

/// The outcome of [`Policy::decide`]: the matched rule's index (`None`: no rule matched) and
/// what to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub rule: Option<usize>,
    pub verdict: Verdict,
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Handle it as without a policy.
    Allow,
    /// Answer locally with IMDS's 401 (tokenless credential request of a `require_token` class).
    TokenRequired,
    /// Answer locally 404 (listing, credentials, identity credentials, or metadata the class may
    /// not see): "Not Found", as IMDS says for a path that does not exist.
    NotFound,
}

/// The compiled rules.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    name: String,
    unidentified: bool,
    units: Vec<String>,
    users: Vec<Entry>,
    groups: Vec<Entry>,
    credentials: Allowance,
    metadata: MetadataAccess,
    require_token: bool,
}

/// One `users` or `groups` entry: a numeric id (`name: None`), or a name and its last
/// resolution (`id: None`, never resolved: matches nothing).
#[derive(Debug, Clone)]
struct Entry {
    name: Option<String>,
    id: Option<u32>,
}

/// Users or groups: the config key, the noun for messages, the NSS lookup.
#[derive(Clone, Copy)]
struct Kind {
    key: &'static str,
    noun: &'static str,
    resolve: fn(&dyn Directory, &str) -> Option<u32>,
}

const USERS: Kind = Kind {
    key: "users",
    noun: "user",
    resolve: |dir, name| dir.uid_of(name),
};
const GROUPS: Kind = Kind {
    key: "groups",
    noun: "group",
    resolve: |dir, name| dir.gid_of(name),
};

const NO_RULE_ALLOW: Decision = Decision {
    rule: None,
    verdict: Verdict::Allow,
};

fn invalid(i: usize, key: &str, value: &str, why: impl Into<String>) -> AccessError {
    AccessError::Invalid {
        key: format!("access.rule[{i}].{key}"),
        value: value.to_string(),
        why: why.into(),
    }
}

impl Policy {
    /// Validates and compiles the rules. `strict` (check-config): a user or group name that does
    /// not resolve is an error. Otherwise (run) it is a returned warning and its entry matches
    /// nothing until [`Policy::refresh`] resolves it, so that a user created after the image was
    /// baked does not stop the daemon. Numeric ids are taken as they are.
    pub fn compile(
        cfg: &AccessConfig,
        dir: &dyn Directory,
        strict: bool,
    ) -> Result<(Policy, Vec<String>), AccessError> {
        let mut rules: Vec<Rule> = Vec::with_capacity(cfg.rules.len());
        let mut warnings = Vec::new();
        for (i, rc) in cfg.rules.iter().enumerate() {
            if !valid_rule_name(&rc.name) {
                return Err(invalid(
                    i,
                    "name",
                    &rc.name,
                    "must be 1 to 32 of A-Z a-z 0-9 _ -",
                ));
            }
            if let Some(j) = rules.iter().position(|r| r.name == rc.name) {
                let why = format!("duplicate of access.rule[{j}].name");
                return Err(invalid(i, "name", &rc.name, why));
            }
            let selectors = !(rc.units.is_empty() && rc.users.is_empty() && rc.groups.is_empty());
            if rc.unidentified && selectors {
                let why = "cannot be combined with units, users or groups \
                           (an unidentified connection has none of them)";
                return Err(invalid(i, "unidentified", "true", why));
            }
            for glob in &rc.units {
                check_glob(glob).map_err(|why| invalid(i, "units", glob, why))?;
            }
            let mut entries = |kind: Kind, names: &[String]| -> Result<Vec<Entry>, AccessError> {
                let mut out = Vec::with_capacity(names.len());
                for name in names {
                    let entry = match name.parse::<u32>() {
                        Ok(id) => Entry {
                            name: None,
                            id: Some(id),
                        },
                        Err(_) => Entry {
                            name: Some(name.clone()),
                            id: (kind.resolve)(dir, name),
                        },
                    };
                    if entry.id.is_none() {
                        if strict {
                            return Err(invalid(
                                i,
                                kind.key,
                                name,
                                format!("no such {}", kind.noun),
                            ));
                        }
                        warnings.push(unresolved_warning(i, kind, name, None));
                    }
                    out.push(entry);
                }
                Ok(out)
            };
            let users = entries(USERS, &rc.users)?;
            let groups = entries(GROUPS, &rc.groups)?;
            if let Some(MetadataAccess::Prefixes(prefixes)) = &rc.metadata {
                for p in prefixes {
                    if !p.starts_with("/latest/") {
                        let why = "a prefix is written under /latest/ (it matches every version)";
                        return Err(invalid(i, "metadata", p, why));
                    }
                }
            }
            if let Some(role) = &rc.role
                && !valid_role_arn(role)
            {
                let why = "not an IAM role ARN (arn:aws:iam::<12-digit account>:role/<name>)";
                return Err(invalid(i, "role", role, why));
            }
            rules.push(Rule {
                name: rc.name.clone(),
                unidentified: rc.unidentified,
                units: rc.units.clone(),
                users,
                groups,
                credentials: rc.credentials.unwrap_or(Allowance::Allow),
                metadata: rc.metadata.clone().unwrap_or(MetadataAccess::Allow),
                require_token: rc.require_token,
            });
        }
        Ok((Policy { rules }, warnings))
    }

    /// Resolves the user and group names again (periodically). Returns one warning per name that
    /// does not resolve now. A name that resolved before keeps its last id: a transient NSS
    /// failure must not change who a rule matches.
    pub fn refresh(&mut self, dir: &dyn Directory) -> Vec<String> {
        let mut warnings = Vec::new();
        for (i, rule) in self.rules.iter_mut().enumerate() {
            for (kind, entries) in [(USERS, &mut rule.users), (GROUPS, &mut rule.groups)] {
                for Entry { name, id } in entries.iter_mut() {
                    let Some(name) = name else { continue };
                    match (kind.resolve)(dir, name) {
                        Some(new) => *id = Some(new),
                        None => warnings.push(unresolved_warning(i, kind, name, *id)),
                    }
                }
            }
        }
        warnings
    }

    /// No rules: every caller keeps today's behaviour.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule names in order (the closed label set for metrics); [`Decision::rule`] indexes it.
    pub fn rule_names(&self) -> Vec<&str> {
        self.rules.iter().map(|r| r.name.as_str()).collect()
    }

    /// Whether any rule has a `groups` selector: without one, [`Policy::decide`] ignores
    /// `groups` and the caller need not look them up.
    pub fn needs_groups(&self) -> bool {
        self.rules.iter().any(|r| !r.groups.is_empty())
    }

    /// The decision. `has_token`: the request carries `x-aws-ec2-metadata-token`. `groups`: the
    /// caller's primary and supplementary gids ([`Directory::groups_of_uid`]; empty for an
    /// unidentified caller).
    pub fn decide(
        &self,
        who: &Identity,
        ask: &Ask<'_>,
        has_token: bool,
        groups: &[u32],
    ) -> Decision {
        if let Some(i) = self.rules.iter().position(|r| r.matches(who, groups)) {
            let verdict = self.rules[i].verdict(ask, has_token);
            return Decision {
                rule: Some(i),
                verdict,
            };
        }
        match (who, ask) {
            // No rules at all, or an identified caller no rule selects: today's behaviour.
            _ if self.rules.is_empty() => NO_RULE_ALLOW,
            (Identity::Identified(_), _) | (_, Ask::Token) => NO_RULE_ALLOW,
            // Never another class's rights: credentials and metadata denied.
            (Identity::Unidentified(_), _) => Decision {
                rule: None,
                verdict: Verdict::NotFound,
            },
        }
    }
}

impl Rule {
    fn matches(&self, who: &Identity, groups: &[u32]) -> bool {
        let caller = match who {
            Identity::Unidentified(_) => return self.unidentified,
            Identity::Identified(_) if self.unidentified => return false,
            Identity::Identified(caller) => caller,
        };
        let unit_ok = self.units.is_empty()
            || caller
                .unit
                .as_deref()
                .is_some_and(|unit| self.units.iter().any(|g| glob_matches(g, unit)));
        let user_ok = self.users.is_empty() || self.users.iter().any(|e| e.id == Some(caller.uid));
        let group_ok = self.groups.is_empty()
            || (self.groups.iter()).any(|e| e.id.is_some_and(|gid| groups.contains(&gid)));
        unit_ok && user_ok && group_ok
    }

    fn verdict(&self, ask: &Ask<'_>, has_token: bool) -> Verdict {
        match ask {
            Ask::Token => Verdict::Allow,
            Ask::CredentialListing | Ask::Credentials | Ask::IdentityCredentials => {
                if self.credentials == Allowance::Deny {
                    Verdict::NotFound
                } else if self.require_token
                    && !has_token
                    && matches!(ask, Ask::CredentialListing | Ask::Credentials)
                {
                    Verdict::TokenRequired
                } else {
                    Verdict::Allow
                }
            }
            Ask::Metadata { path } => match &self.metadata {
                MetadataAccess::Allow => Verdict::Allow,
                MetadataAccess::Deny => Verdict::NotFound,
                MetadataAccess::Prefixes(prefixes) if prefix_allows(prefixes, path) => {
                    Verdict::Allow
                }
                MetadataAccess::Prefixes(_) => Verdict::NotFound,
            },
        }
    }
}

fn unresolved_warning(i: usize, kind: Kind, name: &str, last: Option<u32>) -> String {
    let Kind { key, noun, .. } = kind;
    match last {
        None => format!(
            "access.rule[{i}].{key}={name:?} does not resolve (no such {noun}): \
             the entry matches nothing until it does"
        ),
        Some(id) => format!(
            "access.rule[{i}].{key}={name:?} no longer resolves (no such {noun}): \
             the entry keeps its last id {id}"
        ),
    }
}

/// Whether `path`, under any version, is `/latest/...` under one of `prefixes`.
fn prefix_allows(prefixes: &[String], path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let (version, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    is_version(version)
        && prefixes.iter().any(|p| {
            p.strip_prefix(LATEST)
                .is_some_and(|p_tail| tail.starts_with(p_tail))
        })
}

/// The version segments the classifier accepts: `latest`, `1.0`, a dated `YYYY-MM-DD`.
fn is_version(segment: &str) -> bool {
    const DATED: &[u8] = b"dddd-dd-dd";
    let dated = segment.len() == DATED.len()
        && (segment.bytes().zip(DATED)).all(|(c, &p)| c == p || p == b'd' && c.is_ascii_digit());
    dated || segment == "latest" || segment == "1.0"
}

fn valid_rule_name(name: &str) -> bool {
    (1..=MAX_RULE_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Unit glob characters: those of systemd unit names (including `\` of escapes) plus `*` `?`.
fn check_glob(glob: &str) -> Result<(), &'static str> {
    if glob.is_empty() {
        return Err("empty glob");
    }
    if glob.len() > MAX_UNIT_GLOB_LEN {
        return Err("longer than a unit name can be (256)");
    }
    let ok = |b: u8| b.is_ascii_alphanumeric() || b":_.@\\-*?".contains(&b);
    if !glob.bytes().all(ok) {
        return Err("only A-Z a-z 0-9 : _ . @ \\ - and the wildcards * ?");
    }
    Ok(())
}

/// Whole-name glob match: `*` any run of characters, `?` one character, the rest literal.
/// Linear backtracking to the last `*` (the classic two-pointer match).
fn glob_matches(glob: &str, name: &str) -> bool {
    let pat = glob.as_bytes(); // ASCII (check_glob)
    let (mut p, mut n) = (0, 0); // n: byte offset in name, on a char boundary
    let mut star: Option<(usize, usize)> = None;
    while let Some(c) = name.get(n..).and_then(|s| s.chars().next()) {
        match pat.get(p) {
            Some(b'*') => (star, p) = (Some((p, n)), p + 1),
            Some(&b) if b == b'?' || char::from(b) == c => (p, n) = (p + 1, n + c.len_utf8()),
            // Mismatch: the last `*` swallows one more character, if there is one.
            _ => {
                let Some((sp, sn)) = star else { return false };
                let skip = name
                    .get(sn..)
                    .and_then(|s| s.chars().next())
                    .map_or(1, char::len_utf8);
                (star, p, n) = (Some((sp, sn + skip)), sp + 1, sn + skip);
            }
        }
    }
    pat.get(p..)
        .is_some_and(|rest| rest.iter().all(|&b| b == b'*'))
}

/// `arn:<aws partition>:iam::<12 digits>:role/<path/><name>`.
fn valid_role_arn(arn: &str) -> bool {
    let Some(rest) = arn.strip_prefix("arn:aws") else {
        return false;
    };
    let Some((partition_tail, rest)) = rest.split_once(":iam::") else {
        return false;
    };
    let Some((account, resource)) = rest.split_once(":role/") else {
        return false;
    };
    let (path, name) = resource.rsplit_once('/').unwrap_or(("", resource));
    let name_char = |b: u8| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b);
    partition_tail
        .bytes()
        .all(|b| b == b'-' || b.is_ascii_lowercase())
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && (1..=64).contains(&name.len())
        && name.bytes().all(name_char)
        && path.len() <= 511
        && path.bytes().all(|b| b.is_ascii_graphic())
        && !resource.starts_with('/')
        && !resource.contains("//")
        && crate::identity::RoleArn::parse(arn).is_some()
}

#[cfg(test)]
#[path = "access_tests.rs"]
mod tests;
