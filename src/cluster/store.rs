//! The cluster tables of the store: the leadership row and the replicas' reports.

use serde::Serialize;
use sqlx::Row;

use crate::store::{Backend, Store, StoreError, on_backend};

/// The leadership as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaderRow {
    /// The current epoch.
    pub epoch: i64,
    /// Its replica.
    pub node_id: String,
    /// Since when (Unix seconds).
    pub since: i64,
    /// Its last renewal (Unix seconds).
    pub beat: i64,
}

/// One replica's last report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRow {
    /// Its id.
    pub node_id: String,
    /// `leader` or `follower`, as it last reported.
    pub role: String,
    /// When it started (Unix seconds).
    pub started: i64,
    /// Its last report (Unix seconds).
    pub beat: i64,
    /// Where it serves keys.
    pub api: String,
    /// The newest chain block its mirror had.
    pub processed_block: i64,
}

impl Store {
    /// The leadership row, once a leader was elected.
    pub async fn cluster_leader(&self) -> Result<Option<LeaderRow>, StoreError> {
        Ok(on_backend!(self, pool => {
            sqlx::query("SELECT epoch, node_id, since, beat FROM cluster_leader WHERE id = 1")
                .fetch_optional(pool)
                .await?
                .map(|r| {
                    Ok::<_, sqlx::Error>(LeaderRow {
                        epoch: r.try_get("epoch")?,
                        node_id: r.try_get("node_id")?,
                        since: r.try_get("since")?,
                        beat: r.try_get("beat")?,
                    })
                })
                .transpose()?
        }))
    }

    /// The replicas that reported at or after `since` (Unix seconds), by id.
    pub async fn cluster_nodes(&self, since: i64) -> Result<Vec<NodeRow>, StoreError> {
        Ok(on_backend!(self, pool => {
            sqlx::query(
                "SELECT node_id, role, started, beat, api, processed_block FROM cluster_nodes \
                 WHERE beat >= $1 ORDER BY node_id",
            )
            .bind(since)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| {
                Ok(NodeRow {
                    node_id: r.try_get("node_id")?,
                    role: r.try_get("role")?,
                    started: r.try_get("started")?,
                    beat: r.try_get("beat")?,
                    api: r.try_get("api")?,
                    processed_block: r.try_get("processed_block")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?
        }))
    }
}
