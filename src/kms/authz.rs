//! Who decides whether a verified boot may receive keys.
//!
//! [`Authorizer`] is one interface with several backends: the upstream webhook API
//! (`POST {url}/bootAuth/app|kms`, so keywarden can run in front of an existing auth server),
//! `dev` (allows every boot; accepted only with `auth.insecure_dev_auth`), and the on-chain mirror.
//! Every backend fails closed: no answer, a non-2xx answer or bad JSON is a refusal.

use std::time::Duration;

use futures::future::BoxFuture;
use serde::Deserialize;

pub use super::config::{AuthBackendKind, AuthConfig};
use crate::attestation::BootInfo;

/// An authorization answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthDecision {
    /// Whether the boot may receive keys.
    pub allowed: bool,
    /// Why not (the contract's reason string), empty when allowed.
    pub reason: String,
    /// The gateway app id to hand to the app.
    pub gateway_app_id: String,
}

/// Why no decision could be had (the request is refused).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The backend could not be asked or did not answer properly.
    #[error("authorization backend unavailable: {0}")]
    Unavailable(String),
    /// The backend's state is too old to answer (the chain mirror beyond `max_staleness`).
    #[error("on-chain state is stale: {0}")]
    Stale(String),
}

impl AuthError {
    /// The refusal a request gets when no decision could be had.
    pub fn refusal(&self) -> super::metrics::Refusal {
        match self {
            Self::Stale(_) => super::metrics::Refusal::ChainStateStale,
            Self::Unavailable(_) => super::metrics::Refusal::AuthUnavailable,
        }
    }
}

/// Decides on boots. Object-safe so the backend is chosen at start-up.
pub trait Authorizer: Send + Sync {
    /// Whether `boot` may get app keys (`is_kms` false) or KMS keys (`is_kms` true).
    fn authorize<'a>(
        &'a self,
        boot: &'a BootInfo,
        is_kms: bool,
    ) -> BoxFuture<'a, Result<AuthDecision, AuthError>>;
}

/// Allows every attested boot. Only constructed with `auth.insecure_dev_auth`.
#[derive(Debug)]
pub struct DevAuthorizer;

impl Authorizer for DevAuthorizer {
    fn authorize<'a>(
        &'a self,
        _boot: &'a BootInfo,
        _is_kms: bool,
    ) -> BoxFuture<'a, Result<AuthDecision, AuthError>> {
        Box::pin(async {
            Ok(AuthDecision {
                allowed: true,
                reason: String::new(),
                gateway_app_id: String::new(),
            })
        })
    }
}

/// The on-chain backend before a chain is configured: refuses every boot (fail closed).
#[derive(Debug)]
pub struct NoMirror;

impl Authorizer for NoMirror {
    fn authorize<'a>(
        &'a self,
        _boot: &'a BootInfo,
        _is_kms: bool,
    ) -> BoxFuture<'a, Result<AuthDecision, AuthError>> {
        Box::pin(async {
            Err(AuthError::Unavailable(
                "auth.backend is \"chain\" but no chain mirror is configured".into(),
            ))
        })
    }
}

/// The local on-chain mirror: the same answer the contracts would give, from memory, refusing
/// with `chain_state_stale` when the mirror is older than `max_staleness`.
#[derive(Debug)]
pub struct ChainAuthorizer {
    mirror: std::sync::Arc<crate::chain::Mirror>,
}

impl ChainAuthorizer {
    /// Authorizes from `mirror`.
    pub fn new(mirror: std::sync::Arc<crate::chain::Mirror>) -> Self {
        Self { mirror }
    }
}

/// The contracts' `AppBootInfo` for a verified boot (fixed-size fields; a shorter value, such as
/// an empty instance id, is zero-padded as the ABI encoding of `address`/`bytes32` would be).
pub fn auth_query(boot: &BootInfo) -> crate::chain::authz::AuthQuery {
    fn fixed<const N: usize>(v: &[u8]) -> [u8; N] {
        let mut out = [0u8; N];
        let n = v.len().min(N);
        out[..n].copy_from_slice(&v[..n]);
        out
    }
    crate::chain::authz::AuthQuery {
        app_id: fixed(&boot.app_id),
        compose_hash: fixed(&boot.compose_hash),
        instance_id: fixed(&boot.instance_id),
        device_id: fixed(&boot.device_id),
        mr_aggregated: fixed(&boot.mr_aggregated),
        mr_system: fixed(&boot.mr_system),
        os_image_hash: fixed(&boot.os_image_hash),
        tcb_status: boot.tcb_status.clone(),
        advisory_ids: boot.advisory_ids.clone(),
    }
}

impl Authorizer for ChainAuthorizer {
    fn authorize<'a>(
        &'a self,
        boot: &'a BootInfo,
        is_kms: bool,
    ) -> BoxFuture<'a, Result<AuthDecision, AuthError>> {
        Box::pin(async move {
            let q = auth_query(boot);
            let d = if is_kms {
                self.mirror.authorize_kms(&q).await
            } else {
                self.mirror.authorize_app(&q).await
            };
            match d.reason {
                crate::chain::authz::Reason::ChainStateStale => {
                    return Err(AuthError::Stale(format!(
                        "the mirror has not caught up with the chain within max_staleness (last caught up {})",
                        self.mirror
                            .staleness()
                            .map_or("never".into(), |s| format!("{} s ago", s.as_secs()))
                    )));
                }
                crate::chain::authz::Reason::AuthUnavailable => {
                    return Err(AuthError::Unavailable(format!(
                        "the answering contract's code is not known and the chain did not answer: {}",
                        d.detail.as_deref().unwrap_or("no detail")
                    )));
                }
                _ => {}
            }
            Ok(AuthDecision {
                allowed: d.allowed,
                reason: if d.allowed {
                    String::new()
                } else {
                    d.reason_str().to_owned()
                },
                gateway_app_id: self.mirror.snapshot().kms.gateway_app_id.clone(),
            })
        })
    }
}

/// Upstream's auth API: `POST {url}/bootAuth/app` or `/bootAuth/kms` with the boot info as
/// camelCase JSON, answered with `{"isAllowed", "gatewayAppId", "reason"}`.
#[derive(Debug)]
pub struct WebhookAuthorizer {
    base: String,
    http: reqwest::Client,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WebhookAnswer {
    is_allowed: bool,
    #[serde(default)]
    gateway_app_id: String,
    #[serde(default)]
    reason: String,
}

impl WebhookAuthorizer {
    /// A client for the auth server at `base_url`.
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self, AuthError> {
        crate::tls::ensure_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| AuthError::Unavailable(format!("HTTP client: {e}")))?;
        Ok(Self {
            base: base_url.trim_end_matches('/').to_owned(),
            http,
        })
    }
}

impl Authorizer for WebhookAuthorizer {
    fn authorize<'a>(
        &'a self,
        boot: &'a BootInfo,
        is_kms: bool,
    ) -> BoxFuture<'a, Result<AuthDecision, AuthError>> {
        Box::pin(async move {
            let path = if is_kms {
                "bootAuth/kms"
            } else {
                "bootAuth/app"
            };
            let resp = self
                .http
                .post(format!("{}/{path}", self.base))
                .json(boot)
                .send()
                .await
                .map_err(|e| AuthError::Unavailable(format!("{path}: {e}")))?;
            if !resp.status().is_success() {
                return Err(AuthError::Unavailable(format!(
                    "{path} answered {}",
                    resp.status()
                )));
            }
            let answer: WebhookAnswer = resp
                .json()
                .await
                .map_err(|e| AuthError::Unavailable(format!("{path}: bad JSON: {e}")))?;
            Ok(AuthDecision {
                allowed: answer.is_allowed,
                reason: answer.reason,
                gateway_app_id: answer.gateway_app_id,
            })
        })
    }
}
