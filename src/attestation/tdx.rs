//! Intel TDX (and SGX) DCAP quote verification with dcap-qvl, plus the TCB policy.
//!
//! dcap-qvl does the cryptography (quote signature, QE report, PCK chain, CRLs, TCB info and QE
//! identity signatures, collateral time window) at an explicit `now`; this module maps its
//! errors to typed reasons and applies the configured policy (status, advisories, PCK flags,
//! debug TD, TDX module signer) itself, so each refusal has its own reason.

use dcap_qvl::quote::{Quote, Report};
use dcap_qvl::verify::QuoteVerifier;
use dcap_qvl::{PckCertFlag, QuoteClaims, QuoteCollateralV3, TcbStatus};

use super::config::TcbPolicy;
use super::reason::{AttestationError, RejectReason, Result, check_size, reject};

/// Largest quote accepted (real v4/v5 quotes with an embedded PCK chain are about 5 KiB).
pub const MAX_QUOTE_LEN: usize = 32 * 1024;
/// Largest collateral JSON accepted.
pub const MAX_COLLATERAL_LEN: usize = 256 * 1024;

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

/// A dcap-qvl policy that accepts everything: the TCB policy is applied afterwards with typed
/// reasons, from the same claims.
struct CollectClaims;

impl dcap_qvl::Policy for CollectClaims {
    fn validate(&self, _claims: &QuoteClaims) -> anyhow::Result<()> {
        Ok(())
    }
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
    check_size("quote", raw, MAX_QUOTE_LEN)?;
    let verifier = match root_der {
        Some(der) => QuoteVerifier::new(der.to_vec()),
        None => QuoteVerifier::new_prod(),
    };
    // dcap-qvl's own debug check is disabled so that the refusal carries `debug_td`.
    let claims = verifier
        .allow_debug(true)
        .verify_with_policy(raw, collateral, now, &CollectClaims)
        .map_err(classify_dcap_error)?;
    apply_policy(&claims, policy, allow_debug)?;
    Ok(VerifiedQuote {
        tcb_status: claims.tcb.status.to_string(),
        advisory_ids: claims.tcb.advisory_ids.clone(),
        ppid: claims.platform.pck.ppid.clone(),
        fmspc: claims.platform.pck.fmspc,
        report: claims.report,
    })
}

fn apply_policy(claims: &QuoteClaims, policy: &TcbPolicy, allow_debug: bool) -> Result<()> {
    let status = claims.tcb.status;
    let status_name = status.to_string();
    if status == TcbStatus::Revoked || !policy.accepted_statuses.contains(&status_name) {
        return Err(reject!(TcbStatusRejected, "TCB status {status_name}"));
    }
    if let Some(id) = claims
        .tcb
        .advisory_ids
        .iter()
        .find(|id| policy.rejected_advisory_ids.contains(id))
    {
        return Err(reject!(AdvisoryRejected, "advisory {id}"));
    }
    let pck = &claims.platform.pck;
    for (name, flag, allowed) in [
        (
            "dynamic platform",
            pck.dynamic_platform,
            policy.allow_dynamic_platform,
        ),
        ("cached keys", pck.cached_keys, policy.allow_cached_keys),
        ("SMT", pck.smt_enabled, policy.allow_smt),
    ] {
        if flag == PckCertFlag::True && !allowed {
            return Err(reject!(PlatformFlagRejected, "{name} not allowed"));
        }
    }
    match (&claims.report, TdMeasurements::from_report(&claims.report)) {
        (_, Some(td)) => {
            if claims.tee_type != TEE_TYPE_TDX {
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
