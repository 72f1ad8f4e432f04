//! Locked credentials: the set credlock serves, the store it lives in, and the rewrite of an
//! IMDS credential body (Amazon EC2 User Guide, "Retrieve security credentials from instance
//! metadata": replace only the values of
//! `AccessKeyId`, `SecretAccessKey`, `Token`, `Expiration`, `LastUpdated` in a
//! `"Code" : "Success"` body, keep the format and every other field).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// A secret string: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(** redacted **)")
    }
}

/// A credential set from `sts:AssumeRole`, with the JSON string literals it is served as
/// rendered once, so the request path only splices bytes.
#[derive(Clone)]
pub struct LockedCredentials {
    pub access_key_id: String,
    pub expiration: SystemTime,
    pub issued: SystemTime,
    secret_access_key: Secret,
    token: Secret,
    /// JSON string literals (quoted, escaped) in field order of [`FIELDS`].
    literals: [String; 5],
}

/// The fields replaced in an IMDS credential body.
pub const FIELDS: [&str; 5] = [
    "AccessKeyId",
    "SecretAccessKey",
    "Token",
    "Expiration",
    "LastUpdated",
];

impl LockedCredentials {
    pub fn new(
        access_key_id: String,
        secret_access_key: Secret,
        token: Secret,
        expiration: SystemTime,
        issued: SystemTime,
    ) -> Self {
        let lit = |s: &str| serde_json::to_string(s).expect("a string serialises");
        let literals = [
            lit(&access_key_id),
            lit(secret_access_key.expose()),
            lit(token.expose()),
            lit(&imds_timestamp(expiration)),
            lit(&imds_timestamp(issued)),
        ];
        LockedCredentials {
            access_key_id,
            expiration,
            issued,
            secret_access_key,
            token,
            literals,
        }
    }

    pub fn secret_access_key(&self) -> &Secret {
        &self.secret_access_key
    }

    pub fn token(&self) -> &Secret {
        &self.token
    }

    /// Time left at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expiration
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }
}

impl std::fmt::Debug for LockedCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockedCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &imds_timestamp(self.expiration))
            .field("secret_access_key", &self.secret_access_key)
            .field("token", &self.token)
            .finish()
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ`, the only form botocore parses (§1.7).
pub fn imds_timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Where the current locked set lives. Readers are on every credential request and must never
/// wait for the refresher, hence `ArcSwap` rather than a lock.
#[derive(Default)]
pub struct CredentialStore {
    current: ArcSwapOption<LockedCredentials>,
}

impl CredentialStore {
    pub fn store(&self, creds: LockedCredentials) {
        self.current.store(Some(Arc::new(creds)));
    }

    /// Forgets the set (the role changed: the old set must not be served).
    pub fn clear(&self) {
        self.current.store(None);
    }

    /// The set held, whatever its age (for status and metrics).
    pub fn peek(&self) -> Option<Arc<LockedCredentials>> {
        self.current.load_full()
    }

    /// The set to serve at `now`: only with more than `margin` left. Fail closed otherwise.
    pub fn servable(&self, now: SystemTime, margin: Duration) -> Option<Arc<LockedCredentials>> {
        self.current
            .load_full()
            .filter(|c| c.remaining(now) > margin)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    #[error("the upstream credential body is not a JSON object")]
    NotJson,
    #[error("the upstream credential body lacks {0}, or it is not a string")]
    MissingField(&'static str),
}

/// Rewrites an upstream credential body. `Ok(None)`: not a success body (e.g. IMDS's 200
/// `AssumeRoleUnauthorizedAccess` error document), pass it unchanged: it holds no secret.
/// `Err`: a success body credlock cannot rewrite safely; the caller fails closed.
pub fn rewrite(body: &[u8], locked: &LockedCredentials) -> Result<Option<Vec<u8>>, RewriteError> {
    let text = std::str::from_utf8(body).map_err(|_| RewriteError::NotJson)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let fields = de
        .deserialize_map(FieldsVisitor)
        .map_err(|_| RewriteError::NotJson)?;
    de.end().map_err(|_| RewriteError::NotJson)?;

    // Exactly "Success", as IMDS documents it: "Success " or "success" is not the success
    // shape, and [`judge`] refuses such a body if it carries anything secret.
    let success = fields.iter().any(|(k, v)| {
        k == "Code"
            && serde_json::Deserializer::from_str(v.get())
                .deserialize_str(StrVisitor)
                .is_ok_and(|c| c == "Success")
    });
    if !success {
        return Ok(None);
    }
    splice(text, &fields, locked).map(Some)
}

/// Replaces `AccessKeyId`, `SecretAccessKey`, `Token`, `Expiration` (all required) and
/// `LastUpdated` (when present) of a credential document with the locked set's, keeping every
/// other byte: the shape of IMDS's answer and of the container credential endpoints' (ECS
/// agent, EKS Pod Identity agent), which have no `Code`. `Err`: the caller fails closed.
pub fn rewrite_document(body: &[u8], locked: &LockedCredentials) -> Result<Vec<u8>, RewriteError> {
    let text = std::str::from_utf8(body).map_err(|_| RewriteError::NotJson)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let fields = de
        .deserialize_map(FieldsVisitor)
        .map_err(|_| RewriteError::NotJson)?;
    de.end().map_err(|_| RewriteError::NotJson)?;
    splice(text, &fields, locked)
}

fn splice(
    text: &str,
    fields: &[(Cow<'_, str>, &RawValue)],
    locked: &LockedCredentials,
) -> Result<Vec<u8>, RewriteError> {
    let body = text.as_bytes();
    // Every occurrence of a replaced key is replaced, duplicates included: a duplicate key
    // must not smuggle the upstream's secret past the rewrite.
    let mut spans: Vec<(usize, usize, usize)> = Vec::with_capacity(5);
    for (key, value) in fields {
        if let Some(i) = FIELDS.iter().position(|f| key == f) {
            let start = value.get().as_ptr() as usize - text.as_ptr() as usize;
            spans.push((start, start + value.get().len(), i));
        }
    }
    for (i, field) in FIELDS.iter().enumerate().take(4) {
        if !spans.iter().any(|s| s.2 == i) {
            return Err(RewriteError::MissingField(field));
        }
    }
    // Every replaced value must be a string where IMDS documents one: a number, object or
    // array in its place is not the documented shape.
    for &(start, _, i) in &spans {
        if body[start] != b'"' {
            return Err(RewriteError::MissingField(FIELDS[i]));
        }
    }
    spans.sort_unstable();
    let mut out = Vec::with_capacity(body.len() + locked.literals[2].len());
    let mut at = 0;
    for (start, end, i) in spans {
        out.extend_from_slice(&body[at..start]);
        out.extend_from_slice(locked.literals[i].as_bytes());
        at = end;
    }
    out.extend_from_slice(&body[at..]);
    Ok(out)
}

/// Why a credential-route answer from the upstream is not served (the `reason` label of
/// `credlock_credential_answers_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerRefusal {
    /// A status IMDS does not document for credentials (203, 206, 3xx, ...).
    Status,
    /// A 200 that is neither the documented success shape nor a secret-free error document.
    Shape,
    /// One of the upstream's raw secret values would have reached the client.
    RawSecret,
}

impl AnswerRefusal {
    pub const ALL: [AnswerRefusal; 3] = [Self::Status, Self::Shape, Self::RawSecret];

    pub fn label(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Shape => "shape",
            Self::RawSecret => "raw_secret",
        }
    }
}

/// What to do with an upstream answer on a credential route.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The documented success shape, its secrets replaced by the locked set's.
    Locked(Vec<u8>),
    /// One of IMDS's documented error answers, with no secret in it: pass it unchanged.
    PassError,
    /// Answer 502 instead.
    Refuse(AnswerRefusal),
}

/// Error statuses IMDS documents for metadata requests ("Instance metadata service error
/// codes" in the EC2 User Guide: 400, 401, 403, 404, 405, 429, 500, 503 and the gateway
/// answers a proxy in between may give). Only these are passed through on a credential
/// route, and only with a body that carries no secret.
const DOCUMENTED_ERRORS: [u16; 10] = [400, 401, 403, 404, 405, 429, 500, 502, 503, 504];

/// Key names that hold a secret in any credential document AWS serves (IMDS, the container
/// credential endpoints, STS), compared without case: a secret under one of these names, at
/// any depth, is never passed through.
const SECRET_KEYS: [&str; 5] = [
    "accesskeyid",
    "secretaccesskey",
    "token",
    "sessiontoken",
    "secretkey",
];

/// Fail-closed judgement of an upstream answer on a credential route (issue 14, finding 6):
///  - a 200 whose `Code` is exactly `"Success"` with every documented key a string is
///    rewritten; any other 200 passes only if it is a JSON object with no secret in it (IMDS's
///    `AssumeRoleUnauthorizedAccess` document), else it is refused;
///  - a documented error status passes only without a secret in its body;
///  - any other status is refused.
///
/// Whatever is about to be served is then checked for every raw secret value: those found
/// in the upstream's body (under any secret key, at any depth, any case) and `known`, the
/// values credlock read itself from the instance role (which also covers a body that cannot
/// be parsed). One found anywhere, byte for byte or in a decoded JSON string: refused.
pub fn judge(status: u16, body: &[u8], locked: &LockedCredentials, known: &[Secret]) -> Verdict {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let mut raw: Vec<String> = Vec::new();
    if let Some(v) = &parsed {
        collect_secret_values(v, &mut raw);
    }
    raw.extend(known.iter().map(|s| s.expose().to_string()));
    raw.retain(|r| !r.is_empty());
    let out = if status == 200 {
        match rewrite(body, locked) {
            Ok(Some(out)) => out,
            Err(_) => return Verdict::Refuse(AnswerRefusal::Shape),
            Ok(None) => {
                // Not a success: only a JSON object with a string Code and no secret key.
                let error_doc = parsed.as_ref().is_some_and(|v| {
                    v.get("Code").is_some_and(serde_json::Value::is_string) && !has_secret_key(v)
                });
                if !error_doc {
                    return Verdict::Refuse(AnswerRefusal::Shape);
                }
                if leaks(body, parsed.as_ref(), &raw) {
                    return Verdict::Refuse(AnswerRefusal::RawSecret);
                }
                return Verdict::PassError;
            }
        }
    } else if DOCUMENTED_ERRORS.contains(&status) {
        if parsed.as_ref().is_some_and(has_secret_key) || leaks(body, parsed.as_ref(), &raw) {
            return Verdict::Refuse(AnswerRefusal::RawSecret);
        }
        return Verdict::PassError;
    } else {
        return Verdict::Refuse(AnswerRefusal::Status);
    };
    let reparsed: Option<serde_json::Value> = serde_json::from_slice(&out).ok();
    if reparsed.is_none() || leaks(&out, reparsed.as_ref(), &raw) {
        return Verdict::Refuse(AnswerRefusal::RawSecret);
    }
    Verdict::Locked(out)
}

/// Whether `body` holds any of `raw`: byte for byte, or inside a decoded JSON string (a key or
/// a value, escapes resolved) when it parsed.
fn leaks(body: &[u8], parsed: Option<&serde_json::Value>, raw: &[String]) -> bool {
    let parsed_here;
    let parsed = match parsed {
        Some(v) => Some(v),
        None => {
            parsed_here = serde_json::from_slice::<serde_json::Value>(body).ok();
            parsed_here.as_ref()
        }
    };
    raw.iter().any(|r| {
        contains(body, r.as_bytes())
            || parsed.is_some_and(|v| any_string(v, &|s| s.contains(r.as_str())))
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn any_string(v: &serde_json::Value, f: &dyn Fn(&str) -> bool) -> bool {
    match v {
        serde_json::Value::String(s) => f(s),
        serde_json::Value::Array(a) => a.iter().any(|x| any_string(x, f)),
        serde_json::Value::Object(o) => o.iter().any(|(k, x)| f(k) || any_string(x, f)),
        _ => false,
    }
}

fn is_secret_key(k: &str) -> bool {
    SECRET_KEYS.iter().any(|s| k.eq_ignore_ascii_case(s))
}

fn has_secret_key(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Array(a) => a.iter().any(has_secret_key),
        serde_json::Value::Object(o) => {
            o.iter().any(|(k, x)| is_secret_key(k) || has_secret_key(x))
        }
        _ => false,
    }
}

/// The string values under secret keys, at any depth (a secret nested in an object or an
/// array under such a key counts too).
fn collect_secret_values(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_secret_values(x, out)),
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                if is_secret_key(k) {
                    all_strings(x, out);
                } else {
                    collect_secret_values(x, out);
                }
            }
        }
        _ => {}
    }
}

fn all_strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| all_strings(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| all_strings(x, out)),
        _ => {}
    }
}

/// The raw values credlock itself read from the instance role's credentials (the current and
/// the previous set: IMDS rotates them), so that an answer it cannot parse is still checked
/// against them. Never logged or shown.
#[derive(Default)]
pub struct KnownRaw {
    sets: arc_swap::ArcSwap<Vec<Secret>>,
}

impl KnownRaw {
    /// Remembers one set's access key id, secret key and token (keeping the previous set).
    pub fn remember(&self, access_key_id: &str, secret: &Secret, token: &Secret) {
        let current = self.sets.load();
        if current.iter().any(|s| s.expose() == secret.expose()) {
            return;
        }
        let mut next: Vec<Secret> = vec![Secret::new(access_key_id), secret.clone(), token.clone()];
        next.extend(current.iter().take(3).cloned());
        self.sets.store(Arc::new(next));
    }

    pub fn load(&self) -> Arc<Vec<Secret>> {
        self.sets.load_full()
    }
}

/// Collects the top-level `(key, raw value)` pairs of an object, keeping duplicates and the
/// raw values' positions in the input.
struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Vec<(Cow<'de, str>, &'de RawValue)>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Vec::with_capacity(8);
        while let Some(key) = map.next_key_seed(StrVisitor)? {
            let value: &'de RawValue = map.next_value()?;
            fields.push((key, value));
        }
        Ok(fields)
    }
}

/// A JSON string, borrowed from the input unless it holds escapes. (serde's own `Cow<str>`
/// always allocates: it is deserialized as a `String`.)
struct StrVisitor;

impl<'de> DeserializeSeed<'de> for StrVisitor {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for StrVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON string")
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(s))
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s.to_owned()))
    }
}

#[cfg(test)]
#[path = "credentials_tests.rs"]
mod tests;
