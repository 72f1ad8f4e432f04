//! Fail-closed judgement of a container credential endpoint's answer (the ECS agent's): what
//! may reach a client, decided by the answer's content and never by the request's path.
//!
//! The agent is trusted to decide who gets which task's credentials, not to answer in the
//! documented shape. So:
//! - a **credential document** is served only rewritten, and only when it is the documented
//!   shape, strictly: one flat JSON object whose values are all strings, no key twice,
//!   `AccessKeyId`, `SecretAccessKey`, `Token` and `Expiration` present, no other key that
//!   names a secret, and no other value that holds a raw value or looks like a credential;
//! - **any other answer** passes only when nothing in it (body, as bytes and as every decoded
//!   JSON string, duplicates included; header values) holds a raw value credlock has seen, a
//!   key that names a secret, or a string that looks like an AWS credential; a 200 must be JSON
//!   (the agent's 200s are), any body must be UTF-8 text;
//! - a **partial or encoded** answer (206, `Content-Range`, a `Content-Encoding` other than
//!   identity) is refused: its bytes cannot be checked as the client will read them.

use std::borrow::Cow;

use http::HeaderMap;
use serde::de::{Deserializer, MapAccess, Visitor};

use crate::credentials::{AnswerRefusal, Secret};

/// Key names that hold a secret in a credential document (compared without case).
const SECRET_KEYS: [&str; 6] = [
    "accesskeyid",
    "secretaccesskey",
    "token",
    "sessiontoken",
    "secretkey",
    "credentials",
];
/// The keys the rewrite replaces (exactly these spellings).
const REPLACED: [&str; 4] = ["AccessKeyId", "SecretAccessKey", "Token", "Expiration"];

/// A container credential endpoint's credential document: the task's own credentials, which
/// credlock locks and never serves.
pub struct RawDocument {
    /// `RoleArn` (the ECS agent's answers carry it).
    pub role_arn: Option<String>,
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub token: Secret,
}

impl RawDocument {
    pub fn raw_values(&self) -> [Secret; 3] {
        [
            Secret::new(self.access_key_id.clone()),
            self.secret_access_key.clone(),
            self.token.clone(),
        ]
    }
}

impl std::fmt::Debug for RawDocument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawDocument")
            .field("role_arn", &self.role_arn)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub enum Verdict {
    /// Lock it, rewrite it, and check the result with [`servable`].
    Document(RawDocument),
    /// The agent's own answer, with nothing secret in it: passed unchanged.
    Pass,
    Refuse(AnswerRefusal),
}

pub fn judge(status: u16, headers: &HeaderMap, body: &[u8], known: &[Secret]) -> Verdict {
    let known: Vec<&str> = known
        .iter()
        .map(|s| s.expose())
        .filter(|s| !s.is_empty())
        .collect();
    if status == 206
        || headers.contains_key(http::header::CONTENT_RANGE)
        || headers
            .get_all(http::header::CONTENT_ENCODING)
            .iter()
            .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return Verdict::Refuse(AnswerRefusal::Status);
    }
    if headers
        .values()
        .any(|v| suspicious(&String::from_utf8_lossy(v.as_bytes()), &known))
    {
        return Verdict::Refuse(AnswerRefusal::RawSecret);
    }
    // UTF-8 text only: UTF-16, a byte-order mark or control bytes would hide a value from
    // every check below (and some JSON readers accept them).
    let Ok(text) = std::str::from_utf8(body) else {
        return Verdict::Refuse(AnswerRefusal::Shape);
    };
    if text.starts_with('\u{feff}')
        || text
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\t' | '\r' | '\n'))
    {
        return Verdict::Refuse(AnswerRefusal::Shape);
    }
    if status == 200
        && let Some(fields) = flat_fields(text)
        && REPLACED
            .iter()
            .all(|k| fields.iter().any(|(key, _)| key == k))
    {
        return document(fields, &known);
    }
    // Not a document: every decoded string, duplicates included, and the raw text.
    let Some(strings) = json_strings(text) else {
        return Verdict::Refuse(AnswerRefusal::Shape);
    };
    if status == 200 && serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() {
        return Verdict::Refuse(AnswerRefusal::Shape);
    }
    if strings
        .iter()
        .any(|s| is_secret_key(s) || suspicious(s, &known))
        || suspicious(text, &known)
    {
        return Verdict::Refuse(AnswerRefusal::RawSecret);
    }
    Verdict::Pass
}

/// The strict document check (module doc).
fn document(fields: Vec<(String, String)>, known: &[&str]) -> Verdict {
    let mut seen: Vec<&str> = Vec::with_capacity(fields.len());
    for (key, _) in &fields {
        if seen.contains(&key.as_str()) {
            return Verdict::Refuse(AnswerRefusal::Shape);
        }
        seen.push(key);
    }
    let get = |k: &str| {
        fields
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let (Some(id), Some(secret), Some(token)) =
        (get("AccessKeyId"), get("SecretAccessKey"), get("Token"))
    else {
        return Verdict::Refuse(AnswerRefusal::Shape);
    };
    if id.is_empty() || secret.is_empty() || token.is_empty() {
        return Verdict::Refuse(AnswerRefusal::Shape);
    }
    let mut raw: Vec<&str> = known.to_vec();
    raw.extend([id, secret, token]);
    for (key, value) in &fields {
        if REPLACED.contains(&key.as_str()) {
            continue;
        }
        if is_secret_key(key) || suspicious(key, &raw) || suspicious(value, &raw) {
            return Verdict::Refuse(AnswerRefusal::RawSecret);
        }
    }
    Verdict::Document(RawDocument {
        role_arn: get("RoleArn").map(str::to_string),
        access_key_id: id.to_string(),
        secret_access_key: Secret::new(secret),
        token: Secret::new(token),
    })
}

/// Whether a rewritten document may be served: valid JSON, and none of `raw` in its bytes or
/// in any decoded string (duplicates included).
pub fn servable(out: &[u8], raw: &[Secret]) -> bool {
    let Ok(text) = std::str::from_utf8(out) else {
        return false;
    };
    let raw: Vec<&str> = raw
        .iter()
        .map(|s| s.expose())
        .filter(|s| !s.is_empty())
        .collect();
    serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
        && json_strings(text)
            .is_some_and(|strings| !strings.iter().any(|s| raw.iter().any(|r| s.contains(r))))
        && !raw.iter().any(|r| text.contains(r))
}

fn is_secret_key(s: &str) -> bool {
    SECRET_KEYS.iter().any(|k| s.eq_ignore_ascii_case(k))
}

/// A known raw value, or something shaped like an AWS credential: an access key id
/// (`AKIA`/`ASIA` and 16 more), or a run of 40 or more characters of base64 (`=` excluded: it
/// would join a query's `s=` to the value) with both cases, which every secret access key (40)
/// and session token is. Hex digests, UUIDs and ARNs (the agent's metadata) are not.
pub fn suspicious(s: &str, known: &[&str]) -> bool {
    if known.iter().any(|k| s.contains(k)) {
        return true;
    }
    let bytes = s.as_bytes();
    // Key ids.
    if bytes.windows(20).any(|w| {
        (w.starts_with(b"AKIA") || w.starts_with(b"ASIA"))
            && w[4..]
                .iter()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    }) {
        return true;
    }
    // Runs of base64.
    let b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'/' || b == b'+';
    let mut start = 0;
    while start < bytes.len() {
        if !b64(bytes[start]) {
            start += 1;
            continue;
        }
        let mut end = start;
        while end < bytes.len() && b64(bytes[end]) {
            end += 1;
        }
        let run = &bytes[start..end];
        let mixed =
            run.iter().any(u8::is_ascii_uppercase) && run.iter().any(u8::is_ascii_lowercase);
        if mixed && run.len() >= 40 {
            return true;
        }
        start = end;
    }
    false
}

/// The top-level fields of a flat JSON object of strings, duplicates kept, values decoded;
/// `None` for anything else.
fn flat_fields(text: &str) -> Option<Vec<(String, String)>> {
    struct Flat;
    impl<'de> Visitor<'de> for Flat {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a flat object of strings")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some((k, v)) = map.next_entry::<Cow<'de, str>, Cow<'de, str>>()? {
                out.push((k.into_owned(), v.into_owned()));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let fields = de.deserialize_map(Flat).ok()?;
    de.end().ok()?;
    Some(fields)
}

/// Every JSON string literal in `text`, decoded (keys and values, duplicates and all, wherever
/// they are); `None` when a literal is malformed. Text outside literals is not checked here:
/// it is matched as is.
pub fn json_strings(text: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut s = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    '"' => s.push('"'),
                    '\\' => s.push('\\'),
                    '/' => s.push('/'),
                    'b' => s.push('\u{8}'),
                    'f' => s.push('\u{c}'),
                    'n' => s.push('\n'),
                    'r' => s.push('\r'),
                    't' => s.push('\t'),
                    'u' => {
                        let hex: String = (0..4).map(|_| chars.next()).collect::<Option<_>>()?;
                        let unit = u16::from_str_radix(&hex, 16).ok()?;
                        // A lone surrogate decodes to U+FFFD: it hides nothing ASCII.
                        s.push(char::from_u32(u32::from(unit)).unwrap_or('\u{fffd}'));
                    }
                    _ => return None,
                },
                other => s.push(other),
            }
        }
        out.push(s);
    }
    Some(out)
}

#[cfg(test)]
#[path = "container_judge_tests.rs"]
mod tests;
