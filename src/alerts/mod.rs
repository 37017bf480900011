//! Alerts: what keywarden tells people (signers, on-call), delivered once per transition and
//! channel, whatever restarts happen in between.
//!
//! What this module owns:
//!
//! - [`Alert`] and [`Severity`]: one transition of an alerted subject (a governance proposal, a
//!   timelock operation; later a CVM), with its labels and words.
//! - [`outbox`]: the `alert_transitions`, `alert_deliveries` and `alert_firing` tables, and
//!   [`outbox::Outbox::record`], which records a transition and queues its deliveries in one
//!   transaction (a transition already recorded is not queued again).
//! - [`channel`]: the channels and their payloads: the Alertmanager v2 API, an HMAC-SHA256
//!   signed JSON webhook, a Slack-compatible incoming webhook.
//! - [`delivery`]: the task that delivers due rows, retries failures with backoff (never
//!   dropping them) and re-posts firing alerts to Alertmanager until they are resolved.
//! - [`metrics`]: the `keywarden_alert_*` metrics.
//! - [`config`]: the `[alerts]` section.
//!
//! Flow: a producer (the governance notifier) → [`outbox::Outbox::record`] (store, one
//! transaction) → [`delivery::Deliverer`] → channel → delivered, or retried later.

pub mod channel;
pub mod config;
pub mod delivery;
pub mod metrics;
pub mod outbox;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How bad something is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing.
    Info,
    /// Worth a second look.
    Warning,
    /// Act before it is too late.
    Critical,
}

impl Severity {
    /// Label and text.
    pub fn label(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

/// One transition of an alerted subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// The subject (e.g. `timelock:<address>:<operation id>`): deliveries are deduplicated by
    /// (subject, transition, channel).
    pub key: String,
    /// What happened to it (e.g. `scheduled`, `ready`, `executed`).
    pub transition: String,
    /// Alert name (Alertmanager's `alertname`).
    pub name: String,
    /// Severity.
    pub severity: Severity,
    /// Extra labels (addresses and ids are fine here: alerts are not metrics).
    pub labels: BTreeMap<String, String>,
    /// One line.
    pub summary: String,
    /// The details, in words.
    pub description: String,
    /// Whether this transition ends the alert (executed, cancelled).
    pub resolved: bool,
}

/// Errors of the alerts module.
#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A stored alert does not decode.
    #[error("stored alert does not decode: {0}")]
    Stored(String),
}

/// The alerts subsystem as the service runs it.
pub struct Subsystem {
    /// Where producers record transitions.
    pub outbox: outbox::Outbox,
    /// The delivery task (optional: its failure is logged, alerts wait in the store).
    pub tasks: crate::runtime::Tasks,
}

/// Builds the alerts subsystem: registers `keywarden_alert_*` on `registry`; the delivery task
/// runs when at least one channel is configured, while this replica leads.
pub fn subsystem(
    cfg: &config::AlertsConfig,
    store: crate::store::Store,
    leadership: &crate::cluster::Leadership,
    registry: &mut prometheus_client::registry::Registry,
) -> Result<Subsystem, config::AlertsConfigError> {
    let channels = cfg.channels()?;
    let metrics = metrics::AlertMetrics::new(registry, &channels);
    let outbox = outbox::Outbox::new(store.clone(), &channels);
    let mut tasks = crate::runtime::Tasks::default();
    if !channels.is_empty() {
        let (cfg, leader) = (cfg.clone(), leadership.clone());
        let deliverer = move || {
            delivery::Deliverer::new(store.clone(), channels.clone(), &cfg, metrics.clone())
                .in_cluster(leader.clone())
        };
        tasks.add(
            crate::cluster::Singleton::new(
                leadership.clone(),
                deliverer(),
                move || Ok(deliverer()),
            ),
            crate::runtime::Criticality::Optional,
        );
    }
    Ok(Subsystem { outbox, tasks })
}
