//! A pipelined sequence of client requests, any methods, bodies and framing, through credlock's
//! real listener and handler to a scripted upstream that, like Python's http.server, never
//! reads request bodies: any body byte that reached it would be parsed as the next request
//! (request smuggling, issue 14). Every body carries a marker and a complete smuggled request.
//! Invariants: the upstream never receives a marker byte sequence or the smuggled request, the
//! client gets at most one answer per request it sent, and no answer carries the smuggled one.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use credlock::clock::SystemClock;
use credlock::credentials::{CredentialStore, KnownRaw, LockedCredentials, Secret};
use credlock::metrics::Metrics;
use credlock::proxy::{self, ProxyState};
use credlock::server::{self, Limits};
use credlock::upstream::{Upstream, UpstreamClient};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MARKER: &[u8] = b"SMUGGLEDBYTES";
const SMUGGLED: &[u8] = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

struct Harness {
    rt: tokio::runtime::Runtime,
    proxy: SocketAddr,
    /// Every byte the upstream received since the last reset.
    seen: Arc<Mutex<Vec<u8>>>,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let proxy = rt.block_on(async {
            let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let authority = up.local_addr().unwrap().to_string().parse().unwrap();
            tokio::spawn(upstream(up, seen.clone()));
            let now = SystemTime::now();
            let store = Arc::new(CredentialStore::default());
            store.store(LockedCredentials::new(
                "ASIALOCKEDLOCKED0001".into(),
                Secret::new("locked-secret"),
                Secret::new("locked-token"),
                now + Duration::from_secs(3600),
                now,
            ));
            let state = Arc::new(ProxyState::new(
                UpstreamClient::new(&Upstream { authority }, Duration::from_millis(300)),
                store,
                Arc::new(Metrics::new()),
                Arc::new(SystemClock),
                Duration::from_secs(60),
                Arc::new(KnownRaw::default()),
            ));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (_tx, rx) = tokio::sync::watch::channel(false);
            std::mem::forget(_tx);
            let limits = Limits {
                max_connections: 64,
                idle: Duration::from_millis(200),
                drain: Duration::from_millis(10),
            };
            tokio::spawn(server::serve(
                "fuzz",
                vec![listener],
                move |req, who| proxy::handle(state.clone(), req, who),
                limits,
                rx,
                None,
                None,
            ));
            addr
        });
        Harness { rt, proxy, seen }
    })
}

/// Answers every request head it finds with a 200 echoing the request line, and never reads a
/// body: whatever follows a head is parsed as the next head.
async fn upstream(listener: TcpListener, seen: Arc<Mutex<Vec<u8>>>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                seen.lock().unwrap().extend_from_slice(&chunk[..n]);
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head: Vec<u8> = buf.drain(..end + 4).collect();
                    let line = head.split(|&b| b == b'\r').next().unwrap_or(b"").to_vec();
                    let mut answer =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", line.len())
                            .into_bytes();
                    answer.extend_from_slice(&line);
                    if s.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

const METHODS: [&str; 6] = ["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS"];
const PATHS: [&str; 5] = [
    "/latest/meta-data/",
    "/latest/api/token",
    "/latest/meta-data/iam/security-credentials/",
    "/latest/meta-data/instance-id",
    "/",
];

/// Builds the pipelined request bytes from the input; returns them and how many requests.
fn requests(data: &[u8]) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut n = 0;
    for chunk in data.chunks(4).take(16) {
        let byte = |i: usize| chunk.get(i).copied().unwrap_or(0);
        let (m, flags, p, extra) = (byte(0), byte(1), byte(2), byte(3));
        let method = METHODS[usize::from(m) % METHODS.len()];
        let path = PATHS[usize::from(p) % PATHS.len()];
        let mut body = MARKER.to_vec();
        body.extend_from_slice(SMUGGLED);
        body.extend(std::iter::repeat_n(b'z', usize::from(extra % 32)));
        out.extend_from_slice(
            format!("{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n").as_bytes(),
        );
        if flags & 1 != 0 {
            out.extend_from_slice(b"x-aws-ec2-metadata-token-ttl-seconds: 60\r\n");
        }
        if flags & 2 != 0 {
            out.extend_from_slice(b"Expect: 100-continue\r\n");
        }
        match (flags >> 2) % 4 {
            // Content-Length with the body.
            0 => {
                out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                out.extend_from_slice(&body);
            }
            // Chunked.
            1 => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                out.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
                out.extend_from_slice(&body);
                out.extend_from_slice(b"\r\n0\r\n\r\n");
            }
            // Both (a desync classic).
            2 => {
                out.extend_from_slice(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n");
                out.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
                out.extend_from_slice(&body);
                out.extend_from_slice(b"\r\n0\r\n\r\n");
            }
            // No body at all.
            _ => out.extend_from_slice(b"\r\n"),
        }
        n += 1;
    }
    (out, n)
}

/// Counts the complete answers in `bytes`: a head up to its empty line, then a body of its
/// Content-Length (none for an answer to HEAD).
fn answers(mut bytes: &[u8], heads_only: &[bool]) -> usize {
    let mut count = 0;
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]);
        if !head.starts_with("HTTP/1.1 ") {
            break;
        }
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let no_body = heads_only.get(count).copied().unwrap_or(false);
        let take = end + 4 + if no_body { 0 } else { length };
        if take > bytes.len() {
            break;
        }
        bytes = &bytes[take..];
        count += 1;
    }
    count
}

fuzz_target!(|data: &[u8]| {
    let (wire, sent) = requests(data);
    if sent == 0 {
        return;
    }
    let heads: Vec<bool> = data
        .chunks(4)
        .take(16)
        .map(|c| METHODS[usize::from(c[0]) % METHODS.len()] == "HEAD")
        .collect();
    let h = harness();
    h.seen.lock().unwrap().clear();
    let received = h.rt.block_on(async {
        let mut s = TcpStream::connect(h.proxy).await.unwrap();
        let _ = s.write_all(&wire).await;
        let _ = s.shutdown().await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut got)).await;
        // Let any exchange still in flight reach the upstream before looking.
        tokio::time::sleep(Duration::from_millis(2)).await;
        got
    });
    let seen = h.seen.lock().unwrap().clone();
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(
        !contains(&seen, MARKER),
        "a request body reached the upstream"
    );
    assert!(
        !contains(&seen, b"/smuggled"),
        "a smuggled request reached the upstream"
    );
    assert!(
        !contains(&received, b"/smuggled"),
        "a client got the smuggled request's answer"
    );
    let n = answers(&received, &heads);
    assert!(n <= sent, "{n} answers to {sent} requests");
});
