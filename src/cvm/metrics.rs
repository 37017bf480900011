//! `dstack_cvm_*` metrics. Aggregates always exist; per-instance series (labels `instance`, the
//! VM's name, and `app`, its app's name from the compose file) exist for at most `cvm.max_instance_series` VMs and go when their VM or its VMM
//! does, instead of turning into zeros. No app or instance id is ever a label.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use super::client::SourceError;
use super::vmm::{VmStatus, VmView};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    source: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyLabels {
    proxy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyCheckLabels {
    proxy: String,
    check: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct InstanceLabels {
    instance: String,
    /// The app's name, empty until a full answer told it.
    app: String,
}

/// Where polls go.
const SOURCES: [&str; 4] = ["vmm", "guest", "gateway", "peer_metrics"];

/// CVM metrics. Cheap to clone; clones update the same series.
#[derive(Clone, Debug)]
pub struct CvmMetrics {
    deployments: Counter,
    restarts: Family<SourceLabels, Counter>,
    known: Gauge,
    last_boot: Gauge,
    instances: Family<StatusLabels, Gauge>,
    up: Family<InstanceLabels, Gauge>,
    last_seen: Family<InstanceLabels, Gauge>,
    gateway_hosts: Gauge,
    gateway_stale: Gauge,
    memory: Family<InstanceLabels, Gauge<f64, AtomicU64>>,
    boot_duration: Histogram,
    container_restarts: Counter,
    polls: Family<OutcomeLabels, Counter>,
    poll_duration: Family<SourceLabels, Histogram>,
    capped: Gauge,
    stuck: Gauge,
    unmonitored: Gauge,
    peer_up: Family<PeerLabels, Gauge>,
    proxy_up: Family<ProxyLabels, Gauge>,
    proxy_checks: Family<ProxyCheckLabels, Gauge>,
    peer_latency: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    peer_expiry: Family<PeerLabels, Gauge>,
    peer_attestations: Family<PeerLabels, Counter>,
    peer_failures: Family<PeerLabels, Counter>,
    max_series: usize,
    exported: Arc<Mutex<BTreeSet<InstanceLabels>>>,
}

impl CvmMetrics {
    /// Registers the families on `registry`, every aggregate series initialised; at most
    /// `max_series` VMs get per-instance series.
    pub fn new(registry: &mut Registry, max_series: usize) -> Self {
        let m = Self {
            deployments: Counter::default(),
            restarts: Family::default(),
            known: Gauge::default(),
            last_boot: Gauge::default(),
            instances: Family::default(),
            up: Family::default(),
            last_seen: Family::default(),
            gateway_hosts: Gauge::default(),
            gateway_stale: Gauge::default(),
            memory: Family::default(),
            boot_duration: Histogram::new([
                5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 1200.0,
            ]),
            container_restarts: Counter::default(),
            polls: Family::default(),
            poll_duration: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.005, 2.0, 12,
                ))
            }),
            capped: Gauge::default(),
            stuck: Gauge::default(),
            unmonitored: Gauge::default(),
            peer_up: Family::default(),
            proxy_up: Family::default(),
            proxy_checks: Family::default(),
            peer_latency: Family::default(),
            peer_expiry: Family::default(),
            peer_attestations: Family::default(),
            peer_failures: Family::default(),
            max_series,
            exported: Arc::default(),
        };
        for source in ["kms", "vmm"] {
            let _ = m.restarts.get_or_create(&SourceLabels { source });
        }
        for s in VmStatus::ALL {
            let _ = m
                .instances
                .get_or_create(&StatusLabels { status: s.label() });
        }
        for source in SOURCES {
            let _ = m.poll_duration.get_or_create(&SourceLabels { source });
            for outcome in std::iter::once("ok").chain(SourceError::LABELS) {
                let _ = m.polls.get_or_create(&OutcomeLabels { source, outcome });
            }
        }
        registry.register(
            "dstack_cvm_deployments",
            "CVMs deployed: instances whose first boot this KMS released keys to, since start",
            m.deployments.clone(),
        );
        registry.register(
            "dstack_cvm_restarts",
            "CVM restarts, by where they were seen (kms: a later boot of an instance that received keys before; vmm: an uptime reset between polls)",
            m.restarts.clone(),
        );
        registry.register(
            "dstack_cvm_known_instances",
            "Instances that ever received keys from this KMS (its boot records)",
            m.known.clone(),
        );
        registry.register(
            "dstack_cvm_last_boot_timestamp_seconds",
            "When the latest boot an instance received keys for happened (Unix seconds; 0 when none)",
            m.last_boot.clone(),
        );
        registry.register(
            "dstack_cvm_instances",
            "VMs on the polled dstack-vmm hosts, by status (running, stopping, stopped, removing, error: exited, boot error or out of automatic restarts, unknown)",
            m.instances.clone(),
        );
        registry.register(
            "dstack_cvm_up",
            "Whether a VM runs (1) or not (0), per VM name, for at most cvm.max_instance_series VMs",
            m.up.clone(),
        );
        registry.register(
            "dstack_cvm_last_seen_timestamp_seconds",
            "When the gateway last saw a VM's instance (its latest WireGuard handshake, Unix seconds), per VM name, for at most cvm.max_instance_series VMs",
            m.last_seen.clone(),
        );
        registry.register(
            "dstack_cvm_gateway_hosts",
            "Instances the dstack gateway routes",
            m.gateway_hosts.clone(),
        );
        registry.register(
            "dstack_cvm_gateway_stale_hosts",
            "Instances the gateway routes whose latest WireGuard handshake is more than 3 minutes old (or none yet)",
            m.gateway_stale.clone(),
        );
        registry.register(
            "dstack_cvm_memory_usage_ratio",
            "Memory in use / total in a running VM's guest, per VM name, for at most cvm.max_instance_series VMs",
            m.memory.clone(),
        );
        registry.register(
            "dstack_cvm_boot_duration_seconds",
            "How long VMs took from process start to boot progress done",
            m.boot_duration.clone(),
        );
        registry.register(
            "dstack_cvm_container_restarts",
            "Container restarts inside VMs (into restarting, a new container under a name, or its up time going back)",
            m.container_restarts.clone(),
        );
        registry.register(
            "dstack_cvm_source_polls",
            "Requests to the CVM sources, by source (vmm, guest, gateway) and outcome (ok, unreachable, timeout, unauthorized, http_error, too_large, malformed)",
            m.polls.clone(),
        );
        registry.register(
            "dstack_cvm_source_poll_duration_seconds",
            "How long a whole poll of a source took, by source",
            m.poll_duration.clone(),
        );
        registry.register(
            "dstack_cvm_stuck_instances",
            "Running VMs whose boot is not done cvm.boot_timeout after they started (most likely stuck at the key request)",
            m.stuck.clone(),
        );
        registry.register(
            "dstack_cvm_unmonitored_instances",
            "Instances that received keys within cvm.unmonitored_window and run on no polled VMM (kept as last told while a VMM does not answer)",
            m.unmonitored.clone(),
        );
        registry.register(
            "dstack_cvm_peer_kms_up",
            "Whether a probed KMS answered /health and KMS.GetMeta over TLS (1) or not (0), by peer (its index in [[cvm.peer_kms]])",
            m.peer_up.clone(),
        );
        registry.register(
            "dstack_cvm_peer_kms_probe_duration_seconds",
            "How long the last successful probe of a peer KMS took, by peer",
            m.peer_latency.clone(),
        );
        registry.register(
            "dstack_cvm_peer_kms_cert_expiry_seconds",
            "Seconds until a peer KMS's TLS certificate expires (negative: expired), by peer",
            m.peer_expiry.clone(),
        );
        registry.register(
            "dstack_cvm_peer_kms_attestation_requests",
            "Attestations a peer KMS counted (its dstack_kms_attestation_requests_total, scraped when metrics_url is set), by peer",
            m.peer_attestations.clone(),
        );
        registry.register(
            "dstack_cvm_peer_kms_attestation_failures",
            "Attestations a peer KMS counted as failed (its dstack_kms_attestation_failures_total, scraped when metrics_url is set), by peer",
            m.peer_failures.clone(),
        );
        registry.register(
            "dstack_cvm_vsock_proxy_up",
            "Whether a Nitro Enclave vsock proxy passes every configured check (1) or not (0), by proxy (its index in [[cvm.nitro_proxy]])",
            m.proxy_up.clone(),
        );
        registry.register(
            "dstack_cvm_vsock_proxy_check_up",
            "Whether one check of a vsock proxy passes (1) or not (0), by proxy and check (systemd, process, listening, connect)",
            m.proxy_checks.clone(),
        );
        registry.register(
            "dstack_cvm_instance_series_capped",
            "VMs left without per-instance series because of cvm.max_instance_series",
            m.capped.clone(),
        );
        m
    }

    /// Counts a deployment.
    pub fn deployed(&self) {
        self.deployments.inc();
    }

    /// Counts `n` restarts seen by `source` (`kms` or `vmm`).
    pub fn restarted_on(&self, source: &'static str, n: u64) {
        self.restarts
            .get_or_create(&SourceLabels { source })
            .inc_by(n);
    }

    /// Exports the fleet's size and latest boot, from the KMS's records.
    pub fn fleet(&self, known: usize, last_boot: i64) {
        self.known.set(i64::try_from(known).unwrap_or(i64::MAX));
        self.last_boot.set(last_boot);
    }

    /// Exports the fleet join (`unmonitored`: `None` while it cannot be told; the last value
    /// stays).
    pub fn joined(&self, stuck: usize, unmonitored: Option<usize>) {
        self.stuck.set(i64::try_from(stuck).unwrap_or(i64::MAX));
        if let Some(n) = unmonitored {
            self.unmonitored.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Exports a probe of peer `index`: its latency and certificate expiry when it was up.
    pub fn peer(&self, index: usize, up: Option<(Duration, Option<i64>)>) {
        let labels = PeerLabels {
            peer: index.to_string(),
        };
        self.peer_up
            .get_or_create(&labels)
            .set(i64::from(up.is_some()));
        if let Some((latency, expiry)) = up {
            self.peer_latency
                .get_or_create(&labels)
                .set(latency.as_secs_f64());
            if let Some(e) = expiry {
                self.peer_expiry.get_or_create(&labels).set(e);
            }
        }
    }

    /// Advances peer `index`'s re-exported attestation counters.
    pub fn peer_attestations(&self, index: usize, requests: u64, failures: u64) {
        let labels = PeerLabels {
            peer: index.to_string(),
        };
        self.peer_attestations
            .get_or_create(&labels)
            .inc_by(requests);
        self.peer_failures.get_or_create(&labels).inc_by(failures);
    }

    /// Exports the gateway's hosts and stale hosts (`None`: it did not answer).
    pub fn gateway(&self, hosts: Option<(usize, usize)>) {
        let (n, stale) = hosts.unwrap_or((0, 0));
        self.gateway_hosts.set(i64::try_from(n).unwrap_or(i64::MAX));
        self.gateway_stale
            .set(i64::try_from(stale).unwrap_or(i64::MAX));
    }

    /// Exports the checks of vsock proxy `index`: each check's label and whether it passed.
    pub fn nitro_proxy(&self, index: usize, results: &[(&'static str, bool)]) {
        let proxy = index.to_string();
        for (check, passed) in results {
            self.proxy_checks
                .get_or_create(&ProxyCheckLabels {
                    proxy: proxy.clone(),
                    check,
                })
                .set(i64::from(*passed));
        }
        self.proxy_up
            .get_or_create(&ProxyLabels { proxy })
            .set(i64::from(results.iter().all(|(_, passed)| *passed)));
    }

    /// Observes one boot's duration.
    pub fn booted(&self, d: Duration) {
        self.boot_duration.observe(d.as_secs_f64());
    }

    /// Counts `n` container restarts.
    pub fn container_restarted(&self, n: u64) {
        self.container_restarts.inc_by(n);
    }

    /// Counts one whole poll of `source` with its outcome.
    pub fn source_poll(&self, source: &'static str, outcome: &'static str, took: Duration) {
        self.polls
            .get_or_create(&OutcomeLabels { source, outcome })
            .inc();
        self.poll_duration
            .get_or_create(&SourceLabels { source })
            .observe(took.as_secs_f64());
    }

    /// Counts one failed request to `source` within a poll.
    pub fn source_error(&self, source: &'static str, outcome: &'static str) {
        self.polls
            .get_or_create(&OutcomeLabels { source, outcome })
            .inc();
    }

    /// Exports every VMM's VMs: the counts by status, and per-instance series for the first
    /// `max_series` VM names (the others' removed).
    pub fn publish(&self, vms: &[VmView]) {
        for s in VmStatus::ALL {
            let n = vms.iter().filter(|v| v.status == s.label()).count();
            self.instances
                .get_or_create(&StatusLabels { status: s.label() })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut named: Vec<&VmView> = vms.iter().collect();
        named.sort_by(|a, b| a.name.cmp(&b.name));
        named.dedup_by(|a, b| a.name == b.name);
        let capped = named.len().saturating_sub(self.max_series);
        self.capped.set(i64::try_from(capped).unwrap_or(i64::MAX));
        let mut exported = self.exported.lock().unwrap_or_else(|e| e.into_inner());
        let mut now = BTreeSet::new();
        for v in named.into_iter().take(self.max_series) {
            let labels = InstanceLabels {
                instance: v.name.clone(),
                app: v.app.clone().unwrap_or_default(),
            };
            self.up
                .get_or_create(&labels)
                .set(i64::from(v.status == VmStatus::Running.label()));
            match v.last_seen {
                Some(t) => {
                    self.last_seen
                        .get_or_create(&labels)
                        .set(i64::try_from(t).unwrap_or(i64::MAX));
                }
                None => {
                    self.last_seen.remove(&labels);
                }
            }
            match v.memory_ratio {
                Some(r) => {
                    self.memory.get_or_create(&labels).set(r);
                }
                None => {
                    self.memory.remove(&labels);
                }
            }
            now.insert(labels);
        }
        for gone in exported.difference(&now) {
            self.up.remove(gone);
            self.last_seen.remove(gone);
            self.memory.remove(gone);
        }
        *exported = now;
    }
}
