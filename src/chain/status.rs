//! The follower's freshness and progress, shared with whoever reads its projections.
//!
//! Flow: the follower ([`super::follower`]) [`SyncStatus::set_progress`]es after every committed
//! batch and [`SyncStatus::mark_fresh`]es whenever it read the head and had processed everything
//! up to the confirmed target. Readers (the KMS mirror's decisions, readiness, the admin API) ask
//! [`SyncStatus::is_fresh`]: one lock, never waiting on the follower's I/O.

use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::rpc::EndpointHealth;

/// The follower's progress, as shown by the admin API.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SyncProgress {
    /// Chain id (0 until read).
    pub chain_id: u64,
    /// Newest head seen.
    pub head_block: u64,
    /// Confirmed target the follower syncs to.
    pub target_block: u64,
    /// Newest processed block.
    pub processed_block: u64,
    /// Endpoint health, in configuration order.
    pub endpoints: Vec<EndpointHealth>,
}

/// How fresh one chain's follower is, and how far it got.
#[derive(Debug)]
pub struct SyncStatus {
    /// Instants are kept as nanoseconds since this one (a year before the status was made).
    origin: Instant,
    /// When the follower last caught up, in nanoseconds since `origin`, plus one; 0: never. An
    /// atomic: every key request reads it, without a lock.
    fresh_at: AtomicU64,
    progress: RwLock<SyncProgress>,
    max_staleness: Duration,
}

impl SyncStatus {
    /// Never fresh until the follower first catches up; stale `max_staleness` after it last did.
    pub fn new(max_staleness: Duration) -> Self {
        let now = Instant::now();
        Self {
            origin: now
                .checked_sub(Duration::from_secs(365 * 24 * 3600))
                .unwrap_or(now),
            fresh_at: AtomicU64::new(0),
            progress: RwLock::new(SyncProgress::default()),
            max_staleness,
        }
    }

    /// Records that the follower saw the head and had caught up with it.
    pub fn mark_fresh(&self, at: Instant) {
        let nanos = at.saturating_duration_since(self.origin).as_nanos();
        let stored = u64::try_from(nanos).unwrap_or(u64::MAX - 1) + 1;
        self.fresh_at.store(stored, Ordering::Release);
    }

    /// Time since the follower last caught up; `None` if it never did.
    pub fn staleness(&self) -> Option<Duration> {
        match self.fresh_at.load(Ordering::Acquire) {
            0 => None,
            n => Some(
                Instant::now().saturating_duration_since(self.origin + Duration::from_nanos(n - 1)),
            ),
        }
    }

    /// Whether projections may be relied on (caught up within `max_staleness`).
    pub fn is_fresh(&self) -> bool {
        self.staleness().is_some_and(|s| s <= self.max_staleness)
    }

    /// Replaces the progress shown to operators.
    pub fn set_progress(&self, p: SyncProgress) {
        *self.progress.write().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// The follower's progress.
    pub fn progress(&self) -> SyncProgress {
        self.progress
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_is_fresh_only_after_catching_up_and_within_max_staleness() {
        let s = SyncStatus::new(Duration::from_secs(10));
        assert!(!s.is_fresh() && s.staleness().is_none());
        s.mark_fresh(Instant::now());
        assert!(s.is_fresh());
        s.mark_fresh(Instant::now() - Duration::from_secs(11));
        assert!(!s.is_fresh());
    }
}
