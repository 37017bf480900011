//! Simulation and dev tooling, which production code never imports: the test attestation PKI
//! that issues TDX quotes and RA-TLS certificates ([`testpki`]), a simulated dstack guest and KMS
//! client ([`client`]), the load generator ([`loadgen`]), the simulated KMS attestation source
//! ([`kms`]), our test contracts' deployment ([`deploy`]), a real Safe and timelock governing
//! them ([`governance`]), where the npm toolchain they need is ([`toolchain`]) and the `dev`
//! commands ([`cli`]).
//!
//! Only `service` (behind the `insecure_*` switches), `cli` and `demo` reach in here; what
//! production trusts of a test PKI is read through `attestation::testroot`.

pub mod cli;
pub mod client;
pub mod deploy;
pub mod governance;
pub mod kms;
pub mod loadgen;
pub mod testpki;
pub mod toolchain;
