//! Locked credentials: the set credlock serves, the store it lives in, and the rewrite of an
//! IMDS credential body (`reference/aws-imds-sts-iam.md` §1.7: replace only the values of
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
    #[error("the upstream credential body lacks {0}")]
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

    let success = fields.iter().any(|(k, v)| {
        k == "Code"
            && serde_json::Deserializer::from_str(v.get())
                .deserialize_str(StrVisitor)
                .is_ok_and(|c| c.eq_ignore_ascii_case("success"))
    });
    if !success {
        return Ok(None);
    }
    // Every occurrence of a replaced key is replaced, duplicates included: a duplicate key
    // must not smuggle the upstream's secret past the rewrite.
    let mut spans: Vec<(usize, usize, usize)> = Vec::with_capacity(5);
    for (key, value) in &fields {
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
    spans.sort_unstable();
    let mut out = Vec::with_capacity(body.len() + locked.literals[2].len());
    let mut at = 0;
    for (start, end, i) in spans {
        out.extend_from_slice(&body[at..start]);
        out.extend_from_slice(locked.literals[i].as_bytes());
        at = end;
    }
    out.extend_from_slice(&body[at..]);
    Ok(Some(out))
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
