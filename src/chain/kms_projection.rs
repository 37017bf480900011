//! The KMS mirror as a projection of the chain's follower: DstackKms and every registered
//! DstackApp, applied to the pure [`MirrorState`] and published into the [`Mirror`] the KMS path
//! reads.
//!
//! Flow, per batch: the follower hands over the logs of the KMS contract and the known apps →
//! [`events::decode`] keeps the ones the mirror uses → apps registered in the batch are its
//! discoveries (one registered with `registerApp` that has code also has its earlier logs from
//! the start block: it may have been configured before it was registered; one deployed by the
//! factory starts there) → what events cannot tell is read at the block of each trigger and
//! stored as synthetic rows: the code identity of the KMS contract and of each new app (and the
//! implementation a proxy points at), of every implementation an `Upgraded` names, the flags
//! DstackApp initialisers set without events, and, when a contract comes back to known code after
//! unknown code ran, which held allow-list entries its storage still has → after the follower's
//! commit, the rows are applied and the snapshot published. At start-up the state is rebuilt from
//! the stored rows, and what a store written by an older release never observed is read at the
//! processed block ([`Projection::reconcile`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use alloy::primitives::{Address, B256, U256};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};

use super::ChainError;
use super::code::{CodeKind, KnownCode};
use super::contracts::{DstackApp, IMPLEMENTATION_SLOT};
use super::events::{self, AppFlags, Event, SetEntry};
use super::mirror::MirrorState;
use super::projection::{
    self, At, ChainReads, Discovered, Processed, Projection, SYNTHETIC_LOG_INDEX, Synthetic,
};
use super::store::StoredEvent;
use super::view::Mirror;

/// The projection's stored name.
pub const NAME: &str = "kms";

/// Chain reads of one batch's observations in flight at once.
const OBSERVATIONS_IN_FLIGHT: usize = 16;

/// DstackApp's storage slot holding the upgrades-disabled flag (byte 0) and `allowAnyDevice`
/// (byte 1), as in dstack's layout.
const UPGRADES_DISABLED_SLOT: u64 = 1;

/// The KMS mirror, fed by the follower.
pub struct KmsProjection {
    kms: Address,
    known: Arc<KnownCode>,
    state: Arc<MirrorState>,
    addresses: BTreeSet<Address>,
    mirror: Arc<Mirror>,
}

impl KmsProjection {
    /// The projection of `kms`, publishing into `mirror` and judging code with `mirror`'s known
    /// set.
    pub fn new(kms: Address, mirror: Arc<Mirror>) -> Self {
        let state = mirror.snapshot();
        Self {
            kms,
            known: state.known.clone(),
            addresses: addresses_of(&state),
            state,
            mirror,
        }
    }

    fn decoded<'a>(&self, rows: &'a [StoredEvent]) -> Vec<(&'a StoredEvent, Event)> {
        rows.iter()
            .filter_map(|s| Some((s, decode_stored(self.kms, s)?)))
            .collect()
    }
}

impl Projection for KmsProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn identity(&self) -> Vec<u8> {
        self.kms.to_vec()
    }

    fn addresses(&self) -> BTreeSet<Address> {
        self.addresses.clone()
    }

    fn decode(&self, emitter: Address, topics: &[B256], data: &[u8]) -> Option<&'static str> {
        events::decode(self.kms, emitter, topics, data).map(|e| e.kind())
    }

    fn discover(&self, rows: &[StoredEvent]) -> Vec<Discovered> {
        let decoded = self.decoded(rows);
        let factory: BTreeSet<Address> = decoded
            .iter()
            .filter_map(|(_, e)| match e {
                Event::AppDeployedViaFactory(a) => Some(*a),
                _ => None,
            })
            .collect();
        let found: BTreeSet<Address> = decoded
            .iter()
            .filter_map(|(_, e)| e.discovered_app())
            .filter(|a| !self.addresses.contains(a))
            .collect();
        found
            .into_iter()
            .map(|address| Discovered {
                address,
                history: !factory.contains(&address),
            })
            .collect()
    }

    fn complete<'a>(
        &'a self,
        reads: &'a ChainReads,
        rows: &'a [StoredEvent],
        last: At,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, ChainError>> {
        Box::pin(async move {
            let (kms, state) = (self.kms, &*self.state);
            let rows = self.decoded(rows);
            let new_apps: BTreeSet<Address> = rows
                .iter()
                .filter_map(|(_, e)| e.discovered_app())
                .filter(|a| !self.addresses.contains(a))
                .collect();
            // What events cannot tell, read at the block of each trigger: the KMS contract's code
            // (until it is seen), the code of each new app where it was registered, of every
            // implementation an upgrade names, and the flags initialisers set silently.
            let mut first_seen: Vec<(Address, u64, B256)> = Vec::new();
            if !state.code.contains_key(&kms) {
                first_seen.push((kms, last.number, last.hash));
            }
            // An app registered before it had code is identified at its first log.
            for (s, _) in &rows {
                if s.address != kms
                    && self.addresses.contains(&s.address)
                    && !state.code.contains_key(&s.address)
                    && !first_seen.iter().any(|(a, ..)| *a == s.address)
                {
                    first_seen.push((s.address, s.block_number, s.block_hash));
                }
            }
            for app in &new_apps {
                let (block, hash) = rows
                    .iter()
                    .find(|(_, e)| e.discovered_app() == Some(*app))
                    .map_or((last.number, last.hash), |(s, _)| {
                        (s.block_number, s.block_hash)
                    });
                first_seen.push((*app, block, hash));
            }
            let observed = observe(reads, state, &rows, &first_seen).await?;
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
            let s = &*self.state;
            let block = at.number;
            let unidentified = |a: &Address| !s.code.contains_key(a);
            let mut first_seen: Vec<(Address, u64, B256)> = std::iter::once(s.kms_address)
                .chain(
                    s.registered_apps
                        .iter()
                        .copied()
                        .filter(|a| s.apps.get(a).is_some_and(|p| p.has_code)),
                )
                .filter(unidentified)
                .map(|a| (a, block, at.hash))
                .collect();
            first_seen.sort();
            // Apps already identified whose flags were never read, and implementations never
            // identified, are treated like an upgrade at this block.
            let mut pseudo: Vec<Event> = Vec::new();
            if let Some(imp) = s.kms.implementation.filter(|i| unidentified(i)) {
                pseudo.push(Event::Upgraded(s.kms_address, imp));
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
                    pseudo.push(Event::Upgraded(*a, imp));
                } else if !p.flags_observed {
                    pseudo.push(Event::Initialized(*a));
                }
            }
            if first_seen.is_empty() && pseudo.is_empty() {
                return Ok(Vec::new());
            }
            let trigger = StoredEvent {
                block_number: block,
                log_index: 0,
                block_hash: at.hash,
                address: Address::ZERO,
                kind: String::new(),
                topics: Vec::new(),
                data: Vec::new(),
            };
            let rows: Vec<(&StoredEvent, Event)> =
                pseudo.into_iter().map(|e| (&trigger, e)).collect();
            let observed = observe(reads, s, &rows, &first_seen).await?;
            let synthetic = synthetic_rows(observed, projection::synthetic_base(stored, block));
            tracing::info!(
                block,
                rows = synthetic.len(),
                "chain mirror: code and flags of contracts observed by an older release read at the processed block"
            );
            Ok(synthetic)
        })
    }

    fn apply(&mut self, rows: &[StoredEvent], processed: Processed) {
        let mut next = (*self.state).clone();
        for (row, e) in rows
            .iter()
            .filter_map(|s| Some((s, decode_stored(self.kms, s)?)))
        {
            if let Some(app) = e.discovered_app() {
                self.addresses.insert(app);
            }
            if let Some((kind, value)) = e.registered_measurement() {
                tracing::info!(
                    kind,
                    contract = %row.address,
                    value = %value,
                    block = row.block_number,
                    "measurement registered"
                );
                self.mirror.metrics().measurement_registered(kind);
            }
            next.apply(&e);
        }
        next.block = processed.number;
        self.state = Arc::new(next);
    }

    fn rebuild(&mut self, stored: &[StoredEvent], processed: Processed) {
        let mut state = rebuild_with(self.kms, self.known.clone(), stored);
        // Live calls are made at the processed block, which may hold no stored event.
        state.block = processed.number;
        self.addresses = addresses_of(&state);
        self.state = Arc::new(state);
    }

    fn publish(&self) {
        self.mirror.publish(self.state.clone());
    }
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

fn addresses_of(state: &MirrorState) -> BTreeSet<Address> {
    std::iter::once(state.kms_address)
        .chain(state.registered_apps.iter().copied())
        .collect()
}

/// A synthetic row to be written at `block` (whose hash is `hash`).
struct Observed {
    block: u64,
    hash: B256,
    event: Event,
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

/// The DstackApp flags initialisers set without events: the getters, and the upgrades-disabled
/// flag (no getter) from storage, as of `block`.
async fn app_flags(reads: &ChainReads, app: Address, block: u64) -> Result<AppFlags, ChainError> {
    let (allow_any_device, require_tcb_up_to_date, slot) = tokio::try_join!(
        reads.flag(app, DstackApp::allowAnyDeviceCall {}, block),
        reads.flag(app, DstackApp::requireTcbUpToDateCall {}, block),
        reads.storage(app, U256::from(UPGRADES_DISABLED_SLOT), block),
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
    reads: &ChainReads,
    at: Address,
    block: u64,
    identified: &HashSet<Address>,
) -> Result<Vec<Event>, ChainError> {
    let Some(id) = reads.code_id(at, block).await? else {
        return Ok(Vec::new());
    };
    let slot = reads.storage(at, IMPLEMENTATION_SLOT.into(), block).await?;
    let imp = Address::from_word(B256::from(slot));
    let mut out = vec![
        Event::CodeIdentity(at, id),
        Event::ImplementationObserved(at, imp),
    ];
    if !imp.is_zero()
        && !identified.contains(&imp)
        && let Some(imp_id) = reads.code_id(imp, block).await?
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
    reads: &ChainReads,
    state: &MirrorState,
    rows: &[(&StoredEvent, Event)],
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
                Job::Contract(a) => observe_contract(reads, a, block, identified).await?,
                Job::Code(a) => reads
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
    let mut flag_reads = Vec::new();
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
            flag_reads.extend(
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
    let flags: Vec<Observed> = futures::stream::iter(flag_reads)
        .map(|(app, block, hash)| async move {
            Ok::<_, ChainError>(Observed {
                block,
                hash,
                event: Event::FlagsObserved(app, app_flags(reads, app, block).await?),
            })
        })
        .buffered(OBSERVATIONS_IN_FLIGHT)
        .try_collect()
        .await?;
    let checked: Vec<(Address, SetEntry, u64, B256, bool)> = futures::stream::iter(checks)
        .map(|(a, entry, block, hash)| async move {
            let held = entry_held(reads, a, entry, block).await?;
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
    reads: &ChainReads,
    contract: Address,
    entry: SetEntry,
    block: u64,
) -> Result<bool, ChainError> {
    use super::contracts::DstackKms as K;
    match entry {
        SetEntry::ComposeHash(v) => {
            reads
                .flag(contract, DstackApp::allowedComposeHashesCall(v), block)
                .await
        }
        SetEntry::Device(v) => {
            reads
                .flag(contract, DstackApp::allowedDeviceIdsCall(v), block)
                .await
        }
        SetEntry::OsImage(v) => reads.flag(contract, K::allowedOsImagesCall(v), block).await,
        SetEntry::AggregatedMr(v) => {
            reads
                .flag(contract, K::kmsAllowedAggregatedMrsCall(v), block)
                .await
        }
        SetEntry::KmsDevice(v) => {
            reads
                .flag(contract, K::kmsAllowedDeviceIdsCall(v), block)
                .await
        }
        SetEntry::RegisteredApp(a) => reads.flag(contract, K::registeredAppsCall(a), block).await,
    }
}

/// The allow-set entries the mirror holds for `contract` at the end of `block`, as far as the
/// stored state and the batch's additions up to that block tell (a superset is fine: each is
/// checked against storage).
fn held_entries(
    state: &MirrorState,
    rows: &[(&StoredEvent, Event)],
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
fn synthetic_rows(observed: Vec<Observed>, base: u64) -> Vec<StoredEvent> {
    projection::synthetic_rows(
        observed.into_iter().filter_map(|o| {
            let data = o.event.synthetic_data()?;
            let address = match &o.event {
                Event::CodeObserved(a)
                | Event::CodeIdentity(a, _)
                | Event::ImplementationObserved(a, _)
                | Event::FlagsObserved(a, _)
                | Event::EntriesAbsent(a, _) => *a,
                _ => return None,
            };
            Some(Synthetic {
                block: o.block,
                hash: o.hash,
                address,
                kind: o.event.kind(),
                data,
            })
        }),
        base,
    )
}
