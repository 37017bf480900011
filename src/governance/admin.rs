//! The governance admin routes, behind the admin listener's token: `/admin/governance/topology`
//! (the running watcher's tree, or the one rebuilt from the store when it does not run).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde_json::json;

use super::watch::GovernanceView;
use crate::http::HttpError;
use crate::store::Store;

#[derive(Clone)]
struct Admin {
    store: Store,
    live: Option<Arc<GovernanceView>>,
}

/// The governance admin routes (their state applied).
pub fn routes(store: Store, live: Option<Arc<GovernanceView>>) -> Router {
    Router::new()
        .route("/admin/governance/topology", get(topology))
        .with_state(Admin { store, live })
}

async fn topology(State(a): State<Admin>) -> Result<axum::Json<serde_json::Value>, HttpError> {
    let report = match &a.live {
        Some(view) => json!({ "chains": [super::topology::topology(&view.snapshot())] }),
        None => super::report::topology(&a.store).await.map_err(|e| {
            tracing::error!(error = %e, "governance report failed");
            HttpError::Unavailable("database unavailable".into())
        })?,
    };
    Ok(axum::Json(report))
}
