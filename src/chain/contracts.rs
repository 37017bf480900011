//! Contract bindings, reason strings and policy labels.
//!
//! The bindings are generated at compile time by alloy's `sol!` from the JSON ABIs in
//! `contracts-abi/` (DstackKms and DstackApp are compiled from `contracts/src/`; SafeL2, MultiSend and
//! TimelockController are extracted from their npm packages by `contracts/build.mjs`). The ABIs of
//! our DstackKms/DstackApp match dstack's deployed contracts, so the same bindings decode events
//! and answer calls on real chains.
//!
//! The creation bytecode of our own test contracts is read from `contracts/out/` (committed,
//! checked for staleness by `node contracts/build.mjs --check`).

use alloy::primitives::{B256, Bytes, keccak256};

use super::ChainError;

/// `sol!`-generated bindings. The macro emits public items (call/event structs, fields, instance
/// types) without doc comments, so `missing_docs` is silenced for this module only.
#[allow(missing_docs, clippy::too_many_arguments)]
mod bindings {
    alloy::sol!(
        #[sol(rpc)]
        #[derive(Debug, PartialEq, Eq)]
        DstackKms,
        "contracts-abi/DstackKms.json"
    );
    alloy::sol!(
        #[sol(rpc)]
        #[derive(Debug, PartialEq, Eq)]
        DstackApp,
        "contracts-abi/DstackApp.json"
    );
    alloy::sol!(
        #[sol(rpc)]
        #[derive(Debug, PartialEq, Eq)]
        SafeL2,
        "contracts-abi/SafeL2.json"
    );
    alloy::sol!(
        #[sol(rpc)]
        #[derive(Debug, PartialEq, Eq)]
        MultiSend,
        "contracts-abi/MultiSend.json"
    );
    alloy::sol!(
        #[sol(rpc)]
        #[derive(Debug, PartialEq, Eq)]
        TimelockController,
        "contracts-abi/TimelockController.json"
    );
}

pub use bindings::{DstackApp, DstackKms, MultiSend, SafeL2, TimelockController};

// `AppBootInfo` is generated once per contract (same layout, same ABI encoding); these conversions
// let one boot report be checked against both.

impl From<DstackKms::AppBootInfo> for DstackApp::AppBootInfo {
    fn from(i: DstackKms::AppBootInfo) -> Self {
        Self {
            appId: i.appId,
            composeHash: i.composeHash,
            instanceId: i.instanceId,
            deviceId: i.deviceId,
            mrAggregated: i.mrAggregated,
            mrSystem: i.mrSystem,
            osImageHash: i.osImageHash,
            tcbStatus: i.tcbStatus,
            advisoryIds: i.advisoryIds,
        }
    }
}

impl From<DstackApp::AppBootInfo> for DstackKms::AppBootInfo {
    fn from(i: DstackApp::AppBootInfo) -> Self {
        Self {
            appId: i.appId,
            composeHash: i.composeHash,
            instanceId: i.instanceId,
            deviceId: i.deviceId,
            mrAggregated: i.mrAggregated,
            mrSystem: i.mrSystem,
            osImageHash: i.osImageHash,
            tcbStatus: i.tcbStatus,
            advisoryIds: i.advisoryIds,
        }
    }
}

/// The ERC-1967 storage slot holding a proxy's implementation address
/// (`keccak256("eip1967.proxy.implementation") - 1`). Proxies have no `implementation()` getter.
pub const IMPLEMENTATION_SLOT: B256 =
    alloy::primitives::b256!("360894a13ba1a3210667c828492db98dca3e2076cc3735a920a3ca505d382bbc");

/// The `tcbStatus` value `isKmsAllowed` (always) and `DstackApp.isAppAllowed` (when
/// `requireTcbUpToDate`) accept.
pub const TCB_UP_TO_DATE: &str = "UpToDate";

/// Reason strings returned as `(false, reason)` by `isKmsAllowed` / `isAppAllowed`, byte for byte
/// as dstack's contracts return them.
///
/// Our test contracts return exactly these; keywarden's own policy evaluation must return the same
/// strings so that it can be compared with the contracts call for call. An allowed boot returns
/// `(true, "")`.
pub mod reason {
    /// `isKmsAllowed` check 1, `DstackApp.isAppAllowed` check 1 (when `requireTcbUpToDate`).
    pub const TCB_NOT_UP_TO_DATE: &str = "TCB status is not up to date";
    /// `isKmsAllowed` check 2 and `DstackKms.isAppAllowed` check 2.
    pub const OS_IMAGE_NOT_ALLOWED: &str = "OS image is not allowed";
    /// `isKmsAllowed` check 3.
    pub const AGGREGATED_MR_NOT_ALLOWED: &str = "Aggregated MR not allowed";
    /// `isKmsAllowed` check 4.
    pub const KMS_DEVICE_NOT_ALLOWED: &str = "KMS is not allowed to boot on this device";
    /// `DstackKms.isAppAllowed` check 1.
    pub const APP_NOT_REGISTERED: &str = "App not registered";
    /// `DstackKms.isAppAllowed` check 3 (registered address without code).
    pub const APP_HAS_NO_CODE: &str = "App not deployed or invalid address";
    /// `DstackApp.isAppAllowed` check 2.
    pub const COMPOSE_HASH_NOT_ALLOWED: &str = "Compose hash not allowed";
    /// `DstackApp.isAppAllowed` check 3 (skipped when `allowAnyDevice`).
    pub const DEVICE_NOT_ALLOWED: &str = "Device not allowed";
    /// Every reason above, in declaration order.
    pub const ALL: [&str; 8] = [
        TCB_NOT_UP_TO_DATE,
        OS_IMAGE_NOT_ALLOWED,
        AGGREGATED_MR_NOT_ALLOWED,
        KMS_DEVICE_NOT_ALLOWED,
        APP_NOT_REGISTERED,
        APP_HAS_NO_CODE,
        COMPOSE_HASH_NOT_ALLOWED,
        DEVICE_NOT_ALLOWED,
    ];
}

/// Revert strings (`Error(string)`) of our test contracts. Ownership and upgrade failures revert
/// with custom errors instead (`OwnableUnauthorizedAccount(address)`, `UUPSUnauthorizedCallContext()`
/// ...), which are part of the bindings.
pub mod revert {
    /// `registerApp(address(0))`.
    pub const INVALID_APP_ID: &str = "Invalid app ID";
    /// `deployAndRegisterApp` before `setAppImplementation`.
    pub const APP_IMPLEMENTATION_NOT_SET: &str = "DstackApp implementation not set";
    /// `deployAndRegisterApp` with `initialOwner == address(0)`.
    pub const INVALID_OWNER: &str = "Invalid owner address";
    /// `DstackApp.upgradeToAndCall` after `disableUpgrades()`.
    pub const UPGRADES_DISABLED: &str = "Upgrades are disabled";
}

/// Labels of `PolicyChanged.policy` (the event carries `keccak256(label)`).
///
/// Value encoding: a `bytes32` item as is; an address left-padded to 32 bytes; `kms-info` carries
/// `keccak256(k256Pubkey)`, `gateway-app-id` `keccak256(bytes(gatewayAppId))`; a boolean setting
/// `bytes32(uint256(flag))`. `enabled` is true for additions, false for removals, and for setters
/// true exactly when the new value is non-empty (non-zero address, non-empty string or key, `true`).
pub mod policy {
    /// DstackKms `setAppImplementation` / initial app implementation.
    pub const APP_IMPLEMENTATION: &str = "app-implementation";
    /// DstackKms and DstackApp `upgradeToAndCall` (value: new implementation).
    pub const IMPLEMENTATION_UPGRADE: &str = "implementation-upgrade";
    /// DstackKms `setKmsInfo` (value: keccak256(k256Pubkey)).
    pub const KMS_INFO: &str = "kms-info";
    /// DstackKms `setGatewayAppId` (value: keccak256 of the string).
    pub const GATEWAY_APP_ID: &str = "gateway-app-id";
    /// DstackKms `registerApp` / `deployAndRegisterApp` (value: app address).
    pub const REGISTERED_APP: &str = "registered-app";
    /// DstackKms `add/removeKmsAggregatedMr`.
    pub const KMS_AGGREGATED_MR: &str = "kms-aggregated-mr";
    /// DstackKms `add/removeKmsDevice`.
    pub const KMS_DEVICE: &str = "kms-device";
    /// DstackKms `add/removeOsImageHash`.
    pub const OS_IMAGE: &str = "os-image";
    /// DstackApp `add/removeDevice`.
    pub const DEVICE: &str = "device";
    /// DstackApp `add/removeComposeHash`.
    pub const COMPOSE_HASH: &str = "compose-hash";
    /// DstackApp `setAllowAnyDevice`.
    pub const ALLOW_ANY_DEVICE: &str = "allow-any-device";
    /// DstackApp `setRequireTcbUpToDate`.
    pub const REQUIRE_TCB_UP_TO_DATE: &str = "require-tcb-up-to-date";
    /// DstackApp `disableUpgrades` (value: `bytes32(uint256(1))`).
    pub const UPGRADES_DISABLED: &str = "upgrades-disabled";

    /// Every label, DstackKms's first.
    pub const ALL: [&str; 13] = [
        APP_IMPLEMENTATION,
        IMPLEMENTATION_UPGRADE,
        KMS_INFO,
        GATEWAY_APP_ID,
        REGISTERED_APP,
        KMS_AGGREGATED_MR,
        KMS_DEVICE,
        OS_IMAGE,
        DEVICE,
        COMPOSE_HASH,
        ALLOW_ANY_DEVICE,
        REQUIRE_TCB_UP_TO_DATE,
        UPGRADES_DISABLED,
    ];
}

/// `keccak256(label)`, the `policy` topic of `PolicyChanged`.
pub fn policy_id(label: &str) -> B256 {
    keccak256(label.as_bytes())
}

/// The label whose hash is `id`, if it is one of [`policy::ALL`].
pub fn policy_label(id: B256) -> Option<&'static str> {
    policy::ALL.into_iter().find(|label| policy_id(label) == id)
}

/// Our compiled test contracts (in `contracts/out/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Artifact {
    /// Our DstackKms implementation.
    DstackKms,
    /// Our DstackApp implementation.
    DstackApp,
    /// Our ERC-1967 proxy: constructor `(address implementation, bytes data)`.
    Erc1967Proxy,
}

impl Artifact {
    /// The contract name.
    pub fn name(self) -> &'static str {
        match self {
            Self::DstackKms => "DstackKms",
            Self::DstackApp => "DstackApp",
            Self::Erc1967Proxy => "ERC1967Proxy",
        }
    }

    fn json(self) -> &'static str {
        match self {
            Self::DstackKms => include_str!("../../contracts/out/DstackKms.json"),
            Self::DstackApp => include_str!("../../contracts/out/DstackApp.json"),
            Self::Erc1967Proxy => include_str!("../../contracts/out/ERC1967Proxy.json"),
        }
    }

    /// Creation bytecode (without constructor arguments).
    pub fn bytecode(self) -> Result<Bytes, ChainError> {
        self.field("bytecode")
    }

    /// Runtime bytecode, as `eth_getCode` returns it after deployment.
    pub fn deployed_bytecode(self) -> Result<Bytes, ChainError> {
        self.field("deployedBytecode")
    }

    fn field(self, key: &str) -> Result<Bytes, ChainError> {
        let bad = |detail: String| ChainError::Artifact {
            contract: self.name(),
            detail,
        };
        let value: serde_json::Value =
            serde_json::from_str(self.json()).map_err(|e| bad(e.to_string()))?;
        let hex = value
            .get(key)
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| bad(format!("no string field `{key}`")))?;
        let code: Bytes = hex.parse().map_err(|e| bad(format!("`{key}`: {e}")))?;
        if code.is_empty() {
            return Err(bad(format!("`{key}` is empty")));
        }
        Ok(code)
    }
}

#[cfg(test)]
mod tests {
    //! The bindings' event topics and function selectors equal the values published for dstack's
    //! contracts, Safe 1.4.1 and OpenZeppelin's TimelockController (keccak256 of the signatures).

    use alloy::primitives::{FixedBytes, b256};
    use alloy::sol_types::{SolCall, SolEvent};

    use super::*;

    fn sel(hex: &str) -> FixedBytes<4> {
        hex.parse().expect("selector literal")
    }

    #[test]
    fn dstack_kms_event_topics_match_spec() {
        use DstackKms as K;
        let cases: &[(&str, B256, B256)] = &[
            (
                "AppRegistered",
                K::AppRegistered::SIGNATURE_HASH,
                b256!("0d540ad8f39e07d19909687352b9fa017405d93c91a6760981fbae9cf28bfef7"),
            ),
            (
                "KmsInfoSet",
                K::KmsInfoSet::SIGNATURE_HASH,
                b256!("77cdad119a452bbd96c45635758fc4af8a6bde3deaccf3fada634ddf9a162706"),
            ),
            (
                "KmsAggregatedMrAdded",
                K::KmsAggregatedMrAdded::SIGNATURE_HASH,
                b256!("68615a0b92795750b3d180ff73429e1291d225e449eee954a567b91104fd9837"),
            ),
            (
                "KmsAggregatedMrRemoved",
                K::KmsAggregatedMrRemoved::SIGNATURE_HASH,
                b256!("54cd662e41eec7ddf0f32f034b2533e481b471dd3ea978222d609ec8fffb1bb0"),
            ),
            (
                "KmsDeviceAdded",
                K::KmsDeviceAdded::SIGNATURE_HASH,
                b256!("f2b290637b1193e12eb38ab32b986303639b1687cc2cd1e25f993e6eae2f4041"),
            ),
            (
                "KmsDeviceRemoved",
                K::KmsDeviceRemoved::SIGNATURE_HASH,
                b256!("1a9888a45e3df8b7e6bb3090747d598d2a0d78e61388161a90799f54df8f4434"),
            ),
            (
                "OsImageHashAdded",
                K::OsImageHashAdded::SIGNATURE_HASH,
                b256!("4911843506849c85a5ca6e6e2c01eed2d3ab86baba619517a2aad9d5ab2aeff2"),
            ),
            (
                "OsImageHashRemoved",
                K::OsImageHashRemoved::SIGNATURE_HASH,
                b256!("99b3cee95daf3138d0c982299cd0264f5b7a61aa629b42b92f3ec8966aa7f6fe"),
            ),
            (
                "GatewayAppIdSet",
                K::GatewayAppIdSet::SIGNATURE_HASH,
                b256!("5b2b64f770ea5266055ebd3ebf205ef06cbfa738e62684edf0e28356e34acf06"),
            ),
            (
                "AppImplementationSet",
                K::AppImplementationSet::SIGNATURE_HASH,
                b256!("08bb433f12b5fd81d2d5e0deeb3b4d28371781ddbd80e9d053e7468d2b1aa82d"),
            ),
            (
                "AppDeployedViaFactory",
                K::AppDeployedViaFactory::SIGNATURE_HASH,
                b256!("fd86d7f6962eba3b7a3bf9129c06c0b2f885e1c61ef2c9f0dbb856be0deefdee"),
            ),
            (
                "PolicyChanged",
                K::PolicyChanged::SIGNATURE_HASH,
                b256!("341d3bc64e32172fc5bcf27b0f7f69dc5adc19af64b7aa1dee361e5883c32375"),
            ),
            (
                "Upgraded",
                K::Upgraded::SIGNATURE_HASH,
                b256!("bc7cd75a20ee27fd9adebab32041f755214dbc6bffa90cc0225b39da2e5c2d3b"),
            ),
            (
                "OwnershipTransferStarted",
                K::OwnershipTransferStarted::SIGNATURE_HASH,
                b256!("38d16b8cac22d99fc7c124b9cd0de2d3fa1faef420bfe791d8c362d765e22700"),
            ),
            (
                "OwnershipTransferred",
                K::OwnershipTransferred::SIGNATURE_HASH,
                b256!("8be0079c531659141344cd1fd0a4f28419497f9722a3daafe3b4186f6b6457e0"),
            ),
            (
                "Initialized",
                K::Initialized::SIGNATURE_HASH,
                b256!("c7f505b2f371ae2175ee4913f4499e1f2633a7b5936321eed1cdaeb6115181d2"),
            ),
        ];
        for (name, ours, spec) in cases {
            assert_eq!(ours, spec, "DstackKms.{name}");
        }
        // The pre-Apr-2025 name of GatewayAppIdSet, for old deployments.
        assert_eq!(
            keccak256("TProxyAppIdSet(string)"),
            b256!("fa71be58a57ccbf2fe4e110bc83aa1620e20ff2a30bed5ccac0f1975087906db")
        );
    }

    #[test]
    fn dstack_app_event_topics_match_spec() {
        use DstackApp as A;
        let cases: &[(&str, B256, B256)] = &[
            (
                "ComposeHashAdded",
                A::ComposeHashAdded::SIGNATURE_HASH,
                b256!("fecb34306dd9d8b785b54d65489d06afc8822a0893ddacedff40c50a4942d0af"),
            ),
            (
                "ComposeHashRemoved",
                A::ComposeHashRemoved::SIGNATURE_HASH,
                b256!("755b79bd4b0eeab344d032284a99003b2ddc018b646752ac72d681593a6e8947"),
            ),
            (
                "DeviceAdded",
                A::DeviceAdded::SIGNATURE_HASH,
                b256!("67fc71ab96fe3fa3c6f78e9a00e635d591b7333ce611c0380bc577aac702243b"),
            ),
            (
                "DeviceRemoved",
                A::DeviceRemoved::SIGNATURE_HASH,
                b256!("e0862975ac517b0478d308012afabc4bc37c23874a18144d7f2dfb852ff95c2c"),
            ),
            (
                "AllowAnyDeviceSet",
                A::AllowAnyDeviceSet::SIGNATURE_HASH,
                b256!("bb2cdb6c7b362202d40373f87bc4788301cca658f91711ac1662e1ad2cba4a20"),
            ),
            (
                "RequireTcbUpToDateSet",
                A::RequireTcbUpToDateSet::SIGNATURE_HASH,
                b256!("afae60561b2481a349b45b3a47357f70eef6ae67e5b6e1749d74de7f19a25aa1"),
            ),
            (
                "UpgradesDisabled",
                A::UpgradesDisabled::SIGNATURE_HASH,
                b256!("0e5daa943fcd7e7182d0e893d180695c2ea9f6f1b4a1c5432faf14cf17b774e8"),
            ),
            (
                "PolicyChanged",
                A::PolicyChanged::SIGNATURE_HASH,
                b256!("341d3bc64e32172fc5bcf27b0f7f69dc5adc19af64b7aa1dee361e5883c32375"),
            ),
            (
                "Upgraded",
                A::Upgraded::SIGNATURE_HASH,
                b256!("bc7cd75a20ee27fd9adebab32041f755214dbc6bffa90cc0225b39da2e5c2d3b"),
            ),
            (
                "OwnershipTransferStarted",
                A::OwnershipTransferStarted::SIGNATURE_HASH,
                b256!("38d16b8cac22d99fc7c124b9cd0de2d3fa1faef420bfe791d8c362d765e22700"),
            ),
            (
                "OwnershipTransferred",
                A::OwnershipTransferred::SIGNATURE_HASH,
                b256!("8be0079c531659141344cd1fd0a4f28419497f9722a3daafe3b4186f6b6457e0"),
            ),
            (
                "Initialized",
                A::Initialized::SIGNATURE_HASH,
                b256!("c7f505b2f371ae2175ee4913f4499e1f2633a7b5936321eed1cdaeb6115181d2"),
            ),
        ];
        for (name, ours, spec) in cases {
            assert_eq!(ours, spec, "DstackApp.{name}");
        }
    }

    #[test]
    fn dstack_selectors_match_spec() {
        use DstackApp as A;
        use DstackKms as K;
        let cases: &[(&str, FixedBytes<4>, &str)] = &[
            (
                "removeKmsAggregatedMr",
                K::removeKmsAggregatedMrCall::SELECTOR.into(),
                "2adee48d",
            ),
            (
                "removeKmsDevice",
                K::removeKmsDeviceCall::SELECTOR.into(),
                "9e6f3114",
            ),
            (
                "removeOsImageHash",
                K::removeOsImageHashCall::SELECTOR.into(),
                "9425bac6",
            ),
            (
                "addKmsAggregatedMr",
                K::addKmsAggregatedMrCall::SELECTOR.into(),
                "3e32d346",
            ),
            (
                "addKmsDevice",
                K::addKmsDeviceCall::SELECTOR.into(),
                "4d5922a1",
            ),
            (
                "addOsImageHash",
                K::addOsImageHashCall::SELECTOR.into(),
                "06a3ae96",
            ),
            ("setKmsInfo", K::setKmsInfoCall::SELECTOR.into(), "7d025352"),
            (
                "setKmsQuote",
                K::setKmsQuoteCall::SELECTOR.into(),
                "18c1ecb2",
            ),
            (
                "setKmsEventlog",
                K::setKmsEventlogCall::SELECTOR.into(),
                "736ede7a",
            ),
            (
                "setGatewayAppId",
                K::setGatewayAppIdCall::SELECTOR.into(),
                "3971db27",
            ),
            (
                "setAppImplementation",
                K::setAppImplementationCall::SELECTOR.into(),
                "3ceaaa11",
            ),
            (
                "registerApp",
                K::registerAppCall::SELECTOR.into(),
                "17a1d80f",
            ),
            (
                "isAppAllowed",
                K::isAppAllowedCall::SELECTOR.into(),
                "1e079198",
            ),
            (
                "isKmsAllowed",
                K::isKmsAllowedCall::SELECTOR.into(),
                "e067ec9d",
            ),
            (
                "DstackApp.isAppAllowed",
                A::isAppAllowedCall::SELECTOR.into(),
                "1e079198",
            ),
            (
                "addComposeHash",
                A::addComposeHashCall::SELECTOR.into(),
                "dfc77223",
            ),
            (
                "removeComposeHash",
                A::removeComposeHashCall::SELECTOR.into(),
                "67b3f22c",
            ),
            ("addDevice", A::addDeviceCall::SELECTOR.into(), "2a819728"),
            (
                "removeDevice",
                A::removeDeviceCall::SELECTOR.into(),
                "1d266200",
            ),
            (
                "setAllowAnyDevice",
                A::setAllowAnyDeviceCall::SELECTOR.into(),
                "7c4beeb8",
            ),
            (
                "setRequireTcbUpToDate",
                A::setRequireTcbUpToDateCall::SELECTOR.into(),
                "6e4c7422",
            ),
            (
                "disableUpgrades",
                A::disableUpgradesCall::SELECTOR.into(),
                "ec669036",
            ),
            (
                "upgradeToAndCall",
                K::upgradeToAndCallCall::SELECTOR.into(),
                "4f1ef286",
            ),
            (
                "DstackApp.upgradeToAndCall",
                A::upgradeToAndCallCall::SELECTOR.into(),
                "4f1ef286",
            ),
            (
                "transferOwnership",
                K::transferOwnershipCall::SELECTOR.into(),
                "f2fde38b",
            ),
            (
                "acceptOwnership",
                K::acceptOwnershipCall::SELECTOR.into(),
                "79ba5097",
            ),
            (
                "renounceOwnership",
                K::renounceOwnershipCall::SELECTOR.into(),
                "715018a6",
            ),
            ("owner", K::ownerCall::SELECTOR.into(), "8da5cb5b"),
            (
                "pendingOwner",
                K::pendingOwnerCall::SELECTOR.into(),
                "e30c3978",
            ),
            (
                "DstackApp.transferOwnership",
                A::transferOwnershipCall::SELECTOR.into(),
                "f2fde38b",
            ),
            (
                "DstackApp.acceptOwnership",
                A::acceptOwnershipCall::SELECTOR.into(),
                "79ba5097",
            ),
            ("DstackApp.owner", A::ownerCall::SELECTOR.into(), "8da5cb5b"),
            (
                "DstackApp.pendingOwner",
                A::pendingOwnerCall::SELECTOR.into(),
                "e30c3978",
            ),
        ];
        for (name, ours, spec) in cases {
            assert_eq!(*ours, sel(spec), "{name}");
        }
        // The two deployAndRegisterApp overloads: `_0` is the legacy 5-argument one.
        assert_eq!(
            K::deployAndRegisterApp_0Call::SIGNATURE,
            "deployAndRegisterApp(address,bool,bool,bytes32,bytes32)"
        );
        assert_eq!(
            K::deployAndRegisterApp_1Call::SIGNATURE,
            "deployAndRegisterApp(address,bool,bool,bool,bytes32,bytes32)"
        );
        let mut overloads = [
            FixedBytes::<4>::from(K::deployAndRegisterApp_0Call::SELECTOR),
            FixedBytes::<4>::from(K::deployAndRegisterApp_1Call::SELECTOR),
        ];
        overloads.sort();
        let mut spec = [sel("9cb9c31f"), sel("8618169d")];
        spec.sort();
        assert_eq!(overloads, spec);
        assert_eq!(
            A::initialize_0Call::SIGNATURE,
            "initialize(address,bool,bool,bytes32,bytes32)"
        );
        assert_eq!(
            A::initialize_1Call::SIGNATURE,
            "initialize(address,bool,bool,bool,bytes32,bytes32)"
        );
    }

    #[test]
    fn safe_and_timelock_match_spec() {
        use SafeL2 as S;
        use TimelockController as T;
        let topics: &[(&str, B256, B256)] = &[
            (
                "AddedOwner",
                S::AddedOwner::SIGNATURE_HASH,
                b256!("9465fa0c962cc76958e6373a993326400c1c94f8be2fe3a952adfa7f60b2ea26"),
            ),
            (
                "RemovedOwner",
                S::RemovedOwner::SIGNATURE_HASH,
                b256!("f8d49fc529812e9a7c5c50e69c20f0dccc0db8fa95c98bc58cc9a4f1c1299eaf"),
            ),
            (
                "ChangedThreshold",
                S::ChangedThreshold::SIGNATURE_HASH,
                b256!("610f7ff2b304ae8903c3de74c60c6ab1f7d6226b3f52c5161905bb5ad4039c93"),
            ),
            (
                "ApproveHash",
                S::ApproveHash::SIGNATURE_HASH,
                b256!("f2a0eb156472d1440255b0d7c1e19cc07115d1051fe605b0dce69acfec884d9c"),
            ),
            (
                "ExecutionSuccess",
                S::ExecutionSuccess::SIGNATURE_HASH,
                b256!("442e715f626346e8c54381002da614f62bee8d27386535b2521ec8540898556e"),
            ),
            (
                "ExecutionFailure",
                S::ExecutionFailure::SIGNATURE_HASH,
                b256!("23428b18acfb3ea64b08dc0c1d296ea9c09702c09083ca5272e64d115b687d23"),
            ),
            (
                "SafeSetup",
                S::SafeSetup::SIGNATURE_HASH,
                b256!("141df868a6331af528e38c83b7aa03edc19be66e37ae67f9285bf4f8e3c6a1a8"),
            ),
            (
                "SafeMultiSigTransaction",
                S::SafeMultiSigTransaction::SIGNATURE_HASH,
                b256!("66753cd2356569ee081232e3be8909b950e0a76c1f8460c3a5e3c2be32b11bed"),
            ),
            (
                "SafeModuleTransaction",
                S::SafeModuleTransaction::SIGNATURE_HASH,
                b256!("b648d3644f584ed1c2232d53c46d87e693586486ad0d1175f8656013110b714e"),
            ),
            (
                "EnabledModule",
                S::EnabledModule::SIGNATURE_HASH,
                b256!("ecdf3a3effea5783a3c4c2140e677577666428d44ed9d474a0b3a4c9943f8440"),
            ),
            (
                "DisabledModule",
                S::DisabledModule::SIGNATURE_HASH,
                b256!("aab4fa2b463f581b2b32cb3b7e3b704b9ce37cc209b5fb4d77e593ace4054276"),
            ),
            (
                "ChangedGuard",
                S::ChangedGuard::SIGNATURE_HASH,
                b256!("1151116914515bc0891ff9047a6cb32cf902546f83066499bcf8ba33d2353fa2"),
            ),
            (
                "ChangedFallbackHandler",
                S::ChangedFallbackHandler::SIGNATURE_HASH,
                b256!("5ac6c46c93c8d0e53714ba3b53db3e7c046da994313d7ed0d192028bc7c228b0"),
            ),
            (
                "CallScheduled",
                T::CallScheduled::SIGNATURE_HASH,
                b256!("4cf4410cc57040e44862ef0f45f3dd5a5e02db8eb8add648d4b0e236f1d07dca"),
            ),
            (
                "CallExecuted",
                T::CallExecuted::SIGNATURE_HASH,
                b256!("c2617efa69bab66782fa219543714338489c4e9e178271560a91b82c3f612b58"),
            ),
            (
                "Cancelled",
                T::Cancelled::SIGNATURE_HASH,
                b256!("baa1eb22f2a492ba1a5fea61b8df4d27c6c8b5f3971e63bb58fa14ff72eedb70"),
            ),
            (
                "CallSalt",
                T::CallSalt::SIGNATURE_HASH,
                b256!("20fda5fd27a1ea7bf5b9567f143ac5470bb059374a27e8f67cb44f946f6d0387"),
            ),
            (
                "MinDelayChange",
                T::MinDelayChange::SIGNATURE_HASH,
                b256!("11c24f4ead16507c69ac467fbd5e4eed5fb5c699626d2cc6d66421df253886d5"),
            ),
            (
                "RoleGranted",
                T::RoleGranted::SIGNATURE_HASH,
                b256!("2f8788117e7eff1d82e926ec794901d17c78024a50270940304540a733656f0d"),
            ),
            (
                "RoleRevoked",
                T::RoleRevoked::SIGNATURE_HASH,
                b256!("f6391f5c32d9c69d2a47ea670b442974b53935d1edc7fd64eb21e047a839171b"),
            ),
        ];
        for (name, ours, spec) in topics {
            assert_eq!(ours, spec, "{name}");
        }
        let selectors: &[(&str, FixedBytes<4>, &str)] = &[
            (
                "execTransaction",
                S::execTransactionCall::SELECTOR.into(),
                "6a761202",
            ),
            (
                "approveHash",
                S::approveHashCall::SELECTOR.into(),
                "d4d9bdcd",
            ),
            (
                "addOwnerWithThreshold",
                S::addOwnerWithThresholdCall::SELECTOR.into(),
                "0d582f13",
            ),
            (
                "removeOwner",
                S::removeOwnerCall::SELECTOR.into(),
                "f8dc5dd9",
            ),
            ("swapOwner", S::swapOwnerCall::SELECTOR.into(), "e318b52b"),
            (
                "changeThreshold",
                S::changeThresholdCall::SELECTOR.into(),
                "694e80c3",
            ),
            (
                "enableModule",
                S::enableModuleCall::SELECTOR.into(),
                "610b5925",
            ),
            (
                "disableModule",
                S::disableModuleCall::SELECTOR.into(),
                "e009cfde",
            ),
            ("setGuard", S::setGuardCall::SELECTOR.into(), "e19a9dd9"),
            (
                "setFallbackHandler",
                S::setFallbackHandlerCall::SELECTOR.into(),
                "f08a0323",
            ),
            ("getOwners", S::getOwnersCall::SELECTOR.into(), "a0e67e2b"),
            (
                "getThreshold",
                S::getThresholdCall::SELECTOR.into(),
                "e75235b8",
            ),
            ("nonce", S::nonceCall::SELECTOR.into(), "affed0e0"),
            (
                "getTransactionHash",
                S::getTransactionHashCall::SELECTOR.into(),
                "d8d11f78",
            ),
            (
                "approvedHashes",
                S::approvedHashesCall::SELECTOR.into(),
                "7d832974",
            ),
            (
                "multiSend",
                MultiSend::multiSendCall::SELECTOR.into(),
                "8d80ff0a",
            ),
            ("schedule", T::scheduleCall::SELECTOR.into(), "01d5062a"),
            (
                "scheduleBatch",
                T::scheduleBatchCall::SELECTOR.into(),
                "8f2a0bb0",
            ),
            ("execute", T::executeCall::SELECTOR.into(), "134008d3"),
            (
                "executeBatch",
                T::executeBatchCall::SELECTOR.into(),
                "e38335e5",
            ),
            ("cancel", T::cancelCall::SELECTOR.into(), "c4d252f5"),
            (
                "updateDelay",
                T::updateDelayCall::SELECTOR.into(),
                "64d62353",
            ),
            ("grantRole", T::grantRoleCall::SELECTOR.into(), "2f2ff15d"),
            ("revokeRole", T::revokeRoleCall::SELECTOR.into(), "d547741f"),
            (
                "getMinDelay",
                T::getMinDelayCall::SELECTOR.into(),
                "f27a0c92",
            ),
            (
                "getTimestamp",
                T::getTimestampCall::SELECTOR.into(),
                "d45c4435",
            ),
            (
                "getOperationState",
                T::getOperationStateCall::SELECTOR.into(),
                "7958004c",
            ),
        ];
        for (name, ours, spec) in selectors {
            assert_eq!(*ours, sel(spec), "{name}");
        }
        // changeMasterCopy is not in Safe 1.4.1's ABI; its selector is still published.
        assert_eq!(
            &keccak256("changeMasterCopy(address)")[..4],
            sel("7de7edef").as_slice()
        );
    }

    #[test]
    fn implementation_slot_is_erc1967() {
        let slot =
            alloy::primitives::U256::from_be_bytes(keccak256("eip1967.proxy.implementation").0)
                - alloy::primitives::U256::from(1);
        assert_eq!(B256::from(slot), IMPLEMENTATION_SLOT);
    }

    #[test]
    fn policy_labels_round_trip() {
        for label in policy::ALL {
            assert_eq!(policy_label(policy_id(label)), Some(label));
        }
        assert_eq!(policy_label(B256::ZERO), None);
        let mut reasons = reason::ALL.to_vec();
        reasons.sort_unstable();
        reasons.dedup();
        assert_eq!(reasons.len(), reason::ALL.len(), "reasons are distinct");
    }

    #[test]
    fn artifacts_are_embedded() {
        for artifact in [
            Artifact::DstackKms,
            Artifact::DstackApp,
            Artifact::Erc1967Proxy,
        ] {
            assert!(artifact.bytecode().expect("bytecode").len() > 100);
            assert!(!artifact.deployed_bytecode().expect("deployed").is_empty());
        }
    }
}
