//! The admin listener: operator endpoints behind a bearer token (compared in constant time
//! against its stored SHA-256; the token itself is never kept). Every refusal is audited.

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::http::{HttpError, not_found};

/// Routes of the admin listener: its own, plus each subsystem's `subsystems` routes, all
/// behind the token.
pub fn router(state: AppState, subsystems: Router) -> Router {
    Router::new()
        .route("/admin/status", get(status))
        .route("/admin/config", get(config))
        .route("/admin/audit", get(audit))
        .with_state(state.clone())
        .merge(subsystems)
        .route_layer(middleware::from_fn_with_state(state, require_token))
        .fallback(not_found)
}

/// True when `presented` hashes to `expected`, compared without early exit.
fn token_matches(presented: &str, expected: &[u8; 32]) -> bool {
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    bool::from(digest.ct_eq(expected))
}

async fn require_token(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, HttpError> {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = match (presented, &state.admin_token_hash) {
        (Some(p), Some(expected)) => token_matches(p, expected),
        _ => false,
    };
    if !ok {
        let path = req.uri().path().to_owned();
        tracing::warn!(%path, "admin request refused: missing or invalid bearer token");
        state
            .audit("admin_auth", "refused", serde_json::json!({ "path": path }))
            .await;
        return Err(HttpError::Unauthorized);
    }
    Ok(next.run(req).await)
}

async fn status(State(state): State<AppState>) -> axum::Json<serde_json::Value> {
    let not_ready = state.health().await;
    axum::Json(serde_json::json!({
        "version": crate::telemetry::VERSION_LONG,
        "node_id": state.node_id,
        "uptime_seconds": state.started.elapsed().as_secs(),
        "database": { "backend": state.store.backend_name(), "target": state.store.target() },
        "runs": state.run.runs,
        "previous_run_unclean": state.run.previous_unclean,
        "ready": not_ready.is_empty(),
        "not_ready": not_ready,
    }))
}

async fn config(State(state): State<AppState>) -> String {
    state.config.to_redacted_toml()
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<i64>,
}

async fn audit(
    State(state): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> Result<axum::Json<serde_json::Value>, HttpError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(HttpError::BadRequest(
            "limit must be between 1 and 1000".into(),
        ));
    }
    let records = state.store.recent_audit(limit).await.map_err(|e| {
        tracing::error!(error = %e, "audit query failed");
        HttpError::Unavailable("database unavailable".into())
    })?;
    Ok(axum::Json(serde_json::json!({ "records": records })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_accepts_only_the_right_token() {
        let expected: [u8; 32] = Sha256::digest(b"right").into();
        assert!(token_matches("right", &expected));
        assert!(!token_matches("wrong", &expected));
        assert!(!token_matches("", &expected));
    }
}
