//! `SignCert`: an attested app asks the KMS to certify a key of its own under its app CA.
//!
//! What it owns: the CSR wire format (SCALE, V1 and V2, encoder and decoder side by side so the
//! field layout is written once), the request checks (canonical encoding, confirm word,
//! signature by the CSR key), the V1 → V2 upgrade, and the certificates: the app CA
//! (`derive_p256(rootCA, app_id ‖ "app-ca")`, "Dstack App CA", path length 0, app-id extension,
//! usage `app:ca`, signed by the root CA) and the leaf it signs.
//!
//! Flow (driven by [`super::dispatch`]): [`check_request`] decodes the CSR and verifies its
//! signature → [`Csr::attestation`] (a V1 quote and event log become a legacy TDX attestation)
//! → the attestation is verified with report data bound to the CSR key, exactly as for an
//! RA-TLS certificate, and the boot-time identity goes through the same gates as every key
//! request → [`AppCa::derive`] → [`AppCa::sign_leaf`] → `[leaf, app CA, root CA]`.
//!
//! CSR layout: `confirm: String, pubkey: Vec<u8>, config, evidence`; `config` is `org_name:
//! Option<String>, subject: String, subject_alt_names: Vec<String>, usage_server_auth: bool,
//! usage_client_auth: bool, ext_quote: bool`, and in V2 also `ext_app_info: bool, not_before:
//! Option<u64>, not_after: Option<u64>`; the V1 evidence is `quote: Vec<u8>, event_log: Vec<u8>`
//! (JSON), the V2 evidence a `VersionedAttestation` taking the rest of the input without a length
//! prefix (as upstream's decoder reads it).
//!
//! Choices where upstream is silent or lax: the CSR must be the canonical encoding of what it
//! decodes to (no trailing bytes, shortest compact lengths), so the signed bytes are exactly the
//! parsed ones; at most [`MAX_ALT_NAMES`] names; a leaf is valid from `not_before` (default: now)
//! to `not_after` (default and cap: [`MAX_LEAF_LIFETIME`] from now, a later one is shortened);
//! `not_before` must precede the result. The app-info extension (`ext_app_info`) is upstream's
//! `AppInfo` as a msgpack array, from the identity the quote measures now (not the boot-time one):
//! app id, compose hash, instance id, device id (here sha256 of the PPID), mr_system,
//! mr_aggregated, os image hash (the verified `vm_config` claim), key provider, and the
//! `init-script-hash` payloads measured before `system-ready`.

use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::pkcs8::{DecodePublicKey as _, EncodePrivateKey as _};
use rcgen::KeyPair;

use super::KmsError;
use super::keys::app_ca_key;
use super::root::KmsKeys;
use crate::attestation::eventlog;
use crate::attestation::ratls::CertBuilder;
use crate::attestation::scale::{ScaleError, ScaleReader, ScaleWriter};
use crate::attestation::versioned::{self, MAX_ATTESTATION_LEN};
use crate::attestation::{AttestationError, BootInfo, Platform};

/// The confirm word every CSR must carry.
pub const CONFIRM: &str = "please sign cert:";
/// Largest CSR accepted: a full attestation plus the configuration.
pub const MAX_CSR_LEN: usize = MAX_ATTESTATION_LEN + 64 * 1024;
/// Most subject alternative names a leaf may carry.
pub const MAX_ALT_NAMES: usize = 64;
/// Longest validity of a leaf, counted from now (ten years, upstream's default lifetime).
pub const MAX_LEAF_LIFETIME: u64 = 10 * 365 * 24 * 3600;
/// Common name of an app CA.
pub const APP_CA_SUBJECT: &str = "Dstack App CA";

/// Why a SignCert request is refused or cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum SignCertError {
    /// `api_version` is neither 1 nor 2.
    #[error("Unsupported API version: {0}")]
    UnsupportedVersion(u32),
    /// The CSR exceeds [`MAX_CSR_LEN`].
    #[error("CSR is {0} bytes, more than {MAX_CSR_LEN}")]
    TooLarge(usize),
    /// The CSR does not decode.
    #[error("malformed CSR: {0}")]
    Malformed(#[from] ScaleError),
    /// Bytes follow a V1 CSR.
    #[error("malformed CSR: {0} trailing bytes")]
    TrailingBytes(usize),
    /// The CSR decodes, but is not the canonical encoding of what it decodes to.
    #[error("malformed CSR: not in canonical SCALE form")]
    NonCanonical,
    /// Too many subject alternative names.
    #[error("malformed CSR: {0} subject alternative names, at most {MAX_ALT_NAMES}")]
    TooManyAltNames(usize),
    /// The confirm word is not [`CONFIRM`].
    #[error("Invalid confirm word")]
    BadConfirm,
    /// `pubkey` is not the SubjectPublicKeyInfo of a P-256 key.
    #[error("CSR public key is not a P-256 SubjectPublicKeyInfo")]
    BadPublicKey,
    /// The signature is not a valid DER ECDSA-P256-SHA256 signature of the CSR by its key.
    #[error("Invalid CSR signature")]
    BadSignature,
    /// The requested validity is empty.
    #[error("invalid validity: not_before {not_before} is not before not_after {not_after}")]
    BadValidity {
        /// Requested start (unix seconds).
        not_before: u64,
        /// Effective end (unix seconds).
        not_after: u64,
    },
    /// The leaf cannot be built from the CSR's configuration (e.g. a name rcgen refuses).
    #[error("cannot build the certificate: {0}")]
    Leaf(String),
    /// The app CA could not be derived or issued.
    #[error("cannot issue the app CA: {0}")]
    AppCa(String),
}

impl From<KmsError> for SignCertError {
    fn from(e: KmsError) -> Self {
        Self::AppCa(e.to_string())
    }
}

/// The version of the CSR format (the request's `api_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsrVersion {
    /// `CertSigningRequestV1`: a bare quote and JSON event log.
    V1,
    /// `CertSigningRequestV2`: a `VersionedAttestation` and validity/app-info options.
    V2,
}

impl CsrVersion {
    /// From `api_version`.
    pub fn from_api(api_version: u32) -> Result<Self, SignCertError> {
        match api_version {
            1 => Ok(Self::V1),
            2 => Ok(Self::V2),
            v => Err(SignCertError::UnsupportedVersion(v)),
        }
    }

    /// The `api_version` of this format.
    pub fn api(self) -> u32 {
        match self {
            Self::V1 => 1,
            Self::V2 => 2,
        }
    }
}

/// What the leaf should look like (`CertConfigV2`; V1 carries the first six fields).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertConfig {
    /// Organization name (O).
    pub org_name: Option<String>,
    /// Common name (CN).
    pub subject: String,
    /// DNS subject alternative names (IP addresses are recognised as such).
    pub subject_alt_names: Vec<String>,
    /// Extended key usage serverAuth.
    pub usage_server_auth: bool,
    /// Extended key usage clientAuth.
    pub usage_client_auth: bool,
    /// Put the (stripped) attestation in the leaf.
    pub ext_quote: bool,
    /// Put the app info in the leaf (V2 only).
    pub ext_app_info: bool,
    /// Validity start, unix seconds (V2 only).
    pub not_before: Option<u64>,
    /// Validity end, unix seconds (V2 only).
    pub not_after: Option<u64>,
}

impl CertConfig {
    fn encode(&self, w: &mut ScaleWriter, version: CsrVersion) {
        w.option(self.org_name.as_deref(), |w, s| w.bytes(s.as_bytes()));
        w.bytes(self.subject.as_bytes());
        w.compact(self.subject_alt_names.len());
        for name in &self.subject_alt_names {
            w.bytes(name.as_bytes());
        }
        w.bool(self.usage_server_auth);
        w.bool(self.usage_client_auth);
        w.bool(self.ext_quote);
        if version == CsrVersion::V2 {
            w.bool(self.ext_app_info);
            w.option(self.not_before, ScaleWriter::u64);
            w.option(self.not_after, ScaleWriter::u64);
        }
    }

    /// Decodes; a V1 configuration is upgraded with the V2 fields off.
    fn decode(r: &mut ScaleReader<'_>, version: CsrVersion) -> Result<Self, SignCertError> {
        let org_name = r.option(ScaleReader::string)?;
        let subject = r.string()?;
        let n = r.len()?;
        if n > MAX_ALT_NAMES {
            return Err(SignCertError::TooManyAltNames(n));
        }
        let subject_alt_names = (0..n).map(|_| r.string()).collect::<Result<_, _>>()?;
        let mut config = Self {
            org_name,
            subject,
            subject_alt_names,
            usage_server_auth: r.bool()?,
            usage_client_auth: r.bool()?,
            ext_quote: r.bool()?,
            ..Self::default()
        };
        if version == CsrVersion::V2 {
            config.ext_app_info = r.bool()?;
            config.not_before = r.option(ScaleReader::u64)?;
            config.not_after = r.option(ScaleReader::u64)?;
        }
        Ok(config)
    }
}

/// The attestation a CSR carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CsrEvidence {
    /// V1: a TDX quote and its JSON event log.
    Quote {
        /// Raw quote.
        quote: Vec<u8>,
        /// JSON event log (optionally `ELGZv1`).
        event_log: Vec<u8>,
    },
    /// V2: `VersionedAttestation` bytes.
    Attestation(Vec<u8>),
}

/// A certificate signing request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Csr {
    /// Must be [`CONFIRM`].
    pub confirm: String,
    /// SubjectPublicKeyInfo DER of the P-256 key to certify.
    pub pubkey: Vec<u8>,
    /// The leaf's configuration.
    pub config: CertConfig,
    /// The attestation, whose report data must bind `pubkey`.
    pub evidence: CsrEvidence,
}

impl Csr {
    /// The format version, given by the evidence.
    pub fn version(&self) -> CsrVersion {
        match self.evidence {
            CsrEvidence::Quote { .. } => CsrVersion::V1,
            CsrEvidence::Attestation(_) => CsrVersion::V2,
        }
    }

    /// The SCALE encoding (what the signature covers). A V1 CSR drops the V2-only fields.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = ScaleWriter(Vec::new());
        w.bytes(self.confirm.as_bytes());
        w.bytes(&self.pubkey);
        self.config.encode(&mut w, self.version());
        match &self.evidence {
            CsrEvidence::Quote { quote, event_log } => {
                w.bytes(quote);
                w.bytes(event_log);
            }
            CsrEvidence::Attestation(attestation) => w.0.extend_from_slice(attestation),
        }
        w.0
    }

    /// Decodes a CSR of format `version`; it must be in canonical form.
    pub fn decode(version: CsrVersion, raw: &[u8]) -> Result<Self, SignCertError> {
        if raw.len() > MAX_CSR_LEN {
            return Err(SignCertError::TooLarge(raw.len()));
        }
        let mut r = ScaleReader(raw);
        let confirm = r.string()?;
        let pubkey = r.bytes()?;
        let config = CertConfig::decode(&mut r, version)?;
        let evidence = match version {
            CsrVersion::V1 => {
                let quote = r.bytes()?;
                let event_log = r.bytes()?;
                if !r.0.is_empty() {
                    return Err(SignCertError::TrailingBytes(r.0.len()));
                }
                CsrEvidence::Quote { quote, event_log }
            }
            CsrVersion::V2 => CsrEvidence::Attestation(r.rest().to_vec()),
        };
        let csr = Self {
            confirm,
            pubkey,
            config,
            evidence,
        };
        if csr.encode() != raw {
            return Err(SignCertError::NonCanonical);
        }
        Ok(csr)
    }

    /// Signs the encoding with `key`: (CSR bytes, DER signature).
    pub fn signed_by(&self, key: &p256::ecdsa::SigningKey) -> (Vec<u8>, Vec<u8>) {
        let bytes = self.encode();
        let signature: p256::ecdsa::Signature = key.sign(&bytes);
        (bytes, signature.to_der().as_bytes().to_vec())
    }

    /// The attestation, as V2 has it: a V1 quote and event log are upgraded to a legacy TDX
    /// attestation (the quote's report data binds).
    pub fn attestation(&self) -> Result<versioned::Attestation, AttestationError> {
        match &self.evidence {
            CsrEvidence::Quote { quote, event_log } => Ok(versioned::Attestation::legacy_tdx(
                quote.clone(),
                eventlog::parse_full_json_event_log(event_log)?,
            )),
            CsrEvidence::Attestation(raw) => versioned::parse(raw),
        }
    }
}

/// Decodes a request's CSR and checks it: canonical encoding, the signature by its own key over
/// exactly these bytes, the confirm word.
pub fn check_request(api_version: u32, csr: &[u8], signature: &[u8]) -> Result<Csr, SignCertError> {
    let parsed = Csr::decode(CsrVersion::from_api(api_version)?, csr)?;
    let key = p256::ecdsa::VerifyingKey::from_public_key_der(&parsed.pubkey)
        .map_err(|_| SignCertError::BadPublicKey)?;
    let signature =
        p256::ecdsa::Signature::from_der(signature).map_err(|_| SignCertError::BadSignature)?;
    key.verify(csr, &signature)
        .map_err(|_| SignCertError::BadSignature)?;
    if parsed.confirm != CONFIRM {
        return Err(SignCertError::BadConfirm);
    }
    Ok(parsed)
}

/// The leaf's validity window (unix seconds), see the module doc.
pub fn leaf_validity(config: &CertConfig, now: u64) -> Result<(i64, i64), SignCertError> {
    let cap = now.saturating_add(MAX_LEAF_LIFETIME);
    let not_before = config.not_before.unwrap_or(now);
    let not_after = config.not_after.map_or(cap, |t| t.min(cap));
    let bad = || SignCertError::BadValidity {
        not_before,
        not_after,
    };
    if not_before >= not_after {
        return Err(bad());
    }
    Ok((
        i64::try_from(not_before).map_err(|_| bad())?,
        i64::try_from(not_after).map_err(|_| bad())?,
    ))
}

/// An app's CA: its derived key and a certificate under the root CA.
pub struct AppCa {
    key: KeyPair,
    /// Certificate DER.
    pub cert_der: Vec<u8>,
    /// Certificate PEM.
    pub cert_pem: String,
}

impl AppCa {
    /// Derives the CA of `app_id` from the root keys and issues its certificate.
    pub fn derive(root: &KmsKeys, app_id: &[u8]) -> Result<Self, SignCertError> {
        let failed = |e: &dyn std::fmt::Display| SignCertError::AppCa(e.to_string());
        let secret = app_ca_key(&root.root, app_id)?;
        let der = secret.to_pkcs8_der().map_err(|e| failed(&e))?;
        let key = KeyPair::try_from(der.as_bytes()).map_err(|e| failed(&e))?;
        let root_der = pem::parse(&root.root_ca_pem)
            .map_err(|e| failed(&e))?
            .into_contents();
        let cert = CertBuilder::new(APP_CA_SUBJECT)
            .org("Dstack")
            .ca_with_path_len(0)
            .app_id(app_id)
            .usage("app:ca")
            .signed_by(&key, &root_der, &root.root_ca_key)
            .map_err(|e| failed(&e))?;
        Ok(Self {
            key,
            cert_der: cert.cert_der,
            cert_pem: cert.cert_pem,
        })
    }

    /// Signs the leaf `csr` asks for (usage `app:custom`, the app id, and per its configuration
    /// the attestation and the app info); `current` is the identity the quote measures now.
    /// Returns the leaf PEM.
    pub fn sign_leaf(
        &self,
        csr: &Csr,
        attestation: &versioned::Attestation,
        current: &BootInfo,
        app_id: &[u8],
        now: u64,
    ) -> Result<String, SignCertError> {
        let cfg = &csr.config;
        let leaf_err = |e: &dyn std::fmt::Display| SignCertError::Leaf(e.to_string());
        let (not_before, not_after) = leaf_validity(cfg, now)?;
        let names: Vec<&str> = cfg.subject_alt_names.iter().map(String::as_str).collect();
        let mut builder = CertBuilder::new(&cfg.subject)
            .alt_names(&names)
            .tls_usages(cfg.usage_server_auth, cfg.usage_client_auth)
            .usage("app:custom")
            .app_id(app_id)
            .validity(not_before, not_after);
        if let Some(org) = &cfg.org_name {
            builder = builder.org(org);
        }
        if cfg.ext_quote {
            builder = builder.attestation(&versioned::encode_v0(&attestation.stripped()));
        }
        if cfg.ext_app_info {
            builder = builder.app_info(&app_info(current, attestation).map_err(|e| leaf_err(&e))?);
        }
        builder
            .signed_for_spki(&csr.pubkey, &self.cert_der, &self.key)
            .map(|(_, pem)| pem)
            .map_err(|e| leaf_err(&e))
    }
}

/// Raw bytes for msgpack (`bin`, not an array of integers).
struct Bin<'a>(&'a [u8]);

impl serde::Serialize for Bin<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// The `.9` app-info extension: upstream's `AppInfo` fields in order, as a msgpack array.
fn app_info(
    boot: &BootInfo,
    attestation: &versioned::Attestation,
) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    let runtime: Vec<(&str, &[u8])> = match &attestation.platform {
        Platform::Tdx { event_log, .. } => event_log
            .iter()
            .filter(|e| e.is_runtime())
            .map(|e| (e.event.as_str(), e.event_payload.as_slice()))
            .collect(),
        Platform::NitroEnclave { .. } => attestation
            .runtime_events
            .iter()
            .map(|e| (e.event.as_str(), e.payload.as_slice()))
            .collect(),
    };
    let init_script_hashes: Vec<Bin<'_>> = runtime
        .into_iter()
        .take_while(|(name, _)| *name != "system-ready")
        .filter(|(name, _)| *name == "init-script-hash")
        .map(|(_, payload)| Bin(payload))
        .collect();
    rmp_serde::to_vec(&(
        Bin(&boot.app_id),
        Bin(&boot.compose_hash),
        Bin(&boot.instance_id),
        Bin(&boot.device_id),
        Bin(&boot.mr_system),
        Bin(&boot.mr_aggregated),
        Bin(&boot.os_image_hash),
        Bin(&boot.key_provider_info),
        Some(init_script_hashes),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attestation::eventlog::TdxEvent;
    use p256::pkcs8::EncodePublicKey as _;

    fn key() -> p256::ecdsa::SigningKey {
        p256::ecdsa::SigningKey::from_slice(&[0x42; 32]).unwrap()
    }

    fn csr(version: CsrVersion) -> Csr {
        let pubkey = key()
            .verifying_key()
            .to_public_key_der()
            .unwrap()
            .into_vec();
        let (evidence, v2) = match version {
            CsrVersion::V1 => (
                CsrEvidence::Quote {
                    quote: vec![4; 100],
                    event_log: b"[]".to_vec(),
                },
                false,
            ),
            CsrVersion::V2 => (CsrEvidence::Attestation(vec![0, 0, 9, 9]), true),
        };
        Csr {
            confirm: CONFIRM.into(),
            pubkey,
            config: CertConfig {
                org_name: Some("Org".into()),
                subject: "app.example".into(),
                subject_alt_names: vec!["app.example".into(), "10.0.0.1".into()],
                usage_server_auth: true,
                usage_client_auth: false,
                ext_quote: true,
                ext_app_info: v2,
                not_before: v2.then_some(1_700_000_000),
                not_after: None,
            },
            evidence,
        }
    }

    #[test]
    fn v1_and_v2_csrs_roundtrip_through_the_encoding() {
        for version in [CsrVersion::V1, CsrVersion::V2] {
            let c = csr(version);
            assert_eq!(Csr::decode(version, &c.encode()).unwrap(), c);
        }
    }

    #[test]
    fn v1_layout_is_the_six_config_fields_then_quote_and_event_log() {
        let c = Csr {
            confirm: "c".into(),
            pubkey: vec![0xaa],
            config: CertConfig {
                subject: "s".into(),
                usage_client_auth: true,
                ..CertConfig::default()
            },
            evidence: CsrEvidence::Quote {
                quote: vec![0xbb],
                event_log: vec![],
            },
        };
        let expected = [
            &[0x04, b'c'][..],   // confirm
            &[0x04, 0xaa],       // pubkey
            &[0x00],             // org_name: None
            &[0x04, b's'],       // subject
            &[0x00],             // no alt names
            &[0x00, 0x01, 0x00], // server, client, ext_quote
            &[0x04, 0xbb],       // quote
            &[0x00],             // event_log
        ]
        .concat();
        assert_eq!(c.encode(), expected);
        // the same request as V2: three more config fields, the attestation unprefixed
        let v2 = Csr {
            evidence: CsrEvidence::Attestation(vec![0x00, 0x01]),
            config: CertConfig {
                not_after: Some(1),
                ..c.config.clone()
            },
            ..c
        };
        let tail = [&[0x00, 0x00, 0x01][..], &1u64.to_le_bytes(), &[0x00, 0x01]].concat();
        assert!(v2.encode().ends_with(&tail), "{:02x?}", v2.encode());
    }

    #[test]
    fn a_v1_csr_upgrades_with_the_v2_options_off_and_a_legacy_attestation() {
        let c = csr(CsrVersion::V1);
        let decoded = Csr::decode(CsrVersion::V1, &c.encode()).unwrap();
        assert!(!decoded.config.ext_app_info);
        assert_eq!(decoded.config.not_before, None);
        let att = decoded.attestation().unwrap();
        assert_eq!(
            att.platform,
            Platform::Tdx {
                quote: vec![4; 100],
                event_log: vec![]
            }
        );
    }

    #[test]
    fn truncated_trailing_and_non_canonical_csrs_are_typed_errors() {
        let bytes = csr(CsrVersion::V1).encode();
        for cut in [0, 1, 5, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                matches!(
                    Csr::decode(CsrVersion::V1, &bytes[..cut]),
                    Err(SignCertError::Malformed(_))
                ),
                "cut at {cut}"
            );
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            Csr::decode(CsrVersion::V1, &trailing),
            Err(SignCertError::TrailingBytes(1))
        ));
        // the confirm length (17) in the two-byte compact form
        let mut long_form = vec![(17 << 2) | 1, 0];
        long_form.extend_from_slice(&bytes[1..]);
        assert!(matches!(
            Csr::decode(CsrVersion::V1, &long_form),
            Err(SignCertError::NonCanonical)
        ));
        let mut bad_bool = csr(CsrVersion::V1);
        bad_bool.config.subject_alt_names.clear();
        let mut raw = bad_bool.encode();
        let pos = raw.len() - (2 + 100 + 1 + 2) - 1; // ext_quote, before quote and event log
        raw[pos] = 7;
        assert!(matches!(
            Csr::decode(CsrVersion::V1, &raw),
            Err(SignCertError::Malformed(ScaleError::InvalidBool(7)))
        ));
        assert!(matches!(
            CsrVersion::from_api(3),
            Err(SignCertError::UnsupportedVersion(3))
        ));
    }

    #[test]
    fn too_many_alt_names_are_refused_before_reading_them() {
        let mut c = csr(CsrVersion::V2);
        c.config.subject_alt_names = vec!["a".into(); MAX_ALT_NAMES + 1];
        assert!(matches!(
            Csr::decode(CsrVersion::V2, &c.encode()),
            Err(SignCertError::TooManyAltNames(n)) if n == MAX_ALT_NAMES + 1
        ));
    }

    #[test]
    fn signature_and_confirm_word_are_checked() {
        let c = csr(CsrVersion::V2);
        let (bytes, sig) = c.signed_by(&key());
        assert_eq!(check_request(2, &bytes, &sig).unwrap(), c);
        assert!(matches!(
            check_request(1, &bytes, &sig),
            Err(SignCertError::Malformed(_) | SignCertError::NonCanonical)
        ));
        let other = p256::ecdsa::SigningKey::from_slice(&[0x43; 32]).unwrap();
        let (_, wrong) = c.signed_by(&other);
        assert!(matches!(
            check_request(2, &bytes, &wrong),
            Err(SignCertError::BadSignature)
        ));
        assert!(matches!(
            check_request(2, &bytes, b"not DER"),
            Err(SignCertError::BadSignature)
        ));
        let unconfirmed = Csr {
            confirm: "please sign cert".into(),
            ..c.clone()
        };
        let (bytes, sig) = unconfirmed.signed_by(&key());
        assert!(matches!(
            check_request(2, &bytes, &sig),
            Err(SignCertError::BadConfirm)
        ));
        let not_p256 = Csr {
            pubkey: vec![0x30, 0x00],
            ..c
        };
        let (bytes, sig) = not_p256.signed_by(&key());
        assert!(matches!(
            check_request(2, &bytes, &sig),
            Err(SignCertError::BadPublicKey)
        ));
    }

    #[test]
    fn leaf_validity_defaults_to_now_and_caps_the_end() {
        let now = 1_800_000_000;
        let mut cfg = CertConfig::default();
        assert_eq!(
            leaf_validity(&cfg, now).unwrap(),
            (now as i64, (now + MAX_LEAF_LIFETIME) as i64)
        );
        cfg.not_before = Some(now - 10);
        cfg.not_after = Some(u64::MAX);
        assert_eq!(
            leaf_validity(&cfg, now).unwrap(),
            ((now - 10) as i64, (now + MAX_LEAF_LIFETIME) as i64)
        );
        cfg.not_after = Some(now - 10);
        assert!(matches!(
            leaf_validity(&cfg, now),
            Err(SignCertError::BadValidity { .. })
        ));
    }

    #[test]
    fn app_info_is_a_nine_element_msgpack_array_of_bin_fields() {
        let boot = BootInfo {
            tee_variant: crate::attestation::TeeVariant::DstackTdx,
            mr_aggregated: vec![1; 32],
            os_image_hash: vec![2; 32],
            mr_system: vec![3; 32],
            app_id: vec![4; 20],
            compose_hash: vec![5; 32],
            instance_id: vec![6; 20],
            device_id: vec![7; 32],
            key_provider_info: b"{}".to_vec(),
            tcb_status: String::new(),
            advisory_ids: Vec::new(),
        };
        let v1 = eventlog::EventVersion::V1;
        let att = versioned::Attestation::legacy_tdx(
            vec![],
            vec![
                TdxEvent::runtime("init-script-hash", &[8; 32], v1),
                TdxEvent::runtime("system-ready", &[], v1),
                TdxEvent::runtime("init-script-hash", &[9; 32], v1),
            ],
        );
        let bytes = app_info(&boot, &att).unwrap();
        assert_eq!(bytes[0], 0x99, "fixarray of 9");
        assert_eq!(&bytes[1..3], &[0xc4, 20], "bin8 app id");
        // the last field: Some([bin 32]) with only the hash measured before system-ready
        let last = [&[0x91, 0xc4, 32][..], &[8; 32]].concat();
        assert!(bytes.ends_with(&last), "{bytes:02x?}");
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            api in 0u32..4,
            sig in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let _ = check_request(api, &bytes, &sig);
            if let Ok(version) = CsrVersion::from_api(api)
                && let Ok(csr) = Csr::decode(version, &bytes)
            {
                prop_assert_eq!(csr.encode(), bytes);
                let _ = csr.attestation();
            }
        }
    }
}
