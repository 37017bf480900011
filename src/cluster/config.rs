//! `[cluster]`: several replicas on one PostgreSQL, one leader for the background work.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::problem::{Problem, positive};

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Run as one of several replicas sharing one PostgreSQL database: every replica serves
    /// keys, one leader runs the chain follower, the governance watcher, alert delivery and the
    /// CVM pollers, the others follow the shared tables.
    pub enabled: bool,
    /// How often the leader renews its lease (a replica that cannot reach the database stops
    /// its singleton work within this) and every replica reports itself.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How often a follower reloads the shared chain tables when no notification came.
    #[serde(with = "humantime_serde")]
    pub catch_up_interval: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            heartbeat_interval: Duration::from_secs(2),
            catch_up_interval: Duration::from_secs(5),
        }
    }
}

impl ClusterConfig {
    /// Everything wrong with the section; `postgres` tells whether the database is PostgreSQL.
    pub fn problems(&self, postgres: bool) -> Vec<Problem> {
        let mut out = Vec::new();
        if self.enabled && !postgres {
            out.push(Problem::new(
                "cluster.enabled",
                "needs PostgreSQL: the replicas share one database",
                "set storage.database_url = \"postgres://...\" (SQLite is the single-node default)",
            ));
        }
        out.extend(positive(
            "cluster.heartbeat_interval",
            self.heartbeat_interval,
            "2s",
        ));
        out.extend(positive(
            "cluster.catch_up_interval",
            self.catch_up_interval,
            "5s",
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_needs_postgresql_and_positive_intervals() {
        assert!(ClusterConfig::default().problems(false).is_empty());
        let on = ClusterConfig {
            enabled: true,
            ..ClusterConfig::default()
        };
        assert!(on.problems(true).is_empty());
        let keys: Vec<String> = on.problems(false).into_iter().map(|p| p.key).collect();
        assert_eq!(keys, vec!["cluster.enabled"]);
        let zero = ClusterConfig {
            heartbeat_interval: Duration::ZERO,
            ..on
        };
        let keys: Vec<String> = zero.problems(true).into_iter().map(|p| p.key).collect();
        assert_eq!(keys, vec!["cluster.heartbeat_interval"]);
    }
}
