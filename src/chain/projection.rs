//! What a projection is: one piece of state that the chain's follower feeds from the logs of the
//! contracts it watches. The KMS mirror ([`super::kms_projection`]) is the first; the governance
//! watcher is the next.
//!
//! Flow, per batch (driven by [`super::follower`]): the follower asks every projection for the
//! addresses it watches ([`Projection::addresses`]) and fetches all of them in one `eth_getLogs`
//! round → each projection keeps the logs of its addresses that it uses ([`Projection::decode`])
//! and names the addresses they bring in ([`Projection::discover`]; the follower fetches those
//! addresses' logs for the range, and their earlier history when asked) → it reads, at the block
//! of each trigger, what events cannot tell ([`Projection::complete`], synthetic rows) → the
//! follower commits every projection's rows with the checkpoint in one transaction → each
//! projection [`Projection::apply`]s its rows to its pure state and [`Projection::publish`]es.
//! After a rewind or at start-up a projection is [`Projection::rebuild`]t from its stored rows.

use std::collections::BTreeSet;
use std::sync::Arc;

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider;
use alloy::sol_types::SolCall;
use futures::future::BoxFuture;

use super::ChainError;
use super::code::{CodeId, identify};
use super::metrics::Method;
use super::rpc::RpcPool;
use super::store::StoredEvent;

/// Synthetic rows sort after every real log of their block.
pub const SYNTHETIC_LOG_INDEX: u64 = 1 << 32;

/// One observation to store as a synthetic row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synthetic {
    /// Block of its trigger.
    pub block: u64,
    /// That block's hash.
    pub hash: B256,
    /// The address it is about.
    pub address: Address,
    /// Row kind.
    pub kind: &'static str,
    /// Its data.
    pub data: Vec<u8>,
}

/// Observations as stored rows: per block, indexes from `base` up, after every log of the block.
pub fn synthetic_rows(
    observed: impl IntoIterator<Item = Synthetic>,
    base: u64,
) -> Vec<StoredEvent> {
    let mut next: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    observed
        .into_iter()
        .map(|o| {
            let index = next.entry(o.block).or_insert(base);
            let log_index = *index;
            *index += 1;
            StoredEvent {
                block_number: o.block,
                log_index,
                block_hash: o.hash,
                address: o.address,
                kind: o.kind.to_owned(),
                topics: Vec::new(),
                data: o.data,
            }
        })
        .collect()
}

/// The first synthetic index free at `block`, after what `stored` holds there.
pub fn synthetic_base(stored: &[StoredEvent], block: u64) -> u64 {
    stored
        .iter()
        .filter(|e| e.block_number == block)
        .map(|e| e.log_index + 1)
        .max()
        .unwrap_or(0)
        .max(SYNTHETIC_LOG_INDEX)
}

/// An address a batch's rows bring into a projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Discovered {
    /// The new address.
    pub address: Address,
    /// Whether its logs before the range belong to the projection's state (fetched from the
    /// start block when it holds code), or it starts in this range.
    pub history: bool,
}

/// The block a batch ends at, or a start-up reconciliation is made at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    /// Block number.
    pub number: u64,
    /// Block hash.
    pub hash: B256,
}

/// The point of the chain a projection's state is at after applying rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Processed {
    /// Chain id.
    pub chain_id: u64,
    /// Block number.
    pub number: u64,
    /// Its timestamp (Unix seconds; 0 when not known): chain time, for what depends on it.
    pub timestamp: u64,
}

/// One consumer of the follower's batches. Object safe: a follower runs a list of them.
pub trait Projection: Send + Sync {
    /// Stable name, stored with the projection's rows and identity.
    fn name(&self) -> &'static str;

    /// What the stored rows were gathered for (the KMS mirror: its contract's address). Another
    /// identity at start-up makes the follower fetch this projection's history again, up to the
    /// checkpoint, leaving the other projections as they are.
    fn identity(&self) -> Vec<u8>;

    /// The addresses watched now.
    fn addresses(&self) -> BTreeSet<Address>;

    /// The row kind of a log of one of [`Self::addresses`] (or of an address discovered in the
    /// same batch) if the projection uses it.
    fn decode(&self, emitter: Address, topics: &[B256], data: &[u8]) -> Option<&'static str>;

    /// Addresses `rows` (a batch's, in chain order) bring in that are not watched yet.
    fn discover(&self, rows: &[StoredEvent]) -> Vec<Discovered>;

    /// Synthetic rows (log index from [`SYNTHETIC_LOG_INDEX`]) for what `rows` imply but events
    /// cannot tell, read from the chain at the block of each trigger. `last` is the range's last
    /// block.
    fn complete<'a>(
        &'a self,
        reads: &'a ChainReads,
        rows: &'a [StoredEvent],
        last: At,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, ChainError>>;

    /// At start-up, after [`Self::rebuild`]: synthetic rows for what a store written by an older
    /// release never observed, read at the processed block `at` (`stored`: the rows the state was
    /// rebuilt from). Empty when nothing is missing.
    fn reconcile<'a>(
        &'a self,
        reads: &'a ChainReads,
        stored: &'a [StoredEvent],
        at: At,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, ChainError>>;

    /// Applies committed rows (pure) and moves the state to `processed`.
    fn apply(&mut self, rows: &[StoredEvent], processed: Processed);

    /// Replaces the state with one rebuilt from stored rows, at `processed`.
    fn rebuild(&mut self, stored: &[StoredEvent], processed: Processed);

    /// Hands the current state to its readers.
    fn publish(&self);
}

/// The chain reads projections (and the follower's discovery) make at a given block, through
/// the follower's RPC pool.
#[derive(Clone)]
pub struct ChainReads {
    rpc: Arc<RpcPool>,
}

impl ChainReads {
    /// Reads through `rpc`.
    pub fn new(rpc: Arc<RpcPool>) -> Self {
        Self { rpc }
    }

    /// The runtime code at `at` as of `block`.
    pub async fn code(&self, at: Address, block: u64) -> Result<Bytes, ChainError> {
        self.rpc
            .call(Method::EthGetCode, |p| async move {
                p.get_code_at(at).number(block).await
            })
            .await
    }

    /// The timestamp of `block` (Unix seconds).
    pub async fn block_time(&self, block: u64) -> Result<u64, ChainError> {
        self.rpc
            .call(Method::EthGetBlockByNumber, |p| async move {
                p.get_block_by_number(block.into()).await
            })
            .await?
            .map(|b| b.header.timestamp)
            .ok_or_else(|| ChainError::MissingBlock(block.to_string()))
    }

    /// The identity of the code at `at` as of `block` (`None`: no code).
    pub async fn code_id(&self, at: Address, block: u64) -> Result<Option<CodeId>, ChainError> {
        Ok(identify(&self.code(at, block).await?, at))
    }

    /// One storage slot of `at` as of `block`.
    pub async fn storage(&self, at: Address, slot: U256, block: u64) -> Result<U256, ChainError> {
        self.rpc
            .call(Method::EthGetStorageAt, |p| async move {
                p.get_storage_at(at, slot).number(block).await
            })
            .await
    }

    /// A view call on `at` as of `block` returning one bool.
    pub async fn flag<C: SolCall<Return = bool>>(
        &self,
        at: Address,
        call: C,
        block: u64,
    ) -> Result<bool, ChainError> {
        self.call(at, call, block).await
    }

    /// A view call on `at` as of `block` ([`ChainError::CallReverted`] when it reverts).
    pub async fn call<C: SolCall>(
        &self,
        at: Address,
        call: C,
        block: u64,
    ) -> Result<C::Return, ChainError> {
        let raw = self.rpc.eth_call(at, call.abi_encode(), block).await?;
        C::abi_decode_returns(&raw).map_err(|e| ChainError::UndecodableAnswer(e.to_string()))
    }

    /// `eth_simulateV1` with `params` (the simulated blocks and the base block), as the node
    /// answers it.
    pub async fn simulate(
        &self,
        params: &serde_json::Value,
    ) -> Result<serde_json::Value, ChainError> {
        self.rpc
            .call(Method::EthSimulateV1, |p| async move {
                p.raw_request::<_, serde_json::Value>("eth_simulateV1".into(), params)
                    .await
            })
            .await
    }

    /// Like [`Self::call`], with `None` for a revert or an answer that does not decode: the
    /// contract does not answer this function (probing what a contract is).
    pub async fn probe<C: SolCall>(
        &self,
        at: Address,
        call: C,
        block: u64,
    ) -> Result<Option<C::Return>, ChainError> {
        match self.call(at, call, block).await {
            Ok(v) => Ok(Some(v)),
            Err(ChainError::CallReverted(_) | ChainError::UndecodableAnswer(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
