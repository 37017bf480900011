//! The sync engine against a real anvil: every change of DstackKms and DstackApp reaches the
//! mirror (SQLite and PostgreSQL), the mirror decides like the contracts (differential), reorgs of
//! depth 1..8 converge and a deeper one resyncs, killed engines resume without duplicates or gaps,
//! and endpoint failures fail over, fail closed and recover.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod support;
#[path = "support/test_contracts.rs"]
mod test_contracts;
#[macro_use]
#[path = "support/chain_engine.rs"]
mod chain_engine;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use alloy::eips::BlockId;
use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, B256, Bytes};
use alloy::providers::ext::AnvilApi;
use alloy::providers::{Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::rpc::types::anvil::{ReorgOptions, TransactionData};
use alloy::sol_types::{SolCall, SolValue};
use chain_engine::{Chain, WAIT, chain, deployed_app, engine, h, sqlite_store};
use keywarden::chain::authz::{AuthQuery, Reason, Source};
use keywarden::chain::contracts::{DstackApp, DstackKms, IMPLEMENTATION_SLOT, TCB_UP_TO_DATE};
use keywarden::chain::kms_projection::rebuild;
use keywarden::chain::mirror::{Evaluation, MirrorState};
use keywarden::config::{DatabaseTarget, StorageConfig};
use keywarden::sim::deploy::deploy;
use keywarden::store::Store;

/// Asserts that the mirror equals the chain's getters for every value the test touched, and that
/// the store rebuilds the same mirror.
async fn assert_mirror_matches_chain(
    c: &Chain,
    m: &MirrorState,
    store: &Store,
    apps: &[Address],
    values: &[B256],
) {
    let kms = c.kms();
    assert_eq!(m.kms.owner, Some(kms.owner().call().await.unwrap()));
    let pending = kms.pendingOwner().call().await.unwrap();
    assert_eq!(m.kms.pending_owner, (!pending.is_zero()).then_some(pending));
    assert_eq!(
        m.kms.app_implementation,
        Some(kms.appImplementation().call().await.unwrap())
    );
    assert_eq!(
        m.kms.gateway_app_id,
        kms.gatewayAppId().call().await.unwrap()
    );
    assert_eq!(
        m.kms.k256_pubkey,
        kms.kmsInfo().call().await.unwrap().k256Pubkey
    );
    for v in values {
        assert_eq!(
            m.kms.os_images.contains(v),
            kms.allowedOsImages(*v).call().await.unwrap()
        );
        assert_eq!(
            m.kms.allowed_aggregated_mrs.contains(v),
            kms.kmsAllowedAggregatedMrs(*v).call().await.unwrap()
        );
        assert_eq!(
            m.kms.devices.contains(v),
            kms.kmsAllowedDeviceIds(*v).call().await.unwrap()
        );
    }
    for a in apps {
        assert_eq!(
            m.registered_apps.contains(a),
            kms.registeredApps(*a).call().await.unwrap(),
            "registration of {a}"
        );
        let code = c.provider.get_code_at(*a).await.unwrap();
        if code.is_empty() {
            assert!(!m.apps.get(a).is_some_and(|p| p.has_code));
            continue;
        }
        let p = &m.apps[a];
        assert!(p.has_code);
        let app = c.app(*a);
        assert_eq!(p.owner, Some(app.owner().call().await.unwrap()));
        let pending = app.pendingOwner().call().await.unwrap();
        assert_eq!(p.pending_owner, (!pending.is_zero()).then_some(pending));
        assert_eq!(
            p.allow_any_device,
            app.allowAnyDevice().call().await.unwrap()
        );
        assert_eq!(
            p.require_tcb_up_to_date,
            app.requireTcbUpToDate().call().await.unwrap()
        );
        let slot = c
            .provider
            .get_storage_at(*a, IMPLEMENTATION_SLOT.into())
            .await
            .unwrap();
        assert_eq!(p.implementation, Some(Address::from_word(slot.into())));
        for v in values {
            assert_eq!(
                p.compose_hashes.contains(v),
                app.allowedComposeHashes(*v).call().await.unwrap()
            );
            assert_eq!(
                p.devices.contains(v),
                app.allowedDeviceIds(*v).call().await.unwrap()
            );
        }
    }
    let chain_id = c.provider.get_chain_id().await.unwrap();
    let rebuilt = rebuild(c.d.kms, &store.chain_events(chain_id, "kms").await.unwrap());
    assert_eq!(&rebuilt, m, "the store rebuilds the live mirror");
}

/// Every governance function of both contracts, while the engine follows; then a restart.
async fn every_change_is_reflected(store: Store) {
    let c = chain().await;
    let e = engine(&[c.anvil.url()], &c.d, &store, |_| {});
    let (kms, o, x) = (c.kms(), c.owner, c.other);
    send!(kms.addOsImageHash(h(1)), o);
    send!(kms.addOsImageHash(h(2)), o);
    send!(kms.removeOsImageHash(h(2)), o);
    send!(kms.addKmsAggregatedMr(h(3)), o);
    send!(kms.addKmsAggregatedMr(h(4)), o);
    send!(kms.removeKmsAggregatedMr(h(4)), o);
    send!(kms.addKmsDevice(h(5)), o);
    send!(kms.addKmsDevice(h(6)), o);
    send!(kms.removeKmsDevice(h(6)), o);
    send!(kms.setGatewayAppId("gateway-1".into()), o);
    send!(
        kms.setKmsInfo(DstackKms::KmsInfo {
            k256Pubkey: Bytes::from_static(&[2; 33]),
            caPubkey: Bytes::from_static(&[4; 65]),
            quote: Bytes::new(),
            eventlog: Bytes::new(),
        }),
        o
    );
    let app = c.app(c.d.app);
    send!(app.addComposeHash(h(7)), o);
    send!(app.addComposeHash(h(8)), o);
    send!(app.removeComposeHash(h(8)), o);
    send!(app.addDevice(h(5)), o);
    send!(app.addDevice(h(9)), o);
    send!(app.removeDevice(h(9)), o);
    send!(app.setAllowAnyDevice(true), o);
    send!(app.setRequireTcbUpToDate(true), o);
    send!(app.setRequireTcbUpToDate(false), o);
    send!(app.transferOwnership(x), o);
    let app2 = deployed_app(&send!(
        kms.deployAndRegisterApp_1(o, false, true, false, h(5), h(7)),
        o
    ));
    let app3 = deployed_app(&send!(
        kms.deployAndRegisterApp_0(x, true, true, B256::ZERO, h(10)),
        x
    ));
    send!(c.app(app2).disableUpgrades(), o);
    // An upgrade of app2's proxy is refused now; upgrade the first app to a fresh implementation.
    let new_impl = keywarden::chain::contracts::Artifact::DstackApp
        .bytecode()
        .unwrap();
    let tx = TransactionRequest::default()
        .with_from(o)
        .with_deploy_code(new_impl);
    let pending = c.provider.send_transaction(tx).await.unwrap();
    let new_impl = tokio::time::timeout(WAIT, pending.get_receipt())
        .await
        .unwrap()
        .unwrap()
        .contract_address
        .unwrap();
    let eoa = Address::repeat_byte(0x77);
    send!(kms.registerApp(eoa), x);
    // An app configured (on another KMS) before it is registered here, in a later batch: its
    // earlier events are fetched when it is discovered.
    let elsewhere = deploy(&c.anvil.url()).await.unwrap();
    send!(c.app(elsewhere.app).addComposeHash(h(10)), o);
    e.caught_up_to(c.head().await).await;
    send!(kms.registerApp(elsewhere.app), x);
    send!(kms.transferOwnership(x), o);
    send!(kms.acceptOwnership(), x);
    send!(app.upgradeToAndCall(new_impl, Bytes::new()), o);
    let apps = [
        c.d.app,
        app2,
        app3,
        eoa,
        elsewhere.app,
        Address::repeat_byte(0x78),
    ];
    let values: Vec<B256> = (0..=10).map(h).collect();

    e.caught_up_to(c.head().await).await;
    assert_mirror_matches_chain(&c, &e.mirror.snapshot(), &store, &apps, &values).await;
    assert!(e.metric("dstack_chain_batches_total") >= 1.0);
    assert!(e.metric("dstack_chain_logs_processed_total") > 20.0);
    assert_eq!(
        e.metric("dstack_kms_mirror_entries"),
        // os 1, mr 1, kms device 1, apps 5, compose hashes 7 + 7 + 10 + 10 = 4
        1.0 + 1.0 + 1.0 + 5.0 + 4.0
    );
    let before = e.mirror.snapshot();
    e.stop().await;

    // A restart rebuilds the same mirror from the store and follows new changes.
    let e = engine(&[c.anvil.url()], &c.d, &store, |_| {});
    send!(kms.addOsImageHash(h(2)), x);
    e.caught_up_to(c.head().await).await;
    let after = e.mirror.snapshot();
    assert!(after.kms.os_images.contains(&h(2)));
    let mut expected = (*before).clone();
    expected.kms.os_images.insert(h(2));
    expected.block = after.block;
    assert_eq!(*after, expected);
    assert_mirror_matches_chain(&c, &after, &store, &apps, &values).await;
    e.stop().await;
    store.close().await;
}

#[tokio::test]
async fn every_change_is_reflected_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    every_change_is_reflected(sqlite_store(dir.path()).await).await;
}

#[tokio::test]
async fn every_change_is_reflected_on_postgres() {
    let db = common::PgDb::create().await;
    let store = Store::open(
        &StorageConfig::default(),
        &DatabaseTarget::Postgres(db.url.clone()),
    )
    .await
    .unwrap();
    every_change_is_reflected(store).await;
    db.drop_now().await;
}

/// A small deterministic generator (xorshift64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// The boot info the contracts receive for `q`.
fn info(q: &AuthQuery) -> DstackKms::AppBootInfo {
    keywarden::chain::live::boot_info(q)
}

/// Differential: the mirror (local for known code, live for the rest) answers exactly as
/// `eth_call` does, over apps from both factory overloads with every flag combination (set
/// silently by the initialiser), an app registered before it was deployed, a custom IAppAuth app,
/// an app upgraded to a V2 with an extra check, and TCB statuses UpToDate, OutOfDate and
/// SWHardeningNeeded.
#[tokio::test]
async fn mirror_decides_like_the_contracts() {
    let c = chain().await;
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let e = engine(&[c.anvil.url()], &c.d, &store, |_| {});
    let (kms, o) = (c.kms(), c.owner);
    send!(kms.addOsImageHash(h(1)), o);
    send!(kms.addKmsAggregatedMr(h(2)), o);
    send!(kms.addKmsDevice(h(3)), o);
    let app = c.app(c.d.app);
    send!(app.addComposeHash(h(4)), o);
    send!(app.addDevice(h(3)), o);
    let mut known = vec![c.d.app];
    for bits in 0..8u8 {
        let (disable, tcb, any) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
        known.push(deployed_app(&send!(
            kms.deployAndRegisterApp_1(o, disable, tcb, any, h(3), h(4)),
            o
        )));
    }
    for bits in 0..4u8 {
        let (disable, any) = (bits & 1 != 0, bits & 2 != 0);
        known.push(deployed_app(&send!(
            kms.deployAndRegisterApp_0(o, disable, any, h(3), h(5)),
            o
        )));
    }
    // Registered first, deployed later (a proxy created by another account at a predicted
    // address, initialised with the TCB requirement on).
    let nonce = c.provider.get_transaction_count(c.other).await.unwrap();
    let early = c.other.create(nonce);
    send!(kms.registerApp(early), o);
    e.caught_up_to(c.head().await).await;
    let init = DstackApp::initialize_1Call {
        initialOwner: o,
        disableUpgrades_: false,
        requireTcbUpToDate_: true,
        allowAnyDevice_: false,
        initialDeviceId: h(3),
        initialComposeHash: h(4),
    }
    .abi_encode();
    let args = (c.d.app_implementation, Bytes::from(init)).abi_encode_params();
    assert_eq!(
        test_contracts::deploy(&c.provider, c.other, "ERC1967Proxy", args).await,
        early
    );
    known.push(early);
    // A custom app, and an app upgraded to a V2 with an extra check: only the chain knows.
    let listed = Address::repeat_byte(0x11);
    let custom = test_contracts::allow_list_app(&c.provider, o, &[listed]).await;
    send!(kms.registerApp(custom), o);
    let v2 = deployed_app(&send!(
        kms.deployAndRegisterApp_1(o, false, false, true, h(3), h(4)),
        o
    ));
    let v2_impl = test_contracts::deploy(&c.provider, o, "DstackAppV2", Vec::new()).await;
    send!(
        c.app(v2).upgradeToAndCall(
            v2_impl,
            test_contracts::DstackAppV2::initializeV2Call {}
                .abi_encode()
                .into()
        ),
        o
    );
    let eoa = Address::repeat_byte(0x55);
    send!(kms.registerApp(eoa), o);
    let head = c.head().await;
    e.caught_up_to(head).await;

    let m = e.mirror.snapshot();
    for a in &known {
        assert_eq!(m.app_evaluation(*a), Evaluation::Local, "{a} is known code");
        let chain_app = c.app(*a);
        let p = &m.apps[a];
        assert_eq!(
            (p.allow_any_device, p.require_tcb_up_to_date),
            (
                chain_app.allowAnyDevice().call().await.unwrap(),
                chain_app.requireTcbUpToDate().call().await.unwrap()
            ),
            "flags of {a}, set silently by the initialiser"
        );
    }
    for a in [custom, v2] {
        assert_eq!(
            m.app_evaluation(a),
            Evaluation::Live,
            "{a} is not known code"
        );
    }
    assert_eq!(m.live_counts(), (0, 2));

    let apps: Vec<Address> = known
        .iter()
        .copied()
        .chain([custom, v2, eoa, Address::repeat_byte(0x56)])
        .collect();
    let values = [h(1), h(2), h(3), h(4), h(5), h(6)];
    let instances = [listed, Address::repeat_byte(0x12), Address::ZERO];
    let tcbs = [TCB_UP_TO_DATE, "OutOfDate", "SWHardeningNeeded"];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut seen = std::collections::BTreeSet::new();
    let mut sources = std::collections::BTreeSet::new();
    let at = BlockId::number(head);
    for _ in 0..300 {
        let q = AuthQuery {
            app_id: rng.pick(&apps).into(),
            compose_hash: rng.pick(&values).into(),
            instance_id: rng.pick(&instances).into(),
            device_id: rng.pick(&values).into(),
            mr_aggregated: rng.pick(&values).into(),
            mr_system: [0x22; 32],
            os_image_hash: if rng.next().is_multiple_of(4) {
                rng.pick(&values).into()
            } else {
                h(1).into()
            },
            tcb_status: rng.pick(&tcbs).to_owned(),
            advisory_ids: vec!["INTEL-SA-00001".into()],
        };
        let chain_app = kms.isAppAllowed(info(&q)).block(at).call().await.unwrap();
        let local_app = e.mirror.authorize_app(&q).await;
        assert_eq!(
            (local_app.allowed, local_app.reason_str()),
            (chain_app.isAllowed, chain_app.reason.as_str()),
            "isAppAllowed for {q:?}"
        );
        let chain_kms = kms.isKmsAllowed(info(&q)).block(at).call().await.unwrap();
        let local_kms = e.mirror.authorize_kms(&q).await;
        assert_eq!(
            (local_kms.allowed, local_kms.reason_str()),
            (chain_kms.isAllowed, chain_kms.reason.as_str()),
            "isKmsAllowed for {q:?}"
        );
        assert_eq!(local_kms.source, Source::Mirror);
        seen.insert(local_app.reason.label());
        seen.insert(local_kms.reason.label());
        sources.insert(local_app.source.label());
    }
    // Every contract reason (and allowed, and a custom app's own reason) came up at least once,
    // from the mirror and from the chain.
    let expected: std::collections::BTreeSet<&str> = Reason::ALL
        .iter()
        .filter(|r| !matches!(r, Reason::ChainStateStale | Reason::AuthUnavailable))
        .map(|r| r.label())
        .collect();
    assert_eq!(seen, expected);
    assert_eq!(sources.len(), 2, "{sources:?}");
    assert!(e.metric("dstack_chain_live_calls_total") > 0.0);
    e.stop().await;
}

fn add_compose_tx(c: &Chain, hash: B256) -> TransactionData {
    TransactionData::JSON(
        TransactionRequest::default()
            .with_from(c.owner)
            .with_to(c.d.app)
            .with_input(DstackApp::addComposeHashCall { composeHash: hash }.abi_encode()),
    )
}

/// Stored events all belong to the canonical chain.
async fn assert_no_orphans(c: &Chain, store: &Store) {
    let chain_id = c.provider.get_chain_id().await.unwrap();
    for ev in store.chain_events(chain_id, "kms").await.unwrap() {
        let b = c
            .provider
            .get_block_by_number(ev.block_number.into())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.header.hash, ev.block_hash, "orphaned event kept");
    }
}

#[tokio::test]
async fn reorgs_of_depth_1_to_8_converge_to_the_canonical_chain() {
    let c = chain().await;
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let e = engine(&[c.anvil.url()], &c.d, &store, |cfg| cfg.reorg_window = 16);
    let app = c.app(c.d.app);
    let mut expected = std::collections::HashSet::new();
    for depth in 1..=8u8 {
        // `depth` blocks with one addComposeHash each, then replaced by one other hash.
        let orphaned: Vec<B256> = (0..depth)
            .map(|i| B256::repeat_byte(depth * 16 + i))
            .collect();
        for hash in &orphaned {
            send!(app.addComposeHash(*hash), c.owner);
        }
        e.caught_up_to(c.head().await).await;
        assert!(orphaned.iter().all(|o| {
            e.mirror.snapshot().apps[&c.d.app]
                .compose_hashes
                .contains(o)
        }));
        let replacement = B256::repeat_byte(0xf0 + depth);
        c.provider
            .anvil_reorg(ReorgOptions {
                depth: u64::from(depth),
                tx_block_pairs: vec![(add_compose_tx(&c, replacement), 0)],
            })
            .await
            .unwrap();
        expected.insert(replacement);
        e.until(&format!("reorg of depth {depth} undone"), |m| {
            m.apps
                .get(&c.d.app)
                .is_some_and(|a| a.compose_hashes == expected)
        })
        .await;
        for hash in orphaned.iter().chain([&replacement]) {
            assert_eq!(
                app.allowedComposeHashes(*hash).call().await.unwrap(),
                expected.contains(hash)
            );
        }
    }
    e.caught_up_to(c.head().await).await;
    assert_no_orphans(&c, &store).await;
    assert!(e.metric("dstack_chain_reorgs_total") >= 8.0);
    assert_eq!(e.metric("dstack_chain_resyncs_total"), 0.0);
    e.stop().await;
}

#[tokio::test]
async fn reorg_deeper_than_the_window_resyncs() {
    let c = chain().await;
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let e = engine(&[c.anvil.url()], &c.d, &store, |cfg| cfg.reorg_window = 2);
    let app = c.app(c.d.app);
    for i in 0..6 {
        send!(app.addComposeHash(B256::repeat_byte(0x30 + i)), c.owner);
    }
    e.caught_up_to(c.head().await).await;
    let replacement = B256::repeat_byte(0x99);
    c.provider
        .anvil_reorg(ReorgOptions {
            depth: 6,
            tx_block_pairs: vec![(add_compose_tx(&c, replacement), 2)],
        })
        .await
        .unwrap();
    let expected: std::collections::HashSet<B256> = [replacement].into();
    e.until("deep reorg resolved", |m| {
        m.apps
            .get(&c.d.app)
            .is_some_and(|a| a.compose_hashes == expected)
    })
    .await;
    e.caught_up_to(c.head().await).await;
    assert_no_orphans(&c, &store).await;
    assert_eq!(e.metric("dstack_chain_resyncs_total"), 1.0);
    e.stop().await;
}

#[tokio::test]
async fn killed_engines_resume_without_duplicates_or_gaps() {
    let c = chain().await;
    let dir = tempfile::tempdir().unwrap();
    let app = c.app(c.d.app);
    for i in 0..60u8 {
        send!(app.addComposeHash(B256::repeat_byte(i)), c.owner);
    }
    let head = c.head().await;
    // Small batches, aborted at once (no clean shutdown, possibly mid-transaction) three times at
    // different points; each "process" has its own connections, closed when it dies.
    for kill_after in [3u64, 20, 41] {
        let store = sqlite_store(dir.path()).await;
        let e = engine(&[c.anvil.url()], &c.d, &store, |cfg| {
            cfg.max_batch_blocks = 2
        });
        let deadline = Instant::now() + WAIT;
        while e.mirror.progress().processed_block < c.d.block + kill_after {
            assert!(Instant::now() < deadline, "no progress");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        e.handle.abort();
        let _ = e.handle.await;
        store.close().await;
    }
    let store = sqlite_store(dir.path()).await;
    let e = engine(&[c.anvil.url()], &c.d, &store, |cfg| {
        cfg.max_batch_blocks = 2
    });
    e.caught_up_to(head).await;
    // Exactly the chain's logs: same count as eth_getLogs over the whole range, nothing twice.
    let chain_id = c.provider.get_chain_id().await.unwrap();
    let stored = store.chain_events(chain_id, "kms").await.unwrap();
    let filter = alloy::rpc::types::Filter::new()
        .address(vec![c.d.kms, c.d.app])
        .from_block(c.d.block)
        .to_block(head);
    let logs = c.provider.get_logs(&filter).await.unwrap();
    let relevant = logs
        .iter()
        .filter(|l| {
            keywarden::chain::events::decode(
                c.d.kms,
                l.inner.address,
                l.inner.data.topics(),
                &l.inner.data.data,
            )
            .is_some()
        })
        .count();
    // Synthetic rows (code identities, flags) come on top, once each.
    let logs_stored = stored.iter().filter(|e| !e.topics.is_empty()).count();
    assert_eq!(logs_stored, relevant);
    assert_eq!(e.mirror.snapshot().apps[&c.d.app].compose_hashes.len(), 60);
    e.stop().await;
}

/// A TCP relay to anvil that can be switched off (refusing and cutting connections).
struct Relay {
    url: url::Url,
    up: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    async fn start(to: url::Url, up: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let flag = Arc::new(AtomicBool::new(up));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (f, cuts) = (flag.clone(), cut.clone());
        let target = format!("{}:{}", to.host_str().unwrap(), to.port().unwrap());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !f.load(Ordering::SeqCst) {
                    continue;
                }
                let target = target.clone();
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { url, up: flag, cut }
    }

    fn set(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

#[tokio::test]
async fn endpoint_failures_fail_over_fail_closed_and_recover() {
    let c = chain().await;
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let primary = Relay::start(c.anvil.url(), false).await;
    let backup = Relay::start(c.anvil.url(), true).await;
    let e = engine(
        &[primary.url.clone(), backup.url.clone()],
        &c.d,
        &store,
        |cfg| {
            cfg.max_staleness = Duration::from_secs(1);
            cfg.request_timeout = Duration::from_millis(500);
        },
    );
    let kms = c.kms();
    send!(kms.addOsImageHash(h(1)), c.owner);
    send!(kms.addKmsAggregatedMr(h(2)), c.owner);
    send!(kms.addKmsDevice(h(3)), c.owner);
    e.caught_up_to(c.head().await).await;
    assert!(e.metric("dstack_chain_rpc_failovers_total") >= 1.0);
    let q = AuthQuery {
        os_image_hash: h(1).into(),
        mr_aggregated: h(2).into(),
        device_id: h(3).into(),
        tcb_status: TCB_UP_TO_DATE.into(),
        ..AuthQuery::default()
    };
    assert!(e.mirror.authorize_kms(&q).await.allowed);

    // Everything down: the mirror goes stale and refuses.
    backup.set(false);
    send!(kms.removeKmsDevice(h(3)), c.owner);
    let deadline = Instant::now() + WAIT;
    while e.mirror.authorize_kms(&q).await.reason != Reason::ChainStateStale {
        assert!(Instant::now() < deadline, "never failed closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!e.mirror.is_fresh());

    // The primary comes back: the missed removal is applied, decisions resume.
    primary.set(true);
    e.caught_up_to(c.head().await).await;
    assert_eq!(
        e.mirror.authorize_kms(&q).await.reason,
        Reason::KmsDeviceNotAllowed
    );
    e.stop().await;
}

#[tokio::test]
async fn serve_follows_the_chain_and_reports_it() {
    use common::{Keywarden, http, run_to_end};
    let c = chain().await;
    send!(c.kms().addOsImageHash(h(1)), c.owner);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "chain-token\n").unwrap();
    let token_ref = format!("file:{}", token_file.display());
    let (url, kms, start) = (
        c.anvil.url().to_string(),
        c.d.kms.to_string(),
        c.d.block.to_string(),
    );
    let mut kw = Keywarden::start(
        &data,
        &[
            "--rpc-url",
            &url,
            "--kms-contract",
            &kms,
            "--start-block",
            &start,
        ],
        &[
            ("KEYWARDEN_ADMIN__TOKEN", &token_ref),
            ("KEYWARDEN_CHAIN__CONFIRMATIONS", "0"),
            ("KEYWARDEN_CHAIN__POLL_INTERVAL", "100ms"),
        ],
    );
    // /readyz includes the mirror: ready means caught up.
    kw.wait_ready().await;
    let head = c.head().await;
    let client = http();
    let metrics = kw.metrics_text().await;
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix} missing"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("dstack_chain_processed_block "), head as f64);
    assert_eq!(value("dstack_kms_mirror_entries{set=\"os_images\"}"), 1.0);
    assert_eq!(
        value("dstack_kms_mirror_entries{set=\"registered_apps\"}"),
        1.0
    );
    assert!(
        value(
            "dstack_chain_rpc_requests_total{endpoint=\"0\",method=\"eth_getLogs\",outcome=\"ok\"}"
        ) >= 1.0
    );

    let admin = |path: &str| {
        client
            .get(format!("http://{}{path}", kw.admin))
            .bearer_auth("chain-token")
            .send()
    };
    let status: serde_json::Value = admin("/admin/chain/status")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["live"]["fresh"], true);
    assert_eq!(status["chains"][0]["processed_block"], head);
    assert_eq!(status["endpoints"][0]["ok"], true);
    let state: serde_json::Value = admin("/admin/chain/state")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["chains"][0]["kms"]["os_images"][0], h(1).to_string());

    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
    let batch = kw
        .lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "on-chain sync completed")
        .expect("a batch log line");
    assert_eq!(batch["level"], "INFO");
    for field in [
        "from_block",
        "to_block",
        "events",
        "lag_blocks",
        "lag_seconds",
    ] {
        assert!(batch["fields"][field].is_u64(), "{field} in {batch}");
    }

    // The commands read the store the service left behind.
    let data_dir = data.to_str().unwrap();
    let (code, out, err) = run_to_end(&["chain", "status", "--json", "--data-dir", data_dir], &[]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["chains"][0]["processed_block"], head);
    assert_eq!(status["chains"][0]["kms_contract"], kms);
    assert_eq!(status["chains"][0]["backfill_percent"], 100.0);
    let (code, out, err) = run_to_end(&["chain", "state", "--data-dir", data_dir], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&h(1).to_string()), "{out}");
    assert!(out.contains(&c.d.app.to_string()), "{out}");
}

/// How a [`rpc_relay`] misbehaves.
#[derive(Clone, Copy)]
enum Misbehave {
    /// Refuses `eth_getLogs` over more than this many blocks, as hosted providers do.
    RangeLimit(u64),
    /// Answers every request with a JSON-RPC server error.
    Errors,
    /// Follows the answer with up to 64 MiB of whitespace (still valid JSON): every answer, or
    /// only `eth_getLogs` over more than this many blocks.
    Bloats(Option<u64>),
}

/// A JSON-RPC relay to anvil that misbehaves as told.
async fn rpc_relay(to: url::Url, how: Misbehave) -> url::Url {
    use axum::extract::State;
    use axum::response::IntoResponse;
    use axum::routing::post;
    async fn relay(
        State((to, how)): State<(url::Url, Misbehave)>,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let refuse = |code: i64, message: &str| {
            axum::Json(serde_json::json!({
                "jsonrpc": "2.0",
                "id": req["id"],
                "error": { "code": code, "message": message },
            }))
            .into_response()
        };
        let log_blocks = || {
            let n = |k: &str| {
                let hex = req["params"][0][k]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("0x");
                u64::from_str_radix(hex, 16).unwrap()
            };
            (req["method"] == "eth_getLogs").then(|| n("toBlock") - n("fromBlock") + 1)
        };
        let bloat = match how {
            Misbehave::Errors => return refuse(-32603, "internal error"),
            Misbehave::RangeLimit(max_blocks) => {
                if log_blocks().is_some_and(|n| n > max_blocks) {
                    return refuse(-32005, "query returned more than 10000 results");
                }
                false
            }
            Misbehave::Bloats(None) => true,
            Misbehave::Bloats(Some(max_blocks)) => log_blocks().is_some_and(|n| n > max_blocks),
        };
        let answer = common::http()
            .post(to)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        if bloat {
            // Streamed without a length, so only a reader that stops at its limit gets past it.
            let spaces = axum::body::Bytes::from(vec![b' '; 64 * 1024]);
            let body = futures::stream::iter(
                std::iter::once(answer)
                    .chain(std::iter::repeat_n(spaces, 1024))
                    .map(Ok::<_, std::io::Error>),
            );
            return (
                [("content-type", "application/json")],
                axum::body::Body::from_stream(body),
            )
                .into_response();
        }
        ([("content-type", "application/json")], answer).into_response()
    }
    let app = axum::Router::new()
        .route("/", post(relay))
        .with_state((to, how));
    format!("http://{}", common::serve_router(app).await)
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_primary_returning_errors_fails_over_to_the_backup() {
    let c = chain().await;
    let primary = rpc_relay(c.anvil.url(), Misbehave::Errors).await;
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let e = engine(&[primary, c.anvil.url()], &c.d, &store, |_| {});
    let app = c.app(c.d.app);
    for i in 0..5u8 {
        send!(app.addComposeHash(B256::repeat_byte(i)), c.owner);
    }
    e.caught_up_to(c.head().await).await;
    assert_eq!(e.mirror.snapshot().apps[&c.d.app].compose_hashes.len(), 5);
    assert!(e.metric("dstack_chain_rpc_failovers_total") >= 1.0);
    assert!(
        e.metric("dstack_chain_rpc_requests_total{endpoint=\"0\",method=\"eth_chainId\",outcome=\"error\"}")
            >= 1.0
    );
    // The backup carried the load.
    assert!(
        e.metric(
            "dstack_chain_rpc_requests_total{endpoint=\"1\",method=\"eth_getLogs\",outcome=\"ok\"}"
        ) >= 1.0
    );
    e.stop().await;
}

#[tokio::test]
async fn log_ranges_shrink_on_too_many_results_and_grow_back() {
    let c = chain().await;
    let app = c.app(c.d.app);
    for i in 0..40u8 {
        send!(app.addComposeHash(B256::repeat_byte(i)), c.owner);
    }
    let relay = rpc_relay(c.anvil.url(), Misbehave::RangeLimit(4)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let e = engine(&[relay], &c.d, &store, |cfg| cfg.max_batch_blocks = 64);
    e.caught_up_to(c.head().await).await;
    assert_eq!(e.mirror.snapshot().apps[&c.d.app].compose_hashes.len(), 40);
    let refused = e.metric("dstack_chain_rpc_requests_total{endpoint=\"0\",method=\"eth_getLogs\",outcome=\"too_many_results\"}");
    assert!(refused >= 1.0);
    // The refusals blame nobody: no failover, the endpoint stays up.
    assert_eq!(e.metric("dstack_chain_rpc_failovers_total"), 0.0);
    // The range went back up to the limit after shrinking: about 45 blocks in batches of <= 4.
    let batches = e.metric("dstack_chain_batches_total");
    assert!((11.0..=20.0).contains(&batches), "{batches} batches");
    e.stop().await;
}

#[tokio::test]
async fn an_oversized_log_answer_shrinks_the_range_without_reading_it_whole() {
    let c = chain().await;
    let app = c.app(c.d.app);
    for i in 0..20u8 {
        send!(app.addComposeHash(B256::repeat_byte(i)), c.owner);
    }
    let relay = rpc_relay(c.anvil.url(), Misbehave::Bloats(Some(4))).await;
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let e = engine(&[relay], &c.d, &store, |cfg| {
        cfg.max_batch_blocks = 64;
        cfg.max_response_bytes = 64 * 1024;
    });
    e.caught_up_to(c.head().await).await;
    assert_eq!(e.mirror.snapshot().apps[&c.d.app].compose_hashes.len(), 20);
    // Refused at the limit as too many results (not read to the end and timed out), and not
    // blamed on the endpoint.
    let refused = e.metric("dstack_chain_rpc_requests_total{endpoint=\"0\",method=\"eth_getLogs\",outcome=\"too_many_results\"}");
    assert!(refused >= 1.0);
    assert_eq!(
        e.metric("dstack_chain_rpc_requests_total{endpoint=\"0\",method=\"eth_getLogs\",outcome=\"timeout\"}"),
        0.0
    );
    assert_eq!(e.metric("dstack_chain_rpc_failovers_total"), 0.0);
    e.stop().await;
}

#[tokio::test]
async fn an_endpoint_sending_oversized_answers_is_faulted_and_the_backup_serves() {
    let c = chain().await;
    send!(c.app(c.d.app).addComposeHash(h(7)), c.owner);
    let primary = rpc_relay(c.anvil.url(), Misbehave::Bloats(None)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let e = engine(&[primary, c.anvil.url()], &c.d, &store, |cfg| {
        cfg.max_response_bytes = 64 * 1024;
    });
    e.caught_up_to(c.head().await).await;
    assert!(
        e.mirror.snapshot().apps[&c.d.app]
            .compose_hashes
            .contains(&h(7))
    );
    assert!(e.metric("dstack_chain_rpc_failovers_total") >= 1.0);
    assert!(
        e.metric("dstack_chain_rpc_requests_total{endpoint=\"0\",method=\"eth_chainId\",outcome=\"error\"}")
            >= 1.0
    );
    assert_eq!(
        e.metric("dstack_chain_rpc_requests_total{endpoint=\"0\",method=\"eth_chainId\",outcome=\"timeout\"}"),
        0.0
    );
    e.stop().await;
}

#[tokio::test]
async fn safe_finality_applies_only_blocks_the_node_calls_safe() {
    // anvil's `safe` block is 32 blocks behind its latest.
    let c = chain().await;
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let e = engine(&[c.anvil.url()], &c.d, &store, |cfg| {
        cfg.finality = keywarden::chain::config::Finality::Safe;
    });
    c.provider.anvil_mine(Some(40), None).await.unwrap();
    send!(c.kms().addOsImageHash(h(1)), c.owner);
    let added = c.head().await;
    c.provider.anvil_mine(Some(31), None).await.unwrap();
    e.caught_up_to(added - 1).await;
    assert_eq!(e.mirror.progress().target_block, added - 1);
    assert!(e.mirror.snapshot().kms.os_images.is_empty());
    c.provider.anvil_mine(Some(1), None).await.unwrap();
    e.caught_up_to(added).await;
    assert!(e.mirror.snapshot().kms.os_images.contains(&h(1)));
    e.stop().await;
}

/// `serve` against a chain other than `chain.chain_id`: exit 1 with one stderr line naming both
/// chains and the fix.
#[tokio::test]
async fn serve_on_another_chain_than_configured_exits_with_one_line() {
    let c = chain().await;
    let dir = tempfile::tempdir().unwrap();
    let (url, kms, start) = (
        c.anvil.url().to_string(),
        c.d.kms.to_string(),
        c.d.block.to_string(),
    );
    let (code, _, err) = common::run_serve(
        dir.path(),
        &[
            "--rpc-url",
            &url,
            "--kms-contract",
            &kms,
            "--start-block",
            &start,
        ],
        &[("KEYWARDEN_CHAIN__CHAIN_ID", "1")],
    );
    assert_eq!(code, 1, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("keywarden: error: critical task chain_sync stopped:")
            && lines[0].contains("serves chain 31337")
            && lines[0].contains("fix:"),
        "{err}"
    );
}

#[tokio::test]
async fn another_chain_than_configured_stops_the_engine() {
    let c = chain().await;
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let e = engine(&[c.anvil.url()], &c.d, &store, |cfg| cfg.chain_id = Some(1));
    let err = tokio::time::timeout(WAIT, e.handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("serves chain 31337"), "{err}");
    assert!(!e.mirror.is_fresh());
}

/// A backup endpoint on another chain, with the same contract addresses, is never used: when the
/// primary stalls the mirror goes stale (fails closed) instead of following the other chain, and
/// it follows the real chain again when the primary is back. No resync.
#[tokio::test]
async fn a_backup_endpoint_on_another_chain_is_never_used() {
    let c = chain().await;
    let other = support::anvil::Anvil::spawn_with(&["--chain-id", "1"]);
    let other_d = deploy(&other.url()).await.unwrap();
    assert_eq!(other_d.kms, c.d.kms, "same deployer, same addresses");
    let primary = Relay::start(c.anvil.url(), true).await;
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let e = engine(&[primary.url.clone(), other.url()], &c.d, &store, |cfg| {
        cfg.chain_id = Some(31337);
        cfg.max_staleness = Duration::from_secs(2);
        cfg.request_timeout = Duration::from_millis(500);
    });
    send!(c.kms().addOsImageHash(h(1)), c.owner);
    e.caught_up_to(c.head().await).await;
    // Reported before it is ever needed.
    let deadline = Instant::now() + WAIT;
    while e.metric("dstack_chain_rpc_endpoint_wrong_chain{endpoint=\"1\"}") != 1.0 {
        assert!(
            Instant::now() < deadline,
            "wrong-chain backup never reported"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(e.mirror.progress().endpoints[1].wrong_chain, Some(1));

    // The primary stalls; the real chain revokes the OS image.
    primary.set(false);
    send!(c.kms().removeOsImageHash(h(1)), c.owner);
    let q = AuthQuery {
        os_image_hash: h(1).into(),
        ..AuthQuery::default()
    };
    let deadline = Instant::now() + WAIT;
    while e.mirror.authorize_app(&q).await.reason != Reason::ChainStateStale {
        assert!(Instant::now() < deadline, "never failed closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(e.metric("dstack_chain_resyncs_total"), 0.0);
    assert!(e.mirror.snapshot().kms.os_images.contains(&h(1)));

    // The primary is back: the revocation is followed.
    primary.set(true);
    e.until("the OS image revoked", |m| !m.kms.os_images.contains(&h(1)))
        .await;
    e.caught_up_to(c.head().await).await;
    assert_eq!(e.metric("dstack_chain_resyncs_total"), 0.0);
    assert_eq!(
        e.metric("dstack_chain_rpc_endpoint_wrong_chain{endpoint=\"1\"}"),
        1.0
    );
    e.stop().await;
}

/// An endpoint of the same chain id whose history shares nothing with the stored chain (a
/// forked or broken node) is an endpoint fault, not a reorg: no resync while the primary, which
/// still serves the stored chain, is away, and none after it is back.
#[tokio::test]
async fn an_endpoint_contradicting_the_stored_chain_forces_no_resync() {
    let c = chain().await;
    let fork = support::anvil::Anvil::spawn();
    let fork_d = deploy(&fork.url()).await.unwrap();
    assert_eq!(fork_d.kms, c.d.kms);
    let primary = Relay::start(c.anvil.url(), true).await;
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let e = engine(&[primary.url.clone(), fork.url()], &c.d, &store, |cfg| {
        cfg.max_staleness = Duration::from_secs(2);
        cfg.request_timeout = Duration::from_millis(500);
        cfg.reorg_window = 4;
    });
    for i in 1..=6 {
        send!(c.kms().addOsImageHash(h(i)), c.owner);
    }
    e.caught_up_to(c.head().await).await;
    let fork_p = ProviderBuilder::new().connect_http(fork.url()).erased();
    fork_p.anvil_mine(Some(20), None).await.unwrap();

    primary.set(false);
    let deadline = Instant::now() + WAIT;
    while e.mirror.is_fresh() {
        assert!(Instant::now() < deadline, "never went stale");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Long enough for several polls against the fork.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(e.metric("dstack_chain_resyncs_total"), 0.0);
    assert!(e.mirror.snapshot().kms.os_images.contains(&h(6)));

    primary.set(true);
    send!(c.kms().removeOsImageHash(h(6)), c.owner);
    e.until("the removal followed", |m| !m.kms.os_images.contains(&h(6)))
        .await;
    assert_eq!(e.metric("dstack_chain_resyncs_total"), 0.0);
    e.stop().await;
}

/// A backup on another chain is visible to operators of a running service: `/readyz` stays 200
/// with a `degraded` entry naming it, and one ERROR line names it.
#[tokio::test]
async fn serve_reports_a_backup_endpoint_on_another_chain() {
    use common::{Keywarden, http};
    let c = chain().await;
    let other = support::anvil::Anvil::spawn_with(&["--chain-id", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let (primary, backup, kms, start) = (
        c.anvil.url().to_string(),
        other.url().to_string(),
        c.d.kms.to_string(),
        c.d.block.to_string(),
    );
    let mut kw = Keywarden::start(
        &dir.path().join("data"),
        &[
            "--rpc-url",
            &primary,
            "--rpc-url",
            &backup,
            "--kms-contract",
            &kms,
            "--start-block",
            &start,
        ],
        &[
            ("KEYWARDEN_CHAIN__CHAIN_ID", "31337"),
            ("KEYWARDEN_CHAIN__CONFIRMATIONS", "0"),
            ("KEYWARDEN_CHAIN__POLL_INTERVAL", "100ms"),
        ],
    );
    kw.wait_ready().await;
    let deadline = Instant::now() + WAIT;
    let body = loop {
        let resp = http()
            .get(format!("http://{}/readyz", kw.metrics))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = resp.json().await.unwrap();
        if body.get("degraded").is_some() {
            break body;
        }
        assert!(Instant::now() < deadline, "never reported: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let degraded = body["degraded"][0].clone();
    assert_eq!(degraded["component"], "chain_endpoints");
    let reason = degraded["reason"].as_str().unwrap();
    assert!(
        reason.contains("endpoint 1") && reason.contains("serves chain 1"),
        "{reason}"
    );
    let lines = kw.lines();
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("RPC endpoint serves another chain"))
            .count(),
        1,
        "{lines:#?}"
    );
    assert_eq!(kw.terminate(Duration::from_secs(10)), 0);
}
