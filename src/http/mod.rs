//! What every listener (the API/KMS port, the metrics port, the admin port) shares below its
//! router: binding, hardening, connection handling, the error type, and the `[api]`,
//! `[metrics]` and `[admin]` sections ([`config`]). The routers are the KMS's and `app`'s.
//!
//! Flow: [`bind`] claims each address before anything starts (a taken port is a start-up
//! error naming the fix); each router gets the same hardening ([`harden`]: panic catching that
//! counts `keywarden_handler_panics_total`, a request timeout, a body-size cap, a request span,
//! and the `X-App-Version` header); [`conn::serve`] runs every listener's connections (accept
//! backoff, a connection cap shedding idle ones, a header-read timeout, HTTP/1.1, drain on
//! shutdown); [`Server`] serves a plain-HTTP router that way as a supervised task.
//! [`HttpError`] is the one error type that becomes a JSON response. [`client`] is the other
//! direction: the one client of the JSON services keywarden calls.

pub mod client;
pub mod config;
pub mod conn;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use crate::runtime::{Task, panic_message};
use crate::telemetry::{ConnectionEvent, Listener, ProcessMetrics};

/// The one error type of the HTTP layer; renders as `{"error": "..."}` with its status.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No such route.
    #[error("not found")]
    NotFound,
    /// Missing or wrong bearer token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// Bad request parameters.
    #[error("{0}")]
    BadRequest(String),
    /// A dependency is not available.
    #[error("{0}")]
    Unavailable(String),
    /// Something failed on our side.
    #[error("internal error")]
    Internal,
    /// The request target is longer than [`MAX_URI_BYTES`].
    #[error("request target too long: {0} bytes (at most {MAX_URI_BYTES})")]
    UriTooLong(usize),
    /// The request's header fields exceed [`MAX_HEADERS`] or [`MAX_HEADER_BYTES`].
    #[error(
        "request header fields too large: {count} fields, {bytes} bytes (at most {MAX_HEADERS} fields, {MAX_HEADER_BYTES} bytes)"
    )]
    HeadersTooLarge {
        /// Fields sent.
        count: usize,
        /// Their names and values, in bytes.
        bytes: usize,
    },
    /// The address cannot be bound.
    #[error("cannot listen on {name} {addr}: {reason} (fix: {fix})")]
    Bind {
        /// Config key of the listener.
        name: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
        /// What to do.
        fix: &'static str,
    },
}

impl HttpError {
    fn status(&self) -> StatusCode {
        match self {
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Internal | Self::Bind { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = (
            status,
            axum::Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// Binds `addr` for the listener configured at `name` (e.g. `api.listen`).
pub async fn bind(name: &'static str, addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr).await.map_err(|e| {
        let fix = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "stop the process using that port or choose another address for this listener"
            }
            std::io::ErrorKind::PermissionDenied => {
                "use a port above 1023 or grant the capability to bind low ports"
            }
            std::io::ErrorKind::AddrNotAvailable => {
                "use an address that belongs to this machine (or 0.0.0.0)"
            }
            _ => "choose another address for this listener",
        };
        HttpError::Bind {
            name,
            addr,
            reason: e.kind().to_string(),
            fix,
        }
    })
}

/// Limits and behaviour shared by every listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Per-request timeout; beyond it the answer is 503.
    pub request_timeout: Duration,
    /// Body size cap; beyond it the answer is 413.
    pub max_body_bytes: usize,
}

/// Longest request target answered with anything but 414. (hyper's parser closes the
/// connection with a bare 414 beyond 64 KiB.)
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Most header fields a request may carry (hyper's parser refuses more than [`conn`] allows it).
pub const MAX_HEADERS: usize = 64;
/// Largest total of header names and values.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Refuses oversized request heads with 414 / 431 in the `{"error"}` shape (pRPC's JSON error
/// shape on the KMS port too), before any handler runs.
async fn bounded_head(req: Request<axum::body::Body>, next: axum::middleware::Next) -> Response {
    let uri = req.uri().to_string().len();
    if uri > MAX_URI_BYTES {
        return HttpError::UriTooLong(uri).into_response();
    }
    let count = req.headers().len();
    let bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if count > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return HttpError::HeadersTooLarge { count, bytes }.into_response();
    }
    next.run(req).await
}

/// The fallback of the plain-HTTP listeners: 404 with the `{"error"}` body.
pub async fn not_found() -> HttpError {
    HttpError::NotFound
}

/// Applies panic catching, timeout, body cap, request span and `X-App-Version` to `router`
/// (which brings its own fallback: see [`not_found`]).
pub fn harden(
    router: Router,
    listener: Listener,
    limits: Limits,
    metrics: ProcessMetrics,
) -> Router {
    let on_panic = move |panic: Box<dyn std::any::Any + Send + 'static>| {
        metrics.handler_panicked(listener);
        tracing::error!(listener = listener.as_str(), panic = %panic_message(panic.as_ref()), "request handler panicked");
        HttpError::Internal.into_response()
    };
    router
        .layer(axum::middleware::from_fn(bounded_head))
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            limits.request_timeout,
        ))
        .layer(CatchPanicLayer::custom(on_panic))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(move |req: &Request<_>| {
                    tracing::info_span!(
                        "http.request",
                        listener = listener.as_str(),
                        method = %req.method(),
                        path = %req.uri().path(),
                    )
                })
                // Handlers log their own refusals once, with a typed reason; an ERROR line per
                // 5xx would repeat them, and turn every overload 503 (counted in a metric) into
                // log noise exactly when the service is busiest.
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .layer(SetResponseHeaderLayer::overriding(
            HeaderName::from_static("x-app-version"),
            HeaderValue::from_static(env!("CARGO_PKG_VERSION")),
        ))
}

/// One plain-HTTP listener (metrics, admin) served as a supervised task, with the connection
/// handling of every listener ([`conn::serve`]).
pub struct Server {
    /// Task name (`metrics_listener`, ...).
    pub name: &'static str,
    /// Which listener, for metric labels.
    pub listener: Listener,
    /// The bound socket.
    pub socket: TcpListener,
    /// What it serves.
    pub router: Router,
    /// Connection cap and header-read timeout.
    pub limits: conn::ConnLimits,
    /// Where its connection metrics go.
    pub metrics: ProcessMetrics,
}

/// The connection metrics of a plain listener.
struct ListenerConnections {
    metrics: ProcessMetrics,
    listener: Listener,
}

impl conn::ConnectionMetrics for ListenerConnections {
    fn open(&self, opened: bool) {
        let event = match opened {
            true => ConnectionEvent::Opened,
            false => ConnectionEvent::Closed,
        };
        self.metrics.connection(self.listener, event);
    }

    fn shed(&self) {
        self.metrics
            .connection(self.listener, ConnectionEvent::Shed);
    }

    fn refused(&self) {
        self.metrics
            .connection(self.listener, ConnectionEvent::Refused);
    }

    fn accept_failed(&self) {
        self.metrics
            .connection(self.listener, ConnectionEvent::AcceptFailed);
    }
}

impl Task for Server {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let metrics = ListenerConnections {
            metrics: self.metrics,
            listener: self.listener,
        };
        conn::serve(
            self.socket,
            self.listener.as_str(),
            conn::Plain(self.router),
            self.limits,
            Arc::new(metrics),
            cancel,
        )
        .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use prometheus_client::registry::Registry;
    use tower::ServiceExt as _;

    fn hardened(router: Router) -> (Router, Registry) {
        let mut registry = Registry::default();
        let metrics = ProcessMetrics::new(&mut registry);
        let limits = Limits {
            request_timeout: Duration::from_millis(200),
            max_body_bytes: 16,
        };
        (
            harden(router.fallback(not_found), Listener::Api, limits, metrics),
            registry,
        )
    }

    async fn call(router: &Router, req: Request<Body>) -> Response {
        router.clone().oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn handler_panic_becomes_500_and_is_counted() {
        let (router, registry) = hardened(Router::new().route(
            "/boom",
            get(|| async {
                panic!("handler bug");
                #[allow(unreachable_code)]
                ""
            }),
        ));
        let resp = call(&router, Request::get("/boom").body(Body::empty()).unwrap()).await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(resp.headers()["x-app-version"], env!("CARGO_PKG_VERSION"));
        let text = crate::telemetry::encode(&registry).unwrap();
        assert!(
            text.contains("keywarden_handler_panics_total{listener=\"api\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn slow_handler_times_out_with_503_and_big_body_gets_413() {
        let (router, _r) = hardened(
            Router::new()
                .route(
                    "/slow",
                    get(|| async {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        "late"
                    }),
                )
                .route(
                    "/echo",
                    axum::routing::post(|body: String| async move { body }),
                ),
        );
        let resp = call(&router, Request::get("/slow").body(Body::empty()).unwrap()).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let resp = call(
            &router,
            Request::post("/echo")
                .body(Body::from("x".repeat(64)))
                .unwrap(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let resp = call(
            &router,
            Request::get("/missing").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }
}
