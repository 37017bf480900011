//! Attestation verification: Intel TDX quotes, dstack event logs and identity, AWS Nitro Enclave
//! documents, and RA-TLS certificates.
//!
//! This module owns everything between "bytes a workload presented" and "the `BootInfo` the
//! authorization step consumes". Parsing, verification and derivation are pure functions of
//! their inputs and an explicit `now`; I/O lives at the edges: the PCCS client and the collateral
//! source ([`collateral`]), a test PKI's root and collateral ([`testroot`]) and the operator
//! commands ([`cli`]).
//!
//! Flow of [`Verifier::verify_attestation`] (and [`Verifier::verify_ratls_cert`], which first
//! reads the certificate's 62397 extensions and derives the expected report data from its key):
//! 1. TDX: the quote is verified with dcap-qvl at `now` against collateral ([`tdx`]), the TCB
//!    policy applied, debug TDs refused. Nitro: the COSE document is verified against the AWS
//!    root G1, pinned by SHA-256 ([`nitro`]), and the PCR policy applied.
//! 2. The report data must equal the expected binding (for RA-TLS:
//!    `sha512("ratls-cert:" ‖ SPKI)`, see [`ratls`]).
//! 3. TDX: the event log is replayed and compared with the quoted RTMR3 (and RTMR0-2 for a
//!    complete boot log), runtime-event digests checked ([`eventlog`]).
//! 4. The boot identity is derived ([`identity`]), twice: from the quoted registers, and at
//!    boot time (RTMR3 replayed only up to `boot-mr-done`, key provider ignored).
//!
//! Every refusal is an [`AttestationError`] with a closed [`RejectReason`], used as the metric
//! label ([`metrics`]) and the `reason` field of the `attestation verification failed` log line.
//! A test attestation PKI ([`testroot`]; issued by `sim::testpki`) is trusted only through
//! `insecure_test_pki`.

pub mod cli;
pub mod collateral;
pub mod config;
pub mod eventlog;
pub mod identity;
pub mod metrics;
pub mod nitro;
pub mod ratls;
pub mod reason;
pub(crate) mod scale;
pub mod tdx;
pub mod testroot;
pub mod versioned;

use dcap_qvl::QuoteCollateralV3;

pub use config::AttestationConfig;
pub use identity::{BootInfo, TeeVariant};
pub use metrics::{AttestationMetrics, TeeLabel};
pub use reason::{AttestationError, RejectReason, Result};
pub use versioned::{Attestation, Platform};

use identity::DstackEvents;
use nitro::{NitroReport, NitroVerifier};
use reason::reject;
use tdx::{TdMeasurements, VerifiedQuote};

/// What a verified attestation proved, per TEE.
#[derive(Debug, Clone)]
pub enum Evidence {
    /// A TDX quote (with its TD measurements).
    Tdx {
        /// The verified quote.
        quote: Box<VerifiedQuote>,
        /// Its TD fields.
        td: Box<TdMeasurements>,
    },
    /// A Nitro Enclave document.
    Nitro(Box<NitroReport>),
}

impl Evidence {
    /// The TEE label.
    pub fn tee(&self) -> TeeLabel {
        match self {
            Self::Tdx { .. } => TeeLabel::tdx,
            Self::Nitro(_) => TeeLabel::nitro,
        }
    }
}

/// A verified attestation and the identity derived from it.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The verified evidence.
    pub evidence: Evidence,
    /// The boot identity for authorization, from the quoted measurements.
    pub boot_info: BootInfo,
    /// The identity at the end of boot: RTMR3 replayed only up to `boot-mr-done`, identity
    /// events from that prefix, the key provider ignored. What a request made after boot
    /// (SignCert) is authorized with, since the app may extend RTMR3 later.
    pub boot_time: BootInfo,
}

/// The inputs of one verification besides the attestation.
#[derive(Debug, Clone, Copy)]
pub struct VerifyRequest<'a> {
    /// Verification time, unix seconds.
    pub now: u64,
    /// The report data the attestation must carry (e.g. the RA-TLS binding); `None` only
    /// for inspection tools.
    pub expected_report_data: Option<&'a [u8; 64]>,
    /// TDX collateral for the quote.
    pub collateral: Option<&'a QuoteCollateralV3>,
    /// `os_image_hash` from the host's vm_config; when `None`, the attestation's own config
    /// claim is used.
    pub os_image_hash: Option<&'a [u8]>,
}

/// The attestation verifier: configuration plus trust anchors and caches. Cheap to share.
#[derive(Debug)]
pub struct Verifier {
    config: AttestationConfig,
    test_root_der: Option<Vec<u8>>,
    nitro: NitroVerifier,
}

impl Verifier {
    /// Builds a verifier; loads the test PKI root when `insecure_test_pki` is set.
    pub fn new(config: AttestationConfig) -> Result<Self> {
        let test_root = match &config.insecure_test_pki {
            Some(dir) => Some(testroot::load_root_der(dir)?),
            None => None,
        };
        Self::with_test_root(config, test_root)
    }

    /// Builds a verifier with an explicit extra (test) TDX root.
    pub fn with_test_root(
        config: AttestationConfig,
        test_root_der: Option<Vec<u8>>,
    ) -> Result<Self> {
        let nitro = NitroVerifier::new(&config.nitro, config.insecure_allow_debug)?;
        Ok(Self {
            config,
            test_root_der,
            nitro,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AttestationConfig {
        &self.config
    }

    /// The TDX root for this collateral: the test root only when it is configured and the
    /// collateral's TCB signing chain is the test PKI's; Intel's production root otherwise.
    fn tdx_root_for(&self, collateral: &QuoteCollateralV3) -> Option<&[u8]> {
        let test_root = self.test_root_der.as_deref()?;
        let chain =
            x509_parser::pem::Pem::iter_from_buffer(collateral.tcb_info_issuer_chain.as_bytes());
        let uses_test_root = chain
            .filter_map(|p| p.ok())
            .any(|p| p.contents == test_root);
        uses_test_root.then_some(test_root)
    }

    /// What a TDX quote proves without collateral (see [`tdx::preverify_quote`]): its PCK chain
    /// ends in Intel's root, or in the test root when one is configured.
    pub fn preverify_quote(&self, quote: &[u8], now: u64) -> Result<()> {
        use sha2::Digest as _;
        let mut roots = vec![tdx::INTEL_ROOT_SHA256];
        roots.extend(
            self.test_root_der
                .as_deref()
                .map(|der| <[u8; 32]>::from(sha2::Sha256::digest(der))),
        );
        tdx::preverify_quote(quote, now, &roots).map(drop)
    }

    /// Verifies a bare TDX/SGX quote and applies the TCB policy.
    pub fn verify_quote(
        &self,
        quote: &[u8],
        collateral: &QuoteCollateralV3,
        now: u64,
    ) -> Result<VerifiedQuote> {
        tdx::verify_quote(
            quote,
            collateral,
            now,
            self.tdx_root_for(collateral),
            &self.config.tcb,
            self.config.insecure_allow_debug,
        )
    }

    /// Verifies a bare Nitro document.
    pub fn verify_nitro_document(
        &self,
        document: &[u8],
        now: u64,
        expected_user_data: Option<&[u8]>,
    ) -> Result<NitroReport> {
        self.nitro.verify(document, now, expected_user_data)
    }

    /// Verifies a dstack attestation end to end and derives its boot info.
    pub fn verify_attestation(
        &self,
        att: &Attestation,
        req: &VerifyRequest<'_>,
    ) -> Result<Verified> {
        let os_image_hash = match req.os_image_hash {
            Some(h) => h.to_vec(),
            None => identity::os_image_hash_from_config(&att.config)
                .map_err(|e| reject!(AttestationMalformed, "the attestation's config: {e}"))?
                .map(|h| h.to_vec())
                .unwrap_or_default(),
        };
        match &att.platform {
            Platform::Tdx { quote, event_log } => {
                let collateral = req
                    .collateral
                    .ok_or_else(|| reject!(CollateralMissing, "no collateral for the TDX quote"))?;
                let verified = self.verify_quote(quote, collateral, req.now)?;
                let td = verified
                    .td()
                    .ok_or_else(|| reject!(QuoteNotTdx, "dstack attestations need a TD quote"))?;
                if let Some(expected) = req.expected_report_data
                    && td.report_data != *expected
                {
                    return Err(reject!(
                        ReportDataMismatch,
                        "quote report_data does not bind"
                    ));
                }
                eventlog::verify_replay(event_log, &td.rtmr)?;
                let identity_at = |td: &TdMeasurements, events: DstackEvents| {
                    identity::tdx_boot_info(
                        td,
                        &events,
                        &verified.ppid,
                        &verified.tcb_status,
                        &verified.advisory_ids,
                        &os_image_hash,
                    )
                };
                let boot_info = identity_at(&td, DstackEvents::from_tdx_log(event_log))?;
                let boot_log = eventlog::boot_prefix(event_log, |e| {
                    e.is_runtime() && e.event == eventlog::BOOT_MR_DONE
                });
                let mut boot_td = td.clone();
                boot_td.rtmr[3] = eventlog::replay(boot_log)?.0[3];
                let boot_time = identity_at(
                    &boot_td,
                    DstackEvents::from_tdx_log(boot_log).at_boot_time(),
                )?;
                Ok(Verified {
                    evidence: Evidence::Tdx {
                        quote: Box::new(verified),
                        td: Box::new(td),
                    },
                    boot_info,
                    boot_time,
                })
            }
            Platform::NitroEnclave { document } => {
                // user_data carries the report data; it must also be what the wrapper states
                let expected = req.expected_report_data.unwrap_or(&att.report_data);
                let report = self.nitro.verify(document, req.now, Some(expected))?;
                let (p0, p1, p2) = (report.pcr(0), report.pcr(1), report.pcr(2));
                let identity_of = |events: DstackEvents| {
                    identity::nitro_boot_info([&p0, &p1, &p2], &events, &os_image_hash)
                };
                let boot_info = identity_of(DstackEvents::from_runtime(&att.runtime_events))?;
                let boot_events = eventlog::boot_prefix(&att.runtime_events, |e| {
                    e.event == eventlog::BOOT_MR_DONE
                });
                // the PCRs are fixed at launch: only the identity events differ at boot time
                let boot_time =
                    identity_of(DstackEvents::from_runtime(boot_events).at_boot_time())?;
                Ok(Verified {
                    evidence: Evidence::Nitro(Box::new(report)),
                    boot_info,
                    boot_time,
                })
            }
        }
    }

    /// Verifies an RA-TLS certificate (DER): its attestation must verify and carry
    /// `sha512("ratls-cert:" ‖ SPKI)` as report data.
    pub fn verify_ratls_cert(
        &self,
        der: &[u8],
        now: u64,
        collateral: Option<&QuoteCollateralV3>,
        os_image_hash: Option<&[u8]>,
    ) -> Result<(ratls::RaTlsCert, Verified)> {
        let cert = ratls::parse_cert(der)?;
        cert.check_valid_at(now)?;
        let att = cert.attestation()?;
        let expected = cert.expected_report_data();
        let verified = self.verify_attestation(
            &att,
            &VerifyRequest {
                now,
                expected_report_data: Some(&expected),
                collateral,
                os_image_hash,
            },
        )?;
        Ok((cert, verified))
    }
}

/// The TEE an attestation claims (for labelling refusals before verification completes).
pub fn tee_of(att: &Attestation) -> TeeLabel {
    match att.platform {
        Platform::Tdx { .. } => TeeLabel::tdx,
        Platform::NitroEnclave { .. } => TeeLabel::nitro,
    }
}
