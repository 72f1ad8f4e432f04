//! Request classification: one pure function from (method, request target) to a [`Route`].
//!
//! The rule that keeps credlock safe: anything a lenient IMDS could read as a role-credentials
//! path is either classified as [`Route::Credentials`] (forwarded, then its secrets replaced) or
//! refused here; it never reaches the upstream as a [`Route::Passthrough`]. So the classifier
//! refuses every target no real IMDS client sends (percent-encoding, dot segments, `//`, `\`,
//! `;`, control bytes, fragments, over-long targets) instead of guessing how the upstream would
//! read it, and it compares the credential subtree case-insensitively. Facts behind the path
//! forms: `reference/aws-imds-sts-iam.md` §1.5-1.7 and `reference/peers.md` §3.

use http::Method;

/// Longest request target accepted. Real IMDS paths are well under 200 bytes; a role name is at
/// most 64 characters.
pub const MAX_TARGET_LEN: usize = 1024;

/// The only path IMDS issues session tokens on (a PUT to a dated version gets 403 upstream).
pub const TOKEN_PATH: &str = "/latest/api/token";

/// Any path containing this (case-insensitively) must be one of the known credential forms.
const CREDENTIALS_MARKER: &str = "credentials";

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `PUT /latest/api/token`: forwarded unchanged.
    Token,
    /// The role-name listing (`.../iam/security-credentials[-extended]/`): forwarded (the
    /// canonical `path`, no query); it holds no secret.
    RoleListing { extended: bool, path: &'a str },
    /// A role's credentials: forwarded with the caller's token, then the secrets are replaced.
    /// `path` is the canonical path (no query) that is sent upstream.
    Credentials {
        role: &'a str,
        extended: bool,
        path: &'a str,
    },
    /// Everything else: forwarded byte for byte (`target` is the origin-form path and query).
    Passthrough { target: &'a str },
    /// Answered locally, never forwarded.
    Refused(Refusal),
}

/// Why a request was answered locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A target no IMDS client sends (400).
    BadTarget,
    /// Under the credential subtree but not a known form (404, as IMDS would say).
    UnknownCredentialPath,
    /// A method other than GET/HEAD on a credential path (405).
    Method,
}

impl Refusal {
    /// The closed set of reasons used as a metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::BadTarget => "bad_target",
            Refusal::UnknownCredentialPath => "unknown_credential_path",
            Refusal::Method => "method",
        }
    }

    pub fn status(self) -> http::StatusCode {
        match self {
            Refusal::BadTarget => http::StatusCode::BAD_REQUEST,
            Refusal::UnknownCredentialPath => http::StatusCode::NOT_FOUND,
            Refusal::Method => http::StatusCode::METHOD_NOT_ALLOWED,
        }
    }
}

/// Classifies a request. `target` is the request target as sent on the request line
/// (origin-form `/path?query` or absolute-form `http://host/path?query`).
pub fn classify<'a>(method: &Method, target: &'a str) -> Route<'a> {
    if target.len() > MAX_TARGET_LEN {
        return Route::Refused(Refusal::BadTarget);
    }
    let Some(origin) = origin_form(target) else {
        return Route::Refused(Refusal::BadTarget);
    };
    let (path, query) = match origin.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (origin, None),
    };
    if !path_is_clean(path) || !query.is_none_or(query_is_clean) {
        return Route::Refused(Refusal::BadTarget);
    }

    if *method == Method::PUT && path == TOKEN_PATH {
        return Route::Token;
    }
    let Some(cred) = credential_form(path) else {
        return Route::Passthrough { target: origin };
    };
    if *method != Method::GET && *method != Method::HEAD {
        return Route::Refused(Refusal::Method);
    }
    match cred {
        CredentialForm::Listing { extended } => Route::RoleListing { extended, path },
        CredentialForm::Role { role, extended } => Route::Credentials {
            role,
            extended,
            path,
        },
        CredentialForm::Identity => Route::Passthrough { target: origin },
        CredentialForm::Unknown => Route::Refused(Refusal::UnknownCredentialPath),
    }
}

/// Strips `http://authority` from an absolute-form target. Other forms (authority, asterisk,
/// other schemes) are not IMDS requests.
fn origin_form(target: &str) -> Option<&str> {
    if target.starts_with('/') {
        return Some(target);
    }
    let scheme = target.get(..7)?;
    if !scheme.eq_ignore_ascii_case("http://") {
        return None;
    }
    let rest = &target[7..];
    match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => Some(&rest[i..]),
        Some(_) => None,
        None => Some("/"),
    }
}

/// A path made only of plain segments: no empty segment except a trailing slash, no dot
/// segments, only unreserved characters and the sub-delimiters that role names may contain.
fn path_is_clean(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    rest.split('/').all(|segment| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment.bytes().all(is_path_byte)
    })
}

fn is_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.' | b'_' | b'~' | b'+' | b'=' | b',' | b'@' | b':'
        )
}

/// Queries are passed through on non-credential paths; they must still be plain, and may not
/// carry a path or mention credentials (no IMDS client sends either).
fn query_is_clean(query: &str) -> bool {
    query.bytes().all(|b| is_path_byte(b) || b == b'&')
        && !contains_ignore_case(query, CREDENTIALS_MARKER)
}

enum CredentialForm<'a> {
    Listing {
        extended: bool,
    },
    Role {
        role: &'a str,
        extended: bool,
    },
    /// The instance identity role (`identity-credentials/ec2/...`): no policies can lock it, so
    /// it is passed through as the brief requires.
    Identity,
    Unknown,
}

/// Recognises the credential subtree. `None` means the path does not mention credentials at all.
fn credential_form(path: &str) -> Option<CredentialForm<'_>> {
    if !contains_ignore_case(path, CREDENTIALS_MARKER) {
        return None;
    }
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    let mut segments = trimmed.split('/').skip(1);
    let version = segments.next().unwrap_or("");
    if !is_version(version)
        || !segments
            .next()
            .is_some_and(|s| s.eq_ignore_ascii_case("meta-data"))
    {
        return Some(CredentialForm::Unknown);
    }
    // The longest known form has five segments after `meta-data`.
    let mut buf = [""; 5];
    let mut n = 0;
    for segment in segments {
        if n == buf.len() {
            return Some(CredentialForm::Unknown);
        }
        buf[n] = segment;
        n += 1;
    }
    let rest = &buf[..n];
    let is = |i: usize, s: &str| rest.get(i).is_some_and(|x| x.eq_ignore_ascii_case(s));
    let form = if is(0, "iam") {
        let extended = if is(1, "security-credentials") {
            false
        } else if is(1, "security-credentials-extended") {
            true
        } else {
            return Some(CredentialForm::Unknown);
        };
        match n {
            2 => CredentialForm::Listing { extended },
            3 => CredentialForm::Role {
                role: rest[2],
                extended,
            },
            _ => CredentialForm::Unknown,
        }
    } else if is(0, "identity-credentials") {
        identity_form(rest)
    } else {
        CredentialForm::Unknown
    };
    Some(form)
}

fn identity_form(rest: &[&str]) -> CredentialForm<'static> {
    let known: [&[&str]; 5] = [
        &["identity-credentials"],
        &["identity-credentials", "ec2"],
        &["identity-credentials", "ec2", "info"],
        &["identity-credentials", "ec2", "security-credentials"],
        &[
            "identity-credentials",
            "ec2",
            "security-credentials",
            "ec2-instance",
        ],
    ];
    let matches = known.iter().any(|form| {
        form.len() == rest.len()
            && form
                .iter()
                .zip(rest)
                .all(|(a, b)| a.eq_ignore_ascii_case(b))
    });
    if matches {
        CredentialForm::Identity
    } else {
        CredentialForm::Unknown
    }
}

/// `latest`, `1.0` or a dated version `YYYY-MM-DD`.
fn is_version(segment: &str) -> bool {
    if segment.eq_ignore_ascii_case("latest") || segment == "1.0" {
        return true;
    }
    let b = segment.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

#[cfg(test)]
#[path = "route_tests.rs"]
mod tests;
