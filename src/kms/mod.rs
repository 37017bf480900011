//! The KMS: root key material, the per-app key derivations dstack workloads receive, and the
//! RA-TLS key-dispatch service.
//!
//! What it owns: [`keys`], the pure derivations, byte-compatible with upstream dstack's KMS
//! (HKDF-SHA256 with salt `RATLS`, P-256 derived keys and their PKCS#8-hash "DH secrets",
//! secp256k1 app keys with recoverable signatures by the root k256 key, the env-encryption X25519
//! key, and the bootstrap report data); [`root`], the key files; the `[kms]` and `[auth]`
//! sections ([`config`]); and the service, built in one call by [`subsystem`].
//!
//! Flow of a key request: [`server`] (TLS, RA-TLS client certificate) → [`prpc`] (framing,
//! [`limiter`]) → a method of [`dispatch`] → [`gates`] (attestation, then the `ensure_*` steps:
//! field sizes, [`selfcheck`], registered key, [`osimage`], canaries, [`authz`]) →
//! [`keys::AppKeys::derive`] on the [`workers`] → boot and audit record committed by the
//! [`ledger`] ([`audit`]) → response; a refusal is a [`refusal::Refused`]. [`signcert`] serves
//! `SignCert`: a CSR whose attestation binds its key, authorized with the boot-time identity,
//! answered with a leaf under the app's CA. At start-up, with `kms.self_attestation`, the KMS
//! attests itself ([`selfcheck`]) through the dstack guest agent of its CVM ([`guest_agent`]).
//! A new replica gets the root keys of a running KMS with [`onboard`] (`GetKmsKey`).

pub mod audit;
pub mod authz;
pub mod config;
pub mod dispatch;
pub mod gates;
pub mod guest_agent;
pub mod keys;
pub mod ledger;
pub mod limiter;
pub mod metrics;
pub mod onboard;
pub mod osimage;
pub mod proto;
pub mod prpc;
pub mod refusal;
pub mod root;
pub mod rpc;
pub mod selfcheck;
pub mod server;
pub mod signcert;
pub mod subsystem;
pub mod workers;

/// Errors of the KMS module.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// HKDF cannot produce that many bytes (more than 255 × 32).
    #[error("cannot derive {0} bytes with HKDF-SHA256")]
    DerivationLength(usize),
    /// A derived scalar is not a valid key for its curve (probability ~2^-128).
    #[error("derived {curve} key is out of range")]
    DerivedKeyInvalid {
        /// The curve.
        curve: &'static str,
    },
    /// Signing failed.
    #[error("signing failed: {0}")]
    Signing(String),
    /// A key could not be encoded.
    #[error("key encoding failed: {0}")]
    Encoding(String),
}
