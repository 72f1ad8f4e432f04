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
#[path = "upstream_tests.rs"]
mod tests;
