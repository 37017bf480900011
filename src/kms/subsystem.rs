//! The KMS as the service runs it, built in one call: the verifier (trusting the test PKI's
//! root when `attestation.insecure_test_pki` names one), collateral from the PCCS through the
//! store's cache (or the test PKI's own set), the
//! configured authorizer, the KMS's own attestation and self-check when it runs attested, the
//! crypto workers, the ledger, and the RA-TLS listener. `dstack_kms_*` metrics are registered
//! on the service's registry here.
//!
//! Tasks: the ledger writer and the API listener, both critical (no record, no keys; no
//! listener, no KMS). The crypto workers are the one piece of work outside the supervisor: plain
//! threads at a lower priority, which exit once the last handle on the KMS state is gone (after
//! the listener has drained) and are joined at shutdown ([`WorkerThreads::join`]).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::authz::{
    AuthBackendKind, AuthConfig, Authorizer, ChainAuthorizer, DevAuthorizer, NoMirror,
    WebhookAuthorizer,
};
use super::config::KmsConfig;
use super::ledger::Ledger;
use super::metrics::KmsMetrics;
use super::root::KmsKeys;
use super::rpc::{ChainMeta, KmsRpc, KmsRpcParts};
use super::selfcheck::{AttestationSource, SelfCheck, attest_self};
use super::server::RpcServer;
use super::workers::{WorkerThreads, Workers};
use crate::attestation::collateral::{CollateralProvider, CollateralSource};
use crate::attestation::config::AttestationConfig;
use crate::attestation::{AttestationMetrics, Verifier};
use crate::chain::{ChainConfig, Mirror};
use crate::http::config::ApiConfig;
use crate::http::conn::ConnLimits;
use crate::runtime::{Criticality, Tasks};
use crate::store::Store;
use crate::telemetry::{Listener, ProcessMetrics};

/// Why the KMS could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The verifier, the test PKI or the collateral provider.
    #[error(transparent)]
    Attestation(#[from] crate::attestation::AttestationError),
    /// The webhook client.
    #[error(transparent)]
    Auth(#[from] super::authz::AuthError),
    /// The KMS's own attestation.
    #[error(transparent)]
    SelfCheck(#[from] super::selfcheck::SelfCheckError),
    /// `kms.os_images`.
    #[error("kms.os_images: {0}")]
    OsImages(#[from] super::osimage::OsImageError),
    /// `kms.canary_app_ids`.
    #[error("kms.canary_app_ids: {0:?} is not a 20-byte hex app id")]
    Canary(String),
    /// The listener's TLS configuration.
    #[error(transparent)]
    Tls(#[from] super::server::TlsError),
    /// The crypto worker threads.
    #[error("cannot start the KMS crypto workers: {0}")]
    Workers(std::io::Error),
}

/// The sections the KMS reads.
pub struct Settings<'a> {
    /// `[kms]`.
    pub kms: &'a KmsConfig,
    /// `[auth]`.
    pub auth: &'a AuthConfig,
    /// `[attestation]`.
    pub attestation: &'a AttestationConfig,
    /// `[chain]` (the contract and chain id `GetMeta` reports).
    pub chain: &'a ChainConfig,
    /// `[api]` (the listener).
    pub api: &'a ApiConfig,
}

/// The bound API socket and what every listener shares.
pub struct Listening {
    /// The bound socket.
    pub socket: TcpListener,
    /// Connections open at once (fitted under the open-file limit).
    pub max_connections: usize,
    /// Request timeout and body cap.
    pub limits: crate::http::Limits,
    /// Process metrics (handler panics).
    pub process: ProcessMetrics,
}

/// The KMS subsystem: its supervised tasks and its worker threads.
pub struct Subsystem {
    /// The API listener and the ledger writer.
    pub tasks: Tasks,
    /// Joined at shutdown.
    pub workers: WorkerThreads,
}

/// Builds the KMS from its sections, its key material, where its own attestation comes from
/// (when it runs attested), and the chain mirror (when `[chain]` is set), serving on `api`.
pub async fn subsystem(
    settings: Settings<'_>,
    mut keys: KmsKeys,
    own_attestation: Option<Box<dyn AttestationSource>>,
    store: &Store,
    mirror: Option<Arc<Mirror>>,
    api: Listening,
    registry: &mut Registry,
) -> Result<Subsystem, StartError> {
    let metrics = KmsMetrics::new(registry);
    let attestation_metrics = AttestationMetrics::new(registry);
    let Settings {
        kms,
        auth,
        attestation,
        chain,
        api: api_config,
    } = settings;
    let verifier = Verifier::new(attestation.clone())?;
    // The insecure bridge: the test PKI's collateral for its own platform.
    let test_collateral = match &attestation.insecure_test_pki {
        Some(dir) => Some(crate::attestation::testroot::load_collateral(dir)?),
        None => None,
    };
    let pccs = CollateralProvider::new(
        attestation,
        Arc::new(store.clone()),
        Some(attestation_metrics.clone()),
    )?;
    let authorizer: Arc<dyn Authorizer> = match auth.backend {
        AuthBackendKind::Dev => Arc::new(DevAuthorizer),
        AuthBackendKind::Webhook => Arc::new(WebhookAuthorizer::new(
            auth.webhook_url.as_deref().unwrap_or_default(),
            auth.webhook_timeout,
        )?),
        AuthBackendKind::Chain => match &mirror {
            Some(m) => Arc::new(ChainAuthorizer::new(m.clone())),
            None => Arc::new(NoMirror),
        },
    };
    let collateral = CollateralSource::new(pccs, test_collateral);
    let self_check = match own_attestation {
        Some(source) => {
            let identity = attest_self(
                source.as_ref(),
                &mut keys,
                &kms.domains,
                &verifier,
                &collateral,
                crate::clock::unix_secs(),
            )
            .await?;
            let boot = &identity.boot;
            tracing::info!(
                mr_aggregated = %hex::encode(&boot.mr_aggregated),
                os_image_hash = %hex::encode(&boot.os_image_hash),
                device_id = %hex::encode(&boot.device_id),
                tcb_status = %boot.tcb_status,
                "KMS attested itself (simulated, test PKI); it serves keys only while DstackKms allows these"
            );
            // A chain answer is a lookup in the current mirror: asked on every request.
            let cache_ttl = match auth.backend {
                AuthBackendKind::Webhook => auth.kms_self_check_cache_ttl,
                AuthBackendKind::Chain | AuthBackendKind::Dev => Duration::ZERO,
            };
            Some(SelfCheck::new(
                identity,
                authorizer.clone(),
                cache_ttl,
                metrics.clone(),
            ))
        }
        None => {
            // No TEE here: the RPC certificate is issued by our root CA without an attestation.
            tracing::warn!(
                "KMS is not running attested; its RPC certificate carries no attestation"
            );
            None
        }
    };
    // One per core: the work is CPU-bound.
    let (workers, threads) =
        Workers::start(std::thread::available_parallelism().map_or(2, usize::from))
            .map_err(StartError::Workers)?;
    let (ledger, ledger_writer) = Ledger::new(store.clone(), metrics.clone());
    let rpc = KmsRpc::new(KmsRpcParts {
        keys,
        verifier,
        collateral,
        authorizer,
        self_check,
        metrics: metrics.clone(),
        attestation_metrics,
        ledger,
        workers,
        chain: ChainMeta {
            kms_contract_address: chain.kms_contract.clone(),
            chain_id: chain.chain_id,
            mirror,
        },
        max_concurrent: kms.max_concurrent_requests,
        allow_kms_replication: kms.allow_kms_replication,
        os_images: super::osimage::OsImagePolicy::new(
            &kms.os_images,
            kms.insecure_skip_os_image_check,
        )?,
        max_queued: kms.max_queued_requests,
        canaries: kms.canary_ids().map_err(StartError::Canary)?,
    });
    let mut tasks = Tasks::default();
    tasks.add(
        RpcServer {
            listener: api.socket,
            tls: super::server::tls_config(rpc.keys())?,
            router: crate::http::harden(rpc.router(), Listener::Api, api.limits, api.process),
            metrics,
            handshake_timeout: api_config.handshake_timeout,
            limits: ConnLimits {
                max_connections: api.max_connections,
                header_read_timeout: api_config.header_read_timeout,
            },
        },
        Criticality::Critical,
    );
    // Critical: without it no key can be released.
    tasks.add(ledger_writer, Criticality::Critical);
    Ok(Subsystem {
        tasks,
        workers: threads,
    })
}
