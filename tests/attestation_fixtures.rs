//! Every fixture under `../shared/fixtures/{tdx,nitro,ra-tls}` verifies, parses or fails as its
//! README says. Skips loudly when the fixtures are absent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use keywarden::attestation::config::TcbPolicy;
use keywarden::attestation::eventlog::{self, TdxEvent};
use keywarden::attestation::nitro::NitroVerifier;
use keywarden::attestation::tdx::{self, TdMeasurements};
use keywarden::attestation::{
    AttestationConfig, Evidence, Platform, RejectReason, Verifier, VerifyRequest, ratls, versioned,
};

fn fixtures() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if dir.join("tdx").is_dir() && dir.join("nitro").is_dir() && dir.join("ra-tls").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: attestation fixtures not found at {}",
            dir.display()
        );
        None
    }
}

fn read(dir: &std::path::Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

fn verifier() -> Verifier {
    Verifier::new(AttestationConfig::default()).unwrap()
}

fn collateral(dir: &std::path::Path, name: &str) -> dcap_qvl::QuoteCollateralV3 {
    tdx::parse_collateral(&read(dir, name)).unwrap()
}

#[test]
fn tdx_quote_verifies_up_to_date() {
    let Some(f) = fixtures() else { return };
    let quote = read(&f, "tdx/tdx_quote");
    let coll = collateral(&f, "tdx/tdx_quote_collateral.json");
    let v = verifier().verify_quote(&quote, &coll, 1752919234).unwrap();
    assert_eq!(v.tcb_status, "UpToDate");
    assert!(v.advisory_ids.is_empty());
    assert_eq!(v.ppid, h("811dca2a26b952e85bb6448b097ba4fd"));
    assert_eq!(v.fmspc, h("b0c06f000000")[..]);
    let td = v.td().unwrap();
    assert_eq!(
        td.mr_td.to_vec(),
        h(
            "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
        )
    );
    assert_eq!(
        td.rtmr[0].to_vec(),
        h(
            "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c48aca29b220b80b6a540cf994b9bc9c0"
        )
    );
    assert_eq!(
        td.rtmr[1].to_vec(),
        h(
            "0084452c01668329d4bc06acdf58a7205c26743304509973949e5619bf81a6a7aea8c323c173019b3093d54e579e9378"
        )
    );
    assert_eq!(
        td.rtmr[2].to_vec(),
        h(
            "d833feef2cd945148aa38ead2c53e9b7f138190aaaebfc551dccd829fc207aa3ba80b70870d7330733642e01d48c3132"
        )
    );
    assert_eq!(td.rtmr[3], [0; 48]);
    assert_eq!(
        td.report_data.to_vec(),
        h(
            "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20"
        )
    );
    assert!(!td.is_debug());
}

#[test]
fn tdx_quote_platform_flags_policy() {
    let Some(f) = fixtures() else { return };
    let quote = read(&f, "tdx/tdx_quote");
    let coll = collateral(&f, "tdx/tdx_quote_collateral.json");
    for policy in [
        TcbPolicy {
            allow_dynamic_platform: false,
            ..TcbPolicy::default()
        },
        TcbPolicy {
            allow_cached_keys: false,
            ..TcbPolicy::default()
        },
        TcbPolicy {
            allow_smt: false,
            ..TcbPolicy::default()
        },
    ] {
        let e = tdx::verify_quote(&quote, &coll, 1752919234, None, &policy, false).unwrap_err();
        assert_eq!(e.reason, RejectReason::PlatformFlagRejected, "{e}");
    }
    let policy = TcbPolicy {
        accepted_statuses: vec!["OutOfDate".into()],
        ..TcbPolicy::default()
    };
    let e = tdx::verify_quote(&quote, &coll, 1752919234, None, &policy, false).unwrap_err();
    assert_eq!(e.reason, RejectReason::TcbStatusRejected);
}

#[test]
fn sgx_quote_status_and_advisories() {
    let Some(f) = fixtures() else { return };
    let quote = read(&f, "tdx/sgx_quote");
    let coll = collateral(&f, "tdx/sgx_quote_collateral.json");
    let e = verifier()
        .verify_quote(&quote, &coll, 1752919277)
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::TcbStatusRejected);
    let mut policy = TcbPolicy::default();
    policy
        .accepted_statuses
        .push("ConfigurationAndSWHardeningNeeded".into());
    let v = tdx::verify_quote(&quote, &coll, 1752919277, None, &policy, false).unwrap();
    assert_eq!(v.tcb_status, "ConfigurationAndSWHardeningNeeded");
    assert_eq!(v.advisory_ids, vec!["INTEL-SA-00289", "INTEL-SA-00615"]);
    let sgx = v.report.as_sgx().unwrap();
    assert_eq!(
        sgx.mr_enclave.to_vec(),
        h("33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")
    );
    assert_eq!(
        sgx.mr_signer.to_vec(),
        h("815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6")
    );
    assert_eq!(&sgx.report_data[..13], b"Hello, world!");
    policy.rejected_advisory_ids = vec!["INTEL-SA-00615".into()];
    let e = tdx::verify_quote(&quote, &coll, 1752919277, None, &policy, false).unwrap_err();
    assert_eq!(e.reason, RejectReason::AdvisoryRejected);
}

#[test]
fn td15ex_quote_verifies() {
    let Some(f) = fixtures() else { return };
    let quote = read(&f, "tdx/tdx_quote_td15ex");
    let coll = collateral(&f, "tdx/tdx_quote_td15ex_collateral.json");
    let v = verifier().verify_quote(&quote, &coll, 1794008710).unwrap();
    assert_eq!(v.tcb_status, "UpToDate");
    let td = v.td().unwrap();
    assert_eq!(
        td.mr_td.to_vec(),
        h(
            "2a674327c50218dba880066b349b8d559d749ed68dce33fd651c184a877d084b07a9e583767a7ad5da13ed91deec2b70"
        )
    );
    assert_eq!(
        td.rtmr[3].to_vec(),
        h(
            "556d4986cae57e7e3756b6471e4951be6f5f1b4e70942c72325223d6af239da90f1484eeb627727e6d2c0755393b5fdf"
        )
    );
    assert_eq!(
        td.mr_config_id.to_vec(),
        h(
            "0151ed70bddb5f12574176b37e3f53bbfc4ba15c33cbddc2d03d90b6de14596cc0000000000000000000000000000000"
        )
    );
}

#[test]
fn outdated_quote_has_no_tcb_level() {
    let Some(f) = fixtures() else { return };
    let quote = read(&f, "tdx/tdx_quote_outdated");
    let coll = collateral(&f, "tdx/tdx_quote_outdated_collateral.json");
    let e = verifier()
        .verify_quote(&quote, &coll, 1774003274)
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::TcbLevelNotFound, "{e}");
}

#[test]
fn tdx_time_window() {
    let Some(f) = fixtures() else { return };
    let quote = read(&f, "tdx/tdx_quote");
    let coll = collateral(&f, "tdx/tdx_quote_collateral.json");
    let e = verifier()
        .verify_quote(&quote, &coll, 1752919236)
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::CollateralExpired, "{e}");
    let e = verifier()
        .verify_quote(&quote, &coll, 1750329146)
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::CollateralNotYetValid, "{e}");
}

#[test]
fn tdx_flipped_bytes_are_typed() {
    let Some(f) = fixtures() else { return };
    let quote = read(&f, "tdx/tdx_quote");
    let coll = collateral(&f, "tdx/tdx_quote_collateral.json");
    // header (user data area), body (report_data), ECDSA signature (after the 4-byte length)
    for (at, want) in [
        (40usize, RejectReason::QuoteSignatureInvalid),
        (48 + 520, RejectReason::QuoteSignatureInvalid),
        (48 + 584 + 4 + 10, RejectReason::QuoteSignatureInvalid),
    ] {
        let mut q = quote.clone();
        q[at] ^= 0x01;
        let e = verifier().verify_quote(&q, &coll, 1752919234).unwrap_err();
        assert_eq!(e.reason, want, "byte {at}: {e}");
    }
    // a byte inside the embedded PCK leaf certificate (the first PEM block)
    let mut q = quote.clone();
    let at = q.windows(11).position(|w| w == b"-----BEGIN ").unwrap() + 300;
    q[at] = if q[at] == b'A' { b'B' } else { b'A' };
    let e = verifier().verify_quote(&q, &coll, 1752919234).unwrap_err();
    assert!(
        matches!(
            e.reason,
            RejectReason::CertChainInvalid
                | RejectReason::QuoteSignatureInvalid
                | RejectReason::QuoteMalformed
                | RejectReason::CollateralInvalid
        ),
        "{e}"
    );
    // truncated
    let e = verifier()
        .verify_quote(&quote[..quote.len() / 2], &coll, 1752919234)
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::QuoteMalformed, "{e}");
}

#[test]
fn tdx_untrusted_root() {
    let Some(f) = fixtures() else { return };
    let quote = read(&f, "tdx/tdx_quote");
    let coll = collateral(&f, "tdx/tdx_quote_collateral.json");
    let other_root = read(&f, "nitro/aws_nitro_root_g1.der");
    let e = tdx::verify_quote(
        &quote,
        &coll,
        1752919234,
        Some(&other_root),
        &TcbPolicy::default(),
        false,
    )
    .unwrap_err();
    assert_eq!(e.reason, RejectReason::UntrustedRoot, "{e}");
}

#[test]
fn parse_only_quotes() {
    let Some(f) = fixtures() else { return };
    let cases = [
        (
            "tdx/tdx-quote.hex",
            "7ba9e262ce6979087e34632603f354dd8f8a870f5947d116af8114db6c9d0d74c48bec4280e5b4f4a37025a10905bb29",
        ),
        (
            "tdx/quote-from-tappd.hex",
            "c68518a0ebb42136c12b2275164f8c72f25fa9a34392228687ed6e9caeb9c0f1dbd895e9cf475121c029dc47e70e91fd",
        ),
    ];
    for (name, mr_td) in cases {
        let text = String::from_utf8(read(&f, name)).unwrap();
        let raw = hex::decode(text.trim().trim_start_matches("0x")).unwrap();
        let q = tdx::parse_quote(&raw).unwrap();
        let td = TdMeasurements::from_report(&q.report).unwrap();
        assert_eq!(td.mr_td.to_vec(), h(mr_td), "{name}");
    }
    let q = tdx::parse_quote(&read(&f, "ra-tls/dstack_ra_tls_assets_tdx_quote.bin")).unwrap();
    assert_eq!(q.header.version, 4);
}

fn near_event_log(f: &std::path::Path) -> Vec<TdxEvent> {
    let tcb: serde_json::Value =
        serde_json::from_slice(&read(f, "ra-tls/near_mpc_dstack_tcb_info.json")).unwrap();
    let log = match &tcb["event_log"] {
        serde_json::Value::String(s) => s.clone().into_bytes(),
        v => serde_json::to_vec(v).unwrap(),
    };
    eventlog::parse_full_json_event_log(&log).unwrap()
}

#[test]
fn near_dstack_attestation_replays_and_derives_identity() {
    let Some(f) = fixtures() else { return };
    let quote = read(&f, "ra-tls/near_mpc_dstack_tdx_quote.bin");
    let coll = collateral(&f, "ra-tls/near_mpc_dstack_tdx_collateral.json");
    let event_log = near_event_log(&f);
    let att = versioned::Attestation {
        platform: Platform::Tdx { quote, event_log },
        runtime_events: vec![],
        report_data: [0; 64],
        config: String::new(),
    };
    let os_image_hash = h("7d47512fda31dc5a7318f72ae1869a3c76323981eea21fc30cafd0f79668642c");
    let v = verifier()
        .verify_attestation(
            &att,
            &VerifyRequest {
                now: 1786622400,
                expected_report_data: None,
                collateral: Some(&coll),
                os_image_hash: Some(&os_image_hash),
            },
        )
        .unwrap();
    let b = &v.boot_info;
    let compose = h("2911e1f733466216dedb862d6d669e11256ee7a34ce4dbc66c4b807ba7a9c895");
    assert_eq!(b.compose_hash, compose);
    assert_eq!(b.app_id, compose[..20]);
    assert!(b.instance_id.is_empty());
    assert_eq!(b.tcb_status, "UpToDate");
    assert_eq!(b.os_image_hash, os_image_hash);
    assert!(String::from_utf8_lossy(&b.key_provider_info).contains("local-sgx"));
    let compose_file = read(&f, "ra-tls/near_mpc_dstack_app_compose.json");
    use sha2::Digest;
    assert_eq!(sha2::Sha256::digest(&compose_file).to_vec(), compose);
    let Evidence::Tdx { td, .. } = &v.evidence else {
        panic!()
    };
    assert_eq!(
        td.rtmr[3].to_vec(),
        h(
            "86f1808cffc050f3c0c09d29da2bfcec7eba3e8fa52016a7341f28884230f9ca8b56400413d57bce00b578e36790b555"
        )
    );

    // a wrong binding is refused
    let e = verifier()
        .verify_attestation(
            &att,
            &VerifyRequest {
                now: 1786622400,
                expected_report_data: Some(&[0; 64]),
                collateral: Some(&coll),
                os_image_hash: None,
            },
        )
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::ReportDataMismatch);

    // a tampered event is refused
    let mut tampered = att.clone();
    if let Platform::Tdx { event_log, .. } = &mut tampered.platform {
        let ev = event_log
            .iter_mut()
            .find(|e| e.event == "compose-hash")
            .unwrap();
        ev.event_payload[0] ^= 1;
    }
    let req = VerifyRequest {
        now: 1786622400,
        expected_report_data: None,
        collateral: Some(&coll),
        os_image_hash: None,
    };
    let e = verifier().verify_attestation(&tampered, &req).unwrap_err();
    assert_eq!(e.reason, RejectReason::EventDigestMismatch);
    // a tampered boot event in a complete log breaks the RTMR0 replay
    let mut boot = att.clone();
    if let Platform::Tdx { event_log, .. } = &mut boot.platform {
        let ev = event_log.iter_mut().find(|e| e.imr == 0).unwrap();
        ev.digest[0] ^= 1;
    }
    assert_eq!(
        verifier()
            .verify_attestation(&boot, &req)
            .unwrap_err()
            .reason,
        RejectReason::RtmrMismatch
    );
    // ... and with a recomputed digest, the replay no longer matches
    if let Platform::Tdx { event_log, .. } = &mut tampered.platform {
        let ev = event_log
            .iter_mut()
            .find(|e| e.event == "compose-hash")
            .unwrap();
        ev.digest = eventlog::runtime_digest(&ev.event, &ev.event_payload, ev.version).to_vec();
    }
    let e = verifier().verify_attestation(&tampered, &req).unwrap_err();
    assert_eq!(e.reason, RejectReason::RtmrMismatch);
}

#[test]
fn simulator_versioned_attestation_parses_and_replays() {
    let Some(f) = fixtures() else { return };
    let att = versioned::parse(&read(
        &f,
        "ra-tls/dstack_simulator_attestation.versioned_attestation.bin",
    ))
    .unwrap();
    let Platform::Tdx { quote, event_log } = &att.platform else {
        panic!("not TDX")
    };
    assert_eq!(quote, &read(&f, "ra-tls/dstack_simulator_tdx_quote.bin"));
    assert_eq!(event_log.len(), 33);
    assert_eq!(att.runtime_events.len(), 9);
    assert_eq!(att.report_data, [0; 64]);
    assert!(att.config.contains("kms.tdxlab.dstack.org"));
    let td = TdMeasurements::from_report(&tdx::parse_quote(quote).unwrap().report).unwrap();
    eventlog::verify_replay(event_log, &td.rtmr).unwrap();
    let events = keywarden::attestation::identity::DstackEvents::from_tdx_log(event_log);
    assert_eq!(
        events.compose_hash.as_deref().unwrap(),
        &td.mr_config_id[1..33]
    );
    assert_eq!(
        keywarden::attestation::identity::os_image_hash_from_config(&att.config)
            .unwrap()
            .map(|h| h.to_vec()),
        Some(h(
            "e61be43dd1cc6a6f5edefd7c51b608983780839b0000ce60dd99737dcffe09b9"
        ))
    );
    // no collateral was published for it
    let req = VerifyRequest {
        now: 1767968028,
        expected_report_data: None,
        collateral: None,
        os_image_hash: None,
    };
    assert_eq!(
        verifier()
            .verify_attestation(&att, &req)
            .unwrap_err()
            .reason,
        RejectReason::CollateralMissing
    );
}

struct NitroCase {
    file: &'static str,
    at: u64,
    debug: bool,
    pcr0: &'static str,
}

const NITRO: &[NitroCase] = &[
    NitroCase {
        file: "dstack_nsm_qvl_prod.cose",
        at: 1766668537,
        debug: false,
        pcr0: "5cb702954321826d7939d6da829a940d787fcf32357beb8eae1ddf33c28c17d36f3ac3ba6828fdf7edeed02889702da6",
    },
    NitroCase {
        file: "dstack_attest_prod.cose",
        at: 1766678659,
        debug: false,
        pcr0: "eb7d0dab08ff41546d7e5659aee883af7b32bb2e58e46815b719f9f7bfae7b880188a10d86317e6509923740526cf74a",
    },
    NitroCase {
        file: "dstack_attest_debug.cose",
        at: 1766650846,
        debug: true,
        pcr0: "",
    },
    NitroCase {
        file: "evervault_beta_prod.cose",
        at: 1665651482,
        debug: false,
        pcr0: "f4d48b81a460c9916d1e685119074bf24660afd3e34fae9fca0a0d28d9d5599936332687e6f66fc890ac8cf150142d8b",
    },
    NitroCase {
        file: "evervault_ga_debug.cose",
        at: 1695049410,
        debug: true,
        pcr0: "",
    },
];

#[test]
fn nitro_documents_verify_as_documented() {
    let Some(f) = fixtures() else { return };
    let strict = NitroVerifier::new(&Default::default(), false).unwrap();
    let lax = NitroVerifier::new(&Default::default(), true).unwrap();
    for c in NITRO {
        let doc = read(&f, &format!("nitro/{}", c.file));
        if c.debug {
            let e = strict.verify(&doc, c.at, None).unwrap_err();
            assert_eq!(e.reason, RejectReason::DebugEnclave, "{}", c.file);
            let r = lax.verify(&doc, c.at, None).unwrap();
            assert!(r.is_debug());
        } else {
            let r = strict.verify(&doc, c.at, None).unwrap();
            assert_eq!(hex::encode(r.pcr(0)), c.pcr0, "{}", c.file);
            assert!(!r.is_debug());
        }
        // one hour later still verifies; +4 h and -1 day do not
        lax.verify(&doc, c.at + 3600, None).unwrap();
        let e = lax.verify(&doc, c.at + 4 * 3600, None).unwrap_err();
        assert_eq!(e.reason, RejectReason::CollateralExpired, "{}: {e}", c.file);
        let e = lax.verify(&doc, c.at - 86400, None).unwrap_err();
        assert_eq!(
            e.reason,
            RejectReason::CollateralNotYetValid,
            "{}: {e}",
            c.file
        );
    }
    let doc = read(&f, "nitro/dstack_nsm_qvl_prod.cose");
    let r = strict.verify(&doc, 1766668537, Some(&[0; 64])).unwrap();
    assert_eq!(
        hex::encode(r.pcr(1)),
        "0343b056cd8485ca7890ddd833476d78460aed2aa161548e4e26bedf321726696257d623e8805f3f605946b3d8b0c6aa"
    );
    assert_eq!(
        hex::encode(r.pcr(2)),
        "743ea12db9aba9440a8197f7ac9aeda43cfbb1587473ff7577415ac5be116bc026dfa836db6713930474d1aa0d06b049"
    );
    assert_eq!(r.module_id, "i-0827e799ec9232d44-enc019b55a68bd2ed4b");
    assert_eq!(
        strict
            .verify(&doc, 1766668537, Some(&[1; 64]))
            .unwrap_err()
            .reason,
        RejectReason::ReportDataMismatch
    );
}

#[test]
fn nitro_negative_cases() {
    let Some(f) = fixtures() else { return };
    let doc = read(&f, "nitro/dstack_nsm_qvl_prod.cose");
    let at = 1766668537;
    let v = NitroVerifier::new(&Default::default(), false).unwrap();
    // signature: the last byte
    let mut d = doc.clone();
    *d.last_mut().unwrap() ^= 1;
    assert_eq!(
        v.verify(&d, at, None).unwrap_err().reason,
        RejectReason::NitroSignatureInvalid
    );
    // header: the protected header's algorithm (-35 → -36)
    let mut d = doc.clone();
    assert_eq!(&d[..6], &[0x84, 0x44, 0xa1, 0x01, 0x38, 0x22]);
    d[5] = 0x23;
    assert_eq!(
        v.verify(&d, at, None).unwrap_err().reason,
        RejectReason::NitroAlgorithmUnsupported
    );
    // body: the module_id text inside the payload
    let pos = doc.windows(4).position(|w| w == b"i-08").unwrap();
    let mut d = doc.clone();
    d[pos + 2] = b'9';
    assert_eq!(
        v.verify(&d, at, None).unwrap_err().reason,
        RejectReason::NitroSignatureInvalid
    );
    // certificate chain: a byte inside the leaf certificate's signature area
    let cert_pos = doc.windows(2).position(|w| w == [0x30, 0x82]).unwrap();
    let mut d = doc.clone();
    d[cert_pos + 200] ^= 0x01;
    let e = v.verify(&d, at, None).unwrap_err();
    assert!(
        matches!(
            e.reason,
            RejectReason::CertChainInvalid
                | RejectReason::NitroSignatureInvalid
                | RejectReason::UntrustedRoot
        ),
        "{e}"
    );
    // untrusted root pin
    let other = NitroVerifier::with_root_pin([7; 32], &Default::default(), false).unwrap();
    assert_eq!(
        other.verify(&doc, at, None).unwrap_err().reason,
        RejectReason::UntrustedRoot
    );
    // tagged form (tag 18) verifies too
    let mut tagged = vec![0xd2];
    tagged.extend_from_slice(&doc);
    v.verify(&tagged, at, None).unwrap();
    // truncated, empty, oversized
    assert_eq!(
        v.verify(&doc[..doc.len() - 10], at, None)
            .unwrap_err()
            .reason,
        RejectReason::NitroDocumentMalformed
    );
    assert_eq!(
        v.verify(&[], at, None).unwrap_err().reason,
        RejectReason::InputEmpty
    );
    assert_eq!(
        v.verify(&vec![0; 17 * 1024], at, None).unwrap_err().reason,
        RejectReason::InputTooLarge
    );
    // PCR allow-list
    let policy = keywarden::attestation::config::NitroPolicy {
        allowed_pcr0: vec!["00".repeat(48)],
        ..Default::default()
    };
    let pinned = NitroVerifier::new(&policy, false).unwrap();
    assert_eq!(
        pinned.verify(&doc, at, None).unwrap_err().reason,
        RejectReason::PcrNotAllowed
    );
}

#[test]
fn nitro_versioned_attestations_give_boot_info() {
    let Some(f) = fixtures() else { return };
    let att = versioned::parse(&read(
        &f,
        "nitro/dstack_attest_prod.versioned_attestation.bin",
    ))
    .unwrap();
    assert_eq!(att.runtime_events.len(), 1);
    let req = VerifyRequest {
        now: 1766678659,
        expected_report_data: None,
        collateral: None,
        os_image_hash: None,
    };
    let v = verifier().verify_attestation(&att, &req).unwrap();
    let b = &v.boot_info;
    let expect = h("1894b0b29e94a9db16e88a2914f0923e52bb16c08bf3bb484df786a147e2eb79");
    assert_eq!(b.app_id, h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4"));
    assert_eq!(b.compose_hash, expect);
    assert_eq!(b.mr_system, expect);
    assert_eq!(b.mr_aggregated, expect);
    assert_eq!(b.os_image_hash, expect);
    assert_eq!(
        b.device_id,
        h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    );
    let json = serde_json::to_value(b).unwrap();
    assert_eq!(json["teeVariant"], "dstack-nitro-enclave");

    let att = versioned::parse(&read(
        &f,
        "nitro/dstack_nsm_qvl_prod.versioned_attestation.bin",
    ))
    .unwrap();
    assert!(att.runtime_events.is_empty());
    assert!(
        att.config
            .contains("e0e742bd62280472ea840647754203d599cb39a7966cfed11237c1e86de9c857")
    );
    let att = versioned::parse(&read(
        &f,
        "nitro/dstack_attest_debug.versioned_attestation.bin",
    ))
    .unwrap();
    let req = VerifyRequest {
        now: 1766650846,
        expected_report_data: None,
        collateral: None,
        os_image_hash: None,
    };
    assert_eq!(
        verifier()
            .verify_attestation(&att, &req)
            .unwrap_err()
            .reason,
        RejectReason::DebugEnclave
    );
}

#[test]
fn ratls_cert_with_real_attestation_fails_binding() {
    let Some(f) = fixtures() else { return };
    // a real dstack attestation cannot bind a fresh key: the binding check must refuse it
    let quote = read(&f, "ra-tls/near_mpc_dstack_tdx_quote.bin");
    let coll = collateral(&f, "ra-tls/near_mpc_dstack_tdx_collateral.json");
    let att = versioned::Attestation {
        platform: Platform::Tdx {
            quote,
            event_log: near_event_log(&f),
        },
        runtime_events: vec![],
        report_data: [0; 64],
        config: String::new(),
    };
    let key = ratls::CertBuilder::new_key().unwrap();
    let cert = ratls::CertBuilder::new("guest")
        .attestation(&versioned::encode_v0(&att))
        .self_signed(&key)
        .unwrap();
    let parsed = ratls::parse_cert(&cert.cert_der).unwrap();
    assert_eq!(parsed.attestation().unwrap(), att);
    let e = verifier()
        .verify_ratls_cert(&cert.cert_der, 1786622400, Some(&coll), None)
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::ReportDataMismatch);
}

/// Real quotes prove themselves to Intel's pinned root before any collateral is fetched; the
/// pinned fingerprint is the fixture root's, and a flipped signed byte is caught.
#[test]
fn real_quotes_pass_the_check_before_fetching_collateral() {
    let Some(f) = fixtures() else { return };
    use sha2::Digest as _;
    let root: [u8; 32] = sha2::Sha256::digest(read(&f, "tdx/intel_sgx_root_ca.der")).into();
    assert_eq!(root, tdx::INTEL_ROOT_SHA256);
    for (name, now) in [("tdx/tdx_quote", 1752919234), ("tdx/sgx_quote", 1752919234)] {
        let quote = read(&f, name);
        verifier()
            .preverify_quote(&quote, now)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut flipped = quote.clone();
        flipped[100] ^= 1;
        let e = verifier().preverify_quote(&flipped, now).unwrap_err();
        assert_eq!(e.reason, RejectReason::QuoteSignatureInvalid, "{name}: {e}");
        // Another root than the quote's is not trusted.
        let e = tdx::preverify_quote(&quote, now, &[[0; 32]]).unwrap_err();
        assert_eq!(e.reason, RejectReason::UntrustedRoot, "{name}: {e}");
    }
}
