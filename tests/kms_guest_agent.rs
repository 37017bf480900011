//! A KMS deployed as a dstack CVM attests itself through the dstack guest agent: an in-test agent
//! speaking exactly its API on a unix socket, with test-PKI quotes. The RPC certificate carries
//! a quote bound to the RPC key, `GetMeta` one bound to the bootstrap report data, and every key
//! release asks the authorizer about the KMS's own boot (`bootAuth/kms`). With
//! `kms.self_attestation = "guest_agent"` and no agent anywhere, start-up fails with one line
//! naming the sockets tried.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/guest_agent.rs"]
mod agent;
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keywarden::attestation::Verifier;
use keywarden::attestation::config::AttestationConfig;
use keywarden::sim::client::{Guest, SIMULATED_OS_IMAGE_HASH, guest_spec, simulated_vm_config};
use keywarden::sim::testpki::TestPki;
use sha2::Digest as _;

/// An auth webhook allowing every boot, keeping each `bootAuth/kms` body.
async fn webhook() -> (String, Arc<Mutex<Vec<String>>>) {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new().route(
        "/bootAuth/{kind}",
        axum::routing::post({
            let asked = asked.clone();
            move |axum::extract::Path(kind): axum::extract::Path<String>, body: String| {
                if kind == "kms" {
                    asked.lock().unwrap().push(body);
                }
                async {
                    axum::Json(
                        serde_json::json!({"isAllowed": true, "gatewayAppId": "", "reason": ""}),
                    )
                }
            }
        }),
    );
    (format!("http://{}", common::serve_router(app).await), asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kms_in_a_cvm_attests_itself_through_the_guest_agent() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let now = keywarden::clock::unix_secs();
    let pki = TestPki::generate(now - 60).unwrap();
    let pki_dir = dir.path().join("pki");
    pki.save(&pki_dir).unwrap();
    let (socket, seen, _agent) = agent::serve(TestPki::load(&pki_dir).unwrap(), dir.path()).await;
    let (auth, asked) = webhook().await;
    let images =
        keywarden::kms::osimage::env_value(&[keywarden::sim::client::simulated_os_image()]);
    let agent_url = format!("unix:{}", socket.display());
    let mut kw = common::Keywarden::start(
        &data,
        &["--insecure-test-pki", pki_dir.to_str().unwrap()],
        &[
            ("KEYWARDEN_KMS__OS_IMAGES", &images),
            ("KEYWARDEN_KMS__SELF_ATTESTATION", "guest_agent"),
            ("KEYWARDEN_KMS__GUEST_AGENT", &agent_url),
            ("KEYWARDEN_AUTH__BACKEND", "webhook"),
            ("KEYWARDEN_AUTH__WEBHOOK_URL", &auth),
        ],
    );
    kw.wait_ready().await;

    // The RPC certificate carries the agent's quote over its own key, and it verifies as the
    // KMS guest's boot.
    let ca = std::fs::read_to_string(data.join("kms/root-ca.pem")).unwrap();
    let der = kw.rpc_cert_der(&ca).await;
    let cert = keywarden::attestation::ratls::parse_cert(&der).unwrap();
    assert_eq!(cert.usage.as_deref(), Some("kms:rpc"));
    let verifier =
        Verifier::with_test_root(AttestationConfig::default(), Some(pki.root_der().to_vec()))
            .unwrap();
    let (_, verified) = verifier
        .verify_ratls_cert(
            &der,
            now,
            Some(pki.collateral()),
            Some(&SIMULATED_OS_IMAGE_HASH),
        )
        .unwrap();
    let compose_hash: [u8; 32] = sha2::Sha256::digest(br#"{"name":"keywarden-kms"}"#).into();
    assert_eq!(verified.boot_info.compose_hash, compose_hash);
    assert_eq!(verified.boot_info.os_image_hash, SIMULATED_OS_IMAGE_HASH);

    // GetMeta's bootstrap attestation is over the root keys' report data.
    let meta: serde_json::Value = common::https(&data)
        .post(format!("{}/prpc/KMS.GetMeta?json", kw.api_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let raw = hex::decode(meta["bootstrap_info"]["attestation"].as_str().unwrap()).unwrap();
    let root = keywarden::kms::root::load_existing(&data, &Default::default()).unwrap();
    let bootstrap = keywarden::kms::keys::BootstrapInfo::of(&root.root)
        .unwrap()
        .report_data;
    assert_eq!(
        keywarden::attestation::versioned::parse(&raw)
            .unwrap()
            .report_data,
        bootstrap
    );
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.quoted.len(), 2, "one quote per report data");
        assert_eq!(seen.quoted[1], bootstrap.to_vec());
        assert!(seen.hosts.iter().all(|h| h == "dstack"), "{:?}", seen.hosts);
    }

    // A key release asks about the KMS's own boot, as the agent attested it.
    let guest = Guest::enroll(
        &kw.api_url(),
        Some(ca),
        &pki,
        &guest_spec([0xa1; 20], b"services: {}", vec![0x1d; 20]),
        false,
    )
    .await
    .unwrap();
    guest.get_app_key(&simulated_vm_config()).await.unwrap();
    let asked = asked.lock().unwrap().clone();
    assert!(
        asked.iter().any(|b| b.contains(&hex::encode(compose_hash))),
        "{asked:?}"
    );
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
}

#[test]
fn guest_agent_attestation_outside_a_cvm_is_a_start_up_error_naming_the_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = common::run_serve(
        &dir.path().join("data"),
        &[],
        &[("KEYWARDEN_KMS__SELF_ATTESTATION", "guest_agent")],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("no dstack guest agent: none of /var/run/dstack.sock, /run/dstack.sock"),
        "{err}"
    );
    // A configured agent that is not there: the call names it.
    let (code, _, err) = common::run_serve(
        &dir.path().join("data"),
        &[],
        &[
            ("KEYWARDEN_KMS__SELF_ATTESTATION", "guest_agent"),
            (
                "KEYWARDEN_KMS__GUEST_AGENT",
                "unix:/nonexistent/dstack.sock",
            ),
        ],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("the dstack guest agent at unix:/nonexistent/dstack.sock: Info: unreachable"),
        "{err}"
    );
}
