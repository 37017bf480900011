//! keywarden: a dstack-compatible KMS that answers key requests from a reorg-safe mirror of
//! on-chain governance state, and exports what on-call needs.
//!
//! See `docs/ARCHITECTURE.md` for the map of modules and how data flows between them.

pub mod attestation;
pub mod cli;
