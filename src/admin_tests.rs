//! The admin listener's answers, served by [`handle`] on a loopback connection (hyper's HTTP/1
//! server, as credlock's own listeners use) around an [`AdminState`] with a fixed clock and a
//! credential store the test fills: no IMDS, no STS. Every held set's key id, secret and token
//! carry a mark that no answer may contain.

use std::convert::Infallible;
use std::path::PathBuf;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::clock::ManualClock;
use crate::credentials::{CredentialStore, KnownRaw, LockedCredentials, Secret};
use crate::identity::RoleArn;

/// 2027-01-15T08:00:00Z.
const T0: u64 = 1_800_000_000;
const MARGIN: Duration = Duration::from_secs(300);

const KEY: &str = "ASIAMARKKEY000000001";
const SECRET: &str = "MARKSECRET/wJalrXUtnFEMIK7MDENG";
const TOKEN: &str = "MARKTOKEN/IQoJb3JpZ2luX2VjEXAMPLE";

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + secs)
}

/// A locked set issued at `t(0)` that expires at `t(expires)`.
fn set(key: &str, expires: u64) -> LockedCredentials {
    LockedCredentials::new(
        key.into(),
        Secret::new(SECRET),
        Secret::new(TOKEN),
        t(expires),
        t(0),
    )
}

/// A loopback address nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

fn no_firewall() -> FirewallWatch {
    FirewallWatch::new(
        PathBuf::from("/nonexistent/credlock-firewall/state"),
        Some(false),
    )
}

struct Admin {
    store: Arc<CredentialStore>,
    lock_status: Arc<ArcSwap<LockStatus>>,
    client: UpstreamClient,
}

/// An admin listener on loopback, its clock at `t(0)`; `imds_listener` is what `/healthz`
/// connects to and `/readyz` probes.
async fn admin(imds_listener: SocketAddr, firewall: FirewallWatch) -> Admin {
    let store = Arc::new(CredentialStore::default());
    let unused: http::uri::Authority = closed_port().await.to_string().parse().unwrap();
    let proxy = Arc::new(ProxyState::new(
        UpstreamClient::new(&Upstream { authority: unused }, Duration::from_secs(1)),
        store.clone(),
        Arc::new(Metrics::new()),
        Arc::new(ManualClock::new(t(0))),
        MARGIN,
        Arc::new(KnownRaw::default()),
    ));
    let lock_status = Arc::new(ArcSwap::from_pointee(LockStatus::default()));
    let state = Arc::new(AdminState::new(
        proxy,
        lock_status.clone(),
        Arc::new(ArcSwap::from_pointee(Vec::new())),
        imds_listener,
        firewall,
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority = listener.local_addr().unwrap().to_string().parse().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let state = state.clone();
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                TokioIo::new(stream),
                service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(state, req).await) }
                }),
            ));
        }
    });
    Admin {
        store,
        lock_status,
        client: UpstreamClient::new(&Upstream { authority }, Duration::from_secs(5)),
    }
}

/// Status, Content-Type and body of one request.
async fn ask(admin: &Admin, method: Method, path: &str) -> (u16, String, String) {
    let r = admin
        .client
        .send(method, path, HeaderMap::new())
        .await
        .unwrap();
    let content_type = r
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (
        r.status.as_u16(),
        content_type,
        String::from_utf8(r.body.to_vec()).unwrap(),
    )
}

async fn get(admin: &Admin, path: &str) -> (u16, String) {
    let (status, _, body) = ask(admin, Method::GET, path).await;
    (status, body)
}

fn assert_no_secret(body: &str) {
    for mark in [KEY, SECRET, TOKEN, "MARK"] {
        assert!(!body.contains(mark), "{mark} in {body}");
    }
}

fn status_json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test]
async fn readyz_without_a_locked_set_is_503_no_locked_credentials_yet() {
    let admin = admin(closed_port().await, no_firewall()).await;
    let (status, body) = get(&admin, "/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: no locked credentials yet\n")
    );
}

#[tokio::test]
async fn readyz_with_a_set_inside_the_serving_margin_is_503_naming_its_expiration() {
    let admin = admin(closed_port().await, no_firewall()).await;
    // 200 s left, the margin is 300 s.
    admin.store.store(set(KEY, 200));
    let (status, body) = get(&admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("2027-01-15T08:03:20Z"), "{body}");
    assert!(body.contains("serving margin"), "{body}");
    assert_no_secret(&body);
}

/// The probe asks credlock's own listener (here a stand-in) for a token, then the locked
/// role's credentials with it, and is ready only when the answer carries the held set.
#[tokio::test]
async fn readyz_is_ready_only_when_the_listener_serves_the_held_set() {
    for (served, ready) in [(KEY, true), ("ASIAOTHERKEY00000001", false)] {
        let (listener_addr, requests) = listener_serving(served).await;
        let admin = admin(listener_addr, no_firewall()).await;
        admin.store.store(set(KEY, 3600));
        admin.lock_status.store(Arc::new(LockStatus {
            role_arn: RoleArn::parse("arn:aws:iam::123456789012:role/my-role"),
            ..LockStatus::default()
        }));
        let (status, body) = get(&admin, "/readyz").await;
        if ready {
            assert_eq!(
                (status, body.as_str()),
                (200, "ready: locked credentials served, 3600 s left\n")
            );
        } else {
            assert_eq!(status, 503, "{body}");
            assert!(body.contains("does not carry the locked set"), "{body}");
        }
        assert_no_secret(&body);
        let requests = requests.lock().unwrap().clone();
        assert_eq!(
            requests,
            [
                "PUT /latest/api/token".to_string(),
                "GET /latest/meta-data/iam/security-credentials/my-role token=probe-token"
                    .to_string()
            ]
        );
    }
}

/// A stand-in for credlock's IMDS listener: a token for a PUT with a TTL, then a credential
/// document carrying `key` for a GET with that token. Records each request line (and token).
async fn listener_serving(key: &str) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    let document = format!(
        "{{\"Code\":\"Success\",\"Type\":\"AWS-HMAC\",\"AccessKeyId\":\"{key}\",\
         \"SecretAccessKey\":\"{SECRET}\",\"Token\":\"{TOKEN}\",\
         \"Expiration\":\"2027-01-15T09:00:00Z\"}}"
    );
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = Vec::new();
            loop {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut req = httparse::Request::new(&mut headers);
                let Ok(httparse::Status::Complete(len)) = req.parse(&buf) else {
                    let mut chunk = [0u8; 4096];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    continue;
                };
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).into_owned())
                };
                let line = format!("{} {}", req.method.unwrap(), req.path.unwrap());
                let (status, body) = match (line.as_str(), header(crate::route::TOKEN_HEADER)) {
                    ("PUT /latest/api/token", _)
                        if header(crate::route::TOKEN_TTL_HEADER).is_some() =>
                    {
                        seen.lock().unwrap().push(line);
                        (200, "probe-token".to_string())
                    }
                    (_, Some(token)) => {
                        seen.lock().unwrap().push(format!("{line} token={token}"));
                        (200, document.clone())
                    }
                    _ => {
                        seen.lock().unwrap().push(line);
                        (401, String::new())
                    }
                };
                buf.drain(..len);
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    break;
                }
            }
        }
    });
    (addr, requests)
}

#[tokio::test]
async fn readyz_is_503_while_a_required_firewall_is_not_enforced() {
    let (listener_addr, _) = listener_serving(KEY).await;
    // Required, and no state file: the firewall's state is unknown.
    let missing = FirewallWatch::new(PathBuf::from("/nonexistent/credlock-fw/state"), Some(true));
    let admin = admin(listener_addr, missing).await;
    admin.store.store(set(KEY, 3600));
    let (status, body) = get(&admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("not ready: the firewall is not enforced"),
        "{body}"
    );
    let v = status_json(&get(&admin, "/status").await.1);
    assert_eq!(
        (&v["firewall"]["required"], &v["firewall"]["enforced"]),
        (&serde_json::json!(true), &serde_json::json!(false))
    );
}

#[tokio::test]
async fn status_follows_the_held_set_and_never_shows_its_values() {
    let admin = admin(closed_port().await, no_firewall()).await;
    let (code, content_type, body) = ask(&admin, Method::GET, "/status").await;
    assert_eq!((code, content_type.as_str()), (200, "application/json"));
    let v = status_json(&body);
    assert_eq!(v["ready"], false);
    assert_eq!(
        v["credentials"],
        serde_json::json!({"held": false, "expiration": null, "remaining_seconds": null})
    );

    admin.store.store(set(KEY, 3600));
    let (_, body) = get(&admin, "/status").await;
    assert_no_secret(&body);
    let v = status_json(&body);
    assert_eq!(v["ready"], true);
    assert_eq!(
        v["credentials"],
        serde_json::json!({
            "held": true,
            "expiration": "2027-01-15T09:00:00Z",
            "remaining_seconds": 3600
        })
    );

    // Held but inside the serving margin: not ready, still held.
    admin.store.store(set(KEY, 200));
    let (_, body) = get(&admin, "/status").await;
    assert_no_secret(&body);
    let v = status_json(&body);
    assert_eq!(v["ready"], false);
    assert_eq!(v["credentials"]["held"], true);
    assert_eq!(v["credentials"]["remaining_seconds"], 200);
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_credlock_ready_following_the_held_set() {
    let admin = admin(closed_port().await, no_firewall()).await;
    let ready_line = |body: &str| {
        body.lines()
            .find(|l| l.starts_with("credlock_ready "))
            .map(str::to_string)
    };
    for (held, expected) in [
        (None, "credlock_ready 0"),
        (Some(3600), "credlock_ready 1"),
        (Some(200), "credlock_ready 0"),
    ] {
        if let Some(expires) = held {
            admin.store.store(set(KEY, expires));
        }
        let (code, content_type, body) = ask(&admin, Method::GET, "/metrics").await;
        assert_eq!(code, 200);
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        assert_eq!(ready_line(&body).as_deref(), Some(expected), "{held:?}");
        assert_no_secret(&body);
    }
}

#[tokio::test]
async fn only_get_and_head_are_answered_and_unknown_paths_are_404() {
    let admin = admin(closed_port().await, no_firewall()).await;
    admin.store.store(set(KEY, 3600));
    for path in ["/healthz", "/readyz", "/metrics", "/status", "/nope"] {
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            let (code, _, body) = ask(&admin, method.clone(), path).await;
            assert_eq!(code, 405, "{method} {path}: {body}");
        }
    }
    let (code, _, body) = ask(&admin, Method::HEAD, "/status").await;
    assert_eq!((code, body.as_str()), (200, ""));
    for path in [
        "/",
        "/nope",
        "/status/extra",
        "/STATUS",
        "/latest/api/token",
    ] {
        let (code, body) = get(&admin, path).await;
        assert_eq!(code, 404, "{path}: {body}");
    }
}

#[tokio::test]
async fn healthz_follows_whether_the_imds_listener_accepts_connections() {
    let nobody = closed_port().await;
    let admin_down = admin(nobody, no_firewall()).await;
    let (code, body) = get(&admin_down, "/healthz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&nobody.to_string()), "{body}");

    // The kernel completes connections to a bound, listening socket.
    let listening = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_up = admin(listening.local_addr().unwrap(), no_firewall()).await;
    let (code, body) = get(&admin_up, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
}
