//! KMS.SignCert over real TLS on loopback: a simulated guest sends a CSR whose attestation binds
//! the CSR key and gets `[leaf, app CA, root CA]`; malformed, forged and unauthorized CSRs are
//! refused with typed reasons. Authorization through an in-test webhook that records what it
//! was asked, so the boot-time identity can be checked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use common::{Keywarden, https};
use keywarden::attestation::eventlog::{BOOT_MR_DONE, replay};
use keywarden::attestation::ratls::parse_cert;
use keywarden::attestation::{AttestationConfig, Verifier, versioned};
use keywarden::kms::proto;
use keywarden::kms::signcert::{CertConfig, CsrVersion};
use keywarden::sim::client::{Guest, guest_csr, guest_spec, simulated_vm_config};
use keywarden::sim::testpki::{GuestSpec, TestPki};
use p256::pkcs8::EncodePublicKey as _;
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

const ALLOWED_APP: [u8; 20] = [0xa2; 20];
const DENIED_APP: [u8; 20] = [0xd2; 20];

/// Boot infos the webhook was asked about.
type Asked = Arc<Mutex<Vec<serde_json::Value>>>;

/// A webhook allowing every app but `DENIED_APP`, recording each boot info.
async fn auth_server(asked: Asked) -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/bootAuth/app",
        axum::routing::post(move |axum::Json(boot): axum::Json<serde_json::Value>| {
            let asked = asked.clone();
            async move {
                let allowed = boot["appId"] != hex::encode(DENIED_APP);
                asked.lock().unwrap().push(boot);
                axum::Json(serde_json::json!({
                    "isAllowed": allowed,
                    "gatewayAppId": "",
                    "reason": if allowed { "" } else { "App not registered" },
                }))
            }
        }),
    );
    common::serve_router(app).await
}

async fn start(dir: &std::path::Path, asked: Asked) -> (Keywarden, TestPki) {
    let auth_url = format!("http://{}", auth_server(asked).await);
    let (mut kw, pki) = common::start_with_test_pki(
        dir,
        &[
            ("KEYWARDEN_AUTH__BACKEND", "webhook"),
            ("KEYWARDEN_AUTH__WEBHOOK_URL", &auth_url),
        ],
    );
    kw.wait_ready().await;
    (kw, pki)
}

fn spec(app: [u8; 20]) -> GuestSpec {
    guest_spec(app, b"services: {}", vec![0x1e; 20])
}

fn leaf_config() -> CertConfig {
    CertConfig {
        org_name: Some("Example Org".into()),
        subject: "app.example.com".into(),
        subject_alt_names: vec!["app.example.com".into(), "127.0.0.1".into()],
        usage_server_auth: true,
        usage_client_auth: true,
        ext_quote: true,
        ext_app_info: true,
        not_before: None,
        not_after: None,
    }
}

fn der_of(pem: &str) -> Vec<u8> {
    pem::parse(pem).unwrap().into_contents()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Checks the chain's links and contents; returns the leaf DER.
fn check_chain(chain: &[String], root_pem: &str, app: &[u8; 20], config: &CertConfig) -> Vec<u8> {
    assert_eq!(chain.len(), 3, "[leaf, app CA, root CA]");
    assert_eq!(chain[2], root_pem);
    let (leaf_der, ca_der, root_der) = (der_of(&chain[0]), der_of(&chain[1]), der_of(&chain[2]));
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    leaf.verify_signature(Some(ca.public_key())).unwrap();
    ca.verify_signature(Some(root.public_key())).unwrap();
    assert_eq!(leaf.issuer(), ca.subject());
    assert_eq!(ca.issuer(), root.subject());

    // The app CA: derived key, "Dstack App CA", path length 0, app id, usage app:ca.
    let cn = |c: &X509Certificate<'_>| {
        c.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(cn(&ca), "Dstack App CA");
    let bc = ca.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let ca_ext = parse_cert(&ca_der).unwrap();
    assert_eq!(ca_ext.usage.as_deref(), Some("app:ca"));
    assert_eq!(ca_ext.app_id.as_deref(), Some(&app[..]));

    // The leaf: subject, organization, SANs, EKUs, usage app:custom, app id.
    assert_eq!(cn(&leaf), config.subject);
    let org = leaf
        .subject()
        .iter_organization()
        .next()
        .map(|o| o.as_str().unwrap().to_owned());
    assert_eq!(org, config.org_name);
    assert!(
        !leaf
            .basic_constraints()
            .unwrap()
            .is_some_and(|b| b.value.ca)
    );
    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    assert!(
        san.general_names
            .contains(&GeneralName::DNSName("app.example.com"))
    );
    assert!(
        san.general_names
            .contains(&GeneralName::IPAddress(&[127, 0, 0, 1]))
    );
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert_eq!(
        (eku.server_auth, eku.client_auth),
        (config.usage_server_auth, config.usage_client_auth)
    );
    let leaf_ext = parse_cert(&leaf_der).unwrap();
    assert_eq!(leaf_ext.usage.as_deref(), Some("app:custom"));
    assert_eq!(leaf_ext.app_id.as_deref(), Some(&app[..]));
    let validity = leaf.validity();
    let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
    assert_eq!(lifetime, 10 * 365 * 24 * 3600, "default lifetime");
    leaf_der
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_app_gets_leaf_app_ca_and_root_for_v1_and_v2_csrs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let asked: Asked = Arc::default();
    let (kw, pki) = start(dir.path(), asked.clone()).await;
    let root = keywarden::kms::root::load_existing(&data, &Default::default()).unwrap();
    let guest = Guest::enroll(
        &kw.api_url(),
        Some(root.root_ca_pem.clone()),
        &pki,
        &spec(ALLOWED_APP),
        false,
    )
    .await
    .unwrap();

    // V2 with every option.
    let config = leaf_config();
    let chain = guest
        .sign_cert(
            &pki,
            &spec(ALLOWED_APP),
            config.clone(),
            CsrVersion::V2,
            &simulated_vm_config(),
        )
        .await
        .unwrap();
    let leaf_der = check_chain(&chain, &root.root_ca_pem, &ALLOWED_APP, &config);

    // The app CA key is the derivation from the root key.
    let ca_der = der_of(&chain[1]);
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    let derived = keywarden::kms::keys::app_ca_key(&root.root, &ALLOWED_APP).unwrap();
    assert_eq!(
        ca.public_key().raw,
        derived.public_key().to_public_key_der().unwrap().as_bytes()
    );

    // ext_quote: the leaf is itself an RA-TLS certificate whose attestation binds its key.
    let verifier =
        Verifier::with_test_root(AttestationConfig::default(), Some(pki.root_der().to_vec()))
            .unwrap();
    let (ext, verified) = verifier
        .verify_ratls_cert(&leaf_der, now(), Some(pki.collateral()), None)
        .unwrap();
    assert_eq!(verified.boot_info.app_id, ALLOWED_APP);
    // stripped: only RTMR3 events remain
    let att = versioned::parse(ext.attestation.as_ref().unwrap()).unwrap();
    let versioned::Platform::Tdx { event_log, .. } = att.platform else {
        panic!("TDX")
    };
    assert!(event_log.iter().all(|e| e.imr == 3));
    // ext_app_info: msgpack array whose first field is the app id
    let app_info = ext.app_info.unwrap();
    assert_eq!(&app_info[..3], &[0x99, 0xc4, 20]);
    assert_eq!(&app_info[3..23], &ALLOWED_APP);

    // Authorized with the boot-time identity: RTMR3 only up to boot-mr-done, no key provider.
    let boot = asked.lock().unwrap().last().cloned().unwrap();
    assert_eq!(boot["appId"], hex::encode(ALLOWED_APP));
    assert_eq!(boot["keyProviderInfo"], "");
    let attestation = pki
        .dstack_attestation(&spec(ALLOWED_APP), &[0; 64])
        .unwrap();
    let versioned::Platform::Tdx { event_log, quote } =
        versioned::parse(&attestation).unwrap().platform
    else {
        panic!("TDX")
    };
    let upto = event_log
        .iter()
        .position(|e| e.event == BOOT_MR_DONE)
        .unwrap();
    assert!(
        upto + 1 < event_log.len(),
        "the test guest extends RTMR3 after boot-mr-done"
    );
    let boot_rtmr3 = replay(&event_log[..=upto]).unwrap().0[3];
    let td = keywarden::attestation::tdx::parse_quote(&quote).unwrap();
    let td = keywarden::attestation::tdx::TdMeasurements::from_report(&td.report).unwrap();
    assert_ne!(boot_rtmr3, td.rtmr[3]);
    let expected = Sha256::new()
        .chain_update(td.mr_td)
        .chain_update(td.rtmr[0])
        .chain_update(td.rtmr[1])
        .chain_update(td.rtmr[2])
        .chain_update(boot_rtmr3)
        .chain_update(td.mr_config_id)
        .chain_update(td.mr_owner)
        .chain_update(td.mr_owner_config)
        .finalize();
    assert_eq!(boot["mrAggregated"], hex::encode(expected));

    // V1 (quote + JSON event log) is upgraded: same chain shape, no V2-only options.
    let v1_config = CertConfig {
        ext_app_info: false,
        ext_quote: false,
        ..leaf_config()
    };
    let chain = guest
        .sign_cert(
            &pki,
            &spec(ALLOWED_APP),
            v1_config.clone(),
            CsrVersion::V1,
            &simulated_vm_config(),
        )
        .await
        .unwrap();
    let leaf_der = check_chain(&chain, &root.root_ca_pem, &ALLOWED_APP, &v1_config);
    let ext = parse_cert(&leaf_der).unwrap();
    assert!(ext.attestation.is_none() && ext.app_info.is_none());

    // Protobuf callers are served too.
    let (csr, key) = guest_csr(&pki, &spec(ALLOWED_APP), leaf_config(), CsrVersion::V2).unwrap();
    let (csr, signature) = csr.signed_by(&key);
    let body = proto::SignCertRequest {
        api_version: 2,
        csr,
        signature,
        vm_config: simulated_vm_config(),
    };
    let resp = https(&data)
        .post(format!("{}/prpc/KMS.SignCert", kw.api_url()))
        .body(body.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let chain = proto::SignCertResponse::decode(resp.bytes().await.unwrap())
        .unwrap()
        .certificate_chain;
    let leaf = check_chain(&chain, &root.root_ca_pem, &ALLOWED_APP, &leaf_config());
    assert_eq!(
        parse_cert(&leaf).unwrap().spki_der,
        key.verifying_key().to_public_key_der().unwrap().as_bytes(),
        "the leaf certifies the CSR key"
    );

    let text = kw.metrics_text().await;
    assert!(
        text.contains(
            "dstack_kms_requests_total{method=\"sign_cert\",outcome=\"ok\",reason=\"none\"} 3"
        ),
        "{text}"
    );
    assert!(kw.lines().iter().any(|l| l.contains("certificate signed")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_forged_and_unauthorized_csrs_are_refused_with_typed_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (kw, pki) = start(dir.path(), Arc::default()).await;
    let client = https(&data);
    let post = |req: proto::SignCertRequest| {
        let client = client.clone();
        let url = format!("{}/prpc/KMS.SignCert?json", kw.api_url());
        async move {
            let r = client.post(url).json(&req).send().await.unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            (
                status,
                body["error"].as_str().unwrap_or_default().to_owned(),
            )
        }
    };
    let request = |csr: Vec<u8>, signature: Vec<u8>| proto::SignCertRequest {
        api_version: 2,
        csr,
        signature,
        vm_config: simulated_vm_config(),
    };
    let (good, key) = guest_csr(&pki, &spec(ALLOWED_APP), leaf_config(), CsrVersion::V2).unwrap();

    // Wrong confirm word.
    let unconfirmed = keywarden::kms::signcert::Csr {
        confirm: "please sign cert".into(),
        ..good.clone()
    };
    let (csr, sig) = unconfirmed.signed_by(&key);
    let (status, err) = post(request(csr, sig)).await;
    assert_eq!((status, err.as_str()), (400, "Invalid confirm word"));

    // Signed by another key than the CSR's.
    let other = p256::ecdsa::SigningKey::from_slice(&[0x77; 32]).unwrap();
    let (csr, sig) = good.signed_by(&other);
    let (status, err) = post(request(csr, sig)).await;
    assert_eq!((status, err.as_str()), (400, "Invalid CSR signature"));

    // Truncated and garbage CSRs.
    let (csr, sig) = good.signed_by(&key);
    let (status, err) = post(request(csr[..40].to_vec(), sig.clone())).await;
    assert_eq!(status, 400);
    assert!(err.starts_with("malformed CSR"), "{err}");
    let (status, err) = post(request(vec![0xff; 64], sig)).await;
    assert_eq!(status, 400);
    assert!(err.starts_with("malformed CSR"), "{err}");

    // Unsupported CSR version.
    let (csr, sig) = good.signed_by(&key);
    let (status, err) = post(proto::SignCertRequest {
        api_version: 3,
        ..request(csr, sig)
    })
    .await;
    assert_eq!((status, err.as_str()), (400, "Unsupported API version: 3"));

    // A valid attestation, but bound to another key than the one the CSR asks to certify.
    let stolen = keywarden::kms::signcert::Csr {
        pubkey: other
            .verifying_key()
            .to_public_key_der()
            .unwrap()
            .into_vec(),
        ..good.clone()
    };
    let (csr, sig) = stolen.signed_by(&other);
    let (status, err) = post(request(csr, sig)).await;
    assert_eq!(
        (status, err.as_str()),
        (400, "attestation verification failed: report_data_mismatch")
    );

    // An app the authorization backend refuses.
    let (denied, denied_key) =
        guest_csr(&pki, &spec(DENIED_APP), leaf_config(), CsrVersion::V2).unwrap();
    let (csr, sig) = denied.signed_by(&denied_key);
    let (status, err) = post(request(csr, sig)).await;
    assert_eq!(status, 400);
    assert!(err.contains("Boot denied: App not registered"), "{err}");

    // The host claims an OS image this KMS does not know.
    let (csr, sig) = good.signed_by(&key);
    let unknown_image = serde_json::json!({"os_image_hash": "07".repeat(32)}).to_string();
    let (status, err) = post(proto::SignCertRequest {
        vm_config: unknown_image,
        ..request(csr, sig)
    })
    .await;
    assert_eq!(status, 400);
    assert!(err.contains("not known to this KMS"), "{err}");

    let text = kw.metrics_text().await;
    for (reason, n) in [
        ("bad_csr", 3),
        ("csr_signature_invalid", 1),
        ("unsupported", 1),
        ("attestation_rejected", 1),
        ("not_authorized", 1),
        ("os_image_rejected", 1),
    ] {
        let line = format!(
            "dstack_kms_requests_total{{method=\"sign_cert\",outcome=\"refused\",reason=\"{reason}\"}} {n}"
        );
        assert!(text.contains(&line), "{line}\n{text}");
    }
    assert!(
        text.contains(
            "dstack_kms_requests_total{method=\"sign_cert\",outcome=\"ok\",reason=\"none\"} 0"
        ),
        "{text}"
    );
}
