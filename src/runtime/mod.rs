//! Runtime: task supervision, readiness, orderly shutdown, the process's open-file limit
//! ([`limits`]) and the `[runtime]` section ([`config`]).
//!
//! Flow: every long-running piece of work implements [`Task`] (`run(self, cancel)`) and is
//! started with [`Supervisor::spawn`] on one task tracker (a subsystem hands its tasks over as
//! one [`Tasks`]). A critical task that returns or
//! panics before shutdown was requested is fatal: the supervisor logs which one and the process
//! exits non-zero. SIGTERM / Ctrl-C cancel every task, and [`Supervisor::wait`] drains them
//! within the configured deadline.

pub mod config;
pub mod limits;
mod readiness;

use std::future::Future;
use std::time::Duration;

use futures::FutureExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::telemetry::ProcessMetrics;

pub use readiness::{ComponentState, NotReady, Readiness};

/// A long-running piece of work.
pub trait Task: Send + 'static {
    /// Stable name, used in logs and as the `task` metric label.
    fn name(&self) -> &'static str;
    /// Runs until `cancel` fires (or the work is done). An error ends the task.
    fn run(self, cancel: CancellationToken) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Starts one task under a supervisor.
type Spawn = Box<dyn FnOnce(&Supervisor) + Send>;

/// A subsystem's supervised tasks, handed to the [`Supervisor`] by `service` in one call.
#[derive(Default)]
pub struct Tasks(Vec<Spawn>);

impl Tasks {
    /// Adds `task`, to be supervised as `criticality` says.
    pub fn add<T: Task>(&mut self, task: T, criticality: Criticality) {
        self.0.push(Box::new(move |supervisor| {
            supervisor.spawn(task, criticality)
        }));
    }

    /// Starts every task under `supervisor`.
    pub fn spawn_on(self, supervisor: &Supervisor) {
        for spawn in self.0 {
            spawn(supervisor);
        }
    }
}

/// Whether a task's death stops the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Criticality {
    /// The service cannot work without it: its early exit or panic stops the process.
    Critical,
    /// Its failure is logged and counted; the service goes on.
    Optional,
}

/// How the supervised run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A shutdown signal arrived and every task drained in time.
    Clean,
    /// A critical task died; its name and why.
    CriticalTaskFailed {
        /// The task.
        task: &'static str,
        /// What happened.
        reason: String,
    },
    /// Tasks were still running when the shutdown deadline passed.
    DrainTimedOut(Duration),
}

impl Outcome {
    /// Process exit code for this outcome.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Clean => 0,
            Self::CriticalTaskFailed { .. } => 1,
            Self::DrainTimedOut(_) => 1,
        }
    }
}

/// Owns the task tracker and the cancellation token shared by all tasks.
pub struct Supervisor {
    tracker: TaskTracker,
    cancel: CancellationToken,
    fatal_tx: mpsc::UnboundedSender<(&'static str, String)>,
    fatal_rx: mpsc::UnboundedReceiver<(&'static str, String)>,
    metrics: ProcessMetrics,
    signals: ShutdownSignals,
}

impl Supervisor {
    /// A supervisor with no tasks yet; installs the SIGTERM/SIGINT handlers (call inside the
    /// runtime, before anything starts serving).
    pub fn new(metrics: ProcessMetrics) -> Self {
        let (fatal_tx, fatal_rx) = mpsc::unbounded_channel();
        Self {
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
            fatal_tx,
            fatal_rx,
            metrics,
            signals: ShutdownSignals::install(),
        }
    }

    /// The token every task watches; cancelling it starts shutdown.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Starts `task` under supervision.
    pub fn spawn<T: Task>(&self, task: T, criticality: Criticality) {
        let name = task.name();
        let cancel = self.cancel.clone();
        let fatal = self.fatal_tx.clone();
        let metrics = self.metrics.clone();
        metrics.task_started(name);
        self.tracker.spawn(async move {
            let result = std::panic::AssertUnwindSafe(task.run(cancel.clone()))
                .catch_unwind()
                .await;
            let failure = match result {
                Ok(Ok(())) if cancel.is_cancelled() => None,
                Ok(Ok(())) => Some("returned before shutdown".to_owned()),
                Ok(Err(e)) => Some(format!("failed: {e:#}")),
                Err(panic) => {
                    metrics.task_panicked(name);
                    Some(format!("panicked: {}", panic_message(panic.as_ref())))
                }
            };
            let Some(reason) = failure else { return };
            match criticality {
                Criticality::Critical => {
                    tracing::error!(task = name, %reason, "critical task stopped; shutting down");
                    let _ = fatal.send((name, reason));
                }
                Criticality::Optional => {
                    tracing::error!(task = name, %reason, "background task stopped");
                }
            }
        });
    }

    /// Waits for a shutdown signal or a critical task's death, then cancels every task and
    /// drains them within `deadline`.
    pub async fn wait(mut self, deadline: Duration) -> Outcome {
        let mut outcome = tokio::select! {
            () = self.signals.recv() => {
                tracing::info!("shutdown requested; draining");
                Outcome::Clean
            }
            Some((task, reason)) = self.fatal_rx.recv() => Outcome::CriticalTaskFailed { task, reason },
            () = self.cancel.cancelled() => Outcome::Clean,
        };
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::error!(
                still_running = self.tracker.len(),
                deadline = %humantime::format_duration(deadline),
                "shutdown deadline passed with tasks still running"
            );
            if outcome == Outcome::Clean {
                outcome = Outcome::DrainTimedOut(deadline);
            }
        }
        outcome
    }
}

/// SIGTERM and SIGINT handlers, installed when created: a signal that arrives before the
/// supervisor waits (say, right after the listeners came up) is kept, not fatal.
struct ShutdownSignals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let install = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(signal = name, error = %e, "cannot listen for signal");
                    None
                }
            };
            Self {
                term: install(SignalKind::terminate(), "SIGTERM"),
                int: install(SignalKind::interrupt(), "SIGINT"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Resolves on the first signal; never, if no handler could be installed.
    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                () = next(&mut self.term) => {}
                () = next(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The ticker of a background loop: the first tick at once, a missed tick delayed rather than
/// made up in a burst.
pub fn ticker(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Text of a panic payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    struct Sleeper;
    impl Task for Sleeper {
        fn name(&self) -> &'static str {
            "sleeper"
        }
        async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
            cancel.cancelled().await;
            Ok(())
        }
    }

    struct Panicker;
    impl Task for Panicker {
        fn name(&self) -> &'static str {
            "panicker"
        }
        async fn run(self, _cancel: CancellationToken) -> anyhow::Result<()> {
            panic!("boom");
        }
    }

    struct Stubborn;
    impl Task for Stubborn {
        fn name(&self) -> &'static str {
            "stubborn"
        }
        async fn run(self, _cancel: CancellationToken) -> anyhow::Result<()> {
            std::future::pending::<()>().await;
            Ok(())
        }
    }

    fn metrics() -> (Registry, ProcessMetrics) {
        let mut r = Registry::default();
        let m = ProcessMetrics::new(&mut r);
        (r, m)
    }

    #[tokio::test]
    async fn critical_task_panic_stops_the_process_and_is_counted() {
        let (r, m) = metrics();
        let s = Supervisor::new(m);
        s.spawn(Sleeper, Criticality::Critical);
        s.spawn(Panicker, Criticality::Critical);
        let outcome = s.wait(Duration::from_secs(5)).await;
        assert!(
            matches!(&outcome, Outcome::CriticalTaskFailed { task: "panicker", reason } if reason.contains("boom")),
            "{outcome:?}"
        );
        assert_eq!(outcome.exit_code(), 1);
        let text = crate::telemetry::encode(&r).unwrap();
        assert!(text.contains("keywarden_background_task_panics_total{task=\"panicker\"} 1"));
    }

    #[tokio::test]
    async fn optional_task_panic_does_not_stop_the_process() {
        let (_r, m) = metrics();
        let s = Supervisor::new(m);
        let cancel = s.cancel_token();
        s.spawn(Panicker, Criticality::Optional);
        s.spawn(Sleeper, Criticality::Critical);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            cancel.cancel();
        });
        assert_eq!(s.wait(Duration::from_secs(5)).await, Outcome::Clean);
    }

    #[tokio::test]
    async fn drain_deadline_is_enforced() {
        let (_r, m) = metrics();
        let s = Supervisor::new(m);
        let cancel = s.cancel_token();
        s.spawn(Stubborn, Criticality::Optional);
        cancel.cancel();
        let outcome = s.wait(Duration::from_millis(50)).await;
        assert_eq!(outcome, Outcome::DrainTimedOut(Duration::from_millis(50)));
    }
}
