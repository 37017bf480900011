//! The follower of one chain: it owns the chain side of every projection (finality, reorgs, the
//! RPC pool, `eth_getLogs` ranges, the checkpoint, the sync metrics and readiness) and feeds the
//! projections ([`super::projection`]) their rows.
//!
//! Flow, per poll: read the head (and the `safe`/`finalized` block, or subtract the confirmations)
//! → compare the newest stored block hash with the chain; on a mismatch walk the stored hashes back
//! to the common ancestor, delete everything above it in the transaction that rewinds the
//! checkpoint and rebuild every projection from its remaining rows (no ancestor within the
//! retained window → full resync from `start_block`, logged at WARN) → fetch `eth_getLogs` for
//! the union of the projections' addresses in bounded ranges, one round per range whatever the
//! number of projections (halved on "too many results", doubled back after each success; the next
//! range is fetched while the current one is committed) → each projection keeps its rows, and the
//! addresses they bring in get their logs for the range (and, when the projection asks, their
//! history from `start_block`) → each projection reads what events cannot tell → commit every
//! projection's rows, the block hashes within the reorg window and the checkpoint in one
//! transaction → apply and publish → one `on-chain sync completed` log line per batch. A restart
//! resumes at the checkpoint, so an interrupted batch is fetched again and never half-applied.
//!
//! The checkpoint is per chain. A projection whose identity is new to the store (added later, or
//! configured for another contract) gets its addresses' history fetched up to the checkpoint at
//! start-up, committed with its identity in one transaction, without rewinding the others.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use alloy::eips::BlockNumberOrTag;
use alloy::primitives::{Address, B256};
use alloy::providers::Provider;
use alloy::rpc::types::{Filter, Log};
use tokio_util::sync::CancellationToken;

use super::ChainError;
use super::config::{Finality, ResolvedChain};
use super::metrics::{ChainMetrics, Method};
use super::projection::{At, ChainReads, Processed, Projection};
use super::rpc::RpcPool;
use super::status::{SyncProgress, SyncStatus};
use super::store::{BatchWrite, Checkpoint, ProjectionRows, StoredEvent};
use crate::cluster::Leadership;
use crate::runtime::{ComponentState, Readiness, Task};
use crate::store::Store;

/// The message of the info line logged for every committed batch.
pub const BATCH_LOG_MESSAGE: &str = "on-chain sync completed";

/// Readiness component name.
pub const READINESS_COMPONENT: &str = "chain";

/// Readiness component of the RPC endpoints (degraded while one serves another chain).
pub const ENDPOINTS_READINESS_COMPONENT: &str = "chain_endpoints";

/// Addresses per `eth_getLogs` request (providers limit the filter's address list).
const ADDRESSES_PER_REQUEST: usize = 500;

/// A log's size as a JSON-RPC answer carries it: hex doubles the data and topics, and the
/// fixed fields (address, hashes, numbers, keys) take about 450 bytes.
fn json_size(log: &Log) -> usize {
    450 + 2 * log.data().data.len() + 68 * log.topics().len()
}

/// How often readiness and the staleness gauge are refreshed while a step runs.
const READINESS_REFRESH: std::time::Duration = std::time::Duration::from_millis(250);

/// A block as the follower needs it.
#[derive(Debug, Clone, Copy)]
struct BlockRef {
    number: u64,
    hash: B256,
    parent_hash: B256,
    timestamp: u64,
}

impl BlockRef {
    fn at(&self) -> At {
        At {
            number: self.number,
            hash: self.hash,
        }
    }
}

/// The processed block `number` of `chain_id`, with the timestamp of `at` (the stored processed
/// block) when known.
fn processed_at(chain_id: u64, number: u64, at: Option<BlockRef>) -> Processed {
    Processed {
        chain_id,
        number,
        timestamp: at.map_or(0, |b| b.timestamp),
    }
}

/// The projections a follower feeds.
pub type Projections = Vec<Box<dyn Projection>>;

/// The follower of one chain.
pub struct Follower {
    chain: ResolvedChain,
    store: Store,
    rpc: Arc<RpcPool>,
    reads: ChainReads,
    projections: Projections,
    status: Arc<SyncStatus>,
    readiness: Readiness,
    metrics: ChainMetrics,
    /// Whether this replica syncs from the chain (it leads) or follows the shared tables.
    leadership: Leadership,
    /// How often a cluster follower reloads the shared tables without a notification.
    catch_up: std::time::Duration,
    /// The epoch of the current leadership term, which every write carries.
    epoch: Option<i64>,
}

/// A range's logs as fetched, before they are completed and committed.
struct Fetched {
    from: u64,
    to: u64,
    last: BlockRef,
    logs: Vec<Log>,
    /// The addresses the logs were asked for.
    covered: BTreeSet<Address>,
}

/// Mutable state of a running follower.
struct Cursor {
    chain_id: u64,
    checkpoint: Checkpoint,
    batch_blocks: u64,
    /// Timestamp of the processed block (for lag in seconds).
    processed_timestamp: u64,
    /// Projections (by position) whose identity is new to the store: their history up to the
    /// checkpoint is still to be fetched.
    pending: Vec<usize>,
}

/// Every address the projections watch.
fn watched(ps: &[Box<dyn Projection>]) -> BTreeSet<Address> {
    ps.iter().flat_map(|p| p.addresses()).collect()
}

impl Follower {
    /// A follower of `chain` reading through `rpc`, feeding `projections`, reporting into
    /// `status`.
    pub fn new(
        chain: ResolvedChain,
        store: Store,
        rpc: Arc<RpcPool>,
        projections: Projections,
        status: Arc<SyncStatus>,
        readiness: Readiness,
        metrics: ChainMetrics,
    ) -> Self {
        readiness.register(READINESS_COMPONENT);
        Self {
            reads: ChainReads::new(rpc.clone()),
            chain,
            store,
            rpc,
            projections,
            status,
            readiness,
            metrics,
            leadership: Leadership::single(),
            catch_up: std::time::Duration::from_secs(5),
            epoch: None,
        }
    }

    /// The same follower in a cluster: it syncs from the chain only while `leadership` leads,
    /// and otherwise reloads the shared tables when notified, and every `catch_up`.
    pub fn with_leadership(
        mut self,
        leadership: Leadership,
        catch_up: std::time::Duration,
    ) -> Self {
        self.leadership = leadership;
        self.catch_up = catch_up;
        self
    }

    async fn block(&self, tag: BlockNumberOrTag) -> Result<Option<BlockRef>, ChainError> {
        let block = self
            .rpc
            .call(Method::EthGetBlockByNumber, |p| async move {
                p.get_block_by_number(tag).await
            })
            .await?;
        Ok(block.map(|b| BlockRef {
            number: b.header.number,
            hash: b.header.hash,
            parent_hash: b.header.parent_hash,
            timestamp: b.header.timestamp,
        }))
    }

    async fn required_block(&self, tag: BlockNumberOrTag) -> Result<BlockRef, ChainError> {
        self.block(tag)
            .await?
            .ok_or_else(|| ChainError::MissingBlock(tag.to_string()))
    }

    /// Opens the cursor: chain id, checkpoint (reset if new or for another start block), every
    /// projection rebuilt from its rows (and reconciled), or given its history up to the
    /// checkpoint when its identity is new to the store.
    async fn open(&self, ps: &mut Projections) -> Result<Cursor, ChainError> {
        let answer = self
            .rpc
            .call(
                Method::EthChainId,
                |p| async move { p.get_chain_id().await },
            )
            .await;
        // Every endpoint on another chain than configured: a configuration error, not an outage.
        let wrong = self.rpc.wrong_chain();
        if let (Err(_), Some(expected), Some((.., actual))) =
            (&answer, self.chain.cfg.chain_id, wrong.first())
            && wrong.len() == self.rpc.len()
        {
            return Err(ChainError::ChainIdMismatch {
                expected,
                actual: *actual,
            });
        }
        let chain_id = answer?;
        let start = self.chain.cfg.start_block;
        let fresh = Checkpoint {
            chain_id,
            start_block: start,
            processed_block: start.saturating_sub(1),
            head_block: 0,
            head_seen_at: 0,
            updated_at: crate::clock::unix_secs_i64(),
        };
        let checkpoint = match self.store.chain_checkpoint(chain_id).await? {
            Some(c) if c.start_block == start => c,
            other => {
                if other.is_some() {
                    tracing::warn!(
                        chain_id,
                        "chain.start_block changed: resyncing from start_block"
                    );
                    self.metrics.resync();
                }
                self.store.chain_reset(&fresh, self.epoch).await?;
                fresh
            }
        };
        let processed = checkpoint.processed_block;
        let at = self.processed_ref(&checkpoint).await?;
        let identities = self.store.chain_projections(chain_id).await?;
        let mut pending = Vec::new();
        for (i, p) in ps.iter_mut().enumerate() {
            let identity = p.identity();
            let known = identities.iter().find(|i| i.name == p.name());
            if known.is_some_and(|i| i.identity == identity) {
                let stored = self.store.chain_events(chain_id, p.name()).await?;
                self.restore_at(&checkpoint, &mut **p, &stored, at).await?;
                tracing::info!(
                    chain_id,
                    projection = p.name(),
                    processed_block = processed,
                    events = stored.len(),
                    "chain projection rebuilt from the store"
                );
            } else {
                if known.is_some() {
                    tracing::warn!(
                        chain_id,
                        projection = p.name(),
                        "the projection's configuration changed (for the KMS mirror: chain.kms_contract): fetching its history again up to the checkpoint; the other projections keep theirs"
                    );
                }
                // Its history is fetched by the first poll, after the reorg check, so that it is
                // read against the canonical chain.
                p.rebuild(&[], processed_at(chain_id, processed, at));
                pending.push(i);
            }
            p.publish();
        }
        Ok(Cursor {
            chain_id,
            checkpoint,
            batch_blocks: self.chain.cfg.max_batch_blocks,
            processed_timestamp: at.map_or(0, |b| b.timestamp),
            pending,
        })
    }

    /// The processed block as stored (the newest kept hash), once anything was processed: where
    /// reads on behalf of the stored state are made.
    async fn processed_ref(&self, c: &Checkpoint) -> Result<Option<BlockRef>, ChainError> {
        let recent = self.store.chain_recent_blocks(c.chain_id).await?;
        Ok(recent
            .first()
            .filter(|_| c.processed_block >= c.start_block)
            .map(|&(number, hash, timestamp)| BlockRef {
                number,
                hash,
                parent_hash: B256::ZERO,
                timestamp: u64::try_from(timestamp).unwrap_or(0),
            }))
    }

    /// Gives each projection whose identity is new to the store its addresses' history up to the
    /// checkpoint, committed with its identity in one transaction (the checkpoint unchanged).
    async fn catch_up_pending(
        &self,
        c: &mut Cursor,
        ps: &mut Projections,
    ) -> Result<(), ChainError> {
        if c.pending.is_empty() {
            return Ok(());
        }
        let start = c.checkpoint.start_block;
        let processed = c.checkpoint.processed_block;
        let at = self.processed_ref(&c.checkpoint).await?;
        while let Some(&i) = c.pending.first() {
            let p = &mut ps[i];
            let rows = match &at {
                Some(at) => {
                    let mut fetched = p.addresses();
                    let list: Vec<Address> = fetched.iter().copied().collect();
                    let mut logs = self.history(&list, start, at.number + 1).await?;
                    self.gather(&**p, &mut logs, &mut fetched, start, at)
                        .await?
                }
                None => Vec::new(),
            };
            self.write_at_checkpoint(&c.checkpoint, &**p, &rows, Some(&p.identity()))
                .await?;
            p.apply(&rows, processed_at(c.chain_id, processed, at));
            p.publish();
            c.pending.remove(0);
            tracing::info!(
                chain_id = c.chain_id,
                projection = p.name(),
                processed_block = processed,
                events = rows.len(),
                "chain projection's history fetched up to the checkpoint"
            );
        }
        Ok(())
    }

    /// Rebuilds `p` from its stored rows and reconciles it with the chain at the processed block
    /// (start-up and rewinds), committing what the reconciliation adds.
    async fn restore_at(
        &self,
        checkpoint: &Checkpoint,
        p: &mut dyn Projection,
        stored: &[StoredEvent],
        at: Option<BlockRef>,
    ) -> Result<(), ChainError> {
        let processed = processed_at(checkpoint.chain_id, checkpoint.processed_block, at);
        p.rebuild(stored, processed);
        if let Some(at) = at {
            let rows = p.reconcile(&self.reads, stored, at.at()).await?;
            if !rows.is_empty() {
                self.write_at_checkpoint(checkpoint, p, &rows, None).await?;
                p.apply(&rows, processed);
            }
        }
        Ok(())
    }

    /// Commits one projection's rows with the checkpoint unchanged; with `identity`, they replace
    /// whatever the projection had stored and the identity is recorded.
    async fn write_at_checkpoint(
        &self,
        checkpoint: &Checkpoint,
        p: &dyn Projection,
        rows: &[StoredEvent],
        identity: Option<&[u8]>,
    ) -> Result<(), ChainError> {
        let replace: Vec<(&str, &[u8])> = identity.map(|i| (p.name(), i)).into_iter().collect();
        self.store
            .chain_commit_batch(&BatchWrite {
                checkpoint,
                epoch: self.epoch,
                events: &[ProjectionRows {
                    projection: p.name(),
                    events: rows,
                }],
                blocks: &[],
                prune_below: 0,
                replace: &replace,
            })
            .await?;
        Ok(())
    }

    /// The newest block the follower may apply, given the head.
    async fn target(&self, head: &BlockRef) -> Result<u64, ChainError> {
        let tag = match self.chain.cfg.finality {
            Finality::Latest => {
                return Ok(head.number.saturating_sub(self.chain.cfg.confirmations));
            }
            Finality::Safe => BlockNumberOrTag::Safe,
            Finality::Finalized => BlockNumberOrTag::Finalized,
        };
        Ok(self.block(tag).await?.map_or(0, |b| b.number))
    }

    /// Detects a reorg below the checkpoint and undoes it. Returns whether anything was undone.
    async fn check_reorg(&self, c: &mut Cursor, ps: &mut Projections) -> Result<bool, ChainError> {
        let recent = self.store.chain_recent_blocks(c.chain_id).await?;
        let Some(&(newest, newest_hash, _)) = recent.first() else {
            return Ok(false);
        };
        let canonical = self.block(BlockNumberOrTag::Number(newest)).await?;
        if canonical.is_some_and(|b| b.hash == newest_hash) {
            return Ok(false);
        }
        let mut ancestor = None;
        for &(number, hash, timestamp) in recent.iter().skip(1) {
            let b = self.block(BlockNumberOrTag::Number(number)).await?;
            if b.is_some_and(|b| b.hash == hash) {
                ancestor = Some((number, timestamp));
                break;
            }
        }
        let processed = c.checkpoint.processed_block;
        match ancestor {
            Some((number, timestamp)) => {
                let depth = processed - number;
                tracing::warn!(
                    chain_id = c.chain_id,
                    depth,
                    common_ancestor = number,
                    "chain reorg detected: rewinding to the common ancestor"
                );
                self.metrics.reorg(depth);
                c.checkpoint.processed_block = number;
                c.checkpoint.updated_at = crate::clock::unix_secs_i64();
                self.store.chain_rewind(&c.checkpoint, self.epoch).await?;
                c.processed_timestamp = u64::try_from(timestamp).unwrap_or(0);
            }
            None => {
                self.confirm_deep_reorg(newest, newest_hash).await?;
                tracing::warn!(
                    chain_id = c.chain_id,
                    processed_block = processed,
                    window = self.chain.cfg.reorg_window,
                    "chain reorg deeper than the retained block hashes: resyncing from start_block"
                );
                self.metrics
                    .reorg(processed.saturating_sub(c.checkpoint.start_block));
                self.metrics.resync();
                c.checkpoint.processed_block = c.checkpoint.start_block.saturating_sub(1);
                c.checkpoint.updated_at = crate::clock::unix_secs_i64();
                self.store.chain_reset(&c.checkpoint, self.epoch).await?;
                c.processed_timestamp = 0;
            }
        }
        let at = self.processed_ref(&c.checkpoint).await?;
        for (i, p) in ps.iter_mut().enumerate() {
            // A pending projection's stored rows are another identity's: it is caught up next.
            if c.pending.contains(&i) {
                continue;
            }
            let stored = self.store.chain_events(c.chain_id, p.name()).await?;
            self.restore_at(&c.checkpoint, &mut **p, &stored, at)
                .await?;
            p.publish();
        }
        Ok(true)
    }

    /// A reorg deeper than the retained hashes is implausible on a healthy chain, and a full
    /// resync is costly: it is believed only when every endpoint serving the chain answers and
    /// none still has the newest stored block. An endpoint contradicted by another is faulted;
    /// while one does not answer, nothing is undone (the mirror goes stale and fails closed).
    async fn confirm_deep_reorg(&self, newest: u64, newest_hash: B256) -> Result<(), ChainError> {
        let answers = self
            .rpc
            .each(Method::EthGetBlockByNumber, |p| async move {
                let block = p
                    .get_block_by_number(BlockNumberOrTag::Number(newest))
                    .await?;
                Ok(block.map(|b| b.header.hash))
            })
            .await;
        let keeps =
            |r: &Result<Option<B256>, String>| matches!(r, Ok(Some(h)) if *h == newest_hash);
        let confirmed = !answers.is_empty() && answers.iter().all(|(_, r)| r.is_ok() && !keeps(r));
        if confirmed {
            return Ok(());
        }
        for (i, r) in &answers {
            if r.is_ok() && !keeps(r) {
                self.rpc.fault(
                    *i,
                    "its history has no block in common with the stored chain, which another endpoint still serves or which no other endpoint could confirm",
                );
            }
        }
        Err(ChainError::UnconfirmedReorg(newest))
    }

    /// `eth_getLogs` for `addresses` over `from..=to`, in address chunks. The logs held stay
    /// within `chain.max_response_bytes` (by their JSON size): a range holding more is refused
    /// as too many results, so that it shrinks, however many chunks it took.
    async fn logs(
        &self,
        addresses: &[Address],
        from: u64,
        to: u64,
    ) -> Result<Vec<Log>, ChainError> {
        let budget = self.chain.cfg.max_response_bytes;
        let (mut out, mut held) = (Vec::new(), 0usize);
        for chunk in addresses.chunks(ADDRESSES_PER_REQUEST) {
            let filter = Filter::new()
                .address(chunk.to_vec())
                .from_block(from)
                .to_block(to);
            let filter = &filter;
            let logs = self
                .rpc
                .call(
                    Method::EthGetLogs,
                    |p| async move { p.get_logs(filter).await },
                )
                .await?;
            held += logs.iter().map(json_size).sum::<usize>();
            if held > budget {
                return Err(ChainError::TooManyResults(format!(
                    "the logs of blocks {from}..={to} exceed {budget} bytes (chain.max_response_bytes)"
                )));
            }
            out.extend(logs);
        }
        Ok(out)
    }

    /// Logs of `addresses` in `start..end`, in ranges that shrink on "too many results".
    async fn history(
        &self,
        addresses: &[Address],
        start: u64,
        end: u64,
    ) -> Result<Vec<Log>, ChainError> {
        let mut out = Vec::new();
        let mut size = self.chain.cfg.max_batch_blocks;
        let mut lo = start;
        while lo < end {
            let hi = (end - 1).min(lo + size - 1);
            match self.logs(addresses, lo, hi).await {
                Ok(logs) => {
                    out.extend(logs);
                    lo = hi + 1;
                }
                Err(ChainError::TooManyResults(_)) if size > 1 => size /= 2,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// A projection's rows over `from..=last`: those it uses among `logs` (which hold the logs of
    /// `fetched` over the range) from the addresses it watches; then, round by round, those of
    /// the addresses its rows bring in (their logs in the range fetched unless `fetched` has
    /// them, and their earlier history from `start_block` when the projection asks and they hold
    /// code); then what it reads for them. In chain order.
    async fn gather(
        &self,
        p: &dyn Projection,
        logs: &mut Vec<Log>,
        fetched: &mut BTreeSet<Address>,
        from: u64,
        last: &BlockRef,
    ) -> Result<Vec<StoredEvent>, ChainError> {
        let to = last.number;
        let mut watched = p.addresses();
        let mut rows = rows_of(p, logs, &watched, last)?;
        loop {
            let found: Vec<_> = p
                .discover(&rows)
                .into_iter()
                .filter(|d| !watched.contains(&d.address))
                .collect();
            if found.is_empty() {
                break;
            }
            let new: BTreeSet<Address> = found.iter().map(|d| d.address).collect();
            watched.extend(&new);
            let unfetched: Vec<Address> = new.difference(fetched).copied().collect();
            if !unfetched.is_empty() {
                logs.extend(self.history(&unfetched, from, to + 1).await?);
                fetched.extend(unfetched);
            }
            rows.extend(rows_of(p, logs, &new, last)?);
            // One registered without code has no history (and is refused as such).
            for d in found.iter().filter(|d| d.history) {
                if self.reads.code(d.address, to).await?.is_empty() {
                    continue;
                }
                let history = self
                    .history(&[d.address], self.chain.cfg.start_block, from)
                    .await?;
                rows.extend(rows_of(p, &history, &new, last)?);
            }
            rows.sort_by_key(|s| (s.block_number, s.log_index));
            rows.dedup_by_key(|s| (s.block_number, s.log_index));
        }
        let synthetic = p.complete(&self.reads, &rows, last.at()).await?;
        rows.extend(synthetic);
        rows.sort_by_key(|s| (s.block_number, s.log_index));
        Ok(rows)
    }

    /// Hashes kept for the range ending at `last`: every block within the reorg window of the
    /// head (only `last` further back), walked down from `last` by parent hash so they form one
    /// chain; a mismatch means a reorg raced the reads and the range is retried.
    async fn window_hashes(
        &self,
        head: &BlockRef,
        from: u64,
        last: BlockRef,
    ) -> Result<Vec<(u64, B256, i64)>, ChainError> {
        let keep_from = from.max(head.number.saturating_sub(self.chain.cfg.reorg_window) + 1);
        let mut refs = vec![last];
        for n in (keep_from..last.number).rev() {
            let b = self.required_block(BlockNumberOrTag::Number(n)).await?;
            if refs.last().is_some_and(|child| child.parent_hash != b.hash) {
                return Err(ChainError::InconsistentRange(format!(
                    "block {n} changed while the range was read"
                )));
            }
            refs.push(b);
        }
        Ok(refs
            .iter()
            .rev()
            .map(|b| {
                (
                    b.number,
                    b.hash,
                    i64::try_from(b.timestamp).unwrap_or(i64::MAX),
                )
            })
            .collect())
    }

    /// Reads a range's last block and the logs of `addresses` in it.
    async fn fetch(
        &self,
        addresses: BTreeSet<Address>,
        from: u64,
        to: u64,
    ) -> Result<Fetched, ChainError> {
        // The range's last block is read before its logs: a log of another fork at that height
        // is caught when the range is processed, a reorg afterwards by the next poll.
        let last = self.required_block(BlockNumberOrTag::Number(to)).await?;
        let list: Vec<Address> = addresses.iter().copied().collect();
        let logs = self.logs(&list, from, to).await?;
        Ok(Fetched {
            from,
            to,
            last,
            logs,
            covered: addresses,
        })
    }

    /// Completes, commits, applies and publishes a fetched range for every projection. Returns
    /// the number of rows.
    async fn batch(
        &self,
        c: &mut Cursor,
        ps: &mut Projections,
        head: &BlockRef,
        fetched: Fetched,
    ) -> Result<usize, ChainError> {
        let Fetched {
            from,
            to,
            last,
            mut logs,
            mut covered,
        } = fetched;
        // Addresses a previous batch brought in after this range was prefetched: their logs in
        // the range were not asked for yet.
        let missing: Vec<Address> = watched(ps).difference(&covered).copied().collect();
        if !missing.is_empty() {
            logs.extend(self.logs(&missing, from, to).await?);
            covered.extend(missing);
        }
        let mut rows = Vec::with_capacity(ps.len());
        for p in ps.iter() {
            rows.push(
                self.gather(&**p, &mut logs, &mut covered, from, &last)
                    .await?,
            );
        }
        let blocks = self.window_hashes(head, from, last).await?;
        let mut checkpoint = c.checkpoint.clone();
        checkpoint.processed_block = to;
        checkpoint.head_block = head.number;
        // `head_seen_at` moves only when the follower has caught up (`chain_record_head`): it is
        // what cluster followers take for the leader's freshness.
        checkpoint.updated_at = crate::clock::unix_secs_i64();
        let events: Vec<ProjectionRows<'_>> = ps
            .iter()
            .zip(&rows)
            .map(|(p, r)| ProjectionRows {
                projection: p.name(),
                events: r,
            })
            .collect();
        self.store
            .chain_commit_batch(&BatchWrite {
                checkpoint: &checkpoint,
                epoch: self.epoch,
                events: &events,
                blocks: &blocks,
                prune_below: to.saturating_sub(self.chain.cfg.reorg_window),
                replace: &[],
            })
            .await?;
        c.checkpoint = checkpoint;
        c.processed_timestamp = last.timestamp;
        for (p, r) in ps.iter_mut().zip(&rows) {
            p.apply(
                r,
                Processed {
                    chain_id: c.chain_id,
                    number: to,
                    timestamp: last.timestamp,
                },
            );
            p.publish();
        }
        Ok(rows.iter().map(Vec::len).sum())
    }

    /// Publishes progress to metrics, the admin view and the store.
    fn report(&self, c: &Cursor, head: &BlockRef, target: u64) {
        let span = target.saturating_sub(c.checkpoint.start_block).max(1) as f64;
        let done = c
            .checkpoint
            .processed_block
            .saturating_sub(c.checkpoint.start_block.saturating_sub(1));
        let backfill = if c.checkpoint.processed_block >= target {
            1.0
        } else {
            (done as f64 / span).min(1.0)
        };
        let lag_seconds = head.timestamp.saturating_sub(c.processed_timestamp) as f64;
        self.metrics.progress(
            head.number,
            c.checkpoint.processed_block,
            lag_seconds,
            backfill,
        );
        self.status.set_progress(SyncProgress {
            chain_id: c.chain_id,
            head_block: head.number,
            target_block: target,
            processed_block: c.checkpoint.processed_block,
            endpoints: self.rpc.status(),
        });
    }

    /// One poll: head, reorg check, batches up to the target. Returns once caught up.
    async fn poll(&self, c: &mut Cursor, ps: &mut Projections) -> Result<(), ChainError> {
        self.rpc.check_chains().await;
        let head = self.required_block(BlockNumberOrTag::Latest).await?;
        let target = self.target(&head).await?;
        self.check_reorg(c, ps).await?;
        self.catch_up_pending(c, ps).await?;
        self.report(c, &head, target);
        let max = self.chain.cfg.max_batch_blocks;
        // The next range is fetched while the current one is stored and applied.
        let mut prefetched: Option<Fetched> = None;
        while c.checkpoint.processed_block < target {
            let from = c.checkpoint.processed_block + 1;
            let fetched = match prefetched.take() {
                Some(f) if f.from == from => Ok(f),
                _ => {
                    let to = target.min(from + c.batch_blocks - 1);
                    self.fetch(watched(ps), from, to).await
                }
            };
            let fetched = match fetched {
                Ok(f) => f,
                Err(ChainError::TooManyResults(detail)) if c.batch_blocks > 1 => {
                    c.batch_blocks = (c.batch_blocks / 2).max(1);
                    tracing::debug!(%detail, batch_blocks = c.batch_blocks, "eth_getLogs range refused: shrinking");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let to = fetched.to;
            let grown = (c.batch_blocks * 2).min(max);
            let next_to = target.min(to + grown);
            let addresses = watched(ps);
            let next = async {
                if to < target {
                    Some(self.fetch(addresses, to + 1, next_to).await)
                } else {
                    None
                }
            };
            let (result, next) = tokio::join!(self.batch(c, ps, &head, fetched), next);
            let events = match result {
                Ok(events) => events,
                // A new app's range or history was refused: retry the range smaller.
                Err(ChainError::TooManyResults(_)) if c.batch_blocks > 1 => {
                    c.batch_blocks = (c.batch_blocks / 2).max(1);
                    prefetched = None;
                    continue;
                }
                Err(e) => return Err(e),
            };
            c.batch_blocks = grown;
            prefetched = match next {
                Some(Ok(f)) => Some(f),
                Some(Err(ChainError::TooManyResults(_))) => {
                    c.batch_blocks = (c.batch_blocks / 2).max(1);
                    None
                }
                // Fetched again (and its error handled) on the next iteration.
                Some(Err(_)) | None => None,
            };
            self.metrics.batch(events as u64);
            self.report(c, &head, target);
            tracing::info!(
                chain_id = c.chain_id,
                from_block = from,
                to_block = to,
                events,
                lag_blocks = head.number.saturating_sub(to),
                lag_seconds = head.timestamp.saturating_sub(c.processed_timestamp),
                "{}",
                BATCH_LOG_MESSAGE
            );
        }
        self.store
            .chain_record_head(
                c.chain_id,
                head.number,
                crate::clock::unix_secs_i64(),
                self.epoch,
            )
            .await?;
        self.status.mark_fresh(Instant::now());
        Ok(())
    }

    /// Readiness and the staleness gauge, from the published mirror (callable while a step runs).
    fn update_readiness(&self) {
        let staleness = self.status.staleness();
        let state = match staleness {
            _ if self.status.is_fresh() => ComponentState::Ready,
            Some(s) => ComponentState::NotReady(format!(
                "chain_state_stale: last caught up with the chain {}s ago",
                s.as_secs()
            )),
            None => ComponentState::NotReady(format!(
                "backfilling: processed block {} of {}",
                self.status.progress().processed_block,
                self.status.progress().target_block
            )),
        };
        self.metrics
            .staleness(staleness.map_or(f64::INFINITY, |s| s.as_secs_f64()));
        self.readiness.set(READINESS_COMPONENT, state);
        let wrong: Vec<String> = self
            .rpc
            .wrong_chain()
            .into_iter()
            .map(|(i, host, id)| format!("endpoint {i} ({host}) serves chain {id}"))
            .collect();
        self.readiness.set(
            ENDPOINTS_READINESS_COMPONENT,
            if wrong.is_empty() {
                ComponentState::Ready
            } else {
                ComponentState::Degraded(format!(
                    "{}, not the mirror's: not used (fix chain.rpc_urls)",
                    wrong.join("; ")
                ))
            },
        );
    }
}

/// The rows `p` keeps of the logs emitted by `addresses`. A removed log, or one at `last`'s
/// height from another block, means the chain moved while the range was read.
fn rows_of(
    p: &dyn Projection,
    logs: &[Log],
    addresses: &BTreeSet<Address>,
    last: &BlockRef,
) -> Result<Vec<StoredEvent>, ChainError> {
    let mut rows = Vec::new();
    for l in logs.iter().filter(|l| addresses.contains(&l.inner.address)) {
        let (Some(number), Some(hash), Some(index)) = (l.block_number, l.block_hash, l.log_index)
        else {
            return Err(ChainError::InconsistentRange(
                "a log without block number, hash or index".into(),
            ));
        };
        if l.removed || (number == last.number && hash != last.hash) {
            return Err(ChainError::InconsistentRange(format!(
                "block {number} changed while its logs were read"
            )));
        }
        let topics = l.inner.data.topics();
        let Some(kind) = p.decode(l.inner.address, topics, &l.inner.data.data) else {
            continue;
        };
        rows.push(StoredEvent {
            block_number: number,
            log_index: index,
            block_hash: hash,
            address: l.inner.address,
            kind: kind.to_owned(),
            topics: topics.to_vec(),
            data: l.inner.data.data.to_vec(),
        });
    }
    Ok(rows)
}

impl Follower {
    /// Syncs from the chain until `term` ends (leadership lost, or shutdown): the cursor is
    /// opened afresh from the store, since another leader may have moved it.
    async fn lead(&mut self, ps: &mut Projections, term: &CancellationToken) -> anyhow::Result<()> {
        let interval = self.chain.cfg.poll_interval;
        // Readiness follows staleness even while a step waits on slow or dead endpoints.
        let mut refresh = crate::runtime::ticker(READINESS_REFRESH);
        let mut cursor: Option<Cursor> = None;
        loop {
            let result = {
                let step = async {
                    match cursor.as_mut() {
                        None => {
                            cursor = Some(self.open(ps).await?);
                            Ok(())
                        }
                        Some(c) => self.poll(c, ps).await,
                    }
                };
                tokio::pin!(step);
                loop {
                    // Dropping a step mid-batch rolls its transaction back: nothing half-done.
                    tokio::select! {
                        () = term.cancelled() => return Ok(()),
                        r = &mut step => break r,
                        _ = refresh.tick() => self.update_readiness(),
                    }
                }
            };
            match result {
                Ok(()) => {}
                Err(e @ ChainError::ChainIdMismatch { .. }) => return Err(e.into()),
                Err(ChainError::Store(crate::store::StoreError::Fenced(epoch))) => {
                    tracing::warn!(
                        epoch,
                        "chain sync: the leadership passed to another replica; this batch was refused"
                    );
                    return Ok(());
                }
                Err(e) => tracing::warn!(error = %e, "chain sync step failed; retrying"),
            }
            if let Some(c) = &cursor {
                self.leadership.set_processed(c.checkpoint.processed_block);
            }
            self.update_readiness();
            if term
                .run_until_cancelled(tokio::time::sleep(interval))
                .await
                .is_none()
            {
                return Ok(());
            }
        }
    }

    /// A cluster follower: reloads the projections from the shared tables whenever the leader
    /// announces a commit (and every `catch_up`), until this replica leads or `cancel`.
    async fn follow(&self, ps: &mut Projections, cancel: &CancellationToken) {
        let mut leadership = self.leadership.clone();
        let mut tick = crate::runtime::ticker(self.catch_up);
        let mut refresh = crate::runtime::ticker(READINESS_REFRESH);
        let mut listener: Option<sqlx::postgres::PgListener> = None;
        let mut loaded: Option<Checkpoint> = None;
        while !leadership.role().leads() {
            if listener.is_none() {
                listener = self.store.chain_listen().await.ok().flatten();
            }
            match self.replay(ps, loaded.as_ref()).await {
                Ok(Some(c)) => loaded = Some(c),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "chain: reloading the shared tables failed; retrying")
                }
            }
            self.update_readiness();
            // Until a reason to reload comes, readiness follows the staleness.
            loop {
                let notified = async {
                    match listener.as_mut() {
                        Some(l) => l.recv().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    changed = leadership.changed(cancel) => {
                        if !changed {
                            return;
                        }
                        break;
                    }
                    ok = notified => {
                        if !ok {
                            listener = None;
                        }
                        break;
                    }
                    _ = tick.tick() => break,
                    _ = refresh.tick() => self.update_readiness(),
                }
            }
        }
    }

    /// Rebuilds every projection from the shared tables when the leader's checkpoint moved past
    /// `loaded`, and takes the leader's freshness; the checkpoint read, once the leader wrote one.
    async fn replay(
        &self,
        ps: &mut Projections,
        loaded: Option<&Checkpoint>,
    ) -> Result<Option<Checkpoint>, ChainError> {
        let cfg = &self.chain.cfg;
        let Some(c) = self.store.chain_checkpoints().await?.into_iter().find(|c| {
            c.start_block == cfg.start_block && cfg.chain_id.is_none_or(|id| id == c.chain_id)
        }) else {
            return Ok(None);
        };
        let moved = loaded
            .is_none_or(|l| (l.processed_block, l.updated_at) != (c.processed_block, c.updated_at));
        if moved {
            let at = self.processed_ref(&c).await?;
            let identities = self.store.chain_projections(c.chain_id).await?;
            for p in ps.iter_mut() {
                let current = identities
                    .iter()
                    .any(|i| i.name == p.name() && i.identity == p.identity());
                let stored = if current {
                    self.store.chain_events(c.chain_id, p.name()).await?
                } else {
                    Vec::new()
                };
                p.rebuild(&stored, processed_at(c.chain_id, c.processed_block, at));
                p.publish();
            }
        }
        // The leader was caught up when it last saw the head.
        let age = crate::clock::unix_secs_i64().saturating_sub(c.head_seen_at);
        let age = std::time::Duration::from_secs(u64::try_from(age).unwrap_or(0));
        if c.head_seen_at > 0
            && let Some(at) = Instant::now().checked_sub(age)
        {
            self.status.mark_fresh(at);
        }
        self.leadership.follower_lag(age.as_secs_f64());
        self.leadership.set_processed(c.processed_block);
        self.status.set_progress(SyncProgress {
            chain_id: c.chain_id,
            head_block: c.head_block,
            target_block: c.processed_block,
            processed_block: c.processed_block,
            endpoints: self.rpc.status(),
        });
        Ok(Some(c))
    }
}

impl Task for Follower {
    fn name(&self) -> &'static str {
        "chain_sync"
    }

    async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut projections = std::mem::take(&mut self.projections);
        loop {
            if self.leadership.role().leads() {
                let Some(term) = self.leadership.term(&cancel).await else {
                    return Ok(());
                };
                self.epoch = term.epoch;
                self.lead(&mut projections, &term.token).await?;
            } else {
                self.follow(&mut projections, &cancel).await;
            }
            if cancel.is_cancelled() {
                return Ok(());
            }
        }
    }
}
