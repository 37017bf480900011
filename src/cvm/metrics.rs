//! `dstack_cvm_*` metrics: the fleet as the KMS's own records show it. No app or instance id is
//! ever a label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

/// CVM metrics. Cheap to clone; clones update the same series.
#[derive(Clone, Debug, Default)]
pub struct CvmMetrics {
    deployments: Counter,
    restarts: Family<SourceLabels, Counter>,
    known: Gauge,
    last_boot: Gauge,
}

impl CvmMetrics {
    /// Registers the families on `registry`, every series initialised.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        let _ = m.restarts.get_or_create(&SourceLabels { source: "kms" });
        registry.register(
            "dstack_cvm_deployments",
            "CVMs deployed: instances whose first boot this KMS released keys to, since start",
            m.deployments.clone(),
        );
        registry.register(
            "dstack_cvm_restarts",
            "CVM restarts, by where they were seen (kms: a later boot of an instance that received keys before)",
            m.restarts.clone(),
        );
        registry.register(
            "dstack_cvm_known_instances",
            "Instances that ever received keys from this KMS (its boot records)",
            m.known.clone(),
        );
        registry.register(
            "dstack_cvm_last_boot_timestamp_seconds",
            "When the latest boot an instance received keys for happened (Unix seconds; 0 when none)",
            m.last_boot.clone(),
        );
        m
    }

    /// Counts a deployment.
    pub fn deployed(&self) {
        self.deployments.inc();
    }

    /// Counts `n` restarts seen by the KMS.
    pub fn restarted(&self, n: u64) {
        self.restarts
            .get_or_create(&SourceLabels { source: "kms" })
            .inc_by(n);
    }

    /// Exports the fleet's size and latest boot.
    pub fn fleet(&self, known: usize, last_boot: i64) {
        self.known.set(i64::try_from(known).unwrap_or(i64::MAX));
        self.last_boot.set(last_boot);
    }
}
