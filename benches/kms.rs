//! Key-dispatch benchmark: `keywarden serve` (release) on SQLite following a real anvil chain,
//! driven by the load generator with a fresh mutual-TLS connection per request and test-PKI TDX
//! quotes, loadgen and server on the same machine.
//!
//! Runs, each 10 s (`KEYWARDEN_BENCH_SECS` overrides):
//! 1. the mirror (`auth.backend = "chain"`) at rising concurrency, to find saturation;
//! 2. overload: the limit set to the number of cores (plus as many queued), requests
//!    arriving at twice the saturation throughput (open loop) — accepted and refused (503)
//!    latencies, and the server's peak memory;
//! 3. the same concurrency as 1 with `auth.backend = "webhook"` against an auth server that makes
//!    one `isAppAllowed` `eth_call` to anvil per request (what upstream's auth server does, minus
//!    its second round trip for the KMS self-check): the latency ratio is what the mirror buys.
//!
//! Run with `cargo bench --bench kms`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[allow(dead_code)]
#[path = "../tests/support/anvil.rs"]
mod anvil;
// The benchmark does not use the owner account.
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/support/guest_chain.rs"]
mod guest_chain;

use std::path::Path;
use std::time::Duration;

use alloy::primitives::{Address, FixedBytes};
use alloy::providers::DynProvider;
use anvil::Anvil;
use axum::Json;
use axum::extract::State;
use axum::routing::post;
use common::Keywarden;
use keywarden::chain::contracts::DstackKms;
use keywarden::sim::client::{self, Guest};
use keywarden::sim::loadgen::{self, Load, Report};
use keywarden::sim::testpki::TestPki;

const COMPOSE: &[u8] = b"{\"name\":\"kms-bench\"}";

struct Chain {
    _anvil: Anvil,
    url: url::Url,
    provider: DynProvider,
    kms: Address,
    app: Address,
}

async fn chain() -> Chain {
    let anvil = Anvil::spawn();
    let url = anvil.url();
    let c = guest_chain::allow_simulated_guest(&url, COMPOSE).await;
    Chain {
        _anvil: anvil,
        url,
        provider: c.provider,
        kms: c.deployment.kms,
        app: c.deployment.app,
    }
}

fn hex_field<const N: usize>(v: &serde_json::Value, key: &str) -> FixedBytes<N> {
    let bytes = hex::decode(v[key].as_str().unwrap_or_default()).unwrap_or_default();
    let mut out = [0u8; N];
    let n = bytes.len().min(N);
    out[..n].copy_from_slice(&bytes[..n]);
    FixedBytes(out)
}

/// `POST /bootAuth/app`: one `DstackKms.isAppAllowed` eth_call per request.
async fn boot_auth_app(
    State((provider, kms)): State<(DynProvider, Address)>,
    Json(boot): Json<serde_json::Value>,
) -> Json<serde_json::Value> {
    let info = DstackKms::AppBootInfo {
        appId: Address::from(hex_field::<20>(&boot, "appId").0),
        composeHash: hex_field::<32>(&boot, "composeHash"),
        instanceId: Address::from(hex_field::<20>(&boot, "instanceId").0),
        deviceId: hex_field::<32>(&boot, "deviceId"),
        mrAggregated: hex_field::<32>(&boot, "mrAggregated"),
        mrSystem: hex_field::<32>(&boot, "mrSystem"),
        osImageHash: hex_field::<32>(&boot, "osImageHash"),
        tcbStatus: boot["tcbStatus"].as_str().unwrap_or_default().to_owned(),
        advisoryIds: Vec::new(),
    };
    let answer = DstackKms::new(kms, &provider)
        .isAppAllowed(info)
        .call()
        .await
        .unwrap();
    Json(serde_json::json!({
        "isAllowed": answer.isAllowed,
        "reason": answer.reason,
        "gatewayAppId": "",
    }))
}

async fn auth_server(chain: &Chain) -> String {
    let router = axum::Router::new()
        .route("/bootAuth/app", post(boot_auth_app))
        .with_state((chain.provider.clone(), chain.kms));
    format!("http://{}", common::serve_router(router).await)
}

struct Server {
    kw: Keywarden,
    dir: tempfile::TempDir,
}

fn serve(chain: &Chain, pki_dir: &Path, env: &[(&str, &str)]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let images = keywarden::kms::osimage::env_value(&[client::simulated_os_image()]);
    let rpc = chain.url.to_string();
    let kms = chain.kms.to_string();
    let mut all_env = vec![
        ("KEYWARDEN_KMS__OS_IMAGES", images.as_str()),
        ("KEYWARDEN_CHAIN__CONFIRMATIONS", "0"),
        ("KEYWARDEN_CHAIN__POLL_INTERVAL", "200ms"),
        // anvil mines only on transactions; nothing changes during a run.
        ("KEYWARDEN_CHAIN__MAX_STALENESS", "1h"),
    ];
    all_env.extend_from_slice(env);
    let kw = Keywarden::start(
        &dir.path().join("data"),
        &[
            "--insecure-test-pki",
            pki_dir.to_str().unwrap(),
            "--rpc-url",
            &rpc,
            "--kms-contract",
            &kms,
            "--start-block",
            "0",
        ],
        &all_env,
    );
    Server { kw, dir }
}

async fn load(
    chain: &Chain,
    server: &mut Server,
    pki: &TestPki,
    offered: Load,
    secs: u64,
) -> Report {
    server.kw.wait_ready().await;
    let ca = std::fs::read_to_string(server.dir.path().join("data/kms/root-ca.pem")).unwrap();
    let spec = client::guest_spec(chain.app.into_array(), COMPOSE, vec![0x42; 20]);
    let guest = Guest::enroll(&server.kw.api_url(), Some(ca), pki, &spec, true)
        .await
        .unwrap();
    // Warm-up: the first request also proves the policy is in place.
    guest
        .get_app_key(&client::simulated_vm_config())
        .await
        .expect("the bench app is allowed");
    loadgen::run(
        guest,
        offered,
        Duration::from_secs(secs),
        Some(format!("http://{}/metrics", server.kw.metrics)),
    )
    .await
}

fn line(label: &str, r: &Report) {
    let rss = r.server_rss_bytes.map_or("-".into(), |(first, peak)| {
        format!("{:.1} -> {:.1} MB", first as f64 / 1e6, peak as f64 / 1e6)
    });
    println!(
        "{label:<34} {:>7.0} keys/s  ok p50 {:>6.2} p90 {:>6.2} p99 {:>7.2} ms  503s {:>6}  refused p50 {:>5.2} p99 {:>6.2} ms  errors {:?}  rss {rss}",
        r.throughput_rps,
        r.ok_latency_ms.p50,
        r.ok_latency_ms.p90,
        r.ok_latency_ms.p99,
        r.errors.get("http_503").copied().unwrap_or(0),
        r.refused_latency_ms.p50,
        r.refused_latency_ms.p99,
        r.errors,
    );
}

#[tokio::main]
async fn main() {
    let secs: u64 = std::env::var("KEYWARDEN_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let chain = chain().await;
    let pki_dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let pki = TestPki::generate(now - 60).unwrap();
    pki.save(pki_dir.path()).unwrap();

    println!("== mirror (auth.backend = chain), default limits");
    let mut mirror = serve(&chain, pki_dir.path(), &[]);
    let mut best = (0usize, 0.0f64);
    let mut mirror_runs = Vec::new();
    for c in [1usize, 2, 4, 8] {
        let r = load(
            &chain,
            &mut mirror,
            &pki,
            Load::Closed { concurrency: c },
            secs,
        )
        .await;
        line(&format!("mirror  concurrency {c}"), &r);
        if r.throughput_rps > best.1 * 1.05 {
            best = (c, r.throughput_rps);
        }
        mirror_runs.push((c, r));
    }
    drop(mirror);
    let saturating = best.0;
    println!(
        "saturation: {:.0} keys/s at concurrency {saturating}",
        best.1
    );

    // The key path is CPU-bound: more slots than cores only lengthen every accepted request.
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    let rate = 2.0 * best.1;
    println!(
        "== overload: {rate:.0} requests/s offered (2x saturation, open loop), limit {cores} + {cores} queued"
    );
    let limit = cores.to_string();
    let mut overloaded = serve(
        &chain,
        pki_dir.path(),
        &[
            ("KEYWARDEN_KMS__MAX_CONCURRENT_REQUESTS", &limit),
            ("KEYWARDEN_KMS__MAX_QUEUED_REQUESTS", &limit),
        ],
    );
    let offered = Load::Open {
        rate,
        max_in_flight: 512,
    };
    let r = load(&chain, &mut overloaded, &pki, offered, secs).await;
    line(&format!("overload {rate:.0}/s"), &r);
    drop(overloaded);

    println!("== webhook (auth.backend = webhook; one eth_call to anvil per request)");
    let auth_url = auth_server(&chain).await;
    let mut webhook = serve(
        &chain,
        pki_dir.path(),
        &[
            ("KEYWARDEN_AUTH__BACKEND", "webhook"),
            ("KEYWARDEN_AUTH__WEBHOOK_URL", &auth_url),
        ],
    );
    for (c, m) in &mirror_runs {
        let r = load(
            &chain,
            &mut webhook,
            &pki,
            Load::Closed { concurrency: *c },
            secs,
        )
        .await;
        line(&format!("webhook concurrency {c}"), &r);
        println!(
            "{:<34} throughput mirror/webhook {:.2}; latency webhook/mirror p50 {:.2} p99 {:.2}",
            "",
            m.throughput_rps / r.throughput_rps.max(1e-9),
            r.ok_latency_ms.p50 / m.ok_latency_ms.p50.max(1e-9),
            r.ok_latency_ms.p99 / m.ok_latency_ms.p99.max(1e-9),
        );
    }
}
