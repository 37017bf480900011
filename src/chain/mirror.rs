//! The in-memory mirror of DstackKms and its apps: what the contracts' state is after the events
//! seen so far.
//!
//! Flow: the follower rebuilds a [`MirrorState`] from the stored events on start-up (and after a
//! rewind), then [`MirrorState::apply`]s each committed batch and publishes a snapshot through
//! [`super::Mirror`]. Applying is pure (no I/O) and idempotent per event, so `PolicyChanged` can be
//! applied next to the typed event it duplicates.
//!
//! The mirror also tracks which code answers for the KMS contract and for each app (the proxy's
//! implementation, or the contract's own code) and whether that code is known
//! ([`super::code::KnownCode`]): [`MirrorState::kms_evaluation`] / [`MirrorState::app_evaluation`]
//! say whether a decision may be made locally or must be asked of the chain.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use alloy::primitives::{Address, B256, Bytes};
use serde::Serialize;

use super::code::{CodeId, CodeKind, Known, KnownCode};
use super::contracts::{policy, policy_label};
use super::events::{Event, SetEntry};

/// Where a contract's decisions come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Evaluation {
    /// From the mirror: the code that answers is known.
    Local,
    /// From `eth_call` on the chain: the code that answers is unknown, unobserved or custom.
    Live,
}

/// The identity of the code at an address, and what it is if known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CodeInfo {
    /// Its identity.
    pub id: CodeId,
    /// What it is, if it is in the known set.
    pub known: Option<Known>,
}

/// The code that answers for a contract: its own, or its implementation's when it is a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answering<'a> {
    /// Known code.
    Known(&'a Known, &'a CodeId),
    /// Code outside the known set (its identity, if observed).
    Unknown(Option<&'a CodeId>),
}

impl Answering<'_> {
    /// The known kind, if any.
    pub fn kind(&self) -> Option<CodeKind> {
        match self {
            Self::Known(k, _) => Some(k.kind),
            Self::Unknown(_) => None,
        }
    }

    /// The answering code's hash, if observed.
    pub fn hash(&self) -> Option<B256> {
        match self {
            Self::Known(_, id) | Self::Unknown(Some(id)) => Some(id.hash),
            Self::Unknown(None) => None,
        }
    }
}

/// Per-app policy of a DstackApp proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AppPolicy {
    /// Allowed compose hashes.
    pub compose_hashes: HashSet<B256>,
    /// Allowed device ids.
    pub devices: HashSet<B256>,
    /// Any device may run the app.
    pub allow_any_device: bool,
    /// The TCB status must be `UpToDate`.
    pub require_tcb_up_to_date: bool,
    /// `disableUpgrades()` was called.
    pub upgrades_disabled: bool,
    /// `owner()`.
    pub owner: Option<Address>,
    /// `pendingOwner()` during a two-step transfer.
    pub pending_owner: Option<Address>,
    /// The proxy's implementation (from `Upgraded`).
    pub implementation: Option<Address>,
    /// The address is known to hold code (it emitted a log, was deployed by the factory, or
    /// `eth_getCode` said so).
    pub has_code: bool,
    /// The flags were read from the chain (initialisers set them without events).
    pub flags_observed: bool,
}

/// The DstackKms's own state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KmsState {
    /// `kmsAllowedAggregatedMrs`.
    pub allowed_aggregated_mrs: HashSet<B256>,
    /// `kmsAllowedDeviceIds`.
    pub devices: HashSet<B256>,
    /// `allowedOsImages`.
    pub os_images: HashSet<B256>,
    /// `kmsInfo.k256Pubkey` (the quote and event log are set without events).
    pub k256_pubkey: Bytes,
    /// `gatewayAppId`.
    pub gateway_app_id: String,
    /// `appImplementation`.
    pub app_implementation: Option<Address>,
    /// `owner()`.
    pub owner: Option<Address>,
    /// `pendingOwner()`.
    pub pending_owner: Option<Address>,
    /// The proxy's implementation (from `Upgraded`).
    pub implementation: Option<Address>,
}

/// Everything the KMS path needs to answer `isKmsAllowed` / `isAppAllowed` locally.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MirrorState {
    /// The watched DstackKms proxy.
    pub kms_address: Address,
    /// The newest block applied (live calls are made at this block).
    pub block: u64,
    /// Code identities observed, by address (the KMS, apps and implementations).
    pub code: HashMap<Address, CodeInfo>,
    /// The code whose semantics the mirror reproduces.
    #[serde(skip)]
    pub known: Arc<KnownCode>,
    /// Its state.
    pub kms: KmsState,
    /// `registeredApps`.
    pub registered_apps: HashSet<Address>,
    /// Policy of every app that emitted an event or was registered, by address.
    pub apps: HashMap<Address, AppPolicy>,
}

/// Sizes of the mirror's sets, for metrics and status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MirrorSizes {
    /// Allowed aggregated MRs.
    pub allowed_aggregated_mrs: usize,
    /// Allowed KMS devices.
    pub kms_devices: usize,
    /// Allowed OS images.
    pub os_images: usize,
    /// Registered apps.
    pub registered_apps: usize,
    /// Compose hashes over all apps.
    pub compose_hashes: usize,
}

fn set<T: std::hash::Hash + Eq>(s: &mut HashSet<T>, item: T, present: bool) {
    if present {
        s.insert(item);
    } else {
        s.remove(&item);
    }
}

fn word_address(v: B256) -> Address {
    Address::from_word(v)
}

fn nonzero(a: Address) -> Option<Address> {
    (!a.is_zero()).then_some(a)
}

impl MirrorState {
    /// An empty mirror of the DstackKms at `kms_address` that knows only our own contracts.
    pub fn new(kms_address: Address) -> Self {
        Self::with_known(kms_address, Arc::new(KnownCode::builtin()))
    }

    /// An empty mirror of the DstackKms at `kms_address` that knows `known`.
    pub fn with_known(kms_address: Address, known: Arc<KnownCode>) -> Self {
        Self {
            kms_address,
            known,
            ..Self::default()
        }
    }

    /// The code that answers for `at`, whose proxy implementation (if any) is `implementation`.
    pub fn answering(&self, at: Address, implementation: Option<Address>) -> Answering<'_> {
        let info = |a: Address| self.code.get(&a);
        let Some(own) = info(at) else {
            return Answering::Unknown(None);
        };
        match &own.known {
            Some(k) if k.kind == CodeKind::Proxy => match implementation.and_then(info) {
                Some(CodeInfo { id, known: Some(k) }) => Answering::Known(k, id),
                Some(CodeInfo { id, known: None }) => Answering::Unknown(Some(id)),
                None => Answering::Unknown(None),
            },
            Some(k) => Answering::Known(k, &own.id),
            None => Answering::Unknown(Some(&own.id)),
        }
    }

    /// The code answering for the KMS contract.
    pub fn kms_answering(&self) -> Answering<'_> {
        self.answering(self.kms_address, self.kms.implementation)
    }

    /// The code answering for `app` (`None` if the mirror holds nothing for it).
    pub fn app_answering(&self, app: Address) -> Option<Answering<'_>> {
        let p = self.apps.get(&app)?;
        Some(self.answering(app, p.implementation))
    }

    /// Whether `isKmsAllowed` (and the KMS part of `isAppAllowed`) may be answered locally.
    pub fn kms_evaluation(&self) -> Evaluation {
        match self.kms_answering().kind() {
            Some(CodeKind::DstackKms) => Evaluation::Local,
            _ => Evaluation::Live,
        }
    }

    /// Whether `isAppAllowed` for `app` may be answered locally: the KMS code is known, and the
    /// app is unregistered or without code (the KMS refuses it itself) or answered by known
    /// DstackApp code.
    pub fn app_evaluation(&self, app: Address) -> Evaluation {
        if self.kms_evaluation() == Evaluation::Live {
            return Evaluation::Live;
        }
        if !self.registered_apps.contains(&app) {
            return Evaluation::Local;
        }
        match self.apps.get(&app) {
            Some(p) if p.has_code => match self.answering(app, p.implementation).kind() {
                Some(CodeKind::DstackApp) => Evaluation::Local,
                _ => Evaluation::Live,
            },
            _ => Evaluation::Local,
        }
    }

    /// Contracts whose decisions are asked of the chain: (KMS contract, registered apps).
    pub fn live_counts(&self) -> (usize, usize) {
        let kms = usize::from(self.kms_evaluation() == Evaluation::Live);
        let apps = self
            .registered_apps
            .iter()
            .filter(|a| self.app_evaluation(**a) == Evaluation::Live)
            .count();
        (kms, apps)
    }

    fn observe_code(&mut self, at: Address, id: &CodeId) {
        let known = self.known.classify(id).cloned();
        self.code.insert(
            at,
            CodeInfo {
                id: id.clone(),
                known,
            },
        );
        if let Some(app) = self.apps.get_mut(&at) {
            app.has_code = true;
        }
    }

    fn app(&mut self, a: Address) -> &mut AppPolicy {
        self.apps.entry(a).or_default()
    }

    fn register(&mut self, a: Address) {
        self.registered_apps.insert(a);
        self.app(a);
    }

    /// Applies one event.
    pub fn apply(&mut self, event: &Event) {
        let kms = self.kms_address;
        // Any log from an app proves it has code.
        if let Some(emitter) = emitter(event)
            && emitter != kms
        {
            self.app(emitter).has_code = true;
        }
        match event {
            Event::AppRegistered(a) => self.register(*a),
            Event::AppDeployedViaFactory(a) => {
                self.register(*a);
                self.app(*a).has_code = true;
            }
            Event::CodeObserved(a) => self.app(*a).has_code = true,
            Event::KmsInfoSet(k) => self.kms.k256_pubkey = k.clone(),
            Event::KmsAggregatedMr(v, on) => set(&mut self.kms.allowed_aggregated_mrs, *v, *on),
            Event::KmsDevice(v, on) => set(&mut self.kms.devices, *v, *on),
            Event::OsImage(v, on) => set(&mut self.kms.os_images, *v, *on),
            Event::GatewayAppIdSet(s) => self.kms.gateway_app_id.clone_from(s),
            Event::AppImplementationSet(a) => self.kms.app_implementation = nonzero(*a),
            Event::ComposeHash(app, v, on) => set(&mut self.app(*app).compose_hashes, *v, *on),
            Event::Device(app, v, on) => set(&mut self.app(*app).devices, *v, *on),
            Event::AllowAnyDevice(app, on) => self.app(*app).allow_any_device = *on,
            Event::RequireTcbUpToDate(app, on) => self.app(*app).require_tcb_up_to_date = *on,
            Event::UpgradesDisabled(app) => self.app(*app).upgrades_disabled = true,
            Event::Upgraded(e, imp) => {
                if *e == kms {
                    self.kms.implementation = Some(*imp);
                } else {
                    self.app(*e).implementation = Some(*imp);
                }
            }
            Event::OwnershipTransferStarted(e, new) => {
                if *e == kms {
                    self.kms.pending_owner = nonzero(*new);
                } else {
                    self.app(*e).pending_owner = nonzero(*new);
                }
            }
            Event::OwnershipTransferred(e, new) => {
                let (owner, pending) = if *e == kms {
                    (&mut self.kms.owner, &mut self.kms.pending_owner)
                } else {
                    let app = self.app(*e);
                    (&mut app.owner, &mut app.pending_owner)
                };
                *owner = nonzero(*new);
                *pending = None;
            }
            Event::PolicyChanged(e, id, value, enabled) => {
                self.apply_policy(*e, *id, *value, *enabled)
            }
            // The follower reads the flags again at this block (a `FlagsObserved` row).
            Event::Initialized(_) => {}
            Event::CodeIdentity(a, id) => self.observe_code(*a, id),
            Event::ImplementationObserved(e, imp) => {
                if *e == kms {
                    self.kms.implementation = nonzero(*imp);
                } else {
                    self.app(*e).implementation = nonzero(*imp);
                }
            }
            Event::FlagsObserved(app, f) => {
                let p = self.app(*app);
                p.allow_any_device = f.allow_any_device;
                p.require_tcb_up_to_date = f.require_tcb_up_to_date;
                p.upgrades_disabled = f.upgrades_disabled;
                p.flags_observed = true;
            }
            Event::EntriesAbsent(contract, entries) => {
                for entry in entries {
                    self.remove_entry(*contract, *entry);
                }
            }
        }
    }

    /// Every allow-set entry the mirror holds for `contract` (for checking them against storage).
    pub fn entries(&self, contract: Address) -> Vec<SetEntry> {
        if contract == self.kms_address {
            let k = &self.kms;
            let mut out: Vec<SetEntry> =
                k.os_images.iter().map(|v| SetEntry::OsImage(*v)).collect();
            out.extend(
                k.allowed_aggregated_mrs
                    .iter()
                    .map(|v| SetEntry::AggregatedMr(*v)),
            );
            out.extend(k.devices.iter().map(|v| SetEntry::KmsDevice(*v)));
            out.extend(
                self.registered_apps
                    .iter()
                    .map(|a| SetEntry::RegisteredApp(*a)),
            );
            out
        } else {
            self.apps.get(&contract).map_or_else(Vec::new, |p| {
                p.compose_hashes
                    .iter()
                    .map(|v| SetEntry::ComposeHash(*v))
                    .chain(p.devices.iter().map(|v| SetEntry::Device(*v)))
                    .collect()
            })
        }
    }

    fn remove_entry(&mut self, contract: Address, entry: SetEntry) {
        match entry {
            SetEntry::OsImage(v) => set(&mut self.kms.os_images, v, false),
            SetEntry::AggregatedMr(v) => set(&mut self.kms.allowed_aggregated_mrs, v, false),
            SetEntry::KmsDevice(v) => set(&mut self.kms.devices, v, false),
            SetEntry::RegisteredApp(a) => set(&mut self.registered_apps, a, false),
            SetEntry::ComposeHash(v) => set(&mut self.app(contract).compose_hashes, v, false),
            SetEntry::Device(v) => set(&mut self.app(contract).devices, v, false),
        }
    }

    /// `PolicyChanged` carries the same change as the typed event emitted next to it; applying it
    /// too keeps the mirror right if a deployment's typed event differs. Hash-only values
    /// (`kms-info`, `gateway-app-id`) cannot be applied and are left to the typed events.
    fn apply_policy(&mut self, emitter: Address, id: B256, value: B256, enabled: bool) {
        let Some(label) = policy_label(id) else {
            return;
        };
        let from_kms = emitter == self.kms_address;
        match (from_kms, label) {
            (true, policy::REGISTERED_APP) if enabled => self.register(word_address(value)),
            (true, policy::KMS_AGGREGATED_MR) => {
                set(&mut self.kms.allowed_aggregated_mrs, value, enabled)
            }
            (true, policy::KMS_DEVICE) => set(&mut self.kms.devices, value, enabled),
            (true, policy::OS_IMAGE) => set(&mut self.kms.os_images, value, enabled),
            (true, policy::APP_IMPLEMENTATION) => {
                self.kms.app_implementation = nonzero(word_address(value))
            }
            (true, policy::IMPLEMENTATION_UPGRADE) => {
                self.kms.implementation = Some(word_address(value))
            }
            (false, policy::COMPOSE_HASH) => {
                set(&mut self.app(emitter).compose_hashes, value, enabled)
            }
            (false, policy::DEVICE) => set(&mut self.app(emitter).devices, value, enabled),
            (false, policy::ALLOW_ANY_DEVICE) => self.app(emitter).allow_any_device = enabled,
            (false, policy::REQUIRE_TCB_UP_TO_DATE) => {
                self.app(emitter).require_tcb_up_to_date = enabled
            }
            (false, policy::UPGRADES_DISABLED) => self.app(emitter).upgrades_disabled = true,
            (false, policy::IMPLEMENTATION_UPGRADE) => {
                self.app(emitter).implementation = Some(word_address(value))
            }
            _ => {}
        }
    }

    /// Sizes of the sets, for metrics.
    pub fn sizes(&self) -> MirrorSizes {
        MirrorSizes {
            allowed_aggregated_mrs: self.kms.allowed_aggregated_mrs.len(),
            kms_devices: self.kms.devices.len(),
            os_images: self.kms.os_images.len(),
            registered_apps: self.registered_apps.len(),
            compose_hashes: self.apps.values().map(|a| a.compose_hashes.len()).sum(),
        }
    }
}

/// The contract that emitted `event`, for events that carry it.
fn emitter(event: &Event) -> Option<Address> {
    match event {
        Event::ComposeHash(e, ..)
        | Event::Device(e, ..)
        | Event::AllowAnyDevice(e, _)
        | Event::RequireTcbUpToDate(e, _)
        | Event::UpgradesDisabled(e)
        | Event::Upgraded(e, _)
        | Event::OwnershipTransferStarted(e, _)
        | Event::OwnershipTransferred(e, _)
        | Event::PolicyChanged(e, ..)
        | Event::Initialized(e) => Some(*e),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use alloy::primitives::address;

    use super::*;
    use crate::chain::contracts::policy_id;

    const KMS: Address = address!("00000000000000000000000000000000000000aa");
    const APP: Address = address!("00000000000000000000000000000000000000bb");
    const ALICE: Address = address!("00000000000000000000000000000000000000a1");

    #[test]
    fn adds_and_removes_are_reflected_and_idempotent() {
        let mut m = MirrorState::new(KMS);
        let h = B256::repeat_byte(1);
        for e in [
            Event::OsImage(h, true),
            Event::OsImage(h, true),
            Event::PolicyChanged(KMS, policy_id(policy::OS_IMAGE), h, true),
        ] {
            m.apply(&e);
        }
        assert_eq!(m.kms.os_images.len(), 1);
        m.apply(&Event::OsImage(h, false));
        assert!(m.kms.os_images.is_empty());
    }

    #[test]
    fn app_events_before_registration_are_kept() {
        let mut m = MirrorState::new(KMS);
        m.apply(&Event::ComposeHash(APP, B256::repeat_byte(2), true));
        assert!(m.registered_apps.is_empty());
        m.apply(&Event::AppRegistered(APP));
        assert!(m.registered_apps.contains(&APP));
        assert!(m.apps[&APP].has_code);
        assert_eq!(m.sizes().compose_hashes, 1);
    }

    #[test]
    fn two_step_ownership_tracks_pending_owner() {
        let mut m = MirrorState::new(KMS);
        m.apply(&Event::OwnershipTransferred(APP, KMS));
        m.apply(&Event::OwnershipTransferStarted(APP, ALICE));
        assert_eq!(m.apps[&APP].pending_owner, Some(ALICE));
        m.apply(&Event::OwnershipTransferred(APP, ALICE));
        assert_eq!(m.apps[&APP].owner, Some(ALICE));
        assert_eq!(m.apps[&APP].pending_owner, None);
        m.apply(&Event::OwnershipTransferred(KMS, Address::ZERO));
        assert_eq!(m.kms.owner, None);
    }

    /// The identity our own compiled contract of `kind` has wherever it is deployed.
    fn known_id(kind: CodeKind) -> CodeId {
        let known = KnownCode::builtin();
        let (_, hash, offsets) = known
            .entries()
            .into_iter()
            .find(|(k, ..)| k.kind == kind)
            .expect("builtin entry");
        CodeId {
            hash,
            immutables: offsets.to_vec(),
        }
    }

    const KMS_IMPL: Address = address!("00000000000000000000000000000000000000c1");
    const APP_IMPL: Address = address!("00000000000000000000000000000000000000c2");
    const OTHER_IMPL: Address = address!("00000000000000000000000000000000000000c3");

    /// A KMS and an app, both proxies of our own implementations.
    fn known_mirror() -> MirrorState {
        let mut m = MirrorState::new(KMS);
        for e in [
            Event::CodeIdentity(KMS, known_id(CodeKind::Proxy)),
            Event::ImplementationObserved(KMS, KMS_IMPL),
            Event::CodeIdentity(KMS_IMPL, known_id(CodeKind::DstackKms)),
            Event::AppDeployedViaFactory(APP),
            Event::CodeIdentity(APP, known_id(CodeKind::Proxy)),
            Event::Upgraded(APP, APP_IMPL),
            Event::CodeIdentity(APP_IMPL, known_id(CodeKind::DstackApp)),
        ] {
            m.apply(&e);
        }
        m
    }

    #[test]
    fn known_code_is_evaluated_locally() {
        let m = known_mirror();
        assert_eq!(m.kms_evaluation(), Evaluation::Local);
        assert_eq!(m.app_evaluation(APP), Evaluation::Local);
        // Unregistered, or registered without code: the KMS refuses those itself.
        assert_eq!(m.app_evaluation(ALICE), Evaluation::Local);
        assert_eq!(m.live_counts(), (0, 0));
    }

    #[test]
    fn an_upgrade_to_unknown_code_goes_live_and_back() {
        let mut m = known_mirror();
        let unknown = CodeId {
            hash: B256::repeat_byte(9),
            immutables: Vec::new(),
        };
        m.apply(&Event::CodeIdentity(OTHER_IMPL, unknown));
        m.apply(&Event::Upgraded(APP, OTHER_IMPL));
        assert_eq!(m.app_evaluation(APP), Evaluation::Live);
        assert_eq!(
            m.app_answering(APP).and_then(|a| a.hash()),
            Some(B256::repeat_byte(9))
        );
        m.apply(&Event::PolicyChanged(
            APP,
            policy_id(policy::IMPLEMENTATION_UPGRADE),
            APP_IMPL.into_word(),
            true,
        ));
        assert_eq!(m.app_evaluation(APP), Evaluation::Local);
        // An implementation whose code was never observed is not trusted either.
        m.apply(&Event::Upgraded(APP, ALICE));
        assert_eq!(m.app_evaluation(APP), Evaluation::Live);
    }

    #[test]
    fn unknown_kms_code_or_an_unknown_proxy_sends_everything_live() {
        let mut m = known_mirror();
        m.apply(&Event::Upgraded(KMS, APP_IMPL));
        assert_eq!(m.kms_evaluation(), Evaluation::Live);
        assert_eq!(m.app_evaluation(APP), Evaluation::Live);
        assert_eq!(m.app_evaluation(ALICE), Evaluation::Live);
        assert_eq!(m.live_counts(), (1, 1));

        // A custom contract that stores a known implementation in the proxy slot is still its
        // own (unknown) code.
        let mut m = known_mirror();
        m.apply(&Event::CodeIdentity(
            APP,
            CodeId {
                hash: B256::repeat_byte(5),
                immutables: Vec::new(),
            },
        ));
        assert_eq!(m.app_evaluation(APP), Evaluation::Live);
    }

    #[test]
    fn observed_flags_override_what_events_said() {
        let mut m = known_mirror();
        m.apply(&Event::FlagsObserved(
            APP,
            crate::chain::events::AppFlags {
                allow_any_device: true,
                require_tcb_up_to_date: true,
                upgrades_disabled: true,
            },
        ));
        let p = &m.apps[&APP];
        assert!(p.allow_any_device && p.require_tcb_up_to_date && p.upgrades_disabled);
        assert!(p.flags_observed);
        m.apply(&Event::RequireTcbUpToDate(APP, false));
        assert!(!m.apps[&APP].require_tcb_up_to_date);
    }

    #[test]
    fn registered_app_policy_registers_without_code() {
        let mut m = MirrorState::new(KMS);
        m.apply(&Event::PolicyChanged(
            KMS,
            policy_id(policy::REGISTERED_APP),
            APP.into_word(),
            true,
        ));
        assert!(m.registered_apps.contains(&APP));
        assert!(!m.apps[&APP].has_code);
    }
}
