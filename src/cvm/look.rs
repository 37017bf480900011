//! One look at the live sources, for `cvm list` and `cvm show` run from a shell: every
//! `[[cvm.vmm]]` polled once and `[cvm.gateway]` asked once, the way the service's tasks do it
//! (the same pollers, with metrics nobody scrapes), into a [`CvmView`]. A source that gives no
//! usable answer is named with its reason; the others' VMs are still shown.

use std::sync::Arc;

use super::client::{SourceError, VmmClient};
use super::config::CvmConfig;
use super::metrics::CvmMetrics;
use super::poller::{CvmView, VmmPoller};
use super::{CvmError, gateway};

/// A source that gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Failed {
    /// Its address, as configured.
    pub source: String,
    /// Why.
    pub error: String,
}

/// What one look saw.
#[derive(Debug)]
pub struct Look {
    /// Every VM the VMMs that answered have.
    pub view: Arc<CvmView>,
    /// The sources that did not answer.
    pub failed: Vec<Failed>,
}

/// Polls every VMM once (all at once), then the gateway once.
pub async fn look(cfg: &CvmConfig) -> Result<Look, CvmError> {
    let view = Arc::new(CvmView::new(cfg.vmm.len()));
    let metrics = CvmMetrics::new(
        &mut prometheus_client::registry::Registry::default(),
        cfg.max_instance_series,
    );
    let mut pollers = Vec::with_capacity(cfg.vmm.len());
    for (index, entry) in cfg.vmm.iter().enumerate() {
        let poller = VmmPoller::new(
            index,
            entry,
            cfg.request_timeout,
            view.clone(),
            metrics.clone(),
        )
        .map_err(|source| CvmError::Token {
            key: format!("cvm.vmm[{index}]"),
            source,
        })?;
        pollers.push((entry.url.clone(), poller));
    }
    let polled = futures::future::join_all(
        pollers
            .iter_mut()
            .map(|(url, p)| async move { (url.clone(), p.poll_once().await) }),
    )
    .await;
    let failure = |source: String, e: SourceError| Failed {
        source,
        error: e.to_string(),
    };
    let mut failed: Vec<Failed> = polled
        .into_iter()
        .filter_map(|(url, r)| r.err().map(|e| failure(url, e)))
        .collect();
    if let Some(g) = &cfg.gateway {
        let client = VmmClient::new(g, cfg.request_timeout).map_err(|source| CvmError::Token {
            key: "cvm.gateway".into(),
            source,
        })?;
        let poller = gateway::GatewayPoller::new(client, g.poll_interval, view.clone(), metrics);
        if let Err(e) = poller.poll_once().await {
            failed.push(failure(g.url.clone(), e));
        }
    }
    Ok(Look { view, failed })
}
