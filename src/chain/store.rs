//! The chain tables of the store: stored events (tagged by projection), recent block hashes, one
//! checkpoint per chain and each projection's configuration identity.
//!
//! Flow: the follower reads the checkpoint, the projections' identities and each projection's
//! events on start-up ([`Store::chain_checkpoint`], [`Store::chain_projections`],
//! [`Store::chain_events`]), then commits each batch with [`Store::chain_commit_batch`] (every
//! projection's events, the batch's block hashes and the checkpoint in one transaction, so an
//! interrupted batch leaves nothing behind; a projection whose identity is new or changed has its
//! rows replaced in that same transaction). A reorg is undone by [`Store::chain_rewind`] (events
//! and hashes above the common ancestor deleted in the same transaction that moves the checkpoint
//! back); a reorg deeper than the retained hashes, or another start block, by
//! [`Store::chain_reset`].

use alloy::primitives::{Address, B256};
use serde::Serialize;
use sqlx::Row;

use crate::store::{Backend, Store, StoreError, on_backend, write_tx};

/// Progress of one chain's sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    /// Chain id.
    pub chain_id: u64,
    /// First block synced.
    pub start_block: u64,
    /// Every block up to and including this one is in the store (`start_block - 1` before the
    /// first batch).
    pub processed_block: u64,
    /// Newest head the follower saw.
    pub head_block: u64,
    /// When the follower last caught up with the head (Unix seconds; 0: never): its freshness.
    pub head_seen_at: i64,
    /// When the checkpoint last changed (Unix seconds).
    pub updated_at: i64,
}

/// One stored log (or synthetic row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Block number.
    pub block_number: u64,
    /// Position in the block (synthetic rows sort after every log).
    pub log_index: u64,
    /// Block hash.
    pub block_hash: B256,
    /// Emitting contract (or the app a synthetic row is about).
    pub address: Address,
    /// [`super::events::Event::kind`].
    pub kind: String,
    /// Raw topics (empty for synthetic rows).
    pub topics: Vec<B256>,
    /// Raw data.
    pub data: Vec<u8>,
}

/// A projection's configuration identity as stored: its name and what its events were gathered
/// for (the KMS mirror: its contract address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionIdentity {
    /// [`super::projection::Projection::name`].
    pub name: String,
    /// [`super::projection::Projection::identity`].
    pub identity: Vec<u8>,
}

/// One projection's rows of a batch.
#[derive(Debug, Clone, Copy)]
pub struct ProjectionRows<'a> {
    /// The projection's name.
    pub projection: &'a str,
    /// Its rows, in chain order.
    pub events: &'a [StoredEvent],
}

/// What one batch commits.
#[derive(Debug, Clone)]
pub struct BatchWrite<'a> {
    /// The new checkpoint.
    pub checkpoint: &'a Checkpoint,
    /// The leadership epoch the write must hold (a cluster leader's); `None` on a single node.
    pub epoch: Option<i64>,
    /// Each projection's rows of the batch.
    pub events: &'a [ProjectionRows<'a>],
    /// Projections whose stored rows this batch replaces (their history was fetched again for a
    /// new identity), with the identity recorded for them.
    pub replace: &'a [(&'a str, &'a [u8])],
    /// Blocks of the batch whose hashes are kept (its last block, plus those within the reorg
    /// window of the head): number, hash, timestamp.
    pub blocks: &'a [(u64, B256, i64)],
    /// Block hashes below this number are pruned (outside the reorg window).
    pub prune_below: u64,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn b256(raw: &[u8]) -> Result<B256, sqlx::Error> {
    B256::try_from(raw).map_err(|_| sqlx::Error::Decode("stored hash is not 32 bytes".into()))
}

fn address(raw: &[u8]) -> Result<Address, sqlx::Error> {
    Address::try_from(raw).map_err(|_| sqlx::Error::Decode("stored address is not 20 bytes".into()))
}

/// Events per multi-row insert (8 parameters each, well under SQLite's and PostgreSQL's limits).
const EVENTS_PER_INSERT: usize = 1000;

const CHECKPOINT_COLUMNS: &str =
    "chain_id, start_block, processed_block, head_block, head_seen_at, updated_at";

/// Reads a [`Checkpoint`] from a row of either backend.
macro_rules! checkpoint_row {
    ($r:expr) => {
        Checkpoint {
            chain_id: to_u64($r.try_get("chain_id")?),
            start_block: to_u64($r.try_get("start_block")?),
            processed_block: to_u64($r.try_get("processed_block")?),
            head_block: to_u64($r.try_get("head_block")?),
            head_seen_at: $r.try_get("head_seen_at")?,
            updated_at: $r.try_get("updated_at")?,
        }
    };
}

/// The PostgreSQL channel a committed chain write is announced on (its payload: the chain id),
/// so followers in a cluster reload at once.
pub const NOTIFY_CHANNEL: &str = "keywarden_chain";

/// Within a chain write's transaction on PostgreSQL: announces the commit of `$chain_id`.
macro_rules! notify {
    ($store:expr, $tx:ident, $chain_id:expr) => {
        if matches!($store.backend, Backend::Postgres(_)) {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(NOTIFY_CHANNEL)
                .bind($chain_id.to_string())
                .execute(&mut *$tx)
                .await?;
        }
    };
}

/// Within a chain write's transaction: refuses it unless `$epoch` (a cluster leader's) still
/// leads, upserts the checkpoint and, on PostgreSQL, announces the commit on [`NOTIFY_CHANNEL`].
macro_rules! upsert_checkpoint {
    ($store:expr, $tx:ident, $c:expr, $epoch:expr) => {
        $crate::store::fence!($tx, $epoch);
        upsert_checkpoint!(@row $tx, $c);
        notify!($store, $tx, $c.chain_id);
    };
    (@row $tx:ident, $c:expr) => {
        sqlx::query(
            "INSERT INTO chain_checkpoints (chain_id, start_block, processed_block, head_block, head_seen_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (chain_id) DO UPDATE SET \
             start_block = excluded.start_block, \
             processed_block = excluded.processed_block, head_block = excluded.head_block, \
             head_seen_at = excluded.head_seen_at, updated_at = excluded.updated_at",
        )
        .bind(to_i64($c.chain_id))
        .bind(to_i64($c.start_block))
        .bind(to_i64($c.processed_block))
        .bind(to_i64($c.head_block))
        .bind($c.head_seen_at)
        .bind($c.updated_at)
        .execute(&mut *$tx)
        .await?
    };
}

impl Store {
    /// Every chain's checkpoint, by chain id.
    pub async fn chain_checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM chain_checkpoints ORDER BY chain_id");
        Ok(on_backend!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| Ok(checkpoint_row!(r)))
                .collect::<Result<Vec<_>, sqlx::Error>>()?
        }))
    }

    /// The checkpoint of `chain_id`, if it was ever synced.
    pub async fn chain_checkpoint(&self, chain_id: u64) -> Result<Option<Checkpoint>, StoreError> {
        let all = self.chain_checkpoints().await?;
        Ok(all.into_iter().find(|c| c.chain_id == chain_id))
    }

    /// The identities of `chain_id`'s projections, by name.
    pub async fn chain_projections(
        &self,
        chain_id: u64,
    ) -> Result<Vec<ProjectionIdentity>, StoreError> {
        Ok(on_backend!(self, pool => {
            sqlx::query(
                "SELECT projection, identity FROM chain_projections WHERE chain_id = $1 ORDER BY projection",
            )
            .bind(to_i64(chain_id))
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| {
                Ok(ProjectionIdentity {
                    name: r.try_get("projection")?,
                    identity: r.try_get("identity")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?
        }))
    }

    /// The stored rows of `projection` on `chain_id`, in chain order.
    pub async fn chain_events(
        &self,
        chain_id: u64,
        projection: &str,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(on_backend!(self, pool => {
            sqlx::query(
                "SELECT block_number, log_index, block_hash, address, kind, topics, data FROM chain_events \
                 WHERE chain_id = $1 AND projection = $2 ORDER BY block_number, log_index",
            )
            .bind(to_i64(chain_id))
            .bind(projection.to_owned())
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| {
                let topics: Vec<u8> = r.try_get("topics")?;
                Ok(StoredEvent {
                    block_number: to_u64(r.try_get("block_number")?),
                    log_index: to_u64(r.try_get("log_index")?),
                    block_hash: b256(&r.try_get::<Vec<u8>, _>("block_hash")?)?,
                    address: address(&r.try_get::<Vec<u8>, _>("address")?)?,
                    kind: r.try_get("kind")?,
                    topics: topics.chunks(32).map(b256).collect::<Result<_, _>>()?,
                    data: r.try_get("data")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?
        }))
    }

    /// Stored block hashes of `chain_id`, newest first: (number, hash, timestamp).
    pub async fn chain_recent_blocks(
        &self,
        chain_id: u64,
    ) -> Result<Vec<(u64, B256, i64)>, StoreError> {
        Ok(on_backend!(self, pool => {
            sqlx::query(
                "SELECT block_number, block_hash, timestamp FROM chain_blocks WHERE chain_id = $1 \
                 ORDER BY block_number DESC",
            )
            .bind(to_i64(chain_id))
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| {
                Ok((
                    to_u64(r.try_get("block_number")?),
                    b256(&r.try_get::<Vec<u8>, _>("block_hash")?)?,
                    r.try_get("timestamp")?,
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?
        }))
    }

    /// Commits one batch: its projections' rows (replacing those of projections with a new
    /// identity), its block hashes and the checkpoint, atomically.
    pub async fn chain_commit_batch(&self, b: &BatchWrite<'_>) -> Result<(), StoreError> {
        let chain_id = to_i64(b.checkpoint.chain_id);
        write_tx!(self, tx => {
            for &(name, identity) in b.replace {
                sqlx::query("DELETE FROM chain_events WHERE chain_id = $1 AND projection = $2")
                    .bind(chain_id)
                    .bind(name.to_owned())
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO chain_projections (chain_id, projection, identity) VALUES ($1, $2, $3) \
                     ON CONFLICT (chain_id, projection) DO UPDATE SET identity = excluded.identity",
                )
                .bind(chain_id)
                .bind(name.to_owned())
                .bind(identity.to_vec())
                .execute(&mut *tx)
                .await?;
            }
            // Multi-row inserts: one statement per chunk instead of one per event.
            for (projection, chunk) in b
                .events
                .iter()
                .flat_map(|p| std::iter::repeat(p.projection).zip(p.events.chunks(EVENTS_PER_INSERT)))
            {
                let mut q = sqlx::QueryBuilder::new(
                    "INSERT INTO chain_events (chain_id, projection, block_number, log_index, block_hash, address, kind, topics, data) ",
                );
                q.push_values(chunk, |mut row, e| {
                    let topics: Vec<u8> = e.topics.iter().flat_map(|t| t.0).collect();
                    row.push_bind(chain_id)
                        .push_bind(projection.to_owned())
                        .push_bind(to_i64(e.block_number))
                        .push_bind(to_i64(e.log_index))
                        .push_bind(e.block_hash.as_slice().to_vec())
                        .push_bind(e.address.as_slice().to_vec())
                        .push_bind(e.kind.clone())
                        .push_bind(topics)
                        .push_bind(e.data.clone());
                });
                q.build().execute(&mut *tx).await?;
            }
            for &(number, hash, timestamp) in b.blocks {
                sqlx::query(
                    "INSERT INTO chain_blocks (chain_id, block_number, block_hash, timestamp) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (chain_id, block_number) DO UPDATE SET block_hash = excluded.block_hash, timestamp = excluded.timestamp",
                )
                .bind(chain_id)
                .bind(to_i64(number))
                .bind(hash.as_slice().to_vec())
                .bind(timestamp)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query("DELETE FROM chain_blocks WHERE chain_id = $1 AND block_number < $2")
                .bind(chain_id)
                .bind(to_i64(b.prune_below))
                .execute(&mut *tx)
                .await?;
            upsert_checkpoint!(self, tx, b.checkpoint, b.epoch);
        });
        Ok(())
    }

    /// Undoes everything above `checkpoint.processed_block` (the common ancestor) and moves the
    /// checkpoint there, atomically.
    pub async fn chain_rewind(
        &self,
        checkpoint: &Checkpoint,
        epoch: Option<i64>,
    ) -> Result<(), StoreError> {
        let chain_id = to_i64(checkpoint.chain_id);
        let above = to_i64(checkpoint.processed_block);
        write_tx!(self, tx => {
            for table in ["chain_events", "chain_blocks"] {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM {table} WHERE chain_id = $1 AND block_number > $2"
                )))
                .bind(chain_id)
                .bind(above)
                .execute(&mut *tx)
                .await?;
            }
            upsert_checkpoint!(self, tx, checkpoint, epoch);
        });
        Ok(())
    }

    /// Forgets everything synced for `checkpoint.chain_id` (every projection's rows and
    /// identity) and starts over at `checkpoint`.
    pub async fn chain_reset(
        &self,
        checkpoint: &Checkpoint,
        epoch: Option<i64>,
    ) -> Result<(), StoreError> {
        let chain_id = to_i64(checkpoint.chain_id);
        write_tx!(self, tx => {
            for table in ["chain_events", "chain_blocks", "chain_projections"] {
                sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE chain_id = $1")))
                    .bind(chain_id)
                    .execute(&mut *tx)
                    .await?;
            }
            upsert_checkpoint!(self, tx, checkpoint, epoch);
        });
        Ok(())
    }

    /// Records the newest head seen, when the follower last caught up with it: `chain status`
    /// while nothing new is committed, and a cluster follower's freshness.
    pub async fn chain_record_head(
        &self,
        chain_id: u64,
        head_block: u64,
        seen_at: i64,
        epoch: Option<i64>,
    ) -> Result<(), StoreError> {
        write_tx!(self, tx => {
            crate::store::fence!(tx, epoch);
            sqlx::query("UPDATE chain_checkpoints SET head_block = $1, head_seen_at = $2 WHERE chain_id = $3")
                .bind(to_i64(head_block))
                .bind(seen_at)
                .bind(to_i64(chain_id))
                .execute(&mut *tx)
                .await?;
            notify!(self, tx, chain_id);
        });
        Ok(())
    }

    /// Listens for committed chain writes ([`NOTIFY_CHANNEL`]); `None` on SQLite.
    pub async fn chain_listen(&self) -> Result<Option<sqlx::postgres::PgListener>, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                let mut l = sqlx::postgres::PgListener::connect_with(pool).await?;
                l.listen(NOTIFY_CHANNEL).await?;
                Ok(Some(l))
            }
            Backend::Sqlite { .. } => Ok(None),
        }
    }
}
