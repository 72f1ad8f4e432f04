use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use http_body_util::BodyExt;

use super::*;
use crate::credentials::Secret;

const S: fn(u64) -> Duration = Duration::from_secs;

#[test]
fn session_duration_is_clamped_to_what_a_chained_role_allows() {
    assert_eq!(session_duration(S(60)), S(900));
    assert_eq!(session_duration(S(900)), S(900));
    assert_eq!(session_duration(S(1800)), S(1800));
    assert_eq!(session_duration(S(3600)), S(3600));
    assert_eq!(session_duration(S(43_200)), S(3600));
}

#[test]
fn invoke_needs_the_margin_plus_the_invocation_within_half_a_session() {
    // 5 min margin, a 3 s invocation: 303 s must be left.
    assert_eq!(needed_at_invoke(S(300), S(3), S(3600)), S(303));
    // A 15 min invocation on a 15 min session: capped at half the session, so a fresh set
    // (about 900 s) is never renewed again at the next INVOKE.
    assert_eq!(needed_at_invoke(S(300), S(900), S(900)), S(450));
    // An absurd deadline counts as 15 minutes.
    assert_eq!(needed_at_invoke(S(60), S(100_000), S(3600)), S(960));
    // Never less than the margin.
    assert_eq!(needed_at_invoke(S(400), S(0), S(600)), S(400));
}

#[test]
fn refresh_decision() {
    assert!(should_refresh(S(0), S(8)));
    assert!(should_refresh(S(8), S(8)));
    assert!(!should_refresh(S(9), S(8)));
    let fresh = S(900);
    assert!(!should_refresh(
        fresh,
        needed_at_invoke(S(300), S(900), S(900))
    ));
}

#[test]
fn invocation_left_from_the_deadline() {
    let now = UNIX_EPOCH + S(1_700_000_000);
    let ms = 1_700_000_000_000u64;
    assert_eq!(
        invocation_left(ms + 2_500, now),
        Duration::from_millis(2_500)
    );
    assert_eq!(invocation_left(ms - 1, now), Duration::ZERO);
    assert_eq!(invocation_left(u64::MAX, now), S(900));
}

#[test]
fn events_as_the_extensions_api_sends_them() {
    let invoke = br#"{"eventType":"INVOKE","deadlineMs":1700000003000,"requestId":"r-1","invokedFunctionArn":"arn:aws:lambda:us-east-1:123456789012:function:f","tracing":{"type":"X-Amzn-Trace-Id","value":"Root=1"}}"#;
    assert_eq!(
        parse_event(invoke).unwrap(),
        Event::Invoke {
            deadline_ms: 1_700_000_003_000,
            request_id: "r-1".into()
        }
    );
    let shutdown =
        br#"{"eventType":"SHUTDOWN","deadlineMs":1700000002000,"shutdownReason":"SPINDOWN"}"#;
    assert_eq!(
        parse_event(shutdown).unwrap(),
        Event::Shutdown {
            reason: "SPINDOWN".into()
        }
    );
    assert!(parse_event(br#"{"eventType":"INVOKE"}"#).is_err());
    assert!(parse_event(br#"{"eventType":"RESTORE","deadlineMs":1}"#).is_err());
    assert!(parse_event(b"not json").is_err());
}

fn headers(values: &[&str]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in values {
        h.append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
    }
    h
}

#[test]
fn token_check_is_exact() {
    let token = "a".repeat(64);
    assert_eq!(authorize(&headers(&[]), &token), Auth::Missing);
    assert_eq!(authorize(&headers(&[&token]), &token), Auth::Granted);
    assert_eq!(
        authorize(&headers(&[&token, &token]), &token),
        Auth::Refused
    );
    assert_eq!(
        authorize(&headers(&[&"a".repeat(63)]), &token),
        Auth::Refused
    );
    assert_eq!(
        authorize(&headers(&[&"a".repeat(65)]), &token),
        Auth::Refused
    );
    assert_eq!(
        authorize(&headers(&[&format!("Bearer {token}")]), &token),
        Auth::Refused
    );
    assert_eq!(authorize(&headers(&[""]), &token), Auth::Refused);
}

#[test]
fn refusals_in_order_auth_method_path() {
    let status = |m: Method, p: &str, a: Auth| refusal(&m, p, a).map(|r| r.status());
    assert_eq!(
        status(Method::GET, PATH, Auth::Missing),
        Some(StatusCode::UNAUTHORIZED)
    );
    assert_eq!(
        status(Method::POST, "/x", Auth::Missing),
        Some(StatusCode::UNAUTHORIZED)
    );
    assert_eq!(
        status(Method::GET, "/x", Auth::Refused),
        Some(StatusCode::FORBIDDEN)
    );
    assert_eq!(
        status(Method::POST, PATH, Auth::Granted),
        Some(StatusCode::METHOD_NOT_ALLOWED)
    );
    assert_eq!(
        status(Method::GET, "/other", Auth::Granted),
        Some(StatusCode::NOT_FOUND)
    );
    assert_eq!(status(Method::GET, PATH, Auth::Granted), None);
    assert_eq!(status(Method::HEAD, PATH, Auth::Granted), None);
}

#[test]
fn document_has_the_container_provider_fields() {
    let expiration = UNIX_EPOCH + S(1_700_003_600);
    let set = LockedCredentials::new(
        "ASIALOCKED0000000001".into(),
        Secret::new("locked-secret"),
        Secret::new("locked-token"),
        expiration,
        SystemTime::now(),
    );
    let role = RoleArn::parse("arn:aws:iam::123456789012:role/fn-role").unwrap();
    let response = crate::endpoint::document(&set, Some(&role), false);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    let body = futures_body(response);
    let doc: HashMap<String, String> = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["AccessKeyId"], "ASIALOCKED0000000001");
    assert_eq!(doc["SecretAccessKey"], "locked-secret");
    assert_eq!(doc["Token"], "locked-token");
    assert_eq!(doc["Expiration"], "2023-11-14T23:13:20Z");
    assert_eq!(doc["RoleArn"], "arn:aws:iam::123456789012:role/fn-role");
}

fn futures_body(response: Response<Full<Bytes>>) -> Bytes {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(response.into_body().collect())
        .unwrap()
        .to_bytes()
}

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| map.get(k).cloned()
}

#[test]
fn settings_from_the_environment() {
    let base = [
        ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001"),
        ("AWS_REGION", "eu-west-1"),
        ("AWS_LAMBDA_FUNCTION_NAME", "orders"),
    ];
    let s = Settings::from_vars(vars(&base)).unwrap();
    assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(s.token_file, PathBuf::from(DEFAULT_TOKEN_FILE));
    assert_eq!(s.region, "eu-west-1");
    assert!(s.role_arn.is_none());
    let with = |extra: (&str, &str)| {
        let mut all = base.to_vec();
        all.push(extra);
        Settings::from_vars(vars(&all))
    };
    assert!(with(("CREDLOCK_LAMBDA_LISTEN", "0.0.0.0:9170")).is_err());
    assert!(with(("CREDLOCK_LAMBDA_LISTEN", "localhost")).is_err());
    assert_eq!(
        with(("CREDLOCK_LAMBDA_LISTEN", "[::1]:9999"))
            .unwrap()
            .listen
            .port(),
        9999
    );
    assert!(with(("CREDLOCK_LAMBDA_TOKEN_FILE", "token")).is_err());
    assert!(with(("CREDLOCK_ROLE_ARN", "not-an-arn")).is_err());
    let role = with(("CREDLOCK_ROLE_ARN", "arn:aws:iam::123456789012:role/svc/fn"))
        .unwrap()
        .role_arn
        .unwrap();
    assert_eq!(role.to_string(), "arn:aws:iam::123456789012:role/svc/fn");
    assert!(Settings::from_vars(vars(&base[1..])).is_err());
    assert!(Settings::from_vars(vars(&[base[0]])).is_err());
}

#[test]
fn sts_names_fit_the_limits() {
    assert_eq!(
        sts_name("credlock-lambda-", "orders"),
        "credlock-lambda-orders"
    );
    assert_eq!(sts_name("credlock-", "a b/c:d"), "credlock-abcd");
    assert_eq!(sts_name("credlock-lambda-", &"x".repeat(64)).len(), 64);
}

#[test]
fn token_is_64_hex_digits_and_fresh() {
    let (a, b) = (new_token(), new_token());
    assert_eq!(a.len(), 64);
    assert!(
        a.bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    assert_ne!(a, b);
}

#[test]
fn token_file_is_private_and_replaced_whole() {
    let base = std::env::temp_dir().join(format!("credlock-lambda-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir(&base).unwrap();
    let dir = base.join("credlock");
    let path = dir.join("token");
    write_token(&path, "first").unwrap();
    write_token(&path, "second").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "second");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    // A directory others may enter is refused.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(write_token(&path, "third").is_err());
    // So is a symlink in its place.
    let other = base.join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = base.join("link");
    std::os::unix::fs::symlink(&other, &link).unwrap();
    assert!(write_token(&link.join("token"), "x").is_err());
    std::fs::remove_dir_all(&base).unwrap();
}

/// A scripted STS: sets of `lifetime` from the clock's now, numbered; `fail` refuses every
/// call; `deny_marker` refuses only calls with a SourceIdentity.
struct FakeSts {
    clock: Arc<crate::clock::ManualClock>,
    lifetime: Duration,
    calls: std::sync::Mutex<Vec<AssumeRequest>>,
    fail: std::sync::atomic::AtomicBool,
    deny_marker: bool,
}

impl Issuer for FakeSts {
    async fn assume(
        &self,
        request: &AssumeRequest,
    ) -> Result<crate::sts::Issued, crate::sts::StsError> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(request.clone());
            calls.len()
        };
        let denied = self.fail.load(std::sync::atomic::Ordering::SeqCst)
            || (self.deny_marker && request.source_identity.is_some());
        if denied {
            return Err(crate::sts::StsError {
                code: StsErrorCode::AccessDenied,
                message: "not authorized".into(),
            });
        }
        let now = self.clock.now();
        Ok(crate::sts::Issued {
            credentials: LockedCredentials::new(
                format!("ASIALOCKED{n:010}"),
                Secret::new(format!("secret-{n}")),
                Secret::new(format!("token-{n}")),
                now + self.lifetime,
                now,
            ),
            packed_policy_percent: None,
        })
    }
}

fn lock(deny_marker: bool) -> (Lock<FakeSts>, Arc<crate::clock::ManualClock>) {
    let clock = Arc::new(crate::clock::ManualClock::new(
        UNIX_EPOCH + S(1_700_000_000),
    ));
    let sts = FakeSts {
        clock: clock.clone(),
        lifetime: S(900),
        calls: std::sync::Mutex::new(Vec::new()),
        fail: false.into(),
        deny_marker,
    };
    let request = AssumeRequest {
        role_arn: "arn:aws:iam::123456789012:role/fn-role".into(),
        session_name: "credlock-lambda-f".into(),
        policy: "{}".into(),
        duration: S(900),
        source_identity: Some("credlock-f".into()),
        tags: Vec::new(),
    };
    let role = RoleArn::parse(&request.role_arn).unwrap();
    let c: Arc<dyn Clock> = clock.clone();
    (Lock::new(sts, request, role, S(300), c), clock)
}

fn calls(lock: &Lock<FakeSts>) -> usize {
    lock.issuer.calls.lock().unwrap().len()
}

#[tokio::test]
async fn ensure_renews_only_when_needed_and_keeps_a_servable_set_on_failure() {
    let (lock, clock) = lock(false);
    let first = lock.ensure(S(300)).await.unwrap();
    assert_eq!(calls(&lock), 1);
    assert_eq!(
        lock.ensure(S(300)).await.unwrap().access_key_id,
        first.access_key_id
    );
    assert_eq!(calls(&lock), 1);
    // An INVOKE that needs more than is left renews.
    clock.advance(S(500)); // 400 s left
    let second = lock.ensure(S(450)).await.unwrap();
    assert_ne!(second.access_key_id, first.access_key_id);
    assert_eq!(calls(&lock), 2);
    // STS refuses: the held set while it is outside the margin, then nothing.
    lock.issuer
        .fail
        .store(true, std::sync::atomic::Ordering::SeqCst);
    clock.advance(S(500)); // 400 s left
    assert_eq!(
        lock.ensure(S(450)).await.unwrap().access_key_id,
        second.access_key_id
    );
    clock.advance(S(200)); // 200 s left: within the 300 s margin
    assert!(lock.ensure(S(300)).await.is_err());
    lock.issuer
        .fail
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(lock.ensure(S(300)).await.unwrap().remaining(clock.now()) > S(300));
}

#[tokio::test]
async fn ensure_falls_back_without_source_identity() {
    let (lock, _) = lock(true);
    lock.ensure(S(300)).await.unwrap();
    let sent = lock.issuer.calls.lock().unwrap().clone();
    assert_eq!(sent.len(), 2);
    assert!(sent[0].source_identity.is_some() && sent[1].source_identity.is_none());
}

#[tokio::test]
async fn answer_serves_the_set_or_503_never_without_the_token() {
    let (lock, clock) = lock(false);
    let token = new_token();
    let get = Method::GET;
    let none = answer(&lock, &token, &get, PATH, &headers(&[])).await;
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(calls(&lock), 0, "a refused request never reaches STS");
    let good = answer(&lock, &token, &get, PATH, &headers(&[&token])).await;
    assert_eq!(good.status(), StatusCode::OK);
    // Within the margin and STS refusing: 503, with no credential in it.
    clock.advance(S(700));
    lock.issuer
        .fail
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let gone = answer(&lock, &token, &get, PATH, &headers(&[&token])).await;
    assert_eq!(gone.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = String::from_utf8(
        gone.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    );
    assert!(!body.unwrap().contains("ASIALOCKED"));
}

#[test]
fn the_runtime_must_start_through_credlocks_wrapper() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        }
    };
    assert!(
        wrapper_in_place(vars(&[(
            "AWS_LAMBDA_EXEC_WRAPPER",
            "/opt/credlock-wrapper"
        )]))
        .is_ok()
    );
    assert!(wrapper_in_place(vars(&[("CREDLOCK_LAMBDA_CUSTOM_BOOTSTRAP", "1")])).is_ok());
    for refused in [
        vars(&[]),
        vars(&[("AWS_LAMBDA_EXEC_WRAPPER", "/opt/other-wrapper")]),
        vars(&[("AWS_LAMBDA_EXEC_WRAPPER", "/opt/credlock-wrapper.d")]),
        vars(&[("CREDLOCK_LAMBDA_CUSTOM_BOOTSTRAP", "yes")]),
    ] {
        let e = wrapper_in_place(refused).unwrap_err();
        assert!(e.contains("raw credentials"), "{e}");
    }
}
