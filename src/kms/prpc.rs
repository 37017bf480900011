//! The pRPC transport of the KMS listener: routes (`/health`, `/prpc/{method}`), the body
//! encodings (JSON with `?json` or a JSON content type, protobuf otherwise), the error shape, and
//! the handler that frames a method call: limiter slot for key methods, decode, call, encode,
//! and one place where a refusal becomes the error body, the metric label and the audit record.

use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument as _;

use super::metrics::{Method, Outcome, Refusal};
use super::proto;
use super::refusal::Refused;
use super::rpc::{KmsRpc, PeerCert};

impl KmsRpc {
    /// The routes of the KMS listener: `/health` and `/prpc/{method}`. Anything else is
    /// answered in the pRPC error shape too.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/health", get(|| async { "OK" }))
            .route("/prpc/{method}", get(prpc).post(prpc))
            .fallback(|uri: axum::http::Uri| async move {
                prpc_error(
                    StatusCode::NOT_FOUND,
                    format!("Not found: {}", shown(uri.path())),
                )
            })
            .method_not_allowed_fallback(|method: axum::http::Method| async move {
                prpc_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("Method not allowed: {}", shown(method.as_str())),
                )
            })
            .with_state(self.clone())
    }
}

/// How the caller wants its body encoded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Json,
    Protobuf,
}
fn encoding(query: Option<&str>, headers: &HeaderMap, is_get: bool) -> Encoding {
    let json_query =
        query.is_some_and(|q| q.split('&').any(|p| p == "json" || p.starts_with("json=")));
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    if is_get || json_query || json_type {
        Encoding::Json
    } else {
        Encoding::Protobuf
    }
}
fn decode<T: Message + Default + DeserializeOwned>(
    enc: Encoding,
    body: &[u8],
) -> Result<T, Refused> {
    match enc {
        Encoding::Json if body.iter().all(u8::is_ascii_whitespace) => Ok(T::default()),
        Encoding::Json => serde_json::from_slice(body)
            .map_err(|e| Refused::new(Refusal::BadRequest, format!("invalid JSON request: {e}"))),
        Encoding::Protobuf => T::decode(body).map_err(|e| {
            Refused::new(
                Refusal::BadRequest,
                format!("invalid protobuf request: {e}"),
            )
        }),
    }
}
/// The content type of protobuf answers and errors, as upstream's pRPC sends it.
const PROTOBUF: &str = "application/octet-stream";

fn encode<T: Message + Serialize>(enc: Encoding, value: &T) -> Response {
    match enc {
        Encoding::Json => axum::Json(value).into_response(),
        Encoding::Protobuf => {
            ([(header::CONTENT_TYPE, PROTOBUF)], value.encode_to_vec()).into_response()
        }
    }
}
/// At most the first 64 characters of a caller-supplied name, for error messages: a 60 KB path
/// is not echoed back.
fn shown(name: &str) -> String {
    const SHOWN: usize = 64;
    match name.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}… ({} bytes)", &name[..cut], name.len()),
        None => name.to_owned(),
    }
}
/// A JSON pRPC error outside a method (unknown path, wrong HTTP method).
fn prpc_error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}
fn refusal_response(enc: Encoding, r: &Refused) -> Response {
    let status = match r.reason {
        Refusal::AuthUnavailable
        | Refusal::ChainStateStale
        | Refusal::Overloaded
        | Refusal::KmsNotAllowed
        | Refusal::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        Refusal::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    match enc {
        Encoding::Json => (
            status,
            axum::Json(serde_json::json!({ "error": r.message })),
        )
            .into_response(),
        Encoding::Protobuf => (
            status,
            [(header::CONTENT_TYPE, PROTOBUF)],
            proto::ProtoError {
                message: r.message.clone(),
            }
            .encode_to_vec(),
        )
            .into_response(),
    }
}
async fn prpc(
    State(rpc): State<KmsRpc>,
    Path(method_name): Path<String>,
    RawQuery(query): RawQuery,
    peer: Option<axum::Extension<PeerCert>>,
    request_method: axum::http::Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let method = Method::parse(&method_name);
    let enc = encoding(
        query.as_deref(),
        &headers,
        request_method == axum::http::Method::GET,
    );
    let peer = peer.map(|axum::Extension(p)| p).unwrap_or_default();
    let span = tracing::info_span!("kms.rpc", method = method.as_str());
    let trace_id = trace_id_of(&span);
    let result: Result<Response, Refused> = async {
        let _slot = match method.takes_slot() {
            true => Some(rpc.0.limiter.enter(&rpc.0.metrics).await?),
            false => None,
        };
        match method {
            Method::GetTempCaCert => Ok(encode(enc, &rpc.temp_ca())),
            Method::GetMeta => Ok(encode(enc, &rpc.meta()?)),
            Method::GetAppEnvEncryptPubKey => {
                let req: proto::AppId = decode(enc, &body)?;
                Ok(encode(enc, &rpc.env_pubkey(&req)?))
            }
            Method::GetAppKey => {
                let req: proto::GetAppKeyRequest = decode(enc, &body)?;
                Ok(encode(enc, &rpc.app_key(&peer, req).await?))
            }
            Method::GetAppBlsKey => {
                let req: proto::GetAppKeyRequest = decode(enc, &body)?;
                Ok(encode(enc, &rpc.app_bls_key(&peer, req).await?))
            }
            Method::GetKmsKey => {
                let req: proto::GetKmsKeyRequest = decode(enc, &body)?;
                Ok(encode(enc, &rpc.kms_key(&peer, req).await?))
            }
            Method::SignCert => {
                let req: proto::SignCertRequest = decode(enc, &body)?;
                Ok(encode(enc, &rpc.sign_cert(req).await?))
            }
            Method::Unknown => Err(Refused::new(
                Refusal::Unsupported,
                format!("Method not found: {}", shown(&method_name)),
            )),
        }
    }
    .instrument(span)
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    match result {
        Ok(resp) => {
            rpc.0
                .metrics
                .request(method, Outcome::Ok, elapsed, trace_id);
            resp
        }
        Err(refused) => {
            rpc.0
                .metrics
                .request(method, Outcome::Refused(refused.reason), elapsed, trace_id);
            rpc.audit_refusal(method, &refused).await;
            refusal_response(enc, &refused)
        }
    }
}
/// The OpenTelemetry trace id of `span`, when tracing gives it one.
fn trace_id_of(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
