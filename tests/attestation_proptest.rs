//! Arbitrary bytes never panic any parser (quote, COSE document, VersionedAttestation, RA-TLS
//! certificate, event log, input detection), and mutated real inputs only yield typed errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keywarden::attestation::nitro::NitroVerifier;
use keywarden::attestation::{cli, eventlog, nitro, ratls, tdx, versioned};
use keywarden::sim::testpki::{GuestSpec, TestPki, TestTcb};
use proptest::prelude::*;

fn sample_cert() -> Vec<u8> {
    use std::sync::OnceLock;
    static CERT: OnceLock<Vec<u8>> = OnceLock::new();
    CERT.get_or_init(|| {
        let pki = TestPki::generate(1_800_000_000).unwrap();
        let guest = GuestSpec {
            app_id: [1; 20],
            compose_hash: [2; 32],
            instance_id: vec![],
            key_provider: vec![],
            mr_td: [0; 48],
            rtmr0_2: [[0; 48]; 3],
            debug: false,
            tcb: TestTcb::UpToDate,
            ppid: None,
            fmspc: None,
        };
        pki.guest_cert(&guest, None).unwrap().cert_der
    })
    .clone()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = tdx::parse_quote(&data);
        let _ = nitro::parse_document(&data);
        let _ = versioned::parse(&data);
        let _ = eventlog::parse_json_event_log(&data);
        let _ = cli::detect(&data);
        if let Ok(c) = ratls::parse_cert(&data) {
            let _ = c.attestation();
        }
    }

    #[test]
    fn prefixed_bytes_reach_deeper(kind in 0u8..4, data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let prefix: &[u8] = match kind {
            0 => &[0x00, 0x00],
            1 => &[0x84, 0x44, 0xa1, 0x01, 0x38, 0x22],
            2 => &[4, 0, 2, 0, 0x81, 0, 0, 0],
            _ => &[0x30, 0x82],
        };
        let input = [prefix, &data[..]].concat();
        let _ = versioned::parse(&input);
        let _ = nitro::parse_document(&input);
        let _ = tdx::parse_quote(&input);
        let _ = tdx::preverify_quote(&input, 1_766_668_537, &[tdx::INTEL_ROOT_SHA256]);
        let _ = ratls::parse_cert(&input);
        let v = NitroVerifier::new(&Default::default(), false).unwrap();
        let _ = v.verify(&input, 1_766_668_537, None);
    }

    #[test]
    fn mutated_certificates_yield_typed_errors(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut cert = sample_cert();
        let i = pos.index(cert.len());
        cert[i] ^= 1 << bit;
        if let Ok(att) = ratls::parse_cert(&cert).and_then(|c| c.attestation()) {
            let _ = versioned::encode_v0(&att);
        }
    }
}

fn fixture(name: &str) -> Option<Vec<u8>> {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(name);
    std::fs::read(p).ok()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Real inputs with one bit flipped and a random truncation: typed errors, never a panic.
    #[test]
    fn mutated_real_inputs_never_panic(pos in any::<prop::sample::Index>(), bit in 0u8..8, cut in any::<prop::sample::Index>()) {
        let inputs = [
            "ra-tls/dstack_simulator_attestation.versioned_attestation.bin",
            "nitro/dstack_attest_prod.versioned_attestation.bin",
            "nitro/dstack_nsm_qvl_prod.cose",
            "tdx/tdx_quote",
        ];
        let mut found = false;
        for name in inputs {
            let Some(mut data) = fixture(name) else { continue };
            found = true;
            let i = pos.index(data.len());
            data[i] ^= 1 << bit;
            let truncated = &data[..cut.index(data.len() + 1)];
            for input in [&data[..], truncated] {
                let _ = versioned::parse(input);
                let _ = nitro::parse_document(input);
                let _ = tdx::parse_quote(input);
                let _ = cli::detect(input);
                let _ = tdx::preverify_quote(input, 1_752_919_234, &[tdx::INTEL_ROOT_SHA256]);
            }
            // A flipped bit in the signed header and TD report never passes the check that
            // precedes a collateral fetch.
            if name == "tdx/tdx_quote" && i < 48 + 584 {
                prop_assert!(tdx::preverify_quote(&data, 1_752_919_234, &[tdx::INTEL_ROOT_SHA256]).is_err());
            }
        }
        if !found {
            eprintln!("SKIPPED: fixtures not found; mutated-input property not exercised");
        }
    }
}
