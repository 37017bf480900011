//! Application state shared by listeners and background tasks, and the health check.
//!
//! Built once by [`crate::service`] at start-up; handlers receive it as axum state. The health
//! check (database ping + every registered component) feeds `/readyz` and `keywarden_healthy`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::runtime::{NotReady, Readiness, Task};
use crate::store::{AuditRecord, RunStart, Store};
use crate::telemetry::{AUDIT_TARGET, ProcessMetrics};

/// How long `/readyz` waits for the database.
const DB_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Shared state. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// The state's fields.
pub struct Inner {
    /// Effective configuration.
    pub config: Config,
    /// Persistence.
    pub store: Store,
    /// Every metric, encoded on `/metrics`.
    pub registry: Registry,
    /// Process metrics.
    pub process: ProcessMetrics,
    /// Component readiness.
    pub readiness: Readiness,
    /// SHA-256 of the admin bearer token, if the admin API is enabled.
    pub admin_token_hash: Option<[u8; 32]>,
    /// This node's persistent id.
    pub node_id: String,
    /// This process's run record.
    pub run: RunStart,
    /// When the process started.
    pub started: Instant,
    /// The on-chain mirror, when `[chain]` is configured.
    pub chain: Option<Arc<crate::chain::Mirror>>,
    /// This process's hold on the data directory, for as long as the state lives.
    pub data_dir_lock: crate::store::DataDirLock,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// Wraps the fields.
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }

    /// Database ping plus every component; updates `keywarden_healthy`. Empty means ready.
    pub async fn health(&self) -> Vec<NotReady> {
        let mut problems = Vec::new();
        if let Err(e) = self.store.ping(DB_PING_TIMEOUT).await {
            problems.push(NotReady {
                component: "database".into(),
                reason: e.to_string(),
            });
        }
        problems.extend(self.readiness.not_ready());
        self.process.set_healthy(problems.is_empty());
        problems
    }

    /// Writes an audit record (see [`audit`]).
    pub async fn audit(&self, kind: &str, outcome: &str, detail: serde_json::Value) {
        audit(&self.store, kind, outcome, detail).await;
    }
}

/// Stores an audit record, then writes its line to the `audit` log target ([`log_audit`]).
pub async fn audit(store: &Store, kind: &str, outcome: &str, detail: serde_json::Value) {
    let rec = audit_record(kind, outcome, &detail);
    let stored = store.append_audit(&rec).await.err().map(|e| e.to_string());
    log_audit(&rec, stored.as_deref());
}

/// An audit record, not yet stored or logged.
pub fn audit_record(kind: &str, outcome: &str, detail: &serde_json::Value) -> AuditRecord {
    AuditRecord {
        at: unix_now(),
        kind: kind.to_owned(),
        outcome: outcome.to_owned(),
        detail: detail.to_string(),
    }
}

/// The `audit` log line of `rec`, written once storing it was attempted: what was stored, or an
/// ERROR line with the `error` that kept it from being stored. An `ok` that could not be recorded is logged as `failed`,
/// because whatever it allowed is withheld.
pub fn log_audit(rec: &AuditRecord, error: Option<&str>) {
    let (kind, detail) = (rec.kind.as_str(), rec.detail.as_str());
    match error {
        None => {
            tracing::info!(target: AUDIT_TARGET, kind, outcome = rec.outcome, detail, "audit");
        }
        Some(error) => {
            let outcome = match rec.outcome.as_str() {
                "ok" => "failed",
                other => other,
            };
            tracing::error!(target: AUDIT_TARGET, kind, outcome, detail, error, "audit record could not be stored");
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Re-evaluates health periodically so `keywarden_healthy` is current between `/readyz` calls,
/// and logs transitions.
pub struct HealthMonitor {
    /// State to check.
    pub state: AppState,
    /// How often.
    pub interval: Duration,
}

impl Task for HealthMonitor {
    fn name(&self) -> &'static str {
        "health_monitor"
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_healthy = true;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let problems = self.state.health().await;
            let healthy = problems.is_empty();
            if healthy != was_healthy {
                if healthy {
                    tracing::info!("service healthy again");
                } else {
                    let detail = serde_json::to_string(&problems).unwrap_or_default();
                    tracing::warn!(not_ready = %detail, "service unhealthy");
                }
                was_healthy = healthy;
            }
        }
    }
}
