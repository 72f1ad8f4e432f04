//! Listeners: accept on every address, one span per connection, bounded concurrency, HTTP/1.0
//! and HTTP/1.1 keep-alive, idle and stalled connections closed, and a graceful drain bounded in
//! time on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::Instrument;

/// A slow or silent client cannot hold a connection slot longer than this (plus up to half of
/// it) between requests: waiting for, or trickling, a request head, or not reading an answer.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a listener allows its connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// See [`IDLE_TIMEOUT`].
    pub idle: Duration,
    /// How long open connections may finish their requests after shutdown is asked for.
    pub drain: Duration,
}

/// Finds who is behind an accepted connection (`peer::Identifier`), once per connection: called
/// at accept (the fast, synchronous part: the socket is there to be found while its client
/// waits), its future finishes in the connection's own task (a slow part runs on the blocking
/// pool, never on the serving thread). The handler gets it with every request of the connection.
/// Who is behind an accepted connection: given the stream, its peer address (from accept) and
/// its local address (the listener's), once per connection.
pub type Identify = Arc<dyn Fn(&TcpStream, SocketAddr, SocketAddr) -> Identified + Send + Sync>;

/// What [`Identify`] found: the caller at once (the common case: no allocation), or a lookup
/// still to finish (a new cgroup's path, found on the blocking pool).
pub enum Identified {
    Known(Arc<crate::access::Identity>),
    Pending(std::pin::Pin<Box<dyn Future<Output = Arc<crate::access::Identity>> + Send>>),
}

/// Binds every address; the first failure is returned with the address that failed.
pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, (SocketAddr, std::io::Error)> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        listeners.push(TcpListener::bind(addr).await.map_err(|e| (*addr, e))?);
    }
    Ok(listeners)
}

/// Request heads larger than this (request line and headers) get 431 and a close. IMDS requests
/// are a few hundred bytes; hyper's default would let each connection buffer about 400 KiB.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// A connection's read buffer never grows past this (hyper's minimum is 8 KiB).
const MAX_BUFFER_BYTES: usize = 16 * 1024;
/// How long a new connection waits for a slot once one was freed for it, before it is closed.
const SLOT_WAIT: Duration = Duration::from_secs(2);

/// Every open connection of one listener, so that a new one can take the slot of the one that
/// has been idle longest when every slot is held.
///
/// The fallback fairness rule while there is no per-user accounting: a connection that is not
/// being handled (idle between requests, or still sending its head) can be closed to make room;
/// one whose request is in the handler cannot, and the handler's own deadlines (the upstream
/// timeout) bound how long that lasts. One local process opening every slot with idle or
/// stalled connections therefore delays other clients by one eviction, not for as long as it
/// holds its sockets.
#[derive(Default)]
struct Registry {
    open: std::sync::Mutex<std::collections::HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
}

struct ConnState {
    /// Requests started plus requests answered: odd while one is being handled.
    activity: AtomicU64,
    /// When the last request started or ended (or the connection was accepted), in
    /// milliseconds since the registry's epoch.
    last_active_ms: AtomicU64,
    evict: tokio::sync::Notify,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Arc<ConnState>>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add(&self, now_ms: u64) -> (u64, Arc<ConnState>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            activity: AtomicU64::new(0),
            last_active_ms: AtomicU64::new(now_ms),
            evict: tokio::sync::Notify::new(),
        });
        self.lock().insert(id, state.clone());
        (id, state)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Asks the connection idle longest, among those not being handled, to close. `false` if
    /// every connection is in the middle of a request.
    fn evict_one(&self) -> bool {
        let open = self.lock();
        let victim = open
            .values()
            .filter(|c| c.activity.load(Ordering::Relaxed).is_multiple_of(2))
            .min_by_key(|c| c.last_active_ms.load(Ordering::Relaxed));
        match victim {
            Some(c) => {
                // notify_one stores the wake-up if the task is not waiting yet.
                c.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// The per-listener connection series [`serve`] keeps.
#[derive(Clone)]
pub struct ConnectionMetrics {
    /// Connections closed to make room (`credlock_connections_evicted_total`).
    pub evicted: prometheus::IntCounter,
    /// Connections open now (`credlock_open_connections`).
    pub open: prometheus::IntGauge,
}

/// Serves `handler` on `listeners` until `shutdown` turns true, then drains for at most
/// `limits.drain`.
pub async fn serve<H, Fut>(
    name: &'static str,
    listeners: Vec<TcpListener>,
    handler: H,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
    counters: Option<ConnectionMetrics>,
    identify: Option<Identify>,
) where
    H: Fn(Request<Incoming>, Option<Arc<crate::access::Identity>>) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let registry = Arc::new(Registry::default());
    let epoch = tokio::time::Instant::now();
    let now_ms = move || epoch.elapsed().as_millis() as u64;
    /// An accepted connection: its peer, its listener's address (`None`: a wildcard), its slot.
    type Accepted = (
        TcpStream,
        SocketAddr,
        Option<SocketAddr>,
        OwnedSemaphorePermit,
    );
    let (tx, mut rx) = mpsc::channel::<Accepted>(64);
    let mut acceptors = Vec::with_capacity(listeners.len());
    for listener in listeners {
        let evicted = counters.as_ref().map(|c| c.evicted.clone());
        let (tx, slots, registry) = (tx.clone(), slots.clone(), registry.clone());
        // An accepted socket's local address is the listener's, unless it listens on a
        // wildcard address: then it is asked per connection.
        let bound = listener
            .local_addr()
            .ok()
            .filter(|a| !a.ip().is_unspecified());
        acceptors.push(tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let permit = match slots.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(tokio::sync::TryAcquireError::Closed) => return,
                    Err(tokio::sync::TryAcquireError::NoPermits) => {
                        match make_room(&slots, &registry, evicted.as_ref()).await {
                            Some(permit) => permit,
                            None if slots.is_closed() => return,
                            // Every slot is busy with a request: this client is closed, as a
                            // full accept queue would have refused it.
                            None => {
                                tracing::warn!(
                                    listener = name,
                                    "every connection slot is busy; closing a new connection"
                                );
                                continue;
                            }
                        }
                    }
                };
                if tx.send((stream, peer, bound, permit)).await.is_err() {
                    return;
                }
            }
        }));
    }
    drop(tx);

    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = rx.recv() => {
                let Some((stream, peer, bound, permit)) = accepted else { break };
                let _ = stream.set_nodelay(true);
                // Looked up in the connection's own task, not here: this loop hands out every
                // connection, and a lookup (a few syscalls) here would serialise them all.
                let identify = identify.clone();
                let handler = handler.clone();
                let (id, conn_state) = registry.add(now_ms());
                let open = counters.as_ref().map(|c| c.open.clone());
                if let Some(g) = &open {
                    g.inc();
                }
                let watcher = graceful.watcher();
                let span = tracing::debug_span!("conn", listener = name, peer.addr = %peer);
                let registry = registry.clone();
                tokio::spawn(
                    async move {
                        let who = match identify {
                            Some(identify) => Some(
                                match bound.or_else(|| stream.local_addr().ok()) {
                                    Some(local) => match identify(&stream, peer, local) {
                                        Identified::Known(who) => who,
                                        Identified::Pending(lookup) => lookup.await,
                                    },
                                    None => Arc::new(crate::access::Identity::Unidentified(
                                        crate::access::Unidentified::SocketGone,
                                    )),
                                },
                            ),
                            None => None,
                        };
                        let seen = conn_state.clone();
                        let conn = http1::Builder::new()
                            // hyper's own header-read timeout arms and drops a timer on every
                            // request; the watchdog below needs one per connection.
                            .timer(TokioTimer::new())
                            .header_read_timeout(None)
                            .keep_alive(true)
                            .max_header_size(MAX_HEAD_BYTES)
                            .max_buf_size(MAX_BUFFER_BYTES)
                            // IMDS answers are small: one copy into the head's buffer and one
                            // plain write beat queueing head and body for a vectored write.
                            .writev(false)
                            .serve_connection(
                                TokioIo::new(stream),
                                service_fn(move |req: Request<Incoming>| {
                                    let who = who.clone();
                                    let handler = handler.clone();
                                    let conn_state = conn_state.clone();
                                    conn_state.activity.fetch_add(1, Ordering::Relaxed);
                                    conn_state.last_active_ms.store(now_ms(), Ordering::Relaxed);
                                    async move {
                                        let response = handler(req, who).await;
                                        conn_state.activity.fetch_add(1, Ordering::Relaxed);
                                        conn_state.last_active_ms.store(now_ms(), Ordering::Relaxed);
                                        Ok::<_, std::convert::Infallible>(response)
                                    }
                                }),
                            );
                        let conn = watcher.watch(conn);
                        tokio::select! {
                            result = conn => if let Err(e) = result {
                                tracing::debug!(error = %e, "connection ended with an error");
                            },
                            () = idle_watchdog(&seen.activity, limits.idle) => {
                                tracing::debug!("closing a connection idle or stalled too long");
                            }
                            () = evicted_while_idle(&seen) => {
                                tracing::debug!("closing an idle connection to make room for a new one");
                            }
                        }
                        registry.remove(id);
                        if let Some(g) = &open {
                            g.dec();
                        }
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            _ = shutdown.changed() => break,
        }
    }
    for acceptor in &acceptors {
        acceptor.abort();
    }
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!(listener = name, "drained"),
        _ = tokio::time::sleep(limits.drain) => {
            tracing::warn!(listener = name, "drain timed out; closing remaining connections")
        }
    }
}

/// Every slot is held: closes the connection idle longest (again every 50 ms, in case the one
/// chosen started a request meanwhile) until a slot is free, for at most [`SLOT_WAIT`].
async fn make_room(
    slots: &Arc<Semaphore>,
    registry: &Registry,
    evicted: Option<&prometheus::IntCounter>,
) -> Option<OwnedSemaphorePermit> {
    let deadline = tokio::time::Instant::now() + SLOT_WAIT;
    while tokio::time::Instant::now() < deadline {
        if registry.evict_one()
            && let Some(c) = evicted
        {
            c.inc();
        }
        let wait = Duration::from_millis(50);
        match tokio::time::timeout(wait, slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => return Some(permit),
            Ok(Err(_)) => return None,
            Err(_) => {}
        }
    }
    None
}

/// Returns once the connection was chosen for eviction while no request of it was being
/// handled (a request that started in between keeps it: the choice is checked again).
async fn evicted_while_idle(state: &ConnState) {
    loop {
        state.evict.notified().await;
        if state.activity.load(Ordering::Relaxed).is_multiple_of(2) {
            return;
        }
    }
}

/// Returns once `activity` has not moved for `idle` while no request was being handled, checking
/// every half of `idle`: so between `idle` and one and a half times `idle` after the connection's
/// last request ended (or it was accepted). A request being handled keeps it open; the handler's
/// own deadlines bound that.
async fn idle_watchdog(activity: &AtomicU64, idle: Duration) {
    let tick = idle / 2;
    let mut seen = activity.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(tick).await;
        let now = activity.load(Ordering::Relaxed);
        if now != seen || now % 2 == 1 {
            seen = now;
            quiet = Duration::ZERO;
            continue;
        }
        quiet += tick;
        if quiet >= idle {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const IDLE: Duration = Duration::from_millis(400);

    /// Serves on a loopback port; the handler answers "ok", after `delay`.
    async fn start(max_connections: usize, delay: Duration) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let handler = move |_req: Request<Incoming>, _who| async move {
            tokio::time::sleep(delay).await;
            Response::new(Full::new(Bytes::from_static(b"ok")))
        };
        let limits = Limits {
            max_connections,
            idle: IDLE,
            drain: Duration::from_millis(100),
        };
        tokio::spawn(serve(
            "test",
            vec![listener],
            handler,
            limits,
            rx,
            None,
            None,
        ));
        (addr, tx)
    }

    /// Reads until the server closes; what it sent.
    async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
        let mut all = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut all));
        read.await.expect("the server closes the connection").ok();
        all
    }

    /// One request on a keep-alive connection; the answer's bytes.
    async fn request(stream: &mut TcpStream) -> String {
        stream
            .write_all(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0; 1024];
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\nok") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed mid-answer: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    #[tokio::test]
    async fn a_silent_client_is_closed_after_the_idle_timeout() {
        let (addr, _stop) = start(8, Duration::ZERO).await;
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        assert!(read_to_close(&mut stream).await.is_empty());
        let waited = started.elapsed();
        assert!(waited >= IDLE, "closed after {waited:?}");
        assert!(waited < IDLE * 3, "closed after {waited:?}");
    }

    #[tokio::test]
    async fn a_trickled_request_head_does_not_keep_the_connection() {
        let (addr, _stop) = start(8, Duration::ZERO).await;
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nX-Slow: ")
            .await
            .unwrap();
        // One byte every 50 ms: the head never completes; the server must give up.
        let mut closed = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if stream.write_all(b"a").await.is_err() {
                closed = true;
                break;
            }
            let mut buf = [0; 64];
            match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(n)) => panic!("answered: {:?}", String::from_utf8_lossy(&buf[..n])),
                Err(_) => {}
            }
        }
        let waited = started.elapsed();
        assert!(closed, "still open after {waited:?}");
        assert!(
            waited >= IDLE && waited < IDLE * 3,
            "closed after {waited:?}"
        );
    }

    #[tokio::test]
    async fn a_busy_connection_and_a_slow_answer_are_not_cut() {
        let (addr, _stop) = start(8, IDLE * 2).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // The handler takes twice the idle timeout: the request is still answered.
        assert!(request(&mut stream).await.starts_with("HTTP/1.1 200"));

        let (addr, _stop) = start(8, Duration::ZERO).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let mut answered = 0;
        // Requests a little under the idle timeout apart, for three idle periods, on one
        // connection: every one is answered on it.
        while started.elapsed() < IDLE * 3 {
            assert!(request(&mut stream).await.starts_with("HTTP/1.1 200"));
            answered += 1;
            tokio::time::sleep(IDLE / 2).await;
        }
        assert!(answered >= 6, "{answered}");
        // Then left alone, it is closed.
        assert!(read_to_close(&mut stream).await.is_empty());
    }

    #[tokio::test]
    async fn a_new_client_takes_the_slot_of_the_one_idle_longest() {
        // One slot, held by a silent client: the next client is served at once (not after the
        // idle timeout), and the silent one is closed to make room.
        let (addr, _stop) = start(1, Duration::ZERO).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let mut next = TcpStream::connect(addr).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), request(&mut next))
            .await
            .expect("the second client is served");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(started.elapsed() < IDLE / 2, "{:?}", started.elapsed());
        assert!(read_to_close(&mut silent).await.is_empty());
        // Two slots, both idle keep-alive connections that were each used: the one idle
        // longest goes, the more recent one stays.
        let (addr, _stop) = start(2, Duration::ZERO).await;
        let mut older = TcpStream::connect(addr).await.unwrap();
        request(&mut older).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        let mut newer = TcpStream::connect(addr).await.unwrap();
        request(&mut newer).await;
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert!(request(&mut third).await.starts_with("HTTP/1.1 200"));
        assert!(read_to_close(&mut older).await.is_empty());
        assert!(request(&mut newer).await.starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn a_connection_whose_request_is_being_handled_is_never_evicted() {
        // One slot, its request in the handler for 300 ms: the next client waits for it to
        // be answered (then the now idle connection makes room), and the first answer arrives.
        let delay = Duration::from_millis(300);
        let (addr, _stop) = start(1, delay).await;
        let mut busy = TcpStream::connect(addr).await.unwrap();
        let first = tokio::spawn(async move { request(&mut busy).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let mut next = TcpStream::connect(addr).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), request(&mut next))
            .await
            .expect("the second client is served once the first was answered");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(first.await.unwrap().starts_with("HTTP/1.1 200"));
        assert!(
            started.elapsed() >= delay - Duration::from_millis(60),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn oversized_request_heads_are_refused() {
        let (addr, _stop) = start(8, Duration::ZERO).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        head.extend_from_slice(b"\r\n\r\n");
        let _ = stream.write_all(&head).await;
        let answer = String::from_utf8_lossy(&read_to_close(&mut stream).await).to_string();
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    }
}
