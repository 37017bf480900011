//! The on-chain side of keywarden: contract bindings and the test-chain deployment.
//!
//! What this module owns:
//!
//! - [`contracts`]: alloy `sol!` bindings for DstackKms, DstackApp, SafeL2, MultiSend and
//!   TimelockController, generated from the JSON ABIs in `contracts-abi/`; the reason strings that
//!   `isKmsAllowed` / `isAppAllowed` return; the `PolicyChanged` labels; the compiled bytecode of
//!   our own test contracts.
//! - [`deploy`]: deploys our test contracts (DstackKms behind an ERC-1967 proxy, a DstackApp
//!   implementation, one registered app) to a development node such as anvil.
//! - [`cli`]: the `dev deploy` command built on [`deploy::deploy`].
//!
//! Flow: `contracts/src/*.sol` (our own Solidity, same ABI and check order as dstack's contracts)
//! → `node contracts/build.mjs` (offline solc) → `contracts/out/*.json` + `contracts-abi/*.json`
//! (committed) → `sol!` bindings here → transactions and calls over JSON-RPC.
//!
//! The sync engine (following governance events reorg-safely into the store) will arrive later and
//! will build on these bindings.

pub mod cli;
pub mod contracts;
pub mod deploy;

pub use deploy::{Deployment, deploy, deploy_with_timeout};

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
    /// A compiled artifact in `contracts/out/` is unusable.
    #[error("compiled artifact of {contract} is unusable: {detail}")]
    Artifact {
        /// Contract name.
        contract: &'static str,
        /// What is wrong.
        detail: String,
    },
}
