//! `dstack_chain_*` (the chain follower, its RPC pool and the live path) and `dstack_kms_*` (the KMS
//! mirror projection) metrics.
//!
//! Flow: [`ChainMetrics::new`] registers every series at start-up with every closed label set
//! pre-initialised to 0 (endpoints by index, never by URL); the RPC pool, the follower and
//! [`super::Mirror`] update clones of it.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::authz::{Decision, Reason, Source};
use super::mirror::MirrorSizes;

/// JSON-RPC methods the follower, the live path and the governance simulator call.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Method {
    /// `eth_chainId`.
    EthChainId,
    /// `eth_getBlockByNumber`.
    EthGetBlockByNumber,
    /// `eth_getLogs`.
    EthGetLogs,
    /// `eth_getCode`.
    EthGetCode,
    /// `eth_getStorageAt`.
    EthGetStorageAt,
    /// `eth_call`.
    EthCall,
    /// `eth_simulateV1` (governance simulation).
    EthSimulateV1,
}

impl Method {
    /// The JSON-RPC method name (the metric label).
    pub fn label(self) -> &'static str {
        match self {
            Self::EthChainId => "eth_chainId",
            Self::EthGetBlockByNumber => "eth_getBlockByNumber",
            Self::EthGetLogs => "eth_getLogs",
            Self::EthGetCode => "eth_getCode",
            Self::EthGetStorageAt => "eth_getStorageAt",
            Self::EthCall => "eth_call",
            Self::EthSimulateV1 => "eth_simulateV1",
        }
    }

    const ALL: [Method; 7] = [
        Self::EthChainId,
        Self::EthGetBlockByNumber,
        Self::EthGetLogs,
        Self::EthGetCode,
        Self::EthGetStorageAt,
        Self::EthCall,
        Self::EthSimulateV1,
    ];
}

/// How an RPC request ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RpcOutcome {
    /// Answered.
    Ok,
    /// Transport or node error.
    Error,
    /// No answer within `chain.request_timeout`.
    Timeout,
    /// `eth_getLogs` refused the range as too large (the range shrinks; not the endpoint's fault).
    TooManyResults,
    /// `eth_call` reverted: the chain's answer, not the endpoint's fault.
    Reverted,
}

impl RpcOutcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Timeout => "timeout",
            Self::TooManyResults => "too_many_results",
            Self::Reverted => "reverted",
        }
    }

    const ALL: [RpcOutcome; 5] = [
        Self::Ok,
        Self::Error,
        Self::Timeout,
        Self::TooManyResults,
        Self::Reverted,
    ];
}

/// Which check a decision answered.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Check {
    /// `isKmsAllowed`.
    Kms,
    /// `isAppAllowed`.
    App,
}

/// Sets whose sizes are exported.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum MirrorSet {
    /// Allowed aggregated MRs.
    AllowedAggregatedMrs,
    /// Allowed KMS devices.
    KmsDevices,
    /// Allowed OS images.
    OsImages,
    /// Registered apps.
    RegisteredApps,
    /// Compose hashes over all apps.
    ComposeHashes,
}

impl Check {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Kms => "kms",
            Self::App => "app",
        }
    }
}

impl MirrorSet {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::AllowedAggregatedMrs => "allowed_aggregated_mrs",
            Self::KmsDevices => "kms_devices",
            Self::OsImages => "os_images",
            Self::RegisteredApps => "registered_apps",
            Self::ComposeHashes => "compose_hashes",
        }
    }
}

/// Label values are the types' snake_case `label()`s.
macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.label())
            }
        }
    )*};
}

label_value!(
    Method,
    RpcOutcome,
    Check,
    MirrorSet,
    Reason,
    Source,
    LiveOutcome
);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    endpoint: u16,
    method: Method,
    outcome: RpcOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    endpoint: u16,
    method: Method,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SetLabels {
    set: MirrorSet,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    check: Check,
    source: Source,
    reason: Reason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LiveLabels {
    contract: Check,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LiveCallLabels {
    check: Check,
    outcome: LiveOutcome,
}

/// How a live authorization call ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum LiveOutcome {
    /// The chain answered.
    Answered,
    /// Served from the per-block cache.
    Cached,
    /// No answer (every endpoint failed or timed out, or the answer did not decode).
    Failed,
}

impl LiveOutcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::Cached => "cached",
            Self::Failed => "failed",
        }
    }

    const ALL: [LiveOutcome; 3] = [Self::Answered, Self::Cached, Self::Failed];
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Chain and mirror metrics. Cheap to clone; clones update the same series.
#[derive(Clone, Debug)]
pub struct ChainMetrics {
    head_block: Gauge,
    processed_block: Gauge,
    lag_blocks: Gauge,
    lag_seconds: Gauge<f64, AtomicU64>,
    staleness_seconds: Gauge<f64, AtomicU64>,
    backfill_progress: Gauge<f64, AtomicU64>,
    batches: Counter,
    logs: Counter,
    reorgs: Counter,
    reorg_depth: Histogram,
    resyncs: Counter,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_latency: Family<LatencyLabels, Histogram>,
    endpoint_up: Family<EndpointLabels, Gauge>,
    endpoint_wrong_chain: Family<EndpointLabels, Gauge>,
    failovers: Counter,
    mirror_entries: Family<SetLabels, Gauge>,
    decisions: Family<DecisionLabels, Counter>,
    live_contracts: Family<LiveLabels, Gauge>,
    measurements: Family<KindLabels, Counter>,
    live_calls: Family<LiveCallLabels, Counter>,
    live_latency: Histogram,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

impl ChainMetrics {
    /// Registers the metrics with series for `endpoints` RPC endpoints (at least one, so the
    /// families are visible when the mirror is off).
    pub fn new(registry: &mut Registry, endpoints: usize) -> Self {
        let m = Self {
            head_block: Gauge::default(),
            processed_block: Gauge::default(),
            lag_blocks: Gauge::default(),
            lag_seconds: Gauge::default(),
            staleness_seconds: Gauge::default(),
            backfill_progress: Gauge::default(),
            batches: Counter::default(),
            logs: Counter::default(),
            reorgs: Counter::default(),
            reorg_depth: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            resyncs: Counter::default(),
            rpc_requests: Family::default(),
            rpc_latency: Family::new_with_constructor(latency_histogram),
            endpoint_up: Family::default(),
            endpoint_wrong_chain: Family::default(),
            failovers: Counter::default(),
            mirror_entries: Family::default(),
            decisions: Family::default(),
            live_contracts: Family::default(),
            measurements: Family::default(),
            live_calls: Family::default(),
            live_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        };
        let r = registry;
        r.register("dstack_chain_head_block", "Newest block number the chain follower saw at the chain head (latest, before confirmations)", m.head_block.clone());
        r.register(
            "dstack_chain_processed_block",
            "Newest block whose events are committed to the store and applied to every projection",
            m.processed_block.clone(),
        );
        r.register(
            "dstack_chain_lag_blocks",
            "head_block minus processed_block",
            m.lag_blocks.clone(),
        );
        r.register("dstack_chain_lag_seconds", "On-chain sync lag: block timestamp of the newest head seen minus block timestamp of the processed block (chain time, includes the confirmation depth)", m.lag_seconds.clone());
        r.register("dstack_chain_staleness_seconds", "Wall-clock seconds since the follower last read the head and had processed everything up to its confirmed target; authorization fails closed above chain.max_staleness", m.staleness_seconds.clone());
        r.register("dstack_chain_backfill_progress_ratio", "Share of the blocks from start_block to the confirmed target that are processed (1 when caught up)", m.backfill_progress.clone());
        r.register(
            "dstack_chain_batches",
            "Batches committed (events, block hash and checkpoint in one transaction)",
            m.batches.clone(),
        );
        r.register(
            "dstack_chain_logs_processed",
            "Logs of the watched contracts committed to the store",
            m.logs.clone(),
        );
        r.register(
            "dstack_chain_measurements_registered",
            "Measurements allowed on DstackKms or an app, as the leader applied them; label `kind` (`kms_aggregated_mr`, `kms_device`, `os_image`, `compose_hash`, `device`)",
            m.measurements.clone(),
        );
        for kind in crate::chain::events::MEASUREMENT_KINDS {
            let _ = m.measurements.get_or_create(&KindLabels { kind });
        }
        r.register(
            "dstack_chain_reorgs",
            "Reorgs detected (stored block hash no longer canonical)",
            m.reorgs.clone(),
        );
        r.register(
            "dstack_chain_reorg_depth_blocks",
            "Depth of each detected reorg: processed block minus common ancestor",
            m.reorg_depth.clone(),
        );
        r.register("dstack_chain_resyncs", "Full resyncs from start_block, every projection (reorg deeper than chain.reorg_window, or another start block configured); another KMS contract refetches the KMS projection alone", m.resyncs.clone());
        r.register(
            "dstack_chain_rpc_requests",
            "JSON-RPC requests by endpoint index (position in chain.rpc_urls), method and outcome",
            m.rpc_requests.clone(),
        );
        r.register(
            "dstack_chain_rpc_request_duration_seconds",
            "JSON-RPC request latency by endpoint index and method",
            m.rpc_latency.clone(),
        );
        r.register(
            "dstack_chain_rpc_endpoint_up",
            "1 while the endpoint is not backed off after errors, by endpoint index",
            m.endpoint_up.clone(),
        );
        r.register(
            "dstack_chain_rpc_endpoint_wrong_chain",
            "1 while the endpoint's eth_chainId is not the mirror's chain (it is not used), by endpoint index",
            m.endpoint_wrong_chain.clone(),
        );
        r.register(
            "dstack_chain_rpc_failovers",
            "Requests moved to another endpoint after an endpoint failed",
            m.failovers.clone(),
        );
        r.register("dstack_kms_mirror_entries", "Size of the mirror's sets: allowed aggregated MRs, KMS devices, OS images, registered apps, compose hashes (all apps)", m.mirror_entries.clone());
        r.register(
            "dstack_kms_mirror_decisions",
            "isKmsAllowed/isAppAllowed decisions of the chain backend by check, source (mirror: answered locally; eth_call: asked of the chain because the answering code is not known) and reason",
            m.decisions.clone(),
        );
        r.register(
            "dstack_chain_live_evaluation_contracts",
            "Contracts whose decisions are asked of the chain with eth_call because the code that answers for them is not known (contract: kms, or app = registered apps); above 0 means an unknown implementation is live",
            m.live_contracts.clone(),
        );
        r.register(
            "dstack_chain_live_calls",
            "Live isKmsAllowed/isAppAllowed eth_calls by check and outcome (answered, cached within the block, failed: refused with auth_unavailable)",
            m.live_calls.clone(),
        );
        r.register(
            "dstack_chain_live_call_duration_seconds",
            "Latency of live isKmsAllowed/isAppAllowed eth_calls that went to the chain (failover included)",
            m.live_latency.clone(),
        );

        for endpoint in 0..u16::try_from(endpoints.max(1)).unwrap_or(u16::MAX) {
            m.endpoint_up
                .get_or_create(&EndpointLabels { endpoint })
                .set(1);
            m.endpoint_wrong_chain
                .get_or_create(&EndpointLabels { endpoint })
                .set(0);
            for method in Method::ALL {
                let _ = m
                    .rpc_latency
                    .get_or_create(&LatencyLabels { endpoint, method });
                for outcome in RpcOutcome::ALL {
                    let _ = m.rpc_requests.get_or_create(&RpcLabels {
                        endpoint,
                        method,
                        outcome,
                    });
                }
            }
        }
        m.set_sizes(&MirrorSizes::default());
        for check in [Check::Kms, Check::App] {
            for source in [Source::Mirror, Source::EthCall] {
                for reason in Reason::ALL {
                    let _ = m.decisions.get_or_create(&DecisionLabels {
                        check,
                        source,
                        reason,
                    });
                }
            }
            let _ = m
                .live_contracts
                .get_or_create(&LiveLabels { contract: check });
            for outcome in LiveOutcome::ALL {
                let _ = m
                    .live_calls
                    .get_or_create(&LiveCallLabels { check, outcome });
            }
        }
        m
    }

    /// Sets the number of contracts on live evaluation.
    pub fn live_contracts(&self, kms: usize, apps: usize) {
        for (contract, n) in [(Check::Kms, kms), (Check::App, apps)] {
            self.live_contracts
                .get_or_create(&LiveLabels { contract })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Counts a live call (and times it when it went to the chain).
    pub fn live_call(&self, check: Check, outcome: LiveOutcome, seconds: Option<f64>) {
        self.live_calls
            .get_or_create(&LiveCallLabels { check, outcome })
            .inc();
        if let Some(s) = seconds {
            self.live_latency.observe(s);
        }
    }

    /// Records one RPC request.
    pub fn rpc(&self, endpoint: u16, method: Method, outcome: RpcOutcome, seconds: f64) {
        self.rpc_requests
            .get_or_create(&RpcLabels {
                endpoint,
                method,
                outcome,
            })
            .inc();
        self.rpc_latency
            .get_or_create(&LatencyLabels { endpoint, method })
            .observe(seconds);
    }

    /// Marks an endpoint backed off (false) or usable (true).
    pub fn endpoint_up(&self, endpoint: u16, up: bool) {
        self.endpoint_up
            .get_or_create(&EndpointLabels { endpoint })
            .set(i64::from(up));
    }

    /// Sets whether an endpoint serves another chain.
    pub fn endpoint_wrong_chain(&self, endpoint: u16, wrong: bool) {
        self.endpoint_wrong_chain
            .get_or_create(&EndpointLabels { endpoint })
            .set(i64::from(wrong));
    }

    /// Counts a failover.
    pub fn failover(&self) {
        self.failovers.inc();
    }

    /// Records the head seen and the processed block.
    pub fn progress(&self, head: u64, processed: u64, lag_seconds: f64, backfill: f64) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.head_block.set(g(head));
        self.processed_block.set(g(processed));
        self.lag_blocks.set(g(head.saturating_sub(processed)));
        self.lag_seconds.set(lag_seconds);
        self.backfill_progress.set(backfill);
    }

    /// Sets the staleness gauge.
    pub fn staleness(&self, seconds: f64) {
        self.staleness_seconds.set(seconds);
    }

    /// Counts a committed batch and its logs.
    pub fn batch(&self, logs: u64) {
        self.batches.inc();
        self.logs.inc_by(logs);
    }

    /// Counts a reorg of `depth` blocks.
    pub fn reorg(&self, depth: u64) {
        self.reorgs.inc();
        self.reorg_depth.observe(depth as f64);
    }

    /// Counts a measurement allowed on chain (`kind` from [`crate::chain::events::MEASUREMENT_KINDS`]).
    pub fn measurement_registered(&self, kind: &'static str) {
        self.measurements.get_or_create(&KindLabels { kind }).inc();
    }

    /// Counts a full resync.
    pub fn resync(&self) {
        self.resyncs.inc();
    }

    /// Exports the mirror's set sizes.
    pub fn set_sizes(&self, s: &MirrorSizes) {
        let pairs = [
            (MirrorSet::AllowedAggregatedMrs, s.allowed_aggregated_mrs),
            (MirrorSet::KmsDevices, s.kms_devices),
            (MirrorSet::OsImages, s.os_images),
            (MirrorSet::RegisteredApps, s.registered_apps),
            (MirrorSet::ComposeHashes, s.compose_hashes),
        ];
        for (set, n) in pairs {
            self.mirror_entries
                .get_or_create(&SetLabels { set })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Counts a decision.
    pub fn decision(&self, check: Check, d: &Decision) {
        self.decisions
            .get_or_create(&DecisionLabels {
                check,
                source: d.source,
                reason: d.reason,
            })
            .inc();
    }
}
