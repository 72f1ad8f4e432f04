//! Request classification: one pure function from (method, request target) to a [`Route`].
//!
//! The rule that keeps credlock safe: anything a lenient IMDS could read as a role-credentials
//! path is either classified as [`Route::Credentials`] (forwarded, then its secrets replaced) or
//! refused here; it never reaches the upstream as a [`Route::Passthrough`]. So the classifier
//! refuses every target no real IMDS client sends (percent-encoding, dot segments, `//`, `\`,
//! `;`, control bytes, fragments, over-long targets) instead of guessing how the upstream would
//! read it, and it compares the credential subtree case-insensitively. Facts behind the path
//! forms: Amazon EC2 User Guide, "Instance metadata categories" and "Retrieve security
//! credentials from instance metadata".

use http::Method;

/// Longest request target accepted. Real IMDS paths are well under 200 bytes; a role name is at
/// most 64 characters.
pub const MAX_TARGET_LEN: usize = 1024;

/// The only path IMDS issues session tokens on (a PUT to a dated version gets 403 upstream).
pub const TOKEN_PATH: &str = "/latest/api/token";
/// The IMDSv2 session token request header (every metadata request carries it) and the TTL
/// header of the token PUT ("Use IMDSv2", EC2 User Guide). The one place these names are spelt.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

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
    let Some(scan) = scan_path(origin) else {
        return Route::Refused(Refusal::BadTarget);
    };
    let (path, query) = match origin.get(scan.path_len + 1..) {
        Some(query) => (&origin[..scan.path_len], Some(query)),
        None => (origin, None),
    };
    if !query.is_none_or(query_is_clean) {
        return Route::Refused(Refusal::BadTarget);
    }

    if *method == Method::PUT && path == TOKEN_PATH {
        return Route::Token;
    }
    if !scan.mentions_credentials {
        return Route::Passthrough { target: origin };
    }
    let cred = credential_form(path);
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
    match rest.bytes().position(|b| b == b'/' || b == b'?') {
        Some(i) if rest.as_bytes()[i] == b'/' => Some(&rest[i..]),
        Some(_) => None,
        None => Some("/"),
    }
}

/// What one pass over an origin-form target's path found.
struct PathScan {
    /// Length of the path: up to the first `?`, or the whole target.
    path_len: usize,
    /// Whether a segment contains [`CREDENTIALS_MARKER`], in any letter case.
    mentions_credentials: bool,
}

/// Checks the path in one pass over its bytes (on every request; criterion measures it in
/// `benches/request_path.rs`): only plain segments, that is no empty segment except a trailing
/// slash, no dot segments, only unreserved characters and the sub-delimiters that role names may
/// contain. On the way, finds the end of the path and whether it mentions credentials.
// Not inlined: in a caller with many live values the loop's state spills to the stack.
#[inline(never)]
fn scan_path(origin: &str) -> Option<PathScan> {
    let bytes = origin.as_bytes();
    if bytes.first() != Some(&b'/') {
        return None;
    }
    let mut mentions_credentials = false;
    let mut segment_done = |segment: &[u8]| {
        if segment.is_empty() || is_dot_segment(segment) {
            return false;
        }
        mentions_credentials =
            mentions_credentials || contains_ignore_case(segment, CREDENTIALS_MARKER.as_bytes());
        true
    };
    let mut start = 1;
    let mut path_len = bytes.len();
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        if is_path_byte(b) {
            continue;
        }
        if b == b'/' {
            if !segment_done(&bytes[start..i]) {
                return None;
            }
            start = i + 1;
        } else if b == b'?' {
            path_len = i;
            break;
        } else {
            return None;
        }
    }
    // The last segment may be empty (`/` itself, or a trailing slash).
    let last = &bytes[start.min(path_len)..path_len];
    if !last.is_empty() && !segment_done(last) {
        return None;
    }
    Some(PathScan {
        path_len,
        mentions_credentials,
    })
}

fn is_dot_segment(segment: &[u8]) -> bool {
    matches!(segment, b"." | b"..")
}

/// The `/`-separated segments of `s` (as `str::split('/')`, without its char searcher).
fn segments(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.bytes().position(|b| b == b'/') {
            Some(i) => {
                rest = Some(&r[i + 1..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// The bytes a path segment may hold: unreserved characters and the sub-delimiters role names
/// may contain. A table, as the check runs on every byte of every request.
const PATH_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.' | b'_' | b'~' | b'+' | b'=' | b',' | b'@' | b':'
            );
        b += 1;
    }
    table
};

fn is_path_byte(b: u8) -> bool {
    PATH_BYTES[usize::from(b)]
}

/// Queries are passed through on non-credential paths; they must still be plain, and may not
/// carry a path or mention credentials (no IMDS client sends either).
fn query_is_clean(query: &str) -> bool {
    query.bytes().all(|b| is_path_byte(b) || b == b'&')
        && !contains_ignore_case(query.as_bytes(), CREDENTIALS_MARKER.as_bytes())
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

/// Recognises the credential subtree, given a clean path that mentions credentials.
fn credential_form(path: &str) -> CredentialForm<'_> {
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    let mut segments = segments(trimmed).skip(1);
    let version = segments.next().unwrap_or("");
    if !is_version(version)
        || !segments
            .next()
            .is_some_and(|s| s.eq_ignore_ascii_case("meta-data"))
    {
        return CredentialForm::Unknown;
    }
    // The longest known form has five segments after `meta-data`.
    let mut buf = [""; 5];
    let mut n = 0;
    for segment in segments {
        if n == buf.len() {
            return CredentialForm::Unknown;
        }
        buf[n] = segment;
        n += 1;
    }
    let rest = &buf[..n];
    let is = |i: usize, s: &str| rest.get(i).is_some_and(|x| x.eq_ignore_ascii_case(s));
    if is(0, "iam") {
        let extended = if is(1, "security-credentials") {
            false
        } else if is(1, "security-credentials-extended") {
            true
        } else {
            return CredentialForm::Unknown;
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
    }
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

/// Whether `haystack` contains `needle`, ASCII case-insensitively.
pub fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, tail)) = needle.split_first() else {
        return true;
    };
    if haystack.len() < needle.len() {
        return false;
    }
    // Test one byte before comparing a whole window: most positions fail there.
    (0..=haystack.len() - needle.len()).any(|i| {
        haystack[i].eq_ignore_ascii_case(&first)
            && haystack[i + 1..i + needle.len()].eq_ignore_ascii_case(tail)
    })
}

#[cfg(test)]
#[path = "route_tests.rs"]
mod tests;
