//! The published mirror: what the KMS path reads, and how fresh it is.
//!
//! Flow: the KMS projection ([`super::kms_projection`]) [`Mirror::publish`]es a new
//! [`MirrorState`] snapshot after every committed batch; how fresh it is comes from the chain's
//! follower ([`SyncStatus`]). The KMS path calls [`Mirror::authorize_kms`] / [`Mirror::authorize_app`]:
//! one read lock to clone an `Arc`, never waiting on the follower's I/O; beyond `max_staleness` the
//! answer is a refusal with [`Reason::ChainStateStale`]. When the code answering for the KMS
//! contract or the app is not known, the snapshot says so ([`MirrorState::app_evaluation`]) and the
//! question goes to the chain ([`super::live::LiveAuthz`]) at the snapshot's block; no answer is a
//! refusal with [`Reason::AuthUnavailable`]. A snapshot whose batch applied an upgrade already
//! carries the new evaluation mode, so no request is answered from stale local state after it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use alloy::primitives::Address;

use super::authz::{self, AuthQuery, Decision, Reason};
use super::live::LiveAuthz;
use super::metrics::{ChainMetrics, Check};
use super::mirror::{Evaluation, MirrorState};
use super::status::{SyncProgress, SyncStatus};

/// Shared handle on the mirror. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Mirror {
    state: RwLock<Arc<MirrorState>>,
    status: Arc<SyncStatus>,
    metrics: ChainMetrics,
    live: Option<LiveAuthz>,
    /// Whether a state was published yet (the first one is compared with "all local", so
    /// contracts already on live evaluation at start-up are reported too).
    published: std::sync::atomic::AtomicBool,
}

impl Mirror {
    /// A mirror as fresh as `status` says. Without `live`, contracts whose code is not known are
    /// refused with [`Reason::AuthUnavailable`].
    pub fn new(
        initial: MirrorState,
        status: Arc<SyncStatus>,
        metrics: ChainMetrics,
        live: Option<LiveAuthz>,
    ) -> Self {
        Self {
            state: RwLock::new(Arc::new(initial)),
            status,
            metrics,
            live,
            published: std::sync::atomic::AtomicBool::new(false),
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
        let first = !self
            .published
            .swap(true, std::sync::atomic::Ordering::Relaxed);
        log_mode_changes((!first).then_some(&*previous), &state);
    }

    /// The chain metrics its decisions are counted in.
    pub fn metrics(&self) -> &ChainMetrics {
        &self.metrics
    }

    /// The follower's freshness this mirror's decisions follow.
    pub fn status(&self) -> &SyncStatus {
        &self.status
    }

    /// Time since the follower last caught up; `None` if it never did.
    pub fn staleness(&self) -> Option<Duration> {
        self.status.staleness()
    }

    /// Whether decisions are made (the follower caught up within `max_staleness`).
    pub fn is_fresh(&self) -> bool {
        self.status.is_fresh()
    }

    /// The follower's progress.
    pub fn progress(&self) -> SyncProgress {
        self.status.progress()
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

/// One WARN line per contract whose own answering code became code the mirror does not know
/// (naming its hash), and one INFO line per contract whose unknown code gave way to known code.
/// An app counts by its own code (a KMS contract on unknown code sends every app live, and is
/// reported once); code not observed yet is not reported. Without `before` (the first state
/// published), every contract counts as having been on known code.
fn log_mode_changes(before: Option<&MirrorState>, after: &MirrorState) {
    // (on unknown code, the answering code's hash)
    let status = |m: &MirrorState, a: Address| -> (bool, Option<alloy::primitives::B256>) {
        if a == m.kms_address {
            let answering = m.kms_answering();
            (answering.kind().is_none(), answering.hash())
        } else {
            match m.apps.get(&a) {
                Some(p) if p.has_code && m.registered_apps.contains(&a) => {
                    let answering = m.answering(a, p.implementation);
                    (
                        answering.kind() != Some(super::code::CodeKind::DstackApp),
                        answering.hash(),
                    )
                }
                _ => (false, None),
            }
        }
    };
    let contracts = std::iter::once(after.kms_address).chain(after.registered_apps.iter().copied());
    for address in contracts {
        let contract = if address == after.kms_address {
            "kms"
        } else {
            "app"
        };
        let (unknown, hash) = status(after, address);
        let (was_unknown, was_hash) = before.map_or((false, None), |b| status(b, address));
        match (was_unknown, unknown, hash) {
            (false, true, Some(code_hash)) => tracing::warn!(
                %address,
                contract,
                %code_hash,
                "contract switched to live evaluation: its answering code is not known, decisions are asked of the chain"
            ),
            (true, false, Some(code_hash)) if was_hash.is_some() => tracing::info!(
                %address,
                contract,
                %code_hash,
                "contract back on local evaluation: its answering code is known"
            ),
            _ => {}
        }
    }
}
