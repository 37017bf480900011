//! The test attestation PKI produces quotes, dstack attestations and RA-TLS certificates that
//! the production verifier accepts only when the test root is configured.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keywarden::attestation::ratls;
use keywarden::attestation::{AttestationConfig, RejectReason, Verifier, VerifyRequest, versioned};
use keywarden::sim::testpki::{GuestSpec, QuoteMeasurements, TestPki, TestTcb};

const NOW: u64 = 1_800_000_000;

fn pki() -> TestPki {
    TestPki::generate(NOW).unwrap()
}

fn trusting(pki: &TestPki) -> Verifier {
    Verifier::with_test_root(AttestationConfig::default(), Some(pki.root_der().to_vec())).unwrap()
}

fn guest() -> GuestSpec {
    GuestSpec {
        app_id: [0xa1; 20],
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

#[test]
fn generated_quote_verifies_only_with_test_root() {
    let pki = pki();
    let m = QuoteMeasurements {
        mr_td: [7; 48],
        ..Default::default()
    };
    let quote = pki.quote(&[9; 64], &m, false).unwrap();
    let v = trusting(&pki)
        .verify_quote(&quote, pki.collateral(), NOW)
        .unwrap();
    assert_eq!(v.tcb_status, "UpToDate");
    let td = v.td().unwrap();
    assert_eq!(td.mr_td, [7; 48]);
    assert_eq!(td.report_data, [9; 64]);
    // dcap-qvl's own verifier accepts it too with the test root
    dcap_qvl::verify::QuoteVerifier::new(pki.root_der().to_vec())
        .verify(&quote, pki.collateral(), NOW)
        .unwrap();
    // the default verifier (Intel root only) refuses it
    let e = Verifier::new(AttestationConfig::default())
        .unwrap()
        .verify_quote(&quote, pki.collateral(), NOW)
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::UntrustedRoot, "{e}");
    // another test PKI's root does not verify it either
    let other = TestPki::generate(NOW).unwrap();
    let e = trusting(&other)
        .verify_quote(&quote, pki.collateral(), NOW)
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::UntrustedRoot, "{e}");
}

#[test]
fn debug_td_is_refused_unless_allowed() {
    let pki = pki();
    let quote = pki
        .quote(&[0; 64], &QuoteMeasurements::default(), true)
        .unwrap();
    let e = trusting(&pki)
        .verify_quote(&quote, pki.collateral(), NOW)
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::DebugTd);
    let lax = Verifier::with_test_root(
        AttestationConfig {
            insecure_allow_debug: true,
            ..Default::default()
        },
        Some(pki.root_der().to_vec()),
    )
    .unwrap();
    assert!(
        lax.verify_quote(&quote, pki.collateral(), NOW)
            .unwrap()
            .td()
            .unwrap()
            .is_debug()
    );
}

#[test]
fn collateral_window_is_enforced() {
    let pki = pki();
    let quote = pki
        .quote(&[0; 64], &QuoteMeasurements::default(), false)
        .unwrap();
    let v = trusting(&pki);
    let e = v
        .verify_quote(&quote, pki.collateral(), NOW + 40 * 24 * 3600)
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::CollateralExpired, "{e}");
    let e = v
        .verify_quote(&quote, pki.collateral(), NOW - 2 * 3600)
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::CollateralNotYetValid, "{e}");
    let fresh = pki
        .collateral_for(NOW + 39 * 24 * 3600, NOW + 60 * 24 * 3600)
        .unwrap();
    v.verify_quote(&quote, &fresh, NOW + 40 * 24 * 3600)
        .unwrap();
}

#[test]
fn flipped_bytes_in_generated_quote() {
    let pki = pki();
    let quote = pki
        .quote(&[5; 64], &QuoteMeasurements::default(), false)
        .unwrap();
    let v = trusting(&pki);
    for at in [40usize, 48 + 300, 48 + 584 + 4 + 3] {
        let mut q = quote.clone();
        q[at] ^= 0x80;
        let e = v.verify_quote(&q, pki.collateral(), NOW).unwrap_err();
        assert_eq!(
            e.reason,
            RejectReason::QuoteSignatureInvalid,
            "byte {at}: {e}"
        );
    }
}

#[test]
fn dstack_attestation_and_ratls_cert_bind_and_derive_identity() {
    let pki = pki();
    let g = guest();
    let cert = pki.guest_cert(&g, None).unwrap();
    let v = trusting(&pki);
    let (parsed, verified) = v
        .verify_ratls_cert(
            &cert.cert_der,
            NOW,
            Some(pki.collateral()),
            Some(&[0xee; 32]),
        )
        .unwrap();
    assert_eq!(parsed.app_id.as_deref(), Some(&g.app_id[..]));
    let b = &verified.boot_info;
    assert_eq!(b.app_id, g.app_id);
    assert_eq!(b.compose_hash, g.compose_hash);
    assert_eq!(b.instance_id, g.instance_id);
    assert_eq!(b.key_provider_info, g.key_provider);
    assert_eq!(b.os_image_hash, vec![0xee; 32]);
    assert_eq!(b.tcb_status, "UpToDate");
    assert_eq!(b.mr_system.len(), 32);

    // the same attestation in a certificate with another key does not bind
    let att = parsed.attestation.clone().unwrap();
    let key = ratls::CertBuilder::new_key().unwrap();
    let stolen = ratls::CertBuilder::new("thief")
        .attestation(&att)
        .self_signed(&key)
        .unwrap();
    let e = v
        .verify_ratls_cert(&stolen.cert_der, NOW, Some(pki.collateral()), None)
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::ReportDataMismatch);

    // a CA-signed guest certificate (the temp CA flow) verifies the same way
    let ca_key = ratls::CertBuilder::new_key().unwrap();
    let ca = ratls::CertBuilder::new("Dstack Client Temp CA")
        .ca()
        .self_signed(&ca_key)
        .unwrap();
    let signed = pki.guest_cert(&g, Some((&ca.cert_der, &ca_key))).unwrap();
    v.verify_ratls_cert(&signed.cert_der, NOW, Some(pki.collateral()), None)
        .unwrap();

    // outside the certificate's validity window
    let key = ratls::CertBuilder::new_key().unwrap();
    let rd = ratls::report_data_for_spki(&rcgen::PublicKeyData::subject_public_key_info(&key));
    let att = pki.dstack_attestation(&g, &rd).unwrap();
    let short = ratls::CertBuilder::new("short-lived")
        .attestation(&att)
        .validity(NOW as i64 - 10, NOW as i64 + 10)
        .self_signed(&key)
        .unwrap();
    v.verify_ratls_cert(&short.cert_der, NOW, Some(pki.collateral()), None)
        .unwrap();
    let e = v
        .verify_ratls_cert(&short.cert_der, NOW + 100, Some(pki.collateral()), None)
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::CertExpired);

    // debug guests are refused
    let debug = pki
        .guest_cert(&GuestSpec { debug: true, ..g }, None)
        .unwrap();
    let e = v
        .verify_ratls_cert(&debug.cert_der, NOW, Some(pki.collateral()), None)
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::DebugTd);
}

#[test]
fn dstack_attestation_tampering() {
    let pki = pki();
    let raw = pki.dstack_attestation(&guest(), &[3; 64]).unwrap();
    let mut att = versioned::parse(&raw).unwrap();
    let v = trusting(&pki);
    let req = VerifyRequest {
        now: NOW,
        expected_report_data: Some(&[3; 64]),
        collateral: Some(pki.collateral()),
        os_image_hash: None,
    };
    v.verify_attestation(&att, &req).unwrap();
    if let versioned::Platform::Tdx { event_log, .. } = &mut att.platform {
        event_log.retain(|e| e.event != "instance-id");
    }
    assert_eq!(
        v.verify_attestation(&att, &req).unwrap_err().reason,
        RejectReason::RtmrMismatch
    );
}

#[test]
fn save_and_load_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    pki.save(dir.path()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["root_ca.key", "pck.key", "attestation.key"] {
            let mode = std::fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }
    let loaded = TestPki::load(dir.path()).unwrap();
    assert_eq!(loaded.root_der(), pki.root_der());
    let quote = loaded
        .quote(&[1; 64], &QuoteMeasurements::default(), false)
        .unwrap();
    // the saved collateral JSON is a QuoteCollateralV3
    let coll: dcap_qvl::QuoteCollateralV3 =
        serde_json::from_slice(&std::fs::read(dir.path().join("collateral.json")).unwrap())
            .unwrap();
    let config = AttestationConfig {
        insecure_test_pki: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    Verifier::new(config)
        .unwrap()
        .verify_quote(&quote, &coll, NOW)
        .unwrap();
}

#[test]
fn legacy_quote_and_gzip_event_log_extensions() {
    use keywarden::attestation::eventlog;
    let pki = pki();
    let g = guest();
    // take the event log and quote of a dstack attestation, re-bound to a fresh key
    let key = ratls::CertBuilder::new_key().unwrap();
    let rd = ratls::report_data_for_spki(&rcgen::PublicKeyData::subject_public_key_info(&key));
    let att = versioned::parse(&pki.dstack_attestation(&g, &rd).unwrap()).unwrap();
    let versioned::Platform::Tdx { quote, event_log } = att.platform else {
        panic!()
    };
    let json = serde_json::to_vec(&event_log).unwrap();
    let gz = eventlog::compress_event_log(&json).unwrap();
    let cert = ratls::CertBuilder::new("legacy guest")
        .legacy_quote(&quote)
        .legacy_event_log(&gz)
        .self_signed(&key)
        .unwrap();
    let (parsed, v) = trusting(&pki)
        .verify_ratls_cert(&cert.cert_der, NOW, Some(pki.collateral()), None)
        .unwrap();
    assert!(parsed.attestation.is_none());
    assert_eq!(v.boot_info.app_id, g.app_id);
}

#[test]
fn certificate_size_and_shape_limits() {
    for input in [&[][..], &[0x30, 0x82, 0x01][..], &vec![0x30; 70 * 1024][..]] {
        let e = ratls::parse_cert(input).unwrap_err();
        assert!(
            matches!(
                e.reason,
                RejectReason::InputEmpty
                    | RejectReason::CertMalformed
                    | RejectReason::InputTooLarge
            ),
            "{e}"
        );
    }
    assert_eq!(
        ratls::parse_cert(&vec![0x30; 70 * 1024])
            .unwrap_err()
            .reason,
        RejectReason::InputTooLarge
    );
    assert_eq!(
        ratls::parse_cert(&[]).unwrap_err().reason,
        RejectReason::InputEmpty
    );
    // a certificate without attestation extensions
    let key = ratls::CertBuilder::new_key().unwrap();
    let plain = ratls::CertBuilder::new("plain").self_signed(&key).unwrap();
    let pki = pki();
    let e = trusting(&pki)
        .verify_ratls_cert(&plain.cert_der, NOW, Some(pki.collateral()), None)
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::CertNoAttestation);
    // truncated certificate
    let e = ratls::parse_cert(&plain.cert_der[..plain.cert_der.len() - 5]).unwrap_err();
    assert_eq!(e.reason, RejectReason::CertMalformed);
}

#[test]
fn v1_msgpack_attestation_with_v2_events_verifies() {
    use keywarden::attestation::eventlog::{EventVersion, TdxEvent, replay};
    use keywarden::sim::testpki::QuoteMeasurements;
    let pki = pki();
    let g = guest();
    let events = vec![
        TdxEvent::runtime("app-id", &g.app_id, EventVersion::V2),
        TdxEvent::runtime("compose-hash", &g.compose_hash, EventVersion::V2),
        TdxEvent::runtime("instance-id", &g.instance_id, EventVersion::V1),
    ];
    let (mrs, _) = replay(&events).unwrap();
    let mut mr_config_id = [0u8; 48];
    mr_config_id[0] = 1;
    mr_config_id[1..33].copy_from_slice(&g.compose_hash);
    let m = QuoteMeasurements {
        rtmr: [[0; 48], [0; 48], [0; 48], mrs[3]],
        mr_config_id,
        ..Default::default()
    };
    let quote = pki.quote(&[6; 64], &m, false).unwrap();

    // upstream's V1 shape: {version, platform: {kind, data}, stack: {kind, data}}, named fields
    #[derive(serde::Serialize)]
    struct Tagged<T> {
        kind: &'static str,
        data: T,
    }
    #[derive(serde::Serialize)]
    struct Platform {
        quote: Vec<u8>,
        event_log: Vec<TdxEvent>,
    }
    #[derive(serde::Serialize)]
    struct Stack {
        report_data: Vec<u8>,
        runtime_events: Vec<()>,
        config: String,
    }
    #[derive(serde::Serialize)]
    struct V1 {
        version: u64,
        platform: Tagged<Platform>,
        stack: Tagged<Stack>,
    }
    let bytes = rmp_serde::to_vec_named(&V1 {
        version: 1,
        platform: Tagged {
            kind: "tdx",
            data: Platform {
                quote,
                event_log: events,
            },
        },
        stack: Tagged {
            kind: "dstack",
            data: Stack {
                report_data: vec![6; 64],
                runtime_events: vec![],
                config: "{}".into(),
            },
        },
    })
    .unwrap();
    assert!(matches!(bytes[0], 0x80..=0x8f));
    let att = versioned::parse(&bytes).unwrap();
    let req = VerifyRequest {
        now: NOW,
        expected_report_data: Some(&[6; 64]),
        collateral: Some(pki.collateral()),
        os_image_hash: None,
    };
    let v = trusting(&pki).verify_attestation(&att, &req).unwrap();
    assert_eq!(v.boot_info.app_id, g.app_id);
    assert_eq!(v.boot_info.compose_hash, g.compose_hash);
}
