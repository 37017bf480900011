//! The KMS RPC over real TLS on loopback, driven like a dstack guest: temp CA → own RA-TLS
//! certificate with a test-PKI quote → GetAppKey. Authorization through an in-test auth server
//! speaking upstream's webhook API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Keywarden, http, https, https_with_identity};
use keywarden::kms::keys::AppKeys;
use keywarden::kms::osimage::OsImage;
use keywarden::kms::proto;
use keywarden::sim::testpki::{GuestSpec, TestPki, TestTcb};
use prost::Message as _;

const ALLOWED_APP: [u8; 20] = [0xa1; 20];
const DENIED_APP: [u8; 20] = [0xd1; 20];
const SLOW_APP: [u8; 20] = [0x51; 20];
const CANARY_APP: [u8; 20] = [0xca; 20];

fn guest(app_id: [u8; 20]) -> GuestSpec {
    GuestSpec {
        app_id,
        compose_hash: [0xc0; 32],
        instance_id: vec![0x1d; 20],
        key_provider: br#"{"name":"kms","id":"00"}"#.to_vec(),
        mr_td: [0x11; 48],
        rtmr0_2: [[0x22; 48], [0x33; 48], [0x44; 48]],
        debug: false,
        tcb: TestTcb::UpToDate,
        ppid: None,
        fmspc: None,
    }
}

/// An auth server allowing only `ALLOWED_APP`; counts calls.
async fn auth_server(calls: Arc<std::sync::atomic::AtomicUsize>) -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/bootAuth/app",
        axum::routing::post(move |axum::Json(boot): axum::Json<serde_json::Value>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if boot["appId"] == hex::encode(SLOW_APP) {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                }
                let allowed = boot["appId"] != hex::encode(DENIED_APP);
                assert_eq!(boot["composeHash"], hex::encode([0xc0; 32]));
                axum::Json(serde_json::json!({
                    "isAllowed": allowed,
                    "gatewayAppId": "gw-app",
                    "reason": if allowed { "" } else { "Compose hash not allowed" },
                }))
            }
        }),
    );
    common::serve_router(app).await
}

/// What a recording auth server was asked: (path, boot info JSON).
type Asked = Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>;

/// An auth server allowing every boot (`/bootAuth/app` and `/bootAuth/kms`) and recording what
/// it was asked.
async fn recording_auth_server(asked: Asked) -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/bootAuth/{kind}",
        axum::routing::post(
            move |axum::extract::Path(kind): axum::extract::Path<String>,
                  axum::Json(boot): axum::Json<serde_json::Value>| {
                let asked = asked.clone();
                async move {
                    asked.lock().unwrap().push((kind, boot));
                    axum::Json(
                        serde_json::json!({"isAllowed": true, "gatewayAppId": "", "reason": ""}),
                    )
                }
            },
        ),
    );
    common::serve_router(app).await
}

/// Starts keywarden trusting a fresh test PKI; returns (process, pki).
fn start(dir: &Path, env: &[(&str, &str)]) -> (Keywarden, TestPki) {
    // The two OS images guests in these tests run: the test guest's and the CLI's simulated one.
    let images = [
        OsImage::new(
            &[0x05; 32],
            &[0x11; 48],
            &[[0x22; 48], [0x33; 48], [0x44; 48]],
        ),
        keywarden::sim::client::simulated_os_image(),
    ];
    common::start_with_test_pki_and_images(dir, &images, env)
}

/// [`start`] with the authorizer settings `auth` and `env` on top, once ready.
async fn start_ready(
    dir: &Path,
    auth: &[(&str, &str)],
    env: &[(&str, &str)],
) -> (Keywarden, TestPki) {
    let all = [auth, env].concat();
    let (mut kw, pki) = start(dir, &all);
    kw.wait_ready().await;
    (kw, pki)
}

/// [`start_ready`] with the `dev` authorizer (every attested boot allowed).
async fn start_dev_auth(dir: &Path, env: &[(&str, &str)]) -> (Keywarden, TestPki) {
    let dev = [
        ("KEYWARDEN_AUTH__BACKEND", "dev"),
        ("KEYWARDEN_AUTH__INSECURE_DEV_AUTH", "true"),
    ];
    start_ready(dir, &dev, env).await
}

/// [`start_ready`] asking the auth server at `url` (upstream's webhook API).
async fn start_with_webhook(dir: &Path, url: &str, env: &[(&str, &str)]) -> (Keywarden, TestPki) {
    let webhook = [
        ("KEYWARDEN_AUTH__BACKEND", "webhook"),
        ("KEYWARDEN_AUTH__WEBHOOK_URL", url),
    ];
    start_ready(dir, &webhook, env).await
}

async fn post_json(
    client: &reqwest::Client,
    url: String,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = client.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// vm_config naming the test guest's OS image.
fn test_vm_config() -> String {
    serde_json::json!({"os_image_hash": hex::encode([0x05; 32])}).to_string()
}

/// A GetAppKey request for the test guest's OS image.
fn app_key_body() -> serde_json::Value {
    serde_json::json!({"api_version": 1, "vm_config": test_vm_config()})
}

/// An HTTPS client presenting the RA-TLS identity of the test guest of `app`.
async fn guest_client(
    kw: &Keywarden,
    data: &Path,
    pki: &TestPki,
    app: [u8; 20],
) -> reqwest::Client {
    let identity = guest_identity(kw, data, pki, &guest(app)).await;
    https_with_identity(data, Some(&identity))
}

/// The guest flow: temp CA, then an RA-TLS identity for `spec`.
async fn guest_identity(kw: &Keywarden, data: &Path, pki: &TestPki, spec: &GuestSpec) -> String {
    let (status, temp) = post_json(
        &https(data),
        format!("{}/prpc/KMS.GetTempCaCert?json", kw.api_url()),
        serde_json::json!({}),
    )
    .await;
    assert_eq!(status, 200, "{temp}");
    let ca_pem = temp["temp_ca_cert"].as_str().unwrap();
    let ca_der = pem::parse(ca_pem).unwrap().into_contents();
    let ca_key = rcgen::KeyPair::from_pem(temp["temp_ca_key"].as_str().unwrap()).unwrap();
    let cert = pki.guest_cert(spec, Some((&ca_der, &ca_key))).unwrap();
    format!("{}{}", cert.cert_pem, cert.key_pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_gets_its_keys_and_refusals_carry_typed_reasons() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let auth = auth_server(calls.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let auth_url = format!("http://{auth}");
    let canaries = format!("[\"{}\"]", hex::encode(CANARY_APP));
    let (mut kw, pki) = start_with_webhook(
        dir.path(),
        &auth_url,
        &[("KEYWARDEN_KMS__CANARY_APP_IDS", &canaries)],
    )
    .await;
    let url = |m: &str| format!("{}/prpc/{m}?json", kw.api_url());
    let vm_config = serde_json::json!({"os_image_hash": hex::encode([0x05; 32])}).to_string();
    let request = serde_json::json!({"api_version": 1, "vm_config": vm_config});

    // Allowed boot: keys equal the derivation from the root keys on disk.
    let client = guest_client(&kw, &data, &pki, ALLOWED_APP).await;
    let (status, keys) = post_json(&client, url("KMS.GetAppKey"), request.clone()).await;
    assert_eq!(status, 200, "{keys}");
    let root = keywarden::kms::root::load_existing(&data, &Default::default()).unwrap();
    let expected = AppKeys::derive(&root.root, &ALLOWED_APP, &[0x1d; 20]).unwrap();
    assert_eq!(keys["disk_crypt_key"], hex::encode(expected.disk_crypt_key));
    assert_eq!(keys["env_crypt_key"], hex::encode(expected.env_crypt_key));
    assert_eq!(keys["k256_key"], hex::encode(expected.k256_key));
    assert_eq!(keys["k256_signature"], hex::encode(expected.k256_signature));
    assert_eq!(keys["gateway_app_id"], "gw-app");
    assert_eq!(keys["os_image_hash"], hex::encode([0x05; 32]));
    assert_eq!(keys["ca_cert"], root.root_ca_pem);
    // The host claims another OS image than the one the quote measured: refused.
    let lying = serde_json::json!({"api_version": 1, "vm_config": keywarden::sim::client::simulated_vm_config()});
    let (status, err) = post_json(&client, url("KMS.GetAppKey"), lying).await;
    assert_eq!(status, 400);
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("MRTD in the quote differs"),
        "{err}"
    );
    let unknown = serde_json::json!({"api_version": 1, "vm_config": serde_json::json!({"os_image_hash": "07".repeat(32)}).to_string()});
    let (status, err) = post_json(&client, url("KMS.GetAppKey"), unknown).await;
    assert_eq!(status, 400);
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("not known to this KMS"),
        "{err}"
    );
    // A claim one byte longer, or a key repeated with another value: malformed, never
    // authorized by a prefix or by whichever copy a reader keeps.
    let longer = format!(r#"{{"os_image_hash":"{}"}}"#, "05".repeat(33));
    let repeated = format!(
        r#"{{"os_image_hash":"{}","os_image_hash":"{}"}}"#,
        "05".repeat(32),
        "07".repeat(32)
    );
    for (vm_config, expected) in [
        (longer, "os_image_hash is 33 bytes, not 32"),
        (repeated, "duplicate key"),
    ] {
        let body = serde_json::json!({"api_version": 1, "vm_config": vm_config});
        let (status, err) = post_json(&client, url("KMS.GetAppKey"), body).await;
        assert_eq!(status, 400, "{err}");
        let message = err["error"].as_str().unwrap();
        assert!(
            message.contains("malformed vm_config") && message.contains(expected),
            "{err}"
        );
    }
    // A boot info field of the wrong size (a 21-byte instance id in the event log).
    let odd = GuestSpec {
        instance_id: vec![0x1d; 21],
        ..guest(ALLOWED_APP)
    };
    let odd_identity = guest_identity(&kw, &data, &pki, &odd).await;
    let (status, err) = post_json(
        &https_with_identity(&data, Some(&odd_identity)),
        url("KMS.GetAppKey"),
        request.clone(),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("malformed boot info: instance_id is 21 bytes, not 0 or 20"),
        "{err}"
    );

    // Root-key replication is off by default.
    let (status, err) = post_json(
        &client,
        url("KMS.GetKmsKey"),
        serde_json::json!({"vm_config": test_vm_config()}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("replication is disabled"),
        "{err}"
    );
    // BLS key (our addition): same authorization, EIP-2333 key signed by the root.
    let (status, bls) = post_json(&client, url("KMS.GetAppBlsKey"), request.clone()).await;
    assert_eq!(status, 200, "{bls}");
    let expected_bls = keywarden::kms::keys::AppBlsKey::derive(&root.root, &ALLOWED_APP).unwrap();
    assert_eq!(bls["public_key"], hex::encode(expected_bls.public_key));
    assert_eq!(bls["secret_key"], hex::encode(expected_bls.secret_key));
    assert_eq!(
        bls["k256_signature"],
        hex::encode(expected_bls.k256_signature)
    );
    // The same method without the `KMS.` prefix.
    let (status, _) = post_json(&client, url("GetAppKey"), request.clone()).await;
    assert_eq!(status, 200);

    // Not authorized: the webhook's reason comes back.
    let denied = guest_client(&kw, &data, &pki, DENIED_APP).await;
    let (status, err) = post_json(&denied, url("KMS.GetAppKey"), request.clone()).await;
    assert_eq!(status, 400);
    assert_eq!(
        err["error"],
        "App not allowed: Boot denied: Compose hash not allowed"
    );

    // A canary app id never gets keys, even though the auth server would allow it.
    let before = calls.load(std::sync::atomic::Ordering::SeqCst);
    let canary = guest_client(&kw, &data, &pki, CANARY_APP).await;
    let (status, err) = post_json(&canary, url("KMS.GetAppKey"), request.clone()).await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        before,
        "refused before authorization"
    );

    // A valid attestation that binds some other key than the certificate's: refused.
    let (status, temp) = post_json(
        &https(&data),
        url("KMS.GetTempCaCert"),
        serde_json::json!({}),
    )
    .await;
    assert_eq!(status, 200);
    let ca_der = pem::parse(temp["temp_ca_cert"].as_str().unwrap())
        .unwrap()
        .into_contents();
    let ca_key = rcgen::KeyPair::from_pem(temp["temp_ca_key"].as_str().unwrap()).unwrap();
    let other_binding = pki
        .dstack_attestation(&guest(ALLOWED_APP), &[0x42; 64])
        .unwrap();
    let key = keywarden::attestation::ratls::CertBuilder::new_key().unwrap();
    let cert = keywarden::attestation::ratls::CertBuilder::new("dstack guest")
        .app_id(&ALLOWED_APP)
        .attestation(&other_binding)
        .signed_by(&key, &ca_der, &ca_key)
        .unwrap();
    let unbound = https_with_identity(&data, Some(&format!("{}{}", cert.cert_pem, cert.key_pem)));
    let (status, err) = post_json(&unbound, url("KMS.GetAppKey"), request.clone()).await;
    assert_eq!(status, 400);
    assert_eq!(
        err["error"],
        "attestation verification failed: report_data_mismatch"
    );

    // No client certificate.
    let (status, err) = post_json(&https(&data), url("KMS.GetAppKey"), request.clone()).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"], "No attestation provided");

    // A debug TD is refused by attestation policy before anyone is asked.
    let before = calls.load(std::sync::atomic::Ordering::SeqCst);
    let identity = guest_identity(
        &kw,
        &data,
        &pki,
        &GuestSpec {
            debug: true,
            ..guest(ALLOWED_APP)
        },
    )
    .await;
    let debug = https_with_identity(&data, Some(&identity));
    let (status, err) = post_json(&debug, url("KMS.GetAppKey"), request.clone()).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"], "attestation verification failed: debug_td");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), before);

    // Bad input: unparsable JSON and an unknown method.
    let (status, err) = post_json(
        &client,
        url("KMS.GetAppKey"),
        serde_json::json!({"api_version": "x"}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON request"),
        "{err}"
    );
    let (status, _) = post_json(&client, url("KMS.Nope"), serde_json::json!({})).await;
    assert_eq!(status, 400);

    // Env-encryption public key needs no client certificate; protobuf body by default.
    let body = proto::AppId {
        app_id: ALLOWED_APP.to_vec(),
    }
    .encode_to_vec();
    let r = https(&data)
        .post(format!("{}/prpc/KMS.GetAppEnvEncryptPubKey", kw.api_url()))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Upstream's pRPC labels protobuf answers this way.
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    let pk = proto::PublicKeyResponse::decode(r.bytes().await.unwrap()).unwrap();
    let x =
        x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(expected.env_crypt_key));
    assert_eq!(pk.public_key, x.to_bytes());

    // GetMeta over protobuf.
    let r = https(&data)
        .post(format!("{}/prpc/KMS.GetMeta", kw.api_url()))
        .send()
        .await
        .unwrap();
    let meta = proto::GetMetaResponse::decode(r.bytes().await.unwrap()).unwrap();
    assert_eq!(meta.ca_cert, root.root_ca_pem);
    assert_eq!(meta.k256_pubkey.len(), 33);

    let text = kw.metrics_text().await;
    for needle in [
        "dstack_kms_requests_total{method=\"get_app_key\",outcome=\"ok\",reason=\"none\"} 2",
        "dstack_kms_requests_total{method=\"get_app_key\",outcome=\"refused\",reason=\"not_authorized\"} 1",
        "dstack_kms_requests_total{method=\"get_app_key\",outcome=\"refused\",reason=\"no_attestation\"} 1",
        "dstack_kms_requests_total{method=\"get_app_key\",outcome=\"refused\",reason=\"attestation_rejected\"} 2",
        "dstack_kms_requests_total{method=\"get_app_key\",outcome=\"refused\",reason=\"bad_request\"} 4",
        "dstack_kms_attestation_verifications_total{tee=\"tdx\",result=\"rejected\",reason=\"debug_td\"} 1",
        "dstack_kms_attestation_verifications_total{tee=\"tdx\",result=\"rejected\",reason=\"report_data_mismatch\"} 1",
        "dstack_kms_requests_total{method=\"get_app_key\",outcome=\"refused\",reason=\"canary\"} 1",
        "dstack_kms_canary_requests_total 1",
        "dstack_kms_requests_total{method=\"get_app_key\",outcome=\"refused\",reason=\"os_image_rejected\"} 2",
    ] {
        assert!(text.contains(needle), "missing {needle}\n{text}");
    }
    // Latency buckets carry the trace id of a request as exemplar.
    assert!(
        text.lines().any(
            |l| l.starts_with("dstack_kms_dispatch_duration_seconds_bucket{")
                && l.contains("method=\"get_app_key\"")
                && l.contains(" # {trace_id=\"")
        ),
        "{text}"
    );
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
    let lines = kw.lines();
    for message in [
        "\"key dispatched\"",
        "\"measurement not authorized\"",
        "\"attestation verification failed\"",
        "\"CVM deployed\"",
        "\"canary app id requested keys: security incident\"",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(message)),
            "no {message} line"
        );
    }

    // Both releases to the allowed instance are recorded; refused requests are not.
    let store = keywarden::store::Store::open(
        &keywarden::config::StorageConfig::default(),
        &keywarden::config::DatabaseTarget::Sqlite(data.join("keywarden.db")),
    )
    .await
    .unwrap();
    let instance = hex::encode([0x1d; 20]);
    let rec = store
        .boot_record(&hex::encode(ALLOWED_APP), &instance)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.boot_count, 2);
    for refused in [DENIED_APP, CANARY_APP] {
        assert!(
            store
                .boot_record(&hex::encode(refused), &instance)
                .await
                .unwrap()
                .is_none()
        );
    }
    let audit = store.recent_audit(50).await.unwrap();
    let outcomes: Vec<&str> = audit
        .iter()
        .filter(|r| r.kind == "key_request")
        .map(|r| r.outcome.as_str())
        .collect();
    for (outcome, n) in [("ok", 2), ("refused", 9), ("security_incident", 1)] {
        assert_eq!(
            outcomes.iter().filter(|o| **o == outcome).count(),
            n,
            "{outcome}: {outcomes:?}"
        );
    }
    // Every request that reached the attestation step, with its typed reason.
    let mut reasons: Vec<String> = audit
        .iter()
        .filter(|r| r.kind == "key_request" && r.outcome != "ok")
        .map(|r| {
            let detail: serde_json::Value = serde_json::from_str(&r.detail).unwrap();
            detail["reason"].as_str().unwrap().to_owned()
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "attestation_rejected", // debug TD
            "attestation_rejected", // report data bound to another key
            "bad_request",          // malformed boot info
            "bad_request",          // vm_config with a duplicate key
            "bad_request",          // 33-byte os_image_hash
            "canary",
            "no_attestation",
            "not_authorized",
            "os_image_rejected", // unknown image
            "os_image_rejected", // MRTD differs
        ]
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_backend_without_a_mirror_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut kw, pki) = start(dir.path(), &[]);
    kw.wait_ready().await;
    let client = guest_client(&kw, &data, &pki, ALLOWED_APP).await;
    let (status, err) = post_json(
        &client,
        format!("{}/prpc/KMS.GetAppKey?json", kw.api_url()),
        app_key_body(),
    )
    .await;
    assert_eq!(status, 503, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("no chain mirror"),
        "{err}"
    );
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
}

/// Outside the pRPC methods the KMS port still answers in the pRPC error shape, never echoes a
/// huge path back, and serves only the HTTP version ALPN negotiated (HTTP/1.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_paths_and_methods_get_the_prpc_error_shape_and_http2_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut kw, _pki) = start(dir.path(), &[]);
    kw.wait_ready().await;
    let client = https(&data);
    let r = client
        .get(format!("{}/nope", kw.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "Not found: /nope");
    let r = client
        .put(format!("{}/prpc/KMS.GetMeta", kw.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "Method not allowed: PUT");
    let long = "A".repeat(6_000);
    let r = client
        .post(format!("{}/prpc/{long}?json", kw.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(text.len() < 300, "{} bytes echoed back", text.len());
    assert!(
        text.contains("Method not found: AAAA") && text.contains("6000 bytes"),
        "{text}"
    );
    // An oversized request target or header block: 414 / 431 in the same shape, nothing echoed.
    let r = client
        .post(format!("{}/prpc/{}?json", kw.api_url(), "A".repeat(60_000)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 414);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("request target too long"),
        "{body}"
    );
    let mut headers = reqwest::header::HeaderMap::new();
    for i in 0..80 {
        headers.insert(
            reqwest::header::HeaderName::try_from(format!("x-filler-{i}")).unwrap(),
            reqwest::header::HeaderValue::from_static("x"),
        );
    }
    let r = client
        .post(format!("{}/prpc/KMS.GetMeta?json", kw.api_url()))
        .headers(headers)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("request header fields too large"),
        "{body}"
    );

    // HTTP/2 with prior knowledge, although ALPN chose http/1.1: not served.
    let ca = std::fs::read(data.join("kms/root-ca.pem")).unwrap();
    let h2 = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .http2_prior_knowledge()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    assert!(
        h2.get(format!("{}/health", kw.api_url()))
            .send()
            .await
            .is_err()
    );
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_the_kms_port_is_a_counted_handshake_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (mut kw, _pki) = start(dir.path(), &[]);
    kw.wait_ready().await;
    assert!(
        http()
            .get(format!("http://{}/health", kw.api))
            .send()
            .await
            .is_err()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = kw.metrics_text().await;
        if text.contains("dstack_kms_ratls_handshakes_total{outcome=\"failed\"} 1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
    assert!(
        kw.lines()
            .iter()
            .any(|l| l.contains("\"RA-TLS handshake failed\""))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_queue_key_requests_get_a_fast_503_and_other_methods_are_served() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let auth = auth_server(calls.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let auth_url = format!("http://{auth}");
    let (mut kw, pki) = start_with_webhook(
        dir.path(),
        &auth_url,
        &[
            ("KEYWARDEN_KMS__MAX_CONCURRENT_REQUESTS", "1"),
            ("KEYWARDEN_KMS__MAX_QUEUED_REQUESTS", "0"),
        ],
    )
    .await;
    let slow = guest_client(&kw, &data, &pki, SLOW_APP).await;
    let url = format!("{}/prpc/KMS.GetAppKey?json", kw.api_url());
    let body = app_key_body();
    let holder = tokio::spawn({
        let (slow, url, body) = (slow.clone(), url.clone(), body.clone());
        async move { post_json(&slow, url, body).await }
    });
    // Wait until the slow request holds the only slot (it is at the auth server).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while calls.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "slow request never reached the auth server"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = std::time::Instant::now();
    let (status, err) = post_json(&slow, url.clone(), body.clone()).await;
    let waited = started.elapsed();
    assert_eq!(status, 503, "{err}");
    assert!(
        waited < Duration::from_millis(500),
        "overload must be answered at once, took {waited:?}"
    );
    // Methods that do no key work never wait behind it.
    for method in ["GetMeta", "GetTempCaCert"] {
        let (status, answer) = post_json(
            &https(&data),
            format!("{}/prpc/KMS.{method}?json", kw.api_url()),
            serde_json::json!({}),
        )
        .await;
        assert_eq!(status, 200, "{method}: {answer}");
    }
    // /health stays outside the limit.
    let health = https(&data)
        .get(format!("{}/health", kw.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let (status, _) = holder.await.unwrap();
    assert_eq!(status, 200);
    let text = kw.metrics_text().await;
    assert!(text.contains("dstack_kms_queue_rejected_total 1"), "{text}");
    assert!(text.contains("dstack_kms_concurrency_limit 1"), "{text}");
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
    // Overload is counted, not logged as an error: on-call would drown in one line per 503.
    let errors: Vec<String> = kw
        .lines()
        .into_iter()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_client_and_loadgen_get_keys_like_a_guest() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut kw, _pki) = start_dev_auth(
        dir.path(),
        &[("KEYWARDEN_KMS__ALLOW_KMS_REPLICATION", "true")],
    )
    .await;
    let pki_dir = dir.path().join("pki");
    let ca = data.join("kms/root-ca.pem");
    let url = kw.api_url();
    let app = hex::encode(ALLOWED_APP);
    let instance = hex::encode([0x1d; 20]);
    let (code, out, err) = common::run_to_end(
        &[
            "kms",
            "client",
            "--url",
            &url,
            "--test-pki",
            pki_dir.to_str().unwrap(),
            "--ca",
            ca.to_str().unwrap(),
            "--app-id",
            &app,
            "--instance-id",
            &instance,
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let keys: serde_json::Value = serde_json::from_str(&out).unwrap();
    let root = keywarden::kms::root::load_existing(&data, &Default::default()).unwrap();
    let expected = AppKeys::derive(&root.root, &ALLOWED_APP, &[0x1d; 20]).unwrap();
    assert_eq!(keys["disk_crypt_key"], hex::encode(expected.disk_crypt_key));
    assert_eq!(keys["k256_signature"], hex::encode(expected.k256_signature));

    let metrics_url = format!("http://{}/metrics", kw.metrics);
    let loadgen = |args: &[&str]| {
        let mut all = vec![
            "loadgen",
            "--url",
            &url,
            "--test-pki",
            pki_dir.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        common::run_to_end(&all, &[])
    };
    let (code, out, err) = loadgen(&[
        "--concurrency",
        "2",
        "--duration",
        "1",
        "--new-connection-per-request",
        "--metrics-url",
        &metrics_url,
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(report["ok"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    assert!(report["ok_latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert!(
        report["server_rss_bytes"][1].as_i64().unwrap() > 0,
        "{report}"
    );

    // Open loop: requests arrive at the given rate whatever the answers.
    let (code, out, err) = loadgen(&[
        "--rate",
        "40",
        // Room for every arrival even on a loaded machine.
        "--concurrency",
        "200",
        "--duration",
        "1",
        "--new-connection-per-request",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let sent = report["requests"].as_u64().unwrap();
    assert!((35..=45).contains(&sent), "{report}");
    assert_eq!(report["ok"].as_u64().unwrap(), sent, "{report}");
    let (code, _, err) = loadgen(&["--rate", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--rate 0: must be a positive number"), "{err}");

    // With replication on, an attested and admitted replica receives the root keys.
    let pki = TestPki::load(&pki_dir).unwrap();
    let replica = guest_client(&kw, &data, &pki, ALLOWED_APP).await;
    let (status, got) = post_json(
        &replica,
        format!("{url}/prpc/KMS.GetKmsKey?json"),
        serde_json::json!({"vm_config": test_vm_config()}),
    )
    .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(
        got["keys"][0]["k256_key"],
        hex::encode(root.root.k256.to_bytes())
    );
    assert_eq!(got["keys"][0]["ca_key"], root.root_ca_key.serialize_pem());
    // ...but never without an attestation.
    let (status, _) = post_json(
        &https(&data),
        format!("{url}/prpc/KMS.GetKmsKey?json"),
        serde_json::json!({"vm_config": test_vm_config()}),
    )
    .await;
    assert_eq!(status, 400);

    // A wrong CA: the guest refuses to talk to a KMS it cannot authenticate.
    let other = tempfile::tempdir().unwrap();
    let other_pki = TestPki::generate(1_700_000_000).unwrap();
    other_pki.save(other.path()).unwrap();
    let (code, _, err) = common::run_to_end(
        &[
            "kms",
            "client",
            "--url",
            &url,
            "--test-pki",
            pki_dir.to_str().unwrap(),
            "--ca",
            other.path().join("root_ca.pem").to_str().unwrap(),
            "--app-id",
            &app,
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the KMS"), "{err}");
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
}

/// One GetAppKey from an out-of-date guest of `ALLOWED_APP`: (status, body).
async fn out_of_date_get_app_key(
    kw: &Keywarden,
    data: &Path,
    pki: &TestPki,
) -> (u16, serde_json::Value) {
    let spec = GuestSpec {
        tcb: TestTcb::OutOfDate,
        ..guest(ALLOWED_APP)
    };
    let identity = guest_identity(kw, data, pki, &spec).await;
    post_json(
        &https_with_identity(data, Some(&identity)),
        format!("{}/prpc/KMS.GetAppKey?json", kw.api_url()),
        app_key_body(),
    )
    .await
}

/// A KMS asking a recording webhook, with `env` on top; ready.
async fn start_with_recording_webhook(
    dir: &Path,
    env: &[(&str, &str)],
) -> (Keywarden, TestPki, Asked) {
    let asked = Asked::default();
    let auth = format!("http://{}", recording_auth_server(asked.clone()).await);
    let (kw, pki) = start_with_webhook(dir, &auth, env).await;
    (kw, pki, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_date_guest_is_refused_by_the_default_tcb_policy() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut kw, pki, asked) = start_with_recording_webhook(dir.path(), &[]).await;
    let (status, err) = out_of_date_get_app_key(&kw, &data, &pki).await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(
        err["error"],
        "attestation verification failed: tcb_status_rejected: TCB status OutOfDate"
    );
    assert!(asked.lock().unwrap().is_empty(), "the authorizer was asked");
    let text = kw.metrics_text().await;
    for needle in [
        "dstack_kms_requests_total{method=\"get_app_key\",outcome=\"refused\",reason=\"attestation_rejected\"} 1",
        "dstack_kms_attestation_verifications_total{tee=\"tdx\",result=\"rejected\",reason=\"tcb_status_rejected\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle}\n{text}");
    }
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_out_of_date_boot_reaches_the_webhook_with_its_tcb_status_and_advisories() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut kw, pki, asked) = start_with_recording_webhook(
        dir.path(),
        &[(
            "KEYWARDEN_ATTESTATION__TCB__ACCEPTED_STATUSES",
            r#"["UpToDate", "SWHardeningNeeded", "OutOfDate"]"#,
        )],
    )
    .await;
    let (status, keys) = out_of_date_get_app_key(&kw, &data, &pki).await;
    assert_eq!(status, 200, "{keys}");
    let asked = asked.lock().unwrap().clone();
    let (kind, boot) = asked.last().expect("the webhook was asked");
    assert_eq!(kind, "app");
    assert_eq!(boot["appId"], hex::encode(ALLOWED_APP));
    assert_eq!(boot["tcbStatus"], "OutOfDate");
    assert_eq!(
        boot["advisoryIds"],
        serde_json::json!([keywarden::sim::testpki::OUT_OF_DATE_ADVISORY])
    );
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
}

/// A client that completes the TLS handshake and then sends a partial header and dribbles is
/// closed after `api.header_read_timeout`; others are served meanwhile. The metrics listener
/// closes such a client too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_header_connection_is_closed_after_the_header_read_timeout() {
    use tokio::io::AsyncWriteExt as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut kw, _pki) = start(
        dir.path(),
        &[("KEYWARDEN_API__HEADER_READ_TIMEOUT", "500ms")],
    );
    kw.wait_ready().await;
    let tls = slow_header_connection(&kw, &data).await;
    let elapsed = closed_after_dribbling(tls)
        .await
        .expect("the slow TLS connection was never closed");
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
    let mut plain = tokio::net::TcpStream::connect(kw.metrics).await.unwrap();
    plain
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let elapsed = closed_after_dribbling(plain)
        .await
        .expect("the slow metrics connection was never closed");
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
    let health = https(&data)
        .get(format!("{}/health", kw.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
}

/// Dribbles a header byte now and then, never finishing, until the server closes the
/// connection (its time) or 5 s pass (`None`).
async fn closed_after_dribbling(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
) -> Option<Duration> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    while started.elapsed() < Duration::from_secs(5) {
        let _ = stream.write_all(b"X").await;
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    None
}

/// A TLS connection to the KMS port that has sent the start of a request and nothing more.
async fn slow_header_connection(
    kw: &Keywarden,
    data: &Path,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt as _;
    let ca = std::fs::read(data.join("kms/root-ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile_like(&ca) {
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(kw.api).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    tls
}

/// Starts a dev-auth service under `env`, opens `connections` slow-header connections, and
/// checks that `/health` and a key request are still answered within 5 s. Returns the service,
/// its metrics then, and the flood (still open).
async fn answered_under_a_slow_header_flood(
    dir: &Path,
    env: &[(&str, &str)],
    connections: usize,
) -> (
    Keywarden,
    String,
    Vec<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
) {
    let data = dir.join("data");
    let mut all = vec![("KEYWARDEN_API__HEADER_READ_TIMEOUT", "60s")];
    all.extend_from_slice(env);
    let (kw, pki) = start_dev_auth(dir, &all).await;
    let identity = guest_identity(&kw, &data, &pki, &guest(ALLOWED_APP)).await;
    let mut flood = Vec::new();
    for _ in 0..connections {
        flood.push(slow_header_connection(&kw, &data).await);
    }
    let started = std::time::Instant::now();
    let health = https(&data)
        .get(format!("{}/health", kw.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let (status, keys) = post_json(
        &https_with_identity(&data, Some(&identity)),
        format!("{}/prpc/KMS.GetAppKey?json", kw.api_url()),
        app_key_body(),
    )
    .await;
    assert_eq!(status, 200, "{keys}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let text = kw.metrics_text().await;
    (kw, text, flood)
}

/// A flood of slow-header connections beyond `api.max_connections`: the oldest idle ones are
/// shed, and `/health` and a key request are still answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_header_flood_sheds_idle_connections_and_keys_are_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let (mut kw, text, flood) = answered_under_a_slow_header_flood(
        dir.path(),
        &[("KEYWARDEN_API__MAX_CONNECTIONS", "8")],
        40,
    )
    .await;
    let shed = keywarden::telemetry::sample_value(&text, "dstack_kms_connections_shed_total")
        .unwrap_or(0.0);
    assert!(shed >= 32.0, "{shed}");
    let open = keywarden::telemetry::sample_value(&text, "dstack_kms_active_connections")
        .unwrap_or(f64::MAX);
    assert!(open <= 8.0, "{open}");
    drop(flood);
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
}

/// The certificates of a PEM file, DER-encoded.
fn rustls_pemfile_like(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    ::pem::parse_many(pem)
        .unwrap()
        .into_iter()
        .map(|p| rustls::pki_types::CertificateDer::from(p.contents().to_vec()))
        .collect()
}

/// An attacker's certificates from the temp CA carrying quotes of made-up platforms (another
/// root, a new FMSPC each) against a PCCS that never answers: each is refused at once without
/// a PCCS request, and GetTempCaCert and a real guest's key request are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_platforms_never_reach_a_stalling_pccs_and_real_guests_are_served() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pccs = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pccs_url = format!("http://{}", pccs.local_addr().unwrap());
    let asked = Arc::new(AtomicUsize::new(0));
    // Accepts and never answers, for at most 30 s.
    let stalling = tokio::spawn({
        let asked = asked.clone();
        async move {
            let mut held = Vec::new();
            while let Ok(Ok((socket, _))) =
                tokio::time::timeout(Duration::from_secs(30), pccs.accept()).await
            {
                asked.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut kw, pki) = start_dev_auth(
        dir.path(),
        &[("KEYWARDEN_ATTESTATION__PCCS_URL", &pccs_url)],
    )
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let foreign = TestPki::generate(now).unwrap();
    let url = format!("{}/prpc/KMS.GetAppKey?json", kw.api_url());
    let body = app_key_body();
    let started = std::time::Instant::now();
    let mut attacks = Vec::new();
    for i in 0..40u8 {
        let spec = GuestSpec {
            fmspc: Some([0xf0, i, 0x5e, i, 0x11, 0x22]),
            ..guest(ALLOWED_APP)
        };
        let identity = guest_identity(&kw, &data, &foreign, &spec).await;
        let (url, body) = (url.clone(), body.clone());
        let client = https_with_identity(&data, Some(&identity));
        attacks.push(tokio::spawn(
            async move { post_json(&client, url, body).await },
        ));
    }
    let (status, temp) = post_json(
        &https(&data),
        format!("{}/prpc/KMS.GetTempCaCert?json", kw.api_url()),
        serde_json::json!({}),
    )
    .await;
    assert_eq!(status, 200, "{temp}");
    for attack in attacks {
        let (status, err) = attack.await.unwrap();
        assert_eq!(status, 400, "{err}");
        assert!(
            err["error"].as_str().unwrap().contains("untrusted_root"),
            "{err}"
        );
    }
    let identity = guest_identity(&kw, &data, &pki, &guest(ALLOWED_APP)).await;
    let (status, keys) = post_json(&https_with_identity(&data, Some(&identity)), url, body).await;
    assert_eq!(status, 200, "{keys}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(asked.load(Ordering::SeqCst), 0, "the PCCS was asked");
    stalling.abort();
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
}

/// The open-file limit of the service's process: (soft, hard).
fn nofile_of(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut numbers = line
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_file_limit_is_raised_to_the_hard_limit_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let (mut kw, _pki) = start(dir.path(), &[(common::NOFILE, "256:4096")]);
    kw.wait_ready().await;
    assert_eq!(nofile_of(kw.pid()), (4096, 4096));
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
}

/// About 1,000 slow-header TLS connections against a service whose open-file limit is 1024
/// (soft and hard): the default connection cap is lowered to fit, so no accept fails; the
/// oldest idle connections are shed, and `/health`, `/metrics` and a key request are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slow_header_connections_under_nofile_1024_leave_the_service_answering() {
    let dir = tempfile::tempdir().unwrap();
    let (mut kw, text, flood) =
        answered_under_a_slow_header_flood(dir.path(), &[(common::NOFILE, "1024:1024")], 1000)
            .await;
    let value = |name: &str| keywarden::telemetry::sample_value(&text, name).unwrap_or(-1.0);
    assert_eq!(value("dstack_kms_accept_errors_total"), 0.0);
    // 1024 - 128 reserved - 2 × 64 for the other listeners.
    assert!(value("dstack_kms_active_connections") <= 768.0);
    assert!(value("dstack_kms_connections_shed_total") >= 230.0);
    drop(flood);
    assert_eq!(kw.terminate(Duration::from_secs(10)), 0);
    let lines = kw.lines();
    assert!(
        !lines.iter().any(|l| l.contains("accept failed")),
        "accept failures logged"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("api.max_connections lowered to fit the open-file limit")),
        "no line about the lowered cap"
    );
}

/// An attested KMS admitted by a webhook, under steady load (a key request every 100 ms): once
/// the auth server revokes the KMS, refusal comes within `auth.kms_self_check_cache_ttl` plus
/// one request, however steadily the cached answer is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_kms_stops_releasing_keys_within_the_self_check_ttl_under_steady_load() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let kms_allowed = Arc::new(AtomicBool::new(true));
    let kms_calls = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/bootAuth/{kind}",
        axum::routing::post({
            let (kms_allowed, kms_calls) = (kms_allowed.clone(), kms_calls.clone());
            move |axum::extract::Path(kind): axum::extract::Path<String>| {
                let allowed = kind != "kms" || kms_allowed.load(Ordering::SeqCst);
                if kind == "kms" {
                    kms_calls.fetch_add(1, Ordering::SeqCst);
                }
                async move {
                    axum::Json(serde_json::json!({
                        "isAllowed": allowed,
                        "gatewayAppId": "",
                        "reason": if allowed { "" } else { "Aggregated MR not allowed" },
                    }))
                }
            }
        }),
    );
    let auth = format!("http://{}", common::serve_router(app).await);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut kw, pki) = start_with_webhook(
        dir.path(),
        &auth,
        &[
            ("KEYWARDEN_AUTH__KMS_SELF_CHECK_CACHE_TTL", "1s"),
            ("KEYWARDEN_KMS__INSECURE_SELF_ATTEST_WITH_TEST_PKI", "true"),
        ],
    )
    .await;
    let client = guest_client(&kw, &data, &pki, ALLOWED_APP).await;
    let url = format!("{}/prpc/KMS.GetAppKey?json", kw.api_url());
    let body = app_key_body();
    let mut revoked_at = None;
    let started = std::time::Instant::now();
    let refused_after = loop {
        let (status, answer) = post_json(&client, url.clone(), body.clone()).await;
        match (status, revoked_at) {
            (200, _) => {}
            (503, Some(at)) => break std::time::Instant::elapsed(&at),
            _ => panic!("{status}: {answer}"),
        }
        if revoked_at.is_none() && started.elapsed() > Duration::from_millis(1500) {
            kms_allowed.store(false, Ordering::SeqCst);
            revoked_at = Some(std::time::Instant::now());
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        refused_after <= Duration::from_millis(1000 + 100 + 300),
        "refused {refused_after:?} after the revocation"
    );
    // About one question per TTL, not one per request.
    let calls = kms_calls.load(Ordering::SeqCst);
    assert!((2..=5).contains(&calls), "{calls} bootAuth/kms calls");
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
}

/// Opens the SQLite store a stopped service left in `data`.
async fn stopped_store(data: &Path) -> keywarden::store::Store {
    keywarden::store::Store::open(
        &keywarden::config::StorageConfig::default(),
        &keywarden::config::DatabaseTarget::Sqlite(data.join("keywarden.db")),
    )
    .await
    .unwrap()
}

/// A client certificate from the temp CA whose attestation extension is garbage.
async fn garbage_identity(kw: &Keywarden, data: &Path) -> String {
    let (status, temp) = post_json(
        &https(data),
        format!("{}/prpc/KMS.GetTempCaCert?json", kw.api_url()),
        serde_json::json!({}),
    )
    .await;
    assert_eq!(status, 200, "{temp}");
    let ca_der = pem::parse(temp["temp_ca_cert"].as_str().unwrap())
        .unwrap()
        .into_contents();
    let ca_key = rcgen::KeyPair::from_pem(temp["temp_ca_key"].as_str().unwrap()).unwrap();
    let key = keywarden::attestation::ratls::CertBuilder::new_key().unwrap();
    let cert = keywarden::attestation::ratls::CertBuilder::new("dstack guest")
        .attestation(b"not an attestation at all")
        .signed_by(&key, &ca_der, &ca_key)
        .unwrap();
    format!("{}{}", cert.cert_pem, cert.key_pem)
}

/// Each refused key request that reached the attestation step leaves exactly one audit record
/// (stored and logged) with its final outcome and typed reason: a garbage client certificate,
/// an app the authorizer denies, and a canary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refused_key_request_leaves_one_audit_record_with_its_reason() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let auth = format!("http://{}", auth_server(calls).await);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let canaries = format!("[\"{}\"]", hex::encode(CANARY_APP));
    let (mut kw, pki) = start_with_webhook(
        dir.path(),
        &auth,
        &[("KEYWARDEN_KMS__CANARY_APP_IDS", &canaries)],
    )
    .await;
    let url = format!("{}/prpc/KMS.GetAppKey?json", kw.api_url());
    let body = app_key_body();
    let garbage = garbage_identity(&kw, &data).await;
    let denied = guest_identity(&kw, &data, &pki, &guest(DENIED_APP)).await;
    let canary = guest_identity(&kw, &data, &pki, &guest(CANARY_APP)).await;
    for (identity, status) in [(&garbage, 400), (&denied, 400), (&canary, 400)] {
        let (got, err) = post_json(
            &https_with_identity(&data, Some(identity)),
            url.clone(),
            body.clone(),
        )
        .await;
        assert_eq!(got, status, "{err}");
    }
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
    let store = stopped_store(&data).await;
    let audit = store.recent_audit(50).await.unwrap();
    let rows: Vec<(String, serde_json::Value)> = audit
        .iter()
        .filter(|r| r.kind == "key_request")
        .map(|r| (r.outcome.clone(), serde_json::from_str(&r.detail).unwrap()))
        .collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (outcome, reason, app) in [
        ("refused", "attestation_rejected", None),
        ("refused", "not_authorized", Some(DENIED_APP)),
        ("security_incident", "canary", Some(CANARY_APP)),
    ] {
        let found = rows.iter().filter(|(o, d)| {
            o == outcome
                && d["reason"] == reason
                && app.is_none_or(|a| d["app_id"] == hex::encode(a))
        });
        assert_eq!(found.count(), 1, "{outcome} {reason}: {rows:?}");
    }
    // The log carries the same three, each once.
    let logged = kw
        .lines()
        .into_iter()
        .filter(|l| l.contains("\"target\":\"audit\"") && l.contains("key_request"))
        .count();
    assert_eq!(logged, 3);
    store.close().await;
}

/// The database becomes unwritable while the service runs: the caller gets 503 (retry later), no
/// key, and no audit line says "ok".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_ledger_commit_gives_503_store_unavailable_and_no_ok_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut kw, pki) = start_dev_auth(
        dir.path(),
        &[("KEYWARDEN_STORAGE__CONNECT_TIMEOUT", "500ms")],
    )
    .await;
    let client = guest_client(&kw, &data, &pki, ALLOWED_APP).await;
    let body = app_key_body();
    // Another writer holds the database under the running service: its writes fail (busy)
    // until that lock goes.
    use sqlx::Connection as _;
    let db = data.join("keywarden.db");
    let mut holder = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut holder)
        .await
        .unwrap();
    for method in ["GetAppKey", "GetAppBlsKey"] {
        let (status, err) = post_json(
            &client,
            format!("{}/prpc/KMS.{method}?json", kw.api_url()),
            body.clone(),
        )
        .await;
        assert_eq!(status, 503, "{method}: {err}");
        assert_eq!(
            err["error"], "could not record the key release; retry later",
            "{method}"
        );
        assert!(err.get("k256_key").is_none() && err.get("secret_key").is_none());
    }
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    holder.close().await.unwrap();
    // Writable again: served again.
    let url = format!("{}/prpc/KMS.GetAppKey?json", kw.api_url());
    let (status, keys) = post_json(&client, url, body).await;
    assert_eq!(status, 200, "{keys}");
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
    let audit: Vec<String> = kw
        .lines()
        .into_iter()
        .filter(|l| l.contains("\"target\":\"audit\"") && l.contains("_request"))
        .collect();
    assert!(!audit.is_empty(), "the failure left no audit line");
    // Two failures, then the one release once writable again.
    let outcomes: Vec<String> = audit
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["fields"]["outcome"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(outcomes, ["failed", "failed", "ok"], "{audit:?}");
}
