//! Governance benchmark on a local anvil with the real Safe 1.4.1 bytecode and the in-process
//! Transaction Service (the documented JSON, fed from the on-chain Safes):
//!
//! 1. one poll of 100 Safes × 200 pending proposals (each confirmed by one owner), every row
//!    checked (safeTxHash recomputed, signatures recovered, decoded, classified, counted against
//!    the boot records) and simulated with `eth_simulateV1`, within the 5 requests/s limit:
//!    time, request rate and peak RSS;
//! 2. a proposal appearing on the service → its alert at a webhook receiver, with the queue
//!    polled every 2 s (target: p99 ≤ poll interval + 1 s);
//! 3. `keywarden governance verify --safe --nonce` against the local node (target ≤ 1 s).
//!
//! Run with `cargo bench --bench governance`. `KEYWARDEN_BENCH_SAFES` and
//! `KEYWARDEN_BENCH_PROPOSALS` shrink the first part.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "../tests/support/mod.rs"]
mod support;
#[allow(unused_macros)]
#[macro_use]
#[path = "../tests/support/chain_engine.rs"]
mod chain_engine;
#[path = "../tests/support/governance.rs"]
mod governance;
#[path = "../tests/support/txservice.rs"]
mod txservice;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use chain_engine::{Chain, chain, h, sqlite_store};
use keywarden::alerts::config::AlertsConfig;
use keywarden::alerts::delivery::Deliverer;
use keywarden::alerts::metrics::AlertMetrics;
use keywarden::alerts::outbox::Outbox;
use keywarden::chain::contracts::DstackApp;
use keywarden::chain::projection::ChainReads;
use keywarden::governance::config::{GovernanceConfig, SafeEntry};
use keywarden::governance::notify::Notifier;
use keywarden::governance::queue::{ProposalsView, QueueWatcher};
use keywarden::governance::safe_tx::{SafeTx, hashes};
use keywarden::governance::simulate::Simulator;
use keywarden::runtime::Task;
use keywarden::store::Store;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const CHAIN_ID: u64 = 31337;
/// Instances that booted each app with h(4), which half of the proposals remove.
const INSTANCES: u64 = 12;

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn owners() -> [PrivateKeySigner; 3] {
    [1u8, 2, 3].map(|i| PrivateKeySigner::from_bytes(&B256::repeat_byte(i)).unwrap())
}

/// Peak and current resident set of this process, in MiB.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name}: n={} median {:.3} s, p99 {:.3} s, max {:.3} s",
        samples.len(),
        percentile(&samples, 0.5).as_secs_f64(),
        percentile(&samples, 0.99).as_secs_f64(),
        samples.last().unwrap().as_secs_f64()
    );
}

/// A Safe (2 of the 3 owners) owning its own app, for each of `n`.
async fn safes_with_apps(c: &Chain, n: usize) -> Vec<(Address, Address)> {
    let owners: Vec<Address> = owners().iter().map(|o| o.address()).collect();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let safe = governance::safe(c, &owners, 2).await;
        let r = send!(
            c.kms()
                .deployAndRegisterApp_1(safe, false, false, true, B256::ZERO, h(4)),
            c.owner
        );
        out.push((safe, chain_engine::deployed_app(&r)));
    }
    out
}

/// `INSTANCES` instances of each app that received keys with h(4) an hour ago.
async fn boots(store: &Store, apps: &[Address]) {
    let hour_ago = keywarden::clock::unix_secs_i64() - 3600;
    governance::booted_with_h4(store, apps, INSTANCES, hour_ago).await;
}

/// Proposal `nonce` of `safe` on `app`: even nonces remove h(4) (in use), odd ones add a new
/// hash; confirmed by the first owner. The service's decoding is the true one.
fn proposal(safe: Address, app: Address, nonce: u64) -> Value {
    let removal = nonce.is_multiple_of(2);
    let value = if removal {
        h(4)
    } else {
        B256::from(U256::from(1000 + nonce))
    };
    let (data, method) = if removal {
        (
            DstackApp::removeComposeHashCall { composeHash: value }.abi_encode(),
            "removeComposeHash",
        )
    } else {
        (
            DstackApp::addComposeHashCall { composeHash: value }.abi_encode(),
            "addComposeHash",
        )
    };
    let tx = SafeTx::call(app, Bytes::from(data.clone()), nonce);
    let hash = hashes(CHAIN_ID, safe, "1.4.1".parse().unwrap(), &tx).safe_tx_hash;
    let [first, ..] = owners();
    txservice::row(
        safe,
        app,
        &data,
        nonce,
        hash,
        first.address(),
        vec![txservice::confirmation(first.address(), &first, hash)],
        json!({"method": method, "parameters": [{"name": "composeHash", "type": "bytes32", "value": value.to_string()}]}),
    )
}

struct Watching {
    w: governance::Watched,
    proposals: Arc<ProposalsView>,
    gov: GovernanceConfig,
}

/// The chain followed with the governance projection over `safes`, until every Safe is known.
async fn watch(c: &Chain, store: &Store, safes: &[Address], gov: GovernanceConfig) -> Watching {
    let w = governance::watch_with(c, store, safes.to_vec());
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = w.view.snapshot();
        if safes
            .iter()
            .all(|a| s.safes.get(a).is_some_and(|x| x.version.is_some()))
        {
            break;
        }
        assert!(Instant::now() < deadline, "the Safes were never followed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Watching {
        w,
        proposals: Arc::new(ProposalsView::default()),
        gov,
    }
}

impl Watching {
    /// The queue task over this view, simulating through `c`.
    fn watcher(&self, c: &Chain, store: &Store) -> QueueWatcher {
        QueueWatcher::new(
            &self.gov,
            self.w.view.clone(),
            self.proposals.clone(),
            store.clone(),
            Some(simulator(c)),
            self.w.metrics.clone(),
        )
    }
}

fn simulator(c: &Chain) -> Simulator {
    let rpc = keywarden::chain::rpc::RpcPool::new(
        &[c.anvil.url()],
        &keywarden::chain::ChainConfig::default(),
        keywarden::chain::metrics::ChainMetrics::new(&mut Registry::default(), 1),
    );
    Simulator::new(ChainReads::new(Arc::new(rpc)), c.d.kms)
}

fn gov_config(base: &str, safes: &[Address], poll: Duration) -> GovernanceConfig {
    GovernanceConfig {
        transaction_service: Some(base.to_owned()),
        transaction_service_rate: 5.0,
        poll_interval: poll,
        safes: safes
            .iter()
            .map(|a| SafeEntry {
                address: a.to_string(),
                transaction_service: None,
                api_key: None,
            })
            .collect(),
        ..GovernanceConfig::default()
    }
}

fn metric(registry: &Registry, name: &str, labels: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{labels} ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn poll_at_scale() {
    let (n, m) = (
        env_or("KEYWARDEN_BENCH_SAFES", 100),
        env_or("KEYWARDEN_BENCH_PROPOSALS", 200),
    );
    println!("== one poll: {n} Safes x {m} pending proposals, 5 requests/s, with simulation");
    let c = chain().await;
    let pairs = safes_with_apps(&c, n).await;
    let (safes, apps): (Vec<Address>, Vec<Address>) = pairs.iter().copied().unzip();
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    boots(&store, &apps).await;
    let (base, ts) = txservice::service(c.provider.clone(), 200).await;
    {
        let mut rows = ts.rows.lock().unwrap();
        for (safe, app) in &pairs {
            rows.extend((0..m as u64).map(|nonce| proposal(*safe, *app, nonce)));
        }
    }
    let w = watch(
        &c,
        &store,
        &safes,
        gov_config(&base, &safes, Duration::from_secs(30)),
    )
    .await;
    let mut watcher = w.watcher(&c, &store);
    let (peak_before, rss_before) = rss_mib();
    let before = ts.requests.load(std::sync::atomic::Ordering::SeqCst);
    let started = Instant::now();
    watcher.poll_once().await.unwrap();
    let took = started.elapsed();
    let requests = ts.requests.load(std::sync::atomic::Ordering::SeqCst) - before;
    let (peak_after, rss_after) = rss_mib();
    let snapshot = w.proposals.snapshot();
    let evaluated: usize = snapshot.values().map(|q| q.proposals.len()).sum();
    let critical = snapshot
        .values()
        .flat_map(|q| &q.proposals)
        .filter(|p| p.affected() == INSTANCES)
        .count();
    let simulated = metric(
        &w.w.registry,
        "dstack_governance_simulations_total",
        "{outcome=\"simulated\"}",
    );
    assert_eq!(evaluated, n * m, "every proposal evaluated in one poll");
    assert_eq!(critical, n * m / 2, "every removal names its instances");
    assert_eq!(simulated as usize, n * m, "every proposal simulated");
    println!(
        "first poll: {evaluated} proposals evaluated and simulated in {:.1} s ({:.2} ms each); {requests} service requests, at most {} within any second",
        took.as_secs_f64(),
        took.as_secs_f64() * 1000.0 / evaluated as f64,
        ts.peak_per_second()
    );
    println!(
        "memory: peak RSS {peak_before:.0} MiB before the poll (rows of the in-process service included), {peak_after:.0} MiB after; RSS {rss_before:.0} -> {rss_after:.0} MiB"
    );
    let started = Instant::now();
    watcher.poll_once().await.unwrap();
    println!(
        "second poll (unchanged queue, simulations reused): {:.1} s",
        started.elapsed().as_secs_f64()
    );
    w.w.engine.stop().await;
}

/// Webhook deliveries: when each `proposed` alert arrived, by safeTxHash.
type Arrivals = Arc<Mutex<Vec<(String, Instant)>>>;

async fn receiver() -> (String, Arrivals) {
    let got: Arrivals = Arc::default();
    let g = got.clone();
    let router = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let g = g.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap();
                if v["transition"] == "proposed" {
                    let hash = v["labels"]["safe_tx_hash"].as_str().unwrap().to_owned();
                    g.lock().unwrap().push((hash, Instant::now()));
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    (
        format!("http://{}/hook", common::serve_router(router).await),
        got,
    )
}

async fn alert_latency_and_verify() {
    const POLL: Duration = Duration::from_secs(2);
    let samples = env_or("KEYWARDEN_BENCH_LATENCY_SAMPLES", 40);
    println!(
        "== proposal on the service -> alert delivered (poll every {} s), {samples} proposals",
        POLL.as_secs()
    );
    let c = chain().await;
    let pairs = safes_with_apps(&c, 1).await;
    let (safe, app) = pairs[0];
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    boots(&store, &[app]).await;
    let (base, ts) = txservice::service(c.provider.clone(), 200).await;
    let w = watch(&c, &store, &[safe], gov_config(&base, &[safe], POLL)).await;
    let (hook, arrivals) = receiver().await;
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, "s").unwrap();
    let alerts = AlertsConfig {
        webhook_url: Some(hook),
        webhook_secret: Some(keywarden::secret::SecretRef::File(secret)),
        ..AlertsConfig::default()
    };
    let channels = alerts.channels().unwrap();
    let cancel = CancellationToken::new();
    let mut registry = Registry::default();
    let watcher = w.watcher(&c, &store);
    let notifier = Notifier::new(
        w.w.view.clone(),
        w.proposals.clone(),
        Outbox::new(store.clone(), &channels),
        store.clone(),
        w.gov.in_use_window,
        w.w.metrics.clone(),
    );
    let deliverer = Deliverer::new(
        store.clone(),
        channels.clone(),
        &alerts,
        AlertMetrics::new(&mut registry, &channels),
    );
    let handles = vec![
        tokio::spawn(watcher.run(cancel.clone())),
        tokio::spawn(notifier.run(cancel.clone())),
        tokio::spawn(deliverer.run(cancel.clone())),
    ];
    let mut latencies = Vec::with_capacity(samples);
    for nonce in 0..samples as u64 {
        // Spread arrivals over the poll cycle (golden-ratio steps, deterministic).
        let offset = (nonce as f64 * 0.618_034).fract() * POLL.as_secs_f64();
        tokio::time::sleep(Duration::from_secs_f64(offset)).await;
        let row = proposal(safe, app, nonce);
        let hash = row["safeTxHash"].as_str().unwrap().to_owned();
        ts.rows.lock().unwrap().push(row);
        let put = Instant::now();
        let deadline = put + Duration::from_secs(30);
        let at = loop {
            if let Some((_, at)) = arrivals.lock().unwrap().iter().find(|(h, _)| *h == hash) {
                break *at;
            }
            assert!(Instant::now() < deadline, "proposal {nonce} never alerted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        latencies.push(at.saturating_duration_since(put));
    }
    summary("proposal -> alert", latencies);

    println!("== keywarden governance verify --safe --nonce against the local node");
    let config = governance::command_config(dir.path(), &c, &base);
    let mut runs = Vec::new();
    for _ in 0..10 {
        let args: Vec<String> = [
            "governance",
            "verify",
            "--safe",
            &safe.to_string(),
            "--nonce",
            "0",
            "--config",
            &config.display().to_string(),
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        let started = Instant::now();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_keywarden"))
                .args(&args)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        runs.push(started.elapsed());
        // A removal of a hash 12 instances use: exit 3 (critical), naming them.
        assert_eq!(
            out.status.code(),
            Some(3),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("12 instance(s)"));
    }
    summary("governance verify (whole process)", runs);
    cancel.cancel();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    w.w.engine.stop().await;
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        alert_latency_and_verify().await;
        poll_at_scale().await;
    });
}
