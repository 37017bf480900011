//! The KMS RPC state ([`KmsRpc`]): what the key path holds (keys, verifier, collateral source,
//! authorizer, ledger, workers, limits, policies), built once by `service`; and [`PeerCert`], the
//! client certificate the listener attaches to each request of a connection. The methods
//! (`dispatch`), gates (`gates`), audit (`audit`) and transport (`prpc`) extend it.

use std::sync::Arc;

use super::authz::Authorizer;
use super::ledger::Ledger;
use super::limiter::Limiter;
use super::metrics::{KmsMetrics, Refusal};
use super::refusal::Refused;
use super::root::KmsKeys;
use super::workers::Workers;
use crate::attestation::collateral::CollateralSource;
use crate::attestation::{AttestationMetrics, Verifier};

/// The peer's client certificate (DER), attached to each request of a TLS connection.
#[derive(Debug, Clone, Default)]
pub struct PeerCert(pub Option<Arc<Vec<u8>>>);

/// What `GetMeta` reports about the chain side.
#[derive(Debug, Clone, Default)]
pub struct ChainMeta {
    /// DstackKms address.
    pub kms_contract_address: Option<String>,
    /// Chain id.
    pub chain_id: Option<u64>,
    /// The mirror, whose `kmsInfo.k256Pubkey` (when registered) must be this KMS's root key.
    pub mirror: Option<Arc<crate::chain::Mirror>>,
}

/// The KMS RPC state. Cheap to clone.
#[derive(Clone)]
pub struct KmsRpc(pub(super) Arc<Inner>);

pub(super) struct Inner {
    pub(super) os_images: super::osimage::OsImagePolicy,
    pub(super) allow_kms_replication: bool,
    pub(super) limiter: Limiter,
    pub(super) canaries: Vec<Vec<u8>>,
    pub(super) keys: KmsKeys,
    pub(super) verifier: Verifier,
    pub(super) collateral: CollateralSource,
    pub(super) authorizer: Arc<dyn Authorizer>,
    pub(super) metrics: KmsMetrics,
    pub(super) attestation_metrics: AttestationMetrics,
    pub(super) ledger: Ledger,
    pub(super) workers: Workers,
    pub(super) chain: ChainMeta,
    pub(super) self_check: Option<super::selfcheck::SelfCheck>,
    /// Whether the registered k256 key differs from ours (one log line per change).
    pub(super) key_mismatch: std::sync::atomic::AtomicBool,
}

/// Everything the KMS RPC needs.
pub struct KmsRpcParts {
    /// Root keys and certificates.
    pub keys: KmsKeys,
    /// Attestation verifier.
    pub verifier: Verifier,
    /// Collateral source.
    pub collateral: CollateralSource,
    /// Authorization backend.
    pub authorizer: Arc<dyn Authorizer>,
    /// KMS metrics.
    pub metrics: KmsMetrics,
    /// Attestation metrics.
    pub attestation_metrics: AttestationMetrics,
    /// Boot and audit records.
    pub ledger: Ledger,
    /// Where verification and derivation run.
    pub workers: Workers,
    /// Chain facts for GetMeta.
    pub chain: ChainMeta,
    /// Requests processed at once.
    pub max_concurrent: usize,
    /// Requests allowed to wait.
    pub max_queued: usize,
    /// App ids that must never receive keys (20 bytes each).
    pub canaries: Vec<Vec<u8>>,
    /// Whether GetKmsKey may hand out the root keys.
    pub allow_kms_replication: bool,
    /// Expected measurements of OS images.
    pub os_images: super::osimage::OsImagePolicy,
    /// The KMS's own admission, when it runs attested.
    pub self_check: Option<super::selfcheck::SelfCheck>,
}

impl KmsRpc {
    /// Assembles the RPC state.
    pub fn new(p: KmsRpcParts) -> Self {
        p.metrics.set_concurrency_limit(p.max_concurrent);
        Self(Arc::new(Inner {
            limiter: Limiter::new(p.max_concurrent, p.max_queued),
            canaries: p.canaries,
            allow_kms_replication: p.allow_kms_replication,
            os_images: p.os_images,
            keys: p.keys,
            verifier: p.verifier,
            collateral: p.collateral,
            authorizer: p.authorizer,
            metrics: p.metrics,
            attestation_metrics: p.attestation_metrics,
            ledger: p.ledger,
            workers: p.workers,
            chain: p.chain,
            self_check: p.self_check,
            key_mismatch: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The root key material.
    pub fn keys(&self) -> &KmsKeys {
        &self.0.keys
    }

    /// Runs CPU-heavy work on the crypto workers, so the runtime's threads stay free for TLS
    /// handshakes and fast refusals meanwhile.
    pub(super) async fn offload<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Refused> {
        self.0
            .workers
            .run(work)
            .await
            .map_err(|e| Refused::new(Refusal::Internal, e.to_string()))
    }
}
