//! The environment document: what a boot provider answers, what `credlock publish-environment`
//! writes to S3 and what the `s3` source reads.
//!
//! ```json
//! {
//!   "ipv4": ["203.0.113.10/32"], "ipv6": [], "vpcs": ["vpc-0abc..."], "vpc_endpoints": [],
//!   "format": "credlock-environment/1",
//!   "generated_at": "2026-12-01T22:00:00Z",
//!   "generated_by": "arn:aws:sts::111122223333:assumed-role/publisher/host",
//!   "checksum": "sha256:9f86d0..."
//! }
//! ```
//!
//! The first four fields are the content (the schema of `[discovery.static]`). The other four
//! are metadata, optional for every reader: a boot provider that sends none is still valid.
//! Any other field is refused, so a typo never passes as an empty list.
//!
//! The checksum covers the content only, as the reader normalises it ([`content_json`]): the
//! four lists, each sorted and deduplicated, addresses as canonical prefixes (`203.0.113.10/32`),
//! compact JSON in this field order. Two documents with the same content have the same checksum
//! whenever and by whomever they were generated, which is what "changed" means to the
//! publisher. It is an integrity check against truncation and hand edits, not a signature:
//! who may write the object is the bucket policy's business (README, "Running on a fleet").

use serde::{Deserialize, Serialize};

use crate::config::StaticEnvironment;
use crate::environment::Environment;

/// The largest document any reader accepts. A lock this size would not fit the session policy
/// (2,048 packed characters) long before.
pub const MAX_DOCUMENT: usize = 64 * 1024;

/// The `format` value of this version.
pub const FORMAT: &str = "credlock-environment/1";

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Document {
    #[serde(default)]
    pub ipv4: Vec<String>,
    #[serde(default)]
    pub ipv6: Vec<String>,
    #[serde(default)]
    pub vpcs: Vec<String>,
    #[serde(default)]
    pub vpc_endpoints: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// What a document said besides its content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Metadata {
    pub generated_at: Option<String>,
    pub generated_by: Option<String>,
    pub checksum: Option<String>,
}

/// The content in canonical form, the input of the checksum.
pub fn content_json(env: &Environment) -> String {
    #[derive(Serialize)]
    struct Content {
        ipv4: Vec<String>,
        ipv6: Vec<String>,
        vpcs: Vec<String>,
        vpc_endpoints: Vec<String>,
    }
    // BTreeSets: already sorted and deduplicated. Prefixes print in canonical form.
    let content = Content {
        ipv4: env.ipv4.iter().map(|n| n.to_string()).collect(),
        ipv6: env.ipv6.iter().map(|n| n.to_string()).collect(),
        vpcs: env.vpcs.iter().cloned().collect(),
        vpc_endpoints: env.vpc_endpoints.iter().cloned().collect(),
    };
    serde_json::to_string(&content).unwrap_or_default()
}

/// `sha256:<64 hex digits>` of [`content_json`].
pub fn checksum(env: &Environment) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(content_json(env).as_bytes());
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The document for `env`, as the publisher writes it (pretty JSON, newline-terminated).
pub fn render(env: &Environment, generated_at: &str, generated_by: &str) -> Vec<u8> {
    let doc = Document {
        ipv4: env.ipv4.iter().map(|n| n.to_string()).collect(),
        ipv6: env.ipv6.iter().map(|n| n.to_string()).collect(),
        vpcs: env.vpcs.iter().cloned().collect(),
        vpc_endpoints: env.vpc_endpoints.iter().cloned().collect(),
        format: Some(FORMAT.into()),
        generated_at: Some(generated_at.into()),
        generated_by: Some(generated_by.into()),
        checksum: Some(checksum(env)),
    };
    let mut bytes = serde_json::to_vec_pretty(&doc).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// Whether a checksum must be present (the `s3` source requires one: a document there is
/// always written by the publisher) or only checked when present (a boot provider's answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    Required,
    IfPresent,
}

/// Why a document was refused; every variant names what is wrong (quoting at most 80
/// characters of a value from the document).
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("{0} bytes is more than the {MAX_DOCUMENT} a document may have")]
    TooLarge(usize),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("format {0:?} is not {FORMAT:?}")]
    Format(String),
    #[error("{field} is longer than {max} characters or holds control characters")]
    Field { field: &'static str, max: usize },
    #[error("{0:?} is not a VPC ID")]
    NotAVpc(String),
    #[error("{0:?} is not a VPC endpoint ID")]
    NotAVpcEndpoint(String),
    #[error("ipv4: {0:?} is not an IPv4 address or CIDR")]
    NotIpv4(String),
    #[error("ipv6: {0:?} is not an IPv6 address or CIDR")]
    NotIpv6(String),
    /// A prefix wider than the caps without `allow_wide_prefixes`.
    #[error("{0}")]
    Prefix(String),
    #[error("the document has no checksum (write it with credlock publish-environment)")]
    NoChecksum,
    #[error("checksum mismatch: the document says {given}, its content hashes to {actual}")]
    ChecksumMismatch { given: String, actual: String },
}

/// Parses and validates a document: its size, fields, IDs, prefixes (wider than the caps are
/// refused unless `allow_wide`), format and checksum. Every error names what is wrong.
pub fn parse(
    bytes: &[u8],
    allow_wide: bool,
    checksum_rule: Checksum,
) -> Result<(Environment, Metadata), DocumentError> {
    if bytes.len() > MAX_DOCUMENT {
        return Err(DocumentError::TooLarge(bytes.len()));
    }
    let doc: Document = serde_json::from_slice(bytes)?;
    if let Some(f) = &doc.format
        && f != FORMAT
    {
        return Err(DocumentError::Format(truncate(f).into()));
    }
    for (field, value, max) in [
        ("generated_at", &doc.generated_at, 64),
        ("generated_by", &doc.generated_by, 512),
        ("checksum", &doc.checksum, 71),
    ] {
        if let Some(v) = value
            && (v.len() > max || v.chars().any(char::is_control))
        {
            return Err(DocumentError::Field { field, max });
        }
    }
    for v in &doc.vpcs {
        if !crate::config::is_aws_id(v, "vpc-") {
            return Err(DocumentError::NotAVpc(truncate(v).into()));
        }
    }
    for v in &doc.vpc_endpoints {
        if !crate::config::is_aws_id(v, "vpce-") {
            return Err(DocumentError::NotAVpcEndpoint(truncate(v).into()));
        }
    }
    let content = StaticEnvironment {
        ipv4: doc.ipv4,
        ipv6: doc.ipv6,
        vpcs: doc.vpcs,
        vpc_endpoints: doc.vpc_endpoints,
    };
    for v in &content.ipv4 {
        if v.parse::<ipnet::Ipv4Net>().is_err() && v.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(DocumentError::NotIpv4(truncate(v).into()));
        }
    }
    for v in &content.ipv6 {
        if v.parse::<ipnet::Ipv6Net>().is_err() && v.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(DocumentError::NotIpv6(truncate(v).into()));
        }
    }
    let env = super::static_environment(&content, allow_wide).map_err(DocumentError::Prefix)?;
    match (&doc.checksum, checksum_rule) {
        (None, Checksum::Required) => {
            return Err(DocumentError::NoChecksum);
        }
        (None, Checksum::IfPresent) => {}
        (Some(given), _) => {
            let actual = checksum(&env);
            if *given != actual {
                return Err(DocumentError::ChecksumMismatch {
                    given: truncate(given).into(),
                    actual,
                });
            }
        }
    }
    Ok((
        env,
        Metadata {
            generated_at: doc.generated_at,
            generated_by: doc.generated_by,
            checksum: doc.checksum,
        },
    ))
}

/// Error messages quote at most 80 characters of a value from a document.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Environment {
        let mut e = Environment::default();
        e.add_ip("203.0.113.10");
        e.add_ip("2001:db8::/64");
        e.vpcs.insert("vpc-0123456789abcdef0".into());
        e.vpc_endpoints.insert("vpce-0123456789abcdef0".into());
        e
    }

    #[test]
    fn a_rendered_document_reads_back_with_its_metadata() {
        let bytes = render(&env(), "2026-12-01T22:00:00Z", "publisher");
        let (back, meta) = parse(&bytes, false, Checksum::Required).unwrap();
        assert_eq!(back, env());
        assert_eq!(meta.generated_by.as_deref(), Some("publisher"));
        assert_eq!(meta.checksum, Some(checksum(&env())));
    }

    #[test]
    fn the_checksum_is_sha256_of_the_canonical_content() {
        // Known answer, computed independently: printf '%s' '<content>' | sha256sum
        let content = content_json(&env());
        assert_eq!(
            content,
            r#"{"ipv4":["203.0.113.10/32"],"ipv6":["2001:db8::/64"],"vpcs":["vpc-0123456789abcdef0"],"vpc_endpoints":["vpce-0123456789abcdef0"]}"#
        );
        let out = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(content.as_bytes())?;
                c.wait_with_output()
            })
            .expect("sha256sum (coreutils)");
        let hex = String::from_utf8(out.stdout).unwrap();
        assert_eq!(checksum(&env()), format!("sha256:{}", &hex[..64]));
    }

    #[test]
    fn metadata_does_not_change_the_checksum_and_order_does_not_either() {
        let a = render(&env(), "2026-12-01T22:00:00Z", "a");
        let b = render(&env(), "2027-01-01T00:00:00Z", "b");
        let ca = parse(&a, false, Checksum::Required).unwrap().1.checksum;
        let cb = parse(&b, false, Checksum::Required).unwrap().1.checksum;
        assert_eq!(ca, cb);
        let shuffled = format!(
            r#"{{"vpcs":["vpc-0123456789abcdef0"],"ipv6":["2001:db8:0:0::/64"],"ipv4":["203.0.113.10","203.0.113.10/32"],"vpc_endpoints":["vpce-0123456789abcdef0"],"checksum":"{}"}}"#,
            checksum(&env())
        );
        assert_eq!(
            parse(shuffled.as_bytes(), false, Checksum::Required)
                .unwrap()
                .0,
            env()
        );
    }

    #[test]
    fn a_changed_entry_breaks_the_checksum() {
        let text = String::from_utf8(render(&env(), "t", "p")).unwrap();
        let tampered = text.replace("203.0.113.10/32", "198.51.100.7/32");
        let err = parse(tampered.as_bytes(), false, Checksum::Required).unwrap_err();
        assert!(
            matches!(err, DocumentError::ChecksumMismatch { .. }),
            "{err}"
        );
        assert!(err.to_string().starts_with("checksum mismatch"), "{err}");
    }

    #[test]
    fn bad_documents_are_refused_with_the_reason() {
        let cases: &[(&str, &str)] = &[
            (r#"{"ipv4":["203.0.113.10"],"extra":1}"#, "unknown field"),
            (r#"{"ipv4":["not-an-ip"]}"#, "is not an IPv4 address"),
            (r#"{"ipv6":["203.0.113.1"]}"#, "is not an IPv6 address"),
            (r#"{"ipv4":["10.0.0.0/8"]}"#, "wider"),
            (r#"{"vpcs":["vpc-xyz"]}"#, "is not a VPC ID"),
            (
                r#"{"vpc_endpoints":["vpc-0123456789abcdef0"]}"#,
                "is not a VPC endpoint ID",
            ),
            (r#"{"format":"credlock-environment/2"}"#, "format"),
            (
                r#"{"ipv4":["203.0.113.10"],"checksum":"sha256:00"}"#,
                "checksum mismatch",
            ),
            (r#"{"ipv4":"203.0.113.10"}"#, "invalid type"),
            (r#"{"ipv4":["203.0.113.10"]"#, "EOF"),
        ];
        for (doc, want) in cases {
            let err = parse(doc.as_bytes(), false, Checksum::IfPresent)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{doc}: {err}");
        }
        let err = parse(br#"{"ipv4":["203.0.113.10"]}"#, false, Checksum::Required).unwrap_err();
        assert!(matches!(err, DocumentError::NoChecksum), "{err}");
        let big = format!(
            r#"{{"ipv4":[{}]}}"#,
            vec![r#""203.0.113.1""#; 5000].join(",")
        );
        assert!(
            parse(big.as_bytes(), false, Checksum::IfPresent)
                .unwrap_err()
                .to_string()
                .contains("bytes is more than")
        );
    }

    #[test]
    fn a_plain_boot_provider_answer_stays_valid() {
        let (env, meta) = parse(
            br#"{"ipv4":["203.0.113.0/24"],"ipv6":[],"vpcs":[],"vpc_endpoints":[]}"#,
            false,
            Checksum::IfPresent,
        )
        .unwrap();
        assert_eq!(env.ipv4.len(), 1);
        assert_eq!(meta, Metadata::default());
    }
}
