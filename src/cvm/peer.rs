//! The `cvm_peer_kms` task, one per `[[cvm.peer_kms]]`: probes another KMS (ours or upstream
//! dstack's, spec/07 §3) the way a guest reaches it, over TLS trusting that KMS's root CA.
//!
//! Flow, per probe (`probe_interval`): `GET /health` (must answer `OK`; the TLS leaf's expiry is
//! read from this connection) → `POST /prpc/KMS.GetMeta?json` (must parse as JSON) → up, latency
//! and certificate expiry exported by peer index (the configuration's order; never the URL).
//! A peer that fails is down, with the reason logged when it changes. With `metrics_url`, its
//! `/metrics` is then read for upstream's two attestation counters ([`attestation_counters`],
//! pure), which are re-exported as counters of our own that advance by the peer's increase (a
//! peer restart counted as a reset, as Prometheus does).

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
    /// Its `/metrics` gave no attestation counters.
    #[error("its metrics: {0}")]
    Metrics(#[from] ScrapeError),
}

/// Why a peer's `/metrics` gave no counters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScrapeError {
    /// No connection or no answer.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// Another status than 200.
    #[error("answered HTTP {0}")]
    Status(u16),
    /// A counter is absent, or a sample of it is not a number.
    #[error("{0}")]
    Malformed(String),
}

impl ScrapeError {
    /// The `dstack_cvm_source_polls_total` outcome.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unreachable(_) => "unreachable",
            Self::Status(_) => "http_error",
            Self::Malformed(_) => "malformed",
        }
    }
}

/// Upstream dstack KMS's attestation counters (spec/07 §3).
const REQUESTS: &str = "dstack_kms_attestation_requests_total";
const FAILURES: &str = "dstack_kms_attestation_failures_total";

/// The sum of the samples of counter `name` in a Prometheus text exposition (any labels), `None`
/// when it has none.
fn counter(text: &str, name: &str) -> Result<Option<u64>, ScrapeError> {
    let mut sum: Option<u64> = None;
    for line in text.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: a sample's labels or its value follow.
        let rest = match rest.chars().next() {
            Some('{') => rest.split_once('}').map_or("", |(_, v)| v),
            Some(' ' | '\t') => rest,
            _ => continue,
        };
        let raw = rest.split_whitespace().next().unwrap_or_default();
        let value: f64 = raw
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| ScrapeError::Malformed(format!("{name} has the value {raw:?}")))?;
        // Counters count whole events; the float form is exposition only.
        sum = Some(sum.unwrap_or(0).saturating_add(value as u64));
    }
    Ok(sum)
}

/// Upstream's (attestation requests, attestation failures) from a peer's `/metrics` text.
pub fn attestation_counters(text: &str) -> Result<(u64, u64), ScrapeError> {
    let missing = |name: &str| ScrapeError::Malformed(format!("no {name} in its /metrics"));
    Ok((
        counter(text, REQUESTS)?.ok_or_else(|| missing(REQUESTS))?,
        counter(text, FAILURES)?.ok_or_else(|| missing(FAILURES))?,
    ))
}

/// How much a re-exported counter advances when the peer's went from `last` to `now`: all of
/// `now` the first time and after the peer restarted (its counter went back), else the increase.
pub fn advance(last: Option<u64>, now: u64) -> u64 {
    match last {
        Some(l) if now >= l => now - l,
        _ => now,
    }
}

/// The prober of one peer KMS.
pub struct PeerProber {
    index: usize,
    url: String,
    metrics_url: Option<String>,
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
            metrics_url: peer.metrics_url.clone(),
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

    /// Reads the peer's attestation counters (requests, failures) from its `/metrics`; `None`
    /// when no `metrics_url` is configured.
    pub async fn scrape(&self) -> Result<Option<(u64, u64)>, ScrapeError> {
        let Some(url) = &self.metrics_url else {
            return Ok(None);
        };
        let unreachable = |e: reqwest::Error| ScrapeError::Unreachable(e.to_string());
        let resp = self.http.get(url).send().await.map_err(unreachable)?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(ScrapeError::Status(status));
        }
        let text = resp.text().await.map_err(unreachable)?;
        attestation_counters(&text).map(Some)
    }

    /// One probe and, when it answered, one scrape, exported.
    async fn round(&self, counted: &mut Option<(u64, u64)>) -> Result<(), ProbeError> {
        let up = self.probe().await;
        self.metrics.peer(self.index, up.as_ref().ok().copied());
        up?;
        let started = Instant::now();
        match self.scrape().await {
            Ok(None) => Ok(()),
            Ok(Some((requests, failures))) => {
                self.metrics.peer_attestations(
                    self.index,
                    advance(counted.map(|c| c.0), requests),
                    advance(counted.map(|c| c.1), failures),
                );
                *counted = Some((requests, failures));
                self.metrics
                    .source_poll("peer_metrics", "ok", started.elapsed());
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .source_poll("peer_metrics", e.label(), started.elapsed());
                Err(e.into())
            }
        }
    }
}

impl Task for PeerProber {
    fn name(&self) -> &'static str {
        "cvm_peer_kms"
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut tick = crate::runtime::ticker(self.interval);
        let mut last_error: Option<String> = None;
        let mut counted = None;
        while cancel.run_until_cancelled(tick.tick()).await.is_some() {
            let Some(result) = cancel.run_until_cancelled(self.round(&mut counted)).await else {
                break;
            };
            match result {
                Ok(()) => {
                    if last_error.take().is_some() {
                        tracing::info!(peer = self.index, url = %self.url, "cvm: the peer KMS answers again");
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_ref() != Some(&text) {
                        tracing::warn!(peer = self.index, url = %self.url, error = %text, "cvm: the peer KMS probe failed");
                    }
                    last_error = Some(text);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn upstream_counters_are_read_whatever_their_labels_and_form() {
        let text = "# HELP dstack_kms_attestation_requests_total Attestations\n\
            # TYPE dstack_kms_attestation_requests_total counter\n\
            dstack_kms_attestation_requests_total 12\n\
            dstack_kms_attestation_requests_total_created 1.7e9\n\
            dstack_kms_attestation_failures_total{tee=\"tdx\"} 2.0 1700000000000\n\
            dstack_kms_attestation_failures_total{tee=\"nitro\"} 1e0\n";
        assert_eq!(attestation_counters(text), Ok((12, 3)));
    }

    #[test]
    fn a_missing_or_unreadable_counter_is_malformed_not_zero() {
        let only_requests = "dstack_kms_attestation_requests_total 4\n";
        assert!(matches!(
            attestation_counters(only_requests),
            Err(ScrapeError::Malformed(m)) if m.contains("dstack_kms_attestation_failures_total")
        ));
        let garbage =
            "dstack_kms_attestation_requests_total NaN\ndstack_kms_attestation_failures_total 1\n";
        assert!(matches!(
            attestation_counters(garbage),
            Err(ScrapeError::Malformed(_))
        ));
        assert!(attestation_counters("<html>not metrics</html>").is_err());
    }

    #[test]
    fn a_re_exported_counter_follows_increases_and_survives_a_peer_restart() {
        assert_eq!(advance(None, 7), 7);
        assert_eq!(advance(Some(7), 10), 3);
        assert_eq!(advance(Some(10), 10), 0);
        // The peer restarted: its counter began again from zero.
        assert_eq!(advance(Some(10), 2), 2);
    }

    proptest! {
        #[test]
        fn any_exposition_text_gives_counters_or_a_typed_error(text in "(dstack_kms_attestation_(requests|failures)_total[ {}a-z=\"0-9.e+-]{0,20}\n|[ -~]{0,30}\n){0,8}") {
            match attestation_counters(&text) {
                Ok(_) | Err(ScrapeError::Malformed(_)) => {}
                Err(other) => prop_assert!(false, "{other}"),
            }
        }

        #[test]
        fn re_exported_totals_never_go_back(values in proptest::collection::vec(0u64..1000, 1..20)) {
            let mut total = 0u64;
            let mut last = None;
            for v in values {
                let next = total + advance(last, v);
                prop_assert!(next >= total);
                total = next;
                last = Some(v);
            }
        }
    }
}
