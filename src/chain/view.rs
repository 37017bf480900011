//! The published mirror: what the KMS path reads, and how fresh it is.
//!
//! Flow: the sync engine [`Mirror::publish`]es a new [`MirrorState`] snapshot after every committed
//! batch and [`Mirror::mark_fresh`] whenever it read the head and had processed everything up to
//! the confirmed target. The KMS path calls [`Mirror::authorize_kms`] / [`Mirror::authorize_app`]:
//! one read lock to clone an `Arc`, never waiting on the engine's I/O; beyond `max_staleness` the
//! answer is a refusal with [`Reason::ChainStateStale`].

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::authz::{self, AuthQuery, Decision, Reason};
use super::metrics::{ChainMetrics, Check};
use super::mirror::MirrorState;
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
}

impl Mirror {
    /// An empty, never-fresh mirror.
    pub fn new(initial: MirrorState, max_staleness: Duration, metrics: ChainMetrics) -> Self {
        Self {
            state: RwLock::new(Arc::new(initial)),
            fresh_at: Mutex::new(None),
            progress: RwLock::new(SyncProgress::default()),
            max_staleness,
            metrics,
        }
    }

    /// The current state.
    pub fn snapshot(&self) -> Arc<MirrorState> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the state (after a committed batch or a rebuild).
    pub fn publish(&self, state: Arc<MirrorState>) {
        self.metrics.set_sizes(&state.sizes());
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = state;
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

    fn decide(
        &self,
        check: Check,
        f: fn(&MirrorState, &AuthQuery) -> Decision,
        q: &AuthQuery,
    ) -> Decision {
        let d = if self.is_fresh() {
            f(&self.snapshot(), q)
        } else {
            Decision {
                allowed: false,
                reason: Reason::ChainStateStale,
            }
        };
        self.metrics.decision(check, &d);
        d
    }

    /// `isKmsAllowed` from the mirror, failing closed when stale.
    pub fn authorize_kms(&self, q: &AuthQuery) -> Decision {
        self.decide(Check::Kms, authz::is_kms_allowed, q)
    }

    /// `isAppAllowed` from the mirror, failing closed when stale.
    pub fn authorize_app(&self, q: &AuthQuery) -> Decision {
        self.decide(Check::App, authz::is_app_allowed, q)
    }
}
