//! Listeners: accept on every address, one span per connection, bounded concurrency, HTTP/1.0
//! and HTTP/1.1 keep-alive, and a graceful drain bounded in time on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
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

/// A slow or silent client cannot hold a connection slot longer than this per request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds every address; the first failure is returned with the address that failed.
pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, (SocketAddr, std::io::Error)> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        listeners.push(TcpListener::bind(addr).await.map_err(|e| (*addr, e))?);
    }
    Ok(listeners)
}

/// Serves `handler` on `listeners` until `shutdown` turns true, then drains for at most `drain`.
pub async fn serve<H, Fut>(
    name: &'static str,
    listeners: Vec<TcpListener>,
    handler: H,
    max_connections: usize,
    drain: Duration,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections));
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
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .keep_alive(true)
                    // IMDS answers are small: one copy into the head's buffer and one plain
                    // write beat queueing head and body for a vectored write.
                    .writev(false)
                    .serve_connection(
                        TokioIo::new(stream),
                        service_fn(move |req| {
                            let handler = handler.clone();
                            async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
                        }),
                    );
                let conn = graceful.watch(conn);
                let span = tracing::debug_span!("conn", listener = name, peer.addr = %peer);
                tokio::spawn(
                    async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "connection ended with an error");
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
        _ = tokio::time::sleep(drain) => {
            tracing::warn!(listener = name, "drain timed out; closing remaining connections")
        }
    }
}
