//! The endpoint's decisions and the digests file's trust, on files the tests make.

use std::os::unix::fs::PermissionsExt;
use std::time::UNIX_EPOCH;

use http::HeaderMap;

use super::*;
use crate::clock::ManualClock;
use crate::credentials::{LockedCredentials, Secret};

const TOKEN: &str = "5f1c0a6f3e2d4b9a8c7e6d5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b";
const T0: u64 = 1_800_000_000;

/// A 0755 directory of the test's own (the system's temp dir is world-writable: refused).
fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("credlock-endpoint-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn own_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn tokens_in(d: &Path, text: &str, mode: u32) -> Tokens {
    let path = d.join("endpoint-tokens");
    write(&path, text, mode);
    Tokens::new(path, own_uid())
}

#[test]
fn the_digest_is_sha256_in_lowercase_hex() {
    // FIPS 180-2 test vector "abc".
    assert_eq!(
        digest_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn parse_reads_digest_lines_and_skips_the_rest() {
    let good = digest_hex(TOKEN.as_bytes());
    let text = format!(
        "# issued by credlock endpoint-token\n\n{good} app\nnot-a-digest bob\n{} short\n{}zz x\n",
        &good[..62],
        &good[..62]
    );
    let digests = parse(&text);
    assert_eq!(digests.len(), 1);
    let key: [u8; 32] = Sha256::digest(TOKEN.as_bytes()).into();
    assert_eq!(digests.get(&key).map(String::as_str), Some("app"));
}

#[test]
fn a_safe_file_trusts_exactly_its_tokens() {
    let d = dir("safe");
    let t = tokens_in(
        &d,
        &format!("{} app\n", digest_hex(TOKEN.as_bytes())),
        0o644,
    );
    assert_eq!(t.trust(TOKEN.as_bytes()), Trust::Trusted("app".into()));
    assert_eq!(t.trust(b"another token"), Trust::Untrusted);
    // The header value exactly: a newline or a changed case is another token.
    assert_eq!(t.trust(format!("{TOKEN}\n").as_bytes()), Trust::Untrusted);
    assert_eq!(t.trust(TOKEN.to_uppercase().as_bytes()), Trust::Untrusted);
    assert_eq!(t.summary(), Ok(1));
}

#[test]
fn a_file_others_could_have_written_trusts_nothing() {
    for mode in [0o646, 0o664, 0o666] {
        let d = dir(&format!("mode-{mode:o}"));
        let t = tokens_in(&d, &format!("{} app\n", digest_hex(TOKEN.as_bytes())), mode);
        assert_eq!(t.trust(TOKEN.as_bytes()), Trust::Untrusted, "mode {mode:o}");
        assert!(
            t.summary().unwrap_err().contains("writable"),
            "mode {mode:o}"
        );
    }
}

#[test]
fn a_directory_others_could_write_trusts_nothing() {
    let d = dir("opendir");
    let t = tokens_in(
        &d,
        &format!("{} app\n", digest_hex(TOKEN.as_bytes())),
        0o644,
    );
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_eq!(t.trust(TOKEN.as_bytes()), Trust::Untrusted);
    assert!(t.summary().unwrap_err().contains("writable"));
}

#[test]
fn a_file_of_another_owner_trusts_nothing() {
    let d = dir("owner");
    let path = d.join("endpoint-tokens");
    write(
        &path,
        &format!("{} app\n", digest_hex(TOKEN.as_bytes())),
        0o644,
    );
    // As if credlock ran as another uid than the file's owner (and the owner is not root).
    let other = if own_uid() == 4242 { 4243 } else { 4242 };
    let t = Tokens::new(path, other);
    if own_uid() == 0 {
        // Root's file is trusted whatever credlock's uid.
        assert_eq!(t.trust(TOKEN.as_bytes()), Trust::Trusted("app".into()));
    } else {
        assert_eq!(t.trust(TOKEN.as_bytes()), Trust::Untrusted);
        assert!(t.summary().unwrap_err().contains("owned by uid"));
    }
}

#[test]
fn a_symlink_a_fifo_or_no_file_trusts_nothing() {
    let d = dir("links");
    let real = d.join("real");
    write(
        &real,
        &format!("{} app\n", digest_hex(TOKEN.as_bytes())),
        0o644,
    );
    let link = d.join("endpoint-tokens");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let t = Tokens::new(link.clone(), own_uid());
    assert_eq!(t.trust(TOKEN.as_bytes()), Trust::Untrusted);
    assert!(t.summary().unwrap_err().contains("symlink"));

    std::fs::remove_file(&link).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&link)
        .status()
        .unwrap();
    assert!(made.success());
    let t = Tokens::new(link.clone(), own_uid());
    assert_eq!(t.trust(TOKEN.as_bytes()), Trust::Untrusted);
    assert!(t.summary().unwrap_err().contains("not a regular file"));

    // No file yet: nothing trusted, and nothing wrong.
    let t = Tokens::new(d.join("absent"), own_uid());
    assert_eq!(t.trust(TOKEN.as_bytes()), Trust::Untrusted);
    assert_eq!(t.summary(), Ok(0));
}

fn endpoint(tokens: Tokens, with_set: bool, expires_in: u64) -> Endpoint {
    let t0 = UNIX_EPOCH + Duration::from_secs(T0);
    let store = Arc::new(CredentialStore::default());
    if with_set {
        store.store(LockedCredentials::new(
            "ASIALOCKEDKEY0000001".into(),
            Secret::new("locked-secret-marker"),
            Secret::new("locked-token-marker"),
            t0 + Duration::from_secs(expires_in),
            t0,
        ));
    }
    let status = LockStatus {
        role_arn: crate::identity::RoleArn::parse("arn:aws:iam::123456789012:role/app-role"),
        ..LockStatus::default()
    };
    Endpoint {
        store,
        lock_status: Arc::new(ArcSwap::from_pointee(status)),
        clock: Arc::new(ManualClock::new(t0)),
        serve_margin: Duration::from_secs(300),
        metrics: Arc::new(Metrics::new()),
        tokens,
    }
}

fn with_token(value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
    h
}

fn body(r: &Response<Full<Bytes>>) -> String {
    use http_body_util::BodyExt;
    let bytes = futures_now(r.body().clone().collect()).unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// A `Full` body is ready at once: poll it without a runtime.
fn futures_now<F: std::future::Future>(f: F) -> F::Output
where
    F::Output: Sized,
{
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("a Full body was not ready"),
    }
}

fn safe_tokens(name: &str) -> Tokens {
    tokens_in(
        &dir(name),
        &format!("{} app\n", digest_hex(TOKEN.as_bytes())),
        0o644,
    )
}

#[test]
fn without_a_trusted_token_nothing_but_401_or_403() {
    let e = endpoint(safe_tokens("refusals"), true, 3600);
    let cases: [(Method, &str, HeaderMap, EndpointResult, StatusCode); 5] = [
        (
            Method::GET,
            PATH,
            HeaderMap::new(),
            EndpointResult::Unauthorized,
            StatusCode::UNAUTHORIZED,
        ),
        (
            Method::GET,
            PATH,
            with_token("wrong"),
            EndpointResult::Forbidden,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::GET,
            PATH,
            with_token(""),
            EndpointResult::Forbidden,
            StatusCode::FORBIDDEN,
        ),
        // Auth comes before the path and method: they tell an untrusted caller nothing.
        (
            Method::POST,
            "/other",
            HeaderMap::new(),
            EndpointResult::Unauthorized,
            StatusCode::UNAUTHORIZED,
        ),
        (
            Method::DELETE,
            "/other",
            with_token("wrong"),
            EndpointResult::Forbidden,
            StatusCode::FORBIDDEN,
        ),
    ];
    for (method, path, headers, result, status) in cases {
        let (r, response) = answer(&e, &method, path, &headers);
        assert_eq!((r, response.status()), (result, status), "{method} {path}");
        let text = body(&response);
        for secret in [
            "ASIALOCKEDKEY",
            "locked-secret-marker",
            "locked-token-marker",
        ] {
            assert!(!text.contains(secret), "{text}");
        }
    }
    // Two Authorization headers, one of them good: refused (which one would an SDK mean?).
    let mut two = with_token(TOKEN);
    two.append(header::AUTHORIZATION, HeaderValue::from_static("wrong"));
    let (r, response) = answer(&e, &Method::GET, PATH, &two);
    assert_eq!(
        (r, response.status()),
        (EndpointResult::Forbidden, StatusCode::FORBIDDEN)
    );
}

#[test]
fn a_trusted_token_gets_the_locked_set_in_the_container_format() {
    let e = endpoint(safe_tokens("served"), true, 3600);
    let (r, response) = answer(&e, &Method::GET, PATH, &with_token(TOKEN));
    assert_eq!(
        (r, response.status()),
        (EndpointResult::Served, StatusCode::OK)
    );
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    let doc: serde_json::Value = serde_json::from_str(&body(&response)).unwrap();
    assert_eq!(doc["AccessKeyId"], "ASIALOCKEDKEY0000001");
    assert_eq!(doc["SecretAccessKey"], "locked-secret-marker");
    assert_eq!(doc["Token"], "locked-token-marker");
    // RFC 3339, UTC, as IMDS and the container endpoints write it.
    assert_eq!(doc["Expiration"], "2027-01-15T09:00:00Z");
    assert_eq!(doc["RoleArn"], "arn:aws:iam::123456789012:role/app-role");
    let (_, head) = answer(&e, &Method::HEAD, PATH, &with_token(TOKEN));
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(body(&head), "");
}

#[test]
fn a_trusted_token_elsewhere_or_without_a_servable_set_gets_no_credentials() {
    let e = endpoint(safe_tokens("edges"), true, 3600);
    let (r, response) = answer(&e, &Method::GET, "/v2/credentials/x", &with_token(TOKEN));
    assert_eq!(
        (r, response.status()),
        (EndpointResult::Refused, StatusCode::NOT_FOUND)
    );
    let (r, response) = answer(&e, &Method::PUT, PATH, &with_token(TOKEN));
    assert_eq!(
        (r, response.status()),
        (EndpointResult::Refused, StatusCode::METHOD_NOT_ALLOWED)
    );
    // No set yet, and a set inside the serving margin: 503, nothing in the body.
    for e in [
        endpoint(safe_tokens("noset"), false, 0),
        endpoint(safe_tokens("margin"), true, 200),
    ] {
        let (r, response) = answer(&e, &Method::GET, PATH, &with_token(TOKEN));
        assert_eq!(
            (r, response.status()),
            (EndpointResult::Unavailable, StatusCode::SERVICE_UNAVAILABLE)
        );
        assert!(!body(&response).contains("locked-secret-marker"));
    }
}

#[test]
fn a_changed_file_is_read_again_after_the_recheck_interval() {
    let d = dir("reload");
    let t = tokens_in(
        &d,
        &format!("{} app\n", digest_hex(TOKEN.as_bytes())),
        0o644,
    );
    assert_eq!(t.trust(TOKEN.as_bytes()), Trust::Trusted("app".into()));
    let path = d.join("endpoint-tokens");
    write(
        &path,
        &format!("{} other\n", digest_hex(b"a new token")),
        0o644,
    );
    std::thread::sleep(RECHECK + Duration::from_millis(200));
    assert_eq!(t.trust(TOKEN.as_bytes()), Trust::Untrusted);
    assert_eq!(t.trust(b"a new token"), Trust::Trusted("other".into()));
}

#[test]
fn a_directory_further_up_that_others_could_write_trusts_nothing() {
    // Others could rename `etc` away and put their own in its place.
    let top = dir("grand");
    let etc = top.join("etc");
    std::fs::create_dir(&etc).unwrap();
    std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o755)).unwrap();
    let t = tokens_in(
        &etc,
        &format!("{} app\n", digest_hex(TOKEN.as_bytes())),
        0o644,
    );
    assert_eq!(t.trust(TOKEN.as_bytes()), Trust::Trusted("app".into()));
    std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::thread::sleep(RECHECK + Duration::from_millis(200));
    assert_eq!(t.trust(TOKEN.as_bytes()), Trust::Untrusted);
    assert!(t.summary().unwrap_err().contains("writable"));
    // A root-owned sticky directory (like /tmp) is fine: others cannot move what is in it.
    assert!(trusted_directory(&std::env::temp_dir(), own_uid()).is_ok());
}

#[test]
fn a_digests_file_with_a_second_link_trusts_nothing() {
    let d = dir("links2");
    let t = tokens_in(
        &d,
        &format!("{} app\n", digest_hex(TOKEN.as_bytes())),
        0o644,
    );
    std::fs::hard_link(d.join("endpoint-tokens"), d.join("elsewhere")).unwrap();
    assert_eq!(t.trust(TOKEN.as_bytes()), Trust::Untrusted);
    assert!(t.summary().unwrap_err().contains("links"));
}
