//! Telemetry: the metrics registry, process metrics, logs (text/JSON, audit target) and traces.
//!
//! Flow: [`logging::init`] installs the tracing subscriber once at start-up (filter, text or JSON
//! output, optional audit file, OpenTelemetry layer that gives every span a trace id and exports
//! it over OTLP when enabled). [`Metrics::new`] builds the prometheus-client registry that lives
//! in application state (no globals); each subsystem registers its own metrics struct there, and
//! the metrics listener encodes it on scrape.

pub mod logging;
mod process;

use prometheus_client::registry::Registry;

pub use process::{ConnectionEvent, Listener, ProcessMetrics};

/// Target of audit records: security-relevant events that may be routed to their own file.
pub const AUDIT_TARGET: &str = "audit";

/// Version string with the git revision, e.g. `0.1.0 (abc1234)`.
pub const VERSION_LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("KEYWARDEN_GIT_SHA"),
    ")"
);

/// The git revision the binary was built from (`unknown` outside a checkout).
pub const GIT_SHA: &str = env!("KEYWARDEN_GIT_SHA");

/// Every metric the service exports, registered on one registry.
#[derive(Debug)]
pub struct Metrics {
    /// The registry encoded on `/metrics`.
    pub registry: Registry,
    /// `keywarden_*` process metrics.
    pub process: ProcessMetrics,
    /// `dstack_kms_*` key-dispatch metrics.
    pub kms: crate::kms::metrics::KmsMetrics,
    /// `dstack_kms_attestation_*` / `dstack_kms_collateral_*` metrics.
    pub attestation: crate::attestation::AttestationMetrics,
}

impl Metrics {
    /// Builds the registry with every subsystem's metrics.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let process = ProcessMetrics::new(&mut registry);
        let kms = crate::kms::metrics::KmsMetrics::new(&mut registry);
        let attestation = crate::attestation::AttestationMetrics::new(&mut registry);
        Self {
            registry,
            process,
            kms,
            attestation,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The value of the unlabelled sample `name` in an OpenMetrics/Prometheus exposition.
pub fn sample_value(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// Encodes the registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(8 * 1024);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_value_reads_unlabelled_samples_only() {
        let text = "# TYPE a gauge\na 1.5\na_total 7\nb{x=\"y\"} 3\n";
        assert_eq!(sample_value(text, "a"), Some(1.5));
        assert_eq!(sample_value(text, "a_total"), Some(7.0));
        assert_eq!(sample_value(text, "b"), None);
        assert_eq!(sample_value(text, "c"), None);
    }
}
