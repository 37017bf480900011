//! The published mirror: what the KMS path reads, and how fresh it is.
//!
//! Flow: the sync engine [`Mirror::publish`]es a new [`MirrorState`] snapshot after every committed
//! batch and [`Mirror::mark_fresh`] whenever it read the head and had processed everything up to
//! the confirmed target. The KMS path calls [`Mirror::authorize_kms`] / [`Mirror::authorize_app`]:
//! one read lock to clone an `Arc`, never waiting on the engine's I/O; beyond `max_staleness` the
//! answer is a refusal with [`Reason::ChainStateStale`]. When the code answering for the KMS
//! contract or the app is not known, the snapshot says so ([`MirrorState::app_evaluation`]) and the
//! question goes to the chain ([`super::live::LiveAuthz`]) at the snapshot's block; no answer is a
//! refusal with [`Reason::AuthUnavailable`]. A snapshot whose batch applied an upgrade already
//! carries the new evaluation mode, so no request is answered from stale local state after it.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use serde::Serialize;

use super::authz::{self, AuthQuery, Decision, Reason};
use super::live::LiveAuthz;
use super::metrics::{ChainMetrics, Check};
use super::mirror::{Evaluation, MirrorState};
use super::rpc::EndpointHealth;

/// The engine's progress, as shown by the admin API.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SyncProgress {
    /// Chain id (0 until read).
    pub chain_id: u64,
    /// Newest head seen.
    pub head_block: u64,
    /// Confirmed target the engine syncs to.
    pub target_block: u64,
    /// Newest processed block.
    pub processed_block: u64,
    /// Endpoint health, in configuration order.
    pub endpoints: Vec<EndpointHealth>,
}

/// Shared handle on the mirror. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Mirror {
    state: RwLock<Arc<MirrorState>>,
    fresh_at: Mutex<Option<Instant>>,
    progress: RwLock<SyncProgress>,
    max_staleness: Duration,
    metrics: ChainMetrics,
    live: Option<LiveAuthz>,
}

impl Mirror {
    /// An empty, never-fresh mirror. Without `live`, contracts whose code is not known are refused
    /// with [`Reason::AuthUnavailable`].
    pub fn new(
        initial: MirrorState,
        max_staleness: Duration,
        metrics: ChainMetrics,
        live: Option<LiveAuthz>,
    ) -> Self {
        Self {
            state: RwLock::new(Arc::new(initial)),
            fresh_at: Mutex::new(None),
            progress: RwLock::new(SyncProgress::default()),
            max_staleness,
            metrics,
            live,
        }
    }

    /// The current state.
    pub fn snapshot(&self) -> Arc<MirrorState> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the state (after a committed batch or a rebuild), reporting contracts whose
    /// evaluation mode changed.
    pub fn publish(&self, state: Arc<MirrorState>) {
        self.metrics.set_sizes(&state.sizes());
        let (kms, apps) = state.live_counts();
        self.metrics.live_contracts(kms, apps);
        let previous = std::mem::replace(
            &mut *self.state.write().unwrap_or_else(|e| e.into_inner()),
            state.clone(),
        );
        log_mode_changes(&previous, &state);
    }

    /// Records that the engine saw the head and had caught up with it.
    pub fn mark_fresh(&self, at: Instant) {
        *self.fresh_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
    }

    /// Time since the engine last caught up; `None` if it never did.
    pub fn staleness(&self) -> Option<Duration> {
        self.fresh_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
    }

    /// Whether decisions are made (caught up within `max_staleness`).
    pub fn is_fresh(&self) -> bool {
        self.staleness().is_some_and(|s| s <= self.max_staleness)
    }

    /// Replaces the progress shown to operators.
    pub fn set_progress(&self, p: SyncProgress) {
        *self.progress.write().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// The engine's progress.
    pub fn progress(&self) -> SyncProgress {
        self.progress
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn decide(&self, check: Check, q: &AuthQuery) -> Decision {
        let d = if self.is_fresh() {
            let state = self.snapshot();
            let mode = match check {
                Check::Kms => state.kms_evaluation(),
                Check::App => state.app_evaluation(Address::from(q.app_id)),
            };
            match (mode, &self.live) {
                (Evaluation::Local, _) => match check {
                    Check::Kms => authz::is_kms_allowed(&state, q),
                    Check::App => authz::is_app_allowed(&state, q),
                },
                (Evaluation::Live, Some(live)) => live
                    .ask(check, q, state.block)
                    .await
                    .unwrap_or_else(|e| unavailable(e.to_string())),
                (Evaluation::Live, None) => unavailable("no RPC endpoint to ask the chain".into()),
            }
        } else {
            Decision::refuse(Reason::ChainStateStale)
        };
        self.metrics.decision(check, &d);
        d
    }

    /// `isKmsAllowed`: from the mirror for known code, from the chain otherwise; failing closed
    /// when stale or when the chain does not answer.
    pub async fn authorize_kms(&self, q: &AuthQuery) -> Decision {
        self.decide(Check::Kms, q).await
    }

    /// `isAppAllowed`: from the mirror for known code, from the chain otherwise; failing closed
    /// when stale or when the chain does not answer.
    pub async fn authorize_app(&self, q: &AuthQuery) -> Decision {
        self.decide(Check::App, q).await
    }
}

/// A refusal because a live answer could not be had.
fn unavailable(detail: String) -> Decision {
    Decision {
        detail: Some(detail.into()),
        ..Decision::refuse(Reason::AuthUnavailable)
    }
}

/// One WARN line per contract that moved to live evaluation (naming the code that answers) and
/// one INFO line per contract back on the mirror.
fn log_mode_changes(before: &MirrorState, after: &MirrorState) {
    let describe = |m: &MirrorState, a: Address| -> String {
        let answering = if a == m.kms_address {
            Some(m.kms_answering())
        } else {
            m.app_answering(a)
        };
        match answering.and_then(|x| x.hash()) {
            Some(h) => h.to_string(),
            None => "unobserved".into(),
        }
    };
    let contracts = std::iter::once((
        after.kms_address,
        "kms",
        before.kms_evaluation(),
        after.kms_evaluation(),
    ))
    .chain(after.registered_apps.iter().map(|a| {
        (
            *a,
            "app",
            before.app_evaluation(*a),
            after.app_evaluation(*a),
        )
    }));
    for (address, contract, was, now) in contracts {
        match (was, now) {
            (Evaluation::Local, Evaluation::Live) => tracing::warn!(
                %address,
                contract,
                code_hash = %describe(after, address),
                "contract switched to live evaluation: its answering code is not known, decisions are asked of the chain"
            ),
            (Evaluation::Live, Evaluation::Local) => tracing::info!(
                %address,
                contract,
                code_hash = %describe(after, address),
                "contract back on local evaluation: its answering code is known"
            ),
            _ => {}
        }
    }
}
