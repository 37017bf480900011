//! The chain's admin routes, served behind the admin listener's token: `/admin/chain/status`
//! (stored checkpoints and endpoint probes, as `keywarden chain status`, plus the running
//! follower's live view) and `/admin/chain/state` (the mirror's allow-lists, apps and owners).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;

use super::{ChainConfig, ChainError, Mirror};
use crate::http::HttpError;
use crate::store::Store;

/// What the chain's admin routes read.
#[derive(Clone)]
struct Admin {
    store: Store,
    chain: Arc<ChainConfig>,
    mirror: Option<Arc<Mirror>>,
}

/// The chain's admin routes (their state applied).
pub fn routes(store: Store, chain: ChainConfig, mirror: Option<Arc<Mirror>>) -> Router {
    Router::new()
        .route("/admin/chain/status", get(status))
        .route("/admin/chain/state", get(state))
        .with_state(Admin {
            store,
            chain: Arc::new(chain),
            mirror,
        })
}

fn unavailable(e: ChainError) -> HttpError {
    tracing::error!(error = %e, "chain report failed");
    HttpError::Unavailable("database unavailable".into())
}

async fn status(State(a): State<Admin>) -> Result<axum::Json<serde_json::Value>, HttpError> {
    let mut report = super::report::status(&a.store, &a.chain)
        .await
        .map_err(unavailable)?;
    report["live"] = match &a.mirror {
        Some(m) => serde_json::json!({
            "fresh": m.is_fresh(),
            "staleness_seconds": m.staleness().map(|s| s.as_secs_f64()),
            "progress": m.progress(),
        }),
        None => serde_json::Value::Null,
    };
    Ok(axum::Json(report))
}

/// The live snapshot when the follower runs, else rebuilt from the store.
async fn state(State(a): State<Admin>) -> Result<axum::Json<serde_json::Value>, HttpError> {
    let report = match &a.mirror {
        Some(m) => serde_json::json!({
            "chains": [super::report::state_json(&m.snapshot())],
        }),
        None => super::report::state(&a.store, &a.chain)
            .await
            .map_err(unavailable)?,
    };
    Ok(axum::Json(report))
}
