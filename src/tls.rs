//! The process's rustls crypto provider.
//!
//! The HTTP clients (RPC endpoints, PCCS, webhook, OTLP) are built without a provider of their
//! own, so one must be installed before the first TLS connection; every place that builds a
//! client calls [`ensure_crypto_provider`], which installs `ring` once.

/// Installs rustls's `ring` provider as the process default if none is installed yet.
pub fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race against another installer is fine: a provider is then installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
