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

/// Binds every address; the first failure is returned with the address that failed.
pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, (SocketAddr, std::io::Error)> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        listeners.push(TcpListener::bind(addr).await.map_err(|e| (*addr, e))?);
    }
    Ok(listeners)
}

/// Serves `handler` on `listeners` until `shutdown` turns true, then drains for at most
/// `limits.drain`.
pub async fn serve<H, Fut>(
    name: &'static str,
    listeners: Vec<TcpListener>,
    handler: H,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (tx, mut rx) = mpsc::channel::<(TcpStream, SocketAddr, OwnedSemaphorePermit)>(64);
    let mut acceptors = Vec::with_capacity(listeners.len());
    for listener in listeners {
        let (tx, slots) = (tx.clone(), slots.clone());
        acceptors.push(tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        if tx.send((stream, peer, permit)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    drop(tx);

    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = rx.recv() => {
                let Some((stream, peer, permit)) = accepted else { break };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                // Requests started plus requests answered: odd while one is being handled.
                let activity = Arc::new(AtomicU64::new(0));
                let seen = activity.clone();
                let conn = http1::Builder::new()
                    // hyper's own header-read timeout arms and drops a timer on every request;
                    // the watchdog below needs one per connection.
                    .timer(TokioTimer::new())
                    .header_read_timeout(None)
                    .keep_alive(true)
                    // IMDS answers are small: one copy into the head's buffer and one plain
                    // write beat queueing head and body for a vectored write.
                    .writev(false)
                    .serve_connection(
                        TokioIo::new(stream),
                        service_fn(move |req| {
                            let handler = handler.clone();
                            let activity = activity.clone();
                            activity.fetch_add(1, Ordering::Relaxed);
                            async move {
                                let response = handler(req).await;
                                activity.fetch_add(1, Ordering::Relaxed);
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        }),
                    );
                let conn = graceful.watch(conn);
                let span = tracing::debug_span!("conn", listener = name, peer.addr = %peer);
                tokio::spawn(
                    async move {
                        tokio::select! {
                            result = conn => if let Err(e) = result {
                                tracing::debug!(error = %e, "connection ended with an error");
                            },
                            () = idle_watchdog(&seen, limits.idle) => {
                                tracing::debug!("closing a connection idle or stalled too long");
                            }
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
        let handler = move |_req: Request<Incoming>| async move {
            tokio::time::sleep(delay).await;
            Response::new(Full::new(Bytes::from_static(b"ok")))
        };
        let limits = Limits {
            max_connections,
            idle: IDLE,
            drain: Duration::from_millis(100),
        };
        tokio::spawn(serve("test", vec![listener], handler, limits, rx));
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
    async fn a_silent_client_gives_its_slot_back() {
        // One slot: the silent client holds it until the watchdog closes it, then the next
        // client is served.
        let (addr, _stop) = start(1, Duration::ZERO).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let mut next = TcpStream::connect(addr).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), request(&mut next))
            .await
            .expect("the second client is served once the first is closed");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(started.elapsed() >= IDLE / 2, "{:?}", started.elapsed());
        assert!(read_to_close(&mut silent).await.is_empty());
    }
}
