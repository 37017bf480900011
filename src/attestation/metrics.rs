//! Prometheus metrics of attestation verification and collateral fetching.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::reason::RejectReason;

/// The TEE kind, as a metric label and a JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum TeeLabel {
    /// Intel TDX.
    #[allow(non_camel_case_types)]
    tdx,
    /// AWS Nitro Enclave.
    #[allow(non_camel_case_types)]
    nitro,
}

/// The outcome label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum ResultLabel {
    /// Verified.
    #[allow(non_camel_case_types)]
    ok,
    /// Refused.
    #[allow(non_camel_case_types)]
    rejected,
}

/// The `reason` label: `none` for successes, otherwise the reject reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReasonLabel(pub Option<RejectReason>);

impl EncodeLabelValue for ReasonLabel {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        match self.0 {
            Some(r) => r.encode(encoder),
            None => std::fmt::Write::write_str(encoder, "none"),
        }
    }
}

/// Labels of `dstack_kms_attestation_verifications`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct VerificationLabels {
    /// TEE kind.
    pub tee: TeeLabel,
    /// Outcome.
    pub result: ResultLabel,
    /// Reject reason or `none`.
    pub reason: ReasonLabel,
}

/// Why a collateral fetch was not attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchSkipped {
    /// Every fetch slot was taken.
    Busy,
    /// The platform's last fetch failed within the failure TTL.
    RecentFailure,
}

impl FetchSkipped {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Busy => "busy",
            Self::RecentFailure => "recent_failure",
        }
    }
}

/// Labels of `dstack_kms_collateral_fetches_skipped`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SkippedLabels {
    /// `busy` or `recent_failure`.
    pub reason: &'static str,
}

/// Attestation metrics; cheap to clone (all handles are shared).
#[derive(Debug, Clone)]
pub struct AttestationMetrics {
    verifications: Family<VerificationLabels, Counter>,
    requests: Counter,
    failures: Counter,
    collateral_fetch_duration: Histogram,
    collateral_fetch_failures: Counter,
    collateral_cache_hits: Counter,
    collateral_cache_misses: Counter,
    collateral_fetches_skipped: Family<SkippedLabels, Counter>,
}

impl AttestationMetrics {
    /// Registers the metrics under their full names on `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            verifications: Family::default(),
            requests: Counter::default(),
            failures: Counter::default(),
            collateral_fetch_duration: Histogram::new([
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            collateral_fetch_failures: Counter::default(),
            collateral_cache_hits: Counter::default(),
            collateral_cache_misses: Counter::default(),
            collateral_fetches_skipped: Family::default(),
        };
        registry.register(
            "dstack_kms_attestation_verifications",
            "Attestation verifications by TEE, result and reason",
            m.verifications.clone(),
        );
        registry.register(
            "dstack_kms_attestation_requests",
            "Attestations submitted for verification",
            m.requests.clone(),
        );
        registry.register(
            "dstack_kms_attestation_failures",
            "Attestations that failed verification",
            m.failures.clone(),
        );
        registry.register(
            "dstack_kms_collateral_fetch_duration_seconds",
            "Latency of collateral fetches from the PCCS",
            m.collateral_fetch_duration.clone(),
        );
        registry.register(
            "dstack_kms_collateral_fetch_failures",
            "Failed collateral fetches",
            m.collateral_fetch_failures.clone(),
        );
        registry.register(
            "dstack_kms_collateral_cache_hits",
            "Collateral served from the cache",
            m.collateral_cache_hits.clone(),
        );
        registry.register(
            "dstack_kms_collateral_cache_misses",
            "Collateral not in the cache (or due for refresh)",
            m.collateral_cache_misses.clone(),
        );
        registry.register(
            "dstack_kms_collateral_fetches_skipped",
            "Collateral fetches not attempted: every fetch slot taken (busy), or the platform's last fetch failed within attestation.collateral_failure_ttl (recent_failure)",
            m.collateral_fetches_skipped.clone(),
        );
        for why in [FetchSkipped::Busy, FetchSkipped::RecentFailure] {
            let _ = m.collateral_fetches_skipped.get_or_create(&SkippedLabels {
                reason: why.as_str(),
            });
        }
        // Success series start at 0 so dashboards and ratios see them before the first request.
        for tee in [TeeLabel::tdx, TeeLabel::nitro] {
            let _ = m.verifications.get_or_create(&VerificationLabels {
                tee,
                result: ResultLabel::ok,
                reason: ReasonLabel(None),
            });
        }
        m
    }

    /// Records one verification outcome, and logs refusals with the fixed message.
    pub fn record_verification(&self, tee: TeeLabel, outcome: Result<(), RejectReason>) {
        self.requests.inc();
        let (result, reason) = match outcome {
            Ok(()) => (ResultLabel::ok, None),
            Err(r) => {
                self.failures.inc();
                tracing::warn!(reason = %r, tee = ?tee, "attestation verification failed");
                (ResultLabel::rejected, Some(r))
            }
        };
        self.verifications
            .get_or_create(&VerificationLabels {
                tee,
                result,
                reason: ReasonLabel(reason),
            })
            .inc();
    }

    /// Records the outcome of a verification call (convenience over
    /// [`AttestationMetrics::record_verification`]).
    pub fn observe<T>(&self, tee: TeeLabel, result: &Result<T, super::reason::AttestationError>) {
        self.record_verification(tee, result.as_ref().map(|_| ()).map_err(|e| e.reason));
    }

    /// Records a collateral fetch and its latency.
    pub fn record_collateral_fetch(&self, seconds: f64, ok: bool) {
        self.collateral_fetch_duration.observe(seconds);
        if !ok {
            self.collateral_fetch_failures.inc();
        }
    }

    /// Records a collateral fetch that was not attempted.
    pub fn record_fetch_skipped(&self, why: FetchSkipped) {
        self.collateral_fetches_skipped
            .get_or_create(&SkippedLabels {
                reason: why.as_str(),
            })
            .inc();
    }

    /// Records a collateral cache lookup.
    pub fn record_cache(&self, hit: bool) {
        if hit {
            self.collateral_cache_hits.inc();
        } else {
            self.collateral_cache_misses.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_render() {
        let mut reg = Registry::default();
        let m = AttestationMetrics::new(&mut reg);
        m.record_verification(TeeLabel::tdx, Ok(()));
        m.observe::<()>(
            TeeLabel::nitro,
            &Err(super::super::reason::AttestationError::new(
                RejectReason::PcrNotAllowed,
                "x",
            )),
        );
        m.record_collateral_fetch(0.2, false);
        m.record_cache(true);
        m.record_cache(false);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        for needle in [
            "dstack_kms_attestation_verifications_total{tee=\"nitro\",result=\"rejected\",reason=\"pcr_not_allowed\"} 1",
            "dstack_kms_attestation_verifications_total{tee=\"tdx\",result=\"ok\",reason=\"none\"} 1",
            "dstack_kms_attestation_requests_total 2",
            "dstack_kms_attestation_failures_total 1",
            "dstack_kms_collateral_fetch_duration_seconds_count 1",
            "dstack_kms_collateral_fetch_failures_total 1",
            "dstack_kms_collateral_cache_hits_total 1",
            "dstack_kms_collateral_cache_misses_total 1",
        ] {
            assert!(out.contains(needle), "missing {needle} in\n{out}");
        }
    }
}
