//! The one client of the JSON services keywarden polls or calls (dstack-vmm, the dstack gateway,
//! a guest agent): `POST` with a JSON body, or a streamed `GET`, over TCP or a unix socket, with
//! an optional bearer token. Each answer is read against a size cap within the request timeout;
//! a failure is a [`ClientError`] whose label feeds the callers' metrics.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;

/// The largest answer read (a log stream excepted).
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// Why a source gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// No connection.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// No answer within the request timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// 401 or 403: the token is missing or wrong.
    #[error("refused the token (HTTP {0}): check the configured token")]
    Unauthorized(u16),
    /// Another status than 200.
    #[error("answered HTTP {status}: {body}")]
    Status {
        /// The status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// Larger than [`MAX_ANSWER`].
    #[error("answered more than {MAX_ANSWER} bytes")]
    TooLarge,
    /// Not the documented shape.
    #[error("{0}")]
    Malformed(String),
}

impl ClientError {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unreachable(_) => "unreachable",
            Self::Timeout(_) => "timeout",
            Self::Unauthorized(_) => "unauthorized",
            Self::Status { .. } => "http_error",
            Self::TooLarge => "too_large",
            Self::Malformed(_) => "malformed",
        }
    }

    /// Every label.
    pub const LABELS: [&'static str; 6] = [
        "unreachable",
        "timeout",
        "unauthorized",
        "http_error",
        "too_large",
        "malformed",
    ];
}

/// The error of an answer with `status` (not 200) and `body`.
fn refusal(status: u16, body: &[u8]) -> ClientError {
    match status {
        401 | 403 => ClientError::Unauthorized(status),
        _ => ClientError::Status {
            status,
            body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        },
    }
}

/// Where a service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Over TCP (`http` or `https`), the base URL without a trailing `/`.
    Http(String),
    /// Over a unix socket.
    Unix(PathBuf),
}

impl Endpoint {
    /// `unix:/path` or an `http(s)://` base URL.
    pub fn parse(url: &str) -> Self {
        match url.strip_prefix("unix:") {
            Some(path) => Self::Unix(PathBuf::from(path)),
            None => Self::Http(url.trim_end_matches('/').to_owned()),
        }
    }
}

/// A client of one service, with an optional bearer token.
#[derive(Clone)]
pub struct Client {
    endpoint: Endpoint,
    token: Option<String>,
    /// The `Host` header over a unix socket.
    host: &'static str,
    http: reqwest::Client,
    timeout: Duration,
}

impl Client {
    /// A client of `endpoint`, each answer bounded by `timeout`; over a unix socket, requests
    /// name `host`.
    pub fn new(
        endpoint: Endpoint,
        token: Option<String>,
        host: &'static str,
        timeout: Duration,
    ) -> Self {
        crate::tls::ensure_crypto_provider();
        Self {
            endpoint,
            token,
            host,
            // No whole-request timeout: a followed log lasts; `post` bounds its own answers.
            http: reqwest::Client::builder()
                .connect_timeout(timeout)
                .build()
                .unwrap_or_default(),
            timeout,
        }
    }

    /// A client of the HTTP(S) service at `base` (no token), through `http`.
    pub fn over(base: String, http: reqwest::Client, timeout: Duration) -> Self {
        Self {
            endpoint: Endpoint::Http(base),
            token: None,
            host: "localhost",
            http,
            timeout,
        }
    }

    /// Streams the answer to `GET path` into `sink`, chunk by chunk, as long as the VMM sends
    /// it (a followed log ends when the VMM ends it). Only connecting is bounded by the request
    /// timeout; a silence longer than `idle` ends the stream with a timeout.
    pub async fn stream(
        &self,
        path: &str,
        idle: Duration,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<(), ClientError> {
        self.exchange(hyper::Method::GET, path, None, idle, &mut |chunk| {
            sink(chunk);
            Ok(())
        })
        .await
    }

    /// `POST path` with `body`; the whole answer within the request timeout, at most
    /// [`MAX_ANSWER`] bytes.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Result<Bytes, ClientError> {
        let mut bytes = Vec::new();
        let mut collect = |chunk: &[u8]| {
            if bytes.len() + chunk.len() > MAX_ANSWER {
                return Err(ClientError::TooLarge);
            }
            bytes.extend_from_slice(chunk);
            Ok(())
        };
        let answer = self.exchange(
            hyper::Method::POST,
            path,
            Some(Bytes::from(body.to_string())),
            self.timeout,
            &mut collect,
        );
        tokio::time::timeout(self.timeout, answer)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))??;
        Ok(bytes.into())
    }

    /// Sends `method path` (with a JSON `body`) and hands a 200 answer to `sink` chunk by chunk
    /// (an error from `sink` ends it). Connecting waits at most the request timeout; a silence
    /// of `idle` ends the answer with a timeout. Any other status is an error.
    async fn exchange(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Bytes>,
        idle: Duration,
        sink: &mut impl FnMut(&[u8]) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let unreachable = |e: &dyn std::fmt::Display| ClientError::Unreachable(e.to_string());
        let silent = |_| ClientError::Timeout(idle);
        let connecting = |_| ClientError::Timeout(self.timeout);
        match &self.endpoint {
            Endpoint::Http(base) => {
                let mut req = self.http.request(method, format!("{base}{path}"));
                if let Some(body) = body {
                    req = req.header("content-type", "application/json").body(body);
                }
                if let Some(t) = &self.token {
                    req = req.bearer_auth(t);
                }
                let mut resp = tokio::time::timeout(self.timeout, req.send())
                    .await
                    .map_err(connecting)?
                    .map_err(|e| unreachable(&e))?;
                let status = resp.status().as_u16();
                if status != 200 {
                    let text = resp.text().await.unwrap_or_default();
                    return Err(refusal(status, text.as_bytes()));
                }
                while let Some(chunk) = tokio::time::timeout(idle, resp.chunk())
                    .await
                    .map_err(silent)?
                    .map_err(|e| unreachable(&e))?
                {
                    sink(&chunk)?;
                }
                Ok(())
            }
            Endpoint::Unix(socket) => {
                let stream =
                    tokio::time::timeout(self.timeout, tokio::net::UnixStream::connect(socket))
                        .await
                        .map_err(connecting)?
                        .map_err(|e| unreachable(&format!("{}: {e}", socket.display())))?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .map_err(|e| unreachable(&e))?;
                let mut req = hyper::Request::builder()
                    .method(method)
                    .uri(path)
                    .header(hyper::header::HOST, self.host);
                if body.is_some() {
                    req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                }
                if let Some(t) = &self.token {
                    req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
                }
                let req = req
                    .body(http_body_util::Full::new(body.unwrap_or_default()))
                    .map_err(|e| unreachable(&e))?;
                // The connection runs until the request's future, which holds the sender, is
                // done.
                let exchange = async move {
                    let resp = sender
                        .send_request(req)
                        .await
                        .map_err(|e| unreachable(&e))?;
                    let status = resp.status().as_u16();
                    let mut body = resp.into_body();
                    if status != 200 {
                        let text = http_body_util::Limited::new(body, 4096)
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        return Err(refusal(status, &text));
                    }
                    while let Some(frame) = tokio::time::timeout(idle, body.frame())
                        .await
                        .map_err(silent)?
                    {
                        if let Some(data) = frame.map_err(|e| unreachable(&e))?.data_ref() {
                            sink(data)?;
                        }
                    }
                    Ok(())
                };
                let (answer, _) = tokio::join!(exchange, conn);
                answer
            }
        }
    }
}
