//! Typed events of the governance side: Safe (1.3.0 and 1.4.1 layouts), TimelockController, the
//! ownership of DstackKms and its apps, and the rows the watcher adds itself.
//!
//! Flow: the follower hands the governance projection the logs of the contracts it watches →
//! [`decode`] reads topic0 (the Safe's fields are read from the topics when indexed, as 1.4.1 does,
//! or from the data, as 1.3.0 does) → [`GovEvent`] → applied by [`super::state`]. Synthetic rows
//! (what the chain was asked, at the block of their trigger) are JSON in the row's data and come
//! back through [`GovEvent::from_synthetic`]. Pure.

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::sol_types::SolEvent;
use serde::{Deserialize, Serialize};

use crate::chain::contracts::{SafeL2 as S, TimelockController as T};
use crate::chain::events::{self as kms_events, Event as KmsEvent};

/// What the chain said a contract is, when the watcher first met it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ContractKind {
    /// No code: an externally owned account (or nothing at all).
    Eoa,
    /// A Safe (answers `VERSION()` and `getOwners()`).
    Safe {
        /// `VERSION()`.
        version: String,
        /// `getOwners()`.
        owners: Vec<Address>,
        /// `getThreshold()`.
        threshold: u64,
        /// `nonce()`.
        nonce: u64,
        /// Enabled modules (`getModulesPaginated`).
        modules: Vec<Address>,
        /// The transaction guard (storage).
        guard: Address,
        /// The fallback handler (storage).
        fallback_handler: Address,
    },
    /// A TimelockController (answers `getMinDelay()`).
    Timelock {
        /// `getMinDelay()`, in seconds.
        min_delay: u64,
    },
    /// Code that is neither.
    Contract,
}

/// A governance event, or a synthetic observation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum GovEvent {
    /// An app the KMS registered (the watcher follows its ownership).
    AppRegistered {
        app: Address,
        factory: bool,
    },
    OwnershipTransferStarted {
        contract: Address,
        pending: Address,
    },
    OwnershipTransferred {
        contract: Address,
        owner: Address,
    },
    SafeSetup {
        safe: Address,
        owners: Vec<Address>,
        threshold: u64,
    },
    AddedOwner {
        safe: Address,
        owner: Address,
    },
    RemovedOwner {
        safe: Address,
        owner: Address,
    },
    ChangedThreshold {
        safe: Address,
        threshold: u64,
    },
    EnabledModule {
        safe: Address,
        module: Address,
    },
    DisabledModule {
        safe: Address,
        module: Address,
    },
    ChangedGuard {
        safe: Address,
        guard: Address,
    },
    ChangedFallbackHandler {
        safe: Address,
        handler: Address,
    },
    ApproveHash {
        safe: Address,
        hash: B256,
        owner: Address,
    },
    /// SafeL2's record of an executed transaction, before its outcome.
    SafeMultiSigTransaction {
        safe: Address,
        to: Address,
        value: U256,
        data: Bytes,
        operation: u8,
        signatures: Bytes,
        nonce: u64,
    },
    ExecutionSuccess {
        safe: Address,
        hash: B256,
    },
    ExecutionFailure {
        safe: Address,
        hash: B256,
    },
    SafeModuleTransaction {
        safe: Address,
        module: Address,
        to: Address,
    },
    CallScheduled {
        timelock: Address,
        id: B256,
        index: u64,
        target: Address,
        value: U256,
        data: Bytes,
        delay: u64,
    },
    CallExecuted {
        timelock: Address,
        id: B256,
        index: u64,
    },
    Cancelled {
        timelock: Address,
        id: B256,
    },
    MinDelayChange {
        timelock: Address,
        delay: u64,
    },
    RoleGranted {
        timelock: Address,
        role: B256,
        account: Address,
    },
    RoleRevoked {
        timelock: Address,
        role: B256,
        account: Address,
    },
    /// Synthetic: what a contract is, as read at the row's block.
    Observed {
        address: Address,
        kind: ContractKind,
    },
    /// Synthetic: when a scheduled timelock operation becomes ready (`getTimestamp`).
    OperationReady {
        timelock: Address,
        id: B256,
        at: u64,
    },
    /// Synthetic: the timestamp of a block in which `safe`'s owners signed (approved a hash or
    /// executed), for signer participation by time.
    BlockTime {
        safe: Address,
        at: u64,
    },
}

/// Kind of the synthetic [`GovEvent::Observed`] row.
pub const OBSERVED: &str = "GovernanceObserved";
/// Kind of the synthetic [`GovEvent::OperationReady`] row.
pub const OPERATION_READY: &str = "OperationReady";
/// Kind of the synthetic [`GovEvent::BlockTime`] row.
pub const BLOCK_TIME: &str = "BlockTime";

#[derive(Serialize, Deserialize)]
struct ReadyRow {
    id: B256,
    at: u64,
}

fn u64_of(v: U256) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// The address a 1.4.1 Safe event indexes (topic 1) and 1.3.0 puts in its data (word 0).
fn address_arg(topics: &[B256], data: &[u8]) -> Option<Address> {
    match topics.get(1) {
        Some(t) => Some(Address::from_word(*t)),
        None => data
            .get(..32)
            .map(|w| Address::from_word(B256::from_slice(w))),
    }
}

/// The hash 1.4.1 indexes (topic 1) and 1.3.0 puts in its data (word 0).
fn hash_arg(topics: &[B256], data: &[u8]) -> Option<B256> {
    match topics.get(1) {
        Some(t) => Some(*t),
        None => data.get(..32).map(B256::from_slice),
    }
}

/// Decodes one log of `emitter` (`kms`: the watched DstackKms). `None` for logs the governance
/// side does not use or that do not decode.
pub fn decode(kms: Address, emitter: Address, topics: &[B256], data: &[u8]) -> Option<GovEvent> {
    let topic0 = *topics.first()?;
    macro_rules! ev {
        ($ty:ty) => {
            <$ty>::decode_raw_log(topics.iter().copied(), data).ok()?
        };
    }
    let e = match topic0 {
        S::SafeSetup::SIGNATURE_HASH => {
            // `initiator` is indexed in both layouts.
            let e = ev!(S::SafeSetup);
            GovEvent::SafeSetup {
                safe: emitter,
                owners: e.owners,
                threshold: u64_of(e.threshold),
            }
        }
        S::AddedOwner::SIGNATURE_HASH => GovEvent::AddedOwner {
            safe: emitter,
            owner: address_arg(topics, data)?,
        },
        S::RemovedOwner::SIGNATURE_HASH => GovEvent::RemovedOwner {
            safe: emitter,
            owner: address_arg(topics, data)?,
        },
        S::ChangedThreshold::SIGNATURE_HASH => GovEvent::ChangedThreshold {
            safe: emitter,
            threshold: u64_of(ev!(S::ChangedThreshold).threshold),
        },
        S::EnabledModule::SIGNATURE_HASH => GovEvent::EnabledModule {
            safe: emitter,
            module: address_arg(topics, data)?,
        },
        S::DisabledModule::SIGNATURE_HASH => GovEvent::DisabledModule {
            safe: emitter,
            module: address_arg(topics, data)?,
        },
        S::ChangedGuard::SIGNATURE_HASH => GovEvent::ChangedGuard {
            safe: emitter,
            guard: address_arg(topics, data)?,
        },
        S::ChangedFallbackHandler::SIGNATURE_HASH => GovEvent::ChangedFallbackHandler {
            safe: emitter,
            handler: address_arg(topics, data)?,
        },
        S::ApproveHash::SIGNATURE_HASH => {
            let e = ev!(S::ApproveHash);
            GovEvent::ApproveHash {
                safe: emitter,
                hash: e.approvedHash,
                owner: e.owner,
            }
        }
        S::SafeMultiSigTransaction::SIGNATURE_HASH => {
            let e = ev!(S::SafeMultiSigTransaction);
            // additionalInfo = abi.encode(nonce, sender, threshold)
            let nonce = e.additionalInfo.get(..32).map(U256::from_be_slice)?;
            GovEvent::SafeMultiSigTransaction {
                safe: emitter,
                to: e.to,
                value: e.value,
                data: e.data,
                operation: e.operation,
                signatures: e.signatures,
                nonce: u64_of(nonce),
            }
        }
        S::ExecutionSuccess::SIGNATURE_HASH => GovEvent::ExecutionSuccess {
            safe: emitter,
            hash: hash_arg(topics, data)?,
        },
        S::ExecutionFailure::SIGNATURE_HASH => GovEvent::ExecutionFailure {
            safe: emitter,
            hash: hash_arg(topics, data)?,
        },
        S::SafeModuleTransaction::SIGNATURE_HASH => {
            let e = ev!(S::SafeModuleTransaction);
            GovEvent::SafeModuleTransaction {
                safe: emitter,
                module: e.module,
                to: e.to,
            }
        }
        T::CallScheduled::SIGNATURE_HASH => {
            let e = ev!(T::CallScheduled);
            GovEvent::CallScheduled {
                timelock: emitter,
                id: e.id,
                index: u64_of(e.index),
                target: e.target,
                value: e.value,
                data: e.data,
                delay: u64_of(e.delay),
            }
        }
        T::CallExecuted::SIGNATURE_HASH => {
            let e = ev!(T::CallExecuted);
            GovEvent::CallExecuted {
                timelock: emitter,
                id: e.id,
                index: u64_of(e.index),
            }
        }
        T::Cancelled::SIGNATURE_HASH => GovEvent::Cancelled {
            timelock: emitter,
            id: ev!(T::Cancelled).id,
        },
        T::MinDelayChange::SIGNATURE_HASH => GovEvent::MinDelayChange {
            timelock: emitter,
            delay: u64_of(ev!(T::MinDelayChange).newDuration),
        },
        T::RoleGranted::SIGNATURE_HASH => {
            let e = ev!(T::RoleGranted);
            GovEvent::RoleGranted {
                timelock: emitter,
                role: e.role,
                account: e.account,
            }
        }
        T::RoleRevoked::SIGNATURE_HASH => {
            let e = ev!(T::RoleRevoked);
            GovEvent::RoleRevoked {
                timelock: emitter,
                role: e.role,
                account: e.account,
            }
        }
        // The KMS's and its apps' events that the governance side follows.
        _ => match kms_events::decode(kms, emitter, topics, data)? {
            KmsEvent::AppRegistered(app) => GovEvent::AppRegistered {
                app,
                factory: false,
            },
            KmsEvent::AppDeployedViaFactory(app) => GovEvent::AppRegistered { app, factory: true },
            KmsEvent::OwnershipTransferStarted(contract, pending) => {
                GovEvent::OwnershipTransferStarted { contract, pending }
            }
            KmsEvent::OwnershipTransferred(contract, owner) => {
                GovEvent::OwnershipTransferred { contract, owner }
            }
            _ => return None,
        },
    };
    Some(e)
}

impl GovEvent {
    /// Stable name stored with the row.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AppRegistered { .. } => "AppRegistered",
            Self::OwnershipTransferStarted { .. } => "OwnershipTransferStarted",
            Self::OwnershipTransferred { .. } => "OwnershipTransferred",
            Self::SafeSetup { .. } => "SafeSetup",
            Self::AddedOwner { .. } => "AddedOwner",
            Self::RemovedOwner { .. } => "RemovedOwner",
            Self::ChangedThreshold { .. } => "ChangedThreshold",
            Self::EnabledModule { .. } => "EnabledModule",
            Self::DisabledModule { .. } => "DisabledModule",
            Self::ChangedGuard { .. } => "ChangedGuard",
            Self::ChangedFallbackHandler { .. } => "ChangedFallbackHandler",
            Self::ApproveHash { .. } => "ApproveHash",
            Self::SafeMultiSigTransaction { .. } => "SafeMultiSigTransaction",
            Self::ExecutionSuccess { .. } => "ExecutionSuccess",
            Self::ExecutionFailure { .. } => "ExecutionFailure",
            Self::SafeModuleTransaction { .. } => "SafeModuleTransaction",
            Self::CallScheduled { .. } => "CallScheduled",
            Self::CallExecuted { .. } => "CallExecuted",
            Self::Cancelled { .. } => "Cancelled",
            Self::MinDelayChange { .. } => "MinDelayChange",
            Self::RoleGranted { .. } => "RoleGranted",
            Self::RoleRevoked { .. } => "RoleRevoked",
            Self::Observed { .. } => OBSERVED,
            Self::OperationReady { .. } => OPERATION_READY,
            Self::BlockTime { .. } => BLOCK_TIME,
        }
    }

    /// A synthetic row's (address, data), `None` for logs.
    pub fn synthetic(&self) -> Option<(Address, Vec<u8>)> {
        match self {
            Self::Observed { address, kind } => Some((*address, serde_json::to_vec(kind).ok()?)),
            Self::OperationReady { timelock, id, at } => Some((
                *timelock,
                serde_json::to_vec(&ReadyRow { id: *id, at: *at }).ok()?,
            )),
            Self::BlockTime { safe, at } => Some((*safe, at.to_string().into_bytes())),
            _ => None,
        }
    }

    /// Reads back a synthetic row.
    pub fn from_synthetic(kind: &str, address: Address, data: &[u8]) -> Option<Self> {
        match kind {
            OBSERVED => Some(Self::Observed {
                address,
                kind: serde_json::from_slice(data).ok()?,
            }),
            OPERATION_READY => {
                let r: ReadyRow = serde_json::from_slice(data).ok()?;
                Some(Self::OperationReady {
                    timelock: address,
                    id: r.id,
                    at: r.at,
                })
            }
            BLOCK_TIME => Some(Self::BlockTime {
                safe: address,
                at: std::str::from_utf8(data).ok()?.parse().ok()?,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SAFE: Address = Address::repeat_byte(0x5a);
    const KMS: Address = Address::repeat_byte(0x0a);

    fn word(a: Address) -> B256 {
        a.into_word()
    }

    #[test]
    fn safe_events_decode_in_the_1_4_1_and_the_1_3_0_layout() {
        let owner = Address::repeat_byte(0x01);
        let t0 = S::AddedOwner::SIGNATURE_HASH;
        // 1.4.1: the owner is indexed.
        let new = decode(KMS, SAFE, &[t0, word(owner)], &[]);
        // 1.3.0: the same event with the owner in the data.
        let old = decode(KMS, SAFE, &[t0], word(owner).as_slice());
        let expected = Some(GovEvent::AddedOwner { safe: SAFE, owner });
        assert_eq!(new, expected);
        assert_eq!(old, expected);
        let hash = B256::repeat_byte(0x77);
        let mut data = hash.to_vec();
        data.extend_from_slice(&[0; 32]);
        assert_eq!(
            decode(KMS, SAFE, &[S::ExecutionSuccess::SIGNATURE_HASH], &data),
            Some(GovEvent::ExecutionSuccess { safe: SAFE, hash })
        );
        assert_eq!(
            decode(
                KMS,
                SAFE,
                &[S::ExecutionFailure::SIGNATURE_HASH, hash],
                &[0; 32]
            ),
            Some(GovEvent::ExecutionFailure { safe: SAFE, hash })
        );
    }

    #[test]
    fn synthetic_rows_round_trip() {
        for e in [
            GovEvent::Observed {
                address: SAFE,
                kind: ContractKind::Safe {
                    version: "1.4.1".into(),
                    owners: vec![Address::repeat_byte(1)],
                    threshold: 1,
                    nonce: 4,
                    modules: vec![],
                    guard: Address::ZERO,
                    fallback_handler: Address::ZERO,
                },
            },
            GovEvent::OperationReady {
                timelock: KMS,
                id: B256::repeat_byte(3),
                at: 1_700_000_000,
            },
            GovEvent::BlockTime {
                safe: SAFE,
                at: 1_700_000_012,
            },
        ] {
            let (address, data) = e.synthetic().unwrap();
            assert_eq!(GovEvent::from_synthetic(e.kind(), address, &data), Some(e));
        }
    }

    proptest! {
        #[test]
        fn decoding_never_panics(topic_count in 0usize..5, data in proptest::collection::vec(any::<u8>(), 0..300), which in 0usize..8) {
            let t0 = [
                S::SafeMultiSigTransaction::SIGNATURE_HASH,
                S::SafeSetup::SIGNATURE_HASH,
                S::AddedOwner::SIGNATURE_HASH,
                T::CallScheduled::SIGNATURE_HASH,
                T::RoleGranted::SIGNATURE_HASH,
                S::ExecutionSuccess::SIGNATURE_HASH,
                S::ApproveHash::SIGNATURE_HASH,
                B256::repeat_byte(9),
            ][which];
            let topics: Vec<B256> = std::iter::once(t0).chain((1..topic_count).map(|i| B256::repeat_byte(i as u8))).collect();
            let _ = decode(KMS, SAFE, &topics, &data);
        }
    }
}
