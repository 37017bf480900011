//! The KMS RPC listener: TLS with optional client certificates (RA-TLS), HTTP/1.1 on top.
//!
//! Client certificates are requested but not required, so GetTempCaCert, GetMeta and
//! GetAppEnvEncryptPubKey work without one; a presented certificate must chain to the temp CA.
//! Each connection's client certificate is attached to its requests as [`PeerCert`]. A failed
//! handshake is counted and logged as `RA-TLS handshake failed`. Accepting, the connection cap
//! (`api.max_connections`, lowered to fit the open-file limit) and the header-read timeout are
//! [`crate::http::conn`]'s, as on every listener.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::metrics::KmsMetrics;
use super::root::KmsKeys;
use super::rpc::PeerCert;
use crate::http::conn::{self, ConnLimits, Handshake};
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
    /// Connection cap and header-read timeout.
    pub limits: ConnLimits,
}

impl Task for RpcServer {
    fn name(&self) -> &'static str {
        "api_listener"
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let tls = RaTls {
            acceptor: TlsAcceptor::from(self.tls),
            router: self.router,
            metrics: self.metrics.clone(),
            timeout: self.handshake_timeout,
        };
        conn::serve(
            self.listener,
            "api",
            tls,
            self.limits,
            Arc::new(self.metrics),
            cancel,
        )
        .await;
        Ok(())
    }
}

/// The KMS port's handshake: TLS with an optional client certificate, attached to the
/// connection's requests as [`PeerCert`].
struct RaTls {
    acceptor: TlsAcceptor,
    router: Router,
    metrics: KmsMetrics,
    timeout: Duration,
}

impl Handshake for RaTls {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;

    async fn handshake(
        &self,
        tcp: TcpStream,
        peer: std::net::SocketAddr,
    ) -> Option<(Self::Io, Router)> {
        let error = match tokio::time::timeout(self.timeout, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                self.metrics.handshake(true);
                let cert = PeerCert(
                    tls.get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| Arc::new(c.to_vec())),
                );
                return Some((tls, self.router.clone().layer(axum::Extension(cert))));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "handshake timed out".to_owned(),
        };
        self.metrics.handshake(false);
        tracing::warn!(peer = %peer, error = %error, "RA-TLS handshake failed");
        None
    }
}
