//! Several replicas on one PostgreSQL: every replica serves keys, one leader runs the singleton
//! work (the chain follower, the governance watcher and its alert delivery, the CVM pollers),
//! the others follow the shared tables. SQLite stays the single-node default, where this module
//! reduces to a [`Leadership`] that always leads.
//!
//! What it owns: [`config`] (`[cluster]`); [`lease`] (the `cluster_lease` task holding the
//! leadership on a PostgreSQL advisory lock, with the epoch every singleton write checks, and
//! the [`Leadership`] handle singleton work waits on); [`store`] (the leadership row and the
//! replicas' reports); [`singleton`] (work run only within leadership terms); [`metrics`];
//! [`cli`] (`keywarden cluster status`).
//!
//! Flow: the lease wins or loses the leadership → [`Leadership`] publishes the [`Role`] → each
//! singleton loop runs its rounds only within a leadership term (cancelled when it ends), and
//! its writes carry the term's epoch (`store::fence!`), so a stale leader's batch is refused.

pub mod cli;
pub mod config;
pub mod lease;
pub mod metrics;
pub mod singleton;
pub mod store;

use std::path::Path;

pub use lease::{Leadership, Role, Term};
pub use singleton::Singleton;

/// Why the cluster subsystem could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The replica id file cannot be read or written.
    #[error("replica id {path}: {reason} (fix: make the data directory writable by keywarden)")]
    ReplicaId {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The cluster subsystem as the service runs it.
pub struct Subsystem {
    /// What singleton work waits on.
    pub leadership: Leadership,
    /// This replica's id (`None` for a single node).
    pub replica: Option<String>,
    /// Its metrics.
    pub metrics: metrics::ClusterMetrics,
    /// The lease (critical), in a cluster.
    pub tasks: crate::runtime::Tasks,
}

/// This replica's id: created once under `data_dir` (each replica has its own).
pub fn replica_id(data_dir: &Path) -> Result<String, ClusterError> {
    let path = data_dir.join("replica-id");
    let failed = |e: &dyn std::fmt::Display| ClusterError::ReplicaId {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(&e)),
    }
    let mut fresh = [0u8; 8];
    getrandom::fill(&mut fresh).map_err(|e| failed(&e))?;
    let id = hex::encode(fresh);
    std::fs::write(&path, &id).map_err(|e| failed(&e))?;
    Ok(id)
}

/// Builds the cluster subsystem: with `[cluster] enabled`, the lease on the PostgreSQL at
/// `postgres_url` for this replica (`replica`, from [`replica_id`], serving keys on `api`);
/// otherwise a single node's leadership.
pub fn subsystem(
    cfg: &config::ClusterConfig,
    postgres_url: Option<&str>,
    replica: &str,
    api: String,
    registry: &mut prometheus_client::registry::Registry,
) -> Result<Subsystem, ClusterError> {
    let metrics = metrics::ClusterMetrics::new(registry);
    let mut tasks = crate::runtime::Tasks::default();
    let Some(url) = postgres_url.filter(|_| cfg.enabled) else {
        return Ok(Subsystem {
            leadership: Leadership::single(),
            replica: None,
            metrics,
            tasks,
        });
    };
    let replica = replica.to_owned();
    let (lease, leadership) = lease::LeaseTask::new(
        url.to_owned(),
        replica.clone(),
        api,
        cfg.heartbeat_interval,
        metrics.clone(),
    );
    tasks.add(lease, crate::runtime::Criticality::Critical);
    Ok(Subsystem {
        leadership,
        replica: Some(replica),
        metrics,
        tasks,
    })
}
