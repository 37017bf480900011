//! The governance admin routes, behind the admin listener's token: `/admin/governance/topology`
//! (the running watcher's tree, or the one rebuilt from the store when it does not run) and
//! `/admin/governance/proposals` (each watched Safe's pending proposals, as checked).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde_json::json;

use super::queue::ProposalsView;
use super::watch::GovernanceView;
use crate::http::HttpError;
use crate::store::Store;

/// The running watcher's views.
type Live = (Arc<GovernanceView>, Arc<ProposalsView>);

#[derive(Clone)]
struct Admin {
    store: Store,
    live: Option<Live>,
}

/// The governance admin routes (their state applied).
pub fn routes(store: Store, live: Option<Live>) -> Router {
    Router::new()
        .route("/admin/governance/topology", get(topology))
        .route("/admin/governance/proposals", get(proposals))
        .with_state(Admin { store, live })
}

async fn proposals(State(a): State<Admin>) -> Result<axum::Json<serde_json::Value>, HttpError> {
    let Some((_, p)) = &a.live else {
        return Err(HttpError::Unavailable(
            "the governance watcher does not run (no [chain] section)".into(),
        ));
    };
    let queues: serde_json::Map<String, serde_json::Value> = p
        .snapshot()
        .iter()
        .map(|(safe, q)| (safe.to_string(), serde_json::json!(q)))
        .collect();
    Ok(axum::Json(json!({ "safes": queues })))
}

async fn topology(State(a): State<Admin>) -> Result<axum::Json<serde_json::Value>, HttpError> {
    let report = match &a.live {
        Some((view, _)) => json!({ "chains": [super::topology::topology(&view.snapshot())] }),
        None => super::report::topology(&a.store).await.map_err(|e| {
            tracing::error!(error = %e, "governance report failed");
            HttpError::Unavailable("database unavailable".into())
        })?,
    };
    Ok(axum::Json(report))
}
