//! The `cvm_peer_kms` task, one per `[[cvm.peer_kms]]`: probes another KMS (ours or upstream
//! dstack's, spec/07 §3) the way a guest reaches it, over TLS trusting that KMS's root CA.
//!
//! Flow, per probe (`probe_interval`): `GET /health` (must answer `OK`; the TLS leaf's expiry is
//! read from this connection) → `POST /prpc/KMS.GetMeta?json` (must parse as JSON) → up, latency
//! and certificate expiry exported by peer index (the configuration's order; never the URL).
//! A peer that fails is down, with the reason logged when it changes.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::config::PeerKms;
use super::metrics::CvmMetrics;
use crate::runtime::Task;

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// No TLS connection or no answer.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// `/health` answered something else than `OK`.
    #[error("/health answered HTTP {0}: {1:?}")]
    Unhealthy(u16, String),
    /// `GetMeta` did not answer its JSON.
    #[error("KMS.GetMeta failed: {0}")]
    Meta(String),
    /// The root CA file is unusable.
    #[error("cannot use the root CA {0}: {1}")]
    Ca(String, String),
}

/// The prober of one peer KMS.
pub struct PeerProber {
    index: usize,
    url: String,
    http: reqwest::Client,
    interval: Duration,
    metrics: CvmMetrics,
}

/// Seconds from `now` (Unix seconds) until the certificate `der` expires (negative when it has).
fn expiry_seconds(der: &[u8], now: i64) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp() - now)
}

impl PeerProber {
    /// The prober of peer number `index` of `[[cvm.peer_kms]]`, each request bounded by
    /// `timeout`.
    pub fn new(
        index: usize,
        peer: &PeerKms,
        timeout: Duration,
        metrics: CvmMetrics,
    ) -> Result<Self, ProbeError> {
        crate::tls::ensure_crypto_provider();
        let path = peer.ca_file.display().to_string();
        let pem = std::fs::read(&peer.ca_file)
            .map_err(|e| ProbeError::Ca(path.clone(), e.to_string()))?;
        let ca = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| ProbeError::Ca(path.clone(), e.to_string()))?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .tls_info(true)
            .tls_certs_only([ca])
            // A fresh connection each probe: the certificate read is the one served now.
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| ProbeError::Ca(path, e.to_string()))?;
        Ok(Self {
            index,
            url: peer.url.trim_end_matches('/').to_owned(),
            http,
            interval: peer.probe_interval,
            metrics,
        })
    }

    /// One probe: (latency, certificate expiry in seconds) when the peer is up.
    pub async fn probe(&self) -> Result<(Duration, Option<i64>), ProbeError> {
        let started = Instant::now();
        let unreachable = |e: reqwest::Error| ProbeError::Unreachable(e.to_string());
        let health = self
            .http
            .get(format!("{}/health", self.url))
            .send()
            .await
            .map_err(unreachable)?;
        let expiry = health
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(reqwest::tls::TlsInfo::peer_certificate)
            .and_then(|der| expiry_seconds(der, crate::clock::unix_secs_i64()));
        let status = health.status().as_u16();
        let text = health.text().await.map_err(unreachable)?;
        if status != 200 || text.trim() != "OK" {
            return Err(ProbeError::Unhealthy(
                status,
                text.chars().take(100).collect(),
            ));
        }
        let meta = self
            .http
            .post(format!("{}/prpc/KMS.GetMeta?json", self.url))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .map_err(unreachable)?;
        let status = meta.status().as_u16();
        let body = meta.bytes().await.map_err(unreachable)?;
        if status != 200 {
            return Err(ProbeError::Meta(format!("HTTP {status}")));
        }
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .filter(serde_json::Value::is_object)
            .ok_or_else(|| ProbeError::Meta("the answer is not a JSON object".into()))?;
        Ok((started.elapsed(), expiry))
    }
}

impl Task for PeerProber {
    fn name(&self) -> &'static str {
        "cvm_peer_kms"
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut tick = crate::runtime::ticker(self.interval);
        let mut last_error: Option<String> = None;
        while cancel.run_until_cancelled(tick.tick()).await.is_some() {
            let Some(result) = cancel.run_until_cancelled(self.probe()).await else {
                break;
            };
            match result {
                Ok((latency, expiry)) => {
                    if last_error.take().is_some() {
                        tracing::info!(peer = self.index, url = %self.url, "cvm: the peer KMS answers again");
                    }
                    self.metrics.peer(self.index, Some((latency, expiry)));
                }
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_ref() != Some(&text) {
                        tracing::warn!(peer = self.index, url = %self.url, error = %text, "cvm: the peer KMS is down");
                    }
                    last_error = Some(text);
                    self.metrics.peer(self.index, None);
                }
            }
        }
        Ok(())
    }
}
