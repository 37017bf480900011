//! `/admin/cvm`, behind the admin listener's token: the fleet as `cvm list --json` shows it.

use axum::Router;
use axum::extract::State;
use axum::routing::get;

use crate::http::HttpError;
use crate::store::Store;

/// The CVM admin routes (their state applied).
pub fn routes(store: Store) -> Router {
    Router::new()
        .route("/admin/cvm", get(fleet))
        .with_state(store)
}

async fn fleet(State(store): State<Store>) -> Result<axum::Json<serde_json::Value>, HttpError> {
    let report = super::report::fleet(&store).await.map_err(|e| {
        tracing::error!(error = %e, "cvm report failed");
        HttpError::Unavailable("database unavailable".into())
    })?;
    Ok(axum::Json(serde_json::json!(report)))
}
