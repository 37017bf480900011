//! The listener sections: `[api]` (the KMS RPC port), `[metrics]` (health and metrics) and
//! `[admin]` (the operator API, off without a token).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::problem::{Problem, positive};
use crate::secret::SecretRef;

/// The API listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Time a request may take before it is answered with 503.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Time a client has to complete the TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time a connection may take to send a request's headers, and may stay idle between
    /// requests; then it is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Connections open at once; beyond it the oldest connection with no request in flight is
    /// closed (or the new one refused when all are busy). Keep it well under the open-file limit.
    pub max_connections: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// The metrics listener (`/metrics`, `/livez`, `/readyz`), never the key-dispatch port.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// The admin listener: disabled unless a bearer token is configured.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The bearer token, as a secret reference (`env:VAR` or `file:PATH`).
    pub token: Option<SecretRef>,
    /// Alternatively, the SHA-256 of the token (64 hex digits), so the token itself is stored nowhere.
    pub token_sha256: Option<String>,
    /// Allow the admin listener on a non-loopback address.
    pub insecure_listen_public: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8001)),
            token: None,
            token_sha256: None,
            insecure_listen_public: false,
        }
    }
}

impl ApiConfig {
    /// Problems of the section, each with its fix.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if self.max_body_bytes == 0 {
            out.push(Problem::new(
                "api.max_body_bytes",
                "must be positive",
                "set a limit such as 1048576",
            ));
        }
        if self.max_connections == 0 {
            out.push(Problem::new(
                "api.max_connections",
                "must be at least 1",
                "use 1024 (the default)",
            ));
        }
        for (key, d, example) in [
            ("api.request_timeout", self.request_timeout, "30s"),
            ("api.header_read_timeout", self.header_read_timeout, "10s"),
            ("api.handshake_timeout", self.handshake_timeout, "10s"),
        ] {
            out.extend(positive(key, d, example));
        }
        out
    }
}

impl AdminConfig {
    /// Whether the admin listener runs (it needs a token).
    pub fn enabled(&self) -> bool {
        self.token.is_some() || self.token_sha256.is_some()
    }

    /// The SHA-256 of the admin token, resolving the secret if needed. The plaintext is dropped
    /// (and zeroized) before this returns.
    pub fn token_hash(&self) -> Result<Option<[u8; 32]>, Problem> {
        if let Some(r) = &self.token {
            let value = r.resolve().map_err(|e| {
                Problem::new(
                    "admin.token",
                    format!("{r}: {e}"),
                    "point it at a readable file or a set environment variable",
                )
            })?;
            return Ok(Some(Sha256::digest(value.expose().as_bytes()).into()));
        }
        if let Some(h) = &self.token_sha256 {
            let mut out = [0u8; 32];
            hex::decode_to_slice(h, &mut out).map_err(|_| {
                Problem::new(
                    "admin.token_sha256",
                    "is not 64 hex digits",
                    "use the output of `printf %s TOKEN | sha256sum`",
                )
            })?;
            return Ok(Some(out));
        }
        Ok(None)
    }

    /// Problems of the section, each with its fix.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if self.token.is_some() && self.token_sha256.is_some() {
            out.push(Problem::new(
                "admin.token_sha256",
                "both admin.token and admin.token_sha256 are set",
                "keep only one of them",
            ));
        } else if let Err(p) = self.token_hash() {
            out.push(p);
        }
        if self.enabled() && !self.listen.ip().is_loopback() && !self.insecure_listen_public {
            out.push(Problem::new(
                "admin.listen",
                format!(
                    "{} is not a loopback address; the admin API would be reachable from the network",
                    self.listen
                ),
                "bind it to 127.0.0.1, or set admin.insecure_listen_public = true if that is intended",
            ));
        }
        out
    }
}

/// Listeners that would share a port (the admin listener counts only when it runs).
pub fn port_conflicts(
    api: &ApiConfig,
    metrics: &MetricsConfig,
    admin: &AdminConfig,
) -> Vec<Problem> {
    let mut listeners = vec![
        ("api.listen", api.listen),
        ("metrics.listen", metrics.listen),
    ];
    if admin.enabled() {
        listeners.push(("admin.listen", admin.listen));
    }
    let mut out = Vec::new();
    for (i, (ka, a)) in listeners.iter().enumerate() {
        for (kb, b) in &listeners[i + 1..] {
            if a.port() == b.port() && a.port() != 0 {
                out.push(Problem::new(
                    *kb,
                    format!("uses port {} already taken by {ka}", b.port()),
                    "give each listener its own port",
                ));
            }
        }
    }
    out
}
