//! The key path's crypto workers: one thread per core that runs the heavy computations of a key
//! request (quote verification, key derivation) at a lower scheduling priority than the async
//! runtime.
//!
//! Flow: [`Workers::run`] queues a closure, a worker thread runs it and the caller awaits the
//! result. Why a pool of its own: under overload the runtime's threads must win the CPU for TLS
//! handshakes and the fast 503s of the backpressure limit, so that what the KMS cannot serve is
//! refused quickly; the key work uses the rest (a lower priority is a smaller share, never none).
//! How much key work is queued is bounded by the KMS's concurrency limit, not here. The threads
//! are the one piece of work outside the supervisor; they exit when the last [`Workers`] handle is
//! dropped, and `service` joins them ([`WorkerThreads::join`]) at shutdown.

use std::panic::AssertUnwindSafe;

type Job = Box<dyn FnOnce() + Send>;

/// Niceness-like priority of the workers on the cross-platform 0..=99 scale of
/// `thread_priority` (23 maps to nice +9 on Linux).
const WORKER_PRIORITY: u8 = 23;

/// Why a job gave no result.
#[derive(Debug, thiserror::Error)]
pub enum WorkersError {
    /// The worker threads have stopped (shutdown).
    #[error("the KMS crypto workers have stopped")]
    Stopped,
    /// The job panicked (a bug); the worker survives it.
    #[error("a KMS crypto job panicked")]
    Panicked,
}

/// Handle to the worker threads; they exit when the last handle is dropped.
#[derive(Clone, Debug)]
pub struct Workers {
    queue: crossbeam_channel::Sender<Job>,
}

/// The worker threads themselves, joined at shutdown.
#[derive(Debug)]
pub struct WorkerThreads(Vec<std::thread::JoinHandle<()>>);

impl WorkerThreads {
    /// Waits, at most `deadline`, for every worker to exit (they do once the last [`Workers`]
    /// handle is gone); `false` when some still run then.
    pub async fn join(self, deadline: std::time::Duration) -> bool {
        let joined = tokio::task::spawn_blocking(move || {
            for thread in self.0 {
                let _ = thread.join();
            }
        });
        matches!(tokio::time::timeout(deadline, joined).await, Ok(Ok(())))
    }
}

impl Workers {
    /// Starts `threads` workers (at least one).
    pub fn start(threads: usize) -> std::io::Result<(Self, WorkerThreads)> {
        let (queue, jobs) = crossbeam_channel::unbounded::<Job>();
        let handles = (0..threads.max(1))
            .map(|i| {
                let jobs = jobs.clone();
                std::thread::Builder::new()
                    .name(format!("kms-crypto-{i}"))
                    .spawn(move || work(&jobs))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok((Self { queue }, WorkerThreads(handles)))
    }

    /// Runs `job` on a worker and returns its result.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, WorkersError> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.queue
            .send(Box::new(move || {
                // The caller may have gone away (timeout); its result is then dropped.
                let _ = done.send(job());
            }))
            .map_err(|_| WorkersError::Stopped)?;
        // A panicking job drops `done` unsent.
        result.await.map_err(|_| WorkersError::Panicked)
    }
}

fn work(jobs: &crossbeam_channel::Receiver<Job>) {
    let lowered = thread_priority::ThreadPriorityValue::try_from(WORKER_PRIORITY)
        .map_err(|e| e.to_string())
        .and_then(|p| {
            thread_priority::set_current_thread_priority(
                thread_priority::ThreadPriority::Crossplatform(p),
            )
            .map_err(|e| e.to_string())
        });
    if let Err(e) = lowered {
        // Still correct, only less responsive under overload.
        tracing::warn!(error = %e, "could not lower the KMS crypto worker's priority");
    }
    while let Ok(job) = jobs.recv() {
        if std::panic::catch_unwind(AssertUnwindSafe(job)).is_err() {
            tracing::error!("a KMS crypto job panicked; its request was refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_lower_priority_workers_and_a_panic_is_survived() {
        let (workers, threads) = Workers::start(1).unwrap();
        let nice = workers
            .run(|| {
                // Linux: field 19 of the thread's stat is its nice value.
                std::fs::read_to_string("/proc/thread-self/stat")
                    .ok()
                    .and_then(|s| {
                        let after_comm = s.rsplit_once(')')?.1.to_owned();
                        after_comm.split_whitespace().nth(16)?.parse::<i32>().ok()
                    })
            })
            .await
            .unwrap();
        if let Some(nice) = nice {
            assert!(nice > 0, "worker nice value {nice}");
        }
        let err = workers
            .run(|| -> u8 { panic!("bug in a job") })
            .await
            .unwrap_err();
        assert!(matches!(err, WorkersError::Panicked), "{err}");
        // The single worker survived the panic.
        assert_eq!(workers.run(|| 6 * 7).await.unwrap(), 42);
        // Stopped at shutdown: the thread exits once the last handle is gone.
        drop(workers);
        assert!(threads.join(std::time::Duration::from_secs(5)).await);
    }
}
