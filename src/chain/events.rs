//! Typed events of DstackKms and DstackApp, decoded from raw logs.
//!
//! Flow: the sync engine fetches logs of the KMS and of every known app; [`decode`] looks at topic0
//! and the emitting address (KMS-only events count only when the KMS emitted them, app events only
//! when an app did) and yields an [`Event`] the mirror applies. Unknown topics, and known topics
//! from the wrong emitter, yield `None`. The engine stores raw logs and re-decodes them on start-up,
//! so adding a variant here never needs a data migration.

use alloy::primitives::{Address, B256, Bytes};
use alloy::sol_types::SolEvent;

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
    /// Not a log: the engine saw code at this app address with `eth_getCode` (an app registered
    /// with `registerApp` that has emitted nothing yet). Stored as a synthetic row.
    CodeObserved(Address),
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
            Self::CodeObserved(_) => CODE_OBSERVED,
        }
    }

    /// The app this event newly makes known, if any.
    pub fn discovered_app(&self) -> Option<Address> {
        match self {
            Self::AppRegistered(a) | Self::AppDeployedViaFactory(a) => Some(*a),
            _ => None,
        }
    }
}

/// Kind of the synthetic [`Event::CodeObserved`] row.
pub const CODE_OBSERVED: &str = "CodeObserved";

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
