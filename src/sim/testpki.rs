//! A test attestation PKI: an Intel-like root, PCK chain, TCB info and QE identity, and TDX v4
//! quotes over any report data and measurements, which the production verifier accepts only
//! when the root is configured through `insecure_test_pki`. Nothing here needs TEE hardware.
//!
//! The layout mirrors Intel's: root → PCK platform CA → PCK leaf (with the SGX extension:
//! PPID, TCB, PCE-ID, FMSPC, SGX type, platform flags), root → TCB signing certificate (signs TCB
//! info and QE identity), a root CA CRL and a PCK CRL. A quote is signed by an attestation key
//! whose hash the QE report carries, and the QE report is signed by the PCK leaf key.
//!
//! The TCB info has one level per [`TestTcb`] (`UpToDate` at the current TDX module SVN,
//! `OutOfDate` with an advisory one below), and a quote claims its level through its TEE TCB SVN,
//! so dcap-qvl's own matching decides the status. A PKI saved before these levels existed still
//! loads: its single `UpToDate` level admits current quotes, and re-running `dev test-pki init`
//! gives it the out-of-date level.

use std::path::Path;
use std::time::{Duration, SystemTime};

use dcap_qvl::{
    QeIdentity, QeTcb, QeTcbLevel, QuoteCollateralV3, Tcb, TcbComponents, TcbInfo, TcbLevel,
    TcbStatus,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    SerialNumber,
};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use sha2::{Digest, Sha256};

use crate::attestation::eventlog::{EventVersion, TdxEvent, replay};
use crate::attestation::ratls::{CertBuilder, GeneratedCert, der_tlv as tlv, report_data_for_spki};
use crate::attestation::reason::{AttestationError, Result, reject};
use crate::attestation::versioned::{self, Attestation, Platform};

use crate::attestation::testroot::COLLATERAL;
pub use crate::attestation::testroot::{ROOT_CERT_DER, TEST_FMSPC};

/// How long generated collateral stays valid.
pub const COLLATERAL_LIFETIME: u64 = 30 * 24 * 3600;
const ROOT_CERT_PEM: &str = "root_ca.pem";
const ROOT_KEY: &str = "root_ca.key";
const PCK_CA_CERT: &str = "pck_ca.pem";
const PCK_CA_KEY: &str = "pck_ca.key";
const PCK_CERT: &str = "pck.pem";
const PCK_KEY: &str = "pck.key";
const TCB_SIGNING_CERT: &str = "tcb_signing.pem";
const TCB_SIGNING_KEY: &str = "tcb_signing.key";
const ATTESTATION_KEY: &str = "attestation.key";
const PCK_CHAIN: &str = "pck_chain.pem";
const TCB_INFO: &str = "tcb_info.json";
const QE_IDENTITY: &str = "qe_identity.json";

const CERT_LIFETIME: u64 = 10 * 365 * 24 * 3600;
const QE_MRSIGNER: [u8; 32] = [0x5a; 32];
const QE_PROD_ID: u16 = 2;
const QE_SVN: u16 = 8;
const INTEL_QE_VENDOR_ID: [u8; 16] = [
    0x93, 0x9a, 0x72, 0x33, 0xf7, 0x9c, 0x4c, 0xa9, 0x94, 0x0a, 0x0d, 0xb3, 0x95, 0x7f, 0x06, 0x07,
];
/// TD attributes of a production TD (SEPT_VE_DISABLE set, DEBUG clear).
const TD_ATTRIBUTES: [u8; 8] = [0, 0, 0, 0x10, 0, 0, 0, 0];

/// The TCB a generated quote claims. The collateral carries one TCB level per variant, told apart
/// by the quote's TEE TCB SVN (the TDX module SVN, component 0), so dcap-qvl's own level matching
/// yields the status and advisories.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TestTcb {
    /// The current SVNs: `UpToDate`, no advisories.
    #[default]
    UpToDate,
    /// One SVN below current: `OutOfDate`, with [`OUT_OF_DATE_ADVISORY`].
    OutOfDate,
}

/// The advisory id the out-of-date test TCB level carries.
pub const OUT_OF_DATE_ADVISORY: &str = "INTEL-SA-00999";

impl TestTcb {
    /// Every level, highest SVN first (the order of the generated TCB info).
    pub const ALL: [TestTcb; 2] = [Self::UpToDate, Self::OutOfDate];

    /// The TEE TCB SVN a quote of this level carries. Component 1 (the module major version)
    /// stays 0, so the TCB info needs no TDX module identities.
    pub fn tee_tcb_svn(self) -> [u8; 16] {
        let mut svn = [0; 16];
        svn[0] = match self {
            Self::UpToDate => 2,
            Self::OutOfDate => 1,
        };
        svn
    }

    /// The status the TCB info assigns to this level.
    pub fn status(self) -> TcbStatus {
        match self {
            Self::UpToDate => TcbStatus::UpToDate,
            Self::OutOfDate => TcbStatus::OutOfDate,
        }
    }

    /// The advisory ids of this level.
    pub fn advisory_ids(self) -> Vec<String> {
        match self {
            Self::UpToDate => Vec::new(),
            Self::OutOfDate => vec![OUT_OF_DATE_ADVISORY.to_owned()],
        }
    }
}

/// The TD measurements (zero by default) and the TCB a generated quote carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteMeasurements {
    /// MRTD.
    pub mr_td: [u8; 48],
    /// RTMR0..3.
    pub rtmr: [[u8; 48]; 4],
    /// MRCONFIGID.
    pub mr_config_id: [u8; 48],
    /// MROWNER.
    pub mr_owner: [u8; 48],
    /// MROWNERCONFIG.
    pub mr_owner_config: [u8; 48],
    /// The platform TCB the quote claims.
    pub tcb: TestTcb,
    /// The PPID of the platform the quote claims (its device id is sha256 of it); `None`: the
    /// PKI's own platform.
    pub ppid: Option<[u8; 16]>,
    /// The FMSPC of the platform the quote claims; `None`: [`TEST_FMSPC`], whose collateral the
    /// PKI carries (any other is fetched from a PCCS).
    pub fmspc: Option<[u8; 6]>,
}

impl Default for QuoteMeasurements {
    fn default() -> Self {
        Self {
            mr_td: [0; 48],
            rtmr: [[0; 48]; 4],
            mr_config_id: [0; 48],
            mr_owner: [0; 48],
            mr_owner_config: [0; 48],
            tcb: TestTcb::UpToDate,
            ppid: None,
            fmspc: None,
        }
    }
}

/// A simulated dstack guest: the identity its RTMR3 events carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// App id (20 bytes).
    pub app_id: [u8; 20],
    /// Compose hash (sha256 of app-compose.json).
    pub compose_hash: [u8; 32],
    /// Instance id (20 bytes, or empty).
    pub instance_id: Vec<u8>,
    /// `key-provider` event payload (JSON `{"name","id"}`).
    pub key_provider: Vec<u8>,
    /// MRTD and RTMR0-2 of the simulated OS image.
    pub mr_td: [u8; 48],
    /// RTMR0..2.
    pub rtmr0_2: [[u8; 48]; 3],
    /// Boot a debug TD.
    pub debug: bool,
    /// The platform TCB the guest's quote claims.
    pub tcb: TestTcb,
    /// The platform's PPID (the device id is sha256 of it); `None`: the PKI's own platform.
    pub ppid: Option<[u8; 16]>,
    /// The platform's FMSPC; `None`: [`TEST_FMSPC`].
    pub fmspc: Option<[u8; 6]>,
}

/// A generated (or loaded) test PKI.
pub struct TestPki {
    root_key: KeyPair,
    root_der: Vec<u8>,
    pck_ca_key: KeyPair,
    pck_ca_der: Vec<u8>,
    pck_key: KeyPair,
    pck_der: Vec<u8>,
    tcb_key: KeyPair,
    tcb_der: Vec<u8>,
    attestation_key: KeyPair,
    collateral: QuoteCollateralV3,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").finish_non_exhaustive()
    }
}

fn cfg_err(what: &str) -> impl Fn(rcgen::Error) -> AttestationError + '_ {
    move |e| reject!(ConfigInvalid, "{what}: {e}")
}

fn new_key() -> Result<KeyPair> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cfg_err("key generation"))
}

fn datetime(t: u64) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(t).unwrap_or(i64::MAX))
        .map_err(|e| reject!(ConfigInvalid, "time {t}: {e}"))
}

fn rfc3339(t: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

fn ca_params(cn: &str, path_len: Option<u8>, now: u64) -> Result<CertificateParams> {
    let mut p = leaf_params(cn, now)?;
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

fn leaf_params(cn: &str, now: u64) -> Result<CertificateParams> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "keywarden test attestation PKI");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.not_before = datetime(now.saturating_sub(24 * 3600))?;
    p.not_after = datetime(now + CERT_LIFETIME)?;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::ContentCommitment,
    ];
    Ok(p)
}

fn oid(arcs: &[u64]) -> Vec<u8> {
    let mut body = vec![(arcs[0] * 40 + arcs[1]) as u8];
    for &arc in &arcs[2..] {
        let mut chunk = vec![(arc & 0x7f) as u8];
        let mut rest = arc >> 7;
        while rest > 0 {
            chunk.push(0x80 | (rest & 0x7f) as u8);
            rest >>= 7;
        }
        chunk.reverse();
        body.extend_from_slice(&chunk);
    }
    tlv(0x06, &body)
}

fn der_uint(v: u16) -> Vec<u8> {
    let mut bytes: Vec<u8> = v
        .to_be_bytes()
        .into_iter()
        .skip_while(|b| *b == 0)
        .collect();
    if bytes.first().is_none_or(|b| b & 0x80 != 0) {
        bytes.insert(0, 0);
    }
    tlv(0x02, &bytes)
}

const SGX_EXT: [u64; 9] = [1, 2, 840, 113741, 1, 13, 1, 0, 0];

fn sgx_oid(tail: &[u64]) -> Vec<u8> {
    let mut arcs = SGX_EXT[..7].to_vec();
    arcs.extend_from_slice(tail);
    oid(&arcs)
}

fn sgx_entry(tail: &[u64], value: Vec<u8>) -> Vec<u8> {
    tlv(0x30, &[sgx_oid(tail), value].concat())
}

/// The SGX extension of the PCK leaf: zero SVNs, the test FMSPC, cloud-like platform flags.
fn sgx_extension(ppid: &[u8; 16], fmspc: &[u8; 6]) -> Vec<u8> {
    let mut tcb = Vec::new();
    for i in 1..=16u64 {
        tcb.extend(sgx_entry(&[2, i], der_uint(0)));
    }
    tcb.extend(sgx_entry(&[2, 17], der_uint(0)));
    tcb.extend(sgx_entry(&[2, 18], tlv(0x04, &[0; 16])));
    let boolean = |b: bool| tlv(0x01, &[if b { 0xff } else { 0 }]);
    let config = [
        sgx_entry(&[7, 1], boolean(true)),
        sgx_entry(&[7, 2], boolean(true)),
        sgx_entry(&[7, 3], boolean(true)),
    ]
    .concat();
    let entries = [
        sgx_entry(&[1], tlv(0x04, ppid)),
        sgx_entry(&[2], tlv(0x30, &tcb)),
        sgx_entry(&[3], tlv(0x04, &[0, 0])),
        sgx_entry(&[4], tlv(0x04, fmspc)),
        // SGX type: Scalable (1), which platform-CA certificates carry
        sgx_entry(&[5], tlv(0x0a, &[1])),
        sgx_entry(&[6], tlv(0x04, &[0x11; 16])),
        sgx_entry(&[7], tlv(0x30, &config)),
    ];
    tlv(0x30, &entries.concat())
}

fn ecdsa_key(key: &KeyPair) -> Result<EcdsaKeyPair> {
    EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &key.serialize_der(),
        &SystemRandom::new(),
    )
    .map_err(|e| reject!(ConfigInvalid, "P-256 key: {e}"))
}

/// Signs `msg` with a P-256 key, returning the raw r‖s form Intel structures use.
fn sign_raw(key: &KeyPair, msg: &[u8]) -> Result<Vec<u8>> {
    ecdsa_key(key)?
        .sign(&SystemRandom::new(), msg)
        .map(|s| s.as_ref().to_vec())
        .map_err(|_| reject!(ConfigInvalid, "signing failed"))
}

/// The raw `x ‖ y` public key (the uncompressed SEC1 point without its 0x04 prefix).
fn raw_public_key(key: &KeyPair) -> Result<[u8; 64]> {
    <[u8; 64]>::try_from(&ecdsa_key(key)?.public_key().as_ref()[1..])
        .map_err(|_| reject!(ConfigInvalid, "attestation key is not P-256"))
}

fn pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der))
}

impl TestPki {
    /// Generates a fresh PKI whose collateral is valid from `now - 1 h` for
    /// [`COLLATERAL_LIFETIME`].
    pub fn generate(now: u64) -> Result<Self> {
        Self::generate_with_root_crl_url(now, None)
    }

    /// Like [`TestPki::generate`], with a CRL distribution point in the root certificate, the
    /// way Intel's root points at its CRL (Intel PCS has no root CRL endpoint).
    pub fn generate_with_root_crl_url(now: u64, root_crl_url: Option<&str>) -> Result<Self> {
        let root_key = new_key()?;
        let mut root_params = ca_params("Keywarden Test SGX Root CA", None, now)?;
        if let Some(url) = root_crl_url {
            root_params.crl_distribution_points = vec![rcgen::CrlDistributionPoint {
                uris: vec![url.to_owned()],
            }];
        }
        let root_der = root_params
            .self_signed(&root_key)
            .map_err(cfg_err("root"))?
            .der()
            .to_vec();
        let root_issuer = Issuer::new(root_params, &root_key);

        let pck_ca_key = new_key()?;
        let pck_ca_params = ca_params("Keywarden Test SGX PCK Platform CA", Some(0), now)?;
        let pck_ca_der = pck_ca_params
            .signed_by(&pck_ca_key, &root_issuer)
            .map_err(cfg_err("PCK CA"))?
            .der()
            .to_vec();
        let pck_ca_issuer = Issuer::new(pck_ca_params, &pck_ca_key);

        let pck_key = new_key()?;
        let mut pck_params = leaf_params("Keywarden Test SGX PCK Certificate", now)?;
        let ppid: [u8; 16] = Sha256::digest(&root_der)[..16]
            .try_into()
            .map_err(|_| reject!(ConfigInvalid, "ppid"))?;
        pck_params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                &SGX_EXT[..7],
                sgx_extension(&ppid, &TEST_FMSPC),
            ));
        let pck_der = pck_params
            .signed_by(&pck_key, &pck_ca_issuer)
            .map_err(cfg_err("PCK"))?
            .der()
            .to_vec();

        let tcb_key = new_key()?;
        let tcb_der = leaf_params("Keywarden Test SGX TCB Signing", now)?
            .signed_by(&tcb_key, &root_issuer)
            .map_err(cfg_err("TCB signing"))?
            .der()
            .to_vec();

        let mut pki = Self {
            root_key,
            root_der,
            pck_ca_key,
            pck_ca_der,
            pck_key,
            pck_der,
            tcb_key,
            tcb_der,
            attestation_key: new_key()?,
            collateral: empty_collateral(),
        };
        pki.collateral = pki.collateral_for(now.saturating_sub(3600), now + COLLATERAL_LIFETIME)?;
        Ok(pki)
    }

    /// The root certificate (DER): the trust anchor `insecure_test_pki` adds.
    pub fn root_der(&self) -> &[u8] {
        &self.root_der
    }

    /// The collateral generated with the PKI (or loaded with it).
    pub fn collateral(&self) -> &QuoteCollateralV3 {
        &self.collateral
    }

    /// Signs fresh collateral (TCB info, QE identity, both CRLs) valid in `[issued, next_update]`.
    pub fn collateral_for(&self, issued: u64, next_update: u64) -> Result<QuoteCollateralV3> {
        let sgx_components = vec![TcbComponents { svn: 0 }; 16];
        let tcb_levels = TestTcb::ALL
            .into_iter()
            .map(|level| TcbLevel {
                tcb: Tcb {
                    sgx_components: sgx_components.clone(),
                    tdx_components: level
                        .tee_tcb_svn()
                        .into_iter()
                        .map(|svn| TcbComponents { svn })
                        .collect(),
                    pce_svn: 0,
                },
                tcb_date: rfc3339(issued),
                tcb_status: level.status(),
                advisory_ids: level.advisory_ids(),
            })
            .collect();
        let tcb_info = TcbInfo {
            id: "TDX".into(),
            version: 3,
            issue_date: rfc3339(issued),
            next_update: rfc3339(next_update),
            fmspc: hex::encode_upper(TEST_FMSPC),
            pce_id: "0000".into(),
            tcb_type: 0,
            tcb_evaluation_data_number: 1,
            tcb_levels,
            tdx_module: Some(dcap_qvl::tcb_info::TdxModule {
                mrsigner: "00".repeat(48),
                attributes: "0000000000000000".into(),
                attributes_mask: "FFFFFFFFFFFFFFFF".into(),
            }),
            tdx_module_identities: Vec::new(),
        };
        let qe_identity = QeIdentity {
            id: "TD_QE".into(),
            version: 2,
            issue_date: rfc3339(issued),
            next_update: rfc3339(next_update),
            tcb_evaluation_data_number: 1,
            miscselect: [0; 4],
            miscselect_mask: [0xff; 4],
            attributes: [0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            attributes_mask: [0xfb, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            mrsigner: QE_MRSIGNER,
            isvprodid: QE_PROD_ID,
            tcb_levels: vec![QeTcbLevel {
                tcb: QeTcb { isvsvn: QE_SVN },
                tcb_date: rfc3339(issued),
                tcb_status: TcbStatus::UpToDate,
                advisory_ids: Vec::new(),
            }],
        };
        let tcb_info = to_json(&tcb_info)?;
        let qe_identity = to_json(&qe_identity)?;
        let signing_chain = format!("{}{}", pem(&self.tcb_der), pem(&self.root_der));
        Ok(QuoteCollateralV3 {
            pck_crl_issuer_chain: format!("{}{}", pem(&self.pck_ca_der), pem(&self.root_der)),
            root_ca_crl: self.crl(&self.root_der, &self.root_key, issued, next_update)?,
            pck_crl: self.crl(&self.pck_ca_der, &self.pck_ca_key, issued, next_update)?,
            tcb_info_issuer_chain: signing_chain.clone(),
            tcb_info_signature: sign_raw(&self.tcb_key, tcb_info.as_bytes())?,
            tcb_info,
            qe_identity_issuer_chain: signing_chain,
            qe_identity_signature: sign_raw(&self.tcb_key, qe_identity.as_bytes())?,
            qe_identity,
            pck_certificate_chain: None,
        })
    }

    fn crl(&self, ca_der: &[u8], ca_key: &KeyPair, issued: u64, next: u64) -> Result<Vec<u8>> {
        let issuer =
            Issuer::from_ca_cert_der(&ca_der.into(), ca_key).map_err(cfg_err("CRL issuer"))?;
        let params = CertificateRevocationListParams {
            this_update: datetime(issued)?,
            next_update: datetime(next)?,
            crl_number: SerialNumber::from_slice(&[1]),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params
            .signed_by(&issuer)
            .map_err(cfg_err("CRL"))?
            .der()
            .to_vec())
    }

    /// The PEM chain a quote carries: `pck_der`, the PCK CA, the root.
    fn pck_chain(&self, pck_der: &[u8]) -> String {
        format!(
            "{}{}{}",
            pem(pck_der),
            pem(&self.pck_ca_der),
            pem(&self.root_der)
        )
    }

    /// A PCK certificate of the platform key for another platform (PPID, FMSPC), issued by the
    /// PCK CA with the validity of the PKI's own PCK certificate: a simulated second device.
    fn pck_cert_for(&self, ppid: &[u8; 16], fmspc: &[u8; 6]) -> Result<Vec<u8>> {
        let (_, own) = x509_parser::parse_x509_certificate(&self.pck_der)
            .map_err(|e| reject!(ConfigInvalid, "PCK certificate: {e}"))?;
        let issued = u64::try_from(own.validity().not_before.timestamp()).unwrap_or(0);
        let issuer = Issuer::from_ca_cert_der(&self.pck_ca_der.clone().into(), &self.pck_ca_key)
            .map_err(cfg_err("PCK CA"))?;
        let mut params = leaf_params("Keywarden Test SGX PCK Certificate", issued + 24 * 3600)?;
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                &SGX_EXT[..7],
                sgx_extension(ppid, fmspc),
            ));
        Ok(params
            .signed_by(&self.pck_key, &issuer)
            .map_err(cfg_err("PCK"))?
            .der()
            .to_vec())
    }

    /// Builds a TDX v4 quote over `report_data` and `m`, signed through this PKI.
    pub fn quote(
        &self,
        report_data: &[u8; 64],
        m: &QuoteMeasurements,
        debug: bool,
    ) -> Result<Vec<u8>> {
        let mut header = Vec::with_capacity(48);
        header.extend_from_slice(&4u16.to_le_bytes());
        header.extend_from_slice(&2u16.to_le_bytes()); // ECDSA-256 with P-256
        header.extend_from_slice(&0x81u32.to_le_bytes()); // TDX
        header.extend_from_slice(&QE_SVN.to_le_bytes());
        header.extend_from_slice(&0u16.to_le_bytes());
        header.extend_from_slice(&INTEL_QE_VENDOR_ID);
        header.extend_from_slice(&[0; 20]);

        let mut td_attributes = TD_ATTRIBUTES;
        if debug {
            td_attributes[0] |= 0x01;
        }
        let mut body = Vec::with_capacity(584);
        body.extend_from_slice(&m.tcb.tee_tcb_svn());
        body.extend_from_slice(&[0; 48]); // mr_seam
        body.extend_from_slice(&[0; 48]); // mr_signer_seam (Intel)
        body.extend_from_slice(&[0; 8]); // seam_attributes
        body.extend_from_slice(&td_attributes);
        body.extend_from_slice(&[0xe7, 0x02, 0x06, 0, 0, 0, 0, 0]); // xfam
        for field in [&m.mr_td, &m.mr_config_id, &m.mr_owner, &m.mr_owner_config] {
            body.extend_from_slice(field);
        }
        for r in &m.rtmr {
            body.extend_from_slice(r);
        }
        body.extend_from_slice(report_data);

        let attestation_pub = raw_public_key(&self.attestation_key)?;
        let qe_auth_data = [0x42u8; 32];
        let mut qe_report = vec![0u8; 384];
        qe_report[48..52].copy_from_slice(&[0x11, 0, 0, 0]); // attributes: INIT | MODE64BIT
        qe_report[128..160].copy_from_slice(&QE_MRSIGNER);
        qe_report[256..258].copy_from_slice(&QE_PROD_ID.to_le_bytes());
        qe_report[258..260].copy_from_slice(&QE_SVN.to_le_bytes());
        let binding = Sha256::digest([&attestation_pub[..], &qe_auth_data[..]].concat());
        qe_report[320..352].copy_from_slice(&binding);
        let qe_report_signature = sign_raw(&self.pck_key, &qe_report)?;

        let chain = match (&m.ppid, &m.fmspc) {
            (None, None) => self.pck_chain(&self.pck_der),
            (ppid, fmspc) => {
                let own_ppid = Sha256::digest(&self.root_der);
                let ppid = ppid.unwrap_or_else(|| {
                    let mut p = [0u8; 16];
                    p.copy_from_slice(&own_ppid[..16]);
                    p
                });
                self.pck_chain(&self.pck_cert_for(&ppid, &fmspc.unwrap_or(TEST_FMSPC))?)
            }
        };
        let mut qe_cert_data = Vec::new();
        qe_cert_data.extend_from_slice(&qe_report);
        qe_cert_data.extend_from_slice(&qe_report_signature);
        qe_cert_data.extend_from_slice(&(qe_auth_data.len() as u16).to_le_bytes());
        qe_cert_data.extend_from_slice(&qe_auth_data);
        qe_cert_data.extend_from_slice(&5u16.to_le_bytes()); // PCK chain, PEM
        qe_cert_data.extend_from_slice(&(chain.len() as u32).to_le_bytes());
        qe_cert_data.extend_from_slice(chain.as_bytes());

        let signed = [header, body].concat();
        let signature = sign_raw(&self.attestation_key, &signed)?;
        let mut auth = Vec::new();
        auth.extend_from_slice(&signature);
        auth.extend_from_slice(&attestation_pub);
        auth.extend_from_slice(&6u16.to_le_bytes()); // QE report certification data
        auth.extend_from_slice(&(qe_cert_data.len() as u32).to_le_bytes());
        auth.extend_from_slice(&qe_cert_data);

        let mut quote = signed;
        quote.extend_from_slice(&(auth.len() as u32).to_le_bytes());
        quote.extend_from_slice(&auth);
        Ok(quote)
    }

    /// Builds a full dstack `VersionedAttestation` (V0 SCALE) for a simulated guest: an RTMR3
    /// event log with the identity events, a quote whose RTMR3 equals its replay and whose
    /// `mr_config_id` is `0x01 ‖ compose_hash`.
    pub fn dstack_attestation(&self, guest: &GuestSpec, report_data: &[u8; 64]) -> Result<Vec<u8>> {
        let v1 = EventVersion::V1;
        let event_log = vec![
            TdxEvent::runtime("system-preparing", &[], v1),
            TdxEvent::runtime("app-id", &guest.app_id, v1),
            TdxEvent::runtime("compose-hash", &guest.compose_hash, v1),
            TdxEvent::runtime("instance-id", &guest.instance_id, v1),
            TdxEvent::runtime("boot-mr-done", &[], v1),
            TdxEvent::runtime("key-provider", &guest.key_provider, v1),
            TdxEvent::runtime("system-ready", &[], v1),
        ];
        let (mrs, _) = replay(&event_log)?;
        let mut mr_config_id = [0u8; 48];
        mr_config_id[0] = 0x01;
        mr_config_id[1..33].copy_from_slice(&guest.compose_hash);
        let [r0, r1, r2] = guest.rtmr0_2;
        let m = QuoteMeasurements {
            mr_td: guest.mr_td,
            rtmr: [r0, r1, r2, mrs[3]],
            mr_config_id,
            tcb: guest.tcb,
            ppid: guest.ppid,
            fmspc: guest.fmspc,
            ..QuoteMeasurements::default()
        };
        let quote = self.quote(report_data, &m, guest.debug)?;
        Ok(versioned::encode_v0(&Attestation {
            platform: Platform::Tdx { quote, event_log },
            runtime_events: Vec::new(),
            report_data: *report_data,
            config: String::new(),
        }))
    }

    /// Builds an RA-TLS client certificate for a simulated guest: a fresh P-256 key, an
    /// attestation binding its SPKI, signed by `ca` (certificate DER, key) or self-signed.
    pub fn guest_cert(
        &self,
        guest: &GuestSpec,
        ca: Option<(&[u8], &KeyPair)>,
    ) -> Result<GeneratedCert> {
        let key = CertBuilder::new_key()?;
        let report_data =
            report_data_for_spki(&rcgen::PublicKeyData::subject_public_key_info(&key));
        let attestation = self.dstack_attestation(guest, &report_data)?;
        let builder = CertBuilder::new("dstack guest")
            .app_id(&guest.app_id)
            .attestation(&attestation);
        match ca {
            Some((ca_der, ca_key)) => builder.signed_by(&key, ca_der, ca_key),
            None => builder.self_signed(&key),
        }
    }

    /// Writes the PKI to `dir` (keys with mode 0600).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let io = |e: std::io::Error| reject!(ConfigInvalid, "{}: {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(io)?;
        let write = |name: &str, data: &[u8], secret: bool| -> Result<()> {
            let path = dir.join(name);
            write_file(&path, data, secret)
                .map_err(|e| reject!(ConfigInvalid, "{}: {e}", path.display()))
        };
        write(ROOT_CERT_DER, &self.root_der, false)?;
        write(ROOT_CERT_PEM, pem(&self.root_der).as_bytes(), false)?;
        write(PCK_CA_CERT, pem(&self.pck_ca_der).as_bytes(), false)?;
        write(PCK_CERT, pem(&self.pck_der).as_bytes(), false)?;
        write(TCB_SIGNING_CERT, pem(&self.tcb_der).as_bytes(), false)?;
        write(PCK_CHAIN, self.pck_chain(&self.pck_der).as_bytes(), false)?;
        for (name, key) in [
            (ROOT_KEY, &self.root_key),
            (PCK_CA_KEY, &self.pck_ca_key),
            (PCK_KEY, &self.pck_key),
            (TCB_SIGNING_KEY, &self.tcb_key),
            (ATTESTATION_KEY, &self.attestation_key),
        ] {
            write(name, key.serialize_pem().as_bytes(), true)?;
        }
        write(TCB_INFO, self.collateral.tcb_info.as_bytes(), false)?;
        write(QE_IDENTITY, self.collateral.qe_identity.as_bytes(), false)?;
        let collateral = serde_json::to_vec_pretty(&self.collateral)
            .map_err(|e| reject!(ConfigInvalid, "collateral JSON: {e}"))?;
        write(COLLATERAL, &collateral, false)
    }

    /// Loads a PKI written by [`TestPki::save`].
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| reject!(ConfigInvalid, "{}: {e}", path.display()))
        };
        let key = |name: &str| -> Result<KeyPair> {
            let pem = String::from_utf8(read(name)?)
                .map_err(|_| reject!(ConfigInvalid, "{name} is not PEM"))?;
            KeyPair::from_pem(&pem).map_err(cfg_err(name))
        };
        let cert = |name: &str| -> Result<Vec<u8>> {
            let data = read(name)?;
            let (_, pem) = x509_parser::pem::parse_x509_pem(&data)
                .map_err(|e| reject!(ConfigInvalid, "{name}: {e}"))?;
            Ok(pem.contents)
        };
        let collateral = serde_json::from_slice(&read(COLLATERAL)?)
            .map_err(|e| reject!(ConfigInvalid, "{COLLATERAL}: {e}"))?;
        Ok(Self {
            root_key: key(ROOT_KEY)?,
            root_der: read(ROOT_CERT_DER)?,
            pck_ca_key: key(PCK_CA_KEY)?,
            pck_ca_der: cert(PCK_CA_CERT)?,
            pck_key: key(PCK_KEY)?,
            pck_der: cert(PCK_CERT)?,
            tcb_key: key(TCB_SIGNING_KEY)?,
            tcb_der: cert(TCB_SIGNING_CERT)?,
            attestation_key: key(ATTESTATION_KEY)?,
            collateral,
        })
    }
}

fn empty_collateral() -> QuoteCollateralV3 {
    QuoteCollateralV3 {
        pck_crl_issuer_chain: String::new(),
        root_ca_crl: Vec::new(),
        pck_crl: Vec::new(),
        tcb_info_issuer_chain: String::new(),
        tcb_info: String::new(),
        tcb_info_signature: Vec::new(),
        qe_identity_issuer_chain: String::new(),
        qe_identity: String::new(),
        qe_identity_signature: Vec::new(),
        pck_certificate_chain: None,
    }
}

fn write_file(path: &Path, data: &[u8], secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path)?;
    f.write_all(data)?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        // an existing file keeps its mode on open: tighten it explicitly
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| reject!(ConfigInvalid, "collateral JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use dcap_qvl::verify::QuoteVerifier;

    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn quote_at(pki: &TestPki, tcb: TestTcb) -> Vec<u8> {
        let m = QuoteMeasurements {
            tcb,
            ..QuoteMeasurements::default()
        };
        pki.quote(&[3; 64], &m, false).unwrap()
    }

    /// dcap-qvl's own evaluation: (status, advisory ids).
    fn evaluate(pki: &TestPki, quote: &[u8]) -> (String, Vec<String>) {
        let report = QuoteVerifier::new(pki.root_der().to_vec())
            .verify(quote, pki.collateral(), NOW)
            .unwrap();
        (report.status, report.advisory_ids)
    }

    #[test]
    fn tcb_info_has_an_up_to_date_level_above_an_out_of_date_one() {
        let pki = TestPki::generate(NOW).unwrap();
        let info: TcbInfo = serde_json::from_str(&pki.collateral().tcb_info).unwrap();
        let levels: Vec<_> = info
            .tcb_levels
            .iter()
            .map(|l| {
                (
                    l.tcb_status,
                    l.tcb.tdx_components[0].svn,
                    l.advisory_ids.clone(),
                )
            })
            .collect();
        assert_eq!(
            levels,
            vec![
                (TcbStatus::UpToDate, 2, vec![]),
                (
                    TcbStatus::OutOfDate,
                    1,
                    vec![OUT_OF_DATE_ADVISORY.to_owned()]
                ),
            ]
        );
    }

    #[test]
    fn dcap_qvl_evaluates_each_test_tcb_to_its_level() {
        let pki = TestPki::generate(NOW).unwrap();
        assert_eq!(
            evaluate(&pki, &quote_at(&pki, TestTcb::UpToDate)),
            ("UpToDate".to_owned(), vec![])
        );
        assert_eq!(
            evaluate(&pki, &quote_at(&pki, TestTcb::OutOfDate)),
            (
                "OutOfDate".to_owned(),
                vec![OUT_OF_DATE_ADVISORY.to_owned()]
            )
        );
    }

    #[test]
    fn out_of_date_guest_attestation_carries_the_lower_svn() {
        let pki = TestPki::generate(NOW).unwrap();
        let guest = GuestSpec {
            app_id: [1; 20],
            compose_hash: [2; 32],
            instance_id: Vec::new(),
            key_provider: Vec::new(),
            mr_td: [3; 48],
            rtmr0_2: [[4; 48]; 3],
            debug: false,
            tcb: TestTcb::OutOfDate,
            ppid: None,
            fmspc: None,
        };
        let raw = pki.dstack_attestation(&guest, &[5; 64]).unwrap();
        let Platform::Tdx { quote, .. } = versioned::parse(&raw).unwrap().platform else {
            panic!("not a TDX attestation");
        };
        let parsed = dcap_qvl::quote::Quote::parse(&quote).unwrap();
        let td = parsed.report.as_td10().unwrap();
        assert_eq!(td.tee_tcb_svn, TestTcb::OutOfDate.tee_tcb_svn());
        assert_eq!(evaluate(&pki, &quote).0, "OutOfDate");
    }

    #[test]
    fn saved_and_loaded_pki_keeps_both_tcb_levels() {
        let dir = tempfile::tempdir().unwrap();
        TestPki::generate(NOW).unwrap().save(dir.path()).unwrap();
        let pki = TestPki::load(dir.path()).unwrap();
        assert_eq!(
            evaluate(&pki, &quote_at(&pki, TestTcb::UpToDate)).0,
            "UpToDate"
        );
        assert_eq!(
            evaluate(&pki, &quote_at(&pki, TestTcb::OutOfDate)).0,
            "OutOfDate"
        );
    }

    #[test]
    fn a_single_level_collateral_of_an_older_save_still_admits_current_quotes() {
        // PKIs saved before the TCB levels existed carry one UpToDate level at SVN 0.
        let pki = TestPki::generate(NOW).unwrap();
        let mut info: TcbInfo = serde_json::from_str(&pki.collateral().tcb_info).unwrap();
        info.tcb_levels.truncate(1);
        for c in &mut info.tcb_levels[0].tcb.tdx_components {
            c.svn = 0;
        }
        let mut old = pki.collateral().clone();
        old.tcb_info = to_json(&info).unwrap();
        old.tcb_info_signature = sign_raw(&pki.tcb_key, old.tcb_info.as_bytes()).unwrap();
        let report = QuoteVerifier::new(pki.root_der().to_vec())
            .verify(&quote_at(&pki, TestTcb::UpToDate), &old, NOW)
            .unwrap();
        assert_eq!(report.status, "UpToDate");
    }
}
