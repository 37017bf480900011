//! The delivery task: sends due deliveries, retries failures with backoff, and re-posts firing
//! alerts to Alertmanager until they are resolved.
//!
//! Flow, per tick (250 ms): due rows ([`Store::alerts_due`]) → each claimed for this task's
//! leadership term (one task is built per term) → the channel's request → sent → marked
//! delivered, or due again after `retry_initial · 2^attempts` (at most `retry_max`) with
//! the error kept; a failure is counted and logged, never dropped. Every `repost_interval`, each
//! firing alert (and each resolved in the last five minutes) is posted to Alertmanager again.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::channel::{self, Channel};
use super::config::AlertsConfig;
use super::metrics::AlertMetrics;
use super::outbox::Due;
use crate::runtime::Task;
use crate::store::Store;

/// How often due rows are looked for.
const TICK: Duration = Duration::from_millis(250);

/// Rows sent per tick.
const BATCH: i64 = 100;

/// How long a resolved alert is still re-posted, so that Alertmanager sees its end.
const RESOLVED_REPOST_SECONDS: i64 = 300;

/// The delivery task.
pub struct Deliverer {
    store: Store,
    channels: Vec<Channel>,
    http: reqwest::Client,
    retry_initial: Duration,
    retry_max: Duration,
    repost_interval: Duration,
    metrics: AlertMetrics,
    /// Whose epoch the delivery writes carry.
    leadership: crate::cluster::Leadership,
    /// This task's claim on the rows it sends: unique to it, hence to its leadership term.
    term: String,
}

/// A claim id no other deliverer holds.
fn term_id() -> String {
    let mut nonce = [0u8; 12];
    // Without randomness the time alone still differs between terms of one process.
    let _ = getrandom::fill(&mut nonce);
    format!(
        "{}-{}",
        hex::encode(nonce),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )
}

/// Seconds before attempt `attempts + 1`.
pub fn backoff(initial: Duration, max: Duration, attempts: i64) -> Duration {
    let exp = u32::try_from(attempts.clamp(0, 30)).unwrap_or(30);
    initial.saturating_mul(2u32.saturating_pow(exp)).min(max)
}

impl Deliverer {
    /// A deliverer for `channels`.
    pub fn new(
        store: Store,
        channels: Vec<Channel>,
        cfg: &AlertsConfig,
        metrics: AlertMetrics,
    ) -> Self {
        crate::tls::ensure_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self {
            store,
            channels,
            http,
            retry_initial: cfg.retry_initial,
            retry_max: cfg.retry_max,
            repost_interval: cfg.repost_interval,
            metrics,
            leadership: crate::cluster::Leadership::single(),
            term: term_id(),
        }
    }

    /// The same deliverer in a cluster: its writes carry the leadership's epoch.
    pub fn in_cluster(mut self, leadership: crate::cluster::Leadership) -> Self {
        self.leadership = leadership;
        self
    }

    async fn deliver(&self, d: &Due) -> anyhow::Result<()> {
        let Some(channel) = self.channels.iter().find(|c| c.label() == d.channel) else {
            // A channel no longer configured: its rows wait until it is configured again.
            return Ok(());
        };
        let now = crate::clock::unix_secs_i64();
        let epoch = self.leadership.role().epoch();
        if !self.store.alert_claim(d, &self.term, now, epoch).await? {
            return Ok(());
        }
        let req = channel.request(&d.alert, d.starts_at, now);
        match channel::send(&self.http, &req).await {
            Ok(()) => {
                self.store.alert_delivered(d, now, epoch).await?;
                self.metrics.delivery(channel.label(), true);
                tracing::info!(
                    channel = channel.label(),
                    alert = %d.alert.name,
                    key = %d.alert.key,
                    transition = %d.alert.transition,
                    severity = d.alert.severity.label(),
                    "alert delivered"
                );
            }
            Err(error) => {
                let wait = backoff(self.retry_initial, self.retry_max, d.attempts);
                let next =
                    now.saturating_add(i64::try_from(wait.as_secs().max(1)).unwrap_or(i64::MAX));
                self.store.alert_failed(d, next, &error, epoch).await?;
                self.metrics.delivery(channel.label(), false);
                tracing::warn!(
                    channel = channel.label(),
                    key = %d.alert.key,
                    transition = %d.alert.transition,
                    attempts = d.attempts + 1,
                    retry_in_seconds = wait.as_secs(),
                    %error,
                    "alert delivery failed; retrying later"
                );
            }
        }
        Ok(())
    }

    async fn repost(&self) -> anyhow::Result<()> {
        let Some(url) = self.channels.iter().find_map(|c| match c {
            Channel::Alertmanager { url } => Some(url),
            _ => None,
        }) else {
            return Ok(());
        };
        let now = crate::clock::unix_secs_i64();
        let firing = self
            .store
            .alerts_firing(now - RESOLVED_REPOST_SECONDS)
            .await?;
        if firing.is_empty() {
            return Ok(());
        }
        let body: Vec<serde_json::Value> = firing
            .iter()
            .map(|f| channel::alertmanager_alert(&f.alert, f.starts_at, f.ends_at))
            .collect();
        let req = channel::Request {
            url: format!("{url}/api/v2/alerts"),
            headers: Vec::new(),
            body: serde_json::Value::from(body).to_string().into_bytes(),
        };
        self.metrics.repost();
        if let Err(error) = channel::send(&self.http, &req).await {
            tracing::warn!(%error, alerts = firing.len(), "re-posting firing alerts to Alertmanager failed; next round retries");
        }
        Ok(())
    }

    async fn tick(&self) -> anyhow::Result<()> {
        for d in self
            .store
            .alerts_due(crate::clock::unix_secs_i64(), BATCH)
            .await?
        {
            self.deliver(&d).await?;
        }
        self.metrics.pending(&self.store.alerts_pending().await?);
        Ok(())
    }
}

impl Task for Deliverer {
    fn name(&self) -> &'static str {
        "alert_delivery"
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut tick = crate::runtime::ticker(TICK);
        let mut repost = crate::runtime::ticker(self.repost_interval);
        loop {
            // A cancelled step leaves its row undelivered: it is sent again after the restart.
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    if let Err(e) = self.tick().await {
                        tracing::warn!(error = %e, "alert delivery step failed; retrying");
                    }
                }
                _ = repost.tick() => {
                    if let Err(e) = self.repost().await {
                        tracing::warn!(error = %e, "alert re-post step failed; retrying");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let (i, m) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(backoff(i, m, 0), Duration::from_secs(1));
        assert_eq!(backoff(i, m, 3), Duration::from_secs(8));
        assert_eq!(backoff(i, m, 10), m);
        assert_eq!(backoff(i, m, i64::MAX), m);
    }
}
