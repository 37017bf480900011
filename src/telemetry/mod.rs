//! Telemetry: the metrics registry, process metrics, logs (text/JSON, audit target) and traces.
//!
//! Flow: [`logging::init`] installs the tracing subscriber once at start-up (filter, text or JSON
//! output, optional audit file, OpenTelemetry layer that gives every span a trace id and exports
//! it over OTLP when enabled). The prometheus-client registry lives in application state (no
//! globals): `service` builds it, each subsystem registers its own metrics struct there, and the
//! metrics listener encodes it ([`encode`]) on scrape.

pub mod config;
pub mod logging;
mod process;

use prometheus_client::registry::Registry;

pub use process::{ConnectionEvent, Listener, ProcessMetrics};

/// Target of audit log lines: security-relevant events that may be routed to their own file.
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
