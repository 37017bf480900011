//! The `cvm_gateway` task, with `[cvm.gateway]`: the dstack gateway's admin `Admin.Status`
//! (spec/07 §3) names every instance it routes and its latest WireGuard handshake, which is when
//! the instance was last seen. Polled like a VMM; the handshakes join the polled VMs by instance
//! id ([`super::poller::CvmView`]). A gateway that fails leaves no last-seen times behind.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::client::{SourceError, VmmClient};
use super::metrics::CvmMetrics;
use super::poller::CvmView;
use crate::runtime::Task;

/// A handshake older than this is stale (WireGuard renews every two minutes).
pub const STALE_AFTER: Duration = Duration::from_secs(180);

/// One host of `Admin.Status` (only what is read).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct GatewayHost {
    /// Instance id (hex).
    #[serde(default)]
    pub instance_id: String,
    /// App id (hex).
    #[serde(default)]
    pub app_id: String,
    /// Latest WireGuard handshake, Unix seconds (0: none yet).
    #[serde(default)]
    pub latest_handshake: u64,
}

/// `Admin.Status`'s answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct GatewayStatus {
    /// The hosts it routes.
    #[serde(default)]
    pub hosts: Vec<GatewayHost>,
}

/// Last-seen times by instance id (lowercase hex), and how many are stale at `now`.
pub fn last_seen(status: &GatewayStatus, now: u64) -> (HashMap<String, u64>, usize) {
    let seen: HashMap<String, u64> = status
        .hosts
        .iter()
        .filter(|h| !h.instance_id.is_empty() && h.latest_handshake > 0)
        .map(|h| {
            (
                h.instance_id.trim_start_matches("0x").to_ascii_lowercase(),
                h.latest_handshake,
            )
        })
        .collect();
    let stale = status
        .hosts
        .iter()
        .filter(|h| now.saturating_sub(h.latest_handshake) > STALE_AFTER.as_secs())
        .count();
    (seen, stale)
}

/// The gateway poller.
pub struct GatewayPoller {
    client: VmmClient,
    interval: Duration,
    view: Arc<CvmView>,
    metrics: CvmMetrics,
}

impl GatewayPoller {
    /// A poller of the gateway behind `client`.
    pub fn new(
        client: VmmClient,
        interval: Duration,
        view: Arc<CvmView>,
        metrics: CvmMetrics,
    ) -> Self {
        Self {
            client,
            interval,
            view,
            metrics,
        }
    }

    /// One poll (its error, when the gateway gave no usable answer, is counted and logged).
    pub async fn poll_once(&self) -> Result<(), SourceError> {
        let started = Instant::now();
        let answer = async {
            let body = self
                .client
                .prpc("Admin.Status", &serde_json::json!({}))
                .await?;
            Ok::<GatewayStatus, SourceError>(super::vmm::parse("Admin.Status", &body)?)
        };
        let result = match answer.await {
            Ok(status) => {
                let (seen, stale) = last_seen(&status, crate::clock::unix_secs());
                self.metrics.gateway(Some((status.hosts.len(), stale)));
                self.view.set_seen(seen);
                self.metrics.source_poll("gateway", "ok", started.elapsed());
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "cvm: the gateway gave no usable answer; no last-seen times until it does");
                self.metrics.gateway(None);
                self.view.set_seen(HashMap::new());
                self.metrics
                    .source_poll("gateway", e.label(), started.elapsed());
                Err(e)
            }
        };
        self.metrics.publish(&self.view.all());
        result
    }
}

impl Task for GatewayPoller {
    fn name(&self) -> &'static str {
        "cvm_gateway"
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut tick = crate::runtime::ticker(self.interval);
        while cancel.run_until_cancelled(tick.tick()).await.is_some()
            && cancel.run_until_cancelled(self.poll_once()).await.is_some()
        {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_give_last_seen_and_stale_hosts() {
        let status: GatewayStatus = super::super::vmm::parse(
            "Admin.Status",
            br#"{"hosts":[{"instance_id":"0xABCD","app_id":"ef","latest_handshake":1000,"ip":"10.0.0.2"},
                {"instance_id":"01","latest_handshake":700},{"instance_id":"02","latest_handshake":0}],"num_connections":3}"#,
        )
        .unwrap();
        let (seen, stale) = last_seen(&status, 1100);
        assert_eq!(seen.get("abcd"), Some(&1000));
        assert_eq!(seen.get("01"), Some(&700));
        assert!(!seen.contains_key("02"));
        // 01 handshook 400 s ago, 02 never.
        assert_eq!(stale, 2);
    }
}
