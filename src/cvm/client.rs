//! dstack-vmm's and the gateway's APIs over [`crate::http::client`]: pRPC with JSON
//! (`POST /prpc/{Method}?json`, the legacy `Teepod.` prefix tried when the plain path is unknown)
//! and the guest API the VMM proxies (`POST /guest/{Method}?json`), with the entry's token.

use std::time::Duration;

use bytes::Bytes;

use super::config::VmmEntry;
use crate::http::client::{Client, Endpoint};
use crate::secret::SecretRef;

pub use crate::http::client::ClientError as SourceError;

/// A client of one VMM (or of the gateway's admin API).
#[derive(Clone)]
pub struct VmmClient(Client);

impl VmmClient {
    /// A client of `entry` (its token resolved now), each request bounded by `timeout`.
    pub fn new(entry: &VmmEntry, timeout: Duration) -> Result<Self, crate::secret::SecretError> {
        let token = entry
            .token
            .as_ref()
            .map(SecretRef::resolve)
            .transpose()?
            .map(|t| t.expose().trim().to_owned());
        Ok(Self(Client::new(
            Endpoint::parse(&entry.url),
            token,
            "localhost",
            timeout,
        )))
    }

    /// The client of a service reached through `client` (a guest agent behind the gateway).
    pub fn over(client: Client) -> Self {
        Self(client)
    }

    /// Calls pRPC `method` with `body`; an unknown method is tried again under `Teepod.`.
    pub async fn prpc(&self, method: &str, body: &serde_json::Value) -> Result<Bytes, SourceError> {
        match self.0.post(&format!("/prpc/{method}?json"), body).await {
            Err(SourceError::Status { status: 404, .. }) => {
                self.0
                    .post(&format!("/prpc/Teepod.{method}?json"), body)
                    .await
            }
            other => other,
        }
    }

    /// Calls the guest API's `method` through the VMM.
    pub async fn guest(
        &self,
        method: &str,
        body: &serde_json::Value,
    ) -> Result<Bytes, SourceError> {
        self.0.post(&format!("/guest/{method}?json"), body).await
    }

    /// Streams the answer to `GET path` into `sink` (see [`Client::stream`]).
    pub async fn stream(
        &self,
        path: &str,
        idle: Duration,
        sink: impl FnMut(&[u8]),
    ) -> Result<(), SourceError> {
        self.0.stream(path, idle, sink).await
    }
}
