//! `keywarden serve`: start-up, supervision and shutdown of the whole service.
//!
//! Order: logging → insecure-switch warnings → store (migrated) → run record → metrics (and the
//! chain mirror, registered not ready, when `[chain]` is configured) → listeners bound (a taken
//! port fails start-up before anything serves) → tasks spawned → ready. On shutdown: tasks
//! drained within `runtime.shutdown_timeout`, the run marked clean, the store closed, pending
//! spans exported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tracing::Instrument as _;

use crate::app::{AppState, HealthMonitor, Inner};
use crate::chain::Mirror;
use crate::chain::metrics::ChainMetrics;
use crate::clock::unix_secs_i64 as unix_now;
use crate::config::Config;
use crate::http::conn::ConnLimits;
use crate::http::{self, Limits, Server};
use crate::runtime::{ComponentState, Criticality, Outcome, Readiness, Supervisor};

use crate::attestation::Verifier;
use crate::attestation::collateral::CollateralProvider;
use crate::attestation::collateral::CollateralSource;
use crate::attestation::testpki::TestPki;
use crate::kms::authz::{
    AuthBackendKind, Authorizer, ChainAuthorizer, DevAuthorizer, NoMirror, WebhookAuthorizer,
};
use crate::kms::ledger::Ledger;
use crate::kms::root::KmsKeys;
use crate::kms::rpc::{ChainMeta, KmsRpc, KmsRpcParts};
use crate::kms::selfcheck::{AttestationSource, SelfCheck, attest_self};
use crate::kms::server::RpcServer;
use crate::kms::workers::Workers;
use crate::store::Store;
use crate::telemetry::{self, Listener, ProcessMetrics};
use prometheus_client::registry::Registry;

/// How often the health monitor re-checks.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the service until shutdown. `started` is when the process started. Returns the exit code.
pub async fn serve(config: Config, started: Instant) -> anyhow::Result<u8> {
    let log_guard = telemetry::logging::init(&config.telemetry)?;
    let outcome = run(config, started).await;
    log_guard.shutdown();
    outcome
}

async fn run(config: Config, started: Instant) -> anyhow::Result<u8> {
    let (state, supervisor) = start(config, started)
        .instrument(tracing::info_span!("keywarden.startup"))
        .await?;
    let outcome = supervisor.wait(state.config.runtime.shutdown_timeout).await;
    match &outcome {
        Outcome::Clean => {
            if let Err(e) = state.store.end_run(state.run.run_id, unix_now()).await {
                tracing::error!(error = %e, "could not mark this run as cleanly stopped");
            }
            state
                .audit("service_stop", "ok", serde_json::json!({}))
                .await;
            tracing::info!("keywarden stopped");
        }
        Outcome::CriticalTaskFailed { task, reason } => {
            tracing::error!(task, %reason, "keywarden stopped because a critical task died");
        }
        Outcome::DrainTimedOut(d) => {
            tracing::error!(deadline = %humantime::format_duration(*d), "keywarden stopped without draining");
        }
    }
    state.store.close().await;
    match outcome {
        // One line on stderr too: the reason names the fix (a chain id mismatch, say).
        Outcome::CriticalTaskFailed { task, reason } => {
            Err(anyhow::anyhow!("critical task {task} stopped: {reason}"))
        }
        other => Ok(other.exit_code()),
    }
}

/// Every metric the service exports, registered on one registry.
#[derive(Debug)]
struct Metrics {
    /// The registry encoded on `/metrics`.
    pub registry: Registry,
    /// `keywarden_*` process metrics.
    pub process: ProcessMetrics,
    /// `dstack_kms_*` key-dispatch metrics.
    pub kms: crate::kms::metrics::KmsMetrics,
    /// `dstack_kms_attestation_*` / `dstack_kms_collateral_*` metrics.
    pub attestation: crate::attestation::AttestationMetrics,
}

impl Metrics {
    /// Builds the registry with every subsystem's metrics.
    fn new() -> Self {
        let mut registry = Registry::default();
        let process = ProcessMetrics::new(&mut registry);
        let kms = crate::kms::metrics::KmsMetrics::new(&mut registry);
        let attestation = crate::attestation::AttestationMetrics::new(&mut registry);
        Self {
            registry,
            process,
            kms,
            attestation,
        }
    }
}

/// Connections the metrics and admin listeners each keep open (scrapers and operators).
const PLAIN_MAX_CONNECTIONS: usize = 64;

/// The listeners' connection caps.
struct ConnectionCaps {
    api: usize,
    plain: usize,
}

/// Raises the open-file limit to its hard limit and fits `api.max_connections` under it, with
/// a line for each change an operator should know about.
fn connection_caps(config: &Config) -> ConnectionCaps {
    let (soft, hard, refused) = crate::runtime::limits::raise_nofile();
    if let Some(e) = refused {
        tracing::warn!(soft, hard, error = %e, "could not raise the open-file limit to its hard limit");
    }
    let plain = PLAIN_MAX_CONNECTIONS;
    let api = crate::runtime::limits::fitting_cap(config.api.max_connections, soft, 2 * plain);
    if api < config.api.max_connections {
        tracing::warn!(
            configured = config.api.max_connections,
            effective = api,
            open_file_limit = soft,
            "api.max_connections lowered to fit the open-file limit; raise the limit (LimitNOFILE=, ulimit -n) to keep the configured cap"
        );
    }
    ConnectionCaps { api, plain }
}

async fn start(config: Config, started: Instant) -> anyhow::Result<(AppState, Supervisor)> {
    // First, so a SIGTERM during start-up is handled as a shutdown request.
    let mut metrics = Metrics::new();
    let supervisor = Supervisor::new(metrics.process.clone());
    for (key, on) in config.insecure_switches() {
        if on {
            tracing::warn!(key, "insecure setting enabled; do not use in production");
        }
    }
    let caps = connection_caps(&config);
    let target = config.database_target()?;
    let admin_token_hash = config.admin_token_hash()?;
    // Claim every port before touching the database, so a taken port writes nothing.
    let api = http::bind("api.listen", config.api.listen).await?;
    let ops = http::bind("metrics.listen", config.metrics.listen).await?;
    let admin = if admin_token_hash.is_some() {
        Some(http::bind("admin.listen", config.admin.listen).await?)
    } else {
        None
    };

    let store = Store::open(&config.storage, &target).await?;
    // Before anything is written (run record, keys): a second service on this data directory
    // changes nothing. After the database, so an unreachable one writes nothing either.
    let data_dir_lock = crate::store::lock_data_dir(&config.storage.data_dir)?;
    let kms_keys = crate::kms::root::load_or_create(&config.storage.data_dir, &config.kms)?;
    let kms_bootstrap = crate::kms::keys::BootstrapInfo::of(&kms_keys.root)?;
    let kms_created = kms_keys.created;
    let now = unix_now();
    let node_id = store.node_id(now).await?;
    let run = store
        .begin_run(env!("CARGO_PKG_VERSION"), telemetry::GIT_SHA, now)
        .await?;
    if run.previous_unclean {
        tracing::warn!("the previous run did not shut down cleanly");
    }

    let chain_metrics = ChainMetrics::new(&mut metrics.registry, config.chain.rpc_urls.len());
    let readiness = Readiness::default();
    readiness.register("listeners");
    // Registered (not ready) before the listeners serve, so /readyz never reports a mirror that
    // has not caught up.
    let chain = config.chain.resolve().map(|resolved| {
        crate::chain::follow(
            resolved,
            store.clone(),
            readiness.clone(),
            chain_metrics.clone(),
        )
    });
    let (mirror, engine) = chain.unzip();
    let (ledger, ledger_writer) = Ledger::new(store.clone(), metrics.kms.clone());
    let kms_rpc = kms_rpc(&config, kms_keys, &store, ledger, &metrics, mirror.clone()).await?;
    let tls = crate::kms::server::tls_config(kms_rpc.keys())?;
    let addr =
        |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let (api_addr, ops_addr) = (addr(&api), addr(&ops));
    let admin_addr = admin.as_ref().map(addr);

    let limits = Limits {
        request_timeout: config.api.request_timeout,
        max_body_bytes: config.api.max_body_bytes,
    };
    let state = AppState::new(Inner {
        config,
        store,
        registry: metrics.registry,
        process: metrics.process.clone(),
        readiness: readiness.clone(),
        admin_token_hash,
        node_id,
        run,
        started,
        chain: mirror,
        data_dir_lock,
    });

    let header_read_timeout = state.config.api.header_read_timeout;
    let serve = |name, socket, router, listener| {
        supervisor.spawn(
            Server {
                name,
                listener,
                socket,
                router: http::harden(router, listener, limits, metrics.process.clone()),
                limits: ConnLimits {
                    max_connections: caps.plain,
                    header_read_timeout,
                },
                metrics: metrics.process.clone(),
            },
            Criticality::Critical,
        );
    };
    supervisor.spawn(
        RpcServer {
            listener: api,
            tls,
            router: http::harden(
                kms_rpc.router(),
                Listener::Api,
                limits,
                metrics.process.clone(),
            ),
            metrics: metrics.kms.clone(),
            handshake_timeout: state.config.api.handshake_timeout,
            limits: ConnLimits {
                max_connections: caps.api,
                header_read_timeout,
            },
        },
        Criticality::Critical,
    );
    serve(
        "metrics_listener",
        ops,
        crate::app::ops_router(state.clone()),
        Listener::Metrics,
    );
    if let Some(admin) = admin {
        serve(
            "admin_listener",
            admin,
            crate::app::admin_router(state.clone()),
            Listener::Admin,
        );
    }
    if let Some(engine) = engine {
        supervisor.spawn(engine, Criticality::Critical);
    }
    // Critical: without it no key can be released.
    supervisor.spawn(ledger_writer, Criticality::Critical);
    supervisor.spawn(
        HealthMonitor {
            state: state.clone(),
            interval: HEALTH_INTERVAL,
        },
        Criticality::Optional,
    );
    readiness.set("listeners", ComponentState::Ready);
    // Only the database must answer now; the chain mirror becomes ready once it has caught up.
    let not_ready = state.health().await;
    (!not_ready.iter().any(|p| p.component == "database"))
        .then_some(())
        .context("database did not answer right after start-up")?;

    let startup = started.elapsed();
    metrics.process.set_startup_duration(startup.as_secs_f64());
    if kms_created {
        state
            .audit(
                "kms_keys_created",
                "ok",
                serde_json::json!({ "k256_pubkey": hex::encode(&kms_bootstrap.k256_pubkey) }),
            )
            .await;
    }
    state
        .audit(
            "service_start",
            "ok",
            serde_json::json!({
                "version": telemetry::VERSION_LONG,
                "insecure": state.config.insecure_switches().iter().filter(|(_, on)| *on).map(|(k, _)| *k).collect::<Vec<_>>(),
            }),
        )
        .await;
    tracing::info!(
        api = %api_addr,
        metrics = %ops_addr,
        admin = admin_addr.as_deref().unwrap_or("disabled"),
        database = state.store.backend_name(),
        node_id = %state.node_id,
        startup_ms = startup.as_millis() as u64,
        "keywarden ready"
    );
    Ok((state, supervisor))
}

/// Assembles the KMS RPC: verifier (with the test PKI when configured), collateral from PCCS via
/// the store's cache, the configured authorization backend, and the KMS's own attestation and
/// self-check when it runs attested.
async fn kms_rpc(
    config: &Config,
    mut keys: KmsKeys,
    store: &Store,
    ledger: Ledger,
    metrics: &Metrics,
    mirror: Option<Arc<Mirror>>,
) -> anyhow::Result<KmsRpc> {
    let verifier = Verifier::new(config.attestation.clone())?;
    let test_pki = match &config.attestation.insecure_test_pki {
        Some(dir) => Some(TestPki::load(dir)?),
        None => None,
    };
    let pccs = CollateralProvider::new(
        &config.attestation,
        Arc::new(store.clone()),
        Some(metrics.attestation.clone()),
    )?;
    let authorizer: Arc<dyn Authorizer> = match config.auth.backend {
        AuthBackendKind::Dev => Arc::new(DevAuthorizer),
        AuthBackendKind::Webhook => Arc::new(WebhookAuthorizer::new(
            config.auth.webhook_url.as_deref().unwrap_or_default(),
            config.auth.webhook_timeout,
        )?),
        AuthBackendKind::Chain => match &mirror {
            Some(m) => Arc::new(ChainAuthorizer::new(m.clone())),
            None => Arc::new(NoMirror),
        },
    };
    let collateral = CollateralSource::new(pccs, test_pki.as_ref());
    let self_check = match test_pki.filter(|_| config.kms.insecure_self_attest_with_test_pki) {
        Some(pki) => {
            let identity = attest_self(
                &AttestationSource::simulated(pki),
                &mut keys,
                &config.kms.domains,
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
            let cache_ttl = match config.auth.backend {
                AuthBackendKind::Webhook => config.auth.kms_self_check_cache_ttl,
                AuthBackendKind::Chain | AuthBackendKind::Dev => Duration::ZERO,
            };
            Some(SelfCheck::new(
                identity,
                authorizer.clone(),
                cache_ttl,
                metrics.kms.clone(),
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
    Ok(KmsRpc::new(KmsRpcParts {
        keys,
        verifier,
        collateral,
        authorizer,
        self_check,
        metrics: metrics.kms.clone(),
        attestation_metrics: metrics.attestation.clone(),
        ledger,
        // One per core: the work is CPU-bound.
        workers: Workers::start(std::thread::available_parallelism().map_or(2, usize::from))
            .context("cannot start the KMS crypto workers")?,
        chain: ChainMeta {
            kms_contract_address: config.chain.kms_contract.clone(),
            chain_id: config.chain.chain_id,
            mirror: mirror.clone(),
        },
        max_concurrent: config.kms.max_concurrent_requests,
        allow_kms_replication: config.kms.allow_kms_replication,
        os_images: crate::kms::osimage::OsImagePolicy::new(
            &config.kms.os_images,
            config.kms.insecure_skip_os_image_check,
        )?,
        max_queued: config.kms.max_queued_requests,
        canaries: config.kms.canary_ids().map_err(|id| {
            anyhow::anyhow!("kms.canary_app_ids: {id:?} is not a 20-byte hex app id")
        })?,
    }))
}
