//! AWS Nitro Enclave attestation documents (COSE_Sign1, ES384) verified against the pinned
//! AWS Nitro Enclaves Root G1, with a cache of verified intermediate chains.
//!
//! Flow: parse COSE (tagged or not) → check alg/digest → chain leaf → cabundle[1..] → pinned root
//! at `now` (warm: leaf → cached verified issuer) → COSE signature with the leaf key → policy
//! (PCR allow-list, debug refusal, user_data binding).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use ciborium::Value;
use rustls::pki_types::{CertificateDer, UnixTime};
use sha2::{Digest, Sha256};

use super::config::NitroPolicy;
use super::reason::{Result, check_size, reject};

/// SHA-256 of the DER of AWS Nitro Enclaves Root G1.
pub const AWS_NITRO_ROOT_G1_SHA256: &str =
    "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b";
/// Largest COSE document accepted (real ones are about 4.5 KiB).
pub const MAX_DOCUMENT_LEN: usize = 16 * 1024;
/// Bound on cached verified chains; the cache is cleared when it fills.
const MAX_CACHED_CHAINS: usize = 1024;
/// COSE algorithm id of ES384.
const COSE_ES384: i128 = -35;

/// The verified content of a Nitro attestation document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NitroReport {
    /// Enclave module id (`i-...-enc...`).
    pub module_id: String,
    /// Document time, milliseconds since the epoch.
    pub timestamp_ms: u64,
    /// PCR index → value (48 bytes each).
    pub pcrs: BTreeMap<u64, Vec<u8>>,
    /// Optional user data (dstack: the report data).
    pub user_data: Option<Vec<u8>>,
    /// Optional nonce.
    pub nonce: Option<Vec<u8>>,
    /// Optional public key.
    pub public_key: Option<Vec<u8>>,
}

impl NitroReport {
    /// PCR `i`, or 48 zero bytes when absent.
    pub fn pcr(&self, i: u64) -> Vec<u8> {
        self.pcrs.get(&i).cloned().unwrap_or_else(|| vec![0; 48])
    }

    /// Whether the enclave runs in debug mode (PCR0-2 all zero).
    pub fn is_debug(&self) -> bool {
        (0..3).all(|i| self.pcr(i).iter().all(|b| *b == 0))
    }
}

/// A parsed, not yet verified, COSE_Sign1 attestation document.
#[derive(Debug, Clone)]
pub struct NitroDocument {
    protected: Vec<u8>,
    payload: Vec<u8>,
    signature: Vec<u8>,
    alg: Option<i128>,
    digest: String,
    certificate: Vec<u8>,
    cabundle: Vec<Vec<u8>>,
    /// The document's claims.
    pub report: NitroReport,
}

/// Parses a COSE_Sign1 document (CBOR tag 18 optional).
pub fn parse_document(raw: &[u8]) -> Result<NitroDocument> {
    check_size("Nitro document", raw, MAX_DOCUMENT_LEN)?;
    let value: Value = ciborium::from_reader(raw)
        .map_err(|e| reject!(NitroDocumentMalformed, "COSE CBOR: {e}"))?;
    let value = match value {
        Value::Tag(18, inner) => *inner,
        v => v,
    };
    let Value::Array(items) = value else {
        return Err(reject!(
            NitroDocumentMalformed,
            "COSE_Sign1 is not an array"
        ));
    };
    let [protected, _unprotected, payload, signature] = <[Value; 4]>::try_from(items)
        .map_err(|_| reject!(NitroDocumentMalformed, "COSE_Sign1 needs 4 elements"))?;
    let (Value::Bytes(protected), Value::Bytes(payload), Value::Bytes(signature)) =
        (protected, payload, signature)
    else {
        return Err(reject!(NitroDocumentMalformed, "COSE_Sign1 element types"));
    };
    let alg = if protected.is_empty() {
        None
    } else {
        let header: Value = ciborium::from_reader(protected.as_slice())
            .map_err(|e| reject!(NitroDocumentMalformed, "protected header: {e}"))?;
        map_entries(&header)?
            .iter()
            .find(|(k, _)| k.as_integer().map(i128::from) == Some(1))
            .and_then(|(_, v)| v.as_integer().map(i128::from))
    };
    let doc: Value = ciborium::from_reader(payload.as_slice())
        .map_err(|e| reject!(NitroDocumentMalformed, "payload CBOR: {e}"))?;
    let mut module_id = None;
    let mut digest = None;
    let mut timestamp_ms = None;
    let mut pcrs = BTreeMap::new();
    let mut certificate = None;
    let mut cabundle = Vec::new();
    let mut user_data = None;
    let mut nonce = None;
    let mut public_key = None;
    for (k, v) in map_entries(&doc)? {
        let Some(key) = k.as_text() else { continue };
        match key {
            "module_id" => module_id = v.as_text().map(str::to_owned),
            "digest" => digest = v.as_text().map(str::to_owned),
            "timestamp" => timestamp_ms = v.as_integer().and_then(|i| u64::try_from(i).ok()),
            "pcrs" => {
                for (i, p) in map_entries(v)? {
                    let idx = i
                        .as_integer()
                        .and_then(|i| u64::try_from(i).ok())
                        .filter(|i| *i < 32)
                        .ok_or_else(|| reject!(NitroDocumentMalformed, "PCR index"))?;
                    let val = p
                        .as_bytes()
                        .filter(|b| matches!(b.len(), 32 | 48 | 64))
                        .ok_or_else(|| reject!(NitroDocumentMalformed, "PCR value"))?;
                    pcrs.insert(idx, val.clone());
                }
            }
            "certificate" => certificate = v.as_bytes().cloned(),
            "cabundle" => {
                for c in v
                    .as_array()
                    .ok_or_else(|| reject!(NitroDocumentMalformed, "cabundle"))?
                {
                    cabundle.push(
                        c.as_bytes()
                            .cloned()
                            .ok_or_else(|| reject!(NitroDocumentMalformed, "cabundle entry"))?,
                    );
                }
            }
            "user_data" => user_data = optional_bytes(v)?,
            "nonce" => nonce = optional_bytes(v)?,
            "public_key" => public_key = optional_bytes(v)?,
            _ => {}
        }
    }
    let missing = |f: &str| reject!(NitroDocumentMalformed, "missing {f}");
    Ok(NitroDocument {
        protected,
        payload,
        signature,
        alg,
        digest: digest.ok_or_else(|| missing("digest"))?,
        certificate: certificate.ok_or_else(|| missing("certificate"))?,
        cabundle,
        report: NitroReport {
            module_id: module_id.ok_or_else(|| missing("module_id"))?,
            timestamp_ms: timestamp_ms.ok_or_else(|| missing("timestamp"))?,
            pcrs,
            user_data,
            nonce,
            public_key,
        },
    })
}

fn map_entries(v: &Value) -> Result<&Vec<(Value, Value)>> {
    v.as_map()
        .ok_or_else(|| reject!(NitroDocumentMalformed, "expected a CBOR map"))
}

fn optional_bytes(v: &Value) -> Result<Option<Vec<u8>>> {
    match v {
        Value::Null => Ok(None),
        Value::Bytes(b) if b.len() <= 1024 => Ok(Some(b.clone())),
        _ => Err(reject!(
            NitroDocumentMalformed,
            "optional field is not bytes"
        )),
    }
}

/// Hex-decoded PCR allow-lists.
#[derive(Debug, Clone, Default)]
struct PcrAllowList([Vec<Vec<u8>>; 3]);

/// Verifies Nitro documents; holds the root pin and the verified-chain cache.
///
/// The root certificate travels in `cabundle[0]`; it is used as the trust anchor only when its
/// SHA-256 equals the pin, so nothing sent is trusted as such and no certificate is embedded.
#[derive(Debug)]
pub struct NitroVerifier {
    root_sha256: [u8; 32],
    allowed: PcrAllowList,
    allow_debug: bool,
    /// sha256(certificate DER) → validity window of the chain through it, for leaves and
    /// issuers whose path to the pinned root has been verified.
    verified: Mutex<HashMap<[u8; 32], (u64, u64)>>,
}

impl NitroVerifier {
    /// Builds a verifier pinned to AWS Nitro Enclaves Root G1.
    pub fn new(policy: &NitroPolicy, allow_debug: bool) -> Result<Self> {
        let mut pin = [0u8; 32];
        hex::decode_to_slice(AWS_NITRO_ROOT_G1_SHA256, &mut pin)
            .map_err(|e| reject!(ConfigInvalid, "root pin: {e}"))?;
        Self::with_root_pin(pin, policy, allow_debug)
    }

    /// Builds a verifier pinned to another root (SHA-256 of its DER).
    pub fn with_root_pin(
        root_sha256: [u8; 32],
        policy: &NitroPolicy,
        allow_debug: bool,
    ) -> Result<Self> {
        let decode = |list: &[String]| -> Result<Vec<Vec<u8>>> {
            list.iter()
                .map(|h| {
                    hex::decode(h.trim_start_matches("0x"))
                        .ok()
                        .filter(|b| b.len() == 48)
                        .ok_or_else(|| reject!(ConfigInvalid, "PCR allow-list entry {h:?}"))
                })
                .collect()
        };
        Ok(Self {
            root_sha256,
            allowed: PcrAllowList([
                decode(&policy.allowed_pcr0)?,
                decode(&policy.allowed_pcr1)?,
                decode(&policy.allowed_pcr2)?,
            ]),
            allow_debug,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Verifies `raw` at `now` (unix seconds); when `expected_user_data` is given, the document's
    /// `user_data` must equal it.
    pub fn verify(
        &self,
        raw: &[u8],
        now: u64,
        expected_user_data: Option<&[u8]>,
    ) -> Result<NitroReport> {
        let doc = parse_document(raw)?;
        if doc.alg != Some(COSE_ES384) || doc.digest != "SHA384" {
            return Err(reject!(
                NitroAlgorithmUnsupported,
                "alg {:?}, digest {}",
                doc.alg,
                doc.digest
            ));
        }
        self.verify_chain(&doc, now)?;
        verify_cose_signature(&doc)?;
        let report = doc.report;
        if report.is_debug() && !self.allow_debug {
            return Err(reject!(DebugEnclave, "PCR0-2 are zero (debug enclave)"));
        }
        for (i, allowed) in self.allowed.0.iter().enumerate() {
            if !allowed.is_empty() && !allowed.contains(&report.pcr(i as u64)) {
                return Err(reject!(PcrNotAllowed, "PCR{i} not in the allow-list"));
            }
        }
        if let Some(expected) = expected_user_data
            && report.user_data.as_deref() != Some(expected)
        {
            return Err(reject!(ReportDataMismatch, "user_data does not bind"));
        }
        Ok(report)
    }

    /// The validity window of a cached verified certificate, if it covers `now`.
    fn cached(&self, key: &[u8; 32], now: u64) -> Option<(u64, u64)> {
        self.verified
            .lock()
            .ok()
            .and_then(|c| c.get(key).copied())
            .filter(|(nb, na)| *nb <= now && now <= *na)
    }

    fn verify_chain(&self, doc: &NitroDocument, now: u64) -> Result<()> {
        // an enclave reuses its leaf for hours: a leaf already verified to the root is done
        let leaf_key: [u8; 32] = Sha256::digest(&doc.certificate).into();
        if self.cached(&leaf_key, now).is_some() {
            return Ok(());
        }
        let leaf = CertificateDer::from(doc.certificate.as_slice());
        let leaf = webpki::EndEntityCert::try_from(&leaf)
            .map_err(|e| reject!(CertChainInvalid, "leaf certificate: {e}"))?;
        let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now));
        let algs = [
            webpki::ring::ECDSA_P384_SHA384,
            webpki::ring::ECDSA_P256_SHA256,
        ];
        // Anchor at the deepest bundle certificate whose path to the root is cached (only
        // certificates on a verified path are ever cached), else at the pinned root.
        let warm = doc
            .cabundle
            .iter()
            .enumerate()
            .skip(1)
            .rev()
            .find_map(|(i, c)| {
                let key: [u8; 32] = Sha256::digest(c).into();
                self.cached(&key, now).map(|w| (i, w))
            });
        let (anchor_index, anchor_window) = match warm {
            Some(found) => found,
            None => {
                doc.cabundle
                    .first()
                    .filter(|r| <[u8; 32]>::from(Sha256::digest(r)) == self.root_sha256)
                    .ok_or_else(|| {
                        reject!(UntrustedRoot, "cabundle root is not the pinned root")
                    })?;
                (0, (0, u64::MAX))
            }
        };
        let anchor_cert = CertificateDer::from(doc.cabundle[anchor_index].as_slice());
        let anchor = webpki::anchor_from_trusted_cert(&anchor_cert)
            .map_err(|e| reject!(CertChainInvalid, "trust anchor: {e}"))?;
        let intermediates: Vec<CertificateDer<'_>> = doc.cabundle[anchor_index + 1..]
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let anchors = [anchor];
        let path = leaf
            .verify_for_usage(
                &algs,
                &anchors,
                &intermediates,
                time,
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .map_err(map_webpki_error)?;
        // remember the certificates of the verified path (not whatever else the bundle held),
        // each with the validity window of its path down from the anchor
        let mut window = anchor_window;
        for cert in path.intermediate_certificates().rev() {
            let der = cert.der();
            window = narrow(window, &der);
            self.remember(Sha256::digest(&der).into(), window);
        }
        self.remember(leaf_key, narrow(window, &doc.certificate));
        Ok(())
    }

    fn remember(&self, key: [u8; 32], window: (u64, u64)) {
        if let Ok(mut cache) = self.verified.lock() {
            if cache.len() >= MAX_CACHED_CHAINS {
                cache.clear();
            }
            cache.insert(key, window);
        }
    }
}

/// Narrows `window` to the validity of the certificate `der` (to an empty window if it is
/// unreadable, so that nothing usable is cached for it).
fn narrow(window: (u64, u64), der: &[u8]) -> (u64, u64) {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return (u64::MAX, 0);
    };
    let v = cert.validity();
    let nb = u64::try_from(v.not_before.timestamp()).unwrap_or(u64::MAX);
    let na = u64::try_from(v.not_after.timestamp()).unwrap_or(0);
    (window.0.max(nb), window.1.min(na))
}

fn map_webpki_error(e: webpki::Error) -> super::reason::AttestationError {
    use webpki::Error as E;
    match e {
        E::CertExpired { .. } => reject!(CollateralExpired, "certificate expired: {e:?}"),
        E::CertNotValidYet { .. } => {
            reject!(CollateralNotYetValid, "certificate not yet valid: {e:?}")
        }
        E::UnknownIssuer => reject!(UntrustedRoot, "chain does not reach the pinned root"),
        E::CertRevoked => reject!(CertRevoked, "certificate revoked"),
        other => reject!(CertChainInvalid, "certificate chain: {other:?}"),
    }
}

fn verify_cose_signature(doc: &NitroDocument) -> Result<()> {
    let sig_structure = Value::Array(vec![
        Value::Text("Signature1".into()),
        Value::Bytes(doc.protected.clone()),
        Value::Bytes(Vec::new()),
        Value::Bytes(doc.payload.clone()),
    ]);
    let mut tbs = Vec::with_capacity(doc.payload.len() + 64);
    ciborium::into_writer(&sig_structure, &mut tbs)
        .map_err(|e| reject!(NitroDocumentMalformed, "Sig_structure: {e}"))?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&doc.certificate)
        .map_err(|e| reject!(CertChainInvalid, "leaf certificate: {e}"))?;
    let key = &leaf.public_key().subject_public_key.data;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P384_SHA384_FIXED, key)
        .verify(&tbs, &doc.signature)
        .map_err(|_| reject!(NitroSignatureInvalid, "COSE signature does not verify"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_typed() {
        for input in [&[0x84u8, 0x40][..], &[0xd2, 0x80], &[0xff; 10]] {
            let e = parse_document(input).unwrap_err();
            assert_eq!(e.reason, super::super::RejectReason::NitroDocumentMalformed);
        }
    }

    #[test]
    fn bad_pcr_config_is_refused() {
        let policy = NitroPolicy {
            allowed_pcr0: vec!["zz".into()],
            ..NitroPolicy::default()
        };
        let e = NitroVerifier::new(&policy, false).unwrap_err();
        assert_eq!(e.reason, super::super::RejectReason::ConfigInvalid);
    }
}
