//! The HTTP transport under the RPC pool: alloy's JSON-RPC requests over reqwest, with every
//! response body read against `chain.max_response_bytes`.
//!
//! Why our own: a node (or anything answering on its URL) can send a response of any size, and a
//! transport that buffers the whole body before decoding lets one answer take the process's
//! memory. The body is read chunk by chunk and abandoned as soon as it passes the limit (or at
//! once when `Content-Length` announces more); the pool then shrinks an `eth_getLogs` range or
//! treats the endpoint as faulty, see [`ResponseTooLarge`].

use std::task;

use alloy::rpc::json_rpc::{RequestPacket, ResponsePacket};
use alloy::transports::{TransportError, TransportErrorKind, TransportFut, TransportResult};

/// How much of an unreadable body an error message quotes.
const QUOTED_BODY: usize = 256;

/// A response over the size limit; its body was not kept.
#[derive(Debug, thiserror::Error)]
#[error("the JSON-RPC response is larger than {limit} bytes (chain.max_response_bytes)")]
pub struct ResponseTooLarge {
    /// The limit in bytes.
    pub limit: usize,
}

/// Whether `err` is a response refused by [`ResponseTooLarge`].
pub fn is_too_large(err: &TransportError) -> bool {
    err.as_transport_err()
        .and_then(TransportErrorKind::as_custom)
        .is_some_and(|e| e.is::<ResponseTooLarge>())
}

/// One endpoint's transport (cheap to clone).
#[derive(Debug, Clone)]
pub struct CappedHttp {
    client: reqwest::Client,
    url: url::Url,
    limit: usize,
}

impl CappedHttp {
    /// A transport to `url` that refuses responses over `limit` bytes.
    pub fn new(url: url::Url, limit: usize) -> Self {
        Self {
            client: reqwest::Client::new(),
            url,
            limit,
        }
    }

    async fn request(self, req: RequestPacket) -> TransportResult<ResponsePacket> {
        let too_large = || TransportErrorKind::custom(ResponseTooLarge { limit: self.limit });
        let mut resp = self
            .client
            .post(self.url.clone())
            .json(&req)
            .headers(req.headers())
            .send()
            .await
            .map_err(TransportErrorKind::custom)?;
        if resp.content_length().is_some_and(|n| n > self.limit as u64) {
            return Err(too_large());
        }
        let status = resp.status();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(TransportErrorKind::custom)? {
            if body.len() + chunk.len() > self.limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        let decoded = serde_json::from_slice::<ResponsePacket>(&body);
        match (status.is_success(), decoded) {
            (_, Ok(packet)) => Ok(packet),
            (true, Err(e)) => Err(TransportError::deser_err(e, quoted(&body))),
            (false, Err(_)) => Err(TransportErrorKind::http_error(
                status.as_u16(),
                quoted(&body),
            )),
        }
    }
}

/// The start of a body, for an error message.
fn quoted(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(QUOTED_BODY)]).into_owned()
}

impl tower::Service<RequestPacket> for CappedHttp {
    type Response = ResponsePacket;
    type Error = TransportError;
    type Future = TransportFut<'static>;

    fn poll_ready(&mut self, _cx: &mut task::Context<'_>) -> task::Poll<Result<(), Self::Error>> {
        task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: RequestPacket) -> Self::Future {
        Box::pin(self.clone().request(req))
    }
}
