//! Application state shared by listeners and background tasks, the health check, and the
//! routers that serve it: the metrics listener's (`ops`: `/metrics`, `/livez`, `/readyz`) and the
//! admin listener's (`admin`: bearer-token auth, audit and chain reports).
//!
//! Built once by `service` at start-up; handlers receive it as axum state. The health
//! check (database ping + every registered component) feeds `/readyz` and `keywarden_healthy`.

mod admin;
mod ops;

pub use admin::router as admin_router;
pub use ops::router as ops_router;

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::runtime::{NotReady, Readiness, Task};
use crate::store::{AuditRecord, RunStart, Store};
use crate::telemetry::ProcessMetrics;

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
    /// This process's hold on the data directory, for as long as the state lives.
    pub data_dir_lock: crate::store::DataDirLock,
    /// Whether this replica leads (`/readyz` names the role).
    pub leadership: crate::cluster::Leadership,
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

/// Stores an audit record, then writes its line to the `audit` log target.
pub async fn audit(store: &Store, kind: &str, outcome: &str, detail: serde_json::Value) {
    let rec = AuditRecord::new(kind, outcome, &detail);
    let stored = store.append_audit(&rec).await.err().map(|e| e.to_string());
    rec.log(stored.as_deref());
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
        let mut tick = crate::runtime::ticker(self.interval);
        let mut was_healthy = true;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let problems = self.state.health().await;
            self.state.process.beat(crate::clock::unix_secs_i64());
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
