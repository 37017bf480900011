//! Typed events of DstackKms and DstackApp, decoded from raw logs.
//!
//! Flow: the follower fetches logs of the KMS and of every known app for the KMS projection; [`decode`] looks at topic0
//! and the emitting address (KMS-only events count only when the KMS emitted them, app events only
//! when an app did) and yields an [`Event`] the mirror applies. Unknown topics, and known topics
//! from the wrong emitter, yield `None`. The follower stores raw logs and re-decodes them on start-up,
//! so adding a variant here never needs a data migration.

use alloy::primitives::{Address, B256, Bytes};
use alloy::sol_types::SolEvent;

use super::code::CodeId;
use super::contracts::{DstackApp as A, DstackKms as K};

/// The pre-April-2025 name of `GatewayAppIdSet`, absent from the current ABI.
#[allow(missing_docs)]
mod legacy {
    alloy::sol! {
        event TProxyAppIdSet(string tproxyAppId);
    }
}

/// What happened, as far as the mirror is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `AppRegistered(appId)` from the KMS.
    AppRegistered(Address),
    /// `AppDeployedViaFactory(appId, deployer)` from the KMS: the app is a proxy of the KMS's app
    /// implementation, so it has code.
    AppDeployedViaFactory(Address),
    /// `KmsInfoSet(k256Pubkey)`.
    KmsInfoSet(Bytes),
    /// `KmsAggregatedMrAdded` / `KmsAggregatedMrRemoved` (true = added).
    KmsAggregatedMr(B256, bool),
    /// `KmsDeviceAdded` / `KmsDeviceRemoved`.
    KmsDevice(B256, bool),
    /// `OsImageHashAdded` / `OsImageHashRemoved`.
    OsImage(B256, bool),
    /// `GatewayAppIdSet(string)` or its older name `TProxyAppIdSet(string)`.
    GatewayAppIdSet(String),
    /// `AppImplementationSet(address)`.
    AppImplementationSet(Address),
    /// `ComposeHashAdded` / `ComposeHashRemoved` from an app.
    ComposeHash(Address, B256, bool),
    /// `DeviceAdded` / `DeviceRemoved` from an app.
    Device(Address, B256, bool),
    /// `AllowAnyDeviceSet(bool)` from an app.
    AllowAnyDevice(Address, bool),
    /// `RequireTcbUpToDateSet(bool)` from an app.
    RequireTcbUpToDate(Address, bool),
    /// `UpgradesDisabled()` from an app.
    UpgradesDisabled(Address),
    /// `Upgraded(implementation)` from the KMS or an app (the emitter).
    Upgraded(Address, Address),
    /// `OwnershipTransferStarted(previous, new)`: emitter, new pending owner.
    OwnershipTransferStarted(Address, Address),
    /// `OwnershipTransferred(previous, new)`: emitter, new owner (pending owner cleared).
    OwnershipTransferred(Address, Address),
    /// `PolicyChanged(actor, policy, value, enabled)`: emitter, policy id, value, enabled. Applied
    /// idempotently next to the typed event it duplicates.
    PolicyChanged(Address, B256, B256, bool),
    /// `Initialized(version)` from an app or the KMS: an initialiser ran, and may have set flags
    /// without events, so the follower reads them again.
    Initialized(Address),
    /// Not a log: the follower saw code at this app address with `eth_getCode` (an app registered
    /// with `registerApp` that has emitted nothing yet). Stored as a synthetic row by releases
    /// before code identities; still read.
    CodeObserved(Address),
    /// Not a log: the identity of the code at an address (an app, the KMS, or an implementation),
    /// read with `eth_getCode` at the row's block.
    CodeIdentity(Address, CodeId),
    /// Not a log: a proxy's ERC-1967 implementation slot as read at the row's block (zero: not a
    /// proxy).
    ImplementationObserved(Address, Address),
    /// Not a log: an app's flags as read from the chain at the row's block (initialisers set them
    /// without events).
    FlagsObserved(Address, AppFlags),
    /// Not a log: entries the mirror held for a contract that its storage no longer holds at the
    /// row's block, found when the contract came back to known code after unknown code ran (that
    /// code may have written storage without events).
    EntriesAbsent(Address, Vec<SetEntry>),
}

/// One entry of an allow-set of the KMS contract or an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetEntry {
    /// App `allowedComposeHashes`.
    ComposeHash(B256),
    /// App `allowedDeviceIds`.
    Device(B256),
    /// KMS `allowedOsImages`.
    OsImage(B256),
    /// KMS `kmsAllowedAggregatedMrs`.
    AggregatedMr(B256),
    /// KMS `kmsAllowedDeviceIds`.
    KmsDevice(B256),
    /// KMS `registeredApps`.
    RegisteredApp(Address),
}

impl SetEntry {
    fn tag(&self) -> (u8, B256) {
        match self {
            Self::ComposeHash(v) => (0, *v),
            Self::Device(v) => (1, *v),
            Self::OsImage(v) => (2, *v),
            Self::AggregatedMr(v) => (3, *v),
            Self::KmsDevice(v) => (4, *v),
            Self::RegisteredApp(a) => (5, a.into_word()),
        }
    }

    fn from_tag(tag: u8, v: B256) -> Option<Self> {
        Some(match tag {
            0 => Self::ComposeHash(v),
            1 => Self::Device(v),
            2 => Self::OsImage(v),
            3 => Self::AggregatedMr(v),
            4 => Self::KmsDevice(v),
            5 => Self::RegisteredApp(Address::from_word(v)),
            _ => return None,
        })
    }
}

/// The DstackApp flags an initialiser sets without events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AppFlags {
    /// `allowAnyDevice()`.
    pub allow_any_device: bool,
    /// `requireTcbUpToDate()`.
    pub require_tcb_up_to_date: bool,
    /// The private upgrades-disabled flag (storage slot 1, byte 0).
    pub upgrades_disabled: bool,
}

impl Event {
    /// Stable name stored next to the raw log (for operators reading the table) and used to
    /// recognise synthetic rows.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AppRegistered(_) => "AppRegistered",
            Self::AppDeployedViaFactory(_) => "AppDeployedViaFactory",
            Self::KmsInfoSet(_) => "KmsInfoSet",
            Self::KmsAggregatedMr(..) => "KmsAggregatedMr",
            Self::KmsDevice(..) => "KmsDevice",
            Self::OsImage(..) => "OsImage",
            Self::GatewayAppIdSet(_) => "GatewayAppIdSet",
            Self::AppImplementationSet(_) => "AppImplementationSet",
            Self::ComposeHash(..) => "ComposeHash",
            Self::Device(..) => "Device",
            Self::AllowAnyDevice(..) => "AllowAnyDevice",
            Self::RequireTcbUpToDate(..) => "RequireTcbUpToDate",
            Self::UpgradesDisabled(_) => "UpgradesDisabled",
            Self::Upgraded(..) => "Upgraded",
            Self::OwnershipTransferStarted(..) => "OwnershipTransferStarted",
            Self::OwnershipTransferred(..) => "OwnershipTransferred",
            Self::PolicyChanged(..) => "PolicyChanged",
            Self::Initialized(_) => "Initialized",
            Self::CodeObserved(_) => CODE_OBSERVED,
            Self::CodeIdentity(..) => CODE_IDENTITY,
            Self::ImplementationObserved(..) => IMPLEMENTATION_OBSERVED,
            Self::FlagsObserved(..) => FLAGS_OBSERVED,
            Self::EntriesAbsent(..) => ENTRIES_ABSENT,
        }
    }

    /// The raw data of a synthetic row (`None` for events that are logs).
    pub fn synthetic_data(&self) -> Option<Vec<u8>> {
        match self {
            Self::CodeObserved(_) => Some(Vec::new()),
            Self::CodeIdentity(_, id) => Some(id.encode()),
            Self::ImplementationObserved(_, imp) => Some(imp.to_vec()),
            Self::FlagsObserved(_, f) => Some(vec![
                u8::from(f.allow_any_device),
                u8::from(f.require_tcb_up_to_date),
                u8::from(f.upgrades_disabled),
            ]),
            Self::EntriesAbsent(_, entries) => Some(
                entries
                    .iter()
                    .flat_map(|e| {
                        let (tag, v) = e.tag();
                        std::iter::once(tag).chain(v.0)
                    })
                    .collect(),
            ),
            _ => None,
        }
    }

    /// Reads a synthetic row back; `None` for another kind or malformed data.
    pub fn from_synthetic(kind: &str, address: Address, data: &[u8]) -> Option<Self> {
        Some(match kind {
            CODE_OBSERVED => Self::CodeObserved(address),
            CODE_IDENTITY => Self::CodeIdentity(address, CodeId::decode(data)?),
            IMPLEMENTATION_OBSERVED => {
                Self::ImplementationObserved(address, Address::try_from(data).ok()?)
            }
            FLAGS_OBSERVED => match data {
                &[a, t, u] if a <= 1 && t <= 1 && u <= 1 => Self::FlagsObserved(
                    address,
                    AppFlags {
                        allow_any_device: a == 1,
                        require_tcb_up_to_date: t == 1,
                        upgrades_disabled: u == 1,
                    },
                ),
                _ => return None,
            },
            ENTRIES_ABSENT if data.len().is_multiple_of(33) => Self::EntriesAbsent(
                address,
                data.chunks_exact(33)
                    .map(|c| SetEntry::from_tag(c[0], B256::from_slice(&c[1..])))
                    .collect::<Option<_>>()?,
            ),
            _ => return None,
        })
    }

    /// The app this event newly makes known, if any.
    pub fn discovered_app(&self) -> Option<Address> {
        match self {
            Self::AppRegistered(a) | Self::AppDeployedViaFactory(a) => Some(*a),
            _ => None,
        }
    }

    /// The measurement this event allows, if it allows one: its kind (one of
    /// [`MEASUREMENT_KINDS`]) and value.
    pub fn registered_measurement(&self) -> Option<(&'static str, B256)> {
        match *self {
            Self::KmsAggregatedMr(v, true) => Some(("kms_aggregated_mr", v)),
            Self::KmsDevice(v, true) => Some(("kms_device", v)),
            Self::OsImage(v, true) => Some(("os_image", v)),
            Self::ComposeHash(_, v, true) => Some(("compose_hash", v)),
            Self::Device(_, v, true) => Some(("device", v)),
            _ => None,
        }
    }
}

/// Every kind [`Event::registered_measurement`] names (a metric label's closed set).
pub const MEASUREMENT_KINDS: [&str; 5] = [
    "kms_aggregated_mr",
    "kms_device",
    "os_image",
    "compose_hash",
    "device",
];

/// Kind of the synthetic [`Event::CodeObserved`] row.
pub const CODE_OBSERVED: &str = "CodeObserved";
/// Kind of the synthetic [`Event::CodeIdentity`] row.
pub const CODE_IDENTITY: &str = "CodeIdentity";
/// Kind of the synthetic [`Event::ImplementationObserved`] row.
pub const IMPLEMENTATION_OBSERVED: &str = "ImplementationObserved";
/// Kind of the synthetic [`Event::FlagsObserved`] row.
pub const FLAGS_OBSERVED: &str = "FlagsObserved";
/// Kind of the synthetic [`Event::EntriesAbsent`] row.
pub const ENTRIES_ABSENT: &str = "EntriesAbsent";

/// Decodes one log emitted by `emitter` (`kms` is the watched DstackKms proxy; any other emitter
/// is an app). `None` for topics the mirror does not use or a payload that does not decode.
pub fn decode(kms: Address, emitter: Address, topics: &[B256], data: &[u8]) -> Option<Event> {
    let topic0 = *topics.first()?;
    let from_kms = emitter == kms;
    macro_rules! ev {
        ($ty:ty) => {
            <$ty>::decode_raw_log(topics.iter().copied(), data).ok()?
        };
    }
    let event = match topic0 {
        // Events both contracts emit.
        K::Upgraded::SIGNATURE_HASH => Event::Upgraded(emitter, ev!(K::Upgraded).implementation),
        K::OwnershipTransferStarted::SIGNATURE_HASH => {
            Event::OwnershipTransferStarted(emitter, ev!(K::OwnershipTransferStarted).newOwner)
        }
        K::OwnershipTransferred::SIGNATURE_HASH => {
            Event::OwnershipTransferred(emitter, ev!(K::OwnershipTransferred).newOwner)
        }
        K::PolicyChanged::SIGNATURE_HASH => {
            let e = ev!(K::PolicyChanged);
            Event::PolicyChanged(emitter, e.policy, e.value, e.enabled)
        }
        K::Initialized::SIGNATURE_HASH => {
            let _ = ev!(K::Initialized);
            Event::Initialized(emitter)
        }
        // DstackKms only.
        t if from_kms => match t {
            K::AppRegistered::SIGNATURE_HASH => Event::AppRegistered(ev!(K::AppRegistered).appId),
            K::AppDeployedViaFactory::SIGNATURE_HASH => {
                Event::AppDeployedViaFactory(ev!(K::AppDeployedViaFactory).appId)
            }
            K::KmsInfoSet::SIGNATURE_HASH => Event::KmsInfoSet(ev!(K::KmsInfoSet).k256Pubkey),
            K::KmsAggregatedMrAdded::SIGNATURE_HASH => {
                Event::KmsAggregatedMr(ev!(K::KmsAggregatedMrAdded).mrAggregated, true)
            }
            K::KmsAggregatedMrRemoved::SIGNATURE_HASH => {
                Event::KmsAggregatedMr(ev!(K::KmsAggregatedMrRemoved).mrAggregated, false)
            }
            K::KmsDeviceAdded::SIGNATURE_HASH => {
                Event::KmsDevice(ev!(K::KmsDeviceAdded).deviceId, true)
            }
            K::KmsDeviceRemoved::SIGNATURE_HASH => {
                Event::KmsDevice(ev!(K::KmsDeviceRemoved).deviceId, false)
            }
            K::OsImageHashAdded::SIGNATURE_HASH => {
                Event::OsImage(ev!(K::OsImageHashAdded).osImageHash, true)
            }
            K::OsImageHashRemoved::SIGNATURE_HASH => {
                Event::OsImage(ev!(K::OsImageHashRemoved).osImageHash, false)
            }
            K::GatewayAppIdSet::SIGNATURE_HASH => {
                Event::GatewayAppIdSet(ev!(K::GatewayAppIdSet).gatewayAppId)
            }
            legacy::TProxyAppIdSet::SIGNATURE_HASH => {
                Event::GatewayAppIdSet(ev!(legacy::TProxyAppIdSet).tproxyAppId)
            }
            K::AppImplementationSet::SIGNATURE_HASH => {
                Event::AppImplementationSet(ev!(K::AppImplementationSet).implementation)
            }
            _ => return None,
        },
        // DstackApp only.
        A::ComposeHashAdded::SIGNATURE_HASH => {
            Event::ComposeHash(emitter, ev!(A::ComposeHashAdded).composeHash, true)
        }
        A::ComposeHashRemoved::SIGNATURE_HASH => {
            Event::ComposeHash(emitter, ev!(A::ComposeHashRemoved).composeHash, false)
        }
        A::DeviceAdded::SIGNATURE_HASH => {
            Event::Device(emitter, ev!(A::DeviceAdded).deviceId, true)
        }
        A::DeviceRemoved::SIGNATURE_HASH => {
            Event::Device(emitter, ev!(A::DeviceRemoved).deviceId, false)
        }
        A::AllowAnyDeviceSet::SIGNATURE_HASH => {
            Event::AllowAnyDevice(emitter, ev!(A::AllowAnyDeviceSet).allowAny)
        }
        A::RequireTcbUpToDateSet::SIGNATURE_HASH => {
            Event::RequireTcbUpToDate(emitter, ev!(A::RequireTcbUpToDateSet).requireUpToDate)
        }
        A::UpgradesDisabled::SIGNATURE_HASH => Event::UpgradesDisabled(emitter),
        _ => return None,
    };
    Some(event)
}

#[cfg(test)]
mod tests {
    use alloy::primitives::{address, b256};
    use alloy::sol_types::SolEvent;

    use super::*;

    const KMS: Address = address!("00000000000000000000000000000000000000aa");
    const APP: Address = address!("00000000000000000000000000000000000000bb");

    #[test]
    fn only_additions_register_a_measurement() {
        let v = B256::repeat_byte(7);
        assert_eq!(
            Event::ComposeHash(APP, v, true).registered_measurement(),
            Some(("compose_hash", v))
        );
        assert_eq!(
            Event::OsImage(v, true).registered_measurement(),
            Some(("os_image", v))
        );
        assert_eq!(
            Event::ComposeHash(APP, v, false).registered_measurement(),
            None
        );
        assert_eq!(Event::KmsDevice(v, false).registered_measurement(), None);
        assert_eq!(
            Event::AllowAnyDevice(APP, true).registered_measurement(),
            None
        );
    }

    fn raw<E: SolEvent>(e: &E) -> (Vec<B256>, Vec<u8>) {
        let data = e.encode_log_data();
        (data.topics().to_vec(), data.data.to_vec())
    }

    #[test]
    fn legacy_tproxy_topic_matches_spec_and_decodes_as_gateway_app_id() {
        assert_eq!(
            legacy::TProxyAppIdSet::SIGNATURE_HASH,
            b256!("fa71be58a57ccbf2fe4e110bc83aa1620e20ff2a30bed5ccac0f1975087906db")
        );
        let (t, d) = raw(&legacy::TProxyAppIdSet {
            tproxyAppId: "gw".into(),
        });
        assert_eq!(
            decode(KMS, KMS, &t, &d),
            Some(Event::GatewayAppIdSet("gw".into()))
        );
    }

    #[test]
    fn kms_only_events_from_an_app_are_ignored() {
        let (t, d) = raw(&K::AppRegistered { appId: APP });
        assert_eq!(decode(KMS, KMS, &t, &d), Some(Event::AppRegistered(APP)));
        assert_eq!(decode(KMS, APP, &t, &d), None);
        let (t, d) = raw(&K::OsImageHashAdded {
            osImageHash: B256::repeat_byte(1),
        });
        assert_eq!(decode(KMS, APP, &t, &d), None);
    }

    #[test]
    fn shared_events_carry_their_emitter() {
        let (t, d) = raw(&A::OwnershipTransferStarted {
            previousOwner: KMS,
            newOwner: APP,
        });
        assert_eq!(
            decode(KMS, APP, &t, &d),
            Some(Event::OwnershipTransferStarted(APP, APP))
        );
        let (t, d) = raw(&A::ComposeHashRemoved {
            composeHash: B256::repeat_byte(7),
        });
        assert_eq!(
            decode(KMS, APP, &t, &d),
            Some(Event::ComposeHash(APP, B256::repeat_byte(7), false))
        );
    }

    #[test]
    fn synthetic_rows_round_trip() {
        let id = CodeId {
            hash: B256::repeat_byte(3),
            immutables: vec![10, 200],
        };
        let flags = AppFlags {
            allow_any_device: true,
            require_tcb_up_to_date: false,
            upgrades_disabled: true,
        };
        for e in [
            Event::CodeObserved(APP),
            Event::CodeIdentity(APP, id),
            Event::ImplementationObserved(APP, KMS),
            Event::FlagsObserved(APP, flags),
            Event::EntriesAbsent(
                APP,
                vec![
                    SetEntry::ComposeHash(B256::repeat_byte(1)),
                    SetEntry::RegisteredApp(KMS),
                ],
            ),
        ] {
            let data = e.synthetic_data().expect("synthetic");
            assert_eq!(Event::from_synthetic(e.kind(), APP, &data), Some(e));
        }
        assert_eq!(Event::from_synthetic(FLAGS_OBSERVED, APP, &[2, 0, 0]), None);
        assert_eq!(Event::from_synthetic("AppRegistered", APP, &[]), None);
        assert_eq!(Event::AppRegistered(APP).synthetic_data(), None);
    }

    #[test]
    fn unknown_topics_and_garbage_are_ignored() {
        assert_eq!(decode(KMS, KMS, &[B256::repeat_byte(9)], &[]), None);
        assert_eq!(decode(KMS, KMS, &[], &[]), None);
        // Right topic, truncated data.
        assert_eq!(
            decode(KMS, KMS, &[K::KmsInfoSet::SIGNATURE_HASH], &[1, 2]),
            None
        );
    }
}
