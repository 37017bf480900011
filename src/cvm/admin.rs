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
) -> Result<axum::Json<serde_json::Value>, HttpError> {
    let report = super::report::fleet(&store).await.map_err(|e| {
        tracing::error!(error = %e, "cvm report failed");
        HttpError::Unavailable("database unavailable".into())
    })?;
    let vms = view.all();
    let since = crate::clock::unix_secs_i64()
        .saturating_sub(i64::try_from(cfg.unmonitored_window.as_secs()).unwrap_or(i64::MAX));
    let joined = super::report::join_vms(&report, &vms, view.complete(), cfg.boot_timeout, since);
    Ok(axum::Json(
        serde_json::json!({ "records": report, "vms": vms, "joined": joined }),
    ))
}
