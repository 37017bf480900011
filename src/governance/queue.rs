//! The off-chain side of the governance watcher: each watched Safe's pending queue on its
//! Transaction Service, checked locally.
//!
//! Flow, per poll (`governance.poll_interval`): the Safes the chain side found (and the configured
//! ones) → for each with a service, its on-chain nonce (a Safe whose state is not known yet is
//! skipped: no queue is judged against a guessed nonce) → the service's pending rows from that
//! nonce on → dead slots (executed, or below the nonce) dropped → each row's removals counted in
//! the boot records → contract owners' signatures asked of the chain (EIP-1271, as the Safe asks
//! them) → [`proposals::check`] → conflicts (several rows for one nonce) named →
//! published in the [`ProposalsView`] the notifier and the admin API read. A service failing with
//! 5xx or no answer is left alone with backoff (1 s doubling to 5 min); a 429 holds its limiter
//! for `Retry-After`; 401/403 is logged as the configuration error it is. Each service's indexing
//! lag is read once per poll.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, U256};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::classify::{Finding, Rule, Severity};
use super::config::GovernanceConfig;
use super::metrics::GovernanceMetrics;
use super::proposals::{self, Proposal};
use super::simulate::Simulator;
use super::state::{Role, SafeState};
use super::txservice::{ServiceError, TxRow, TxService};
use super::watch::GovernanceView;
use crate::chain::ChainError;
use crate::runtime::Task;
use crate::store::Store;

/// EIP-1271 as Safe 1.3.0 / 1.4.1 ask a contract owner (`ISignatureValidator`): the transaction's
/// preimage and the owner's signature data, answered by a magic value.
#[allow(missing_docs)]
mod eip1271 {
    alloy::sol! {
        function isValidSignature(bytes _data, bytes _signature) external view returns (bytes4);
    }

    /// What a contract owner answers when it accepts the signature.
    pub const MAGIC: alloy::primitives::FixedBytes<4> = alloy::primitives::fixed_bytes!("20c13b0b");
}

/// Longest pause of a failing service.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// One Safe's queue as last read.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SafeQueue {
    /// Pending proposals, by nonce.
    pub proposals: Vec<Proposal>,
    /// Why the last poll failed, if it did.
    pub error: Option<String>,
}

/// Every watched Safe's queue.
#[derive(Debug)]
pub struct ProposalsView {
    queues: RwLock<Arc<BTreeMap<Address, SafeQueue>>>,
    /// Bumped on every publish: the notifier wakes on it.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for ProposalsView {
    fn default() -> Self {
        Self {
            queues: RwLock::default(),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl ProposalsView {
    /// The queues as last read.
    pub fn snapshot(&self) -> Arc<BTreeMap<Address, SafeQueue>> {
        self.queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn publish(&self, q: BTreeMap<Address, SafeQueue>) {
        *self.queues.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(q);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Signals each publish from now on.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// A service and when it may be asked again.
struct Service {
    client: TxService,
    retry_at: Option<Instant>,
    failures: u32,
}

/// The queue watcher task.
pub struct QueueWatcher {
    view: Arc<GovernanceView>,
    out: Arc<ProposalsView>,
    store: Store,
    window: Duration,
    poll_interval: Duration,
    delegates: Vec<Address>,
    configured: Vec<Address>,
    /// Base URL → service (one limiter per service).
    services: HashMap<String, Service>,
    /// Safe → base URL of its service.
    service_of: HashMap<Address, String>,
    /// Base URL of the service of every other Safe.
    default_service: Option<String>,
    /// Runs each new proposal in simulation.
    simulator: Option<Simulator>,
    /// Simulation findings per safeTxHash (a proposal is simulated once).
    simulated: HashMap<alloy::primitives::B256, Vec<Finding>>,
    metrics: GovernanceMetrics,
}

impl QueueWatcher {
    /// A watcher of the queues `cfg` names, publishing into `out`.
    pub fn new(
        cfg: &GovernanceConfig,
        view: Arc<GovernanceView>,
        out: Arc<ProposalsView>,
        store: Store,
        simulator: Option<Simulator>,
        metrics: GovernanceMetrics,
    ) -> Self {
        let mut services = HashMap::new();
        let mut add = |url: &str, key: Option<String>| {
            let base = url.trim_end_matches('/').to_owned();
            services.entry(base.clone()).or_insert_with(|| Service {
                client: TxService::new(
                    &base,
                    key,
                    cfg.transaction_service_rate,
                    Duration::from_secs(10),
                    metrics.clone(),
                ),
                retry_at: None,
                failures: 0,
            });
            base
        };
        let resolve = |s: &Option<crate::secret::SecretRef>| {
            s.as_ref()
                .and_then(|k| k.resolve().ok())
                .map(|v| v.expose().to_owned())
        };
        let default_service = cfg
            .transaction_service
            .as_deref()
            .map(|u| add(u, resolve(&cfg.transaction_service_api_key)));
        let mut service_of = HashMap::new();
        for s in &cfg.safes {
            if let (Ok(a), Some(u)) = (s.address.parse::<Address>(), &s.transaction_service) {
                let key = resolve(&s.api_key).or_else(|| resolve(&cfg.transaction_service_api_key));
                service_of.insert(a, add(u, key));
            }
        }
        Self {
            view,
            out,
            store,
            window: cfg.in_use_window,
            poll_interval: cfg.poll_interval,
            delegates: cfg.delegate_addresses(),
            configured: cfg.safe_addresses(),
            services,
            service_of,
            default_service,
            simulator,
            simulated: HashMap::new(),
            metrics,
        }
    }

    /// Whether any Safe has a service to ask.
    pub fn has_service(&self) -> bool {
        !self.services.is_empty()
    }

    fn backoff(s: &mut Service, e: &ServiceError) {
        match e {
            ServiceError::Server(_) | ServiceError::Transport(_) => {
                s.failures += 1;
                let wait = Duration::from_secs(1)
                    .saturating_mul(2u32.saturating_pow(s.failures.min(16)))
                    .min(MAX_BACKOFF);
                s.retry_at = Some(Instant::now() + wait);
            }
            _ => {}
        }
    }

    /// The chain's answer to each contract signature (EIP-1271) of `row`, asked at `block` as the
    /// Safe asks it. A revert or any other answer than the magic value is a refusal; an owner the
    /// chain could not be asked about is left out (the check then counts nothing for it).
    async fn contract_answers(
        &self,
        row: &TxRow,
        chain_id: u64,
        safe: &SafeState,
        block: u64,
    ) -> BTreeMap<Address, bool> {
        let mut answers = BTreeMap::new();
        let Some(reads) = self.simulator.as_ref().map(Simulator::reads) else {
            return answers;
        };
        for c in proposals::contract_signatures(row, chain_id, safe) {
            let call = eip1271::isValidSignatureCall {
                _data: c.preimage,
                _signature: c.data,
            };
            match reads.call(c.owner, call, block).await {
                Ok(magic) => {
                    answers.insert(c.owner, magic == eip1271::MAGIC);
                }
                Err(ChainError::CallReverted(_) | ChainError::UndecodableAnswer(_)) => {
                    answers.insert(c.owner, false);
                }
                Err(e) => {
                    tracing::warn!(safe = %row.safe, nonce = row.nonce, owner = %c.owner, error = %e, "governance: a contract signature could not be checked on-chain; not counted");
                }
            }
        }
        answers
    }

    /// The simulation findings of `p` (simulated once per safeTxHash; nothing when the node
    /// cannot simulate, or a failure, which the next poll retries).
    async fn simulation(
        &mut self,
        p: &Proposal,
        decoded: &[super::classify::Measurement],
        window: &str,
    ) -> Vec<Finding> {
        if let Some(f) = self.simulated.get(&p.safe_tx_hash) {
            return f.clone();
        }
        let Some(sim) = &self.simulator else {
            return Vec::new();
        };
        match sim.proposal(p.safe, &p.transaction).await {
            Ok(Some(effects)) => {
                let usage = match super::usage::counted(&self.store, self.window, &effects.removed)
                    .await
                {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::warn!(error = %e, "governance: counting instances for a simulation failed; retrying");
                        return Vec::new();
                    }
                };
                let f = super::simulate::compare(sim.kms(), decoded, &effects, &usage, window);
                self.simulated.insert(p.safe_tx_hash, f.clone());
                self.metrics.simulation("simulated");
                f
            }
            Ok(None) => {
                self.metrics.simulation("unsupported");
                Vec::new()
            }
            Err(e) => {
                self.metrics.simulation("failed");
                tracing::warn!(safe = %p.safe, nonce = p.nonce, error = %e, "governance: simulating a proposal failed; retrying next poll");
                Vec::new()
            }
        }
    }

    /// Reads and checks every queue once (the task's step; also one-shot commands).
    pub async fn poll_once(&mut self) -> anyhow::Result<()> {
        let state = self.view.snapshot();
        if state.chain_id == 0 {
            return Ok(());
        }
        let safes: Vec<Address> = state
            .roles
            .iter()
            .filter(|(_, r)| **r == Role::Safe)
            .map(|(a, _)| *a)
            .chain(self.configured.iter().copied())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let window = super::usage::window_words(self.window);
        let min_delay = |t: Address| state.timelocks.get(&t).map(|s| U256::from(s.min_delay));
        let previous = self.out.snapshot();
        let mut queues = BTreeMap::new();
        let now = Instant::now();
        for safe in safes {
            let Some(base) = self
                .service_of
                .get(&safe)
                .or(self.default_service.as_ref())
                .cloned()
            else {
                continue;
            };
            // No nonce known from the chain: nothing is judged.
            let Some(on_chain) = state.safes.get(&safe).filter(|s| s.version.is_some()) else {
                continue;
            };
            let Some(service) = self.services.get_mut(&base) else {
                continue;
            };
            if service.retry_at.is_some_and(|t| now < t) {
                if let Some(q) = previous.get(&safe) {
                    queues.insert(safe, q.clone());
                }
                continue;
            }
            let rows = match service.client.pending(safe, on_chain.nonce).await {
                Ok(rows) => {
                    service.failures = 0;
                    service.retry_at = None;
                    rows
                }
                Err(e) => {
                    Self::backoff(service, &e);
                    match &e {
                        ServiceError::Unauthorized(_) => {
                            tracing::error!(%safe, error = %e, "governance: the Transaction Service refused the API key");
                        }
                        _ => {
                            tracing::warn!(%safe, error = %e, "governance: reading the pending queue failed; keeping the last one")
                        }
                    }
                    let mut kept = previous.get(&safe).cloned().unwrap_or_default();
                    kept.error = Some(e.to_string());
                    queues.insert(safe, kept);
                    continue;
                }
            };
            let mut checked = Vec::new();
            for row in rows
                .iter()
                .filter(|r| !r.is_executed && r.nonce >= on_chain.nonce && r.safe == safe)
            {
                let usage =
                    super::usage::counted(&self.store, self.window, &proposals::removals(row))
                        .await?;
                let contracts = self
                    .contract_answers(row, state.chain_id, on_chain, state.block)
                    .await;
                let checked_row = {
                    let ctx = proposals::context(safe, on_chain, &min_delay, &usage, &window);
                    proposals::check(
                        row,
                        state.chain_id,
                        on_chain,
                        &self.delegates,
                        &contracts,
                        &ctx,
                    )
                };
                match checked_row {
                    Ok(mut p) => {
                        let simulated = self
                            .simulation(&p, &proposals::removals(row), &window)
                            .await;
                        p.findings.extend(simulated);
                        p.findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
                        checked.push(p);
                    }
                    Err(e) => {
                        tracing::warn!(%safe, nonce = row.nonce, error = %e, "governance: a pending row is not a Safe transaction; ignored")
                    }
                }
            }
            for (nonce, n) in proposals::conflicts(&checked) {
                for p in checked.iter_mut().filter(|p| p.nonce == nonce) {
                    p.findings.push(Finding {
                        rule: Rule::NonceConflict,
                        severity: Severity::Warning,
                        detail: format!("{n} proposals share nonce {nonce}: only one can execute, the others are replaced"),
                        affected_instances: None,
                    });
                }
            }
            queues.insert(
                safe,
                SafeQueue {
                    proposals: checked,
                    error: None,
                },
            );
        }
        let mut lag = 0;
        for service in self.services.values() {
            if let Ok(i) = service.client.indexing().await
                && let Some(indexed) = i.master_copies_block_number
            {
                lag = lag.max(i.current_block_number.saturating_sub(indexed));
            }
        }
        self.metrics.indexing_lag(lag);
        let all: Vec<&Proposal> = queues.values().flat_map(|q| &q.proposals).collect();
        self.metrics
            .proposals(&proposals::summary(&all, crate::clock::unix_secs_i64()));
        self.out.publish(queues);
        Ok(())
    }
}

impl Task for QueueWatcher {
    fn name(&self) -> &'static str {
        "governance_queue"
    }

    async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut tick = crate::runtime::ticker(self.poll_interval);
        while cancel.run_until_cancelled(tick.tick()).await.is_some() {
            match cancel.run_until_cancelled(self.poll_once()).await {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "governance queue poll failed; retrying");
                }
                Some(Ok(())) => {}
            }
        }
        Ok(())
    }
}
