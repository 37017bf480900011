//! `keywarden_leader`, `keywarden_leadership_changes_total` and
//! `keywarden_follower_lag_seconds`.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Cluster metrics. Cheap to clone; clones update the same series.
#[derive(Clone, Debug, Default)]
pub struct ClusterMetrics {
    leader: Gauge,
    changes: Counter,
    lag: Gauge<f64, AtomicU64>,
}

impl ClusterMetrics {
    /// Registers the metrics on `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "keywarden_leader",
            "1 while this replica runs the singleton work (the cluster's leader, or a single node), else 0",
            m.leader.clone(),
        );
        registry.register(
            "keywarden_leadership_changes",
            "Times this replica became or stopped being the leader",
            m.changes.clone(),
        );
        registry.register(
            "keywarden_follower_lag_seconds",
            "How long ago the leader last caught up with the chain, as this follower last read it (0 on the leader)",
            m.lag.clone(),
        );
        m.set_leading(true);
        m
    }

    /// Exports whether this replica runs the singleton work.
    pub fn set_leading(&self, leading: bool) {
        self.leader.set(i64::from(leading));
        if leading {
            self.lag.set(0.0);
        }
    }

    /// Counts a change of leadership.
    pub fn changed(&self) {
        self.changes.inc();
    }

    /// Exports a follower's lag.
    pub fn follower_lag(&self, seconds: f64) {
        self.lag.set(seconds);
    }
}
