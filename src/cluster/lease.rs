//! Leadership: the [`Leadership`] handle singleton work holds, and the [`LeaseTask`] that keeps
//! it on PostgreSQL.
//!
//! Flow, every half `heartbeat_interval` on a connection of its own (each step bounded by half
//! the interval): a follower tries `pg_try_advisory_lock`; winning it bumps the epoch of the one
//! `cluster_leader` row and makes this replica the leader of that epoch. The leader renews its
//! row's `beat`. Any failure (the database down, the connection cut, a step too slow) makes the
//! replica a follower at once, and the connection is dropped, which releases the lock server
//! side: singleton work stops within one heartbeat interval. Each step also reports this
//! replica in `cluster_nodes`. A single node is always the leader, with no epoch to check.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::Connection as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::metrics::ClusterMetrics;
use crate::runtime::Task;

/// The advisory lock every replica of one database contends for.
const LOCK_KEY: i64 = 0x6b77_6c65_6164;

/// What this replica is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The only node: it does everything, and its writes need no fencing.
    Single,
    /// The cluster's leader for `epoch`.
    Leader {
        /// The leadership epoch its singleton writes carry.
        epoch: i64,
    },
    /// A follower: it serves keys and follows the shared tables.
    Follower,
}

impl Role {
    /// `single`, `leader` or `follower`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Leader { .. } => "leader",
            Self::Follower => "follower",
        }
    }

    /// Whether it runs the singleton work.
    pub fn leads(self) -> bool {
        !matches!(self, Self::Follower)
    }

    /// The epoch its singleton writes must hold (`None`: nothing to check).
    pub fn epoch(self) -> Option<i64> {
        match self {
            Self::Leader { epoch } => Some(epoch),
            _ => None,
        }
    }
}

/// The handle singleton work holds. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Leadership {
    role: watch::Receiver<Role>,
    /// The newest chain block this replica's mirror has (for `cluster status`).
    processed: Arc<AtomicU64>,
    metrics: Option<ClusterMetrics>,
}

/// A stretch of leadership: `token` is cancelled when it ends (or on shutdown).
#[derive(Debug)]
pub struct Term {
    /// What the singleton writes of this term must carry.
    pub epoch: Option<i64>,
    /// Cancelled when the term ends.
    pub token: CancellationToken,
}

impl Leadership {
    /// A single node's: always the leader.
    pub fn single() -> Self {
        let (_, role) = watch::channel(Role::Single);
        Self::over(role, None)
    }

    fn over(role: watch::Receiver<Role>, metrics: Option<ClusterMetrics>) -> Self {
        Self {
            role,
            processed: Arc::default(),
            metrics,
        }
    }

    /// Exports how long ago the leader last caught up, as this follower read it.
    pub fn follower_lag(&self, seconds: f64) {
        if let Some(m) = &self.metrics {
            m.follower_lag(seconds);
        }
    }

    /// This replica's role now.
    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    /// Records the newest chain block this replica's mirror has.
    pub fn set_processed(&self, block: u64) {
        self.processed.store(block, Ordering::Relaxed);
    }

    /// The newest chain block this replica's mirror has.
    pub fn processed(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
    }

    /// Waits until the role changes, or `cancel`. `false` on cancel or a dropped lease.
    pub async fn changed(&mut self, cancel: &CancellationToken) -> bool {
        matches!(
            cancel.run_until_cancelled(self.role.changed()).await,
            Some(Ok(()))
        )
    }

    /// Waits until this replica leads (`None` on `cancel`); the term's token is cancelled when
    /// the leadership ends or `cancel` fires.
    pub async fn term(&self, cancel: &CancellationToken) -> Option<Term> {
        let mut role = self.role.clone();
        let won = cancel
            .run_until_cancelled(role.wait_for(|r| r.leads()))
            .await?
            .ok()
            .map(|r| *r)?;
        let token = cancel.child_token();
        if let Role::Leader { .. } = won {
            let ends = token.clone();
            // Bounded: it ends with the term or the shutdown.
            tokio::spawn(async move {
                let lost = role.wait_for(|r| *r != won);
                let _ = ends.run_until_cancelled(lost).await;
                ends.cancel();
            });
        }
        Some(Term {
            epoch: won.epoch(),
            token,
        })
    }

    /// Waits for `tick`, then until this replica leads; `None` on `cancel`. The token is the
    /// round's: cancelled when the leadership ends or on `cancel`. For ticker loops.
    pub async fn round(
        &self,
        tick: &mut tokio::time::Interval,
        cancel: &CancellationToken,
    ) -> Option<CancellationToken> {
        cancel.run_until_cancelled(tick.tick()).await?;
        self.term(cancel).await.map(|t| t.token)
    }
}

/// The task that holds or contends for the lease.
pub struct LeaseTask {
    url: String,
    node: String,
    api: String,
    started: i64,
    interval: Duration,
    role: watch::Sender<Role>,
    leadership: Leadership,
    metrics: ClusterMetrics,
}

impl LeaseTask {
    /// The lease of replica `node` (serving on `api`) on the PostgreSQL at `url`, renewed every
    /// half `interval`; and the handle the singleton work holds.
    pub fn new(
        url: String,
        node: String,
        api: String,
        interval: Duration,
        metrics: ClusterMetrics,
    ) -> (Self, Leadership) {
        let (role, rx) = watch::channel(Role::Follower);
        let leadership = Leadership::over(rx, Some(metrics.clone()));
        metrics.set_leading(false);
        (
            Self {
                url,
                node,
                api,
                started: crate::clock::unix_secs_i64(),
                interval,
                role,
                leadership: leadership.clone(),
                metrics,
            },
            leadership,
        )
    }

    fn set(&self, next: Role) {
        let before = *self.role.borrow();
        if before == next {
            return;
        }
        match next {
            Role::Leader { epoch } => {
                tracing::info!(node = %self.node, epoch, "cluster: this replica leads");
            }
            _ if before.leads() => {
                tracing::warn!(node = %self.node, "cluster: this replica lost the leadership; its singleton work stops");
            }
            _ => {}
        }
        if before.leads() != next.leads() {
            self.metrics.changed();
        }
        self.metrics.set_leading(next.leads());
        self.role.send_replace(next);
    }

    /// One step on `conn`: keep, win or not win the leadership, and report this replica.
    async fn step(&self, conn: &mut sqlx::PgConnection) -> Result<Role, sqlx::Error> {
        let now = crate::clock::unix_secs_i64();
        let current = *self.role.borrow();
        let role = match current {
            Role::Leader { epoch } => {
                let kept =
                    sqlx::query("UPDATE cluster_leader SET beat = $1 WHERE id = 1 AND epoch = $2")
                        .bind(now)
                        .bind(epoch)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected();
                if kept == 1 {
                    Role::Leader { epoch }
                } else {
                    Role::Follower
                }
            }
            _ => {
                let won: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(LOCK_KEY)
                    .fetch_one(&mut *conn)
                    .await?;
                if won {
                    let epoch: i64 = sqlx::query_scalar(
                        "INSERT INTO cluster_leader (id, epoch, node_id, since, beat) VALUES (1, 1, $1, $2, $2) \
                         ON CONFLICT (id) DO UPDATE SET epoch = cluster_leader.epoch + 1, node_id = excluded.node_id, \
                         since = excluded.since, beat = excluded.beat RETURNING epoch",
                    )
                    .bind(&self.node)
                    .bind(now)
                    .fetch_one(&mut *conn)
                    .await?;
                    Role::Leader { epoch }
                } else {
                    Role::Follower
                }
            }
        };
        sqlx::query(
            "INSERT INTO cluster_nodes (node_id, role, started, beat, api, processed_block) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (node_id) DO UPDATE SET role = excluded.role, started = excluded.started, beat = excluded.beat, \
             api = excluded.api, processed_block = excluded.processed_block",
        )
        .bind(&self.node)
        .bind(role.label())
        .bind(self.started)
        .bind(now)
        .bind(&self.api)
        .bind(i64::try_from(self.leadership.processed()).unwrap_or(i64::MAX))
        .execute(&mut *conn)
        .await?;
        Ok(role)
    }
}

impl Task for LeaseTask {
    fn name(&self) -> &'static str {
        "cluster_lease"
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let half = self.interval / 2;
        let mut tick = crate::runtime::ticker(half);
        let mut conn: Option<sqlx::PgConnection> = None;
        let mut last_error: Option<String> = None;
        while cancel.run_until_cancelled(tick.tick()).await.is_some() {
            let attempt = async {
                let c = match conn.take() {
                    Some(c) => c,
                    None => {
                        // Named, so an operator (or a test) can find the lease's session.
                        let opts =
                            <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(
                                &self.url,
                            )?
                            .application_name(&format!("keywarden-lease-{}", self.node));
                        sqlx::PgConnection::connect_with(&opts).await?
                    }
                };
                Ok::<_, sqlx::Error>(c)
            };
            let outcome = tokio::time::timeout(half, async {
                let mut c = attempt.await?;
                let role = self.step(&mut c).await?;
                Ok::<_, sqlx::Error>((c, role))
            })
            .await;
            match outcome {
                Ok(Ok((c, role))) => {
                    conn = Some(c);
                    last_error = None;
                    self.set(role);
                }
                failed => {
                    // The connection (if any) is dropped: the server releases the lock with it.
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {half:?}"),
                    };
                    if last_error.as_ref() != Some(&error) {
                        tracing::warn!(node = %self.node, error = %error, "cluster: the lease step failed; following until the database answers");
                    }
                    last_error = Some(error);
                    self.set(Role::Follower);
                }
            }
        }
        // Shutdown: step down at once, so another replica leads within a heartbeat.
        let leading = self.role.borrow().leads();
        if let Some(mut c) = conn {
            if leading {
                let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(LOCK_KEY)
                    .execute(&mut c)
                    .await;
            }
            let _ = c.close().await;
        }
        self.set(Role::Follower);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_cluster_leader_carries_an_epoch() {
        assert_eq!(Role::Single.epoch(), None);
        assert!(Role::Single.leads());
        assert_eq!(Role::Leader { epoch: 4 }.epoch(), Some(4));
        assert!(!Role::Follower.leads());
        assert_eq!(Role::Follower.label(), "follower");
    }

    #[tokio::test]
    async fn a_single_node_leads_at_once_and_for_good() {
        let cancel = CancellationToken::new();
        let term = Leadership::single().term(&cancel).await.unwrap();
        assert_eq!(term.epoch, None);
        assert!(!term.token.is_cancelled());
        cancel.cancel();
        assert!(term.token.is_cancelled());
    }

    #[tokio::test]
    async fn a_term_ends_when_the_leadership_does() {
        let (tx, rx) = watch::channel(Role::Follower);
        let leadership = Leadership::over(rx, None);
        let cancel = CancellationToken::new();
        let waiting = tokio::spawn({
            let l = leadership.clone();
            let c = cancel.clone();
            async move { l.term(&c).await }
        });
        tx.send_replace(Role::Leader { epoch: 7 });
        let term = waiting.await.unwrap().unwrap();
        assert_eq!(term.epoch, Some(7));
        tx.send_replace(Role::Follower);
        tokio::time::timeout(Duration::from_secs(5), term.token.cancelled())
            .await
            .unwrap();
        // Shutdown while following: no term.
        cancel.cancel();
        assert!(leadership.term(&cancel).await.is_none());
    }
}
