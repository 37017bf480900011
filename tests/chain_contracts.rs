//! Our test contracts on a real anvil: deployment, every governance function with its events and
//! `PolicyChanged` twin, the check order and reason strings of `isKmsAllowed` / `isAppAllowed`,
//! two-step ownership and UUPS upgrades.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, B256, Bytes, U256, b256, keccak256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use alloy::sol_types::{Revert, SolEvent};
use keywarden::chain::contracts::{
    Artifact, DstackApp, DstackKms, IMPLEMENTATION_SLOT, TCB_UP_TO_DATE, policy, policy_id, reason,
    revert,
};
use keywarden::sim::deploy::{Deployment, deploy};
use support::anvil::Anvil;

const OS: B256 = b256!("0000000000000000000000000000000000000000000000000000000000000051");
const MR: B256 = b256!("00000000000000000000000000000000000000000000000000000000000000a6");
const DEV: B256 = b256!("00000000000000000000000000000000000000000000000000000000000000de");
const COMPOSE: B256 = b256!("00000000000000000000000000000000000000000000000000000000000000c0");
const OTHER: B256 = b256!("00000000000000000000000000000000000000000000000000000000000000ff");

struct Ctx {
    _anvil: Anvil,
    provider: DynProvider,
    d: Deployment,
    owner: Address,
    other: Address,
    third: Address,
}

impl Ctx {
    fn kms(&self) -> DstackKms::DstackKmsInstance<DynProvider> {
        DstackKms::new(self.d.kms, self.provider.clone())
    }
    fn app(&self, at: Address) -> DstackApp::DstackAppInstance<DynProvider> {
        DstackApp::new(at, self.provider.clone())
    }
    async fn create(&self, code: Bytes) -> Address {
        let tx = TransactionRequest::default()
            .with_from(self.owner)
            .with_deploy_code(code);
        let receipt = self
            .provider
            .send_transaction(tx)
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap();
        assert!(receipt.status());
        receipt.contract_address.unwrap()
    }
    async fn implementation_of(&self, proxy: Address) -> Address {
        let word = self
            .provider
            .get_storage_at(proxy, IMPLEMENTATION_SLOT.into())
            .await
            .unwrap();
        Address::from_word(word.into())
    }
}

async fn setup() -> Ctx {
    let anvil = Anvil::spawn();
    let d = deploy(&anvil.url()).await.expect("deploy");
    let provider = ProviderBuilder::new().connect_http(anvil.url()).erased();
    let accounts = provider.get_accounts().await.unwrap();
    Ctx {
        _anvil: anvil,
        provider,
        d,
        owner: accounts[0],
        other: accounts[1],
        third: accounts[2],
    }
}

/// Sends a contract call from an account and asserts it succeeded.
macro_rules! send {
    ($call:expr, $from:expr) => {{
        let receipt = $call
            .from($from)
            .send()
            .await
            .expect("send")
            .get_receipt()
            .await
            .expect("receipt");
        assert!(receipt.status(), "transaction reverted");
        receipt
    }};
}

/// Simulates a contract call from an account and returns its revert error.
macro_rules! reverts {
    ($call:expr, $from:expr) => {{
        match $call.from($from).call().await {
            Ok(_) => panic!("call unexpectedly succeeded"),
            Err(e) => e,
        }
    }};
}

fn events<E: SolEvent>(r: &TransactionReceipt, at: Address) -> Vec<E> {
    r.inner
        .logs()
        .iter()
        .filter(|l| l.address() == at)
        .filter_map(|l| l.log_decode::<E>().ok())
        .map(|l| l.inner.data)
        .collect()
}

/// `(actor, label hash, value, enabled)` of every PolicyChanged emitted by `at`.
fn policies(r: &TransactionReceipt, at: Address) -> Vec<(Address, B256, B256, bool)> {
    events::<DstackKms::PolicyChanged>(r, at)
        .into_iter()
        .map(|e| (e.actor, e.policy, e.value, e.enabled))
        .collect()
}

fn pc(actor: Address, label: &str, value: B256, enabled: bool) -> (Address, B256, B256, bool) {
    (actor, policy_id(label), value, enabled)
}

fn flag(b: bool) -> B256 {
    if b {
        B256::with_last_byte(1)
    } else {
        B256::ZERO
    }
}

fn revert_reason(e: &alloy::contract::Error) -> String {
    e.as_decoded_error::<Revert>()
        .map(|r| r.reason)
        .unwrap_or_else(|| panic!("expected a revert string, got {e}"))
}

fn assert_unauthorized(e: &alloy::contract::Error, who: Address) {
    let err = e
        .as_decoded_error::<DstackKms::OwnableUnauthorizedAccount>()
        .unwrap_or_else(|| panic!("expected OwnableUnauthorizedAccount, got {e}"));
    assert_eq!(err.account, who);
}

#[derive(Clone)]
struct Boot {
    app_id: Address,
    compose: B256,
    device: B256,
    mr: B256,
    os: B256,
    tcb: &'static str,
}

impl Boot {
    fn new(app_id: Address) -> Self {
        Self {
            app_id,
            compose: COMPOSE,
            device: DEV,
            mr: MR,
            os: OS,
            tcb: TCB_UP_TO_DATE,
        }
    }
    fn kms(&self) -> DstackKms::AppBootInfo {
        DstackKms::AppBootInfo {
            appId: self.app_id,
            composeHash: self.compose,
            instanceId: Address::repeat_byte(0x11),
            deviceId: self.device,
            mrAggregated: self.mr,
            mrSystem: B256::repeat_byte(0x22),
            osImageHash: self.os,
            tcbStatus: self.tcb.to_owned(),
            advisoryIds: vec!["INTEL-SA-00000".to_owned()],
        }
    }
    fn app(&self) -> DstackApp::AppBootInfo {
        self.kms().into()
    }
}

#[tokio::test]
async fn deploy_reports_a_working_deployment() {
    let c = setup().await;
    let kms = c.kms();
    assert_eq!(kms.owner().call().await.unwrap(), c.owner);
    assert_eq!(kms.pendingOwner().call().await.unwrap(), Address::ZERO);
    assert_eq!(
        kms.appImplementation().call().await.unwrap(),
        c.d.app_implementation
    );
    assert!(kms.registeredApps(c.d.app).call().await.unwrap());
    assert_ne!(c.d.app, c.d.app_implementation);
    assert_eq!(c.implementation_of(c.d.app).await, c.d.app_implementation);
    let app = c.app(c.d.app);
    assert_eq!(app.owner().call().await.unwrap(), c.owner);
    assert_eq!(app.version().call().await.unwrap(), U256::from(2));
    assert!(!app.allowAnyDevice().call().await.unwrap());
    assert!(!app.requireTcbUpToDate().call().await.unwrap());

    // The KMS proxy's implementation is a DstackKms implementation (UUPS marker answers).
    let kms_impl = c.implementation_of(c.d.kms).await;
    assert_ne!(kms_impl, Address::ZERO);
    assert_eq!(
        DstackKms::new(kms_impl, c.provider.clone())
            .proxiableUUID()
            .call()
            .await
            .unwrap(),
        IMPLEMENTATION_SLOT
    );
    // The bare implementation cannot be initialised by anyone.
    let e = reverts!(
        DstackKms::new(kms_impl, c.provider.clone()).initialize(c.other, Address::ZERO),
        c.other
    );
    assert!(
        e.as_decoded_error::<DstackKms::InvalidInitialization>()
            .is_some()
    );

    // The reported block holds the proxy's initialisation events.
    let logs = c
        .provider
        .get_logs(
            &alloy::rpc::types::Filter::new()
                .address(c.d.kms)
                .from_block(c.d.block)
                .to_block(c.d.block),
        )
        .await
        .unwrap();
    let topics: Vec<B256> = logs.iter().filter_map(|l| l.topic0().copied()).collect();
    assert!(topics.contains(&DstackKms::Initialized::SIGNATURE_HASH));
    assert!(topics.contains(&DstackKms::Upgraded::SIGNATURE_HASH));
    assert!(topics.contains(&DstackKms::OwnershipTransferred::SIGNATURE_HASH));
    let earlier = c
        .provider
        .get_logs(
            &alloy::rpc::types::Filter::new()
                .address(c.d.kms)
                .from_block(0)
                .to_block(c.d.block - 1),
        )
        .await
        .unwrap();
    assert!(earlier.is_empty());

    let json = serde_json::to_value(c.d).unwrap();
    let mut keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["app", "app_implementation", "block", "kms"]);
    assert_eq!(json["kms"], format!("{:#x}", c.d.kms));
    assert_eq!(json["block"], c.d.block);
    assert_eq!(serde_json::from_value::<Deployment>(json).unwrap(), c.d);
    let text = c.d.to_string();
    assert!(text.contains(&c.d.kms.to_string()) && text.contains(&c.d.block.to_string()));
}

#[tokio::test]
async fn kms_governance_emits_specific_events_and_policy_changes() {
    let c = setup().await;
    let kms = c.kms();
    let at = c.d.kms;
    let o = c.owner;

    let r = send!(kms.addOsImageHash(OS), o);
    assert_eq!(
        events::<DstackKms::OsImageHashAdded>(&r, at),
        [DstackKms::OsImageHashAdded { osImageHash: OS }]
    );
    assert_eq!(policies(&r, at), [pc(o, policy::OS_IMAGE, OS, true)]);
    assert!(kms.allowedOsImages(OS).call().await.unwrap());
    let r = send!(kms.removeOsImageHash(OS), o);
    assert_eq!(
        events::<DstackKms::OsImageHashRemoved>(&r, at),
        [DstackKms::OsImageHashRemoved { osImageHash: OS }]
    );
    assert_eq!(policies(&r, at), [pc(o, policy::OS_IMAGE, OS, false)]);
    assert!(!kms.allowedOsImages(OS).call().await.unwrap());

    let r = send!(kms.addKmsAggregatedMr(MR), o);
    assert_eq!(
        events::<DstackKms::KmsAggregatedMrAdded>(&r, at),
        [DstackKms::KmsAggregatedMrAdded { mrAggregated: MR }]
    );
    assert_eq!(
        policies(&r, at),
        [pc(o, policy::KMS_AGGREGATED_MR, MR, true)]
    );
    assert!(kms.kmsAllowedAggregatedMrs(MR).call().await.unwrap());
    let r = send!(kms.removeKmsAggregatedMr(MR), o);
    assert_eq!(
        events::<DstackKms::KmsAggregatedMrRemoved>(&r, at),
        [DstackKms::KmsAggregatedMrRemoved { mrAggregated: MR }]
    );
    assert_eq!(
        policies(&r, at),
        [pc(o, policy::KMS_AGGREGATED_MR, MR, false)]
    );
    assert!(!kms.kmsAllowedAggregatedMrs(MR).call().await.unwrap());

    let r = send!(kms.addKmsDevice(DEV), o);
    assert_eq!(
        events::<DstackKms::KmsDeviceAdded>(&r, at),
        [DstackKms::KmsDeviceAdded { deviceId: DEV }]
    );
    assert_eq!(policies(&r, at), [pc(o, policy::KMS_DEVICE, DEV, true)]);
    assert!(kms.kmsAllowedDeviceIds(DEV).call().await.unwrap());
    let r = send!(kms.removeKmsDevice(DEV), o);
    assert_eq!(
        events::<DstackKms::KmsDeviceRemoved>(&r, at),
        [DstackKms::KmsDeviceRemoved { deviceId: DEV }]
    );
    assert_eq!(policies(&r, at), [pc(o, policy::KMS_DEVICE, DEV, false)]);
    assert!(!kms.kmsAllowedDeviceIds(DEV).call().await.unwrap());

    let info = DstackKms::KmsInfo {
        k256Pubkey: Bytes::from_static(&[2; 33]),
        caPubkey: Bytes::from_static(&[4; 65]),
        quote: Bytes::from_static(b"quote"),
        eventlog: Bytes::from_static(b"[]"),
    };
    let r = send!(kms.setKmsInfo(info.clone()), o);
    assert_eq!(
        events::<DstackKms::KmsInfoSet>(&r, at),
        [DstackKms::KmsInfoSet {
            k256Pubkey: info.k256Pubkey.clone()
        }]
    );
    assert_eq!(
        policies(&r, at),
        [pc(o, policy::KMS_INFO, keccak256(&info.k256Pubkey), true)]
    );
    // setKmsQuote / setKmsEventlog change state without any event.
    let r = send!(kms.setKmsQuote(Bytes::from_static(b"quote-2")), o);
    assert!(r.inner.logs().is_empty());
    let r = send!(kms.setKmsEventlog(Bytes::from_static(b"[1]")), o);
    assert!(r.inner.logs().is_empty());
    let stored = kms.kmsInfo().call().await.unwrap();
    assert_eq!(stored.k256Pubkey, info.k256Pubkey);
    assert_eq!(stored.caPubkey, info.caPubkey);
    assert_eq!(stored.quote, Bytes::from_static(b"quote-2"));
    assert_eq!(stored.eventlog, Bytes::from_static(b"[1]"));

    let r = send!(kms.setGatewayAppId("gateway-1".to_owned()), o);
    assert_eq!(
        events::<DstackKms::GatewayAppIdSet>(&r, at),
        [DstackKms::GatewayAppIdSet {
            gatewayAppId: "gateway-1".to_owned()
        }]
    );
    assert_eq!(
        policies(&r, at),
        [pc(o, policy::GATEWAY_APP_ID, keccak256("gateway-1"), true)]
    );
    assert_eq!(kms.gatewayAppId().call().await.unwrap(), "gateway-1");
    let r = send!(kms.setGatewayAppId(String::new()), o);
    assert_eq!(
        policies(&r, at),
        [pc(o, policy::GATEWAY_APP_ID, keccak256(""), false)]
    );

    let new_app_impl = c.create(Artifact::DstackApp.bytecode().unwrap()).await;
    let r = send!(kms.setAppImplementation(new_app_impl), o);
    assert_eq!(
        events::<DstackKms::AppImplementationSet>(&r, at),
        [DstackKms::AppImplementationSet {
            implementation: new_app_impl
        }]
    );
    assert_eq!(
        policies(&r, at),
        [pc(
            o,
            policy::APP_IMPLEMENTATION,
            new_app_impl.into_word(),
            true
        )]
    );
    assert_eq!(kms.appImplementation().call().await.unwrap(), new_app_impl);

    // Anyone may register an app, even twice; address zero reverts.
    let someone = Address::repeat_byte(0x42);
    let r = send!(kms.registerApp(someone), c.other);
    assert_eq!(
        events::<DstackKms::AppRegistered>(&r, at),
        [DstackKms::AppRegistered { appId: someone }]
    );
    assert_eq!(
        policies(&r, at),
        [pc(
            c.other,
            policy::REGISTERED_APP,
            someone.into_word(),
            true
        )]
    );
    // Registering again does not revert (as upstream).
    send!(kms.registerApp(someone), c.other);
    assert!(kms.registeredApps(someone).call().await.unwrap());
    let e = reverts!(kms.registerApp(Address::ZERO), c.other);
    assert_eq!(revert_reason(&e), revert::INVALID_APP_ID);

    // Every owner-only function rejects another account.
    let x = c.other;
    assert_unauthorized(&reverts!(kms.addOsImageHash(OS), x), x);
    assert_unauthorized(&reverts!(kms.removeOsImageHash(OS), x), x);
    assert_unauthorized(&reverts!(kms.addKmsAggregatedMr(MR), x), x);
    assert_unauthorized(&reverts!(kms.removeKmsAggregatedMr(MR), x), x);
    assert_unauthorized(&reverts!(kms.addKmsDevice(DEV), x), x);
    assert_unauthorized(&reverts!(kms.removeKmsDevice(DEV), x), x);
    assert_unauthorized(&reverts!(kms.setKmsInfo(info.clone()), x), x);
    assert_unauthorized(&reverts!(kms.setKmsQuote(Bytes::new()), x), x);
    assert_unauthorized(&reverts!(kms.setKmsEventlog(Bytes::new()), x), x);
    assert_unauthorized(&reverts!(kms.setGatewayAppId(String::new()), x), x);
    assert_unauthorized(&reverts!(kms.setAppImplementation(x), x), x);
    assert_unauthorized(&reverts!(kms.upgradeToAndCall(x, Bytes::new()), x), x);

    // ERC-165.
    assert!(
        kms.supportsInterface([0x01, 0xff, 0xc9, 0xa7].into())
            .call()
            .await
            .unwrap()
    );
    assert!(
        kms.supportsInterface([0x1e, 0x07, 0x91, 0x98].into())
            .call()
            .await
            .unwrap()
    );
    assert!(
        !kms.supportsInterface([0xff; 4].into())
            .call()
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn deploy_and_register_app_overloads() {
    let c = setup().await;
    let kms = c.kms();
    let at = c.d.kms;

    // 6-argument overload, called by another account, owner = that account.
    let r = send!(
        kms.deployAndRegisterApp_1(c.other, false, true, false, DEV, COMPOSE),
        c.other
    );
    let deployed = events::<DstackKms::AppDeployedViaFactory>(&r, at);
    assert_eq!(deployed.len(), 1);
    let app_id = deployed[0].appId;
    assert_eq!(deployed[0].deployer, c.other);
    assert_eq!(
        events::<DstackKms::AppRegistered>(&r, at),
        [DstackKms::AppRegistered { appId: app_id }]
    );
    assert_eq!(
        policies(&r, at),
        [pc(
            c.other,
            policy::REGISTERED_APP,
            app_id.into_word(),
            true
        )]
    );
    // The app proxy initialised itself in the same transaction; the factory is the actor.
    assert_eq!(
        events::<DstackApp::DeviceAdded>(&r, app_id),
        [DstackApp::DeviceAdded { deviceId: DEV }]
    );
    assert_eq!(
        events::<DstackApp::ComposeHashAdded>(&r, app_id),
        [DstackApp::ComposeHashAdded {
            composeHash: COMPOSE
        }]
    );
    // As upstream's initialiser: the TCB requirement is set without any event.
    assert!(events::<DstackApp::RequireTcbUpToDateSet>(&r, app_id).is_empty());
    assert!(events::<DstackApp::AllowAnyDeviceSet>(&r, app_id).is_empty());
    assert_eq!(
        events::<DstackApp::Initialized>(&r, app_id),
        [DstackApp::Initialized { version: 1 }]
    );
    assert_eq!(
        events::<DstackApp::OwnershipTransferred>(&r, app_id),
        [DstackApp::OwnershipTransferred {
            previousOwner: Address::ZERO,
            newOwner: c.other
        }]
    );
    assert_eq!(
        policies(&r, app_id),
        [
            pc(at, policy::DEVICE, DEV, true),
            pc(at, policy::COMPOSE_HASH, COMPOSE, true),
        ]
    );
    let app = c.app(app_id);
    assert_eq!(app.owner().call().await.unwrap(), c.other);
    assert!(app.requireTcbUpToDate().call().await.unwrap());
    assert!(app.allowedComposeHashes(COMPOSE).call().await.unwrap());
    assert!(app.allowedDeviceIds(DEV).call().await.unwrap());
    // Initialisers run once.
    let e = reverts!(
        app.initialize_1(c.other, false, false, false, B256::ZERO, B256::ZERO),
        c.other
    );
    assert!(
        e.as_decoded_error::<DstackApp::InvalidInitialization>()
            .is_some()
    );
    let e = reverts!(
        app.initialize_0(c.other, false, false, B256::ZERO, B256::ZERO),
        c.other
    );
    assert!(
        e.as_decoded_error::<DstackApp::InvalidInitialization>()
            .is_some()
    );

    // Legacy 5-argument overload: allowAnyDevice + disableUpgrades, TCB requirement off.
    let r = send!(
        kms.deployAndRegisterApp_0(c.owner, true, true, B256::ZERO, COMPOSE),
        c.owner
    );
    let legacy = events::<DstackKms::AppDeployedViaFactory>(&r, at)[0].appId;
    assert!(kms.registeredApps(legacy).call().await.unwrap());
    assert_eq!(
        policies(&r, legacy),
        [pc(at, policy::COMPOSE_HASH, COMPOSE, true)]
    );
    // Both flags were set silently.
    assert!(events::<DstackApp::UpgradesDisabled>(&r, legacy).is_empty());
    assert!(events::<DstackApp::AllowAnyDeviceSet>(&r, legacy).is_empty());
    let app = c.app(legacy);
    assert!(app.allowAnyDevice().call().await.unwrap());
    assert!(!app.requireTcbUpToDate().call().await.unwrap());
    assert!(!app.allowedDeviceIds(B256::ZERO).call().await.unwrap());

    // Without an implementation the factory refuses; so does a zero owner.
    send!(kms.setAppImplementation(Address::ZERO), c.owner);
    let e = reverts!(
        kms.deployAndRegisterApp_1(c.owner, false, false, false, DEV, COMPOSE),
        c.owner
    );
    assert_eq!(revert_reason(&e), revert::APP_IMPLEMENTATION_NOT_SET);
    send!(kms.setAppImplementation(c.d.app_implementation), c.owner);
    let e = reverts!(
        kms.deployAndRegisterApp_1(Address::ZERO, false, false, false, DEV, COMPOSE),
        c.owner
    );
    assert_eq!(revert_reason(&e), revert::INVALID_OWNER);
}

#[tokio::test]
async fn app_governance_emits_specific_events_and_policy_changes() {
    let c = setup().await;
    let app = c.app(c.d.app);
    let at = c.d.app;
    let o = c.owner;

    let r = send!(app.addComposeHash(COMPOSE), o);
    assert_eq!(
        events::<DstackApp::ComposeHashAdded>(&r, at),
        [DstackApp::ComposeHashAdded {
            composeHash: COMPOSE
        }]
    );
    assert_eq!(
        policies(&r, at),
        [pc(o, policy::COMPOSE_HASH, COMPOSE, true)]
    );
    let r = send!(app.removeComposeHash(COMPOSE), o);
    assert_eq!(
        events::<DstackApp::ComposeHashRemoved>(&r, at),
        [DstackApp::ComposeHashRemoved {
            composeHash: COMPOSE
        }]
    );
    assert_eq!(
        policies(&r, at),
        [pc(o, policy::COMPOSE_HASH, COMPOSE, false)]
    );
    assert!(!app.allowedComposeHashes(COMPOSE).call().await.unwrap());

    let r = send!(app.addDevice(DEV), o);
    assert_eq!(
        events::<DstackApp::DeviceAdded>(&r, at),
        [DstackApp::DeviceAdded { deviceId: DEV }]
    );
    assert_eq!(policies(&r, at), [pc(o, policy::DEVICE, DEV, true)]);
    let r = send!(app.removeDevice(DEV), o);
    assert_eq!(
        events::<DstackApp::DeviceRemoved>(&r, at),
        [DstackApp::DeviceRemoved { deviceId: DEV }]
    );
    assert_eq!(policies(&r, at), [pc(o, policy::DEVICE, DEV, false)]);
    assert!(!app.allowedDeviceIds(DEV).call().await.unwrap());

    for value in [true, false] {
        let r = send!(app.setAllowAnyDevice(value), o);
        assert_eq!(
            events::<DstackApp::AllowAnyDeviceSet>(&r, at),
            [DstackApp::AllowAnyDeviceSet { allowAny: value }]
        );
        assert_eq!(
            policies(&r, at),
            [pc(o, policy::ALLOW_ANY_DEVICE, flag(value), value)]
        );
        assert_eq!(app.allowAnyDevice().call().await.unwrap(), value);

        let r = send!(app.setRequireTcbUpToDate(value), o);
        assert_eq!(
            events::<DstackApp::RequireTcbUpToDateSet>(&r, at),
            [DstackApp::RequireTcbUpToDateSet {
                requireUpToDate: value
            }]
        );
        assert_eq!(
            policies(&r, at),
            [pc(o, policy::REQUIRE_TCB_UP_TO_DATE, flag(value), value)]
        );
        assert_eq!(app.requireTcbUpToDate().call().await.unwrap(), value);
    }

    let x = c.other;
    assert_unauthorized(&reverts!(app.addComposeHash(COMPOSE), x), x);
    assert_unauthorized(&reverts!(app.removeComposeHash(COMPOSE), x), x);
    assert_unauthorized(&reverts!(app.addDevice(DEV), x), x);
    assert_unauthorized(&reverts!(app.removeDevice(DEV), x), x);
    assert_unauthorized(&reverts!(app.setAllowAnyDevice(true), x), x);
    assert_unauthorized(&reverts!(app.setRequireTcbUpToDate(true), x), x);
    assert_unauthorized(&reverts!(app.disableUpgrades(), x), x);
    assert_unauthorized(&reverts!(app.upgradeToAndCall(x, Bytes::new()), x), x);

    // Upgrades work until disabled, then never again.
    let v2 = c.create(Artifact::DstackApp.bytecode().unwrap()).await;
    let r = send!(app.upgradeToAndCall(v2, Bytes::new()), o);
    assert_eq!(
        events::<DstackApp::Upgraded>(&r, at),
        [DstackApp::Upgraded { implementation: v2 }]
    );
    assert_eq!(
        policies(&r, at),
        [pc(o, policy::IMPLEMENTATION_UPGRADE, v2.into_word(), true)]
    );
    assert_eq!(c.implementation_of(at).await, v2);

    let r = send!(app.disableUpgrades(), o);
    assert_eq!(events::<DstackApp::UpgradesDisabled>(&r, at).len(), 1);
    assert_eq!(
        policies(&r, at),
        [pc(o, policy::UPGRADES_DISABLED, flag(true), true)]
    );
    let v3 = c.create(Artifact::DstackApp.bytecode().unwrap()).await;
    let e = reverts!(app.upgradeToAndCall(v3, Bytes::new()), o);
    assert_eq!(revert_reason(&e), revert::UPGRADES_DISABLED);
    assert_eq!(c.implementation_of(at).await, v2);
}

#[tokio::test]
async fn is_kms_allowed_checks_in_order() {
    let c = setup().await;
    let kms = c.kms();
    let o = c.owner;
    let check = |b: Boot| {
        let kms = kms.clone();
        async move {
            let r = kms.isKmsAllowed(b.kms()).call().await.unwrap();
            (r.isAllowed, r.reason)
        }
    };
    let no = |s: &str| (false, s.to_owned());
    let good = Boot::new(Address::ZERO);

    // Nothing allowed yet: the first failing check wins; TCB is checked first.
    let stale = Boot {
        tcb: "OutOfDate",
        ..good.clone()
    };
    assert_eq!(check(stale.clone()).await, no(reason::TCB_NOT_UP_TO_DATE));
    assert_eq!(check(good.clone()).await, no(reason::OS_IMAGE_NOT_ALLOWED));
    send!(kms.addOsImageHash(OS), o);
    assert_eq!(check(stale.clone()).await, no(reason::TCB_NOT_UP_TO_DATE));
    assert_eq!(
        check(good.clone()).await,
        no(reason::AGGREGATED_MR_NOT_ALLOWED)
    );
    send!(kms.addKmsAggregatedMr(MR), o);
    assert_eq!(
        check(good.clone()).await,
        no(reason::KMS_DEVICE_NOT_ALLOWED)
    );
    send!(kms.addKmsDevice(DEV), o);
    assert_eq!(check(good.clone()).await, (true, String::new()));
    assert_eq!(check(stale).await, no(reason::TCB_NOT_UP_TO_DATE));
    assert_eq!(
        check(Boot {
            tcb: "",
            ..good.clone()
        })
        .await,
        no(reason::TCB_NOT_UP_TO_DATE)
    );
    assert_eq!(
        check(Boot {
            device: OTHER,
            ..good.clone()
        })
        .await,
        no(reason::KMS_DEVICE_NOT_ALLOWED)
    );
    assert_eq!(
        check(Boot {
            mr: OTHER,
            device: OTHER,
            ..good.clone()
        })
        .await,
        no(reason::AGGREGATED_MR_NOT_ALLOWED)
    );
    send!(kms.removeOsImageHash(OS), o);
    assert_eq!(check(good).await, no(reason::OS_IMAGE_NOT_ALLOWED));
}

#[tokio::test]
async fn is_app_allowed_checks_in_order() {
    let c = setup().await;
    let kms = c.kms();
    let app = c.app(c.d.app);
    let o = c.owner;
    let via_kms = |b: Boot| {
        let kms = kms.clone();
        async move {
            let r = kms.isAppAllowed(b.kms()).call().await.unwrap();
            (r.isAllowed, r.reason)
        }
    };
    let via_app = |b: Boot| {
        let app = app.clone();
        async move {
            let r = app.isAppAllowed(b.app()).call().await.unwrap();
            (r.isAllowed, r.reason)
        }
    };
    let no = |s: &str| (false, s.to_owned());
    let good = Boot::new(c.d.app);

    // Unregistered app (checked before the OS image).
    let unregistered = Boot::new(Address::repeat_byte(0x77));
    assert_eq!(
        via_kms(unregistered.clone()).await,
        no(reason::APP_NOT_REGISTERED)
    );
    assert_eq!(
        via_kms(good.clone()).await,
        no(reason::OS_IMAGE_NOT_ALLOWED)
    );
    send!(kms.addOsImageHash(OS), o);
    assert_eq!(via_kms(unregistered).await, no(reason::APP_NOT_REGISTERED));
    // A registered address without code (anyone can register anything).
    send!(kms.registerApp(c.third), c.other);
    assert_eq!(
        via_kms(Boot::new(c.third)).await,
        no(reason::APP_HAS_NO_CODE)
    );
    // From here the app contract decides: compose hash, then device.
    assert_eq!(
        via_kms(good.clone()).await,
        no(reason::COMPOSE_HASH_NOT_ALLOWED)
    );
    send!(app.addComposeHash(COMPOSE), o);
    assert_eq!(via_kms(good.clone()).await, no(reason::DEVICE_NOT_ALLOWED));
    send!(app.addDevice(DEV), o);
    assert_eq!(via_kms(good.clone()).await, (true, String::new()));
    assert_eq!(via_app(good.clone()).await, (true, String::new()));
    // The app ignores the OS image (the KMS checks it), the KMS checks it first.
    let other_os = Boot {
        os: OTHER,
        ..good.clone()
    };
    assert_eq!(via_app(other_os.clone()).await, (true, String::new()));
    assert_eq!(via_kms(other_os).await, no(reason::OS_IMAGE_NOT_ALLOWED));

    // TCB status only matters once required, and is then checked first.
    let stale = Boot {
        tcb: "OutOfDate",
        compose: OTHER,
        device: OTHER,
        ..good.clone()
    };
    assert_eq!(
        via_kms(stale.clone()).await,
        no(reason::COMPOSE_HASH_NOT_ALLOWED)
    );
    send!(app.setRequireTcbUpToDate(true), o);
    assert_eq!(via_kms(stale.clone()).await, no(reason::TCB_NOT_UP_TO_DATE));
    assert_eq!(via_app(stale).await, no(reason::TCB_NOT_UP_TO_DATE));
    let stale_ok = Boot {
        tcb: "SWHardeningNeeded",
        ..good.clone()
    };
    assert_eq!(
        via_kms(stale_ok.clone()).await,
        no(reason::TCB_NOT_UP_TO_DATE)
    );
    send!(app.setRequireTcbUpToDate(false), o);
    assert_eq!(via_kms(stale_ok).await, (true, String::new()));

    // Device check, and allowAnyDevice skipping it (compose hash still checked).
    let other_device = Boot {
        device: OTHER,
        ..good.clone()
    };
    assert_eq!(
        via_kms(other_device.clone()).await,
        no(reason::DEVICE_NOT_ALLOWED)
    );
    send!(app.setAllowAnyDevice(true), o);
    assert_eq!(via_kms(other_device.clone()).await, (true, String::new()));
    assert_eq!(
        via_kms(Boot {
            compose: OTHER,
            ..other_device.clone()
        })
        .await,
        no(reason::COMPOSE_HASH_NOT_ALLOWED)
    );
    send!(app.setAllowAnyDevice(false), o);
    assert_eq!(via_kms(other_device).await, no(reason::DEVICE_NOT_ALLOWED));

    // Removing the compose hash closes the app again.
    send!(app.removeComposeHash(COMPOSE), o);
    assert_eq!(via_kms(good).await, no(reason::COMPOSE_HASH_NOT_ALLOWED));
}

#[tokio::test]
async fn ownership_is_two_step() {
    let c = setup().await;
    let kms = c.kms();
    let app = c.app(c.d.app);
    let (o, x, y) = (c.owner, c.other, c.third);

    // KMS: start, a stranger cannot accept, the new owner accepts.
    let r = send!(kms.transferOwnership(x), o);
    assert_eq!(
        events::<DstackKms::OwnershipTransferStarted>(&r, c.d.kms),
        [DstackKms::OwnershipTransferStarted {
            previousOwner: o,
            newOwner: x
        }]
    );
    assert_eq!(kms.owner().call().await.unwrap(), o);
    assert_eq!(kms.pendingOwner().call().await.unwrap(), x);
    assert_unauthorized(&reverts!(kms.acceptOwnership(), y), y);
    // Still the old owner's until accepted.
    send!(kms.addOsImageHash(OS), o);
    assert_unauthorized(&reverts!(kms.addOsImageHash(OS), x), x);
    let r = send!(kms.acceptOwnership(), x);
    assert_eq!(
        events::<DstackKms::OwnershipTransferred>(&r, c.d.kms),
        [DstackKms::OwnershipTransferred {
            previousOwner: o,
            newOwner: x
        }]
    );
    assert_eq!(kms.owner().call().await.unwrap(), x);
    assert_eq!(kms.pendingOwner().call().await.unwrap(), Address::ZERO);
    assert_unauthorized(&reverts!(kms.addOsImageHash(OS), o), o);
    send!(kms.addOsImageHash(OTHER), x);

    // A new transfer replaces a pending one.
    send!(kms.transferOwnership(o), x);
    send!(kms.transferOwnership(y), x);
    assert_unauthorized(&reverts!(kms.acceptOwnership(), o), o);
    assert_eq!(kms.pendingOwner().call().await.unwrap(), y);

    // Renouncing clears the pending owner and leaves nobody in charge.
    let r = send!(kms.renounceOwnership(), x);
    assert_eq!(
        events::<DstackKms::OwnershipTransferred>(&r, c.d.kms),
        [DstackKms::OwnershipTransferred {
            previousOwner: x,
            newOwner: Address::ZERO
        }]
    );
    assert_eq!(kms.owner().call().await.unwrap(), Address::ZERO);
    assert_eq!(kms.pendingOwner().call().await.unwrap(), Address::ZERO);
    assert_unauthorized(&reverts!(kms.acceptOwnership(), y), y);
    assert_unauthorized(&reverts!(kms.addOsImageHash(OS), x), x);

    // The app contract has the same two-step ownership.
    let r = send!(app.transferOwnership(x), o);
    assert_eq!(
        events::<DstackApp::OwnershipTransferStarted>(&r, c.d.app),
        [DstackApp::OwnershipTransferStarted {
            previousOwner: o,
            newOwner: x
        }]
    );
    assert_eq!(app.pendingOwner().call().await.unwrap(), x);
    assert_eq!(app.owner().call().await.unwrap(), o);
    send!(app.acceptOwnership(), x);
    assert_eq!(app.owner().call().await.unwrap(), x);
    send!(app.addComposeHash(COMPOSE), x);
    assert_unauthorized(&reverts!(app.addComposeHash(COMPOSE), o), o);
}

#[tokio::test]
async fn upgrade_to_and_call_emits_upgraded() {
    let c = setup().await;
    let kms = c.kms();
    let o = c.owner;
    send!(kms.addOsImageHash(OS), o);
    let old = c.implementation_of(c.d.kms).await;

    // A fresh implementation; state survives the upgrade.
    let v2 = c.create(Artifact::DstackKms.bytecode().unwrap()).await;
    let r = send!(kms.upgradeToAndCall(v2, Bytes::new()), o);
    assert_eq!(
        events::<DstackKms::Upgraded>(&r, c.d.kms),
        [DstackKms::Upgraded { implementation: v2 }]
    );
    assert_eq!(
        policies(&r, c.d.kms),
        [pc(o, policy::IMPLEMENTATION_UPGRADE, v2.into_word(), true)]
    );
    assert_ne!(old, v2);
    assert_eq!(c.implementation_of(c.d.kms).await, v2);
    assert!(kms.allowedOsImages(OS).call().await.unwrap());
    assert_eq!(kms.owner().call().await.unwrap(), o);

    // Upgrade with a call: the call runs on the new implementation in the proxy's context.
    let v3 = c.create(Artifact::DstackKms.bytecode().unwrap()).await;
    let call =
        alloy::sol_types::SolCall::abi_encode(&DstackKms::addKmsDeviceCall { deviceId: DEV });
    let r = send!(kms.upgradeToAndCall(v3, call.into()), o);
    assert_eq!(
        events::<DstackKms::Upgraded>(&r, c.d.kms),
        [DstackKms::Upgraded { implementation: v3 }]
    );
    assert_eq!(
        events::<DstackKms::KmsDeviceAdded>(&r, c.d.kms),
        [DstackKms::KmsDeviceAdded { deviceId: DEV }]
    );
    assert!(kms.kmsAllowedDeviceIds(DEV).call().await.unwrap());

    // Not a UUPS implementation: an account without code, or a proxy.
    let e = reverts!(kms.upgradeToAndCall(c.third, Bytes::new()), o);
    let no_code = e
        .as_decoded_error::<DstackKms::ImplementationHasNoCode>()
        .unwrap_or_else(|| panic!("{e}"));
    assert_eq!(no_code.implementation, c.third);
    let e = reverts!(kms.upgradeToAndCall(c.d.app, Bytes::new()), o);
    assert!(
        e.as_decoded_error::<DstackKms::UUPSUnsupportedProxiableUUID>()
            .is_some(),
        "{e}"
    );
    // The implementation itself refuses to be upgraded directly.
    let bare = DstackKms::new(v3, c.provider.clone());
    let e = reverts!(bare.upgradeToAndCall(v2, Bytes::new()), o);
    assert!(
        e.as_decoded_error::<DstackKms::UUPSUnauthorizedCallContext>()
            .is_some(),
        "{e}"
    );
    assert_eq!(c.implementation_of(c.d.kms).await, v3);
}
