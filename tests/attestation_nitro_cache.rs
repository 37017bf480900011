//! The Nitro verified-certificate cache: it is shared across documents, partially warm
//! bundles still verify, and a certificate that merely travels in a bundle (not on the verified
//! path) is never trusted later.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use ciborium::Value;
use keywarden::attestation::RejectReason;
use keywarden::attestation::nitro::NitroVerifier;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, PKCS_ECDSA_P384_SHA384};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair};

const AT: u64 = 1766668537;

fn fixture(name: &str) -> Option<Vec<u8>> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/nitro")
        .join(name);
    match std::fs::read(&p) {
        Ok(d) => Some(d),
        Err(_) => {
            eprintln!("SKIPPED: fixture {} not found", p.display());
            None
        }
    }
}

fn cbor(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).unwrap();
    out
}

/// Splits a COSE_Sign1 into (protected, payload map entries, signature).
fn split(doc: &[u8]) -> (Vec<u8>, Vec<(Value, Value)>, Vec<u8>) {
    let Value::Array(items) = ciborium::from_reader::<Value, _>(doc).unwrap() else {
        panic!()
    };
    let protected = items[0].as_bytes().unwrap().clone();
    let payload: Value = ciborium::from_reader(items[2].as_bytes().unwrap().as_slice()).unwrap();
    (
        protected,
        payload.as_map().unwrap().clone(),
        items[3].as_bytes().unwrap().clone(),
    )
}

fn set(map: &mut [(Value, Value)], key: &str, v: Value) {
    map.iter_mut()
        .find(|(k, _)| k.as_text() == Some(key))
        .unwrap()
        .1 = v;
}

fn get<'a>(map: &'a [(Value, Value)], key: &str) -> &'a Value {
    &map.iter()
        .find(|(k, _)| k.as_text() == Some(key))
        .unwrap()
        .1
}

fn assemble(protected: &[u8], payload: &[(Value, Value)], signature: Vec<u8>) -> Vec<u8> {
    cbor(&Value::Array(vec![
        Value::Bytes(protected.to_vec()),
        Value::Map(vec![]),
        Value::Bytes(cbor(&Value::Map(payload.to_vec()))),
        Value::Bytes(signature),
    ]))
}

fn sign(key: &KeyPair, protected: &[u8], payload: &[(Value, Value)]) -> Vec<u8> {
    let tbs = cbor(&Value::Array(vec![
        Value::Text("Signature1".into()),
        Value::Bytes(protected.to_vec()),
        Value::Bytes(vec![]),
        Value::Bytes(cbor(&Value::Map(payload.to_vec()))),
    ]));
    let rng = SystemRandom::new();
    let signer =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &key.serialize_der(), &rng)
            .unwrap();
    signer.sign(&rng, &tbs).unwrap().as_ref().to_vec()
}

fn validity(p: &mut CertificateParams) {
    p.not_before = time::OffsetDateTime::from_unix_timestamp(AT as i64 - 86400).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp(AT as i64 + 86400).unwrap();
}

#[test]
fn bundle_passengers_are_never_cached_as_trusted() {
    let Some(doc) = fixture("dstack_nsm_qvl_prod.cose") else {
        return;
    };
    let v = NitroVerifier::new(&Default::default(), false).unwrap();

    // an attacker CA, self-signed, with a leaf of its own
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    validity(&mut ca_params);
    let ca_der = ca_params.self_signed(&ca_key).unwrap().der().to_vec();
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let mut leaf_params = CertificateParams::new(vec![]).unwrap();
    validity(&mut leaf_params);
    let leaf_der = leaf_params
        .signed_by(&leaf_key, &Issuer::new(ca_params, &ca_key))
        .unwrap()
        .der()
        .to_vec();

    // 1. the genuine document with the attacker CA riding along in its bundle: the chain
    //    verifies (the CA is not on the path), the signature does not (the payload changed)
    let (protected, mut payload, signature) = split(&doc);
    let Value::Array(mut bundle) = get(&payload, "cabundle").clone() else {
        panic!()
    };
    bundle.push(Value::Bytes(ca_der.clone()));
    set(&mut payload, "cabundle", Value::Array(bundle.clone()));
    let passenger = assemble(&protected, &payload, signature);
    assert_eq!(
        v.verify(&passenger, AT, None).unwrap_err().reason,
        RejectReason::NitroSignatureInvalid
    );

    // 2. a document from the attacker's leaf, correctly COSE-signed, with the same bundle:
    //    the attacker CA must not have become a trusted anchor
    set(&mut payload, "certificate", Value::Bytes(leaf_der));
    let forged_sig = sign(&leaf_key, &protected, &payload);
    let forged = assemble(&protected, &payload, forged_sig);
    assert_eq!(
        v.verify(&forged, AT, None).unwrap_err().reason,
        RejectReason::UntrustedRoot
    );

    // the genuine document still verifies with the same (warm) verifier
    v.verify(&doc, AT, None).unwrap();
    assert_eq!(
        v.verify(&forged, AT, None).unwrap_err().reason,
        RejectReason::UntrustedRoot
    );
}

#[test]
fn partially_warm_bundles_verify() {
    let (Some(a), Some(b)) = (
        fixture("dstack_nsm_qvl_prod.cose"),
        fixture("dstack_attest_prod.cose"),
    ) else {
        return;
    };
    // the two enclaves share the regional and zonal certificates, not the instance one
    let v = NitroVerifier::new(&Default::default(), false).unwrap();
    v.verify(&a, 1766668537, None).unwrap();
    v.verify(&b, 1766678659, None).unwrap();
    v.verify(&a, 1766668537 + 600, None).unwrap();
    // a cached path does not outlive its certificates
    assert_eq!(
        v.verify(&b, 1766678659 + 4 * 3600, None)
            .unwrap_err()
            .reason,
        RejectReason::CollateralExpired
    );
}
