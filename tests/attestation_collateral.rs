//! The PCCS client and collateral cache against an in-test PCCS on 127.0.0.1 serving the test
//! PKI's collateral in the PCCS v4 JSON shapes (never the real network).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use keywarden::attestation::collateral::{
    CollateralCache, CollateralProvider, MemoryCollateralCache, collateral_next_update,
};
use keywarden::attestation::{AttestationConfig, AttestationMetrics, RejectReason, Verifier};
use keywarden::sim::testpki::{QuoteMeasurements, TestPki};

const NOW: u64 = 1_800_000_000;

struct Pccs {
    collateral: dcap_qvl::QuoteCollateralV3,
    requests: AtomicUsize,
    down: AtomicBool,
    /// Fetches begun (each begins with the PCK CRL).
    fetches: AtomicUsize,
    /// How long the PCK CRL takes to answer, in milliseconds: a stalling PCCS.
    stall_ms: AtomicU64,
}

impl Pccs {
    fn new(collateral: dcap_qvl::QuoteCollateralV3) -> Shared {
        Arc::new(Self {
            collateral,
            requests: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            fetches: AtomicUsize::new(0),
            stall_ms: AtomicU64::new(0),
        })
    }
}

type Shared = Arc<Pccs>;

fn encode_header(pem: &str) -> HeaderValue {
    let mut out = String::new();
    for b in pem.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).unwrap()
}

fn guard(s: &Pccs) -> Option<Response> {
    s.requests.fetch_add(1, Ordering::SeqCst);
    s.down
        .load(Ordering::SeqCst)
        .then(|| StatusCode::SERVICE_UNAVAILABLE.into_response())
}

async fn pckcrl(State(s): State<Shared>) -> Response {
    s.fetches.fetch_add(1, Ordering::SeqCst);
    let stall = s.stall_ms.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(stall)).await;
    if let Some(r) = guard(&s) {
        return r;
    }
    let mut h = HeaderMap::new();
    h.insert(
        "SGX-PCK-CRL-Issuer-Chain",
        encode_header(&s.collateral.pck_crl_issuer_chain),
    );
    (h, s.collateral.pck_crl.clone()).into_response()
}

async fn tcb(State(s): State<Shared>) -> Response {
    if let Some(r) = guard(&s) {
        return r;
    }
    let mut h = HeaderMap::new();
    h.insert(
        "TCB-Info-Issuer-Chain",
        encode_header(&s.collateral.tcb_info_issuer_chain),
    );
    let body = format!(
        r#"{{"tcbInfo":{},"signature":"{}"}}"#,
        s.collateral.tcb_info,
        hex::encode(&s.collateral.tcb_info_signature)
    );
    (h, body).into_response()
}

async fn qe_identity(State(s): State<Shared>) -> Response {
    if let Some(r) = guard(&s) {
        return r;
    }
    let mut h = HeaderMap::new();
    h.insert(
        "SGX-Enclave-Identity-Issuer-Chain",
        encode_header(&s.collateral.qe_identity_issuer_chain),
    );
    let body = format!(
        r#"{{"enclaveIdentity":{},"signature":"{}"}}"#,
        s.collateral.qe_identity,
        hex::encode(&s.collateral.qe_identity_signature)
    );
    (h, body).into_response()
}

async fn rootcacrl(State(s): State<Shared>) -> Response {
    if let Some(r) = guard(&s) {
        return r;
    }
    hex::encode(&s.collateral.root_ca_crl).into_response()
}

async fn serve(pki: &TestPki) -> (String, Shared) {
    let state = Pccs::new(pki.collateral().clone());
    let app = Router::new()
        .route("/sgx/certification/v4/pckcrl", get(pckcrl))
        .route("/tdx/certification/v4/tcb", get(tcb))
        .route("/tdx/certification/v4/qe/identity", get(qe_identity))
        .route("/sgx/certification/v4/rootcacrl", get(rootcacrl))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), state)
}

/// A check before fetching that lets every quote through.
async fn no_check() -> Result<(), keywarden::attestation::AttestationError> {
    Ok(())
}

/// A provider fetching from `url` with `config`'s other settings, and its metrics.
fn provider_with(
    url: &str,
    config: AttestationConfig,
) -> (CollateralProvider, prometheus_client::registry::Registry) {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = AttestationMetrics::new(&mut registry);
    let config = AttestationConfig {
        pccs_url: url.to_owned(),
        ..config
    };
    let cache = Arc::new(MemoryCollateralCache::default());
    let provider = CollateralProvider::new(&config, cache, Some(metrics)).unwrap();
    (provider, registry)
}

fn metrics_text(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
    out
}

/// A quote through `pki` for a platform with `fmspc`.
fn quote_for(pki: &TestPki, fmspc: [u8; 6]) -> Vec<u8> {
    let m = QuoteMeasurements {
        fmspc: Some(fmspc),
        ..QuoteMeasurements::default()
    };
    pki.quote(&[1; 64], &m, false).unwrap()
}

/// Quotes that do not prove themselves (another root, a broken signature) are refused before
/// the PCCS is asked, so an attacker's made-up platforms cost no outbound request.
#[tokio::test]
async fn quotes_failing_their_own_signatures_never_reach_the_pccs() {
    let pki = TestPki::generate(NOW).unwrap();
    let (url, pccs) = serve(&pki).await;
    let (provider, _) = provider_with(&url, AttestationConfig::default());
    let verifier =
        Verifier::with_test_root(AttestationConfig::default(), Some(pki.root_der().to_vec()))
            .unwrap();
    let check = |quote: &[u8]| {
        let quote = quote.to_vec();
        let verifier = &verifier;
        async move { verifier.preverify_quote(&quote, NOW) }
    };
    let foreign = TestPki::generate(NOW).unwrap();
    let attacker = quote_for(&foreign, [0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6]);
    let e = provider
        .for_quote(&attacker, NOW, check(&attacker))
        .await
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::UntrustedRoot, "{e}");
    let mut tampered = quote_for(&pki, [0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6]);
    tampered[200] ^= 1; // inside the TD report the attestation key signed
    let e = provider
        .for_quote(&tampered, NOW, check(&tampered))
        .await
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::QuoteSignatureInvalid, "{e}");
    assert_eq!(pccs.requests.load(Ordering::SeqCst), 0);
    assert_eq!(pccs.fetches.load(Ordering::SeqCst), 0);
    // The same platform's genuine quote is fetched for.
    let genuine = quote_for(&pki, [0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6]);
    provider
        .for_quote(&genuine, NOW, check(&genuine))
        .await
        .unwrap();
    assert_eq!(pccs.fetches.load(Ordering::SeqCst), 1);
}

/// Against a stalling PCCS: requests for one platform share one fetch, fetches beyond the cap
/// are refused at once (not queued), and a failed platform is not fetched again within the
/// failure TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collateral_fetches_are_coalesced_capped_and_failures_remembered() {
    let pki = TestPki::generate(NOW).unwrap();
    let (url, pccs) = serve(&pki).await;
    let (provider, registry) = provider_with(
        &url,
        AttestationConfig {
            collateral_max_concurrent_fetches: 2,
            collateral_failure_ttl: Duration::from_secs(60),
            ..AttestationConfig::default()
        },
    );
    let provider = Arc::new(provider);
    let (a, b, c) = (
        quote_for(&pki, [0xaa; 6]),
        quote_for(&pki, [0xbb; 6]),
        quote_for(&pki, [0xcc; 6]),
    );
    pccs.stall_ms.store(1500, Ordering::SeqCst);
    pccs.down.store(true, Ordering::SeqCst);
    let mut stalled = Vec::new();
    for quote in [&a, &a, &a, &a, &a, &b] {
        let (provider, quote) = (provider.clone(), quote.clone());
        stalled.push(tokio::spawn(async move {
            provider.for_quote(&quote, NOW, no_check()).await
        }));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while pccs.fetches.load(Ordering::SeqCst) < 2 {
        assert!(std::time::Instant::now() < deadline, "fetches never began");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Both slots are taken: a third platform is refused at once.
    let started = std::time::Instant::now();
    let e = provider.for_quote(&c, NOW, no_check()).await.unwrap_err();
    assert_eq!(e.reason, RejectReason::CollateralUnavailable, "{e}");
    assert!(e.to_string().contains("already in progress"), "{e}");
    assert!(started.elapsed() < Duration::from_millis(500));
    for task in stalled {
        let e = task.await.unwrap().unwrap_err();
        assert_eq!(e.reason, RejectReason::CollateralUnavailable, "{e}");
    }
    // One fetch for A's five requests, one for B.
    assert_eq!(pccs.fetches.load(Ordering::SeqCst), 2);
    // A failed a moment ago: refused from memory, even with the PCCS back.
    pccs.stall_ms.store(0, Ordering::SeqCst);
    pccs.down.store(false, Ordering::SeqCst);
    let e = provider.for_quote(&a, NOW, no_check()).await.unwrap_err();
    assert!(e.to_string().contains("collateral_failure_ttl"), "{e}");
    assert_eq!(pccs.fetches.load(Ordering::SeqCst), 2);
    // C never failed: fetched now.
    provider.for_quote(&c, NOW, no_check()).await.unwrap();
    assert_eq!(pccs.fetches.load(Ordering::SeqCst), 3);
    let text = metrics_text(&registry);
    for needle in [
        "dstack_kms_collateral_fetches_skipped_total{reason=\"busy\"} 1",
        "dstack_kms_collateral_fetches_skipped_total{reason=\"recent_failure\"} 5",
    ] {
        assert!(text.contains(needle), "missing {needle}\n{text}");
    }
}

#[tokio::test]
async fn fetch_cache_refresh_and_expiry() {
    let pki = TestPki::generate(NOW).unwrap();
    let (url, pccs) = serve(&pki).await;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = AttestationMetrics::new(&mut registry);
    let config = AttestationConfig {
        pccs_url: url,
        collateral_refresh_margin: Duration::from_secs(24 * 3600),
        // Every step below fetches again, however recent the last failure.
        collateral_failure_ttl: Duration::ZERO,
        ..AttestationConfig::default()
    };
    let cache = Arc::new(MemoryCollateralCache::default());
    let provider = CollateralProvider::new(&config, cache.clone(), Some(metrics)).unwrap();
    let quote = pki
        .quote(&[1; 64], &QuoteMeasurements::default(), false)
        .unwrap();
    let verifier = Verifier::with_test_root(config.clone(), Some(pki.root_der().to_vec())).unwrap();

    // miss: fetched from the PCCS, and it verifies the quote
    let c = provider.for_quote(&quote, NOW, no_check()).await.unwrap();
    assert_eq!(pccs.requests.load(Ordering::SeqCst), 4);
    verifier.verify_quote(&quote, &c, NOW).unwrap();
    let stored = cache
        .get("4B5754000001", "platform")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.next_update,
        collateral_next_update(pki.collateral()).unwrap()
    );

    // hit: no request
    provider
        .for_quote(&quote, NOW + 60, no_check())
        .await
        .unwrap();
    assert_eq!(pccs.requests.load(Ordering::SeqCst), 4);

    // inside the refresh margin: refetched
    let next = stored.next_update;
    provider
        .for_quote(&quote, next - 3600, no_check())
        .await
        .unwrap();
    assert_eq!(pccs.requests.load(Ordering::SeqCst), 8);

    // PCCS down, cached set still valid: served
    pccs.down.store(true, Ordering::SeqCst);
    provider
        .for_quote(&quote, next - 60, no_check())
        .await
        .unwrap();
    // PCCS down, cached set expired: refused, never used
    let e = provider
        .for_quote(&quote, next + 1, no_check())
        .await
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::CollateralUnavailable);
    // PCCS up but serving collateral that is already expired at now
    pccs.down.store(false, Ordering::SeqCst);
    let e = provider
        .for_quote(&quote, next + 1, no_check())
        .await
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::CollateralExpired);

    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    assert!(
        out.contains("dstack_kms_collateral_cache_hits_total 1"),
        "{out}"
    );
    assert!(
        out.contains("dstack_kms_collateral_cache_misses_total 5"),
        "{out}"
    );
    assert!(
        out.contains("dstack_kms_collateral_fetch_failures_total 2"),
        "{out}"
    );
    assert!(
        out.contains("dstack_kms_collateral_fetch_duration_seconds_count 5"),
        "{out}"
    );
}

#[test]
fn next_update_of_real_collateral_is_the_window_end() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if !dir.is_dir() {
        eprintln!(
            "SKIPPED: attestation fixtures not found at {}",
            dir.display()
        );
        return;
    }
    for (file, window_end) in [
        ("tdx/tdx_quote_collateral.json", 1752919235),
        ("ra-tls/near_mpc_dstack_tdx_collateral.json", 1789171031),
    ] {
        let c =
            keywarden::attestation::tdx::parse_collateral(&std::fs::read(dir.join(file)).unwrap())
                .unwrap();
        assert_eq!(collateral_next_update(&c).unwrap(), window_end, "{file}");
    }
}

#[tokio::test]
async fn root_ca_crl_from_the_distribution_point_when_there_is_no_pccs_endpoint() {
    // an Intel-PCS-like server: no rootcacrl endpoint; the root names where its CRL lives
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let pki = TestPki::generate_with_root_crl_url(NOW, Some(&format!("{base}/IntelSGXRootCA.der")))
        .unwrap();
    let state = Pccs::new(pki.collateral().clone());
    async fn root_crl_der(State(s): State<Shared>) -> Response {
        s.collateral.root_ca_crl.clone().into_response()
    }
    let app = Router::new()
        .route("/sgx/certification/v4/pckcrl", get(pckcrl))
        .route("/tdx/certification/v4/tcb", get(tcb))
        .route("/tdx/certification/v4/qe/identity", get(qe_identity))
        .route("/IntelSGXRootCA.der", get(root_crl_der))
        .with_state(state);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let config = AttestationConfig {
        pccs_url: base,
        ..AttestationConfig::default()
    };
    let provider =
        CollateralProvider::new(&config, Arc::new(MemoryCollateralCache::default()), None).unwrap();
    let quote = pki
        .quote(&[1; 64], &QuoteMeasurements::default(), false)
        .unwrap();
    let c = provider.for_quote(&quote, NOW, no_check()).await.unwrap();
    assert_eq!(c.root_ca_crl, pki.collateral().root_ca_crl);
    Verifier::with_test_root(config, Some(pki.root_der().to_vec()))
        .unwrap()
        .verify_quote(&quote, &c, NOW)
        .unwrap();
}
