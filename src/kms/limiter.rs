//! The KMS's backpressure: at most `kms.max_concurrent_requests` key requests run, up to
//! `kms.max_queued_requests` wait, the rest are refused at once with 503 (`overloaded`), so an
//! overload answers fast instead of piling up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::metrics::{KmsMetrics, Refusal};
use super::refusal::Refused;

/// Bounds the work in progress: `max_concurrent` requests run, up to `max_queued` wait, the rest
/// are refused at once (so an overload answers fast instead of piling up).
pub(super) struct Limiter {
    slots: Arc<tokio::sync::Semaphore>,
    waiting: AtomicUsize,
    max_queued: usize,
}

impl Limiter {
    /// A limiter running `max_concurrent` requests with `max_queued` waiting.
    pub(super) fn new(max_concurrent: usize, max_queued: usize) -> Self {
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(max_concurrent)),
            waiting: AtomicUsize::new(0),
            max_queued,
        }
    }

    /// A slot, after waiting in the queue if needed; `overloaded` when the queue is full.
    pub(super) async fn enter(
        &self,
        metrics: &KmsMetrics,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Refused> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let queued = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _leave = scopeguard_dec(&self.waiting);
        if queued >= self.max_queued {
            metrics.queue_rejected();
            return Err(Refused::new(
                Refusal::Overloaded,
                "KMS overloaded; retry later",
            ));
        }
        let _depth = metrics.queued();
        self.slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Refused::new(Refusal::Internal, "KMS is shutting down"))
    }
}

/// Decrements the counter when dropped.
fn scopeguard_dec(counter: &AtomicUsize) -> impl Drop + '_ {
    struct Dec<'a>(&'a AtomicUsize);
    impl Drop for Dec<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    Dec(counter)
}
