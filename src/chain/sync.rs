//! The sync engine: follows DstackKms and every registered DstackApp into the store and the mirror.
//!
//! Flow, per poll: read the head (and the `safe`/`finalized` block, or subtract the confirmations)
//! → compare the newest stored block hash with the chain; on a mismatch walk the stored hashes back
//! to the common ancestor, delete everything above it in the transaction that rewinds the
//! checkpoint and rebuild the mirror from the remaining events (no ancestor within the retained
//! window → full resync from `start_block`, logged at WARN) → fetch `eth_getLogs` for the KMS and
//! all known apps in bounded ranges (halved on "too many results", doubled back after each
//! success; the next range is fetched while the current one is committed) → for apps discovered
//! in the range, fetch their logs for the whole range too and merge (an app registered with
//! `registerApp` that has code also gets its earlier logs from `start_block`: it may have been
//! configured before it was registered) → commit events, the block hashes within the reorg window
//! and the checkpoint in one transaction → apply to the mirror and publish → one `on-chain sync
//! completed` log line per batch. A restart resumes at the checkpoint, so an interrupted batch is
//! fetched again and never half-applied.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use alloy::eips::BlockNumberOrTag;
use alloy::primitives::{Address, B256, U256};
use alloy::providers::Provider;
use alloy::rpc::types::{Filter, Log};
use alloy::sol_types::SolCall;
use futures::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

use super::ChainError;
use super::code::{CodeId, CodeKind, KnownCode, identify};
use super::config::{Finality, ResolvedChain};
use super::contracts::{DstackApp, IMPLEMENTATION_SLOT};
use super::events::{self, AppFlags, Event, SetEntry};
use super::metrics::{ChainMetrics, Method};
use super::mirror::MirrorState;
use super::rpc::RpcPool;
use super::store::{BatchWrite, Checkpoint, StoredEvent};
use super::view::{Mirror, SyncProgress};
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

/// Synthetic rows sort after every real log of their block.
const SYNTHETIC_LOG_INDEX: u64 = 1 << 32;

/// Chain reads of one batch's observations in flight at once.
const OBSERVATIONS_IN_FLIGHT: usize = 16;

/// DstackApp's storage slot holding the upgrades-disabled flag (byte 0) and `allowAnyDevice`
/// (byte 1), as in dstack's layout.
const UPGRADES_DISABLED_SLOT: u64 = 1;

/// A synthetic row to be written at `block` (whose hash is `hash`).
struct Observed {
    block: u64,
    hash: B256,
    event: Event,
}

/// A block as the engine needs it.
#[derive(Debug, Clone, Copy)]
struct BlockRef {
    number: u64,
    hash: B256,
    parent_hash: B256,
    timestamp: u64,
}

/// The sync engine of one chain.
pub struct SyncEngine {
    chain: ResolvedChain,
    store: Store,
    rpc: Arc<RpcPool>,
    known: Arc<KnownCode>,
    mirror: Arc<Mirror>,
    readiness: Readiness,
    metrics: ChainMetrics,
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

/// Mutable state of a running engine.
struct Cursor {
    chain_id: u64,
    checkpoint: Checkpoint,
    state: Arc<MirrorState>,
    addresses: BTreeSet<Address>,
    batch_blocks: u64,
    /// Timestamp of the processed block (for lag in seconds).
    processed_timestamp: u64,
}

fn decode_stored(kms: Address, e: &StoredEvent) -> Option<Event> {
    if e.topics.is_empty() {
        return Event::from_synthetic(&e.kind, e.address, &e.data);
    }
    events::decode(kms, e.address, &e.topics, &e.data)
}

/// Rebuilds the mirror of `kms` from stored events, knowing only our own contracts' code.
pub fn rebuild(kms: Address, stored: &[StoredEvent]) -> MirrorState {
    rebuild_with(kms, Arc::new(KnownCode::builtin()), stored)
}

/// Rebuilds the mirror of `kms` from stored events (start-up, rewinds, `chain state`).
pub fn rebuild_with(kms: Address, known: Arc<KnownCode>, stored: &[StoredEvent]) -> MirrorState {
    let mut state = MirrorState::with_known(kms, known);
    for e in stored.iter().filter_map(|e| decode_stored(kms, e)) {
        state.apply(&e);
    }
    state.block = stored.last().map_or(0, |e| e.block_number);
    state
}

/// What a batch's observations must read, walked in chain order: whether `app` is answered by
/// known DstackApp code, with the batch's code identities and upgrades applied on top of the
/// mirror.
struct Overlay<'a> {
    base: &'a MirrorState,
    code: HashMap<Address, Option<CodeKind>>,
    implementation: HashMap<Address, Option<Address>>,
}

impl Overlay<'_> {
    fn kind(&self, a: Address) -> Option<CodeKind> {
        match self.code.get(&a) {
            Some(k) => *k,
            None => self.base.code.get(&a)?.known.as_ref().map(|k| k.kind),
        }
    }

    /// The known kind of the code answering for `a` (the KMS contract or an app).
    fn answering(&self, a: Address) -> Option<CodeKind> {
        match self.kind(a) {
            Some(CodeKind::Proxy) => {
                let imp = match self.implementation.get(&a) {
                    Some(i) => *i,
                    None if a == self.base.kms_address => self.base.kms.implementation,
                    None => self.base.apps.get(&a).and_then(|p| p.implementation),
                };
                imp.and_then(|i| self.kind(i))
            }
            other => other,
        }
    }

    /// Whether `a` is answered by known code of its role (DstackKms for the KMS contract,
    /// DstackApp for an app).
    fn known_role(&self, a: Address) -> bool {
        let role = if a == self.base.kms_address {
            CodeKind::DstackKms
        } else {
            CodeKind::DstackApp
        };
        self.answering(a) == Some(role)
    }

    fn apply(&mut self, e: &Event) {
        match e {
            Event::CodeIdentity(a, id) => {
                let kind = self.base.known.classify(id).map(|k| k.kind);
                self.code.insert(*a, kind);
            }
            Event::Upgraded(a, imp) | Event::ImplementationObserved(a, imp) => {
                self.implementation
                    .insert(*a, (!imp.is_zero()).then_some(*imp));
            }
            _ => {}
        }
    }
}

impl SyncEngine {
    /// An engine for `chain` reading through `rpc`, publishing into `mirror`, evaluating `known`
    /// code locally.
    pub fn new(
        chain: ResolvedChain,
        store: Store,
        rpc: Arc<RpcPool>,
        mirror: Arc<Mirror>,
        readiness: Readiness,
        metrics: ChainMetrics,
    ) -> Self {
        readiness.register(READINESS_COMPONENT);
        Self {
            known: mirror.snapshot().known.clone(),
            chain,
            store,
            rpc,
            mirror,
            readiness,
            metrics,
        }
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

    /// The identity of the code at `at` as of `block` (`None`: no code).
    async fn code_id(&self, at: Address, block: u64) -> Result<Option<CodeId>, ChainError> {
        let code = self
            .rpc
            .call(Method::EthGetCode, |p| async move {
                p.get_code_at(at).number(block).await
            })
            .await?;
        Ok(identify(&code, at))
    }

    async fn storage(&self, at: Address, slot: U256, block: u64) -> Result<U256, ChainError> {
        self.rpc
            .call(Method::EthGetStorageAt, |p| async move {
                p.get_storage_at(at, slot).number(block).await
            })
            .await
    }

    /// A view call on `app` at `block` returning one bool.
    async fn flag<C: SolCall<Return = bool>>(
        &self,
        app: Address,
        call: C,
        block: u64,
    ) -> Result<bool, ChainError> {
        let raw = self.rpc.eth_call(app, call.abi_encode(), block).await?;
        C::abi_decode_returns(&raw).map_err(|e| ChainError::UndecodableAnswer(e.to_string()))
    }

    /// The DstackApp flags initialisers set without events: the getters, and the upgrades-disabled
    /// flag (no getter) from storage, as of `block`.
    async fn app_flags(&self, app: Address, block: u64) -> Result<AppFlags, ChainError> {
        let (allow_any_device, require_tcb_up_to_date, slot) = tokio::try_join!(
            self.flag(app, DstackApp::allowAnyDeviceCall {}, block),
            self.flag(app, DstackApp::requireTcbUpToDateCall {}, block),
            self.storage(app, U256::from(UPGRADES_DISABLED_SLOT), block),
        )?;
        Ok(AppFlags {
            allow_any_device,
            require_tcb_up_to_date,
            upgrades_disabled: slot.byte(0) != 0,
        })
    }

    /// A contract as first seen at `block`: its code identity, and for a proxy its implementation
    /// slot and (unless already identified) the implementation's code identity.
    async fn observe_contract(
        &self,
        at: Address,
        block: u64,
        identified: &HashSet<Address>,
    ) -> Result<Vec<Event>, ChainError> {
        let Some(id) = self.code_id(at, block).await? else {
            return Ok(Vec::new());
        };
        let slot = self.storage(at, IMPLEMENTATION_SLOT.into(), block).await?;
        let imp = Address::from_word(B256::from(slot));
        let mut out = vec![
            Event::CodeIdentity(at, id),
            Event::ImplementationObserved(at, imp),
        ];
        if !imp.is_zero()
            && !identified.contains(&imp)
            && let Some(imp_id) = self.code_id(imp, block).await?
        {
            out.push(Event::CodeIdentity(imp, imp_id));
        }
        Ok(out)
    }

    /// Reads what events cannot tell, for the rows of one batch (or, at start-up, for a mirror
    /// built by an older release): the code of apps first seen here (and the implementations
    /// they point at), the code of every implementation an `Upgraded` names, and the flags of
    /// each app answered by known DstackApp code wherever it was discovered, upgraded or
    /// re-initialised. Each observation is made at the block of its trigger.
    async fn observe(
        &self,
        state: &MirrorState,
        rows: &[(StoredEvent, Event)],
        first_seen: &[(Address, u64, B256)],
    ) -> Result<Vec<Observed>, ChainError> {
        let mut identified: HashSet<Address> = state.code.keys().copied().collect();
        // Phase 1: code identities (independent reads, run concurrently).
        enum Job {
            Contract(Address),
            Code(Address),
        }
        let mut jobs: Vec<(Job, u64, B256)> = first_seen
            .iter()
            .map(|&(a, block, hash)| (Job::Contract(a), block, hash))
            .collect();
        identified.extend(first_seen.iter().map(|(a, ..)| *a));
        for (s, e) in rows {
            if let Event::Upgraded(_, imp) = e
                && identified.insert(*imp)
            {
                jobs.push((Job::Code(*imp), s.block_number, s.block_hash));
            }
        }
        let identified = &identified;
        let code: Vec<Observed> = futures::stream::iter(jobs)
            .map(|(job, block, hash)| async move {
                let events = match job {
                    Job::Contract(a) => self.observe_contract(a, block, identified).await?,
                    Job::Code(a) => self
                        .code_id(a, block)
                        .await?
                        .map(|id| Event::CodeIdentity(a, id))
                        .into_iter()
                        .collect(),
                };
                Ok::<_, ChainError>(
                    events
                        .into_iter()
                        .map(|event| Observed { block, hash, event })
                        .collect::<Vec<_>>(),
                )
            })
            .buffered(OBSERVATIONS_IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .flatten()
            .collect();

        // Phase 2: walk the rows and the code observations in chain order; at the end of each
        // block, every app discovered, upgraded or initialised in it that known DstackApp code
        // answers gets its flags read at that block.
        // Per block: the apps whose flags may need reading, and the upgraded contracts
        // (including the KMS contract): one coming back to known code after unknown code ran
        // gets the entries the mirror holds checked against its storage.
        type ByBlock = BTreeMap<u64, (B256, BTreeSet<Address>)>;
        fn mark(map: &mut ByBlock, block: u64, hash: B256, a: Address) {
            map.entry(block)
                .or_insert((hash, BTreeSet::new()))
                .1
                .insert(a);
        }
        let (mut triggers, mut upgraded) = (ByBlock::new(), ByBlock::new());
        let kms = state.kms_address;
        for &(a, block, hash) in first_seen.iter().filter(|(a, ..)| *a != kms) {
            mark(&mut triggers, block, hash, a);
        }
        for (s, e) in rows {
            if let Event::Upgraded(a, _) = e {
                mark(&mut upgraded, s.block_number, s.block_hash, *a);
            }
            if let Event::Upgraded(a, _) | Event::Initialized(a) = e
                && *a != kms
            {
                mark(&mut triggers, s.block_number, s.block_hash, *a);
            }
        }
        let mut overlay = Overlay {
            base: state,
            code: HashMap::new(),
            implementation: HashMap::new(),
        };
        let mut walk: Vec<(u64, &Event)> = rows
            .iter()
            .map(|(s, e)| (s.block_number, e))
            .chain(code.iter().map(|o| (o.block, &o.event)))
            .collect();
        walk.sort_by_key(|(block, _)| *block);
        let blocks: BTreeSet<u64> = triggers.keys().chain(upgraded.keys()).copied().collect();
        let mut reads = Vec::new();
        let mut checks = Vec::new();
        let mut i = 0;
        for block in blocks {
            while i < walk.len() && walk[i].0 < block {
                overlay.apply(walk[i].1);
                i += 1;
            }
            let was_known: Vec<(Address, bool)> = upgraded
                .get(&block)
                .map(|(_, set)| set.iter().map(|a| (*a, overlay.known_role(*a))).collect())
                .unwrap_or_default();
            while i < walk.len() && walk[i].0 == block {
                overlay.apply(walk[i].1);
                i += 1;
            }
            if let Some((hash, apps)) = triggers.get(&block) {
                reads.extend(
                    apps.iter()
                        .filter(|a| overlay.known_role(**a))
                        .map(|a| (*a, block, *hash)),
                );
            }
            if let Some((hash, _)) = upgraded.get(&block) {
                for (a, was) in was_known {
                    if !was && overlay.known_role(a) {
                        for entry in held_entries(state, rows, a, block) {
                            checks.push((a, entry, block, *hash));
                        }
                    }
                }
            }
        }
        let flags: Vec<Observed> = futures::stream::iter(reads)
            .map(|(app, block, hash)| async move {
                Ok::<_, ChainError>(Observed {
                    block,
                    hash,
                    event: Event::FlagsObserved(app, self.app_flags(app, block).await?),
                })
            })
            .buffered(OBSERVATIONS_IN_FLIGHT)
            .try_collect()
            .await?;
        let checked: Vec<(Address, SetEntry, u64, B256, bool)> = futures::stream::iter(checks)
            .map(|(a, entry, block, hash)| async move {
                let held = self.entry_held(a, entry, block).await?;
                Ok::<_, ChainError>((a, entry, block, hash, held))
            })
            .buffered(OBSERVATIONS_IN_FLIGHT)
            .try_collect()
            .await?;
        let mut absent: BTreeMap<(u64, Address), (B256, Vec<SetEntry>)> = BTreeMap::new();
        for (a, entry, block, hash, held) in checked {
            if !held {
                absent
                    .entry((block, a))
                    .or_insert((hash, Vec::new()))
                    .1
                    .push(entry);
            }
        }
        if !absent.is_empty() {
            tracing::warn!(
                contracts = absent.len(),
                "allow-list entries the mirror held are gone from storage after unknown code ran: removed"
            );
        }
        let absent = absent
            .into_iter()
            .map(|((block, a), (hash, entries))| Observed {
                block,
                hash,
                event: Event::EntriesAbsent(a, entries),
            });
        Ok(code.into_iter().chain(flags).chain(absent).collect())
    }

    /// Whether `contract`'s storage holds `entry` as of `block` (its getter).
    async fn entry_held(
        &self,
        contract: Address,
        entry: SetEntry,
        block: u64,
    ) -> Result<bool, ChainError> {
        use super::contracts::DstackKms as K;
        match entry {
            SetEntry::ComposeHash(v) => {
                self.flag(contract, DstackApp::allowedComposeHashesCall(v), block)
                    .await
            }
            SetEntry::Device(v) => {
                self.flag(contract, DstackApp::allowedDeviceIdsCall(v), block)
                    .await
            }
            SetEntry::OsImage(v) => self.flag(contract, K::allowedOsImagesCall(v), block).await,
            SetEntry::AggregatedMr(v) => {
                self.flag(contract, K::kmsAllowedAggregatedMrsCall(v), block)
                    .await
            }
            SetEntry::KmsDevice(v) => {
                self.flag(contract, K::kmsAllowedDeviceIdsCall(v), block)
                    .await
            }
            SetEntry::RegisteredApp(a) => {
                self.flag(contract, K::registeredAppsCall(a), block).await
            }
        }
    }

    /// Identifies, at the processed block, what a mirror built by an older release never
    /// observed: the KMS contract's code, apps with code but no identity, implementations
    /// without one, and the flags of DstackApp-answered apps. Commits the rows (checkpoint
    /// unchanged) and returns the new state; `None` when nothing was missing.
    async fn classify_unobserved(
        &self,
        c: &Cursor,
        stored: &[StoredEvent],
    ) -> Result<Option<MirrorState>, ChainError> {
        let s = &c.state;
        let block = c.checkpoint.processed_block;
        if block < c.checkpoint.start_block {
            return Ok(None);
        }
        let Some(&(_, hash, _)) = self.store.chain_recent_blocks(c.chain_id).await?.first() else {
            return Ok(None);
        };
        let unidentified = |a: &Address| !s.code.contains_key(a);
        let mut first_seen: Vec<(Address, u64, B256)> = std::iter::once(s.kms_address)
            .chain(
                s.registered_apps
                    .iter()
                    .copied()
                    .filter(|a| s.apps.get(a).is_some_and(|p| p.has_code)),
            )
            .filter(unidentified)
            .map(|a| (a, block, hash))
            .collect();
        first_seen.sort();
        // Apps already identified whose flags were never read, and implementations never
        // identified, are treated like an upgrade at this block.
        let mut rows: Vec<(StoredEvent, Event)> = Vec::new();
        let pseudo = |event: Event| {
            (
                StoredEvent {
                    block_number: block,
                    log_index: 0,
                    block_hash: hash,
                    address: Address::ZERO,
                    kind: String::new(),
                    topics: Vec::new(),
                    data: Vec::new(),
                },
                event,
            )
        };
        if let Some(imp) = s.kms.implementation.filter(|i| unidentified(i)) {
            rows.push(pseudo(Event::Upgraded(s.kms_address, imp)));
        }
        for a in &s.registered_apps {
            let Some(p) = s
                .apps
                .get(a)
                .filter(|p| p.has_code && s.code.contains_key(a))
            else {
                continue;
            };
            if let Some(imp) = p.implementation.filter(|i| unidentified(i)) {
                rows.push(pseudo(Event::Upgraded(*a, imp)));
            } else if !p.flags_observed {
                rows.push(pseudo(Event::Initialized(*a)));
            }
        }
        if first_seen.is_empty() && rows.is_empty() {
            return Ok(None);
        }
        let observed = self.observe(s, &rows, &first_seen).await?;
        let next_index = stored
            .iter()
            .filter(|e| e.block_number == block)
            .map(|e| e.log_index + 1)
            .max()
            .unwrap_or(0)
            .max(SYNTHETIC_LOG_INDEX);
        let synthetic = synthetic_rows(observed, next_index);
        let mut state = (**s).clone();
        for (_, e) in &synthetic {
            state.apply(e);
        }
        let events: Vec<StoredEvent> = synthetic.into_iter().map(|(s, _)| s).collect();
        self.store
            .chain_commit_batch(&BatchWrite {
                checkpoint: &c.checkpoint,
                events: &events,
                blocks: &[],
                prune_below: 0,
            })
            .await?;
        tracing::info!(
            chain_id = c.chain_id,
            block,
            rows = events.len(),
            "chain mirror: code and flags of contracts observed by an older release read at the processed block"
        );
        Ok(Some(state))
    }

    /// Opens the cursor: chain id, checkpoint (reset if new or for another KMS), mirror rebuilt.
    async fn open(&self) -> Result<Cursor, ChainError> {
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
        let kms = self.chain.kms;
        let start = self.chain.cfg.start_block;
        let fresh = Checkpoint {
            chain_id,
            kms_contract: kms,
            start_block: start,
            processed_block: start.saturating_sub(1),
            head_block: 0,
            head_seen_at: 0,
            updated_at: crate::clock::unix_secs_i64(),
        };
        let checkpoint = match self.store.chain_checkpoint(chain_id).await? {
            Some(c) if c.kms_contract == kms && c.start_block == start => c,
            other => {
                if other.is_some() {
                    tracing::warn!(
                        chain_id,
                        "chain.kms_contract or chain.start_block changed: resyncing from start_block"
                    );
                    self.metrics.resync();
                }
                self.store.chain_reset(&fresh).await?;
                fresh
            }
        };
        let stored = self.store.chain_events(chain_id).await?;
        let mut state = rebuild_with(kms, self.known.clone(), &stored);
        // Live calls are made at the processed block, which may hold no stored event.
        state.block = checkpoint.processed_block;
        let processed_timestamp = self
            .store
            .chain_recent_blocks(chain_id)
            .await?
            .first()
            .map_or(0, |b| u64::try_from(b.2).unwrap_or(0));
        let mut cursor = Cursor {
            chain_id,
            addresses: addresses_of(&state),
            state: Arc::new(state),
            checkpoint,
            batch_blocks: self.chain.cfg.max_batch_blocks,
            processed_timestamp,
        };
        if let Some(state) = self.classify_unobserved(&cursor, &stored).await? {
            cursor.state = Arc::new(state);
        }
        self.mirror.publish(cursor.state.clone());
        tracing::info!(
            chain_id,
            processed_block = cursor.checkpoint.processed_block,
            events = stored.len(),
            apps = cursor.state.registered_apps.len(),
            "chain mirror rebuilt from the store"
        );
        Ok(cursor)
    }

    /// The newest block the engine may apply, given the head.
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
    async fn check_reorg(&self, c: &mut Cursor) -> Result<bool, ChainError> {
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
                self.store.chain_rewind(&c.checkpoint).await?;
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
                self.store.chain_reset(&c.checkpoint).await?;
                c.processed_timestamp = 0;
            }
        }
        let stored = self.store.chain_events(c.chain_id).await?;
        let mut state = rebuild_with(self.chain.kms, self.known.clone(), &stored);
        state.block = c.checkpoint.processed_block;
        c.addresses = addresses_of(&state);
        c.state = Arc::new(state);
        self.mirror.publish(c.state.clone());
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

    /// Logs of `app` in `start..from` (before the range that registered it), in ranges that
    /// shrink on "too many results".
    async fn history(&self, app: Address, start: u64, from: u64) -> Result<Vec<Log>, ChainError> {
        let mut out = Vec::new();
        let mut size = self.chain.cfg.max_batch_blocks;
        let mut lo = start;
        while lo < from {
            let hi = (from - 1).min(lo + size - 1);
            match self.logs(&[app], lo, hi).await {
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

    /// Completes, commits and applies a fetched range. Returns the number of events.
    async fn batch(
        &self,
        c: &mut Cursor,
        head: &BlockRef,
        fetched: Fetched,
    ) -> Result<usize, ChainError> {
        let Fetched {
            from,
            to,
            last,
            mut logs,
            covered,
        } = fetched;
        let kms = self.chain.kms;
        let decode = |l: &Log| {
            events::decode(
                kms,
                l.inner.address,
                l.inner.data.topics(),
                &l.inner.data.data,
            )
        };
        // Apps registered in this range, and apps registered in the previous range when this
        // one was prefetched: their logs in the range were not asked for yet.
        let new_apps: BTreeSet<Address> = logs
            .iter()
            .filter_map(|l| decode(l)?.discovered_app())
            .filter(|a| !c.addresses.contains(a))
            .collect();
        let missing: Vec<Address> = c
            .addresses
            .iter()
            .chain(&new_apps)
            .filter(|a| !covered.contains(*a))
            .copied()
            .collect();
        if !missing.is_empty() {
            logs.extend(self.logs(&missing, from, to).await?);
        }
        let mut rows = rows_of(kms, &logs, &last)?;
        let blocks = self.window_hashes(head, from, last).await?;

        // An app deployed by the factory in this range starts here. One registered with
        // `registerApp` may have no code (refused as such), or may have existed before its
        // registration: its earlier events are part of its state.
        let factory: BTreeSet<Address> = rows
            .iter()
            .filter_map(|(_, e)| match e {
                Event::AppDeployedViaFactory(a) => Some(*a),
                _ => None,
            })
            .collect();
        for app in new_apps.iter().copied().filter(|a| !factory.contains(a)) {
            let code = self
                .rpc
                .call(Method::EthGetCode, |p| async move {
                    p.get_code_at(app).number(to).await
                })
                .await?;
            if code.is_empty() {
                continue;
            }
            let history = self.history(app, c.checkpoint.start_block, from).await?;
            rows.extend(rows_of(kms, &history, &last)?);
        }
        rows.sort_by_key(|(s, _)| (s.block_number, s.log_index));
        rows.dedup_by_key(|(s, _)| (s.block_number, s.log_index));

        // What events cannot tell, read at the block of each trigger: the KMS contract's code
        // (until it is seen), the code of each new app where it was registered, of every
        // implementation an upgrade names, and the flags initialisers set silently.
        let mut first_seen: Vec<(Address, u64, B256)> = Vec::new();
        if !c.state.code.contains_key(&kms) {
            first_seen.push((kms, to, last.hash));
        }
        // An app registered before it had code is identified at its first log.
        for (s, _) in &rows {
            if s.address != kms
                && c.addresses.contains(&s.address)
                && !c.state.code.contains_key(&s.address)
                && !first_seen.iter().any(|(a, ..)| *a == s.address)
            {
                first_seen.push((s.address, s.block_number, s.block_hash));
            }
        }
        for app in &new_apps {
            let (block, hash) = rows
                .iter()
                .find(|(_, e)| e.discovered_app() == Some(*app))
                .map_or((to, last.hash), |(s, _)| (s.block_number, s.block_hash));
            first_seen.push((*app, block, hash));
        }
        let observed = self.observe(&c.state, &rows, &first_seen).await?;
        rows.extend(synthetic_rows(observed, SYNTHETIC_LOG_INDEX));
        rows.sort_by_key(|(s, _)| (s.block_number, s.log_index));
        let mut next_state = (*c.state).clone();
        for (_, e) in &rows {
            next_state.apply(e);
        }
        next_state.block = to;

        let stored: Vec<StoredEvent> = rows.into_iter().map(|(s, _)| s).collect();
        let mut checkpoint = c.checkpoint.clone();
        checkpoint.processed_block = to;
        checkpoint.head_block = head.number;
        checkpoint.head_seen_at = crate::clock::unix_secs_i64();
        checkpoint.updated_at = checkpoint.head_seen_at;
        self.store
            .chain_commit_batch(&BatchWrite {
                checkpoint: &checkpoint,
                events: &stored,
                blocks: &blocks,
                prune_below: to.saturating_sub(self.chain.cfg.reorg_window),
            })
            .await?;
        c.checkpoint = checkpoint;
        c.addresses.extend(new_apps);
        c.state = Arc::new(next_state);
        c.processed_timestamp = last.timestamp;
        self.mirror.publish(c.state.clone());
        Ok(stored.len())
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
        self.mirror.set_progress(SyncProgress {
            chain_id: c.chain_id,
            head_block: head.number,
            target_block: target,
            processed_block: c.checkpoint.processed_block,
            endpoints: self.rpc.status(),
        });
    }

    /// One poll: head, reorg check, batches up to the target. Returns once caught up.
    async fn poll(&self, c: &mut Cursor) -> Result<(), ChainError> {
        self.rpc.check_chains().await;
        let head = self.required_block(BlockNumberOrTag::Latest).await?;
        let target = self.target(&head).await?;
        self.check_reorg(c).await?;
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
                    self.fetch(c.addresses.clone(), from, to).await
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
            let addresses = c.addresses.clone();
            let next = async {
                if to < target {
                    Some(self.fetch(addresses, to + 1, next_to).await)
                } else {
                    None
                }
            };
            let (result, next) = tokio::join!(self.batch(c, &head, fetched), next);
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
            .chain_record_head(c.chain_id, head.number, crate::clock::unix_secs_i64())
            .await?;
        self.mirror.mark_fresh(Instant::now());
        Ok(())
    }

    /// Readiness and the staleness gauge, from the published mirror (callable while a step runs).
    fn update_readiness(&self) {
        let staleness = self.mirror.staleness();
        let state = match staleness {
            _ if self.mirror.is_fresh() => ComponentState::Ready,
            Some(s) => ComponentState::NotReady(format!(
                "chain_state_stale: last caught up with the chain {}s ago",
                s.as_secs()
            )),
            None => ComponentState::NotReady(format!(
                "backfilling: processed block {} of {}",
                self.mirror.progress().processed_block,
                self.mirror.progress().target_block
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

/// Decoded rows of `logs`; logs the mirror does not use are dropped. A removed log, or one at
/// `last`'s height from another block, means the chain moved while the range was read.
fn rows_of(
    kms: Address,
    logs: &[Log],
    last: &BlockRef,
) -> Result<Vec<(StoredEvent, Event)>, ChainError> {
    let mut rows = Vec::with_capacity(logs.len());
    for l in logs {
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
        let Some(event) = events::decode(
            kms,
            l.inner.address,
            l.inner.data.topics(),
            &l.inner.data.data,
        ) else {
            continue;
        };
        rows.push((
            StoredEvent {
                block_number: number,
                log_index: index,
                block_hash: hash,
                address: l.inner.address,
                kind: event.kind().to_owned(),
                topics: l.inner.data.topics().to_vec(),
                data: l.inner.data.data.to_vec(),
            },
            event,
        ));
    }
    Ok(rows)
}

/// The allow-set entries the mirror holds for `contract` at the end of `block`, as far as the
/// stored state and the batch's additions up to that block tell (a superset is fine: each is
/// checked against storage).
fn held_entries(
    state: &MirrorState,
    rows: &[(StoredEvent, Event)],
    contract: Address,
    block: u64,
) -> BTreeSet<SetEntry> {
    let kms = contract == state.kms_address;
    let mut out: BTreeSet<SetEntry> = state.entries(contract).into_iter().collect();
    for (_, e) in rows.iter().filter(|(s, _)| s.block_number <= block) {
        let added = match e {
            Event::ComposeHash(a, v, true) if *a == contract => SetEntry::ComposeHash(*v),
            Event::Device(a, v, true) if *a == contract => SetEntry::Device(*v),
            Event::OsImage(v, true) if kms => SetEntry::OsImage(*v),
            Event::KmsAggregatedMr(v, true) if kms => SetEntry::AggregatedMr(*v),
            Event::KmsDevice(v, true) if kms => SetEntry::KmsDevice(*v),
            Event::AppRegistered(a) | Event::AppDeployedViaFactory(a) if kms => {
                SetEntry::RegisteredApp(*a)
            }
            _ => continue,
        };
        out.insert(added);
    }
    out
}

/// Observations as stored rows: per block, indexes from `base` up, after every log of the block.
fn synthetic_rows(observed: Vec<Observed>, base: u64) -> Vec<(StoredEvent, Event)> {
    let mut next: HashMap<u64, u64> = HashMap::new();
    observed
        .into_iter()
        .filter_map(|o| {
            let data = o.event.synthetic_data()?;
            let address = match &o.event {
                Event::CodeObserved(a)
                | Event::CodeIdentity(a, _)
                | Event::ImplementationObserved(a, _)
                | Event::FlagsObserved(a, _)
                | Event::EntriesAbsent(a, _) => *a,
                _ => return None,
            };
            let index = next.entry(o.block).or_insert(base);
            let log_index = *index;
            *index += 1;
            Some((
                StoredEvent {
                    block_number: o.block,
                    log_index,
                    block_hash: o.hash,
                    address,
                    kind: o.event.kind().to_owned(),
                    topics: Vec::new(),
                    data,
                },
                o.event,
            ))
        })
        .collect()
}

fn addresses_of(state: &MirrorState) -> BTreeSet<Address> {
    std::iter::once(state.kms_address)
        .chain(state.registered_apps.iter().copied())
        .collect()
}

impl Task for SyncEngine {
    fn name(&self) -> &'static str {
        "chain_sync"
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let interval = self.chain.cfg.poll_interval;
        // Readiness follows staleness even while a step waits on slow or dead endpoints.
        let mut refresh = tokio::time::interval(READINESS_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cursor: Option<Cursor> = None;
        loop {
            let result = {
                let step = async {
                    match cursor.as_mut() {
                        None => {
                            cursor = Some(self.open().await?);
                            Ok(())
                        }
                        Some(c) => self.poll(c).await,
                    }
                };
                tokio::pin!(step);
                loop {
                    // Dropping a step mid-batch rolls its transaction back: nothing half-done.
                    tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        r = &mut step => break r,
                        _ = refresh.tick() => self.update_readiness(),
                    }
                }
            };
            match result {
                Ok(()) => {}
                Err(e @ ChainError::ChainIdMismatch { .. }) => return Err(e.into()),
                Err(e) => tracing::warn!(error = %e, "chain sync step failed; retrying"),
            }
            self.update_readiness();
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}
