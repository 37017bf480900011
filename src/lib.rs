//! keywarden: a dstack-compatible KMS that answers key requests from a reorg-safe mirror of
//! on-chain governance state, and exports what on-call needs.
//!
//! See `docs/ARCHITECTURE.md` for the map of modules and how data flows between them.

pub mod alerts;
pub mod app;
pub mod attestation;
pub mod chain;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod cvm;
pub mod demo;
pub mod governance;
pub mod http;
pub mod kms;
pub mod problem;
pub mod runtime;
pub mod secret;
pub mod service;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod tls;
