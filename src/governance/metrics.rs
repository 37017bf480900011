//! `dstack_governance_*` metrics: what governs the contracts and the timelock queue. No address or
//! hash is ever a label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use super::state::{GovernanceState, Role};
use crate::alerts::Severity;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SeverityLabels {
    severity: &'static str,
}

const SEVERITIES: [Severity; 3] = [Severity::Info, Severity::Warning, Severity::Critical];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MissingLabels {
    missing: &'static str,
}

/// Buckets of confirmations a pending proposal still needs: closed, whatever the threshold.
const MISSING: [&str; 4] = ["0", "1", "2", "3_or_more"];

/// The pending proposals, as exported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueSummary {
    /// Pending proposals.
    pub pending: usize,
    /// Those with the confirmations to execute.
    pub executable: usize,
    /// Age of the oldest, in seconds (0 when none).
    pub oldest_age: i64,
    /// Proposals still needing 0, 1, 2, and 3 or more verified confirmations.
    pub missing_confirmations: [usize; 4],
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Every outcome of a Transaction Service request.
const SERVICE_OUTCOMES: [&str; 8] = [
    "ok",
    "unauthorized",
    "not_found",
    "rate_limited",
    "server_error",
    "error",
    "unreachable",
    "undecodable",
];

const KINDS: [(Role, &str); 4] = [
    (Role::Safe, "safe"),
    (Role::Timelock, "timelock"),
    (Role::Eoa, "eoa"),
    (Role::Contract, "contract"),
];

/// Governance metrics. Cheap to clone; clones update the same series.
#[derive(Clone, Debug)]
pub struct GovernanceMetrics {
    contracts: Family<KindLabels, Gauge>,
    ungoverned: Gauge,
    queue_depth: Gauge,
    next_ready: Gauge<f64, AtomicU64>,
    next_ready_in: Gauge<f64, AtomicU64>,
    min_delay: Gauge<f64, AtomicU64>,
    min_threshold_ratio: Gauge<f64, AtomicU64>,
    participation: Gauge<f64, AtomicU64>,
    findings: Family<SeverityLabels, Gauge>,
    affected: Gauge,
    service_requests: Family<OutcomeLabels, Counter>,
    service_latency: Histogram,
    indexing_lag: Gauge,
    proposals_pending: Gauge,
    proposals_executable: Gauge,
    missing: Family<MissingLabels, Gauge>,
    oldest_proposal_age: Gauge,
    simulations: Family<OutcomeLabels, Counter>,
    proposals: Family<KindLabels, Counter>,
}

impl GovernanceMetrics {
    /// Registers the families on `registry`, every series initialised.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            contracts: Family::default(),
            ungoverned: Gauge::default(),
            queue_depth: Gauge::default(),
            next_ready: Gauge::default(),
            next_ready_in: Gauge::default(),
            min_delay: Gauge::default(),
            min_threshold_ratio: Gauge::default(),
            participation: Gauge::default(),
            findings: Family::default(),
            affected: Gauge::default(),
            service_requests: Family::default(),
            service_latency: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            indexing_lag: Gauge::default(),
            proposals_pending: Gauge::default(),
            proposals_executable: Gauge::default(),
            missing: Family::default(),
            oldest_proposal_age: Gauge::default(),
            simulations: Family::default(),
            proposals: Family::default(),
        };
        for kind in ["safe", "timelock"] {
            let _ = m.proposals.get_or_create(&KindLabels { kind });
        }
        for outcome in ["simulated", "unsupported", "failed"] {
            let _ = m.simulations.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in SERVICE_OUTCOMES {
            let _ = m.service_requests.get_or_create(&OutcomeLabels { outcome });
        }
        for s in SEVERITIES {
            let _ = m.findings.get_or_create(&SeverityLabels {
                severity: s.label(),
            });
        }
        for (_, kind) in KINDS {
            let _ = m.contracts.get_or_create(&KindLabels { kind });
        }
        for missing in MISSING {
            let _ = m.missing.get_or_create(&MissingLabels { missing });
        }
        m.next_ready.set(f64::INFINITY);
        m.next_ready_in.set(f64::INFINITY);
        m.min_delay.set(f64::INFINITY);
        m.min_threshold_ratio.set(f64::INFINITY);
        m.participation.set(f64::INFINITY);
        registry.register(
            "dstack_governance_contracts",
            "Addresses that own or govern DstackKms and its apps, by what they are (safe, timelock, eoa, contract)",
            m.contracts.clone(),
        );
        registry.register(
            "dstack_governance_ungoverned_contracts",
            "DstackKms and apps whose owner is an externally owned account: no multisig or timelock governs them",
            m.ungoverned.clone(),
        );
        registry.register(
            "dstack_governance_timelock_queue_depth",
            "Timelock operations scheduled and neither executed nor cancelled",
            m.queue_depth.clone(),
        );
        registry.register(
            "dstack_governance_timelock_next_ready_timestamp_seconds",
            "When the next pending timelock operation becomes executable (Unix seconds; +Inf when none is pending)",
            m.next_ready.clone(),
        );
        registry.register(
            "dstack_governance_timelock_next_ready_in_seconds",
            "Seconds of chain time until the next pending timelock operation becomes executable (0 when one already is; +Inf when none is pending)",
            m.next_ready_in.clone(),
        );
        registry.register(
            "dstack_governance_timelock_min_delay_seconds",
            "Smallest minimum delay among the timelocks found (+Inf when there is none)",
            m.min_delay.clone(),
        );
        registry.register(
            "dstack_governance_safe_min_threshold_ratio",
            "Smallest threshold / owner count among the Safes found (+Inf when there is none)",
            m.min_threshold_ratio.clone(),
        );
        registry.register(
            "dstack_governance_signer_participation_ratio",
            "Smallest share, among the Safes found, of owners who signed anything in the last 7 days: on-chain approvals and execution signatures, and verified Transaction Service confirmations (+Inf when there is no Safe)",
            m.participation.clone(),
        );
        registry.register(
            "dstack_governance_findings",
            "Findings of the pending timelock operations, by severity (info, warning, critical)",
            m.findings.clone(),
        );
        registry.register(
            "dstack_governance_service_requests",
            "Safe Transaction Service requests by outcome (ok, unauthorized, not_found, rate_limited, server_error, error, unreachable, undecodable)",
            m.service_requests.clone(),
        );
        registry.register(
            "dstack_governance_service_request_duration_seconds",
            "Safe Transaction Service request latency",
            m.service_latency.clone(),
        );
        registry.register(
            "dstack_governance_service_indexing_lag_blocks",
            "Blocks the Transaction Service's index is behind its node (largest over the services)",
            m.indexing_lag.clone(),
        );
        registry.register(
            "dstack_governance_proposals",
            "New governance proposals announced (a Safe proposal seen on the Transaction Service, a timelock operation scheduled); label `kind` (`safe`, `timelock`)",
            m.proposals.clone(),
        );
        registry.register(
            "dstack_governance_proposals_pending",
            "Pending Safe proposals (Transaction Service queue, nonce not yet used)",
            m.proposals_pending.clone(),
        );
        registry.register(
            "dstack_governance_proposals_executable",
            "Pending Safe proposals whose verified confirmations reach the threshold",
            m.proposals_executable.clone(),
        );
        registry.register(
            "dstack_governance_proposals_missing_confirmations",
            "Pending Safe proposals by how many verified confirmations they still need to reach the threshold (missing: 0, 1, 2, 3_or_more)",
            m.missing.clone(),
        );
        registry.register(
            "dstack_governance_oldest_proposal_age_seconds",
            "Age of the oldest pending Safe proposal, from its submission (0 when none is pending)",
            m.oldest_proposal_age.clone(),
        );
        registry.register(
            "dstack_governance_simulations",
            "Pending proposals run in simulation, by outcome (simulated, unsupported: the node offers no eth_simulateV1, failed: retried next poll)",
            m.simulations.clone(),
        );
        registry.register(
            "dstack_governance_affected_instances",
            "Instances that received keys within governance.in_use_window with a measurement the worst pending operation removes",
            m.affected.clone(),
        );
        m
    }

    /// Counts a new proposal of `kind` (`safe` or `timelock`).
    pub fn proposal(&self, kind: &'static str) {
        self.proposals.get_or_create(&KindLabels { kind }).inc();
    }

    /// Exports the findings of the pending operations and the most instances one would cut off.
    pub fn pending_findings(
        &self,
        counts: &std::collections::BTreeMap<Severity, i64>,
        affected: u64,
    ) {
        for s in SEVERITIES {
            self.findings
                .get_or_create(&SeverityLabels {
                    severity: s.label(),
                })
                .set(counts.get(&s).copied().unwrap_or(0));
        }
        self.affected
            .set(i64::try_from(affected).unwrap_or(i64::MAX));
    }

    /// Exports signer participation (`None`: no Safe is followed).
    pub fn participation(&self, ratio: Option<f64>) {
        self.participation.set(ratio.unwrap_or(f64::INFINITY));
    }

    /// Counts one Transaction Service request.
    pub fn service_request(&self, outcome: &'static str, took: std::time::Duration) {
        self.service_requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.service_latency.observe(took.as_secs_f64());
    }

    /// Counts one simulation.
    pub fn simulation(&self, outcome: &'static str) {
        self.simulations
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Sets the services' indexing lag.
    pub fn indexing_lag(&self, blocks: u64) {
        self.indexing_lag
            .set(i64::try_from(blocks).unwrap_or(i64::MAX));
    }

    /// Exports the pending proposals.
    pub fn proposals(&self, q: &QueueSummary) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.proposals_pending.set(n(q.pending));
        self.proposals_executable.set(n(q.executable));
        self.oldest_proposal_age.set(q.oldest_age);
        for (missing, count) in MISSING.into_iter().zip(q.missing_confirmations) {
            self.missing
                .get_or_create(&MissingLabels { missing })
                .set(n(count));
        }
    }

    /// Exports `state`.
    pub fn update(&self, state: &GovernanceState) {
        for (role, kind) in KINDS {
            let n = state.roles.values().filter(|r| **r == role).count();
            self.contracts
                .get_or_create(&KindLabels { kind })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let ungoverned = state
            .owned
            .values()
            .filter(|o| o.owner.and_then(|a| state.roles.get(&a)) == Some(&Role::Eoa))
            .count();
        self.ungoverned
            .set(i64::try_from(ungoverned).unwrap_or(i64::MAX));
        let queue = state.queue();
        self.queue_depth
            .set(i64::try_from(queue.len()).unwrap_or(i64::MAX));
        let next = queue.iter().filter_map(|(_, _, op)| op.ready_at).min();
        self.next_ready
            .set(next.map_or(f64::INFINITY, |t| t as f64));
        // By chain time, as readiness is decided.
        self.next_ready_in
            .set(next.map_or(f64::INFINITY, |t| t.saturating_sub(state.time) as f64));
        let min_delay = state
            .timelocks
            .iter()
            .filter(|(a, _)| state.roles.get(*a) == Some(&Role::Timelock))
            .map(|(_, t)| t.min_delay)
            .min()
            .map_or(f64::INFINITY, |d| d as f64);
        self.min_delay.set(min_delay);
        let ratio = state
            .safes
            .values()
            .filter(|s| !s.owners.is_empty())
            .map(|s| s.threshold as f64 / s.owners.len() as f64)
            .fold(f64::INFINITY, f64::min);
        self.min_threshold_ratio.set(ratio);
    }
}
