//! `credlock audit` (issue 16): reads CloudTrail logs and reports two lists.
//!
//! - **`denied_locked`**, theft signals: calls made with credlock's locked credentials that the
//!   session policy refused. Locked credentials work only from the instance's network, so a
//!   denial means someone used them from elsewhere (or the environment is missing a network).
//! - **`would_deny`**, rollout readiness: calls made with the native instance-profile
//!   credentials that the lock *would* refuse, judged by the caller's [`Judge`]: what to add to
//!   the environment (a NAT gateway, a proxy, a VPC endpoint) before rolling credlock out.
//!
//! # API
//!
//! ```ignore
//! let judge = |call: &Call<'_>| -> Option<String> { /* Some(advice) = the lock would deny */ };
//! let report = audit_paths(&paths, &judge, &AuditOptions::default());
//! println!("{}", render_table(&report));             // or serde_json::to_string(&report)
//! ```
//!
//! [`audit_paths`] takes files and directories (walked recursively; symbolic links to
//! directories are not followed inside a walk; files named `*_CloudTrail-Digest_*` are counted
//! in `digest_files` and not read). [`audit_reader`] reads one stream into an [`Accumulator`]
//! (tests, stdin); [`Accumulator::finish`] gives the [`Report`].
//!
//! # Input
//!
//! Per file, whatever its name: gzip or plain (by gzip's magic bytes), then JSON: the S3
//! delivery format `{"Records": [...]}` ("CloudTrail log file examples", CloudTrail User
//! Guide), one event per line (CloudTrail Lake and Athena exports; keys are matched ignoring
//! ASCII case, as SQL engines lower-case them), or an array of events.
//!
//! It streams: each record is read into a small struct of the fields below and dropped before
//! the next one is read (`audit_parse.rs`). Memory is bounded by the number of groups (at most
//! [`AuditOptions::max_groups`] per list, about 0.75 KB each: 200,000 groups, both lists full
//! at the default cap, peak at about 150 MB, measured), the longest single JSON string and the
//! nesting depth of the deepest skipped value (a byte per level), never by the number of
//! events or the size of a file.
//!
//! A file that cannot be read to its end (bad gzip, invalid JSON, a truncated array, `Records`
//! not an array, a record whose field has the wrong type, no CloudTrail content) is listed in
//! [`Report::skipped`] with the reason, and the next file is read. **The records read from it
//! before the failure stay counted** (a truncated file contributes its complete records).
//!
//! # Classification ("CloudTrail userIdentity element", CloudTrail User Guide)
//!
//! Only role sessions are considered: `userIdentity.type` is `AssumedRole` and `arn` is
//! `arn:<partition>:sts::<account>:assumed-role/<role>/<session name>`. Then:
//!
//! - **A credlock session**: `sessionContext.sourceIdentity` starts with `credlock-` (credlock
//!   sets `credlock-<instance id>`, `refresh::source_identity`; a source identity persists into
//!   chained role sessions, "Monitor and control actions taken with assumed roles", IAM User
//!   Guide). Its instance is the rest of the source identity (the session name when that is
//!   empty). The call counts in `denied_locked` when the session policy denied it:
//!   - `errorCode` contains `AccessDenied` (`AccessDenied`, `AccessDeniedException`, ...), ends
//!     with `UnauthorizedOperation`, or is SNS's `AuthorizationError`, and `errorMessage` says
//!     "explicit deny in a session" (ASCII case ignored; the tripwire pattern's rule): AWS's
//!     denial messages name the policy type, "... with an explicit deny in a session policy"
//!     ("Troubleshoot access denied error messages", IAM User Guide);
//!   - or `errorCode` is `Client.UnauthorizedOperation` (or `UnauthorizedOperation`) with a
//!     message naming no policy type (not another policy's explicit deny, not a missing
//!     allow): EC2's denials carry an *encoded* authorization message (decoding it takes
//!     `sts:DecodeAuthorizationMessage`, "DecodeAuthorizationMessage", STS API Reference), so
//!     such a denial cannot be told apart from one by another policy that does not name itself,
//!     and is counted.
//!
//!   Other calls of credlock sessions are counted in `records_locked_other`.
//! - **A native instance-profile session**: `sessionContext.ec2RoleDelivery` is present (EC2
//!   delivered the credentials through IMDS) and it is not a credlock session. Its instance is
//!   the session name (EC2 names the session after the instance). Every call, whatever its
//!   outcome, becomes a [`Call`] for the judge; `Some(advice)` puts it in `would_deny`,
//!   `None` counts it in `records_native_allowed`.
//! - Everything else (other principals, other sessions, records missing `eventSource` or
//!   `eventName`) counts in `records_ignored`.
//!
//! The source of a call: `vpcEndpointId` when present ("CloudTrail record contents"), else
//! `sourceIPAddress` when it is an IP address, else a service: "For services in AWS, only the
//! DNS name is displayed" (a name ending in `.amazonaws.com` or `.amazonaws.com.cn`, or `AWS
//! Internal`); anything else is kept as `source_other`. A call is `via_aws_service` when
//! `userIdentity.invokedBy` is present ("only present when a request is made by an AWS
//! service", which includes forward access sessions) or the source is a service.
//!
//! # Grouping
//!
//! Both lists are grouped by (instance, source, eventSource, eventName) with a count, the
//! first and last `eventTime` (compared as text: CloudTrail writes `YYYY-MM-DDTHH:MM:SSZ`,
//! which sorts as time) and, in `would_deny`, the advice for the group's first call. Items are
//! sorted by count, largest first, then by those keys. The cap and its eviction policy are in
//! `audit_groups.rs`; evictions are reported as `dropped_groups`/`dropped_events`, per list in
//! `dropped`.
//!
//! # Limits
//!
//! - `aws:SourceVpc` cannot be reconstructed: CloudTrail records carry the VPC endpoint's id
//!   (`vpcEndpointId`) but not the VPC. A call through an endpoint is judged by the endpoint id
//!   (and [`Call::source_ip`] is then the caller's private address, which `aws:SourceIp` does
//!   not carry on the endpoint path, "AWS global condition context keys", IAM User Guide); the
//!   judge decides.
//! - A denial that a service reports only inside `responseElements`, or with a message that
//!   does not name the policy type (some services, cross-organization S3 requests), is not
//!   counted in `denied_locked`.
//! - With an organization trail, a cross-account call is delivered to both accounts
//!   ("CloudTrail record contents": `recipientAccountId`, `sharedEventID`) and is counted once
//!   per copy; `records_cross_account` counts the grouped records whose `recipientAccountId` is
//!   not the caller's account.
//! - The IAM action of a call is `<eventSource up to the first dot>:<eventName>`, except
//!   [`IAM_PREFIX_EXCEPTIONS`]; the list is not exhaustive, so the judge also gets
//!   `event_source` and `event_name` (and some services name events differently from their IAM
//!   actions, e.g. API Gateway's management API).

#[path = "audit_groups.rs"]
mod groups;
#[path = "audit_parse.rs"]
mod parse;
#[path = "audit_table.rs"]
mod table;
#[path = "audit_walk.rs"]
mod walk;

use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Serialize;

use groups::{GroupKey, GroupTable};
use parse::{Record, Sink};
pub use table::render_table;

/// A call by a native instance-profile session, as CloudTrail recorded it, for a [`Judge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call<'a> {
    /// The session name: EC2 names instance-profile sessions after the instance.
    pub instance_id: &'a str,
    /// `<IAM service prefix>:<eventName>`, e.g. `s3:GetObject` (see [`iam_action`]).
    pub action: String,
    /// `sourceIPAddress` when it is an address. On the VPC-endpoint path it is the caller's
    /// private address, and the request had no `aws:SourceIp`.
    pub source_ip: Option<IpAddr>,
    /// `vpcEndpointId`: the value of `aws:SourceVpce` for the call.
    pub vpc_endpoint_id: Option<&'a str>,
    /// An AWS service made the call on the caller's behalf (`invokedBy`, or a service name as
    /// `sourceIPAddress`): what `aws:ViaAWSService` exempts.
    pub via_aws_service: bool,
    pub event_source: &'a str,
    pub event_name: &'a str,
}

/// Decides whether the lock would deny a call: `Some(advice)` if it would (the advice tells the
/// operator what to change, e.g. "198.51.100.7 is not in the environment of i-...; if it is a
/// NAT gateway or a proxy, enable the ec2 source or add it to discovery.static"), `None` if the
/// call would pass. Closures `Fn(&Call<'_>) -> Option<String>` are judges.
pub trait Judge {
    fn would_deny(&self, call: &Call<'_>) -> Option<String>;
}

impl<F: Fn(&Call<'_>) -> Option<String>> Judge for F {
    fn would_deny(&self, call: &Call<'_>) -> Option<String> {
        self(call)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditOptions {
    /// Groups kept per list (at least 1); beyond it, the smallest are evicted.
    pub max_groups: usize,
    /// Progress lines on stderr (the caller decides, e.g. when stderr is a terminal).
    pub progress: bool,
}

/// Per list. Both lists full took 75 MB of resident memory (`benches/audit.sh`, about 0.75 KB
/// a group); 100,000 took 148 MB, over the 100 MB budget.
pub const DEFAULT_MAX_GROUPS: usize = 50_000;

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            max_groups: DEFAULT_MAX_GROUPS,
            progress: false,
        }
    }
}

/// Where a group's calls came from. In JSON, one of the keys `vpc_endpoint_id`, `source_ip`,
/// `source_service`, `source_other` (flattened into the item).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `vpcEndpointId`: the call came through this VPC endpoint.
    VpcEndpointId(String),
    /// `sourceIPAddress`, an address.
    SourceIp(IpAddr),
    /// `sourceIPAddress`, an AWS service's DNS name or `AWS Internal`.
    SourceService(String),
    /// `sourceIPAddress`, anything else (empty when absent).
    SourceOther(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::VpcEndpointId(s) | Source::SourceService(s) => f.write_str(s),
            Source::SourceIp(ip) => write!(f, "{ip}"),
            Source::SourceOther(s) if s.is_empty() => f.write_str("-"),
            Source::SourceOther(s) => f.write_str(s),
        }
    }
}

/// One group of calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    pub instance_id: String,
    #[serde(flatten)]
    pub source: Source,
    pub event_source: String,
    pub event_name: String,
    pub count: u64,
    /// The earliest and latest `eventTime` (empty if no record of the group had one).
    pub first_seen: String,
    pub last_seen: String,
    /// `would_deny` only: the judge's advice for the group's first call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// Groups evicted by the cap and the events they held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Dropped {
    pub groups: u64,
    pub events: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DroppedByList {
    pub denied_locked: Dropped,
    pub would_deny: Dropped,
}

/// The result. `records_read` = `records_denied_locked` + `records_locked_other` +
/// `records_would_deny` + `records_native_allowed` + `records_ignored`; the counts of a list's
/// groups plus its dropped events equal its `records_*`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub denied_locked: Vec<Group>,
    pub would_deny: Vec<Group>,
    /// Files that could not be read to their end, with the reason.
    pub skipped: Vec<Skipped>,
    /// Files read to their end.
    pub files_read: u64,
    /// CloudTrail digest files met in directories, not read.
    pub digest_files: u64,
    pub records_read: u64,
    pub records_denied_locked: u64,
    pub records_locked_other: u64,
    pub records_would_deny: u64,
    pub records_native_allowed: u64,
    pub records_ignored: u64,
    pub records_cross_account: u64,
    /// Both lists together; per list in `dropped`.
    pub dropped_groups: u64,
    pub dropped_events: u64,
    pub dropped: DroppedByList,
}

/// The running state of an audit: groups and counters.
#[derive(Debug)]
pub struct Accumulator {
    denied: GroupTable,
    would: GroupTable,
    report: Report,
}

impl Accumulator {
    pub fn new(max_groups: usize) -> Accumulator {
        Accumulator {
            denied: GroupTable::new(max_groups),
            would: GroupTable::new(max_groups),
            report: Report::default(),
        }
    }

    /// Records read so far.
    pub fn records_read(&self) -> u64 {
        self.report.records_read
    }

    pub fn finish(self) -> Report {
        let mut report = self.report;
        report.dropped = DroppedByList {
            denied_locked: self.denied.dropped(),
            would_deny: self.would.dropped(),
        };
        report.dropped_groups =
            report.dropped.denied_locked.groups + report.dropped.would_deny.groups;
        report.dropped_events =
            report.dropped.denied_locked.events + report.dropped.would_deny.events;
        report.denied_locked = self.denied.into_groups();
        report.would_deny = self.would.into_groups();
        report
    }

    fn skip(&mut self, path: &str, reason: String) {
        self.report.skipped.push(Skipped {
            path: path.to_string(),
            reason,
        });
    }

    fn add(&mut self, judge: &dyn Judge, record: Record) {
        let r = &mut self.report;
        r.records_read += 1;
        let Some(session) = Session::of(&record) else {
            r.records_ignored += 1;
            return;
        };
        let (Some(event_source), Some(event_name)) = (&record.event_source, &record.event_name)
        else {
            r.records_ignored += 1;
            return;
        };
        let cross_account = record
            .recipient_account_id
            .as_deref()
            .is_some_and(|recipient| !recipient.is_empty() && recipient != session.account);
        let source = source_of(&record);
        match session.kind {
            Kind::Locked => {
                if !denied_by_lock(
                    record.error_code.as_deref(),
                    record.error_message.as_deref(),
                ) {
                    r.records_locked_other += 1;
                    return;
                }
                r.records_denied_locked += 1;
                r.records_cross_account += u64::from(cross_account);
                let key = GroupKey {
                    instance_id: session.instance_id.to_string(),
                    source,
                    event_source: event_source.clone(),
                    event_name: event_name.clone(),
                };
                self.denied.add(key, record.event_time, || None);
            }
            Kind::Native => {
                let ip = record
                    .source_ip_address
                    .as_deref()
                    .and_then(|s| s.trim().parse::<IpAddr>().ok());
                let call = Call {
                    instance_id: session.instance_id,
                    action: iam_action(event_source, event_name),
                    source_ip: ip,
                    vpc_endpoint_id: record.vpc_endpoint_id.as_deref().filter(|v| !v.is_empty()),
                    via_aws_service: session.invoked_by
                        || matches!(source, Source::SourceService(_)),
                    event_source,
                    event_name,
                };
                let Some(advice) = judge.would_deny(&call) else {
                    r.records_native_allowed += 1;
                    return;
                };
                r.records_would_deny += 1;
                r.records_cross_account += u64::from(cross_account);
                let key = GroupKey {
                    instance_id: session.instance_id.to_string(),
                    source,
                    event_source: event_source.clone(),
                    event_name: event_name.clone(),
                };
                self.would.add(key, record.event_time, || Some(advice));
            }
        }
    }

    /// Groups held now, both lists.
    fn groups(&self) -> usize {
        self.denied.len() + self.would.len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Locked,
    Native,
}

/// The role session a record belongs to, if it is one the audit looks at.
struct Session<'r> {
    kind: Kind,
    instance_id: &'r str,
    account: &'r str,
    invoked_by: bool,
}

impl<'r> Session<'r> {
    fn of(record: &'r Record) -> Option<Session<'r>> {
        let identity = record.user_identity.as_ref()?;
        if identity.kind.as_deref() != Some("AssumedRole") {
            return None;
        }
        let (account, session_name) = assumed_role_session(identity.arn.as_deref()?)?;
        let marked = identity
            .source_identity
            .as_deref()
            .and_then(|s| s.strip_prefix(CREDLOCK_SOURCE_IDENTITY_PREFIX));
        let (kind, instance_id) = match marked {
            Some(instance) if !instance.is_empty() => (Kind::Locked, instance),
            Some(_) => (Kind::Locked, session_name),
            None if identity.ec2_role_delivery => (Kind::Native, session_name),
            None => return None,
        };
        Some(Session {
            kind,
            instance_id,
            account,
            invoked_by: identity.invoked_by,
        })
    }
}

/// The prefix of credlock's `SourceIdentity` (`refresh::source_identity`).
pub const CREDLOCK_SOURCE_IDENTITY_PREFIX: &str = "credlock-";

/// `arn:<partition>:sts::<account>:assumed-role/<role>/<session>` → (account, session name).
fn assumed_role_session(arn: &str) -> Option<(&str, &str)> {
    crate::identity::AssumedRoleArn::parse(arn).map(|a| (a.account, a.session))
}

/// A call the session policy denied (see the module documentation).
/// The same rule as the tripwire's EventBridge pattern (`ami/monitoring/
/// credlock-tripwire.pattern.json`): an explicit deny by a session policy (the IAM User
/// Guide's own example spells it "a sessions policy": matched as "explicit deny in a
/// session"), under `*AccessDenied*`, `*UnauthorizedOperation` or SNS's `AuthorizationError`;
/// or EC2's `UnauthorizedOperation` whose message names no policy at all (only the encoded
/// authorization message). A message naming another policy type (an SCP, an identity policy)
/// is not the lock's.
fn denied_by_lock(code: Option<&str>, message: Option<&str>) -> bool {
    let Some(code) = code else { return false };
    let message = message.unwrap_or("");
    let family = code.contains("AccessDenied")
        || code.ends_with("UnauthorizedOperation")
        || code == "AuthorizationError";
    if family && contains_ignore_ascii_case(message, "explicit deny in a session") {
        return true;
    }
    code.ends_with("UnauthorizedOperation")
        && !contains_ignore_ascii_case(message, "explicit deny")
        && !contains_ignore_ascii_case(message, "no identity-based policy")
        && !contains_ignore_ascii_case(message, "no session policy")
        && !contains_ignore_ascii_case(message, "because no ")
}

fn contains_ignore_ascii_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

fn source_of(record: &Record) -> Source {
    if let Some(vpce) = record.vpc_endpoint_id.as_deref().filter(|v| !v.is_empty()) {
        return Source::VpcEndpointId(vpce.to_string());
    }
    let text = record.source_ip_address.as_deref().unwrap_or("").trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        Source::SourceIp(ip)
    } else if is_service_name(text) {
        Source::SourceService(text.to_string())
    } else {
        Source::SourceOther(text.to_string())
    }
}

/// An AWS service as CloudTrail names it in `sourceIPAddress`.
fn is_service_name(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower == "aws internal"
        || lower.ends_with(".amazonaws.com")
        || lower.ends_with(".amazonaws.com.cn")
}

/// Event sources whose IAM service prefix is not the host's first label: CloudWatch's event
/// source is `monitoring.amazonaws.com` ("CloudTrail record contents", CloudTrail User Guide)
/// and its actions are `cloudwatch:*`; the Resource Groups Tagging API's is
/// `tagging.amazonaws.com` and its actions are `tag:*` ("Actions, resources, and condition keys
/// for AWS services", Service Authorization Reference). Not exhaustive.
pub const IAM_PREFIX_EXCEPTIONS: &[(&str, &str)] =
    &[("monitoring", "cloudwatch"), ("tagging", "tag")];

/// `<IAM service prefix>:<eventName>`: the prefix is `eventSource` up to its first dot
/// (`s3.amazonaws.com` → `s3`), except [`IAM_PREFIX_EXCEPTIONS`].
pub fn iam_action(event_source: &str, event_name: &str) -> String {
    let host = event_source.split('.').next().unwrap_or(event_source);
    let prefix = IAM_PREFIX_EXCEPTIONS
        .iter()
        .find(|(h, _)| *h == host)
        .map_or(host, |(_, p)| p);
    format!("{prefix}:{event_name}")
}

/// Feeds records to the accumulator.
struct Feed<'a> {
    judge: &'a dyn Judge,
    acc: &'a mut Accumulator,
}

impl Sink for Feed<'_> {
    fn record(&mut self, record: Record) {
        self.acc.add(self.judge, record);
    }
}

/// Reads one stream (gzipped or plain; delivery format, JSON lines or an array of events) into
/// `acc`. A stream that cannot be read to its end is listed in the report's `skipped` under
/// `name`; its records read before the failure stay counted.
pub fn audit_reader(name: &str, reader: impl Read, judge: &dyn Judge, acc: &mut Accumulator) {
    let result = parse::read_stream(
        reader,
        &mut Feed {
            judge,
            acc: &mut *acc,
        },
    );
    match result {
        Ok(()) => acc.report.files_read += 1,
        Err(reason) => acc.skip(name, reason),
    }
}

/// Audits files and directories: each file read as [`audit_reader`] reads a stream,
/// directories walked recursively in name order (see the module documentation).
pub fn audit_paths(paths: &[PathBuf], judge: &dyn Judge, options: &AuditOptions) -> Report {
    walk::audit_paths(paths, judge, options)
}

#[cfg(test)]
#[path = "audit_tests.rs"]
mod tests;
