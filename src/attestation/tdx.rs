//! Intel TDX (and SGX) DCAP quote verification with dcap-qvl, plus the TCB policy.
//!
//! dcap-qvl does the cryptography (quote signature, QE report, PCK chain, CRLs, TCB info and QE
//! identity signatures, collateral time window) at an explicit `now`; this module maps its
//! errors to typed reasons and applies the configured policy (status, advisories, PCK flags,
//! debug TD, TDX module signer) itself, so each refusal has its own reason.
//!
//! [`preverify_quote`] checks, before any collateral is fetched, what the quote proves on its
//! own: its PCK chain to a pinned root and the signatures from the PCK key down to the quote. A
//! quote that fails never causes an outbound request.

use dcap_qvl::QuoteCollateralV3;
use dcap_qvl::quote::{Quote, Report};
use dcap_qvl::verify::{QuoteVerifier, VerifiedReport};

use super::config::TcbPolicy;
use super::reason::{AttestationError, RejectReason, Result, check_size, reject};

/// Largest quote accepted (real v4/v5 quotes with an embedded PCK chain are about 5 KiB).
pub const MAX_QUOTE_LEN: usize = 32 * 1024;
/// Largest collateral JSON accepted.
pub const MAX_COLLATERAL_LEN: usize = 256 * 1024;

/// SHA-256 of Intel's SGX Root CA certificate (DER), the production anchor of every PCK chain.
pub const INTEL_ROOT_SHA256: [u8; 32] =
    hex_literal(b"44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3");

/// Decodes 64 hex digits at compile time.
const fn hex_literal(hex: &[u8; 64]) -> [u8; 32] {
    const fn digit(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not a lower-case hex digit"),
        }
    }
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = digit(hex[2 * i]) << 4 | digit(hex[2 * i + 1]);
        i += 1;
    }
    out
}

/// TEE type of a TDX quote header.
const TEE_TYPE_TDX: u32 = 0x81;

/// The TD measurement registers and bindings of a TDX report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdMeasurements {
    /// MRTD: the initial TD contents (firmware).
    pub mr_td: [u8; 48],
    /// RTMR0..3.
    pub rtmr: [[u8; 48]; 4],
    /// MRCONFIGID (dstack: 0x01 ‖ compose hash).
    pub mr_config_id: [u8; 48],
    /// MROWNER.
    pub mr_owner: [u8; 48],
    /// MROWNERCONFIG.
    pub mr_owner_config: [u8; 48],
    /// MRSEAM: the TDX module measurement.
    pub mr_seam: [u8; 48],
    /// MRSIGNERSEAM (zero for Intel's own module).
    pub mr_signer_seam: [u8; 48],
    /// TD attributes (bit 0 = DEBUG).
    pub td_attributes: [u8; 8],
    /// TDX 1.5: the bound service TD (zero when none).
    pub mr_service_td: Option<[u8; 48]>,
    /// REPORTDATA.
    pub report_data: [u8; 64],
}

impl TdMeasurements {
    /// Extracts the TD fields of a report; `None` for SGX enclave reports.
    pub fn from_report(report: &Report) -> Option<Self> {
        let td = report.as_td10()?;
        Some(Self {
            mr_td: td.mr_td,
            rtmr: [td.rt_mr0, td.rt_mr1, td.rt_mr2, td.rt_mr3],
            mr_config_id: td.mr_config_id,
            mr_owner: td.mr_owner,
            mr_owner_config: td.mr_owner_config,
            mr_seam: td.mr_seam,
            mr_signer_seam: td.mr_signer_seam,
            td_attributes: td.td_attributes,
            mr_service_td: report.as_td15().map(|r| r.mr_service_td),
            report_data: td.report_data,
        })
    }

    /// Whether the TD runs in debug mode or with profiling (TUD bits: the host can observe it).
    pub fn is_debug(&self) -> bool {
        self.td_attributes[0] & 0x71 != 0
    }
}

/// A quote whose signature chain verified and which passed the TCB policy.
#[derive(Debug, Clone)]
pub struct VerifiedQuote {
    /// TCB status as Intel spells it (`UpToDate`, ...).
    pub tcb_status: String,
    /// Advisory ids of the matched TCB level.
    pub advisory_ids: Vec<String>,
    /// PPID from the PCK certificate (device identity).
    pub ppid: Vec<u8>,
    /// FMSPC of the platform.
    pub fmspc: [u8; 6],
    /// The report body.
    pub report: Report,
}

impl VerifiedQuote {
    /// The TD fields, `None` for SGX quotes.
    pub fn td(&self) -> Option<TdMeasurements> {
        TdMeasurements::from_report(&self.report)
    }
}

/// Parses a quote without verifying it.
pub fn parse_quote(raw: &[u8]) -> Result<Quote> {
    check_size("quote", raw, MAX_QUOTE_LEN)?;
    Quote::parse(raw).map_err(|e| reject!(QuoteMalformed, "{e:#}"))
}

/// Parses collateral JSON (`QuoteCollateralV3` serde form, byte fields as hex).
pub fn parse_collateral(json: &[u8]) -> Result<QuoteCollateralV3> {
    check_size("collateral", json, MAX_COLLATERAL_LEN)?;
    serde_json::from_slice(json).map_err(|e| reject!(CollateralInvalid, "collateral JSON: {e}"))
}

/// The PCK certificate facts the policy needs beyond dcap-qvl's report.
struct PckFacts {
    fmspc: [u8; 6],
    dynamic_platform: bool,
    cached_keys: bool,
    smt_enabled: bool,
}

/// Reads the PCK leaf's SGX extension from the chain dcap-qvl verified (the collateral's chain
/// when it carries one, else the quote's); cheaper than building dcap-qvl's full claims.
fn pck_facts(quote: &Quote, collateral: &QuoteCollateralV3) -> Result<PckFacts> {
    let ext = match &collateral.pck_certificate_chain {
        Some(pem) => dcap_qvl::intel::parse_pck_extension_from_pem(pem.as_bytes()),
        None => dcap_qvl::intel::extract_cert_chain(quote).and_then(|chain| {
            let leaf = chain
                .first()
                .ok_or_else(|| anyhow::anyhow!("empty PCK certificate chain"))?;
            dcap_qvl::intel::parse_pck_extension(leaf)
        }),
    }
    .map_err(|e| reject!(QuoteMalformed, "PCK certificate extension: {e:#}"))?;
    Ok(PckFacts {
        fmspc: ext.fmspc,
        dynamic_platform: ext.dynamic_platform == Some(true),
        cached_keys: ext.cached_keys == Some(true),
        smt_enabled: ext.smt_enabled == Some(true),
    })
}

/// Verifies `raw` against `collateral` at `now` (unix seconds), anchored at `root_der` (Intel's
/// production root when `None`), and applies `policy`. Debug TDs/enclaves are refused unless
/// `allow_debug`.
pub fn verify_quote(
    raw: &[u8],
    collateral: &QuoteCollateralV3,
    now: u64,
    root_der: Option<&[u8]>,
    policy: &TcbPolicy,
    allow_debug: bool,
) -> Result<VerifiedQuote> {
    let quote = parse_quote(raw)?;
    let verifier = match root_der {
        Some(der) => QuoteVerifier::new(der.to_vec()),
        None => QuoteVerifier::new_prod(),
    };
    // dcap-qvl's own debug check is disabled so that the refusal carries `debug_td`.
    let report = verifier
        .allow_debug(true)
        .verify(raw, collateral, now)
        .map_err(classify_dcap_error)?;
    let pck = pck_facts(&quote, collateral)?;
    apply_policy(&report, quote.header.tee_type, &pck, policy, allow_debug)?;
    Ok(VerifiedQuote {
        tcb_status: report.status,
        advisory_ids: report.advisory_ids,
        ppid: report.ppid,
        fmspc: pck.fmspc,
        report: report.report,
    })
}

/// What a quote proves without collateral, checked at `now` (unix seconds): its PCK certificate
/// chain ends in a root whose SHA-256 is in `root_sha256` and verifies to it (signatures and
/// validity; revocation needs the CRLs, which come with the collateral), the PCK key signed the
/// QE report, the QE report binds the attestation key, and the attestation key signed the quote.
/// Returns the parsed quote.
pub fn preverify_quote(raw: &[u8], now: u64, root_sha256: &[[u8; 32]]) -> Result<Quote> {
    use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
    use rustls::pki_types::{CertificateDer, UnixTime};
    use sha2::Digest as _;

    let quote = parse_quote(raw)?;
    let chain = dcap_qvl::intel::extract_cert_chain(&quote)
        .map_err(|e| reject!(QuoteMalformed, "PCK certificate chain: {e:#}"))?;
    let [leaf, intermediates @ .., root] = &chain[..] else {
        return Err(reject!(
            QuoteMalformed,
            "the quote carries no PCK certificate chain up to a root"
        ));
    };
    let root_hash: [u8; 32] = sha2::Sha256::digest(root).into();
    if !root_sha256.contains(&root_hash) {
        return Err(reject!(
            UntrustedRoot,
            "the PCK chain ends in a root that is not trusted (SHA-256 {})",
            hex::encode(root_hash)
        ));
    }
    let root = CertificateDer::from(root.as_slice());
    let anchor = webpki::anchor_from_trusted_cert(&root)
        .map_err(|e| reject!(CertChainInvalid, "PCK root certificate: {e}"))?;
    let leaf_der = CertificateDer::from(leaf.as_slice());
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    webpki::EndEntityCert::try_from(&leaf_der)
        .map_err(|e| reject!(CertChainInvalid, "PCK certificate: {e}"))?
        .verify_for_usage(
            &[webpki::ring::ECDSA_P256_SHA256],
            &[anchor],
            &intermediates,
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(now)),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| reject!(CertChainInvalid, "PCK certificate chain: {e}"))?;
    let (_, pck) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| reject!(CertChainInvalid, "PCK certificate: {e}"))?;
    let auth = quote.auth_data.clone().into_v3();
    UnparsedPublicKey::new(
        &ECDSA_P256_SHA256_FIXED,
        &pck.public_key().subject_public_key.data,
    )
    .verify(&auth.qe_report, &auth.qe_report_signature)
    .map_err(|_| {
        reject!(
            QuoteSignatureInvalid,
            "the PCK key did not sign the QE report"
        )
    })?;
    let binding = sha2::Sha256::digest(
        [&auth.ecdsa_attestation_key[..], &auth.qe_auth_data.data[..]].concat(),
    );
    if auth.qe_report.get(320..352) != Some(&binding[..]) {
        return Err(reject!(
            QuoteSignatureInvalid,
            "the QE report does not bind the attestation key"
        ));
    }
    let attestation_key = [&[0x04][..], &auth.ecdsa_attestation_key[..]].concat();
    let signed = raw
        .get(..quote.signed_length())
        .ok_or_else(|| reject!(QuoteMalformed, "the quote is shorter than its signed part"))?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &attestation_key)
        .verify(signed, &auth.ecdsa_signature)
        .map_err(|_| {
            reject!(
                QuoteSignatureInvalid,
                "the attestation key did not sign the quote"
            )
        })?;
    Ok(quote)
}

fn apply_policy(
    verified: &VerifiedReport,
    tee_type: u32,
    pck: &PckFacts,
    policy: &TcbPolicy,
    allow_debug: bool,
) -> Result<()> {
    let status = &verified.status;
    // dcap-qvl refuses Revoked itself; the explicit check keeps that true whatever the config
    if status == "Revoked" || !policy.accepted_statuses.contains(status) {
        return Err(reject!(TcbStatusRejected, "TCB status {status}"));
    }
    if let Some(id) = verified
        .advisory_ids
        .iter()
        .find(|id| policy.rejected_advisory_ids.contains(id))
    {
        return Err(reject!(AdvisoryRejected, "advisory {id}"));
    }
    for (name, flag, allowed) in [
        (
            "dynamic platform",
            pck.dynamic_platform,
            policy.allow_dynamic_platform,
        ),
        ("cached keys", pck.cached_keys, policy.allow_cached_keys),
        ("SMT", pck.smt_enabled, policy.allow_smt),
    ] {
        if flag && !allowed {
            return Err(reject!(PlatformFlagRejected, "{name} not allowed"));
        }
    }
    match (
        &verified.report,
        TdMeasurements::from_report(&verified.report),
    ) {
        (_, Some(td)) => {
            if tee_type != TEE_TYPE_TDX {
                return Err(reject!(QuoteMalformed, "TD report in a non-TDX quote"));
            }
            if td.is_debug() && !allow_debug {
                return Err(reject!(DebugTd, "TD attributes have DEBUG set"));
            }
            if td.mr_signer_seam != [0; 48] {
                return Err(reject!(TdxModuleRejected, "non-Intel TDX module signer"));
            }
        }
        (Report::SgxEnclave(enclave), None) => {
            // SGX ATTRIBUTES.DEBUG is bit 1
            if enclave.attributes[0] & 0x02 != 0 && !allow_debug {
                return Err(reject!(DebugTd, "SGX enclave attributes have DEBUG set"));
            }
        }
        (_, None) => return Err(reject!(QuoteMalformed, "unexpected report body")),
    }
    Ok(())
}

/// Maps dcap-qvl's untyped errors to reasons, from the words of its error chain.
fn classify_dcap_error(err: anyhow::Error) -> AttestationError {
    let msg = format!("{err:#}");
    let has = |needles: &[&str]| needles.iter().any(|n| msg.contains(n));
    let reason = if has(&[
        "Failed to decode quote",
        "Unsupported DCAP quote version",
        "Unknown QE vendor",
        "attestation key type",
        "TEE quote must have",
        "Failed to extract PCK certificates from quote",
        "too short in quote",
        "Failed to get signed quote scope",
        "Invalid QE auth data length",
        "Unsupported DCAP PCK cert format",
    ]) {
        RejectReason::QuoteMalformed
    } else if has(&[
        "CertNotValidYet",
        "in the future",
        "not valid yet",
        "NotValidYet",
    ]) {
        RejectReason::CollateralNotYetValid
    } else if has(&["Expired", "expired"]) {
        RejectReason::CollateralExpired
    } else if has(&["CertRevoked"]) {
        RejectReason::CertRevoked
    } else if has(&["Revoked"]) {
        RejectReason::TcbStatusRejected
    } else if has(&[
        "UnknownIssuer",
        "Failed to load root ca",
        "issued directly by the root",
        // the root CA CRL is signed by the root: a CRL that does not verify means another root
        "CrlSignatureAlgorithmForPublicKey",
        "InvalidCrlSignatureForPublicKey",
    ]) {
        RejectReason::UntrustedRoot
    } else if has(&["No matching TCB level", "below minimum required"]) {
        RejectReason::TcbLevelNotFound
    } else if has(&["TDX module", "SEAMATTRIBUTES"]) {
        RejectReason::TdxModuleRejected
    } else if has(&["TD attributes", "TD migration", "service TD", "SERVTD"]) {
        RejectReason::TdAttributesRejected
    } else if has(&["debug", "Debug"]) {
        RejectReason::DebugTd
    } else if has(&[
        "Signature is invalid",
        "signature is invalid",
        "QE report hash mismatch",
        "BadSignature",
        "InvalidSignature",
    ]) {
        RejectReason::QuoteSignatureInvalid
    } else if has(&[
        "Fmspc mismatch",
        "TcbInfo",
        "TCB Info",
        "TCB info",
        "QeIdentity",
        "QE Identity",
        "CRL",
        "Crl",
        "collateral",
        "certificate",
        "Certificate",
    ]) {
        RejectReason::CollateralInvalid
    } else {
        RejectReason::QuoteVerificationFailed
    };
    AttestationError::new(reason, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_examples() {
        let cases = [
            ("TCBInfo expired", RejectReason::CollateralExpired),
            (
                "CrlExpired { next_update: 1, now: 2 }",
                RejectReason::CollateralExpired,
            ),
            (
                "QE Identity issue date is in the future",
                RejectReason::CollateralNotYetValid,
            ),
            (
                "No matching TCB level found",
                RejectReason::TcbLevelNotFound,
            ),
            (
                "ISV enclave report signature is invalid",
                RejectReason::QuoteSignatureInvalid,
            ),
            ("Failed to decode quote: x", RejectReason::QuoteMalformed),
            ("UnknownIssuer", RejectReason::UntrustedRoot),
            (
                "TCB status is invalid: Revoked",
                RejectReason::TcbStatusRejected,
            ),
            (
                "Reserved bits in TD attributes are set",
                RejectReason::TdAttributesRejected,
            ),
            (
                "TD migration is enabled",
                RejectReason::TdAttributesRejected,
            ),
            (
                "TDX module MRSIGNER mismatch",
                RejectReason::TdxModuleRejected,
            ),
            (
                "QE ISVPRODID mismatch",
                RejectReason::QuoteVerificationFailed,
            ),
        ];
        for (msg, want) in cases {
            assert_eq!(
                classify_dcap_error(anyhow::anyhow!(msg)).reason,
                want,
                "{msg}"
            );
        }
    }

    #[test]
    fn empty_and_oversized_quotes() {
        assert_eq!(
            parse_quote(&[]).unwrap_err().reason,
            RejectReason::InputEmpty
        );
        let big = vec![0u8; MAX_QUOTE_LEN + 1];
        assert_eq!(
            parse_quote(&big).unwrap_err().reason,
            RejectReason::InputTooLarge
        );
        assert_eq!(
            parse_quote(&[4, 0, 2, 0]).unwrap_err().reason,
            RejectReason::QuoteMalformed
        );
    }
}
