//! Tests of the pooled upstream client and its request and response handling.

use super::*;

#[test]
fn every_error_label_is_in_the_precreated_set() {
    for e in [
        UpstreamError::Connect,
        UpstreamError::Timeout(Duration::ZERO),
        UpstreamError::Protocol,
    ] {
        assert!(UpstreamError::LABELS.contains(&e.label()), "{e:?}");
    }
}

#[test]
fn hop_by_hop_headers_go_end_to_end_headers_stay() {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("keep-alive, X-Private"),
    );
    h.insert("x-private", HeaderValue::from_static("1"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    h.insert("x-aws-ec2-metadata-token", HeaderValue::from_static("t"));
    h.insert(
        "x-aws-ec2-metadata-token-ttl-seconds",
        HeaderValue::from_static("21600"),
    );
    h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
    strip_hop_by_hop(&mut h);
    let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
    assert_eq!(
        left,
        [
            "x-aws-ec2-metadata-token",
            "x-aws-ec2-metadata-token-ttl-seconds",
            "x-forwarded-for"
        ]
    );
}
// ---- the exchange, against a scripted upstream speaking raw HTTP/1.1 ------------------

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One accepted connection: answers each request head it reads with the next response,
/// then closes. Returns every request as received, per connection.
type Script = Vec<Vec<&'static [u8]>>;

async fn upstream(script: Script) -> (Upstream, tokio::task::JoinHandle<Vec<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority = listener.local_addr().unwrap().to_string().parse().unwrap();
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        for responses in script {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut requests = Vec::new();
            let mut buf = Vec::new();
            for response in responses {
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    let mut chunk = [0u8; 1024];
                    let n = stream.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "the client closed mid-request");
                    buf.extend_from_slice(&chunk[..n]);
                };
                requests.push(String::from_utf8(buf.drain(..head_end).collect()).unwrap());
                stream.write_all(response).await.unwrap();
            }
            seen.push(requests);
        }
        seen
    });
    (Upstream { authority }, task)
}

fn client(upstream: &Upstream) -> UpstreamClient {
    UpstreamClient::new(upstream, Duration::from_millis(500))
}

async fn get(c: &UpstreamClient, path: &str) -> Result<UpstreamResponse, UpstreamError> {
    c.send(Method::GET, path, HeaderMap::new()).await
}

const OK_KEEP_ALIVE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 19\r\n\r\ni-0123456789abcdef0";

#[tokio::test]
async fn requests_are_written_as_imds_expects_and_connections_are_reused() {
    let (up, seen) = upstream(vec![vec![
        OK_KEEP_ALIVE,
        OK_KEEP_ALIVE,
        b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nTOKN",
    ]])
    .await;
    let c = client(&up);
    let r = get(&c, "/latest/meta-data/instance-id").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"i-0123456789abcdef0");
    assert_eq!(r.headers["content-type"], "text/plain");
    let mut h = HeaderMap::new();
    h.insert("x-aws-ec2-metadata-token", HeaderValue::from_static("AQAE"));
    h.insert(header::HOST, HeaderValue::from_static("evil.example"));
    c.send(Method::GET, "/latest/meta-data/?x=1", h)
        .await
        .unwrap();
    let mut h = HeaderMap::new();
    h.insert(
        "x-aws-ec2-metadata-token-ttl-seconds",
        HeaderValue::from_static("21600"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("7"));
    let r = c.send(Method::PUT, "/latest/api/token", h).await.unwrap();
    assert_eq!(&r.body[..], b"TOKN");
    let seen = seen.await.unwrap();
    let host = format!("host: {}\r\n", up.authority);
    assert_eq!(seen.len(), 1, "three requests, one connection");
    assert_eq!(
        seen[0][0],
        format!("GET /latest/meta-data/instance-id HTTP/1.1\r\n{host}\r\n")
    );
    assert_eq!(
        seen[0][1],
        format!(
            "GET /latest/meta-data/?x=1 HTTP/1.1\r\n{host}x-aws-ec2-metadata-token: AQAE\r\n\r\n"
        )
    );
    assert_eq!(
        seen[0][2],
        format!(
            "PUT /latest/api/token HTTP/1.1\r\n{host}x-aws-ec2-metadata-token-ttl-seconds: 21600\r\ncontent-length: 0\r\n\r\n"
        )
    );
}

#[tokio::test]
async fn chunked_bodies_are_decoded_and_lose_their_framing_headers() {
    let (up, _seen) = upstream(vec![vec![
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nx-trailer: 1\r\n\r\n",
        OK_KEEP_ALIVE,
    ]])
    .await;
    let c = client(&up);
    let r = get(&c, "/a").await.unwrap();
    assert_eq!(&r.body[..], b"Wikipedia");
    assert!(!r.headers.contains_key(header::CONTENT_LENGTH));
    assert!(!r.headers.contains_key(header::TRANSFER_ENCODING));
    // The trailer was consumed: the same connection carries the next exchange.
    assert_eq!(
        &get(&c, "/b").await.unwrap().body[..],
        b"i-0123456789abcdef0"
    );
}

#[tokio::test]
async fn hop_by_hop_answer_headers_never_reach_the_client() {
    let (up, _seen) = upstream(vec![vec![
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nServer: EC2ws\r\ncontent-length: 1\r\n\r\na",
        b"HTTP/1.1 200 OK\r\nconnection: X-Private\r\nx-private: 1\r\nupgrade: h2c\r\ncontent-length: 1\r\n\r\nb",
    ]])
    .await;
    let c = client(&up);
    let r = get(&c, "/a").await.unwrap();
    let names: Vec<_> = r.headers.keys().map(|n| n.as_str()).collect();
    assert_eq!(names, ["server", "content-length"]);
    // Connection naming another header: the proxy's strip removes both.
    let mut h = get(&c, "/b").await.unwrap().headers;
    strip_hop_by_hop(&mut h);
    let names: Vec<_> = h.keys().map(|n| n.as_str()).collect();
    assert_eq!(names, ["content-length"]);
}

#[tokio::test]
async fn bodies_without_a_length_end_at_the_close_and_the_connection_is_not_reused() {
    let (up, seen) = upstream(vec![
        vec![b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end"],
        vec![b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"],
        vec![OK_KEEP_ALIVE],
    ])
    .await;
    let c = client(&up);
    assert_eq!(&get(&c, "/a").await.unwrap().body[..], b"until the end");
    assert_eq!(&get(&c, "/b").await.unwrap().body[..], b"ok");
    assert_eq!(get(&c, "/c").await.unwrap().status, StatusCode::OK);
    assert_eq!(seen.await.unwrap().len(), 3);
}

#[tokio::test]
async fn head_204_and_interim_answers_carry_no_body() {
    let (up, _seen) = upstream(vec![vec![
        b"HTTP/1.1 200 OK\r\ncontent-length: 19\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\nnop",
    ]])
    .await;
    let c = client(&up);
    let r = c.send(Method::HEAD, "/x", HeaderMap::new()).await.unwrap();
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, 0));
    assert_eq!(r.headers[header::CONTENT_LENGTH], "19");
    assert_eq!(get(&c, "/y").await.unwrap().status, StatusCode::NO_CONTENT);
    let r = get(&c, "/z").await.unwrap();
    assert_eq!(
        (r.status, &r.body[..]),
        (StatusCode::NOT_FOUND, &b"nop"[..])
    );
}

#[tokio::test]
async fn an_idle_connection_the_upstream_closed_is_replaced_transparently() {
    // The first connection answers once and closes (as an upstream's idle timeout would).
    let (up, seen) = upstream(vec![vec![OK_KEEP_ALIVE], vec![OK_KEEP_ALIVE]]).await;
    let c = client(&up);
    get(&c, "/a").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(get(&c, "/b").await.unwrap().status, StatusCode::OK);
    let seen = seen.await.unwrap();
    assert_eq!(seen.len(), 2);
    assert!(seen[1][0].starts_with("GET /b "));
}

#[tokio::test]
async fn malformed_truncated_or_oversized_answers_are_protocol_errors() {
    let cases: [&'static [u8]; 6] = [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 99999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nZZ\r\n",
    ];
    for case in cases {
        let (up, _seen) = upstream(vec![vec![case]]).await;
        let e = get(&client(&up), "/x").await.unwrap_err();
        assert!(
            matches!(e, UpstreamError::Protocol),
            "{:?} gave {e:?}",
            String::from_utf8_lossy(case)
        );
    }
}

#[tokio::test]
async fn a_silent_upstream_times_out_and_a_closed_port_cannot_connect() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = Upstream {
        authority: listener.local_addr().unwrap().to_string().parse().unwrap(),
    };
    let started = Instant::now();
    assert!(matches!(
        get(&client(&up), "/x").await,
        Err(UpstreamError::Timeout(_))
    ));
    assert!(started.elapsed() >= Duration::from_millis(500));
    drop(listener);
    assert!(matches!(
        get(&client(&up), "/x").await,
        Err(UpstreamError::Connect)
    ));
}

#[tokio::test]
async fn every_request_on_a_reused_connection_gets_the_whole_deadline() {
    // One connection: answers the first three requests, then reads and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = Upstream {
        authority: listener.local_addr().unwrap().to_string().parse().unwrap(),
    };
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let (mut buf, mut requests) = (Vec::new(), 0);
        loop {
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return requests;
            }
            buf.extend_from_slice(&chunk[..n]);
            while let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                buf.drain(..i + 4);
                requests += 1;
                if requests <= 3 {
                    stream.write_all(OK_KEEP_ALIVE).await.unwrap();
                }
            }
        }
    });
    let c = client(&up); // 500 ms
    let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
    get(&c, "/a").await.unwrap();
    // Reused before the first deadline passed: the timer is moved later in place.
    pause(300).await;
    get(&c, "/b").await.unwrap();
    // Idle past that deadline, so the timer has fired: reused, it is set again.
    pause(700).await;
    get(&c, "/c").await.unwrap();
    // Reused once more, 300 ms later; never answered: the full 500 ms, not what was left of
    // an earlier request's deadline.
    pause(300).await;
    let started = Instant::now();
    assert!(matches!(
        get(&c, "/d").await,
        Err(UpstreamError::Timeout(_))
    ));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
    // The timed-out connection was closed, not pooled; all four went over the one connection.
    drop(c);
    assert_eq!(server.await.unwrap(), 4);
}

#[tokio::test]
async fn a_target_that_could_split_the_request_line_is_refused() {
    let up = Upstream {
        authority: "127.0.0.1:9".parse().unwrap(),
    };
    for bad in ["/a b", "/a\r\nx: y", "relative", ""] {
        assert!(matches!(
            get(&client(&up), bad).await,
            Err(UpstreamError::Protocol)
        ));
    }
}

// ---- the head parser on arbitrary input ---------------------------------------------

proptest::proptest! {
    /// Whatever the upstream sends, parsing answers (complete, partial or refused) and
    /// never panics; offsets it keeps stay inside the head.
    #[test]
    fn any_bytes_parse_or_are_refused(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
        for method in [Method::GET, Method::HEAD] {
            if let Ok(Some((len, Parsed::Final(head)))) = http1::parse_head(&bytes, method == Method::HEAD) {
                proptest::prop_assert!(len <= bytes.len());
                for span in head.lines {
                    proptest::prop_assert!(span.name.end <= len && span.value.end <= len);
                }
            }
        }
    }

    /// A well-formed head: the status, the framing from Content-Length, and every
    /// end-to-end header, hop-by-hop ones gone once the proxy has stripped them.
    #[test]
    fn well_formed_heads_keep_their_end_to_end_headers(
        code in 200u16..600,
        length in 0usize..5000,
        names in proptest::collection::vec("(x-[a-z]{1,8}|connection|keep-alive|upgrade|te)", 0..6),
        value in "[0-9]{1,6}",
    ) {
        let mut raw = format!("HTTP/1.1 {code} X\r\ncontent-length: {length}\r\n");
        for name in &names {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        raw.push_str("\r\n");
        let Some((len, Parsed::Final(head))) = http1::parse_head(raw.as_bytes(), false).unwrap() else {
            panic!("a complete head");
        };
        proptest::prop_assert_eq!(len, raw.len());
        proptest::prop_assert_eq!(head.status.as_u16(), code);
        let bodiless = code == 204 || code == 304 || length == 0;
        proptest::prop_assert_eq!(head.framing, if bodiless { Framing::Empty } else { Framing::Length(length) });
        let block = Bytes::from(raw);
        let mut map = header_map(&block, &head.lines).unwrap();
        // As the proxy does: a Connection naming other headers is kept for this.
        strip_hop_by_hop(&mut map);
        // The order of differently named fields carries no meaning (RFC 9110 §5.3), and
        // HeaderMap's removals reorder them.
        let mut kept: Vec<String> = map.keys().map(|k| k.to_string()).collect();
        kept.sort();
        let mut want = vec!["content-length".to_string()];
        for name in &names {
            if name.starts_with("x-") && !want.contains(name) {
                want.push(name.clone());
            }
        }
        want.sort();
        proptest::prop_assert_eq!(kept, want);
    }
}
