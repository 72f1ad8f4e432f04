//! credlock's own IAM policy evaluator, for the grammar credlock renders (the session policy and
//! its templates): "would this call pass the lock, and which statement and condition decided?"
//! It is pure (no I/O, no clock) so `credlock explain` and `credlock audit` can run it anywhere.
//!
//! The semantics are IAM's documented ones (IAM User Guide, "Policy evaluation logic"; "IAM JSON
//! policy elements: Condition operators"; "IAM JSON policy elements: Resource"; "Creating a
//! condition with multiple keys or values"):
//! - an explicit `Deny` that applies wins; otherwise an `Allow` that applies allows; otherwise
//!   the request is implicitly denied;
//! - a statement applies when its `Action`/`NotAction`, its `Resource`/`NotResource` and every
//!   condition hold: operators AND together, keys within an operator AND together, and the
//!   values listed for a key OR together (a negated operator holds when the request value
//!   matches none of them);
//! - a key absent from the request: `...IfExists` holds; otherwise the values do not match, so
//!   a positive operator is false and a negated one (`StringNotEquals`, `NotIpAddress`, ...) is
//!   true; `Null` tests presence itself.
//!
//! What it refuses, at parse time and with a message (fail closed: a condition it cannot read
//! must never silently hold or fail): unknown operators, the date and binary operators, policy
//! variables (`${...}` under Version 2012-10-17), malformed values and elements.
//!
//! Choices where the documentation is silent, documented here so `explain` output can be
//! trusted: condition key names match case-insensitively; a plain (non-set) operator on a key
//! with several request values holds, for a positive operator, when any value matches (a
//! negated operator is its negation); `ArnLike` patterns other than `*` need all six ARN
//! components; an unknown resource (`RequestContext::resource == None`) never excludes a
//! statement, and the reasons say so.
//!
//! The tests check it against the independent evaluator iam-rs (a dev-dependency only) on
//! credlock's rendered policies. Where iam-rs 0.8.0 departs from the IAM User Guide this module
//! follows the guide: `ArnEquals` takes wildcards like `ArnLike`; `ArnLike` matches component by
//! component (a `*` does not reach across colons); a Resource `*` ending an ARN segment may
//! reach past colons (`arn:aws:ec2:*`). None of these occurs in credlock's templates.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use parse::{parse_bool, parse_number};

#[path = "evaluate_parse.rs"]
mod parse;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("the policy is not valid JSON: {0}")]
    Json(String),
    #[error("the policy is not valid: {0}")]
    Invalid(String),
    #[error("unknown condition operator {0:?}: refusing to guess what it means")]
    UnknownOperator(String),
    #[error("{0} is not supported by credlock's policy evaluator")]
    Unsupported(String),
}

fn invalid(message: impl Into<String>) -> EvalError {
    EvalError::Invalid(message.into())
}

/// A parsed policy document. `Principal`/`NotPrincipal` are accepted and ignored: session
/// policies have none, and the caller is always the session itself.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyDocument {
    pub version: Option<String>,
    pub statements: Vec<Statement>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub sid: Option<String>,
    pub effect: Effect,
    actions: Patterns,
    resources: Patterns,
    conditions: Vec<Condition>,
}

/// `Action`/`Resource` (`negated == false`) or `NotAction`/`NotResource`.
#[derive(Debug, Clone, PartialEq)]
struct Patterns {
    negated: bool,
    list: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
struct Condition {
    operator: Operator,
    key: String,
    /// The policy values as written (numbers and booleans as their JSON text).
    values: Vec<String>,
    compiled: Compiled,
}

/// The policy values parsed once, so a malformed one is a parse error, not a silent mismatch.
#[derive(Debug, Clone, PartialEq)]
enum Compiled {
    Text,
    Nets(Vec<IpNet>),
    Numbers(Vec<f64>),
    Bools(Vec<bool>),
}

#[derive(Debug, Clone, PartialEq)]
struct Operator {
    name: String,
    kind: Kind,
    negated: bool,
    if_exists: bool,
    set: Option<SetQualifier>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    StringEquals,
    StringEqualsIgnoreCase,
    StringLike,
    Arn,
    Numeric(Cmp),
    Bool,
    Ip,
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetQualifier {
    ForAnyValue,
    ForAllValues,
}

/// The request context: the keys credlock's policies use, and any other by name.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    /// `service:Action`; matched case-insensitively, as IAM matches action names.
    pub action: String,
    /// The resource ARN; `None` (unknown, or `*`) never excludes a statement, and says so.
    pub resource: Option<String>,
    /// `aws:SourceIp`.
    pub source_ip: Option<IpAddr>,
    /// `aws:SourceVpc`.
    pub source_vpc: Option<String>,
    /// `aws:SourceVpce`.
    pub source_vpce: Option<String>,
    /// `aws:ViaAWSService` (`None`: the key is absent).
    pub via_aws_service: Option<bool>,
    /// Any other context key (lower-cased name) and its values; an empty list is absent.
    pub extra: BTreeMap<String, Vec<String>>,
}

impl RequestContext {
    /// The request's values for a condition key (names match case-insensitively); `None` when
    /// the key is absent. The typed fields win over `extra`.
    pub fn values(&self, key: &str) -> Option<Vec<String>> {
        let typed = match key.to_ascii_lowercase().as_str() {
            "aws:sourceip" => self.source_ip.map(|ip| ip.to_string()),
            "aws:sourcevpc" => self.source_vpc.clone(),
            "aws:sourcevpce" => self.source_vpce.clone(),
            "aws:viaawsservice" => self.via_aws_service.map(|b| b.to_string()),
            _ => None,
        };
        if let Some(value) = typed {
            return Some(vec![value]);
        }
        self.extra
            .iter()
            .find(|(name, values)| name.eq_ignore_ascii_case(key) && !values.is_empty())
            .map(|(_, values)| values.clone())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    ExplicitDeny,
    ImplicitDeny,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Decision::Allow => "allow",
            Decision::ExplicitDeny => "explicit deny",
            Decision::ImplicitDeny => "implicit deny",
        })
    }
}

/// A statement by position (0-based, as in the `Statement` array) and `Sid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementRef {
    pub index: usize,
    pub sid: Option<String>,
}

impl fmt::Display for StatementRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.sid {
            Some(sid) => write!(f, "Statement[{}] {sid:?}", self.index),
            None => write!(f, "Statement[{}]", self.index),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    pub decision: Decision,
    /// For `ExplicitDeny` the first Deny statement that applies, for `Allow` the first Allow
    /// statement that applies; `None` for `ImplicitDeny`.
    pub statement: Option<StatementRef>,
    /// Human-readable reasons, used verbatim by `explain`: the deciding statement's action,
    /// resource and each condition (operator, key, what was compared, result), then why each
    /// statement that could have changed the answer did not apply.
    pub reasons: Vec<String>,
}

impl Evaluation {
    pub fn allowed(&self) -> bool {
        self.decision == Decision::Allow
    }
}

/// Evaluates one policy against one request ("Policy evaluation logic": an explicit deny
/// overrides an allow; without an allow the request is implicitly denied).
pub fn evaluate(policy: &PolicyDocument, request: &RequestContext) -> Evaluation {
    let assessed: Vec<Assessment> = policy
        .statements
        .iter()
        .map(|s| assess(s, request))
        .collect();
    let first = |effect: Effect| {
        policy
            .statements
            .iter()
            .zip(&assessed)
            .position(|(s, a)| s.effect == effect && a.applies)
    };
    let (decision, decider, bystanders) = if let Some(i) = first(Effect::Deny) {
        (Decision::ExplicitDeny, Some(i), None)
    } else if let Some(i) = first(Effect::Allow) {
        (Decision::Allow, Some(i), Some(Effect::Deny))
    } else {
        (Decision::ImplicitDeny, None, Some(Effect::Allow))
    };
    let statement = decider.map(|i| statement_ref(policy, i));
    let mut reasons = Vec::new();
    if let (Some(i), Some(r)) = (decider, &statement) {
        let effect = if decision == Decision::ExplicitDeny {
            Effect::Deny
        } else {
            Effect::Allow
        };
        reasons.push(format!("{r} ({effect:?}) applies"));
        reasons.extend(
            assessed
                .get(i)
                .into_iter()
                .flat_map(|a| a.reasons.iter().cloned()),
        );
    } else {
        reasons.push("no statement allows the request (implicit deny)".to_string());
    }
    if let Some(effect) = bystanders {
        reasons.extend(not_applying(policy, &assessed, effect));
    }
    Evaluation {
        decision,
        statement,
        reasons,
    }
}

fn statement_ref(policy: &PolicyDocument, index: usize) -> StatementRef {
    StatementRef {
        index,
        sid: policy.statements.get(index).and_then(|s| s.sid.clone()),
    }
}

/// One line per statement of `effect` that did not apply, with the check that failed.
fn not_applying(policy: &PolicyDocument, assessed: &[Assessment], effect: Effect) -> Vec<String> {
    policy
        .statements
        .iter()
        .zip(assessed)
        .enumerate()
        .filter(|(_, (s, a))| s.effect == effect && !a.applies)
        .map(|(i, (_, a))| {
            let why = a.reasons.last().map(String::as_str).unwrap_or("");
            format!(
                "{} ({effect:?}) does not apply: {why}",
                statement_ref(policy, i)
            )
        })
        .collect()
}

struct Assessment {
    applies: bool,
    /// One line per check made, in order; when `applies` is false the last one failed.
    reasons: Vec<String>,
}

fn assess(statement: &Statement, request: &RequestContext) -> Assessment {
    let mut reasons = Vec::new();
    let action = request.action.to_lowercase();
    let (ok, why) = element(&statement.actions, "Action", &request.action, |p| {
        wildcard(&p.to_lowercase(), &action, Mode::Plain)
    });
    reasons.push(why);
    if !ok {
        return Assessment {
            applies: false,
            reasons,
        };
    }
    let (ok, why) = match &request.resource {
        Some(arn) => element(&statement.resources, "Resource", arn, |p| {
            wildcard(p, arn, Mode::ArnResource)
        }),
        None => (
            true,
            format!(
                "{}: the resource is unknown; assumed covered (an unknown resource never excludes a statement)",
                element_name(&statement.resources, "Resource")
            ),
        ),
    };
    reasons.push(why);
    if !ok {
        return Assessment {
            applies: false,
            reasons,
        };
    }
    for condition in &statement.conditions {
        let (holds, why) = evaluate_condition(condition, request);
        reasons.push(why);
        if !holds {
            return Assessment {
                applies: false,
                reasons,
            };
        }
    }
    Assessment {
        applies: true,
        reasons,
    }
}

fn element_name(patterns: &Patterns, name: &str) -> String {
    if patterns.negated {
        format!("Not{name}")
    } else {
        name.to_string()
    }
}

/// Whether an `Action`/`NotAction` or `Resource`/`NotResource` element covers `value`.
fn element(
    patterns: &Patterns,
    name: &str,
    value: &str,
    matches: impl Fn(&str) -> bool,
) -> (bool, String) {
    let name = element_name(patterns, name);
    let hit = patterns.list.iter().find(|p| matches(p));
    match (hit, patterns.negated) {
        (Some(p), false) => (true, format!("{name}: {value} matches {p:?}")),
        (Some(p), true) => (
            false,
            format!("{name}: {value} matches {p:?}, so the statement does not apply"),
        ),
        (None, false) => (
            false,
            format!("{name}: {value} matches none of {}", listed(&patterns.list)),
        ),
        (None, true) => (
            true,
            format!(
                "{name}: {value} matches none of {}, so the statement applies",
                listed(&patterns.list)
            ),
        ),
    }
}

fn listed(values: &[String]) -> String {
    format!("[{}]", values.join(", "))
}

/// One operator and key against the request ("IAM JSON policy elements: Condition
/// operators"), with the sentence `explain` shows.
fn evaluate_condition(c: &Condition, request: &RequestContext) -> (bool, String) {
    let op = &c.operator;
    let head = format!("{} {}", op.name, c.key);
    let present = request.values(&c.key);
    if op.kind == Kind::Null {
        let absent = present.is_none();
        let holds = matches!(&c.compiled, Compiled::Bools(b) if b.contains(&absent));
        let state = if absent { "absent" } else { "present" };
        return (
            holds,
            format!(
                "{head}: key {state}, expected null = {} -> {holds}",
                listed(&c.values)
            ),
        );
    }
    let Some(values) = present else {
        let (holds, why) = absent_rule(op);
        return (holds, format!("{head}: key absent -> {holds} ({why})"));
    };
    let hits: Vec<bool> = values.iter().map(|v| matches_any(c, v)).collect();
    let (holds, detail) = match op.set {
        None => {
            let pos = hits.contains(&true);
            let shown = match values.as_slice() {
                [one] => one.clone(),
                _ => listed(&values),
            };
            (
                pos != op.negated,
                format!("{shown} {} {}", relation(op.kind, pos), listed(&c.values)),
            )
        }
        Some(set) => {
            let satisfied = hits.iter().filter(|&&h| h != op.negated).count();
            let holds = match set {
                SetQualifier::ForAnyValue => satisfied > 0,
                SetQualifier::ForAllValues => satisfied == values.len(),
            };
            (
                holds,
                format!(
                    "{satisfied} of the request values {} satisfy it against {}",
                    listed(&values),
                    listed(&c.values)
                ),
            )
        }
    };
    (holds, format!("{head}: {detail} -> {holds}"))
}

/// The result for a key the request lacks, and the documented rule behind it.
fn absent_rule(op: &Operator) -> (bool, &'static str) {
    if op.if_exists {
        (true, "IfExists: a missing key satisfies the condition")
    } else if op.set == Some(SetQualifier::ForAllValues) {
        (true, "ForAllValues over no request values")
    } else if op.set == Some(SetQualifier::ForAnyValue) {
        (false, "ForAnyValue over no request values")
    } else if op.negated {
        (true, "a negated operator holds when the key is absent")
    } else {
        (false, "an absent key matches no value")
    }
}

/// What was found, in words, for a positive (`pos`) or failed comparison.
fn relation(kind: Kind, pos: bool) -> &'static str {
    match (kind, pos) {
        (Kind::Ip, true) => "is in",
        (Kind::Ip, false) => "is not in",
        (Kind::StringLike | Kind::Arn, true) => "matches one of",
        (Kind::StringLike | Kind::Arn, false) => "matches none of",
        (Kind::StringEqualsIgnoreCase, true) => "equals (ignoring case) one of",
        (Kind::StringEqualsIgnoreCase, false) => "equals (ignoring case) none of",
        (Kind::Numeric(Cmp::Lt), true) => "is less than one of",
        (Kind::Numeric(Cmp::Lt), false) => "is less than none of",
        (Kind::Numeric(Cmp::Le), true) => "is at most one of",
        (Kind::Numeric(Cmp::Le), false) => "is at most none of",
        (Kind::Numeric(Cmp::Gt), true) => "is greater than one of",
        (Kind::Numeric(Cmp::Gt), false) => "is greater than none of",
        (Kind::Numeric(Cmp::Ge), true) => "is at least one of",
        (Kind::Numeric(Cmp::Ge), false) => "is at least none of",
        (_, true) => "equals one of",
        (_, false) => "equals none of",
    }
}

/// Whether one request value matches any of the condition's policy values (the positive
/// comparison; negation is applied by the caller).
fn matches_any(c: &Condition, value: &str) -> bool {
    match (&c.compiled, c.operator.kind) {
        (Compiled::Nets(nets), _) => value
            .parse::<IpAddr>()
            .is_ok_and(|ip| nets.iter().any(|n| n.contains(&ip))),
        (Compiled::Numbers(numbers), Kind::Numeric(cmp)) => {
            parse_number(value).is_some_and(|v| numbers.iter().any(|&n| compare(cmp, v, n)))
        }
        (Compiled::Bools(bools), _) => parse_bool(value).is_some_and(|b| bools.contains(&b)),
        (Compiled::Text, kind) => c.values.iter().any(|p| text_matches(kind, p, value)),
        _ => false,
    }
}

fn compare(cmp: Cmp, value: f64, policy: f64) -> bool {
    match cmp {
        Cmp::Eq => value == policy,
        Cmp::Lt => value < policy,
        Cmp::Le => value <= policy,
        Cmp::Gt => value > policy,
        Cmp::Ge => value >= policy,
    }
}

fn text_matches(kind: Kind, pattern: &str, value: &str) -> bool {
    match kind {
        Kind::StringEquals => value == pattern,
        Kind::StringEqualsIgnoreCase => value.to_lowercase() == pattern.to_lowercase(),
        Kind::StringLike => wildcard(pattern, value, Mode::Plain),
        Kind::Arn => arn_like(pattern, value),
        _ => false,
    }
}

/// `ArnLike`/`ArnEquals`: each of the six colon-delimited components matched separately, so a
/// `*` does not reach across a colon (the last component holds the rest of the ARN).
fn arn_like(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let p: Vec<&str> = pattern.splitn(6, ':').collect();
    let v: Vec<&str> = value.splitn(6, ':').collect();
    p.len() == 6 && v.len() == 6 && p.iter().zip(&v).all(|(p, v)| wildcard(p, v, Mode::Plain))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `*` matches any run of characters, `?` any one.
    Plain,
    /// Resource ARNs ("IAM JSON policy elements: Resource"): wildcards stay within a
    /// colon-separated segment, except a `*` that ends its segment, which may reach past
    /// colons.
    ArnResource,
}

/// Case-sensitive wildcard matching in O(pattern × text) time, without recursion.
fn wildcard(pattern: &str, text: &str, mode: Mode) -> bool {
    if !pattern.contains(['*', '?']) {
        return pattern == text;
    }
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let segmented = mode == Mode::ArnResource;
    // row[j]: the pattern so far matches the first j characters of the text.
    let mut row = vec![false; text.len() + 1];
    row[0] = true;
    for (i, &p) in pattern.iter().enumerate() {
        let mut next = vec![false; text.len() + 1];
        let crosses = !segmented || matches!(pattern.get(i + 1), None | Some(':'));
        if p == '*' {
            next[0] = row[0];
        }
        for (j, &t) in text.iter().enumerate() {
            next[j + 1] = match p {
                '*' => row[j + 1] || (next[j] && (crosses || t != ':')),
                '?' => row[j] && (!segmented || t != ':'),
                c => row[j] && t == c,
            };
        }
        row = next;
    }
    row[text.len()]
}

#[cfg(test)]
#[path = "evaluate_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "evaluate_matrix_tests.rs"]
mod matrix_tests;
