//! The `[kms]` section (root keys, RPC certificate, request limits, OS images, canaries) and the
//! `[auth]` section (who authorizes boots).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::problem::{Problem, http_url};
use crate::secret::SecretRef;

/// The `[kms]` configuration section.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KmsConfig {
    /// DNS name(s) the RPC server certificate is issued for.
    pub domains: Vec<String>,
    /// Secret (`env:VAR` / `file:PATH`) under which key files are encrypted at rest.
    pub key_encryption_key: Option<SecretRef>,
    /// KMS requests processed at once; more wait in the queue.
    pub max_concurrent_requests: usize,
    /// Requests allowed to wait for a slot; beyond it, requests are answered 503 at once.
    pub max_queued_requests: usize,
    /// Known OS images: `os_image_hash` → expected MRTD and RTMR0-2 of a TDX boot.
    pub os_images: Vec<super::osimage::OsImage>,
    /// Accept a TDX boot whatever OS image it claims (no binding of `os_image_hash` to MRTD/RTMR0-2).
    pub insecure_skip_os_image_check: bool,
    /// Hand the root keys to another attested KMS that `isKmsAllowed` admits (`GetKmsKey`).
    pub allow_kms_replication: bool,
    /// App ids (hex, 20 bytes) that must never receive keys: a request from one is refused and
    /// audited as a security incident.
    pub canary_app_ids: Vec<String>,
    /// Attest the KMS itself as a simulated guest of the test PKI (`attestation.insecure_test_pki`)
    /// running the simulated OS image, and gate every key release on its own `isKmsAllowed`.
    pub insecure_self_attest_with_test_pki: bool,
    /// How the KMS attests itself: `none`, or `guest_agent` (the dstack guest agent of the CVM it
    /// runs in; every key release is then gated on its own `isKmsAllowed`).
    pub self_attestation: SelfAttestation,
    /// The guest agent: `unix:/path` or an `http://` base URL; the standard sockets when absent.
    pub guest_agent: Option<String>,
}

/// `kms.self_attestation`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SelfAttestation {
    /// The KMS does not attest itself.
    #[default]
    None,
    /// The dstack guest agent of the CVM the KMS runs in.
    GuestAgent,
}

impl Default for KmsConfig {
    fn default() -> Self {
        Self {
            domains: vec!["localhost".into()],
            key_encryption_key: None,
            max_concurrent_requests: 32,
            max_queued_requests: 256,
            canary_app_ids: Vec::new(),
            allow_kms_replication: false,
            os_images: Vec::new(),
            insecure_skip_os_image_check: false,
            insecure_self_attest_with_test_pki: false,
            self_attestation: SelfAttestation::None,
            guest_agent: None,
        }
    }
}

impl KmsConfig {
    /// `canary_app_ids` as 20-byte ids; `Err` names the first entry that is not 40 hex digits
    /// (`0x` optional). Validation and the KMS both read the list through this.
    pub fn canary_ids(&self) -> Result<Vec<Vec<u8>>, String> {
        self.canary_app_ids
            .iter()
            .map(|id| {
                hex::decode(id.strip_prefix("0x").unwrap_or(id))
                    .ok()
                    .filter(|b| b.len() == 20)
                    .ok_or_else(|| id.clone())
            })
            .collect()
    }
}

impl KmsConfig {
    /// Problems of the section, each with its fix; `test_pki` tells whether
    /// `attestation.insecure_test_pki` is set (self-attestation needs it).
    pub fn problems(&self, test_pki: bool) -> Vec<Problem> {
        let mut out = Vec::new();
        if self.insecure_self_attest_with_test_pki && self.self_attestation != SelfAttestation::None
        {
            out.push(Problem::new(
                "kms.self_attestation",
                "is set together with kms.insecure_self_attest_with_test_pki",
                "choose one way for the KMS to attest itself",
            ));
        }
        if let Some(agent) = &self.guest_agent
            && !agent.starts_with("unix:/")
        {
            out.extend(http_url(
                "kms.guest_agent",
                "is",
                agent,
                "write unix:/var/run/dstack.sock or the agent's http:// base URL",
            ));
        }
        if self.insecure_self_attest_with_test_pki && !test_pki {
            out.push(Problem::new(
                "kms.insecure_self_attest_with_test_pki",
                "needs a test PKI to attest with, and none is configured",
                "set attestation.insecure_test_pki (serve --insecure-test-pki DIR), or turn this off",
            ));
        }
        if self.domains.is_empty() || self.domains.iter().any(|d| d.trim().is_empty()) {
            out.push(Problem::new(
                "kms.domains",
                "must name at least one non-empty DNS name",
                "list the names clients use to reach the KMS, e.g. [\"kms.example.com\"]",
            ));
        }
        if let Err(e) = super::osimage::OsImagePolicy::new(&self.os_images, false) {
            out.push(Problem::new(
                "kms.os_images",
                e.to_string(),
                "give hash as 64 hex digits and mrtd, rtmr0, rtmr1, rtmr2 as 96 hex digits each",
            ));
        }
        if self.max_concurrent_requests == 0 {
            out.push(Problem::new(
                "kms.max_concurrent_requests",
                "must be at least 1",
                "set it to the number of requests to process at once (32 is the default)",
            ));
        }
        if let Err(id) = self.canary_ids() {
            out.push(Problem::new(
                "kms.canary_app_ids",
                format!("{id:?} is not a 20-byte hex app id"),
                "list app ids as 40 hex digits (0x optional)",
            ));
        }
        if let Some(r) = &self.key_encryption_key
            && let Err(e) = r.resolve()
        {
            out.push(Problem::new(
                "kms.key_encryption_key",
                format!("{r}: {e}"),
                "point it at a readable file or a set environment variable",
            ));
        }
        out
    }

    /// The section's `insecure_*` switches and whether each is on.
    pub fn insecure_switches(&self) -> Vec<(&'static str, bool)> {
        vec![
            (
                "kms.insecure_self_attest_with_test_pki",
                self.insecure_self_attest_with_test_pki,
            ),
            (
                "kms.insecure_skip_os_image_check",
                self.insecure_skip_os_image_check,
            ),
        ]
    }
}

/// The `[auth]` configuration section.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `chain` (the on-chain mirror), `webhook` (upstream's auth API) or `dev`.
    pub backend: AuthBackendKind,
    /// Base URL of the auth server for `backend = "webhook"`.
    pub webhook_url: Option<String>,
    /// Timeout of one webhook call.
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
    /// Allow `backend = "dev"`, which authorizes every attested boot.
    pub insecure_dev_auth: bool,
    /// How long a webhook answer about the KMS itself (`bootAuth/kms`, the self-check of an
    /// attested KMS) is reused; the chain backend is asked on every request.
    #[serde(with = "humantime_serde")]
    pub kms_self_check_cache_ttl: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            backend: AuthBackendKind::Chain,
            webhook_url: None,
            webhook_timeout: Duration::from_secs(5),
            insecure_dev_auth: false,
            kms_self_check_cache_ttl: Duration::from_secs(10),
        }
    }
}

/// Authorization backends.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthBackendKind {
    /// The local on-chain mirror.
    Chain,
    /// Upstream's auth webhook.
    Webhook,
    /// Allow every attested boot (development only).
    Dev,
}

impl AuthConfig {
    /// Problems of the section, each with its fix.
    pub fn problems(&self) -> Vec<Problem> {
        match self.backend {
            AuthBackendKind::Dev if !self.insecure_dev_auth => vec![Problem::new(
                "auth.backend",
                "\"dev\" authorizes every attested boot and needs auth.insecure_dev_auth = true",
                "use backend = \"chain\" or \"webhook\", or set auth.insecure_dev_auth = true for development",
            )],
            AuthBackendKind::Webhook => match &self.webhook_url {
                Some(url) => http_url(
                    "auth.webhook_url",
                    "is",
                    url,
                    "set the auth server's base URL, e.g. \"http://127.0.0.1:8090\"",
                )
                .into_iter()
                .collect(),
                None => vec![Problem::new(
                    "auth.webhook_url",
                    "is required with auth.backend = \"webhook\"",
                    "set the auth server's base URL",
                )],
            },
            _ => Vec::new(),
        }
    }

    /// The section's `insecure_*` switches and whether each is on.
    pub fn insecure_switches(&self) -> Vec<(&'static str, bool)> {
        vec![("auth.insecure_dev_auth", self.insecure_dev_auth)]
    }
}
