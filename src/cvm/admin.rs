//! `/admin/cvm`, behind the admin listener's token: the fleet as `cvm list --json` shows it
//! (`records`), and every polled VMM's VMs as last seen (`vms`).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;

use super::poller::CvmView;
use crate::http::HttpError;
use crate::store::Store;

/// The CVM admin routes (their state applied).
pub fn routes(store: Store, view: Arc<CvmView>) -> Router {
    Router::new()
        .route("/admin/cvm", get(fleet))
        .with_state((store, view))
}

async fn fleet(
    State((store, view)): State<(Store, Arc<CvmView>)>,
) -> Result<axum::Json<serde_json::Value>, HttpError> {
    let report = super::report::fleet(&store).await.map_err(|e| {
        tracing::error!(error = %e, "cvm report failed");
        HttpError::Unavailable("database unavailable".into())
    })?;
    Ok(axum::Json(
        serde_json::json!({ "records": report, "vms": view.all() }),
    ))
}
