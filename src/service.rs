//! `keywarden serve`: start-up, supervision and shutdown of the whole service.
//!
//! Order: logging → the registry and the supervisor → insecure-switch warnings → open-file limit
//! and connection caps → listeners bound (a taken port fails start-up before anything is
//! written) → store (migrated) → data-directory lock → KMS keys → run record → the subsystems,
//! each built in one call that registers its metrics and returns its tasks and admin routes
//! (`chain::subsystem`, then `kms::subsystem::subsystem`, which reads the chain's mirror) →
//! application state → tasks spawned → ready. On shutdown: tasks drained within
//! `runtime.shutdown_timeout`, the KMS crypto worker threads joined, the run marked clean, the
//! store closed, pending spans exported.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tracing::Instrument as _;

use crate::app::{AppState, HealthMonitor, Inner};
use crate::clock::unix_secs_i64 as unix_now;
use crate::config::Config;
use crate::http::conn::ConnLimits;
use crate::http::{self, Limits, Server};
use crate::kms::subsystem::{Listening, Settings};
use crate::kms::workers::WorkerThreads;
use crate::runtime::{ComponentState, Criticality, Outcome, Readiness, Supervisor};
use crate::store::Store;
use crate::telemetry::{self, Listener, ProcessMetrics};

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
    let (state, supervisor, workers) = start(config, started)
        .instrument(tracing::info_span!("keywarden.startup"))
        .await?;
    let deadline = state.config.runtime.shutdown_timeout;
    let outcome = supervisor.wait(deadline).await;
    // After the listener has drained, nothing holds the KMS state, so its worker threads end.
    if !workers.join(deadline).await {
        tracing::warn!("the KMS crypto workers did not stop within the shutdown deadline");
    }
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

/// How long the guest agent may take to answer at start-up.
const GUEST_AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the KMS's own attestation comes from: the simulated KMS guest of the test PKI in
/// `test_pki` (the one place the service reaches into `sim`, behind
/// `kms.insecure_self_attest_with_test_pki` or `kms onboard --test-pki`), or the dstack guest
/// agent (`kms.self_attestation`); `None` when neither is set.
pub(crate) async fn own_attestation(
    kms: &crate::kms::config::KmsConfig,
    test_pki: Option<&std::path::Path>,
) -> anyhow::Result<Option<Box<dyn crate::kms::selfcheck::AttestationSource>>> {
    use crate::kms::config::SelfAttestation;
    use crate::kms::guest_agent::{GuestAgent, locate};
    if let Some(dir) = test_pki {
        let pki = crate::sim::testpki::TestPki::load(dir)?;
        return Ok(Some(Box::new(crate::sim::kms::SimulatedKms::new(pki))));
    }
    if kms.self_attestation == SelfAttestation::GuestAgent {
        let endpoint = locate(kms.guest_agent.as_deref(), std::path::Path::exists)?;
        let agent = GuestAgent::connect(endpoint, GUEST_AGENT_TIMEOUT).await?;
        return Ok(Some(Box::new(agent)));
    }
    Ok(None)
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

async fn start(
    config: Config,
    started: Instant,
) -> anyhow::Result<(AppState, Supervisor, WorkerThreads)> {
    // First, so a SIGTERM during start-up is handled as a shutdown request.
    let mut registry = Registry::default();
    let process = ProcessMetrics::new(&mut registry);
    let supervisor = Supervisor::new(process.clone());
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
    let addr =
        |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let (api_addr, ops_addr) = (addr(&api), addr(&ops));
    let admin_addr = admin.as_ref().map(addr);

    let store = Store::open(&config.storage, &target).await?;
    // Before anything is written (run record, keys): a second service on this data directory
    // changes nothing. After the database, so an unreachable one writes nothing either.
    let data_dir_lock = crate::store::lock_data_dir(&config.storage.data_dir)?;
    let kms_keys = crate::kms::root::load_or_create(&config.storage.data_dir, &config.kms)?;
    let kms_bootstrap = crate::kms::keys::BootstrapInfo::of(&kms_keys.root)?;
    let kms_created = kms_keys.created;
    let now = unix_now();
    let node_id = store.node_id(now).await?;
    let replica = crate::cluster::replica_id(&config.storage.data_dir)?;
    let run = store
        .begin_run(&replica, env!("CARGO_PKG_VERSION"), telemetry::GIT_SHA, now)
        .await?;
    if run.previous_unclean {
        tracing::warn!("the previous run did not shut down cleanly");
    }

    let readiness = Readiness::default();
    readiness.register("listeners");
    let limits = Limits {
        request_timeout: config.api.request_timeout,
        max_body_bytes: config.api.max_body_bytes,
    };
    // The subsystems, each built in one call with its metrics on the one registry. The chain
    // mirror registers itself (not ready) before any listener serves, so /readyz never reports
    // a mirror that has not caught up.
    let cluster = crate::cluster::subsystem(
        &config.cluster,
        match &target {
            crate::config::DatabaseTarget::Postgres(url) => Some(url.as_str()),
            crate::config::DatabaseTarget::Sqlite(_) => None,
        },
        &replica,
        api_addr.clone(),
        &mut registry,
    )?;
    let leadership = cluster.leadership.clone();
    let chain_connection = crate::chain::connect(&config.chain, &mut registry);
    let alerts =
        crate::alerts::subsystem(&config.alerts, store.clone(), &leadership, &mut registry)
            .map_err(|e| crate::config::ConfigError::Invalid(vec![e.0]))?;
    let governance = crate::governance::subsystem(
        &config.governance,
        &config.chain,
        store.clone(),
        alerts.outbox.clone(),
        chain_connection.reads(),
        &leadership,
        &mut registry,
    );
    let cvm = crate::cvm::subsystem(&config.cvm, store.clone(), &leadership, &mut registry).map_err(|e| {
        crate::config::ConfigError::Invalid(vec![crate::problem::Problem::new(
            "cvm",
            e.to_string(),
            "point token at a readable secret (env:VAR or file:PATH) and ca_file at a readable PEM certificate",
        )])
    })?;
    let chain = crate::chain::subsystem(
        &config.chain,
        chain_connection,
        store.clone(),
        readiness.clone(),
        governance.projection.into_iter().collect(),
        (&leadership, config.cluster.catch_up_interval),
    );
    let kms = crate::kms::subsystem::subsystem(
        Settings {
            kms: &config.kms,
            auth: &config.auth,
            attestation: &config.attestation,
            chain: &config.chain,
            api: &config.api,
        },
        kms_keys,
        own_attestation(
            &config.kms,
            config
                .attestation
                .insecure_test_pki
                .as_deref()
                .filter(|_| config.kms.insecure_self_attest_with_test_pki),
        )
        .await?,
        &store,
        chain.mirror.clone(),
        Listening {
            socket: api,
            max_connections: caps.api,
            limits,
            process: process.clone(),
        },
        &mut registry,
    )
    .await?;

    let header_read_timeout = config.api.header_read_timeout;
    let state = AppState::new(Inner {
        config,
        store,
        registry,
        process: process.clone(),
        readiness: readiness.clone(),
        admin_token_hash,
        node_id,
        run,
        started,
        data_dir_lock,
        leadership,
    });
    cluster.tasks.spawn_on(&supervisor);
    kms.tasks.spawn_on(&supervisor);
    chain.tasks.spawn_on(&supervisor);
    governance.tasks.spawn_on(&supervisor);
    alerts.tasks.spawn_on(&supervisor);
    cvm.tasks.spawn_on(&supervisor);
    let serve = |name, socket, router, listener| {
        supervisor.spawn(
            Server {
                name,
                listener,
                socket,
                router: http::harden(router, listener, limits, process.clone()),
                limits: ConnLimits {
                    max_connections: caps.plain,
                    header_read_timeout,
                },
                metrics: process.clone(),
            },
            Criticality::Critical,
        );
    };
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
            crate::app::admin_router(
                state.clone(),
                chain.admin.merge(governance.admin).merge(cvm.admin),
            ),
            Listener::Admin,
        );
    }
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
    process.set_startup_duration(startup.as_secs_f64());
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
    Ok((state, supervisor, kms.workers))
}
