//! The `cvm_vmm` task, one per `[[cvm.vmm]]`: polls dstack-vmm and the guest API it proxies,
//! and publishes each VM as last seen.
//!
//! Flow, per poll (`poll_interval`): `Status` (paged) → `GetInfo` for each VM that is new or whose
//! status or boot progress changed → for each running VM, the guest's `SysInfo` and
//! `ListContainers`, at most `concurrency` requests in flight → [`super::vmm`] (pure) derives
//! status, uptime, restarts (uptime resets), boot duration, container restarts and memory use →
//! [`CvmView`] → the metrics over every VMM's VMs. A VMM that stops answering, or answers
//! something malformed, has its VMs dropped from the view (so their series go, rather than turn
//! to zeros) and the source error counted with its reason.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::client::{SourceError, VmmClient};
use super::config::VmmEntry;
use super::metrics::CvmMetrics;
use super::vmm::{
    self, ContainerView, ContainersAnswer, InfoAnswer, StatusAnswer, SysInfo, VmInfo, VmStatus,
    VmView,
};
use crate::runtime::Task;

/// VMs asked per `Status` page.
const PAGE_SIZE: u64 = 100;
/// Pages read at most (100,000 VMs).
const MAX_PAGES: u64 = 1000;

/// Every VMM's VMs as last polled, and whether each VMM answered its last poll.
#[derive(Debug, Default)]
pub struct CvmView {
    vmms: RwLock<BTreeMap<usize, (bool, Vec<VmView>)>>,
    configured: usize,
    /// When the gateway last saw each instance (Unix seconds), by instance id.
    seen: RwLock<HashMap<String, u64>>,
}

impl CvmView {
    /// The view of `configured` VMMs.
    pub fn new(configured: usize) -> Self {
        Self {
            vmms: RwLock::default(),
            configured,
            seen: RwLock::default(),
        }
    }

    /// Replaces what the gateway says of each instance's last handshake.
    pub fn set_seen(&self, seen: HashMap<String, u64>) {
        *self.seen.write().unwrap_or_else(|e| e.into_inner()) = seen;
    }

    /// Whether VMMs are configured and every one answered its last poll: only then does a VM
    /// missing from the view say something.
    pub fn complete(&self) -> bool {
        let vmms = self.vmms.read().unwrap_or_else(|e| e.into_inner());
        self.configured > 0
            && vmms.len() == self.configured
            && vmms.values().all(|(answered, _)| *answered)
    }

    /// Every VM, by VMM in configuration order, with when the gateway last saw it.
    pub fn all(&self) -> Vec<VmView> {
        let seen = self.seen.read().unwrap_or_else(|e| e.into_inner());
        self.vmms
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flat_map(|(_, vms)| vms)
            .map(|v| VmView {
                last_seen: v
                    .instance_id
                    .as_deref()
                    .and_then(|i| seen.get(&i.to_ascii_lowercase()).copied()),
                ..v.clone()
            })
            .collect()
    }

    fn set(&self, vmm: usize, answered: bool, vms: Vec<VmView>) {
        self.vmms
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vmm, (answered, vms));
    }
}

/// What is kept of a VM between polls.
struct Tracked {
    info: VmInfo,
    uptime: Option<Duration>,
    seen_at: Instant,
    containers: Vec<vmm::Container>,
    boot: Option<f64>,
    restarts: u64,
    container_restarts: u64,
}

/// The poller of one VMM.
pub struct VmmPoller {
    index: usize,
    label: String,
    client: VmmClient,
    interval: Duration,
    concurrency: usize,
    view: Arc<CvmView>,
    metrics: CvmMetrics,
    tracked: HashMap<String, Tracked>,
    failing: bool,
}

/// Every VM `client`'s VMM has (brief), page by page.
pub async fn list_vms(client: &VmmClient) -> Result<Vec<VmInfo>, SourceError> {
    let mut vms = Vec::new();
    for page in 0..MAX_PAGES {
        let body =
            json!({"ids": [], "brief": true, "keyword": "", "page": page, "page_size": PAGE_SIZE});
        let answer: StatusAnswer = vmm::parse("Status", &client.prpc("Status", &body).await?)?;
        let n = answer.vms.len();
        vms.extend(answer.vms);
        let total = answer.total.unwrap_or(0);
        if n == 0 || n < PAGE_SIZE as usize || vms.len() as u64 >= total {
            break;
        }
    }
    Ok(vms)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl VmmPoller {
    /// The poller of `[[cvm.vmm]]` number `index`, each request bounded by `timeout` (its token
    /// resolved now).
    pub fn new(
        index: usize,
        entry: &VmmEntry,
        timeout: Duration,
        view: Arc<CvmView>,
        metrics: CvmMetrics,
    ) -> Result<Self, crate::secret::SecretError> {
        Ok(Self {
            index,
            label: entry.url.clone(),
            client: VmmClient::new(entry, timeout)?,
            interval: entry.poll_interval,
            concurrency: entry.concurrency.max(1),
            view,
            metrics,
            tracked: HashMap::new(),
            failing: false,
        })
    }

    /// Whether `vm` needs its full `GetInfo` this poll.
    fn changed(&self, vm: &VmInfo) -> bool {
        self.tracked.get(&vm.id).is_none_or(|t| {
            t.info.status != vm.status
                || t.info.boot_progress != vm.boot_progress
                || t.info.boot_error != vm.boot_error
                || t.info.uptime.is_empty() != vm.uptime.is_empty()
        })
    }

    async fn info(&self, brief: VmInfo) -> (VmInfo, Option<SourceError>) {
        let answer = async {
            let a: InfoAnswer = vmm::parse(
                "GetInfo",
                &self
                    .client
                    .prpc("GetInfo", &json!({"id": brief.id}))
                    .await?,
            )?;
            Ok::<_, SourceError>(a.info.filter(|_| a.found))
        };
        match answer.await {
            Ok(Some(info)) => (info, None),
            Ok(None) => (brief, None),
            Err(e) => (brief, Some(e)),
        }
    }

    async fn guest(
        &self,
        id: String,
    ) -> (String, Result<(SysInfo, ContainersAnswer), SourceError>) {
        let body = json!({"id": id});
        let answer = async {
            let sys: SysInfo = vmm::parse("SysInfo", &self.client.guest("SysInfo", &body).await?)?;
            let containers: ContainersAnswer = vmm::parse(
                "ListContainers",
                &self.client.guest("ListContainers", &body).await?,
            )?;
            Ok((sys, containers))
        };
        (id, answer.await)
    }

    /// One poll: reads the VMM, derives, publishes. The error, when the VMM's VM list gave no
    /// usable answer (counted and logged); a single VM's or guest's failure is only counted.
    pub async fn poll_once(&mut self) -> Result<(), SourceError> {
        let started = Instant::now();
        let listed = match list_vms(&self.client).await {
            Ok(v) => v,
            Err(e) => {
                self.metrics
                    .source_poll("vmm", e.label(), started.elapsed());
                if !self.failing {
                    tracing::warn!(vmm = %self.label, error = %e, "cvm: the VMM gave no usable answer; its VMs' series are dropped until it does");
                }
                self.failing = true;
                self.tracked.clear();
                self.view.set(self.index, false, Vec::new());
                self.metrics.publish(&self.view.all());
                return Err(e);
            }
        };
        if self.failing {
            tracing::info!(vmm = %self.label, "cvm: the VMM answers again");
            self.failing = false;
        }
        let (changed, unchanged): (Vec<VmInfo>, Vec<VmInfo>) =
            listed.into_iter().partition(|v| self.changed(v));
        // A brief answer lacks the configuration and events: those of the last full one stay.
        let mut infos: Vec<VmInfo> = unchanged
            .into_iter()
            .map(|brief| match self.tracked.get(&brief.id) {
                Some(t) => VmInfo {
                    configuration: t.info.configuration.clone(),
                    events: t.info.events.clone(),
                    ..brief
                },
                None => brief,
            })
            .collect();
        let fetched: Vec<(VmInfo, Option<SourceError>)> = futures::stream::iter(changed)
            .map(|v| self.info(v))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        for (info, error) in fetched {
            if let Some(e) = error {
                self.metrics.source_error("vmm", e.label());
            }
            infos.push(info);
        }
        let running: Vec<String> = infos
            .iter()
            .filter(|v| vmm::status(v) == VmStatus::Running)
            .map(|v| v.id.clone())
            .collect();
        let guests: HashMap<String, Result<(SysInfo, ContainersAnswer), SourceError>> =
            futures::stream::iter(running)
                .map(|id| self.guest(id))
                .buffer_unordered(self.concurrency)
                .collect()
                .await;
        let now = Instant::now();
        let now_ms = unix_ms();
        let mut views = Vec::with_capacity(infos.len());
        let mut next = HashMap::with_capacity(infos.len());
        for info in infos {
            let uptime = match vmm::parse_uptime(&info.uptime) {
                Ok(u) => u,
                Err(e) => {
                    self.metrics.source_error("vmm", "malformed");
                    tracing::debug!(vmm = %self.label, vm = %info.id, error = %e, "cvm: unreadable uptime");
                    None
                }
            };
            let before = self.tracked.remove(&info.id);
            let guest = guests.get(&info.id);
            if let Some(Err(e)) = guest {
                self.metrics.source_error("guest", e.label());
            }
            let (sys, containers) = match guest {
                Some(Ok((sys, c))) => (Some(sys.clone()), c.containers.clone()),
                // The guest did not answer: its containers stay as last seen.
                _ => (
                    None,
                    before
                        .as_ref()
                        .map(|b| b.containers.clone())
                        .unwrap_or_default(),
                ),
            };
            let mut t = before.unwrap_or(Tracked {
                info: info.clone(),
                uptime: None,
                seen_at: now,
                containers: containers.clone(),
                boot: None,
                restarts: 0,
                container_restarts: 0,
            });
            if vmm::restarted(t.uptime, uptime, now.saturating_duration_since(t.seen_at)) {
                t.restarts += 1;
                t.boot = None;
                self.metrics.restarted_on("vmm", 1);
                tracing::info!(vmm = %self.label, vm = %info.id, name = %info.name, "CVM restarted (its uptime reset)");
            }
            let container_restarts = vmm::container_restarts(&t.containers, &containers);
            if container_restarts > 0 {
                t.container_restarts += container_restarts;
                self.metrics.container_restarted(container_restarts);
            }
            if t.boot.is_none()
                && let Some(d) = vmm::boot_duration(&info, uptime, now_ms)
            {
                t.boot = Some(d.as_secs_f64());
                self.metrics.booted(d);
            }
            let status = vmm::status(&info);
            views.push(VmView {
                vmm: self.label.clone(),
                id: info.id.clone(),
                name: info.name.clone(),
                app: vmm::app_name(&info),
                app_id: info.app_id.clone(),
                instance_id: info.instance_id.clone(),
                status: status.label(),
                uptime_seconds: uptime.map(|u| u.as_secs()),
                boot_seconds: t.boot,
                boot_progress: info.boot_progress.clone(),
                last_seen: None,
                boot_error: info.boot_error.clone().filter(|e| !e.trim().is_empty()),
                restarts: t.restarts,
                container_restarts: t.container_restarts,
                memory_ratio: sys.as_ref().and_then(vmm::memory_ratio),
                containers: containers
                    .iter()
                    .map(|c| ContainerView {
                        name: c.name().to_owned(),
                        state: c.state.clone(),
                        status: c.status.clone(),
                    })
                    .collect(),
            });
            t.info = info;
            t.uptime = uptime;
            t.seen_at = now;
            t.containers = containers;
            next.insert(t.info.id.clone(), t);
        }
        self.tracked = next;
        views.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        self.view.set(self.index, true, views);
        self.metrics.publish(&self.view.all());
        self.metrics.source_poll("vmm", "ok", started.elapsed());
        Ok(())
    }
}

impl Task for VmmPoller {
    fn name(&self) -> &'static str {
        "cvm_vmm"
    }

    async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut tick = crate::runtime::ticker(self.interval);
        // A poll cut short by shutdown publishes nothing; the next start polls afresh.
        while cancel.run_until_cancelled(tick.tick()).await.is_some()
            && cancel.run_until_cancelled(self.poll_once()).await.is_some()
        {}
        Ok(())
    }
}
