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

/// Routes of the admin listener.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/admin/status", get(status))
        .route("/admin/config", get(config))
        .route("/admin/audit", get(audit))
        .route("/admin/chain/status", get(chain_status))
        .route("/admin/chain/state", get(chain_state))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .fallback(not_found)
        .with_state(state)
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

fn chain_unavailable(e: crate::chain::ChainError) -> HttpError {
    tracing::error!(error = %e, "chain report failed");
    HttpError::Unavailable("database unavailable".into())
}

/// The stored checkpoints and endpoint probes (as `keywarden chain status`), plus the running
/// engine's live view.
async fn chain_status(
    State(state): State<AppState>,
) -> Result<axum::Json<serde_json::Value>, HttpError> {
    let mut report = crate::chain::report::status(&state.store, &state.config.chain)
        .await
        .map_err(chain_unavailable)?;
    report["live"] = match &state.chain {
        Some(m) => serde_json::json!({
            "fresh": m.is_fresh(),
            "staleness_seconds": m.staleness().map(|s| s.as_secs_f64()),
            "progress": m.progress(),
        }),
        None => serde_json::Value::Null,
    };
    Ok(axum::Json(report))
}

/// The mirror's allow-lists, apps and owners: the live snapshot when the engine runs, else
/// rebuilt from the store (as `keywarden chain state`).
async fn chain_state(
    State(state): State<AppState>,
) -> Result<axum::Json<serde_json::Value>, HttpError> {
    let report = match &state.chain {
        Some(m) => serde_json::json!({
            "chains": [crate::chain::report::state_json(&m.snapshot())],
        }),
        None => crate::chain::report::state(&state.store, &state.config.chain)
            .await
            .map_err(chain_unavailable)?,
    };
    Ok(axum::Json(report))
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
