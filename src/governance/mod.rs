//! Governance awareness: what a Safe proposal (or a timelock operation) would really do, before
//! anyone signs it.
//!
//! What this module owns today (pure, no I/O):
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
//! - [`cli`]: `keywarden governance verify --offline`.
//!
//! Flow: transaction fields → hashes + decoded calls → findings (with the KMS's usage counts
//! when at hand) → report. The watcher that follows Safes, the timelock queue and the Transaction
//! Service, simulates proposals and alerts signers builds on these pieces.

pub mod classify;
pub mod cli;
pub mod decode;
pub mod safe_tx;
pub mod signatures;
pub mod verify;
