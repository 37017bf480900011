//! Key dispatch authorized by the on-chain mirror, end to end: anvil with our contracts,
//! `keywarden serve --rpc-url --kms-contract`, simulated guests over RA-TLS. Each on-chain refusal
//! reason reaches the guest, a removal on-chain refuses the next request, and a dead chain fails
//! closed with `chain_state_stale` — on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/guest_chain.rs"]
mod guest_chain;
mod support;
#[path = "support/test_contracts.rs"]
mod test_contracts;

use std::time::{Duration, Instant};

use alloy::primitives::{Address, FixedBytes};
use alloy::providers::DynProvider;
use common::Keywarden;
use guest_chain::{GuestChain, allow_simulated_guest};
use keywarden::attestation::{AttestationConfig, BootInfo, Verifier};
use keywarden::chain::contracts::{DstackApp, DstackKms};
use keywarden::sim::client::{self, ClientError, Guest};
use keywarden::sim::testpki::{GuestSpec, TestPki, TestTcb};
use sha2::{Digest as _, Sha256};
use support::anvil::Anvil;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

const COMPOSE: &[u8] = b"{\"name\":\"kms-chain-test\"}";

/// A simulated guest of `app` with `compose`, on a platform at `tcb`.
fn spec(app: Address, compose: &[u8], tcb: TestTcb) -> GuestSpec {
    GuestSpec {
        tcb,
        ..client::guest_spec(app.into_array(), compose, vec![0x1d; 20])
    }
}
/// An OS image this KMS knows (same measurements as the simulated one) but the chain never allowed.
const UNLISTED_IMAGE: [u8; 32] = [0x0e; 32];

struct Setup {
    anvil: Option<Anvil>,
    provider: DynProvider,
    owner: Address,
    kms: Address,
    app_implementation: Address,
    app: Address,
    kw: Keywarden,
    ca: String,
    pki: TestPki,
    _dir: tempfile::TempDir,
}

async fn setup(database_url: Option<&str>) -> Setup {
    setup_with(database_url, &[]).await
}

/// Like [`setup`], with further environment overrides for keywarden.
async fn setup_with(database_url: Option<&str>, extra_env: &[(&str, &str)]) -> Setup {
    let anvil = Anvil::spawn();
    let GuestChain {
        deployment,
        provider,
        owner,
    } = allow_simulated_guest(&anvil.url(), COMPOSE).await;

    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let pki = TestPki::generate(now - 60).unwrap();
    let pki_dir = dir.path().join("pki");
    pki.save(&pki_dir).unwrap();
    let images = keywarden::kms::osimage::env_value(&[
        client::simulated_os_image(),
        client::simulated_os_image_as(&UNLISTED_IMAGE),
    ]);
    let rpc = anvil.url().to_string();
    let (kms_addr, start) = (deployment.kms.to_string(), deployment.block.to_string());
    let mut args = vec![
        "--insecure-test-pki",
        pki_dir.to_str().unwrap(),
        "--rpc-url",
        &rpc,
        "--kms-contract",
        &kms_addr,
        "--start-block",
        &start,
    ];
    if let Some(url) = database_url {
        args.extend(["--database-url", url]);
    }
    let mut env = vec![
        ("KEYWARDEN_KMS__OS_IMAGES", images.as_str()),
        // anvil mines only on transactions: follow the latest block, poll fast.
        ("KEYWARDEN_CHAIN__CONFIRMATIONS", "0"),
        ("KEYWARDEN_CHAIN__POLL_INTERVAL", "100ms"),
        ("KEYWARDEN_CHAIN__MAX_STALENESS", "2s"),
    ];
    env.extend_from_slice(extra_env);
    let mut kw = Keywarden::start(&dir.path().join("data"), &args, &env);
    kw.wait_ready().await;
    let ca = std::fs::read_to_string(dir.path().join("data/kms/root-ca.pem")).unwrap();
    Setup {
        anvil: Some(anvil),
        provider,
        owner,
        kms: deployment.kms,
        app_implementation: deployment.app_implementation,
        app: deployment.app,
        kw,
        ca,
        pki,
        _dir: dir,
    }
}

impl Setup {
    async fn boot(&self, app: Address, compose: &[u8], vm_config: &str) -> Result<(), ClientError> {
        self.boot_as(&spec(app, compose, TestTcb::UpToDate), vm_config)
            .await
    }

    async fn boot_as(&self, spec: &GuestSpec, vm_config: &str) -> Result<(), ClientError> {
        let guest = Guest::enroll(
            &self.kw.api_url(),
            Some(self.ca.clone()),
            &self.pki,
            spec,
            false,
        )
        .await?;
        guest.get_app_key(vm_config).await.map(|_| ())
    }

    /// Boots until the keys are served (the mirror follows the chain within a poll).
    async fn served(&self, app: Address, compose: &[u8], vm_config: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.boot(app, compose, vm_config).await {
                Ok(()) => return,
                Err(e) => assert!(Instant::now() < deadline, "keys still refused: {e:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The KMS's own boot info, from the attestation its RPC server certificate carries.
    async fn kms_own_boot(&self) -> BootInfo {
        let der = self.kw.rpc_cert_der(&self.ca).await;
        let cert = keywarden::attestation::ratls::parse_cert(&der).unwrap();
        assert_eq!(cert.usage.as_deref(), Some("kms:rpc"));
        let verifier = Verifier::with_test_root(
            AttestationConfig::default(),
            Some(self.pki.root_der().to_vec()),
        )
        .unwrap();
        let (_, verified) = verifier
            .verify_ratls_cert(
                &der,
                unix_now(),
                Some(self.pki.collateral()),
                Some(&client::SIMULATED_OS_IMAGE_HASH),
            )
            .unwrap();
        verified.boot_info
    }

    /// Boots until the refusal carries `expected` (the mirror follows the chain within a poll).
    async fn refused_with(
        &self,
        app: Address,
        compose: &[u8],
        vm_config: &str,
        expected: &str,
    ) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.boot(app, compose, vm_config).await {
                Err(ClientError::Refused { status, message }) if message.contains(expected) => {
                    return status;
                }
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "expected a refusal with {expected:?}, got {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn scenario(database_url: Option<&str>) {
    let mut s = setup(database_url).await;
    let vm = client::simulated_vm_config();
    s.boot(s.app, COMPOSE, &vm).await.unwrap();

    // Each of the contracts' reasons reaches the guest, in the contracts' order.
    let stranger = Address::repeat_byte(0x77);
    assert_eq!(
        s.refused_with(stranger, COMPOSE, &vm, "App not registered")
            .await,
        400
    );
    let unlisted = serde_json::json!({"os_image_hash": hex::encode(UNLISTED_IMAGE)}).to_string();
    s.refused_with(s.app, COMPOSE, &unlisted, "OS image is not allowed")
        .await;
    s.refused_with(s.app, b"another compose", &vm, "Compose hash not allowed")
        .await;
    let app = DstackApp::new(s.app, &s.provider);
    send!(app.setAllowAnyDevice(false).from(s.owner));
    s.refused_with(s.app, COMPOSE, &vm, "Device not allowed")
        .await;
    send!(app.setAllowAnyDevice(true).from(s.owner));
    s.served(s.app, COMPOSE, &vm).await;

    // Revocation: removing the compose hash refuses the next request.
    send!(
        app.removeComposeHash(FixedBytes(Sha256::digest(COMPOSE).into()))
            .from(s.owner)
    );
    s.refused_with(s.app, COMPOSE, &vm, "Compose hash not allowed")
        .await;
    // Removing the OS image on the KMS refuses every app on it.
    send!(
        app.addComposeHash(FixedBytes(Sha256::digest(COMPOSE).into()))
            .from(s.owner)
    );
    let kms = DstackKms::new(s.kms, &s.provider);
    send!(
        kms.removeOsImageHash(FixedBytes(client::SIMULATED_OS_IMAGE_HASH))
            .from(s.owner)
    );
    s.refused_with(s.app, COMPOSE, &vm, "OS image is not allowed")
        .await;

    // The chain goes away: after max_staleness the KMS fails closed with 503.
    drop(s.anvil.take());
    assert_eq!(s.refused_with(s.app, COMPOSE, &vm, "stale").await, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_mirror_authorizes_key_requests_on_sqlite() {
    scenario(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_mirror_authorizes_key_requests_on_postgres() {
    let db = common::PgDb::create().await;
    scenario(Some(&db.url)).await;
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_out_of_date_boot_is_refused_only_by_apps_requiring_an_up_to_date_tcb() {
    let s = setup_with(
        None,
        &[(
            "KEYWARDEN_ATTESTATION__TCB__ACCEPTED_STATUSES",
            r#"["UpToDate", "OutOfDate"]"#,
        )],
    )
    .await;
    let vm = client::simulated_vm_config();
    let compose = FixedBytes(Sha256::digest(COMPOSE).into());
    let kms = DstackKms::new(s.kms, &s.provider);
    // requireTcbUpToDate = true, any device.
    let receipt = send!(
        kms.deployAndRegisterApp_1(s.owner, false, true, true, FixedBytes::ZERO, compose)
            .from(s.owner)
    );
    let strict = receipt
        .inner
        .logs()
        .iter()
        .find_map(|log| log.log_decode::<DstackKms::AppDeployedViaFactory>().ok())
        .unwrap()
        .inner
        .data
        .appId;

    let out_of_date = spec(strict, COMPOSE, TestTcb::OutOfDate);
    let deadline = Instant::now() + Duration::from_secs(15);
    let refusal = loop {
        match s.boot_as(&out_of_date, &vm).await {
            Err(ClientError::Refused { message, .. }) if !message.contains("not registered") => {
                break message;
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "the strict app never reached the mirror: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(
        refusal,
        "App not allowed: Boot denied: TCB status is not up to date"
    );
    // The same platform may boot an app that does not require an up-to-date TCB...
    s.boot_as(&spec(s.app, COMPOSE, TestTcb::OutOfDate), &vm)
        .await
        .unwrap();
    // ...and an up-to-date platform may boot the strict app.
    s.boot_as(&spec(strict, COMPOSE, TestTcb::UpToDate), &vm)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attested_kms_serves_keys_only_while_its_own_measurement_is_allowed_on_chain() {
    let s = setup_with(
        None,
        &[("KEYWARDEN_KMS__INSECURE_SELF_ATTEST_WITH_TEST_PKI", "true")],
    )
    .await;
    let vm = client::simulated_vm_config();
    let own = s.kms_own_boot().await;
    assert_eq!(own.tcb_status, "UpToDate");
    assert_eq!(own.os_image_hash, client::SIMULATED_OS_IMAGE_HASH);

    // The KMS's OS image is allowed (setup), its aggregated MR and device are not: no key leaves.
    let not_allowed = "KMS is not allowed: Aggregated MR not allowed";
    assert_eq!(s.refused_with(s.app, COMPOSE, &vm, not_allowed).await, 503);
    let kms = DstackKms::new(s.kms, &s.provider);
    let mr = FixedBytes::<32>::from_slice(&own.mr_aggregated);
    send!(kms.addKmsAggregatedMr(mr).from(s.owner));
    s.refused_with(
        s.app,
        COMPOSE,
        &vm,
        "KMS is not allowed: KMS is not allowed to boot on this device",
    )
    .await;
    send!(
        kms.addKmsDevice(FixedBytes::<32>::from_slice(&own.device_id))
            .from(s.owner)
    );
    s.served(s.app, COMPOSE, &vm).await;
    assert!(
        s.kw.metrics_text()
            .await
            .contains("dstack_kms_self_check_allowed 1")
    );

    // GetMeta carries the bootstrap attestation over the root keys' report data, and, as
    // upstream does with on-chain authorization, the gateway app id and the app implementation
    // from the mirror.
    send!(kms.setGatewayAppId("gateway-app".into()).from(s.owner));
    let deadline = Instant::now() + Duration::from_secs(15);
    let meta = loop {
        let meta: serde_json::Value = common::https(&s._dir.path().join("data"))
            .post(format!("{}/prpc/KMS.GetMeta?json", s.kw.api_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if meta["gateway_app_id"] == "gateway-app" {
            break meta;
        }
        assert!(Instant::now() < deadline, "{meta}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        meta["app_auth_implementation"],
        s.app_implementation.to_checksum(None)
    );
    assert_eq!(meta["chain_id"], 31337);
    let raw = hex::decode(meta["bootstrap_info"]["attestation"].as_str().unwrap()).unwrap();
    let root =
        keywarden::kms::root::load_existing(&s._dir.path().join("data"), &Default::default())
            .unwrap();
    assert_eq!(
        keywarden::attestation::versioned::parse(&raw)
            .unwrap()
            .report_data,
        keywarden::kms::keys::BootstrapInfo::of(&root.root)
            .unwrap()
            .report_data
    );

    // Governance removes the KMS's aggregated MR: the next requests are refused; re-adding it
    // restores service.
    send!(kms.removeKmsAggregatedMr(mr).from(s.owner));
    assert_eq!(s.refused_with(s.app, COMPOSE, &vm, not_allowed).await, 503);
    let text = s.kw.metrics_text().await;
    assert!(text.contains("dstack_kms_self_check_allowed 0"), "{text}");
    assert!(
        text.contains(
            "dstack_kms_requests_total{method=\"get_app_key\",outcome=\"refused\",reason=\"kms_not_allowed\"}"
        ),
        "{text}"
    );
    send!(kms.addKmsAggregatedMr(mr).from(s.owner));
    s.served(s.app, COMPOSE, &vm).await;

    // One log line per transition, however many requests were refused in between.
    let lines = s.kw.lines();
    let count = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(count("this KMS is not allowed"), 2, "{lines:#?}");
    assert_eq!(count("this KMS is allowed"), 2, "{lines:#?}");

    // The KMS contract upgraded to code keywarden does not know: the self-check and the app
    // check are asked of the chain, and still follow governance.
    let v2 = test_contracts::deploy(&s.provider, s.owner, "DstackKmsV2", Vec::new()).await;
    upgrade(&s, s.kms, v2).await;
    s.boot(s.app, COMPOSE, &vm).await.unwrap();
    let text = s.kw.metrics_text().await;
    for check in ["kms", "app"] {
        let series = format!(
            "dstack_kms_mirror_decisions_total{{check=\"{check}\",source=\"eth_call\",reason=\"allowed\"}}"
        );
        assert!(
            keywarden::telemetry::sample_value(&text, &series).unwrap_or(0.0) >= 1.0,
            "{series}: {text}"
        );
    }
    send!(kms.removeKmsAggregatedMr(mr).from(s.owner));
    assert_eq!(s.refused_with(s.app, COMPOSE, &vm, not_allowed).await, 503);
}

/// Upgrades the proxy at `proxy` (the KMS contract or an app) to `to` and waits until the KMS has
/// mirrored the upgrade's block.
async fn upgrade(s: &Setup, proxy: Address, to: Address) {
    let receipt = send!(
        DstackKms::new(proxy, &s.provider)
            .upgradeToAndCall(to, Default::default())
            .from(s.owner)
    );
    mirrored(s, receipt.block_number.unwrap()).await;
}

/// Waits until the KMS's own `dstack_chain_processed_block` reaches `block`.
async fn mirrored(s: &Setup, block: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = s.kw.metrics_text().await;
        let processed = keywarden::telemetry::sample_value(&text, "dstack_chain_processed_block")
            .unwrap_or(0.0);
        if processed >= block as f64 {
            return;
        }
        assert!(Instant::now() < deadline, "block {block} never mirrored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fail-open defect: an app owner upgrades the app's proxy to an implementation that refuses
/// every boot (and emits nothing). The first key request after the upgrade block is mirrored is
/// refused with the contract's own reason; upgrading back serves keys again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_upgraded_to_a_deny_all_implementation_gets_no_keys_after_the_upgrade_block() {
    let s = setup(None).await;
    let vm = client::simulated_vm_config();
    s.served(s.app, COMPOSE, &vm).await;
    let deny = test_contracts::deploy(&s.provider, s.owner, "DenyAllApp", Vec::new()).await;
    upgrade(&s, s.app, deny).await;
    match s.boot(s.app, COMPOSE, &vm).await {
        Err(ClientError::Refused { status, message }) => {
            assert_eq!(status, 400);
            assert!(
                message.contains(test_contracts::DENY_ALL_REASON),
                "{message}"
            );
        }
        other => panic!("keys after the upgrade block: {other:?}"),
    }
    let text = s.kw.metrics_text().await;
    assert_eq!(
        keywarden::telemetry::sample_value(
            &text,
            "dstack_chain_live_evaluation_contracts{contract=\"app\"}"
        ),
        Some(1.0)
    );
    assert!(
        keywarden::telemetry::sample_value(
            &text,
            "dstack_kms_mirror_decisions_total{check=\"app\",source=\"eth_call\",reason=\"app_defined\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        s.kw.lines()
            .iter()
            .any(|l| l.contains("contract switched to live evaluation")),
        "no WARN line naming the switch"
    );
    let known = DstackKms::new(s.kms, &s.provider)
        .appImplementation()
        .call()
        .await
        .unwrap();
    upgrade(&s, s.app, known).await;
    s.served(s.app, COMPOSE, &vm).await;
}

/// `kms client --ppid` claims a device and `--tcb` a TCB level: an app restricted to one device
/// serves that device only, and an app requiring an up-to-date TCB refuses an out-of-date one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_client_claims_a_device_and_a_tcb_level() {
    let s = setup_with(
        None,
        &[(
            "KEYWARDEN_ATTESTATION__TCB__ACCEPTED_STATUSES",
            r#"["UpToDate", "OutOfDate"]"#,
        )],
    )
    .await;
    let (ppid_a, ppid_b) = ([0xa1u8; 16], [0xb2u8; 16]);
    let device_a = FixedBytes::<32>(Sha256::digest(ppid_a).into());
    let app = DstackApp::new(s.app, &s.provider);
    send!(app.setAllowAnyDevice(false).from(s.owner));
    send!(app.addDevice(device_a).from(s.owner));
    send!(app.setRequireTcbUpToDate(true).from(s.owner));
    let head = alloy::providers::Provider::get_block_number(&s.provider)
        .await
        .unwrap();
    mirrored(&s, head).await;
    let dir = s._dir.path();
    let compose = dir.join("compose.json");
    std::fs::write(&compose, COMPOSE).unwrap();
    let client = |extra: &[&str]| {
        let (url, pki, ca) = (
            s.kw.api_url(),
            dir.join("pki").display().to_string(),
            dir.join("data/kms/root-ca.pem").display().to_string(),
        );
        let app_id = hex::encode(s.app);
        let mut args = vec![
            "kms",
            "client",
            "--url",
            &url,
            "--test-pki",
            &pki,
            "--ca",
            &ca,
            "--app-id",
            &app_id,
            "--compose",
            compose.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        common::run_to_end(&args, &[])
    };
    let (a, b) = (hex::encode(ppid_a), hex::encode(ppid_b));
    let (code, _, err) = client(&["--ppid", &a]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = client(&["--ppid", &b]);
    assert_ne!(code, 0);
    assert!(err.contains("Device not allowed"), "{err}");
    let (code, _, err) = client(&["--ppid", &a, "--tcb", "out-of-date"]);
    assert_ne!(code, 0);
    assert!(err.contains("TCB status is not up to date"), "{err}");
    let (code, _, err) = client(&["--ppid", "abc"]);
    assert_eq!(code, 2);
    assert!(err.contains("--ppid must be 32 hex digits"), "{err}");
}

/// A custom `IAppAuth` app (an allow-list by instance id, not a DstackApp): keys for the instances
/// it lists, and for the others its own reason string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_iappauth_app_serves_the_instances_it_lists() {
    let s = setup(None).await;
    let vm = client::simulated_vm_config();
    // The simulated guests of these tests run as instance 0x1d…1d.
    let listed = Address::repeat_byte(0x1d);
    let custom = test_contracts::allow_list_app(&s.provider, s.owner, &[listed]).await;
    send!(
        DstackKms::new(s.kms, &s.provider)
            .registerApp(custom)
            .from(s.owner)
    );
    s.served(custom, COMPOSE, &vm).await;
    let other = GuestSpec {
        instance_id: vec![0x2e; 20],
        ..spec(custom, COMPOSE, TestTcb::UpToDate)
    };
    match s.boot_as(&other, &vm).await {
        Err(ClientError::Refused { status, message }) => {
            assert_eq!(status, 400);
            assert!(
                message.contains(test_contracts::NOT_LISTED_REASON),
                "{message}"
            );
        }
        other => panic!("an unlisted instance got keys: {other:?}"),
    }
}

/// The chain registers a KMS root key (`setKmsInfo`): while it is not this KMS's own, no keys are
/// released (503, one ERROR line per change); registering this KMS's key restores service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_withheld_while_the_registered_kms_key_is_not_ours() {
    let s = setup(None).await;
    let vm = client::simulated_vm_config();
    s.served(s.app, COMPOSE, &vm).await;
    let kms = DstackKms::new(s.kms, &s.provider);
    let info = |k256: Vec<u8>| DstackKms::KmsInfo {
        k256Pubkey: k256.into(),
        caPubkey: Default::default(),
        quote: Default::default(),
        eventlog: Default::default(),
    };
    let other = k256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
    send!(
        kms.setKmsInfo(info(other.verifying_key().to_sec1_bytes().to_vec()))
            .from(s.owner)
    );
    let status = s
        .refused_with(s.app, COMPOSE, &vm, "not the one registered on-chain")
        .await;
    assert_eq!(status, 503);
    let root =
        keywarden::kms::root::load_existing(&s._dir.path().join("data"), &Default::default())
            .unwrap();
    let ours = root.root.k256.verifying_key().to_sec1_bytes().to_vec();
    send!(kms.setKmsInfo(info(ours)).from(s.owner));
    s.served(s.app, COMPOSE, &vm).await;
    let lines = s.kw.lines();
    let count = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(
        count("is not the one registered on-chain: no keys"),
        1,
        "{lines:#?}"
    );
    assert_eq!(
        count("is the one registered on-chain again"),
        1,
        "{lines:#?}"
    );
}
