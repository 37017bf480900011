//! CVM and fleet health. No dstack component exports per-CVM metrics, so keywarden derives them.
//!
//! What this module owns today: what the KMS's own records say (spec/07 §1), always on, with no
//! configuration. Still to come: the dstack-vmm, gateway, Nitro-host and peer-KMS sources and the
//! fleet join.
//!
//! - [`fleet`] (pure): every instance that received keys, and what changed between two looks: a
//!   first boot is a deployment, each later boot a restart.
//! - [`records`]: the `cvm_records` task: the boot records read through the store's API every
//!   second → [`fleet`] → `CVM deployed` / `CVM restarted` log lines and the metrics.
//! - [`report`]: the fleet joined (pure) with the newest key refusal of each instance, for
//!   [`cli`] (`keywarden cvm list`, `cvm show ID`) and [`admin`] (`/admin/cvm`).
//! - [`metrics`]: the `dstack_cvm_*` metrics.
//!
//! Flow: the KMS's ledger commits a boot record → [`records`] sees it → log line, counters.

pub mod admin;
pub mod cli;
pub mod fleet;
pub mod metrics;
pub mod records;
pub mod report;

/// The CVM subsystem as the service runs it.
pub struct Subsystem {
    /// The `cvm_records` task.
    pub tasks: crate::runtime::Tasks,
    /// `/admin/cvm`.
    pub admin: axum::Router,
}

/// Builds the CVM subsystem: registers `dstack_cvm_*` on `registry`, the task reading `store`'s
/// boot records, and the admin route.
pub fn subsystem(
    store: crate::store::Store,
    registry: &mut prometheus_client::registry::Registry,
) -> Subsystem {
    let metrics = metrics::CvmMetrics::new(registry);
    let mut tasks = crate::runtime::Tasks::default();
    tasks.add(
        records::RecordsWatcher::new(store.clone(), metrics),
        crate::runtime::Criticality::Optional,
    );
    Subsystem {
        tasks,
        admin: admin::routes(store),
    }
}
