//! The on-chain side of keywarden: contract bindings, the mirror of DstackKms and its apps, and
//! the reports on it.
//!
//! What this module owns:
//!
//! - [`contracts`]: alloy `sol!` bindings for DstackKms, DstackApp, SafeL2, MultiSend and
//!   TimelockController, generated from the JSON ABIs in `contracts-abi/`; the reason strings that
//!   `isKmsAllowed` / `isAppAllowed` return; the `PolicyChanged` labels; the compiled bytecode of
//!   our own test contracts.
//! - [`cli`]: the `chain status`, `chain state` and `chain code-identity` commands.
//! - [`config`]: the `[chain]` section.
//! - [`events`]: raw logs → typed [`events::Event`]s (by topic0 and emitter).
//! - [`mirror`]: the pure in-memory [`mirror::MirrorState`] that events are applied to.
//! - [`authz`]: `isKmsAllowed` / `isAppAllowed` over a mirror, same order and reasons as the
//!   contracts.
//! - [`code`]: code identities (runtime code hash with the self-address immutables masked) and the
//!   known set whose semantics the mirror reproduces.
//! - [`live`]: `isKmsAllowed` / `isAppAllowed` asked of the chain (`eth_call`) for contracts whose
//!   answering code is not known, cached per block.
//! - [`view`]: the published [`Mirror`] the KMS path reads, with its freshness bound.
//! - [`rpc`]: the endpoint pool (health-scored failover, backoff, per-request timeout).
//! - [`follower`]: the follower task of one chain (finality, reorg rewind, bounded `eth_getLogs`
//!   ranges for every projection in one round, one transaction per batch, the checkpoint, sync
//!   metrics and readiness).
//! - [`projection`]: the [`projection::Projection`] trait a follower feeds, and the chain reads
//!   projections make.
//! - [`kms_projection`]: the KMS mirror as the first projection (app discovery, code and flag
//!   observations, publishing into [`Mirror`]).
//! - [`status`]: the follower's freshness and progress, read by the mirror and readiness.
//! - [`store`]: the chain tables of the store.
//! - [`metrics`]: `dstack_chain_*` / `dstack_kms_*` metrics.
//! - [`report`]: operator reports (`chain status`, `chain state`, admin API).
//! - [`admin`]: the admin routes (`/admin/chain/*`).
//!
//! Flow: `contracts/src/*.sol` (our own Solidity, same ABI and check order as dstack's contracts)
//! → `node contracts/build.mjs` (offline solc) → `contracts/out/*.json` + `contracts-abi/*.json`
//! (committed) → `sol!` bindings here. At run time: RPC pool → follower → store (events
//! tagged by projection, block hashes, checkpoint) → projections (the mirror) → authorization, locally for known code, by `eth_call` for
//! the rest.

pub mod admin;
pub mod authz;
pub mod cli;
pub mod code;
pub mod config;
pub mod contracts;
pub mod events;
pub mod follower;
pub mod kms_projection;
pub mod live;
pub mod metrics;
pub mod mirror;
pub mod projection;
pub mod report;
pub mod rpc;
pub mod status;
pub mod store;
pub mod transport;
pub mod view;

pub use config::ChainConfig;
pub use view::Mirror;

use std::sync::Arc;

/// The chain subsystem as the service runs it: the mirror the KMS reads (when `[chain]` is set),
/// its supervised tasks and its admin routes.
pub struct Subsystem {
    /// The published mirror.
    pub mirror: Option<Arc<Mirror>>,
    /// The follower (critical), when `[chain]` is set.
    pub tasks: crate::runtime::Tasks,
    /// `/admin/chain/*`.
    pub admin: axum::Router,
}

/// The chain's RPC connection: the `dstack_chain_*` metrics and, when `[chain]` is set, the
/// endpoint pool the follower, the live authorization path and the governance simulator share.
#[derive(Clone)]
pub struct Connection {
    /// Where the chain side reports.
    pub metrics: metrics::ChainMetrics,
    /// The endpoints.
    pub rpc: Option<Arc<rpc::RpcPool>>,
}

impl Connection {
    /// Chain reads through the pool, when there is one.
    pub fn reads(&self) -> Option<projection::ChainReads> {
        self.rpc.clone().map(projection::ChainReads::new)
    }
}

/// Registers `dstack_chain_*` on `registry` and, when `[chain]` is set, builds the endpoint pool.
pub fn connect(
    cfg: &ChainConfig,
    registry: &mut prometheus_client::registry::Registry,
) -> Connection {
    let metrics = metrics::ChainMetrics::new(registry, cfg.rpc_urls.len());
    let rpc = cfg.resolve().map(|r| pool(&r, &metrics));
    Connection { metrics, rpc }
}

fn pool(chain: &config::ResolvedChain, metrics: &metrics::ChainMetrics) -> Arc<rpc::RpcPool> {
    let rpc = Arc::new(rpc::RpcPool::new(&chain.urls, &chain.cfg, metrics.clone()));
    rpc.expect_chain_id(chain.cfg.chain_id);
    rpc
}

/// Builds the chain subsystem on `conn`: when `[chain]` is set, the mirror and its follower
/// (feeding `others` after the mirror), registered (not ready) with `readiness` until caught up.
pub fn subsystem(
    cfg: &ChainConfig,
    conn: Connection,
    store: crate::store::Store,
    readiness: crate::runtime::Readiness,
    others: follower::Projections,
    cluster: (&crate::cluster::Leadership, std::time::Duration),
) -> Subsystem {
    let mut tasks = crate::runtime::Tasks::default();
    let mirror = cfg.resolve().zip(conn.rpc).map(|(resolved, rpc)| {
        let (mirror, follower) = follow_with(
            resolved,
            store.clone(),
            readiness,
            conn.metrics,
            rpc,
            others,
        );
        let (leadership, catch_up) = cluster;
        tasks.add(
            follower.with_leadership(leadership.clone(), catch_up),
            crate::runtime::Criticality::Critical,
        );
        mirror
    });
    Subsystem {
        admin: admin::routes(store, cfg.clone(), mirror.clone()),
        mirror,
        tasks,
    }
}

/// The published mirror of `chain` and the follower that feeds it: the mirror is its first
/// projection, `others` follow it in order. The follower shares one RPC pool with the live
/// authorization path.
pub fn follow(
    chain: config::ResolvedChain,
    store: crate::store::Store,
    readiness: crate::runtime::Readiness,
    metrics: metrics::ChainMetrics,
    others: follower::Projections,
) -> (Arc<Mirror>, follower::Follower) {
    let rpc = pool(&chain, &metrics);
    follow_with(chain, store, readiness, metrics, rpc, others)
}

/// [`follow`] through an existing endpoint pool.
fn follow_with(
    chain: config::ResolvedChain,
    store: crate::store::Store,
    readiness: crate::runtime::Readiness,
    metrics: metrics::ChainMetrics,
    rpc: Arc<rpc::RpcPool>,
    others: follower::Projections,
) -> (Arc<Mirror>, follower::Follower) {
    let status = Arc::new(status::SyncStatus::new(chain.cfg.max_staleness));
    let live = live::LiveAuthz::new(rpc.clone(), chain.kms, metrics.clone());
    let mirror = Arc::new(Mirror::new(
        mirror::MirrorState::with_known(chain.kms, Arc::new(chain.known.clone())),
        status.clone(),
        metrics.clone(),
        Some(live),
    ));
    let mut projections: follower::Projections = vec![Box::new(
        kms_projection::KmsProjection::new(chain.kms, mirror.clone()),
    )];
    projections.extend(others);
    let follower =
        follower::Follower::new(chain, store, rpc, projections, status, readiness, metrics);
    (mirror, follower)
}

/// Errors of the on-chain module.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// JSON-RPC transport or node error.
    #[error("JSON-RPC request failed: {0}")]
    Rpc(#[from] alloy::transports::TransportError),
    /// A contract call or transaction could not be built, sent or decoded.
    #[error("contract call failed: {0}")]
    Contract(#[from] alloy::contract::Error),
    /// A sent transaction could not be followed to its receipt.
    #[error("waiting for transaction receipt failed: {0}")]
    PendingTransaction(#[from] alloy::providers::PendingTransactionError),
    /// The node has no unlocked account to send transactions from.
    #[error(
        "the node at {0} has no unlocked accounts (eth_accounts is empty); use a development node such as anvil"
    )]
    NoAccounts(String),
    /// A transaction was mined but reverted.
    #[error("transaction for {step} reverted (tx {tx})")]
    Reverted {
        /// What the transaction was meant to do.
        step: &'static str,
        /// Transaction hash.
        tx: alloy::primitives::B256,
    },
    /// A receipt lacked what the step needs (created address, expected event).
    #[error("transaction for {step} succeeded but {missing} is missing from its receipt (tx {tx})")]
    IncompleteReceipt {
        /// What the transaction was meant to do.
        step: &'static str,
        /// What was missing.
        missing: &'static str,
        /// Transaction hash.
        tx: alloy::primitives::B256,
    },
    /// Every RPC endpoint failed this request.
    #[error("every RPC endpoint failed {}; last error: {last}", method.label())]
    AllEndpointsFailed {
        /// The method.
        method: metrics::Method,
        /// The last endpoint's error.
        last: String,
    },
    /// `eth_getLogs` refused the range as too large.
    #[error("eth_getLogs range refused: {0}")]
    TooManyResults(String),
    /// The node does not know a block it should.
    #[error("the node returned no block for {0}")]
    MissingBlock(String),
    /// The node serves another chain than `chain.chain_id`.
    #[error(
        "the RPC endpoint serves chain {actual}, but chain.chain_id is {expected} (fix: point chain.rpc_urls at the right chain or correct chain.chain_id)"
    )]
    ChainIdMismatch {
        /// Configured.
        expected: u64,
        /// Reported by `eth_chainId`.
        actual: u64,
    },
    /// One endpoint reported a reorg deeper than the retained hashes that the others did not
    /// confirm; nothing was undone.
    #[error(
        "an RPC endpoint reported a reorg below block {0} that the other endpoints did not confirm; it is backed off and nothing was undone"
    )]
    UnconfirmedReorg(u64),
    /// An address holds no code.
    #[error("{0} holds no code at the latest block")]
    NoCode(alloy::primitives::Address),
    /// An `eth_call` reverted (the chain's answer; no endpoint is blamed).
    #[error("the call reverted: {0}")]
    CallReverted(String),
    /// A live `eth_call` answered something that is not `(bool, string)`.
    #[error("the chain's answer does not decode as (bool, string): {0}")]
    UndecodableAnswer(String),
    /// A range's logs and blocks disagree (the chain moved while it was read); it is retried.
    #[error("inconsistent range: {0}")]
    InconsistentRange(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A compiled artifact in `contracts/out/` is unusable.
    #[error("compiled artifact of {contract} is unusable: {detail}")]
    Artifact {
        /// Contract name.
        contract: &'static str,
        /// What is wrong.
        detail: String,
    },
}
