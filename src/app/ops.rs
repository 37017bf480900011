//! The metrics listener: `/metrics` (OpenMetrics), `/livez`, `/readyz`.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AppState;
use crate::http::{HttpError, not_found};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Routes of the metrics listener.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> Result<Response, HttpError> {
    let body = crate::telemetry::encode(&state.registry).map_err(|_| HttpError::Internal)?;
    Ok(([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response())
}

async fn readyz(State(state): State<AppState>) -> Response {
    let not_ready = state.health().await;
    let role = state.leadership.role().label();
    if not_ready.is_empty() {
        let degraded = state.readiness.degraded();
        let body = if degraded.is_empty() {
            serde_json::json!({ "status": "ready", "role": role })
        } else {
            serde_json::json!({ "status": "ready", "role": role, "degraded": degraded })
        };
        (StatusCode::OK, axum::Json(body)).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(
                serde_json::json!({ "status": "not_ready", "role": role, "not_ready": not_ready }),
            ),
        )
            .into_response()
    }
}
