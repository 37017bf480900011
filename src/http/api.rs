//! The API listener: `GET /health` → `OK` like upstream dstack; the KMS RPC routes join later.

use axum::Router;
use axum::routing::get;

use crate::app::AppState;

/// Routes of the API listener.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(|| async { "OK" }))
        .with_state(state)
}
