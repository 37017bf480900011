//! Connection serving for every listener: accept, admit under a cap, an optional handshake
//! (TLS on the KMS port), then HTTP/1.1 with a header-read timeout, drained on shutdown.
//!
//! Flow: [`serve`] accepts; a failed accept (out of file descriptors and the like) pauses with
//! a doubling backoff and is logged once per 10 s with the count, never once per
//! failure. An accepted connection is admitted under the cap: at the cap, the oldest connection
//! with no request in flight (a slow or idle client) is closed to make room, or the new one is
//! refused when every connection is busy. The [`Handshake`] turns the TCP stream into what HTTP
//! runs on, and the router that serves it. A client must send a request's headers within the
//! header-read timeout (an idle keep-alive included), so a silent connection cannot hold a file
//! descriptor.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// First pause after a failed accept; doubles per consecutive failure up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause after failed accepts.
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// A run of failed accepts is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// What a listener counts about its connections.
pub trait ConnectionMetrics: Send + Sync + 'static {
    /// A connection was admitted (`true`) or has closed (`false`).
    fn open(&self, opened: bool);
    /// An idle connection was closed to make room for a new one.
    fn shed(&self);
    /// A new connection was refused: every open one had a request in flight.
    fn refused(&self);
    /// `accept` failed.
    fn accept_failed(&self);
}

/// Turns an accepted TCP stream into the stream HTTP runs on and the router serving it; `None`
/// when the connection ends there (a failed TLS handshake, counted and logged by the
/// implementation).
pub trait Handshake: Send + Sync + 'static {
    /// The stream after the handshake.
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    /// Performs the handshake.
    fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = Option<(Self::Io, Router)>> + Send;
}

/// Plain HTTP: no handshake, one router.
pub struct Plain(pub Router);

impl Handshake for Plain {
    type Io = TcpStream;

    async fn handshake(&self, tcp: TcpStream, _peer: SocketAddr) -> Option<(TcpStream, Router)> {
        Some((tcp, self.0.clone()))
    }
}

/// How many connections a listener keeps and how long a client has to send headers.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time a connection has to send a request's headers (idle keep-alive time included).
    pub header_read_timeout: Duration,
}

/// The open connections, oldest first: requests in flight on each, and how to close it.
#[derive(Default)]
struct Open {
    next: u64,
    conns: BTreeMap<u64, (Arc<AtomicUsize>, CancellationToken)>,
}

/// An admitted connection: its id, its requests in flight, its close signal, and whether an idle
/// connection was closed to make room for it.
type Admitted = (u64, Arc<AtomicUsize>, CancellationToken, bool);

impl Open {
    /// Room for one more connection under `cap`: the oldest connection with no request in
    /// flight is closed if needed. `None` when every connection is busy.
    fn admit(&mut self, cap: usize) -> Option<Admitted> {
        let mut shed = false;
        if self.conns.len() >= cap {
            let idle = self
                .conns
                .iter()
                .find(|(_, (busy, _))| busy.load(Ordering::Relaxed) == 0)
                .map(|(id, _)| *id)?;
            if let Some((_, token)) = self.conns.remove(&idle) {
                token.cancel();
            }
            shed = true;
        }
        let (id, busy, token) = (self.next, Arc::default(), CancellationToken::new());
        self.next += 1;
        self.conns.insert(id, (Arc::clone(&busy), token.clone()));
        Some((id, busy, token, shed))
    }
}

/// Pauses and log lines after failed accepts.
#[derive(Debug, Default)]
struct AcceptBackoff {
    consecutive: u32,
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl AcceptBackoff {
    /// A failed accept at `now`: how long to pause, and `Some(failures since the last line)`
    /// when a line is due (the first failure, then at most once per [`LOG_EVERY`]).
    fn failed(&mut self, now: Instant) -> (Duration, Option<u64>) {
        let pause = FIRST_PAUSE
            .saturating_mul(1 << self.consecutive.min(10))
            .min(MAX_PAUSE);
        self.consecutive = self.consecutive.saturating_add(1);
        self.unlogged += 1;
        let due = self
            .logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= LOG_EVERY);
        if !due {
            return (pause, None);
        }
        self.logged_at = Some(now);
        (pause, Some(std::mem::take(&mut self.unlogged)))
    }

    /// An accept succeeded: the next failure pauses briefly again.
    fn succeeded(&mut self) {
        self.consecutive = 0;
    }
}

/// Serves `listener` until `cancel`, then drains its connections.
pub async fn serve<H: Handshake, M: ConnectionMetrics>(
    listener: TcpListener,
    name: &'static str,
    handshake: H,
    limits: ConnLimits,
    metrics: Arc<M>,
    cancel: CancellationToken,
) {
    let handshake = Arc::new(handshake);
    let connections = TaskTracker::new();
    let open = Arc::new(Mutex::new(Open::default()));
    let mut backoff = AcceptBackoff::default();
    loop {
        let (tcp, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    metrics.accept_failed();
                    let (pause, log) = backoff.failed(Instant::now());
                    if let Some(failures) = log {
                        tracing::warn!(listener = name, error = %e, failures, "accept failed; pausing before the next accept");
                    }
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(pause) => continue,
                    }
                }
            },
        };
        backoff.succeeded();
        let admitted = open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(limits.max_connections);
        let Some((id, busy, closing, shed)) = admitted else {
            metrics.refused();
            drop(tcp);
            continue;
        };
        if shed {
            metrics.shed();
        }
        // Small request/response exchanges: without this, Nagle's algorithm and delayed ACKs
        // add ~40 ms to every TLS round trip.
        let _ = tcp.set_nodelay(true);
        let (open, handshake, metrics, cancel) = (
            Arc::clone(&open),
            Arc::clone(&handshake),
            Arc::clone(&metrics),
            cancel.clone(),
        );
        connections.spawn(async move {
            metrics.open(true);
            tokio::select! {
                () = closing.cancelled() => {}
                () = connection(&*handshake, tcp, peer, limits, &cancel, busy) => {}
            }
            metrics.open(false);
            open.lock()
                .unwrap_or_else(|e| e.into_inner())
                .conns
                .remove(&id);
        });
    }
    connections.close();
    connections.wait().await;
}

/// One connection: the handshake, then HTTP/1.1 until it ends or the service stops; `busy`
/// counts its requests in flight.
async fn connection<H: Handshake>(
    handshake: &H,
    tcp: TcpStream,
    peer: SocketAddr,
    limits: ConnLimits,
    cancel: &CancellationToken,
    busy: Arc<AtomicUsize>,
) {
    let Some((io, router)) = handshake.handshake(tcp, peer).await else {
        return;
    };
    let service = TowerToHyperService::new(router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let busy = Arc::clone(&busy);
            async move {
                busy.fetch_add(1, Ordering::Relaxed);
                let response = next.run(req).await;
                busy.fetch_sub(1, Ordering::Relaxed);
                response
            }
        },
    )));
    // HTTP/1.1 only: HTTP/2 with prior knowledge is not served.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        // Above what `super::bounded_head` allows, so that a request over our limit gets our
        // 431 with a body, not hyper's bare one.
        .max_headers(4 * super::MAX_HEADERS)
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
        }
        () = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_idle_connection_makes_room_and_busy_ones_are_kept() {
        let mut open = Open::default();
        let (_, first, ..) = open.admit(2).unwrap();
        let (_, _second, second_closing, _) = open.admit(2).unwrap();
        first.fetch_add(1, Ordering::Relaxed);
        // The first is busy: the second, idle, is closed for the third.
        let (.., shed) = open.admit(2).unwrap();
        assert!(shed && second_closing.is_cancelled());
        // Both remaining are busy: refused.
        for (busy, _) in open.conns.values() {
            busy.fetch_add(1, Ordering::Relaxed);
        }
        assert!(open.admit(2).is_none());
    }

    #[test]
    fn failed_accepts_pause_longer_and_log_once_per_interval() {
        let mut b = AcceptBackoff::default();
        let t0 = Instant::now();
        assert_eq!(b.failed(t0), (FIRST_PAUSE, Some(1)));
        let mut pauses = Vec::new();
        for i in 1..100u32 {
            let (pause, log) = b.failed(t0 + Duration::from_millis(u64::from(i)));
            assert_eq!(log, None, "failure {i} logged");
            pauses.push(pause);
        }
        assert_eq!(pauses[0], FIRST_PAUSE * 2);
        assert_eq!(*pauses.last().unwrap(), MAX_PAUSE);
        // The next line, after the interval, carries the failures since the last one.
        assert_eq!(b.failed(t0 + LOG_EVERY).1, Some(100));
        b.succeeded();
        assert_eq!(b.failed(t0 + LOG_EVERY).0, FIRST_PAUSE);
    }
}
