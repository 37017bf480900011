//! Governance awareness: what a Safe proposal (or a timelock operation) would really do, before
//! anyone signs it.
//!
//! What this module owns today:
//!
//! - [`safe_tx`]: Safe transactions and their hashes per Safe version (domain hash, message hash,
//!   safeTxHash).
//! - [`signatures`]: Safe signature lists split into their signers (EOA, eth_sign, approved hash,
//!   contract).
//! - [`decode`]: recursive decoding of the calls (MultiSend, timelock schedule/execute, nested
//!   Safe transactions, DstackKms / DstackApp / Safe / timelock functions), bounded.
//! - [`classify`]: severity rules and their reasons, joined with how many instances use a
//!   measurement a proposal removes.
//! - [`verify`]: the report a signer compares with the hardware wallet.
//! - [`events`], [`state`]: governance events (Safe 1.3.0 / 1.4.1 layouts, TimelockController,
//!   ownership of the KMS and its apps) and the pure state they build.
//! - [`watch`]: the projection on the chain's follower that discovers and follows the governance
//!   topology (owners → timelock → Safe), and the published [`watch::GovernanceView`].
//! - [`topology`]: the governance tree and its findings.
//! - [`metrics`]: the `dstack_governance_*` metrics.
//! - [`config`]: the `[governance]` section.
//! - [`txservice`], [`proposals`], [`queue`]: the Safe Transaction Service client, the local
//!   checks of each pending row, and the task that reads every watched Safe's queue.
//! - [`simulate`]: each pending proposal run in `eth_simulateV1` (the Safe's storage overridden,
//!   scheduled timelock calls executed as the timelock), its effects compared with the decoding.
//! - [`notify`]: the notifier task: each timelock operation's transitions, assessed and
//!   recorded as alerts (delivered by [`crate::alerts`]).
//! - [`admin`], [`report`]: `/admin/governance/*`, and reports rebuilt from the store.
//! - [`cli`]: `keywarden governance verify --offline` and `governance topology`.
//!
//! Flow: on-chain, the chain's follower → [`watch`] (events + observations, reorg-safe) →
//! [`state`] → view, metrics, topology. Per transaction: fields → hashes + decoded calls →
//! findings (with the KMS's usage counts when at hand) → report. The Transaction Service queue,
//! simulation and alerts to signers build on these pieces.

pub mod admin;
pub mod classify;
pub mod cli;
pub mod config;
pub mod decode;
pub mod events;
pub mod metrics;
pub mod notify;
pub mod proposals;
pub mod queue;
pub mod report;
pub mod safe_tx;
pub mod signatures;
pub mod simulate;
pub mod state;
pub mod topology;
pub mod txservice;
pub mod usage;
pub mod verify;
pub mod watch;

use std::sync::Arc;

use crate::chain::projection::Projection;

/// Errors of the governance module's I/O edges (reports read from the store).
#[derive(Debug, thiserror::Error)]
pub enum GovernanceError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The chain side failed.
    #[error(transparent)]
    Chain(#[from] crate::chain::ChainError),
}

/// The governance subsystem as the service runs it.
pub struct Subsystem {
    /// The projection the chain's follower feeds, when `[chain]` is set.
    pub projection: Option<Box<dyn Projection>>,
    /// The published state.
    pub view: Arc<watch::GovernanceView>,
    /// The pending Safe proposals, as last read and checked.
    pub proposals: Arc<queue::ProposalsView>,
    /// `/admin/governance/*`.
    pub admin: axum::Router,
    /// The notifier (optional), when `[chain]` is set.
    pub tasks: crate::runtime::Tasks,
}

/// Builds the governance subsystem: registers `dstack_governance_*` on `registry`; when `[chain]`
/// is set, the projection that follows the contracts' governance and the notifier that records
/// its alerts into `outbox`.
pub fn subsystem(
    cfg: &config::GovernanceConfig,
    chain: &crate::chain::ChainConfig,
    store: crate::store::Store,
    outbox: crate::alerts::outbox::Outbox,
    reads: Option<crate::chain::projection::ChainReads>,
    leadership: &crate::cluster::Leadership,
    registry: &mut prometheus_client::registry::Registry,
) -> Subsystem {
    let metrics = metrics::GovernanceMetrics::new(registry);
    let view = Arc::new(watch::GovernanceView::default());
    let proposals = Arc::new(queue::ProposalsView::default());
    let mut tasks = crate::runtime::Tasks::default();
    let projection = chain.resolve().map(|r| {
        // Each leadership term builds its own watcher and notifier.
        let watcher = {
            let (cfg, view, proposals, store, metrics) = (
                cfg.clone(),
                view.clone(),
                proposals.clone(),
                store.clone(),
                metrics.clone(),
            );
            move || {
                queue::QueueWatcher::new(
                    &cfg,
                    view.clone(),
                    proposals.clone(),
                    store.clone(),
                    reads
                        .clone()
                        .map(|reads| simulate::Simulator::new(reads, r.kms)),
                    metrics.clone(),
                )
            }
        };
        let first = watcher();
        if first.has_service() {
            tasks.add(
                crate::cluster::Singleton::new(leadership.clone(), first, move || Ok(watcher())),
                crate::runtime::Criticality::Optional,
            );
        }
        let notifier = {
            let (view, proposals, store, window, metrics) = (
                view.clone(),
                proposals.clone(),
                store.clone(),
                cfg.in_use_window,
                metrics.clone(),
            );
            move || {
                notify::Notifier::new(
                    view.clone(),
                    proposals.clone(),
                    outbox.clone(),
                    store.clone(),
                    window,
                    metrics.clone(),
                )
            }
        };
        let first = notifier();
        tasks.add(
            crate::cluster::Singleton::new(leadership.clone(), first, move || Ok(notifier())),
            crate::runtime::Criticality::Optional,
        );
        Box::new(watch::GovernanceProjection::new(
            r.kms,
            cfg.safe_addresses(),
            view.clone(),
            metrics,
        )) as Box<dyn Projection>
    });
    let live = projection
        .is_some()
        .then(|| (view.clone(), proposals.clone()));
    Subsystem {
        admin: admin::routes(store, live),
        projection,
        view,
        proposals,
        tasks,
    }
}
