//! The closed set of reasons an attestation is refused, and the module's error type.

use std::fmt;

/// Why an attestation was refused (or could not be examined).
///
/// One closed enum: it is the error kind, the `reason` metric label and the `reason` field of the
/// `attestation verification failed` log line, so it must never carry data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// The input exceeds the size cap for its kind.
    InputTooLarge,
    /// The input is empty.
    InputEmpty,
    /// The input is not any format this module understands.
    UnknownFormat,
    /// A TDX/SGX quote could not be parsed.
    QuoteMalformed,
    /// The quote is not a TDX quote (e.g. SGX) where TDX is required.
    QuoteNotTdx,
    /// A quote, QE report or collateral signature did not verify.
    QuoteSignatureInvalid,
    /// A certificate chain does not lead to the configured trust anchor.
    UntrustedRoot,
    /// A certificate in a chain is invalid (bad signature, malformed, wrong usage).
    CertChainInvalid,
    /// A certificate in a chain has been revoked.
    CertRevoked,
    /// Collateral is missing for the quote.
    CollateralMissing,
    /// The collateral (TCB info, QE identity, CRL, certificates) is expired at `now`.
    CollateralExpired,
    /// The collateral (or a certificate) is not yet valid at `now`.
    CollateralNotYetValid,
    /// The collateral is malformed or does not match the quote (FMSPC, TEE type).
    CollateralInvalid,
    /// The collateral could not be fetched.
    CollateralUnavailable,
    /// No TCB level in the collateral matches the platform.
    TcbLevelNotFound,
    /// The platform TCB status is not in the accepted set (or is `Revoked`).
    TcbStatusRejected,
    /// The platform carries an advisory id the policy rejects.
    AdvisoryRejected,
    /// The PCK certificate flags (dynamic platform, cached keys, SMT) are not allowed by policy.
    PlatformFlagRejected,
    /// The TD has the DEBUG (or a profiling) attribute set.
    DebugTd,
    /// The TD attributes are not acceptable (migratable, reserved bits, service-TD binding).
    TdAttributesRejected,
    /// The quote failed verification for a reason not classified more precisely.
    QuoteVerificationFailed,
    /// The TDX module signer or the TD's service-TD binding is not acceptable.
    TdxModuleRejected,
    /// The event log could not be parsed.
    EventLogMalformed,
    /// Replaying the event log does not reproduce the quoted RTMRs.
    RtmrMismatch,
    /// A runtime event digest does not match its name and payload.
    EventDigestMismatch,
    /// A required dstack identity event is missing or malformed.
    IdentityMissing,
    /// The quote's `mr_config_id` does not carry the compose hash of the event log.
    ComposeHashMismatch,
    /// The report data does not equal the expected binding.
    ReportDataMismatch,
    /// A dstack `VersionedAttestation` could not be parsed.
    AttestationMalformed,
    /// The attestation is for a TEE variant this verifier does not accept.
    UnsupportedTee,
    /// A Nitro COSE_Sign1 document could not be parsed.
    NitroDocumentMalformed,
    /// The Nitro COSE signature does not verify with the leaf key.
    NitroSignatureInvalid,
    /// The Nitro document uses an algorithm or digest other than ES384/SHA384.
    NitroAlgorithmUnsupported,
    /// A PCR value is not in the configured allow-list.
    PcrNotAllowed,
    /// The Nitro enclave runs in debug mode (PCR0-2 all zero).
    DebugEnclave,
    /// An RA-TLS certificate could not be parsed.
    CertMalformed,
    /// An RA-TLS certificate carries no attestation extension.
    CertNoAttestation,
    /// An RA-TLS certificate is outside its validity window at `now`.
    CertExpired,
    /// The verifier configuration is unusable (bad test PKI, bad PCR hex...).
    ConfigInvalid,
}

impl RejectReason {
    /// Every reason, for metric pre-registration and documentation.
    pub const ALL: &'static [RejectReason] = &[
        Self::InputTooLarge,
        Self::InputEmpty,
        Self::UnknownFormat,
        Self::QuoteMalformed,
        Self::QuoteNotTdx,
        Self::QuoteSignatureInvalid,
        Self::UntrustedRoot,
        Self::CertChainInvalid,
        Self::CertRevoked,
        Self::CollateralMissing,
        Self::CollateralExpired,
        Self::CollateralNotYetValid,
        Self::CollateralInvalid,
        Self::CollateralUnavailable,
        Self::TcbLevelNotFound,
        Self::TcbStatusRejected,
        Self::AdvisoryRejected,
        Self::PlatformFlagRejected,
        Self::DebugTd,
        Self::TdAttributesRejected,
        Self::QuoteVerificationFailed,
        Self::TdxModuleRejected,
        Self::EventLogMalformed,
        Self::RtmrMismatch,
        Self::EventDigestMismatch,
        Self::IdentityMissing,
        Self::ComposeHashMismatch,
        Self::ReportDataMismatch,
        Self::AttestationMalformed,
        Self::UnsupportedTee,
        Self::NitroDocumentMalformed,
        Self::NitroSignatureInvalid,
        Self::NitroAlgorithmUnsupported,
        Self::PcrNotAllowed,
        Self::DebugEnclave,
        Self::CertMalformed,
        Self::CertNoAttestation,
        Self::CertExpired,
        Self::ConfigInvalid,
    ];

    /// The snake_case name used in metrics, logs and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InputTooLarge => "input_too_large",
            Self::InputEmpty => "input_empty",
            Self::UnknownFormat => "unknown_format",
            Self::QuoteMalformed => "quote_malformed",
            Self::QuoteNotTdx => "quote_not_tdx",
            Self::QuoteSignatureInvalid => "quote_signature_invalid",
            Self::UntrustedRoot => "untrusted_root",
            Self::CertChainInvalid => "cert_chain_invalid",
            Self::CertRevoked => "cert_revoked",
            Self::CollateralMissing => "collateral_missing",
            Self::CollateralExpired => "collateral_expired",
            Self::CollateralNotYetValid => "collateral_not_yet_valid",
            Self::CollateralInvalid => "collateral_invalid",
            Self::CollateralUnavailable => "collateral_unavailable",
            Self::TcbLevelNotFound => "tcb_level_not_found",
            Self::TcbStatusRejected => "tcb_status_rejected",
            Self::AdvisoryRejected => "advisory_rejected",
            Self::PlatformFlagRejected => "platform_flag_rejected",
            Self::DebugTd => "debug_td",
            Self::TdAttributesRejected => "td_attributes_rejected",
            Self::QuoteVerificationFailed => "quote_verification_failed",
            Self::TdxModuleRejected => "tdx_module_rejected",
            Self::EventLogMalformed => "event_log_malformed",
            Self::RtmrMismatch => "rtmr_mismatch",
            Self::EventDigestMismatch => "event_digest_mismatch",
            Self::IdentityMissing => "identity_missing",
            Self::ComposeHashMismatch => "compose_hash_mismatch",
            Self::ReportDataMismatch => "report_data_mismatch",
            Self::AttestationMalformed => "attestation_malformed",
            Self::UnsupportedTee => "unsupported_tee",
            Self::NitroDocumentMalformed => "nitro_document_malformed",
            Self::NitroSignatureInvalid => "nitro_signature_invalid",
            Self::NitroAlgorithmUnsupported => "nitro_algorithm_unsupported",
            Self::PcrNotAllowed => "pcr_not_allowed",
            Self::DebugEnclave => "debug_enclave",
            Self::CertMalformed => "cert_malformed",
            Self::CertNoAttestation => "cert_no_attestation",
            Self::CertExpired => "cert_expired",
            Self::ConfigInvalid => "config_invalid",
        }
    }

    /// Whether the input itself is unusable (as opposed to well-formed but refused); the CLI
    /// exits 2 for these.
    pub fn is_input_unusable(self) -> bool {
        matches!(
            self,
            Self::InputTooLarge
                | Self::InputEmpty
                | Self::UnknownFormat
                | Self::CollateralMissing
                | Self::ConfigInvalid
                | Self::QuoteMalformed
                | Self::NitroDocumentMalformed
                | Self::AttestationMalformed
                | Self::CertMalformed
                | Self::CertNoAttestation
                | Self::EventLogMalformed
        )
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl prometheus_client::encoding::EncodeLabelValue for RejectReason {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

/// The module's error: a typed reason plus a human detail (never used as a label).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct AttestationError {
    /// The typed reason.
    pub reason: RejectReason,
    /// Free-form detail for humans and logs.
    pub detail: String,
}

impl AttestationError {
    /// Builds an error from a reason and a detail message.
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }

    /// What a refused caller is told: the reason, plus the detail for the TCB policy refusals,
    /// whose detail (the status or advisory) is what the platform operator has to fix.
    pub fn caller_message(&self) -> String {
        match self.reason {
            RejectReason::TcbStatusRejected | RejectReason::AdvisoryRejected => {
                format!("{}: {}", self.reason, self.detail)
            }
            _ => self.reason.to_string(),
        }
    }
}

/// Shorthand result type of this module.
pub type Result<T, E = AttestationError> = std::result::Result<T, E>;

/// Builds an [`AttestationError`]: `reject!(Reason, "fmt", args..)`.
macro_rules! reject {
    ($reason:ident, $($arg:tt)+) => {
        $crate::attestation::reason::AttestationError::new(
            $crate::attestation::reason::RejectReason::$reason,
            format!($($arg)+),
        )
    };
}
pub(crate) use reject;

/// Refuses input longer than `cap` bytes, and empty input.
pub(crate) fn check_size(what: &str, input: &[u8], cap: usize) -> Result<()> {
    if input.is_empty() {
        return Err(reject!(InputEmpty, "{what} is empty"));
    }
    if input.len() > cap {
        return Err(reject!(
            InputTooLarge,
            "{what} is {} bytes, the cap is {cap}",
            input.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_snake_case() {
        let mut seen = std::collections::BTreeSet::new();
        for r in RejectReason::ALL {
            let s = r.as_str();
            assert!(s.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{s}");
            assert!(seen.insert(s), "duplicate {s}");
            assert_eq!(r.to_string(), s);
        }
    }
}
