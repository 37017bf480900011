//! `[attestation]` configuration: TCB policy, collateral source, Nitro PCR policy, insecure switches.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default PCCS (Phala's, as upstream dstack uses).
pub const DEFAULT_PCCS_URL: &str = "https://pccs.phala.network";

/// Attestation verifier settings. `Default` is the secure configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttestationConfig {
    /// TCB policy applied to verified TDX quotes.
    pub tcb: TcbPolicy,
    /// PCCS base URL (Phala's PCCS by default; Intel PCS `https://api.trustedservices.intel.com`
    /// also works).
    pub pccs_url: String,
    /// Refresh cached collateral this long before its `nextUpdate`.
    #[serde(with = "humantime_serde")]
    pub collateral_refresh_margin: Duration,
    /// PCCS request timeout.
    #[serde(with = "humantime_serde")]
    pub collateral_fetch_timeout: Duration,
    /// PCCS fetches in progress at once; a request needing another is refused at once
    /// (`collateral_unavailable`), never queued.
    pub collateral_max_concurrent_fetches: usize,
    /// A platform whose fetch failed is not fetched again for this long (its requests are
    /// refused, or served a still-valid cached set).
    #[serde(with = "humantime_serde")]
    pub collateral_failure_ttl: Duration,
    /// Nitro Enclave PCR allow-list (empty: any PCR value is accepted).
    pub nitro: NitroPolicy,
    /// Accept debug TDs and debug enclaves. Never in production.
    pub insecure_allow_debug: bool,
    /// Trust the test attestation PKI stored in this directory as an additional Intel root.
    /// Never in production.
    pub insecure_test_pki: Option<PathBuf>,
}

impl Default for AttestationConfig {
    fn default() -> Self {
        Self {
            tcb: TcbPolicy::default(),
            pccs_url: DEFAULT_PCCS_URL.to_owned(),
            collateral_refresh_margin: Duration::from_secs(6 * 3600),
            collateral_fetch_timeout: Duration::from_secs(10),
            collateral_max_concurrent_fetches: 4,
            collateral_failure_ttl: Duration::from_secs(30),
            nitro: NitroPolicy::default(),
            insecure_allow_debug: false,
            insecure_test_pki: None,
        }
    }
}

impl AttestationConfig {
    /// Problems of the section, each with its fix: a test PKI directory must hold a test PKI
    /// (start-up reads it, so `config check` says so first).
    pub fn problems(&self) -> Vec<crate::problem::Problem> {
        let mut out = Vec::new();
        if self.collateral_max_concurrent_fetches == 0 {
            out.push(crate::problem::Problem {
                key: "attestation.collateral_max_concurrent_fetches".into(),
                problem: "must be at least 1".into(),
                fix: "use 4 (the default)".into(),
            });
        }
        if let Some(dir) = &self.insecure_test_pki {
            let root = dir.join(super::testroot::ROOT_CERT_DER);
            if !root.is_file() {
                out.push(crate::problem::Problem {
                    key: "attestation.insecure_test_pki".into(),
                    problem: format!(
                        "{} holds no test PKI ({} is missing)",
                        dir.display(),
                        root.display()
                    ),
                    fix: "create one with `keywarden dev test-pki init DIR`, or point at an existing one"
                        .into(),
                });
            }
        }
        out
    }

    /// The insecure switches and whether each is on, for startup WARN lines.
    pub fn insecure_switches(&self) -> Vec<(&'static str, bool)> {
        vec![
            (
                "attestation.insecure_allow_debug",
                self.insecure_allow_debug,
            ),
            (
                "attestation.insecure_test_pki",
                self.insecure_test_pki.is_some(),
            ),
        ]
    }
}

/// Which verified TCB states are accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcbPolicy {
    /// Accepted TCB status strings as Intel spells them (`UpToDate`, `SWHardeningNeeded`, ...).
    /// `Revoked` is always refused.
    pub accepted_statuses: Vec<String>,
    /// Advisory ids (`INTEL-SA-xxxxx`) that cause a refusal.
    pub rejected_advisory_ids: Vec<String>,
    /// Accept PCK certificates with the dynamic-platform flag (set on every cloud host).
    pub allow_dynamic_platform: bool,
    /// Accept PCK certificates with the cached-keys flag (set on every cloud host).
    pub allow_cached_keys: bool,
    /// Accept platforms with SMT enabled (set on every cloud host).
    pub allow_smt: bool,
}

impl Default for TcbPolicy {
    fn default() -> Self {
        Self {
            // upstream dstack accepts these two; anything out of date needs an explicit choice
            accepted_statuses: vec!["UpToDate".into(), "SWHardeningNeeded".into()],
            rejected_advisory_ids: Vec::new(),
            allow_dynamic_platform: true,
            allow_cached_keys: true,
            allow_smt: true,
        }
    }
}

/// Nitro Enclave measurement policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NitroPolicy {
    /// Allowed PCR0 values (lowercase hex, 48 bytes); empty = any.
    pub allowed_pcr0: Vec<String>,
    /// Allowed PCR1 values; empty = any.
    pub allowed_pcr1: Vec<String>,
    /// Allowed PCR2 values; empty = any.
    pub allowed_pcr2: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_secure() {
        let c = AttestationConfig::default();
        assert!(c.insecure_switches().iter().all(|(_, on)| !on));
        assert!(!c.insecure_allow_debug);
        assert!(c.insecure_test_pki.is_none());
        assert!(!c.tcb.accepted_statuses.iter().any(|s| s == "Revoked"));
        assert!(
            !c.tcb
                .accepted_statuses
                .iter()
                .any(|s| s.contains("OutOfDate"))
        );
        assert_eq!(c.pccs_url, DEFAULT_PCCS_URL);
    }

    #[test]
    fn toml_roundtrip_and_unknown_fields() {
        let c = AttestationConfig::default();
        let s = toml::to_string(&c).unwrap();
        let back: AttestationConfig = toml::from_str(&s).unwrap();
        assert_eq!(back, c);
        assert!(toml::from_str::<AttestationConfig>("bogus = 1").is_err());
        let partial: AttestationConfig = toml::from_str("insecure_allow_debug = true").unwrap();
        assert!(partial.insecure_allow_debug);
        assert_eq!(partial.tcb, TcbPolicy::default());
    }
}
