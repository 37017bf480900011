//! The governance watcher's on-chain side: a projection on the chain's follower that follows who
//! owns DstackKms and its apps, what those owners are (Safe, TimelockController, EOA), and the
//! Safes' and timelocks' own events.
//!
//! Flow, per batch: the follower hands over the logs of the KMS, its apps, and every Safe and
//! timelock found so far → [`events::decode`] → discoveries: apps the KMS registers, each
//! `owner` / `pendingOwner` a contract names, each account a timelock grants a role to (their
//! history from the start block comes along, so a Safe's setup and a timelock's roles are seen)
//! → for each new address, what it is, read at the block it was named in (`eth_getCode`, then
//! `VERSION()` + `getOwners()` for a Safe, `getMinDelay()` for a timelock; a Safe's threshold,
//! nonce, modules, guard and fallback handler come along) and, per scheduled operation, its ready
//! time (`getTimestamp`), as synthetic rows → after the follower's commit, applied to the pure
//! [`GovernanceState`] and published to the [`GovernanceView`] and the metrics. At start-up and
//! after a rewind each Safe's and timelock's state is checked against the chain at the processed
//! block; a difference is logged and the chain's answer kept.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use alloy::primitives::{Address, B256, U256, keccak256};
use futures::future::BoxFuture;

use super::events::{self, ContractKind, GovEvent};
use super::metrics::GovernanceMetrics;
use super::state::GovernanceState;
use crate::chain::ChainError;
use crate::chain::contracts::{SafeL2 as S, TimelockController as T};
use crate::chain::projection::{
    self, At, ChainReads, Discovered, Processed, Projection, SYNTHETIC_LOG_INDEX, Synthetic,
};
use crate::chain::store::StoredEvent;

/// The projection's stored name.
pub const NAME: &str = "governance";

/// Safe's storage slot of the transaction guard: `keccak256("guard_manager.guard.address")`.
const GUARD_SLOT: B256 =
    alloy::primitives::b256!("4a204f620c8c5ccdca3fd54d003badd85ba500436a431f0cbda4f558c93c34c8");

/// The head of Safe's module list.
const SENTINEL: Address = Address::with_last_byte(1);

/// Modules read per Safe.
const MODULES_PAGE: u64 = 64;

/// The published governance state. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct GovernanceView {
    state: RwLock<Arc<GovernanceState>>,
    /// Bumped on every publish: the notifier wakes on it.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for GovernanceView {
    fn default() -> Self {
        Self {
            state: RwLock::default(),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl GovernanceView {
    /// The current state.
    pub fn snapshot(&self) -> Arc<GovernanceState> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the state (the projection, or a one-shot command).
    pub fn publish(&self, state: Arc<GovernanceState>) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = state;
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Signals each publish from now on.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The governance projection.
pub struct GovernanceProjection {
    kms: Address,
    configured: Vec<Address>,
    state: Arc<GovernanceState>,
    addresses: BTreeSet<Address>,
    view: Arc<GovernanceView>,
    metrics: GovernanceMetrics,
}

/// Rebuilds the governance state of `kms` from stored rows.
pub fn rebuild(kms: Address, stored: &[StoredEvent]) -> GovernanceState {
    let mut state = GovernanceState::new(kms);
    for row in stored {
        if let Some(e) = decode_row(kms, row) {
            state.apply(&e, row.block_number);
        }
    }
    state.block = stored.last().map_or(0, |e| e.block_number);
    state
}

/// The KMS contract a stored identity names.
pub fn identity_kms(identity: &[u8]) -> Option<Address> {
    identity.get(..20).map(Address::from_slice)
}

fn decode_row(kms: Address, row: &StoredEvent) -> Option<GovEvent> {
    if row.topics.is_empty() {
        return GovEvent::from_synthetic(&row.kind, row.address, &row.data);
    }
    events::decode(kms, row.address, &row.topics, &row.data)
}

/// Everything the watcher follows, given what it knows.
fn watched(state: &GovernanceState, configured: &[Address]) -> BTreeSet<Address> {
    let mut out: BTreeSet<Address> = configured.iter().copied().collect();
    out.insert(state.kms);
    out.extend(state.apps.iter().copied());
    for o in state.owned.values() {
        out.extend(o.owner);
        out.extend(o.pending);
    }
    out.extend(state.roles.keys().copied());
    out.extend(state.safes.keys().copied());
    for t in state.timelocks.values() {
        out.extend(t.roles.values().flatten().copied());
    }
    out.remove(&Address::ZERO);
    out
}

/// What `a` is, as of `block`.
async fn observe_kind(
    reads: &ChainReads,
    a: Address,
    block: u64,
) -> Result<ContractKind, ChainError> {
    if reads.code(a, block).await?.is_empty() {
        return Ok(ContractKind::Eoa);
    }
    if let Some(version) = reads.probe(a, S::VERSIONCall {}, block).await?
        && let Some(owners) = reads.probe(a, S::getOwnersCall {}, block).await?
    {
        let (threshold, nonce, modules, guard, fallback) = tokio::try_join!(
            reads.call(a, S::getThresholdCall {}, block),
            reads.call(a, S::nonceCall {}, block),
            reads.call(
                a,
                S::getModulesPaginatedCall {
                    start: SENTINEL,
                    pageSize: U256::from(MODULES_PAGE),
                },
                block
            ),
            reads.storage(a, GUARD_SLOT.into(), block),
            reads.storage(
                a,
                keccak256("fallback_manager.handler.address").into(),
                block
            ),
        )?;
        let word = |v: U256| Address::from_word(B256::from(v));
        return Ok(ContractKind::Safe {
            version,
            owners,
            threshold: u64::try_from(threshold).unwrap_or(u64::MAX),
            nonce: u64::try_from(nonce).unwrap_or(u64::MAX),
            modules: modules.array,
            guard: word(guard),
            fallback_handler: word(fallback),
        });
    }
    if let Some(delay) = reads.probe(a, T::getMinDelayCall {}, block).await? {
        return Ok(ContractKind::Timelock {
            min_delay: u64::try_from(delay).unwrap_or(u64::MAX),
        });
    }
    Ok(ContractKind::Contract)
}

/// Synthetic rows from `(block, hash, event)`s: per block, indexes from `base` up.
fn synthetic_rows(observed: Vec<(u64, B256, GovEvent)>, base: u64) -> Vec<StoredEvent> {
    projection::synthetic_rows(
        observed.into_iter().filter_map(|(block, hash, e)| {
            let (address, data) = e.synthetic()?;
            Some(Synthetic {
                block,
                hash,
                address,
                kind: e.kind(),
                data,
            })
        }),
        base,
    )
}

impl GovernanceProjection {
    /// The projection for `kms`, also watching the `configured` Safes, publishing into `view`.
    pub fn new(
        kms: Address,
        configured: Vec<Address>,
        view: Arc<GovernanceView>,
        metrics: GovernanceMetrics,
    ) -> Self {
        let state = GovernanceState::new(kms);
        Self {
            addresses: watched(&state, &configured),
            state: Arc::new(state),
            kms,
            configured,
            view,
            metrics,
        }
    }

    fn decoded<'a>(&self, rows: &'a [StoredEvent]) -> Vec<(&'a StoredEvent, GovEvent)> {
        rows.iter()
            .filter_map(|r| Some((r, decode_row(self.kms, r)?)))
            .collect()
    }

    /// Whether the chain's answer for `a` differs from the state (owners compared as a set:
    /// events cannot always tell their order).
    fn differs(&self, a: Address, kind: &ContractKind) -> bool {
        let mut probe = (*self.state).clone();
        probe.apply(
            &GovEvent::Observed {
                address: a,
                kind: kind.clone(),
            },
            self.state.block,
        );
        let mut current = (*self.state).clone();
        for s in probe.safes.values_mut().chain(current.safes.values_mut()) {
            s.owners.sort();
        }
        probe != current
    }
}

impl Projection for GovernanceProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn identity(&self) -> Vec<u8> {
        let mut out = self.kms.to_vec();
        for s in &self.configured {
            out.extend_from_slice(s.as_slice());
        }
        out
    }

    fn addresses(&self) -> BTreeSet<Address> {
        self.addresses.clone()
    }

    fn decode(&self, emitter: Address, topics: &[B256], data: &[u8]) -> Option<&'static str> {
        events::decode(self.kms, emitter, topics, data).map(|e| e.kind())
    }

    fn discover(&self, rows: &[StoredEvent]) -> Vec<Discovered> {
        let mut found: BTreeMap<Address, bool> = BTreeMap::new();
        for (_, e) in self.decoded(rows) {
            let (address, history) = match e {
                GovEvent::AppRegistered { app, factory } => (app, !factory),
                GovEvent::OwnershipTransferStarted { pending: a, .. }
                | GovEvent::OwnershipTransferred { owner: a, .. }
                | GovEvent::RoleGranted { account: a, .. } => (a, true),
                _ => continue,
            };
            if !address.is_zero() && !self.addresses.contains(&address) {
                *found.entry(address).or_default() |= history;
            }
        }
        found
            .into_iter()
            .map(|(address, history)| Discovered { address, history })
            .collect()
    }

    fn complete<'a>(
        &'a self,
        reads: &'a ChainReads,
        rows: &'a [StoredEvent],
        last: At,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, ChainError>> {
        Box::pin(async move {
            // Each address named as an owner, pending owner or role holder (and each configured
            // Safe) is identified where it was first named.
            let mut named: BTreeMap<Address, (u64, B256)> = BTreeMap::new();
            let mut scheduled: BTreeMap<(Address, B256), (u64, B256)> = BTreeMap::new();
            // Blocks where a Safe's owners signed: their time dates the signers' participation.
            let mut signed: BTreeSet<(u64, B256, Address)> = BTreeSet::new();
            for (row, e) in self.decoded(rows) {
                let at = (row.block_number, row.block_hash);
                match e {
                    GovEvent::ApproveHash { safe, .. }
                    | GovEvent::ExecutionSuccess { safe, .. }
                    | GovEvent::ExecutionFailure { safe, .. } => {
                        signed.insert((at.0, at.1, safe));
                    }
                    GovEvent::OwnershipTransferStarted { pending: a, .. }
                    | GovEvent::OwnershipTransferred { owner: a, .. }
                    | GovEvent::RoleGranted { account: a, .. } => {
                        named.entry(a).or_insert(at);
                    }
                    GovEvent::CallScheduled { timelock, id, .. } => {
                        scheduled.entry((timelock, id)).or_insert(at);
                    }
                    _ => {}
                }
            }
            for a in &self.configured {
                named.entry(*a).or_insert((last.number, last.hash));
            }
            named.retain(|a, _| !a.is_zero() && !self.state.roles.contains_key(a));
            let mut observed = Vec::new();
            for (a, (block, hash)) in named {
                let kind = observe_kind(reads, a, block).await?;
                observed.push((block, hash, GovEvent::Observed { address: a, kind }));
            }
            for ((timelock, id), (block, hash)) in scheduled {
                let at = reads
                    .call(timelock, T::getTimestampCall { id }, block)
                    .await?;
                observed.push((
                    block,
                    hash,
                    GovEvent::OperationReady {
                        timelock,
                        id,
                        at: u64::try_from(at).unwrap_or(u64::MAX),
                    },
                ));
            }
            let mut times: BTreeMap<u64, u64> = BTreeMap::new();
            for (block, hash, safe) in signed {
                let at = match times.get(&block) {
                    Some(t) => *t,
                    None => {
                        let t = reads.block_time(block).await?;
                        times.insert(block, t);
                        t
                    }
                };
                observed.push((block, hash, GovEvent::BlockTime { safe, at }));
            }
            Ok(synthetic_rows(observed, SYNTHETIC_LOG_INDEX))
        })
    }

    fn reconcile<'a>(
        &'a self,
        reads: &'a ChainReads,
        stored: &'a [StoredEvent],
        at: At,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, ChainError>> {
        Box::pin(async move {
            let s = &self.state;
            let checked: BTreeSet<Address> = s
                .safes
                .keys()
                .chain(s.timelocks.keys())
                .filter(|a| s.roles.contains_key(*a))
                .chain(self.configured.iter().filter(|a| !s.roles.contains_key(*a)))
                .copied()
                .collect();
            let mut observed = Vec::new();
            for a in checked {
                let kind = observe_kind(reads, a, at.number).await?;
                if self.differs(a, &kind) {
                    tracing::warn!(
                        address = %a,
                        block = at.number,
                        "governance: the stored state of a Safe or timelock differs from the chain's; the chain's is kept"
                    );
                    observed.push((at.number, at.hash, GovEvent::Observed { address: a, kind }));
                }
            }
            Ok(synthetic_rows(
                observed,
                projection::synthetic_base(stored, at.number),
            ))
        })
    }

    fn apply(&mut self, rows: &[StoredEvent], processed: Processed) {
        let mut next = (*self.state).clone();
        for row in rows {
            if let Some(e) = decode_row(self.kms, row) {
                next.apply(&e, row.block_number);
            }
        }
        next.chain_id = processed.chain_id;
        next.block = processed.number;
        next.time = processed.timestamp;
        self.addresses = watched(&next, &self.configured);
        self.state = Arc::new(next);
    }

    fn rebuild(&mut self, stored: &[StoredEvent], processed: Processed) {
        let mut state = rebuild(self.kms, stored);
        state.chain_id = processed.chain_id;
        state.block = processed.number;
        state.time = processed.timestamp;
        self.addresses = watched(&state, &self.configured);
        self.state = Arc::new(state);
    }

    fn publish(&self) {
        self.metrics.update(&self.state);
        self.view.publish(self.state.clone());
    }
}
