//! CVM and fleet health. No dstack component exports per-CVM metrics, so keywarden derives them.
//!
//! What this module owns: what the KMS's own records say (spec/07 §1), always on, with no
//! configuration; the dstack-vmm hosts of `[[cvm.vmm]]` (spec/07 §2); the gateway, peer KMS
//! instances and Nitro vsock proxies (§3); and the logs (§4).
//!
//! - [`fleet`] (pure): every instance that received keys, and what changed between two looks: a
//!   first boot is a deployment, each later boot a restart.
//! - [`records`]: the `cvm_records` task: the boot records read through the store's API every
//!   second → [`fleet`] → `CVM deployed` / `CVM restarted` log lines and the metrics.
//! - [`report`]: the fleet joined (pure) with the newest key refusal of each instance, for
//!   [`cli`] (`keywarden cvm list`, `cvm show ID`) and [`admin`] (`/admin/cvm`), and with the
//!   polled VMs (stuck, unmonitored).
//! - [`vmm`] (pure): dstack-vmm's and the guest API's answers read tolerantly, and what two polls
//!   of a VM tell: status with the derived `error`, uptime, restarts, boot duration, container
//!   restarts, memory use.
//! - [`client`]: pRPC and guest calls to one VMM over TCP or a unix socket, with its token.
//! - [`poller`]: one `cvm_vmm` task per VMM → [`poller::CvmView`] and the metrics.
//! - [`logs`]: `keywarden cvm logs ID`, a VM's console or output from the VMM's log stream, or
//!   a container's logs from its guest agent through the gateway.
//! - [`look`]: one poll of every VMM and the gateway, for [`cli`] run from a shell.
//! - [`gateway`]: the `cvm_gateway` task with `[cvm.gateway]`: each instance's latest WireGuard
//!   handshake, its last-seen time.
//! - [`nitro`]: one `cvm_nitro_proxy` task per `[[cvm.nitro_proxy]]`: is the vsock proxy a Nitro
//!   Enclave needs running (systemd unit, process, listening port, connect)?
//! - [`peer`]: one `cvm_peer_kms` task per `[[cvm.peer_kms]]`: `/health` and `KMS.GetMeta` over
//!   TLS trusting that KMS's root CA, its certificate's expiry, and upstream's two attestation
//!   counters from its `/metrics`.
//! - [`config`]: the `[cvm]` section.
//! - [`metrics`]: the `dstack_cvm_*` metrics (aggregates, and capped per-instance series).
//!
//! Flow: the KMS's ledger commits a boot record → [`records`] sees it → log line, counters. Each
//! VMM's poll → [`vmm`] → [`poller::CvmView`] → every VMM's VMs exported together.

pub mod admin;
pub mod cli;
pub mod client;
pub mod config;
pub mod fleet;
pub mod gateway;
pub mod logs;
pub mod look;
pub mod metrics;
pub mod nitro;
pub mod peer;
pub mod poller;
pub mod records;
pub mod report;
pub mod vmm;

use std::sync::Arc;

/// Errors of building the CVM subsystem.
#[derive(Debug, thiserror::Error)]
pub enum CvmError {
    /// A VMM's or the gateway's token cannot be read.
    #[error("{key}.token: {source}")]
    Token {
        /// Which entry (`cvm.vmm[0]`, `cvm.gateway`).
        key: String,
        /// Why.
        source: crate::secret::SecretError,
    },
    /// A peer KMS's root CA cannot be used.
    #[error("cvm.peer_kms[{index}].ca_file: {source}")]
    PeerCa {
        /// Which entry.
        index: usize,
        /// Why.
        source: peer::ProbeError,
    },
}

/// The CVM subsystem as the service runs it.
pub struct Subsystem {
    /// The `cvm_records` task.
    pub tasks: crate::runtime::Tasks,
    /// `/admin/cvm`.
    pub admin: axum::Router,
}

/// Builds the CVM subsystem: registers `dstack_cvm_*` on `registry`; the task reading `store`'s
/// boot records and one task per configured source (VMM, gateway, vsock proxy, peer KMS), each
/// run while this replica leads; and the admin route.
pub fn subsystem(
    cfg: &config::CvmConfig,
    store: crate::store::Store,
    leadership: &crate::cluster::Leadership,
    registry: &mut prometheus_client::registry::Registry,
) -> Result<Subsystem, CvmError> {
    let metrics = metrics::CvmMetrics::new(registry, cfg.max_instance_series);
    let view = Arc::new(poller::CvmView::new(cfg.vmm.len()));
    let mut tasks = crate::runtime::Tasks::default();
    // Every task is singleton work: each leadership term builds its own.
    let records = {
        let (store, metrics, view) = (store.clone(), metrics.clone(), view.clone());
        let (timeout, window) = (cfg.boot_timeout, cfg.unmonitored_window);
        move || {
            records::RecordsWatcher::new(
                store.clone(),
                metrics.clone(),
                view.clone(),
                timeout,
                window,
            )
        }
    };
    tasks.add(
        crate::cluster::Singleton::new(leadership.clone(), records(), move || Ok(records())),
        crate::runtime::Criticality::Optional,
    );
    for (index, entry) in cfg.vmm.iter().enumerate() {
        let poller = {
            let (entry, timeout, view, metrics) = (
                entry.clone(),
                cfg.request_timeout,
                view.clone(),
                metrics.clone(),
            );
            move || poller::VmmPoller::new(index, &entry, timeout, view.clone(), metrics.clone())
        };
        let first = poller().map_err(|source| CvmError::Token {
            key: format!("cvm.vmm[{index}]"),
            source,
        })?;
        tasks.add(
            crate::cluster::Singleton::new(leadership.clone(), first, move || Ok(poller()?)),
            crate::runtime::Criticality::Optional,
        );
    }
    if let Some(g) = &cfg.gateway {
        let gateway = {
            let (g, timeout, view, metrics) = (
                g.clone(),
                cfg.request_timeout,
                view.clone(),
                metrics.clone(),
            );
            move || {
                client::VmmClient::new(&g, timeout).map(|client| {
                    gateway::GatewayPoller::new(
                        client,
                        g.poll_interval,
                        view.clone(),
                        metrics.clone(),
                    )
                })
            }
        };
        let first = gateway().map_err(|source| CvmError::Token {
            key: "cvm.gateway".into(),
            source,
        })?;
        tasks.add(
            crate::cluster::Singleton::new(leadership.clone(), first, move || Ok(gateway()?)),
            crate::runtime::Criticality::Optional,
        );
    }
    for (index, p) in cfg.nitro_proxy.iter().enumerate() {
        let (p, metrics) = (p.clone(), metrics.clone());
        let checker = move || nitro::ProxyChecker::new(index, p.clone(), metrics.clone());
        tasks.add(
            crate::cluster::Singleton::new(leadership.clone(), checker(), move || Ok(checker())),
            crate::runtime::Criticality::Optional,
        );
    }
    for (index, p) in cfg.peer_kms.iter().enumerate() {
        let prober = {
            let (p, timeout, metrics) = (p.clone(), cfg.request_timeout, metrics.clone());
            move || peer::PeerProber::new(index, &p, timeout, metrics.clone())
        };
        let first = prober().map_err(|source| CvmError::PeerCa { index, source })?;
        tasks.add(
            crate::cluster::Singleton::new(leadership.clone(), first, move || Ok(prober()?)),
            crate::runtime::Criticality::Optional,
        );
    }
    Ok(Subsystem {
        tasks,
        admin: admin::routes(store, view, cfg.clone()),
    })
}
