//! `keywarden_alert_*`: deliveries by channel and outcome, and what waits. Labels are closed:
//! the channel kinds and the outcomes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::channel::Channel;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    channel: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabels {
    channel: &'static str,
}

/// Every channel kind, configured or not (series exist from the start).
const CHANNELS: [&str; 3] = ["alertmanager", "webhook", "slack"];

/// Alert metrics. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AlertMetrics {
    deliveries: Family<DeliveryLabels, Counter>,
    pending: Family<ChannelLabels, Gauge>,
    reposts: Counter,
}

impl AlertMetrics {
    /// Registers the families on `registry`.
    pub fn new(registry: &mut Registry, _configured: &[Channel]) -> Self {
        let m = Self {
            deliveries: Family::default(),
            pending: Family::default(),
            reposts: Counter::default(),
        };
        for channel in CHANNELS {
            for outcome in ["delivered", "failed"] {
                let _ = m
                    .deliveries
                    .get_or_create(&DeliveryLabels { channel, outcome });
            }
            let _ = m.pending.get_or_create(&ChannelLabels { channel });
        }
        registry.register(
            "keywarden_alert_deliveries",
            "Alert delivery attempts by channel (alertmanager, webhook, slack) and outcome (delivered, failed: retried later, never dropped)",
            m.deliveries.clone(),
        );
        registry.register(
            "keywarden_alert_pending",
            "Alert deliveries waiting (not yet accepted by their channel), by channel",
            m.pending.clone(),
        );
        registry.register(
            "keywarden_alert_alertmanager_reposts",
            "Re-posts of firing alerts to Alertmanager (it forgets alerts not re-sent within its resolve_timeout)",
            m.reposts.clone(),
        );
        m
    }

    /// Counts one attempt.
    pub fn delivery(&self, channel: &'static str, delivered: bool) {
        let outcome = if delivered { "delivered" } else { "failed" };
        self.deliveries
            .get_or_create(&DeliveryLabels { channel, outcome })
            .inc();
    }

    /// Sets the waiting rows per channel.
    pub fn pending(&self, counts: &[(String, i64)]) {
        for channel in CHANNELS {
            let n = counts
                .iter()
                .find(|(c, _)| c == channel)
                .map_or(0, |(_, n)| *n);
            self.pending
                .get_or_create(&ChannelLabels { channel })
                .set(n);
        }
    }

    /// Counts one re-post round.
    pub fn repost(&self) {
        self.reposts.inc();
    }
}
