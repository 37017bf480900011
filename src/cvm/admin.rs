//! `/admin/cvm`, behind the admin listener's token: the fleet as `cvm list --json` shows it
//! (`records`), every polled VMM's VMs as last seen (`vms`), and the two joined by instance id
//! (`joined`: stuck VMs with the KMS's refusal, unmonitored instances).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;

use super::config::CvmConfig;
use super::poller::CvmView;
use crate::http::HttpError;
use crate::store::Store;

type Admin = (Store, Arc<CvmView>, Arc<CvmConfig>);

/// The CVM admin routes (their state applied).
pub fn routes(store: Store, view: Arc<CvmView>, cfg: CvmConfig) -> Router {
    Router::new()
        .route("/admin/cvm", get(fleet))
        .with_state((store, view, Arc::new(cfg)))
}

async fn fleet(
    State((store, view, cfg)): State<Admin>,
) -> Result<axum::Json<super::report::Overview>, HttpError> {
    let report = super::report::fleet(&store).await.map_err(|e| {
        tracing::error!(error = %e, "cvm report failed");
        HttpError::Unavailable("database unavailable".into())
    })?;
    Ok(axum::Json(super::report::overview(
        report,
        view.all(),
        view.complete(),
        &cfg,
        crate::clock::unix_secs_i64(),
    )))
}
