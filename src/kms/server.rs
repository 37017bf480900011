//! The KMS RPC listener: TLS with optional client certificates (RA-TLS), HTTP/1.1 on top.
//!
//! Client certificates are requested but not required, so GetTempCaCert, GetMeta and
//! GetAppEnvEncryptPubKey work without one; a presented certificate must chain to the temp CA.
//! Each connection's client certificate is attached to its requests as [`PeerCert`]. A failed
//! handshake is counted and logged as `RA-TLS handshake failed`. At most `api.max_connections`
//! are open: a new one sheds the oldest connection with no request in flight (a slow or idle
//! client), or is refused when every connection is busy; both are counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dispatch::PeerCert;
use super::metrics::KmsMetrics;
use super::root::KmsKeys;
use crate::runtime::Task;

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[error("KMS TLS configuration: {0}")]
pub struct TlsError(String);

/// Builds the server TLS configuration from the KMS key material.
pub fn tls_config(keys: &KmsKeys) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let err = |e: &dyn std::fmt::Display| TlsError(e.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> =
        [keys.rpc_cert_pem.as_bytes(), keys.root_ca_pem.as_bytes()]
            .into_iter()
            .map(|pem| CertificateDer::from_pem_slice(pem).map_err(|e| err(&e)))
            .collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(keys.rpc_key_pem.as_bytes()).map_err(|e| err(&e))?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(keys.tmp_ca_pem.as_bytes()).map_err(|e| err(&e))?)
        .map_err(|e| err(&e))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| err(&e))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| err(&e))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves the KMS router over TLS as a supervised task.
pub struct RpcServer {
    /// The bound socket.
    pub listener: TcpListener,
    /// TLS configuration.
    pub tls: Arc<rustls::ServerConfig>,
    /// Routes (already hardened).
    pub router: Router,
    /// Metrics.
    pub metrics: KmsMetrics,
    /// Time a client has to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time a connection has to send a request's headers (idle keep-alive time included).
    pub header_read_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

/// The open connections, oldest first: requests in flight on each, and how to close it.
#[derive(Default)]
struct Open {
    next: u64,
    conns: BTreeMap<u64, (Arc<AtomicUsize>, CancellationToken)>,
}

impl Open {
    /// Room for one more connection under `cap`: the oldest connection with no request in
    /// flight is closed if needed. `None` when every connection is busy.
    fn admit(&mut self, cap: usize) -> Option<(u64, Arc<AtomicUsize>, CancellationToken, bool)> {
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

impl Task for RpcServer {
    fn name(&self) -> &'static str {
        "api_listener"
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let shared = Arc::new(Connections {
            acceptor: TlsAcceptor::from(self.tls),
            router: self.router,
            metrics: self.metrics.clone(),
            handshake_timeout: self.handshake_timeout,
            header_read_timeout: self.header_read_timeout,
        });
        let connections = TaskTracker::new();
        let open = Arc::new(Mutex::new(Open::default()));
        loop {
            let (tcp, peer_addr) = tokio::select! {
                () = cancel.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of fds and the like: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed on the KMS listener");
                        tokio::select! {
                            () = cancel.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        }
                    }
                },
            };
            let admitted = open
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(self.max_connections);
            let Some((id, busy, closing, shed)) = admitted else {
                self.metrics.connection_refused();
                drop(tcp);
                continue;
            };
            if shed {
                self.metrics.connection_shed();
            }
            // Small request/response exchanges: without this, Nagle's algorithm and delayed ACKs
            // add ~40 ms to every TLS round trip.
            let _ = tcp.set_nodelay(true);
            let (open, shared, cancel) = (Arc::clone(&open), Arc::clone(&shared), cancel.clone());
            connections.spawn(async move {
                let _open = shared.metrics.connection();
                tokio::select! {
                    () = closing.cancelled() => {}
                    () = shared.serve(tcp, peer_addr, &cancel, busy) => {}
                }
                open.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .conns
                    .remove(&id);
            });
        }
        connections.close();
        connections.wait().await;
        Ok(())
    }
}

/// What every connection of the listener shares.
struct Connections {
    acceptor: TlsAcceptor,
    router: Router,
    metrics: KmsMetrics,
    handshake_timeout: Duration,
    header_read_timeout: Duration,
}

impl Connections {
    /// One connection: the TLS handshake, then HTTP/1.1 until it ends or the service stops;
    /// `busy` counts its requests in flight.
    async fn serve(
        &self,
        tcp: tokio::net::TcpStream,
        peer_addr: std::net::SocketAddr,
        cancel: &CancellationToken,
        busy: Arc<AtomicUsize>,
    ) {
        let tls = match tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(tcp))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.metrics.handshake(false);
                tracing::warn!(peer = %peer_addr, error = %e, "RA-TLS handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.handshake(false);
                tracing::warn!(peer = %peer_addr, error = "handshake timed out", "RA-TLS handshake failed");
                return;
            }
        };
        self.metrics.handshake(true);
        let peer = PeerCert(
            tls.get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Arc::new(c.to_vec())),
        );
        let service =
            TowerToHyperService::new(self.router.clone().layer(axum::Extension(peer)).layer(
                axum::middleware::from_fn(
                    move |req: axum::extract::Request, next: axum::middleware::Next| {
                        let busy = Arc::clone(&busy);
                        async move {
                            busy.fetch_add(1, Ordering::Relaxed);
                            let response = next.run(req).await;
                            busy.fetch_sub(1, Ordering::Relaxed);
                            response
                        }
                    },
                ),
            ));
        // ALPN offers only http/1.1: HTTP/2 with prior knowledge is not served.
        // A slow or silent client (partial headers, an idle keep-alive) is closed after
        // the header-read timeout, so it cannot hold a connection and a file descriptor.
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .serve_connection(TokioIo::new(tls), service);
        tokio::pin!(conn);
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(peer = %peer_addr, error = %e, "KMS connection ended with an error");
                }
            }
            () = cancel.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }
}
