//! The pooled HTTP/1.1 client to the upstream IMDS. One round trip per call, a hard deadline
//! on the whole exchange (SDKs give up after about a second: AWS SDKs and Tools Reference Guide,
//! "IMDS credential provider", `ec2_metadata_service_timeout`), bounded response size.
//!
//! The exchange runs inside the calling task on a pooled connection: the request is written in
//! one `write`, the response head is parsed by `httparse` (the parser hyper uses) and the body
//! framed as RFC 9112 §6.3 says (no body for HEAD, 1xx, 204 and 304; chunked; Content-Length;
//! else up to the close). hyper's clients drive each connection from a task of its own, with
//! channel hand-offs both ways on every request; doing the exchange in the calling task took
//! credlock from 0.83x to 0.86x nginx's passthrough throughput (issue 7, `benches/README.md`).

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::http1::{self, Framing, HeaderSpan, Parsed};

pub use crate::http1::MAX_RESPONSE_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the IMDS upstream")]
    Connect,
    #[error("the IMDS upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the IMDS upstream sent a malformed or oversized response")]
    Protocol,
}

impl UpstreamError {
    /// Every value [`UpstreamError::label`] can give (series created before the first error).
    pub const LABELS: [&'static str; 3] = ["connect", "timeout", "protocol"];

    /// The closed label set for `credlock_upstream_errors_total`.
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamError::Connect => "connect",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Protocol => "protocol",
        }
    }

    /// What the client is told: 504 for a hang, 502 otherwise.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// A complete upstream answer. Its body may hold the instance role's raw credentials, so
/// `Debug` never shows it.
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl std::fmt::Debug for UpstreamResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamResponse")
            .field("status", &self.status)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// Idle upstream connections kept for reuse (nginx's `keepalive` of the benchmark is 128).
const MAX_IDLE: usize = 64;
/// An idle connection older than this is closed instead of reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A response head larger than this is not IMDS.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Read buffer of a connection; grows as a response needs.
const READ_BUFFER: usize = 4096;

/// Where the upstream IMDS is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `host:port` as written into the Host header and used to connect.
    pub authority: http::uri::Authority,
}

/// A request's headers and the allow list they are written through.
#[derive(Clone, Copy)]
struct Headers<'a> {
    map: &'a HeaderMap,
    keep: fn(&HeaderName) -> bool,
}

/// Cheap to clone: the pool is shared.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Arc<Pool>,
}

struct Pool {
    target: Target,
    /// The Host header line, written as is into every request.
    host_line: Vec<u8>,
    timeout: Duration,
    /// Last in, first out: the most recently used connection is the least likely to have been
    /// closed by the upstream; the bottom of the stack is the longest idle.
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    conn: Pooled,
    since: Instant,
}

/// A connection and its deadline timer. The timer lives as long as the connection and is reset
/// for each request rather than created: tokio moves a registered timer's deadline later without
/// touching its wheel, so a busy connection costs no timer registration per request.
struct Pooled {
    conn: Conn,
    timer: Pin<Box<Sleep>>,
}

/// One upstream connection and its buffers (kept with it, so a reused connection allocates
/// nothing to write a request).
struct Conn {
    stream: TcpStream,
    read: BytesMut,
    write: Vec<u8>,
}

/// Where to connect: an address (IMDS is one) or a name resolved at each new connection.
enum Target {
    Addr(SocketAddr),
    Name(String, u16),
}

/// Why one exchange failed, before it becomes an [`UpstreamError`].
enum Failure {
    /// Nothing of a response arrived and the connection closed or reset: on a reused
    /// connection the upstream closed it while idle, and the request can go again.
    ClosedBeforeResponse,
    Fatal(UpstreamError),
}

impl Failure {
    fn into_error(self) -> UpstreamError {
        match self {
            Failure::ClosedBeforeResponse => UpstreamError::Protocol,
            Failure::Fatal(e) => e,
        }
    }
}

impl From<UpstreamError> for Failure {
    fn from(e: UpstreamError) -> Self {
        Failure::Fatal(e)
    }
}

impl UpstreamClient {
    pub fn new(upstream: &Upstream, timeout: Duration) -> Self {
        let authority = &upstream.authority;
        let port = authority.port_u16().unwrap_or(80);
        let host = authority.host();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let target = match bare.parse::<IpAddr>() {
            Ok(ip) => Target::Addr(SocketAddr::new(ip, port)),
            Err(_) => Target::Name(bare.to_string(), port),
        };
        UpstreamClient {
            inner: Arc::new(Pool {
                target,
                host_line: format!("host: {}\r\n", authority.as_str()).into_bytes(),
                timeout,
                idle: Mutex::new(Vec::with_capacity(MAX_IDLE)),
            }),
        }
    }

    /// Sends one request. `path_and_query` is origin-form; `headers` are end-to-end headers
    /// (the caller has removed hop-by-hop ones); Host is set to the upstream's authority.
    ///
    /// There is no body parameter: no IMDS request carries one (the token PUT included), and a
    /// body the upstream does not read would be taken as the start of the next request on the
    /// pooled connection (request smuggling, issue 14). No byte a client sends after its head
    /// can reach the upstream.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        headers: HeaderMap,
    ) -> Result<UpstreamResponse, UpstreamError> {
        self.send_only(method, path_and_query, &headers, |_| true)
            .await
    }

    /// [`UpstreamClient::send`] with only the headers `keep` accepts (an allow list, applied
    /// while the request is written: nothing is copied).
    pub async fn send_only(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &HeaderMap,
        keep: fn(&HeaderName) -> bool,
    ) -> Result<UpstreamResponse, UpstreamError> {
        // The target comes from a parsed request line; this keeps the request line whole
        // whoever the caller is.
        if !path_and_query.starts_with('/')
            || path_and_query.bytes().any(|b| b <= b' ' || b == 0x7f)
        {
            return Err(UpstreamError::Protocol);
        }
        let headers = Headers { map: headers, keep };
        self.inner.exchange(&method, path_and_query, &headers).await
    }
}

impl Pool {
    async fn exchange(
        &self,
        method: &Method,
        target: &str,
        headers: &Headers<'_>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        // One deadline for the whole exchange, the retry on a new connection included.
        let deadline = tokio::time::Instant::now() + self.timeout;
        if let Some(mut pooled) = self.pooled() {
            pooled.timer.as_mut().reset(deadline);
            match self.round_trip(pooled, method, target, headers).await {
                // Closed while idle: once more on a new connection.
                Err(Failure::ClosedBeforeResponse) => {}
                done => return done.map_err(Failure::into_error),
            }
        }
        let conn = tokio::time::timeout_at(deadline, self.connect())
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))??;
        let pooled = Pooled {
            conn,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
        };
        self.round_trip(pooled, method, target, headers)
            .await
            .map_err(Failure::into_error)
    }

    async fn connect(&self) -> Result<Conn, UpstreamError> {
        let stream = match &self.target {
            Target::Addr(addr) => TcpStream::connect(addr).await,
            Target::Name(name, port) => TcpStream::connect((name.as_str(), *port)).await,
        }
        .map_err(|_| UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            read: BytesMut::with_capacity(READ_BUFFER),
            write: Vec::with_capacity(512),
        })
    }

    /// One request and its whole response on `pooled`, before its timer fires; the connection
    /// goes back to the pool if it may carry another request.
    ///
    /// The pool's invariant: a connection is reused only when the request (a head, never a
    /// body) and the response were each completely and unambiguously framed, the upstream
    /// agreed to keep it open, and nothing unread is left in its buffer (and, checked again at
    /// checkout, on its socket). Anything else closes it, so one exchange can never answer
    /// another's request.
    async fn round_trip(
        &self,
        pooled: Pooled,
        method: &Method,
        target: &str,
        headers: &Headers<'_>,
    ) -> Result<UpstreamResponse, Failure> {
        let Pooled {
            mut conn,
            mut timer,
        } = pooled;
        let response = tokio::select! {
            biased;
            response = self.request(&mut conn, method, target, headers) => response?,
            // The connection is dropped: its state is unknown.
            () = timer.as_mut() => return Err(UpstreamError::Timeout(self.timeout).into()),
        };
        if response.reusable && conn.read.is_empty() {
            self.checkin(Pooled { conn, timer });
        }
        Ok(response.response)
    }

    async fn request(
        &self,
        conn: &mut Conn,
        method: &Method,
        target: &str,
        headers: &Headers<'_>,
    ) -> Result<Answer, Failure> {
        encode_request(&mut conn.write, &self.host_line, method, target, headers);
        if let Err(e) = conn.stream.write_all(&conn.write).await {
            return Err(closed_or(e));
        }
        let head = read_head(conn, method).await?;
        let body = read_body(conn, head.framing).await?;
        Ok(Answer {
            reusable: head.framing != Framing::UntilClose && head.keep_alive,
            response: UpstreamResponse {
                status: head.status,
                headers: head.headers,
                body,
            },
        })
    }

    /// An idle connection, if the pool has one young enough whose socket is quiet: an idle
    /// connection on which the upstream sent anything (bytes nobody asked for, or its close)
    /// is dropped, never read as the next request's answer.
    fn pooled(&self) -> Option<Pooled> {
        let mut idle = self.lock_idle();
        loop {
            let Idle { conn, since } = idle.pop()?;
            if since.elapsed() > IDLE_TIMEOUT {
                // Everything below is older still.
                idle.clear();
                return None;
            }
            let mut probe = [0u8; 1];
            match conn.conn.stream.try_read(&mut probe) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(conn),
                // Data, end of stream or an error: not a connection to send a request on.
                _ => continue,
            }
        }
    }

    fn checkin(&self, conn: Pooled) {
        let now = Instant::now();
        let mut idle = self.lock_idle();
        // Under a steady light load the bottom of the stack is never popped: close it here
        // once it has idled too long.
        if idle
            .first()
            .is_some_and(|oldest| now.duration_since(oldest.since) > IDLE_TIMEOUT)
        {
            idle.remove(0);
        }
        if idle.len() < MAX_IDLE {
            idle.push(Idle { conn, since: now });
        }
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // Nothing can panic while the lock is held; a poisoned pool is still a valid list.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A write or read that failed because the peer had closed or reset the connection.
fn closed_or(e: std::io::Error) -> Failure {
    match e.kind() {
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => {
            Failure::ClosedBeforeResponse
        }
        _ => Failure::Fatal(UpstreamError::Protocol),
    }
}

/// Serialises one request head into `out` (cleared first). Header names and values come from
/// a `HeaderMap`, which holds no CR or LF; a client's Content-Length and Transfer-Encoding are
/// never copied: the request has no body, and says so.
fn encode_request(
    out: &mut Vec<u8>,
    host_line: &[u8],
    method: &Method,
    target: &str,
    headers: &Headers<'_>,
) {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    out.extend_from_slice(host_line);
    for (name, value) in headers.map {
        if name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || !(headers.keep)(name)
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // As hyper does: methods that carry no body get no Content-Length; the others (the token
    // PUT) say that theirs is empty.
    let bodiless = matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::DELETE
            | Method::OPTIONS
            | Method::CONNECT
            | Method::TRACE
    );
    if !bodiless {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A response, and whether its connection may carry another request.
struct Answer {
    response: UpstreamResponse,
    reusable: bool,
}

struct Head {
    status: StatusCode,
    headers: HeaderMap,
    keep_alive: bool,
    framing: Framing,
}

/// Reads until one final (non-1xx) response head is parsed; its bytes leave `conn.read`.
async fn read_head(conn: &mut Conn, method: &Method) -> Result<Head, Failure> {
    let mut received_any = false;
    loop {
        if !conn.read.is_empty() {
            received_any = true;
            let parsed = http1::parse_head(&conn.read, *method == Method::HEAD)
                .map_err(|_| UpstreamError::Protocol)?;
            if let Some((len, parsed)) = parsed {
                let block = conn.read.split_to(len).freeze();
                match parsed {
                    Parsed::Interim => continue,
                    Parsed::Final(head) => {
                        return Ok(Head {
                            status: head.status,
                            headers: header_map(&block, &head.lines)?,
                            keep_alive: head.keep_alive,
                            framing: head.framing,
                        });
                    }
                }
            }
            if conn.read.len() >= MAX_HEAD_BYTES {
                return Err(UpstreamError::Protocol.into());
            }
        }
        conn.read.reserve(READ_BUFFER);
        match conn.stream.read_buf(&mut conn.read).await {
            Ok(0) if !received_any => return Err(Failure::ClosedBeforeResponse),
            Ok(0) => return Err(UpstreamError::Protocol.into()),
            Ok(_) => {}
            Err(e) if !received_any => return Err(closed_or(e)),
            Err(_) => return Err(UpstreamError::Protocol.into()),
        }
    }
}

/// The head's header lines as a `HeaderMap`; values share the head's buffer.
fn header_map(block: &Bytes, lines: &[HeaderSpan]) -> Result<HeaderMap, UpstreamError> {
    let mut headers = HeaderMap::with_capacity(lines.len());
    for span in lines {
        let name = HeaderName::from_bytes(&block[span.name.clone()])
            .map_err(|_| UpstreamError::Protocol)?;
        let value = HeaderValue::from_maybe_shared(block.slice(span.value.clone()))
            .map_err(|_| UpstreamError::Protocol)?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Reads more into `conn.read`; `false` at end of stream.
async fn fill(conn: &mut Conn) -> Result<bool, UpstreamError> {
    conn.read.reserve(READ_BUFFER);
    match conn.stream.read_buf(&mut conn.read).await {
        Ok(0) => Ok(false),
        Ok(_) => Ok(true),
        Err(_) => Err(UpstreamError::Protocol),
    }
}

async fn read_body(conn: &mut Conn, framing: Framing) -> Result<Bytes, UpstreamError> {
    match framing {
        Framing::Empty => Ok(Bytes::new()),
        Framing::Length(n) => {
            while conn.read.len() < n {
                conn.read.reserve(n - conn.read.len());
                if !fill(conn).await? {
                    return Err(UpstreamError::Protocol);
                }
            }
            Ok(conn.read.split_to(n).freeze())
        }
        Framing::UntilClose => {
            while fill(conn).await? {
                if conn.read.len() > MAX_RESPONSE_BYTES {
                    return Err(UpstreamError::Protocol);
                }
            }
            Ok(conn.read.split().freeze())
        }
        Framing::Chunked => read_chunked(conn).await,
    }
}

/// Reads a chunked body (RFC 9112 §7.1) with [`http1::decode_chunked`]; its trailers are read
/// and dropped, and its bytes leave `conn.read`.
async fn read_chunked(conn: &mut Conn) -> Result<Bytes, UpstreamError> {
    loop {
        match http1::decode_chunked(&conn.read, MAX_RESPONSE_BYTES) {
            Ok(http1::Chunked::Complete { body, consumed }) => {
                conn.read.advance(consumed);
                return Ok(Bytes::from(body));
            }
            Ok(http1::Chunked::Partial) => {
                if conn.read.len() > MAX_RESPONSE_BYTES + MAX_HEAD_BYTES || !fill(conn).await? {
                    return Err(UpstreamError::Protocol);
                }
            }
            Err(http1::ProtocolError) => return Err(UpstreamError::Protocol),
        }
    }
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): those named by `Connection` and the fixed set.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none: one pass over a handful of names, no hashing.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    while let Some(name) = headers.keys().find(|n| is_hop_by_hop(n)).cloned() {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    http1::is_not_forwarded(name.as_str())
}

#[cfg(test)]
mod tests {
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

    const OK_KEEP_ALIVE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 19\r\n\r\ni-0123456789abcdef0";

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
}
