//! The `cvm_records` task: looks at the KMS's boot records (through the store's API) every
//! second, and tells what changed: `CVM deployed` for an instance's first boot, `CVM restarted`
//! for each later one, with the counters and fleet gauges. History found at start-up is loaded
//! silently; a last look at shutdown reports what the final requests changed. Each look also
//! joins the records with the polled VMs (stuck VMs, unmonitored instances).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use super::fleet::{Change, Fleet};
use super::metrics::CvmMetrics;
use super::poller::CvmView;
use crate::runtime::Task;
use crate::store::Store;

/// How often the records are looked at.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// The boot-records task.
pub struct RecordsWatcher {
    store: Store,
    metrics: CvmMetrics,
    view: Arc<CvmView>,
    boot_timeout: Duration,
    window: Duration,
}

impl RecordsWatcher {
    /// A watcher of `store`'s boot records, joined with the VMs of `view`: those not booted
    /// within `boot_timeout` are stuck, instances booted within `window` on no polled VMM are
    /// unmonitored.
    pub fn new(
        store: Store,
        metrics: CvmMetrics,
        view: Arc<CvmView>,
        boot_timeout: Duration,
        window: Duration,
    ) -> Self {
        Self {
            store,
            metrics,
            view,
            boot_timeout,
            window,
        }
    }

    /// Exports the fleet join: stuck VMs, and unmonitored instances while it can be told.
    fn join(&self, fleet: &Fleet) {
        let vms = self.view.all();
        let stuck = super::report::stuck(&vms, self.boot_timeout).len();
        let since = crate::clock::unix_secs_i64()
            .saturating_sub(i64::try_from(self.window.as_secs()).unwrap_or(i64::MAX));
        let unmonitored = self
            .view
            .complete()
            .then(|| super::report::unmonitored(fleet.rows(), &vms, since).len());
        self.metrics.joined(stuck, unmonitored);
    }

    /// One look: the instances booted since the latest boot known (that second included, so a
    /// boot recorded within it is not missed).
    async fn look(&self, fleet: &mut Fleet) -> Result<(), crate::store::StoreError> {
        let rows = self
            .store
            .instances_booted_since(fleet.latest_boot())
            .await?;
        for change in fleet.observe(rows) {
            match change {
                Change::Deployed { row, restarts } => {
                    tracing::info!(
                        app_id = %row.app_id,
                        instance_id = %row.instance_id,
                        compose_hash = %row.compose_hash,
                        os_image_hash = %row.os_image_hash,
                        "CVM deployed"
                    );
                    self.metrics.deployed();
                    if restarts > 0 {
                        self.metrics.restarted_on("kms", restarts);
                    }
                }
                Change::Restarted { row, restarts } => {
                    tracing::info!(
                        app_id = %row.app_id,
                        instance_id = %row.instance_id,
                        boot_count = row.record.boot_count,
                        restarts,
                        "CVM restarted"
                    );
                    self.metrics.restarted_on("kms", restarts);
                }
            }
        }
        self.metrics.fleet(fleet.len(), fleet.latest_boot());
        self.join(fleet);
        Ok(())
    }
}

impl Task for RecordsWatcher {
    fn name(&self) -> &'static str {
        "cvm_records"
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut fleet = loop {
            match self.store.instances_booted_since(0).await {
                Ok(rows) => break Fleet::load(rows),
                Err(e) => {
                    tracing::warn!(error = %e, "cvm: reading the boot records failed; retrying");
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(LOOK_EVERY) => {}
            }
        };
        self.metrics.fleet(fleet.len(), fleet.latest_boot());
        let mut tick = crate::runtime::ticker(LOOK_EVERY);
        loop {
            let last = tokio::select! {
                () = cancel.cancelled() => true,
                _ = tick.tick() => false,
            };
            if let Err(e) = self.look(&mut fleet).await {
                tracing::warn!(error = %e, "cvm: reading the boot records failed; retrying");
            }
            if last {
                return Ok(());
            }
        }
    }
}
