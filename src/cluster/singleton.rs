//! [`Singleton`]: background work that runs only while this replica leads.
//!
//! Flow: wait for a leadership term → run the task with the term's token (cancelled, and the
//! task drained by its own `run`, when the leadership ends or on shutdown) → on the next term,
//! build the task afresh, so it starts from the shared tables as a restart would. On a single
//! node the one term lasts until shutdown.

use tokio_util::sync::CancellationToken;

use super::Leadership;
use crate::runtime::Task;

/// Work of type `T` run only within leadership terms; `build` makes it for every term after
/// the first.
pub struct Singleton<T, F> {
    leadership: Leadership,
    first: Option<T>,
    name: &'static str,
    build: F,
}

impl<T, F> Singleton<T, F>
where
    T: Task,
    F: FnMut() -> anyhow::Result<T> + Send + 'static,
{
    /// `first` for the first term, then what `build` makes for each later one.
    pub fn new(leadership: Leadership, first: T, build: F) -> Self {
        Self {
            leadership,
            name: first.name(),
            first: Some(first),
            build,
        }
    }
}

impl<T, F> Task for Singleton<T, F>
where
    T: Task,
    F: FnMut() -> anyhow::Result<T> + Send + 'static,
{
    fn name(&self) -> &'static str {
        self.name
    }

    async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
        while let Some(term) = self.leadership.term(&cancel).await {
            let task = match self.first.take() {
                Some(t) => t,
                None => (self.build)()?,
            };
            task.run(term.token.clone()).await?;
            // Work that ends on its own waits for the next term, not a busy loop.
            term.token.cancelled().await;
            if cancel.is_cancelled() {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(Arc<AtomicUsize>);

    impl Task for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }

        async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            cancel.cancelled().await;
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_single_node_runs_its_singleton_once_until_shutdown() {
        let runs = Arc::new(AtomicUsize::new(0));
        let built = runs.clone();
        let task = Singleton::new(Leadership::single(), Counting(runs.clone()), move || {
            Ok(Counting(built.clone()))
        });
        assert_eq!(task.name(), "counting");
        let cancel = CancellationToken::new();
        let running = tokio::spawn(task.run(cancel.clone()));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        cancel.cancel();
        running.await.unwrap().unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
