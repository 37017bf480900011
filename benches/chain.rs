//! Chain mirror benchmark on a local anvil: backfill throughput against a plain `eth_getLogs`
//! download of the same logs, steady-state lag with 1 s blocks, revocation propagation, the
//! authorization lookup with 10k registered apps (known code: local), and live evaluation of an
//! app whose code is not known (`eth_call` per boot info, and the per-block cache). Run with
//! `cargo bench --bench chain`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

// Shared with the integration tests; this benchmark uses part of it.
#[allow(dead_code)]
#[path = "../tests/support/anvil.rs"]
mod anvil;
#[path = "../tests/support/test_contracts.rs"]
mod test_contracts;

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::ext::AnvilApi;
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{Filter, TransactionRequest};
use alloy::sol_types::SolEvent;
use anvil::Anvil;
use futures::FutureExt;
use keywarden::chain::authz::{AuthQuery, Reason, Source};
use keywarden::chain::code::{CodeId, CodeKind, KnownCode};
use keywarden::chain::contracts::{DstackApp, DstackKms, TCB_UP_TO_DATE};
use keywarden::chain::events::Event;
use keywarden::chain::metrics::ChainMetrics;
use keywarden::chain::mirror::MirrorState;
use keywarden::chain::status::SyncStatus;
use keywarden::chain::{ChainConfig, Mirror};
use keywarden::config::{DatabaseTarget, StorageConfig};
use keywarden::runtime::{Readiness, Task};
use keywarden::sim::deploy::{Deployment, deploy};
use keywarden::store::Store;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Events per emitting transaction, and transactions (one block each).
const EVENTS_PER_TX: u16 = 1000;
const TXS: usize = 110;

/// Runtime code that emits `EVENTS_PER_TX` `ComposeHashAdded(calldata[0] + i)` logs.
fn emitter_code() -> Bytes {
    let mut code = vec![0x61];
    code.extend_from_slice(&EVENTS_PER_TX.to_be_bytes()); // PUSH2 n
    code.extend_from_slice(&[0x5b, 0x80, 0x60, 0x00, 0x35, 0x01, 0x60, 0x00, 0x52, 0x7f]);
    code.extend_from_slice(DstackApp::ComposeHashAdded::SIGNATURE_HASH.as_slice()); // PUSH32 topic
    code.extend_from_slice(&[0x60, 0x20, 0x60, 0x00, 0xa1]); // LOG1(0, 32, topic)
    code.extend_from_slice(&[0x60, 0x01, 0x90, 0x03, 0x80, 0x61, 0x00, 0x03, 0x57, 0x00]);
    code.into()
}

fn provider(url: &url::Url) -> DynProvider {
    ProviderBuilder::new()
        .disable_recommended_fillers()
        .connect_http(url.clone())
        .erased()
}

async fn sqlite(dir: &std::path::Path) -> Store {
    let cfg = StorageConfig {
        data_dir: dir.to_path_buf(),
        ..Default::default()
    };
    Store::open(&cfg, &DatabaseTarget::Sqlite(dir.join("kw.db")))
        .await
        .unwrap()
}

fn start(
    url: &url::Url,
    d: &Deployment,
    store: &Store,
    tweak: impl FnOnce(&mut ChainConfig),
) -> (Arc<Mirror>, CancellationToken) {
    let mut cfg = ChainConfig {
        rpc_urls: vec![url.to_string()],
        kms_contract: Some(d.kms.to_string()),
        start_block: d.block,
        ..ChainConfig::default()
    };
    tweak(&mut cfg);
    let mut registry = Registry::default();
    let metrics = ChainMetrics::new(&mut registry, 1);
    let (mirror, engine) = keywarden::chain::follow(
        cfg.resolve().unwrap(),
        store.clone(),
        Readiness::default(),
        metrics,
        Vec::new(),
    );
    let cancel = CancellationToken::new();
    tokio::spawn(engine.run(cancel.clone()));
    (mirror, cancel)
}

async fn send(p: &DynProvider, tx: TransactionRequest) {
    let receipt = p
        .send_transaction(tx)
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(receipt.status());
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn backfill() {
    let node = Anvil::spawn_with(&["--gas-limit", "100000000"]);
    let url = node.url();
    let d = deploy(&url).await.unwrap();
    let p = provider(&url);
    let owner = p.get_accounts().await.unwrap()[0];
    let emitter = Address::repeat_byte(0xe1);
    p.anvil_set_code(emitter, emitter_code()).await.unwrap();
    let kms = DstackKms::new(d.kms, p.clone());
    let tx = kms
        .registerApp(emitter)
        .from(owner)
        .into_transaction_request();
    send(&p, tx).await;
    let generating = Instant::now();
    for i in 0..TXS {
        let base = U256::from(i * usize::from(EVENTS_PER_TX));
        let tx = TransactionRequest::default()
            .with_from(owner)
            .with_to(emitter)
            .with_input(base.to_be_bytes::<32>().to_vec())
            .with_gas_limit(5_000_000);
        send(&p, tx).await;
    }
    let head = p.get_block_number().await.unwrap();
    let events = TXS * usize::from(EVENTS_PER_TX);
    println!(
        "generated {events} ComposeHashAdded logs in {TXS} blocks in {:.1?}",
        generating.elapsed()
    );

    let batch = 10u64;
    // Baseline: the same logs downloaded with eth_getLogs in the same ranges, nothing else.
    let download = Instant::now();
    let mut downloaded = 0;
    let mut from = d.block;
    while from <= head {
        let to = head.min(from + batch - 1);
        let filter = Filter::new()
            .address(vec![d.kms, d.app, emitter])
            .from_block(from)
            .to_block(to);
        downloaded += p.get_logs(&filter).await.unwrap().len();
        from = to + 1;
    }
    let download = download.elapsed();

    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    let synced = Instant::now();
    let (mirror, cancel) = start(&url, &d, &store, |c| {
        c.confirmations = 0;
        c.max_batch_blocks = batch;
        c.poll_interval = Duration::from_millis(10);
    });
    while mirror.progress().processed_block < head || !mirror.is_fresh() {
        assert!(
            synced.elapsed() < Duration::from_secs(600),
            "backfill stuck"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let synced = synced.elapsed();
    cancel.cancel();
    let hashes = mirror.snapshot().apps[&emitter].compose_hashes.len();
    assert_eq!(hashes, events);
    println!(
        "backfill: {events} events ({downloaded} logs incl. PolicyChanged/setup) in {synced:.2?} = {:.0} events/s; \
         plain eth_getLogs download {download:.2?}; ratio download/backfill = {:.2} (goal >= 0.5)",
        events as f64 / synced.as_secs_f64(),
        download.as_secs_f64() / synced.as_secs_f64()
    );
    store.close().await;
}

async fn steady_state_and_revocation() {
    let node = Anvil::spawn_with(&["--block-time", "1"]);
    let url = node.url();
    let d = deploy(&url).await.unwrap();
    let p = provider(&url);
    let owner = p.get_accounts().await.unwrap()[0];
    let app = DstackApp::new(d.app, p.clone());
    let kms = DstackKms::new(d.kms, p.clone());
    send(
        &p,
        kms.addOsImageHash(B256::repeat_byte(1))
            .from(owner)
            .into_transaction_request(),
    )
    .await;

    // Steady state with the default confirmations (2) and poll interval (1 s).
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    let (mirror, cancel) = start(&url, &d, &store, |_| {});
    let mut behind = Vec::new();
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let head = p.get_block_number().await.unwrap();
        let processed = mirror.progress().processed_block;
        if processed > 0 {
            behind.push(head.saturating_sub(2).saturating_sub(processed));
        }
    }
    cancel.cancel();
    behind.sort_unstable();
    println!(
        "steady state (1 s blocks, confirmations 2, poll 1 s): blocks behind head-2: median {}, max {} over {} samples",
        behind[behind.len() / 2],
        behind[behind.len() - 1],
        behind.len()
    );

    // Revocation: confirmations 0, poll 100 ms.
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    let (mirror, cancel) = start(&url, &d, &store, |c| {
        c.confirmations = 0;
        c.poll_interval = Duration::from_millis(100);
    });
    let mut delays = Vec::new();
    for i in 0..8u8 {
        let hash = B256::repeat_byte(0x40 + i);
        send(
            &p,
            app.addComposeHash(hash)
                .from(owner)
                .into_transaction_request(),
        )
        .await;
        let q = AuthQuery {
            app_id: d.app.into(),
            compose_hash: hash.into(),
            os_image_hash: [1; 32],
            tcb_status: TCB_UP_TO_DATE.into(),
            ..AuthQuery::default()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while mirror.authorize_app(&q).await.reason != Reason::DeviceNotAllowed {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = p.get_block_number().await.unwrap();
        let tx = app
            .removeComposeHash(hash)
            .from(owner)
            .into_transaction_request();
        let pending = p.send_transaction(tx).await.unwrap();
        // The removal's block exists from the moment the head moves past `before`.
        let mined = loop {
            if p.get_block_number().await.unwrap() > before {
                break Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        while mirror.authorize_app(&q).await.reason != Reason::ComposeHashNotAllowed {
            assert!(mined.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        delays.push(mined.elapsed().as_secs_f64() * 1000.0);
        pending.get_receipt().await.unwrap();
    }
    cancel.cancel();
    delays.sort_by(f64::total_cmp);
    println!(
        "revocation (1 s blocks, confirmations 0, poll 100 ms): block mined -> mirror refuses: median {:.0} ms, max {:.0} ms (n = {})",
        pct(&delays, 0.5),
        delays[delays.len() - 1],
        delays.len()
    );
}

fn lookup() {
    let kms = Address::repeat_byte(0xaa);
    let mut state = MirrorState::new(kms);
    // Every contract is answered by our own known code (a proxy in front of each
    // implementation), so every decision is local.
    let known = KnownCode::builtin();
    let id = |kind: CodeKind| {
        let (_, hash, offsets) = known
            .entries()
            .into_iter()
            .find(|(k, ..)| k.kind == kind)
            .unwrap();
        CodeId {
            hash,
            immutables: offsets.to_vec(),
        }
    };
    let (kms_impl, app_impl) = (Address::repeat_byte(0xab), Address::repeat_byte(0xac));
    for e in [
        Event::CodeIdentity(kms, id(CodeKind::Proxy)),
        Event::ImplementationObserved(kms, kms_impl),
        Event::CodeIdentity(kms_impl, id(CodeKind::DstackKms)),
        Event::CodeIdentity(app_impl, id(CodeKind::DstackApp)),
        Event::OsImage(B256::repeat_byte(1), true),
    ] {
        state.apply(&e);
    }
    let mut apps = Vec::new();
    for i in 0..10_000u32 {
        let mut raw = [0u8; 20];
        raw[16..].copy_from_slice(&i.to_be_bytes());
        let app = Address::from(raw);
        state.apply(&Event::AppDeployedViaFactory(app));
        state.apply(&Event::ComposeHash(app, B256::from(U256::from(i)), true));
        state.apply(&Event::AllowAnyDevice(app, true));
        state.apply(&Event::CodeIdentity(app, id(CodeKind::Proxy)));
        state.apply(&Event::ImplementationObserved(app, app_impl));
        apps.push(app);
    }
    let mut registry = Registry::default();
    let status = std::sync::Arc::new(SyncStatus::new(Duration::from_secs(60)));
    status.mark_fresh(Instant::now());
    let mirror = Mirror::new(state, status, ChainMetrics::new(&mut registry, 1), None);
    let queries: Vec<AuthQuery> = apps
        .iter()
        .enumerate()
        .map(|(i, a)| AuthQuery {
            app_id: (*a).into(),
            compose_hash: B256::from(U256::from(i)).into(),
            os_image_hash: [1; 32],
            tcb_status: TCB_UP_TO_DATE.into(),
            ..AuthQuery::default()
        })
        .collect();
    let mut per_op = Vec::new();
    for round in 0..200 {
        let started = Instant::now();
        for q in queries.iter().skip(round * 37 % 9000).take(1000) {
            // A local decision completes on its first poll: no I/O, no executor.
            let d = mirror.authorize_app(q).now_or_never().unwrap();
            assert!(std::hint::black_box(d).allowed);
        }
        per_op.push(started.elapsed().as_secs_f64() * 1e6 / 1000.0);
    }
    per_op.sort_by(f64::total_cmp);
    println!(
        "authorize_app with 10k registered apps (snapshot + staleness check + decision + metric): median {:.3} us, p99 {:.3} us per lookup (200 rounds of 1000)",
        pct(&per_op, 0.5),
        pct(&per_op, 0.99)
    );
}

/// Live evaluation against anvil: a custom IAppAuth app (code the mirror does not know) asked
/// with `eth_call` per boot info (distinct instance ids, so nothing is cached), then the same
/// boot info again (served from the per-block cache).
async fn live() {
    let node = Anvil::spawn();
    let url = node.url();
    let d = deploy(&url).await.unwrap();
    let p = provider(&url);
    let owner = p.get_accounts().await.unwrap()[0];
    let custom = test_contracts::allow_list_app(&p, owner, &[]).await;
    let kms = DstackKms::new(d.kms, p.clone());
    for tx in [
        kms.registerApp(custom)
            .from(owner)
            .into_transaction_request(),
        kms.addOsImageHash(B256::repeat_byte(1))
            .from(owner)
            .into_transaction_request(),
    ] {
        send(&p, tx).await;
    }
    let head = p.get_block_number().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    let (mirror, cancel) = start(&url, &d, &store, |c| {
        c.confirmations = 0;
        c.poll_interval = Duration::from_millis(50);
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while mirror.progress().processed_block < head || !mirror.is_fresh() {
        assert!(Instant::now() < deadline, "engine never caught up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let query = |i: u32| {
        let mut instance = [0u8; 20];
        instance[16..].copy_from_slice(&i.to_be_bytes());
        AuthQuery {
            app_id: custom.into(),
            instance_id: instance,
            os_image_hash: [1; 32],
            tcb_status: TCB_UP_TO_DATE.into(),
            ..AuthQuery::default()
        }
    };
    let time = async |q: &AuthQuery| {
        let started = Instant::now();
        let d = mirror.authorize_app(q).await;
        assert_eq!(d.source, Source::EthCall);
        assert_eq!(d.reason, Reason::AppDefined);
        started.elapsed().as_secs_f64() * 1000.0
    };
    let mut uncached = Vec::new();
    for i in 0..1000 {
        uncached.push(time(&query(i)).await);
    }
    let mut cached = Vec::new();
    for _ in 0..1000 {
        cached.push(time(&query(7)).await);
    }
    cancel.cancel();
    uncached.sort_by(f64::total_cmp);
    cached.sort_by(f64::total_cmp);
    println!(
        "live evaluation against anvil (eth_call of isAppAllowed, custom IAppAuth app): median {:.3} ms, p99 {:.3} ms (1000 distinct boot infos); same boot info within the block: median {:.4} ms, p99 {:.4} ms",
        pct(&uncached, 0.5),
        pct(&uncached, 0.99),
        pct(&cached, 0.5),
        pct(&cached, 0.99)
    );
    store.close().await;
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    lookup();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(backfill());
    rt.block_on(steady_state_and_revocation());
    rt.block_on(live());
}
