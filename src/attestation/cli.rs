//! Operator commands: `attest verify FILE` and `dev test-pki init DIR`. The binary wires these
//! argument structs into its command tree.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;

use super::reason::{AttestationError, Result, reject};
use super::tdx::{self, TdMeasurements};
use super::{
    Attestation, AttestationConfig, BootInfo, Evidence, Platform, Verified, Verifier,
    VerifyRequest, eventlog, nitro, ratls, versioned,
};

/// Largest input file read by `attest verify`.
const MAX_INPUT_FILE: u64 = 1024 * 1024;

/// `attest verify`: verify a quote, Nitro document, dstack attestation or RA-TLS certificate.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// Input: raw or hex TDX quote, Nitro COSE document, dstack VersionedAttestation (V0/V1),
    /// or RA-TLS certificate (PEM or DER); a regular file, or `-` for standard input (at most
    /// 1 MiB either way).
    pub file: PathBuf,
    /// Collateral JSON (`QuoteCollateralV3`, byte fields hex) for TDX quotes.
    #[arg(long)]
    pub collateral: Option<PathBuf>,
    /// JSON event log to replay against a bare quote (list of events, or a dstack tcb_info
    /// with an `event_log` field).
    #[arg(long)]
    pub event_log: Option<PathBuf>,
    /// Verification time (unix seconds); defaults to now.
    #[arg(long)]
    pub at: Option<u64>,
    /// Print a JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Accept debug TDs and debug enclaves (inspection only).
    #[arg(long)]
    pub insecure_allow_debug: bool,
    /// Also trust the test attestation PKI in this directory.
    #[arg(long)]
    pub insecure_test_pki: Option<PathBuf>,
}

/// The `--json` output of `attest verify`; absent fields are omitted.
#[derive(Debug, Default, Serialize)]
pub struct VerifyOutput {
    /// `ok` or `rejected`.
    pub verdict: &'static str,
    /// Reject reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human detail of the refusal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// `tdx` or `nitro`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tee: Option<&'static str>,
    /// TCB status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcb_status: Option<String>,
    /// Advisory ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advisory_ids: Option<Vec<String>>,
    /// MRTD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mr_td: Option<String>,
    /// RTMR0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtmr0: Option<String>,
    /// RTMR1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtmr1: Option<String>,
    /// RTMR2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtmr2: Option<String>,
    /// RTMR3.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtmr3: Option<String>,
    /// Report data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_data: Option<String>,
    /// Aggregated measurement.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mr_aggregated: Option<String>,
    /// System measurement.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mr_system: Option<String>,
    /// Compose hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compose_hash: Option<String>,
    /// App id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    /// Instance id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Device id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Nitro module id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
    /// Nitro PCR0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pcr0: Option<String>,
    /// Nitro PCR1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pcr1: Option<String>,
    /// Nitro PCR2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pcr2: Option<String>,
}

impl VerifyOutput {
    fn add_td(&mut self, td: &TdMeasurements) {
        self.tee = Some("tdx");
        self.mr_td = Some(hex::encode(td.mr_td));
        let [r0, r1, r2, r3] = td.rtmr.map(hex::encode);
        (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3) = (Some(r0), Some(r1), Some(r2), Some(r3));
        self.report_data = Some(hex::encode(td.report_data));
    }

    fn add_nitro(&mut self, r: &nitro::NitroReport) {
        self.tee = Some("nitro");
        self.module_id = Some(r.module_id.clone());
        self.pcr0 = Some(hex::encode(r.pcr(0)));
        self.pcr1 = Some(hex::encode(r.pcr(1)));
        self.pcr2 = Some(hex::encode(r.pcr(2)));
        self.report_data = r.user_data.as_ref().map(hex::encode);
    }

    fn add_boot_info(&mut self, b: &BootInfo) {
        self.mr_aggregated = Some(hex::encode(&b.mr_aggregated));
        self.mr_system = Some(hex::encode(&b.mr_system));
        self.compose_hash = Some(hex::encode(&b.compose_hash));
        self.app_id = Some(hex::encode(&b.app_id));
        self.instance_id = Some(hex::encode(&b.instance_id));
        self.device_id = Some(hex::encode(&b.device_id));
    }

    fn add_verified(&mut self, v: &Verified) {
        match &v.evidence {
            Evidence::Tdx { quote, td } => {
                self.add_td(td);
                self.tcb_status = Some(quote.tcb_status.clone());
                self.advisory_ids = Some(quote.advisory_ids.clone());
            }
            Evidence::Nitro(r) => self.add_nitro(r),
        }
        self.add_boot_info(&v.boot_info);
    }
}

/// What `attest verify` recognised in its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputKind {
    /// A raw TDX/SGX quote (hex input is decoded first).
    Quote(Vec<u8>),
    /// A Nitro COSE_Sign1 document.
    Nitro(Vec<u8>),
    /// A dstack VersionedAttestation.
    Versioned(Vec<u8>),
    /// An RA-TLS certificate (DER).
    Certificate(Vec<u8>),
}

/// Detects the kind of `input`.
pub fn detect(input: &[u8]) -> Result<InputKind> {
    if input.is_empty() {
        return Err(reject!(InputEmpty, "input is empty"));
    }
    let trimmed = input.trim_ascii();
    if trimmed.starts_with(b"-----BEGIN") {
        return Ok(InputKind::Certificate(ratls::cert_der_from_input(trimmed)?));
    }
    let text = trimmed.strip_prefix(b"0x").unwrap_or(trimmed);
    if text.len() >= 96 && text.iter().all(u8::is_ascii_hexdigit) {
        let raw = hex::decode(text).map_err(|e| reject!(UnknownFormat, "hex: {e}"))?;
        return detect(&raw);
    }
    match input {
        [0x84, 0x44 | 0x40 | 0x58, ..] | [0xd2, 0x84, ..] => Ok(InputKind::Nitro(input.to_vec())),
        [0x00, ..] | [0x80..=0x8f | 0xde | 0xdf, ..] => Ok(InputKind::Versioned(input.to_vec())),
        [0x30, 0x82, ..] => Ok(InputKind::Certificate(input.to_vec())),
        [3..=5, 0x00, 0x02, 0x00, ..] => Ok(InputKind::Quote(input.to_vec())),
        _ => Err(reject!(
            UnknownFormat,
            "not a quote, COSE document, attestation or certificate"
        )),
    }
}

/// Reads at most [`MAX_INPUT_FILE`] bytes of `path` (`-`: standard input). Anything that is not a
/// regular file (a device, a FIFO, a directory) is refused before it is opened, so `/dev/zero`
/// or a FIFO without a writer cannot make it read forever or hang.
fn read_capped(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let unusable = |e: std::io::Error| reject!(UnknownFormat, "{}: {e}", path.display());
    let reader: Box<dyn std::io::Read> = if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let meta = std::fs::metadata(path).map_err(unusable)?;
        if !meta.is_file() {
            return Err(reject!(
                UnknownFormat,
                "{} is not a regular file (pass - to read standard input)",
                path.display()
            ));
        }
        Box::new(std::fs::File::open(path).map_err(unusable)?)
    };
    let mut out = Vec::new();
    reader
        .take(MAX_INPUT_FILE + 1)
        .read_to_end(&mut out)
        .map_err(unusable)?;
    if out.len() as u64 > MAX_INPUT_FILE {
        return Err(reject!(
            InputTooLarge,
            "{} holds more than {MAX_INPUT_FILE} bytes",
            path.display()
        ));
    }
    Ok(out)
}

/// Reads an event log file: a JSON list of events, or an object with an `event_log` field
/// (itself a list or a JSON string, as in dstack's `tcb_info`).
fn read_event_log(path: &Path) -> Result<Vec<eventlog::TdxEvent>> {
    let raw = read_capped(path)?;
    let value: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| reject!(EventLogMalformed, "event log JSON: {e}"))?;
    let list = match value.get("event_log") {
        Some(serde_json::Value::String(s)) => s.clone().into_bytes(),
        Some(v) => serde_json::to_vec(v).unwrap_or_default(),
        None => raw,
    };
    eventlog::parse_full_json_event_log(&list)
}

/// Runs the verification, filling `out` with what could be read even when refused.
fn verify_input(args: &VerifyArgs, out: &mut VerifyOutput) -> Result<()> {
    let input = read_capped(&args.file)?;
    let collateral = match &args.collateral {
        Some(p) => Some(tdx::parse_collateral(&read_capped(p)?)?),
        None => None,
    };
    let now = args.at.unwrap_or_else(crate::clock::unix_secs);
    let config = AttestationConfig {
        insecure_allow_debug: args.insecure_allow_debug,
        insecure_test_pki: args.insecure_test_pki.clone(),
        ..AttestationConfig::default()
    };
    let verifier = Verifier::new(config)?;
    let req = VerifyRequest {
        now,
        expected_report_data: None,
        collateral: collateral.as_ref(),
        os_image_hash: None,
    };
    match detect(&input)? {
        InputKind::Quote(quote) => {
            let parsed = tdx::parse_quote(&quote)?;
            if let Some(td) = TdMeasurements::from_report(&parsed.report) {
                out.add_td(&td);
            }
            if let Some(path) = &args.event_log {
                let att = Attestation {
                    platform: Platform::Tdx {
                        quote,
                        event_log: read_event_log(path)?,
                    },
                    runtime_events: Vec::new(),
                    report_data: [0; 64],
                    config: String::new(),
                };
                let v = verifier.verify_attestation(&att, &req)?;
                out.add_verified(&v);
                return Ok(());
            }
            let collateral = collateral.as_ref().ok_or_else(|| {
                reject!(CollateralMissing, "--collateral is required for a quote")
            })?;
            let v = verifier.verify_quote(&quote, collateral, now)?;
            if let Some(td) = v.td() {
                out.add_td(&td);
            } else if let Some(sgx) = v.report.as_sgx() {
                out.report_data = Some(hex::encode(sgx.report_data));
            }
            out.tcb_status = Some(v.tcb_status);
            out.advisory_ids = Some(v.advisory_ids);
            Ok(())
        }
        InputKind::Nitro(doc) => {
            out.add_nitro(&nitro::parse_document(&doc)?.report);
            let r = verifier.verify_nitro_document(&doc, now, None)?;
            out.add_nitro(&r);
            Ok(())
        }
        InputKind::Versioned(raw) => {
            let att = versioned::parse(&raw)?;
            describe_unverified(&att, out);
            let v = verifier.verify_attestation(&att, &req)?;
            out.add_verified(&v);
            Ok(())
        }
        InputKind::Certificate(der) => {
            let cert = ratls::parse_cert(&der)?;
            let att = cert.attestation()?;
            describe_unverified(&att, out);
            let (_, v) = verifier.verify_ratls_cert(&der, now, collateral.as_ref(), None)?;
            out.add_verified(&v);
            Ok(())
        }
    }
}

/// Fills the measurements that parse without verification (so refusals still show them).
fn describe_unverified(att: &Attestation, out: &mut VerifyOutput) {
    match &att.platform {
        Platform::Tdx { quote, .. } => {
            if let Some(td) = tdx::parse_quote(quote)
                .ok()
                .and_then(|q| TdMeasurements::from_report(&q.report))
            {
                out.add_td(&td);
            }
        }
        Platform::NitroEnclave { document } => {
            if let Ok(doc) = nitro::parse_document(document) {
                out.add_nitro(&doc.report);
            }
        }
    }
}

/// Verifies and returns the exit code (0 ok, 1 rejected, 2 unusable) with the output object.
pub fn evaluate(args: &VerifyArgs) -> (u8, VerifyOutput) {
    let mut out = VerifyOutput::default();
    let code = match verify_input(args, &mut out) {
        Ok(()) => {
            out.verdict = "ok";
            0
        }
        Err(AttestationError { reason, detail }) => {
            out.verdict = "rejected";
            out.reason = Some(reason.to_string());
            out.detail = Some(detail);
            if reason.is_input_unusable() { 2 } else { 1 }
        }
    };
    (code, out)
}

/// `attest verify`: prints the verdict; exits 0 when ok, 1 when rejected, 2 when unusable.
pub fn run_verify(args: &VerifyArgs) -> ExitCode {
    let (code, out) = evaluate(args);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        print_human(&out);
    }
    ExitCode::from(code)
}

fn print_human(out: &VerifyOutput) {
    match (&out.reason, &out.detail) {
        (Some(r), Some(d)) => println!("verdict: REJECTED ({r})\ndetail:  {d}"),
        _ => println!("verdict: OK"),
    }
    let value = serde_json::to_value(out).unwrap_or_default();
    if let Some(map) = value.as_object() {
        for (k, v) in map {
            if matches!(k.as_str(), "verdict" | "reason" | "detail") {
                continue;
            }
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("{k:<14} {v}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection() {
        assert!(matches!(
            detect(&[0x84, 0x44, 0xa1]).unwrap(),
            InputKind::Nitro(_)
        ));
        assert!(matches!(
            detect(&[0xd2, 0x84]).unwrap(),
            InputKind::Nitro(_)
        ));
        assert!(matches!(
            detect(&[0x00, 0x00]).unwrap(),
            InputKind::Versioned(_)
        ));
        assert!(matches!(
            detect(&[4, 0, 2, 0, 0x81]).unwrap(),
            InputKind::Quote(_)
        ));
        let hex_quote = format!("0x{}", hex::encode([4u8, 0, 2, 0, 0x81, 0, 0, 0].repeat(8)));
        assert!(matches!(
            detect(hex_quote.as_bytes()).unwrap(),
            InputKind::Quote(_)
        ));
        assert_eq!(
            detect(b"hello").unwrap_err().reason,
            super::super::RejectReason::UnknownFormat
        );
        assert_eq!(
            detect(b"").unwrap_err().reason,
            super::super::RejectReason::InputEmpty
        );
    }
}
