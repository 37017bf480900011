//! The KMS ledger: the boot record and the audit record of every key request, group-committed.
//!
//! Flow: a request about to release keys calls [`Ledger::release`] and waits; a refused one (or one that releases no boot-bound key) calls
//! [`Ledger::audit`]. The [`LedgerWriter`] task takes the first waiting entry and everything
//! queued behind it (up to [`MAX_BATCH`]), writes them in one transaction
//! ([`Store::record_ledger`]) and answers each caller. Keys leave only after their boot record is
//! committed (no record, no keys); a failed commit withholds the keys of the whole batch. Each
//! entry's `audit` log line is written after the commit: as stored, or as not stored. One
//! durable commit per batch instead of two per request is what lets the key path keep up with
//! concurrent boots on a disk where each sync costs about a millisecond.

use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::metrics::KmsMetrics;
use crate::runtime::Task;
use crate::store::{AuditRecord, BootObservation, BootRecord, LedgerEntry, Store};

/// Most entries written in one transaction (bounds the transaction's time and the waiters'
/// latency).
pub const MAX_BATCH: usize = 256;

/// Entries that may wait for the writer before callers wait to enqueue.
const QUEUE: usize = 4 * MAX_BATCH;

/// Why an entry was not recorded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// The writer has stopped (shutdown).
    #[error("the ledger writer has stopped")]
    Stopped,
    /// The batch's transaction failed; nothing of it was written.
    #[error("ledger commit failed: {0}")]
    Commit(String),
}

struct Pending {
    entry: LedgerEntry,
    reply: oneshot::Sender<Result<Option<BootRecord>, LedgerError>>,
}

/// The handle requests use. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Ledger {
    queue: mpsc::Sender<Pending>,
}

/// The task that commits the ledger's batches.
pub struct LedgerWriter {
    queue: mpsc::Receiver<Pending>,
    store: Store,
    metrics: KmsMetrics,
}

impl Ledger {
    /// A ledger over `store`, and the writer task to run under the supervisor.
    pub fn new(store: Store, metrics: KmsMetrics) -> (Self, LedgerWriter) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Self { queue: tx },
            LedgerWriter {
                queue: rx,
                store,
                metrics,
            },
        )
    }

    async fn submit(&self, entry: LedgerEntry) -> Result<Option<BootRecord>, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { entry, reply })
            .await
            .map_err(|_| LedgerError::Stopped)?;
        answer.await.map_err(|_| LedgerError::Stopped)?
    }

    /// Records a key release and its audit record; returns the instance's record once both are
    /// committed.
    pub async fn release(
        &self,
        boot: BootObservation,
        audit: AuditRecord,
    ) -> Result<BootRecord, LedgerError> {
        self.submit(LedgerEntry {
            boot: Some(boot),
            audit,
        })
        .await?
        .ok_or_else(|| LedgerError::Commit("the boot record was not returned".into()))
    }

    /// Records the audit record of a request that released no boot (a refusal, or a key that is
    /// not tied to a boot); a key goes out only once this returned `Ok`.
    pub async fn audit(&self, audit: AuditRecord) -> Result<(), LedgerError> {
        self.submit(LedgerEntry { boot: None, audit })
            .await
            .map(drop)
    }
}

impl LedgerWriter {
    async fn commit(&self, batch: Vec<Pending>) {
        let started = Instant::now();
        let (entries, replies): (Vec<LedgerEntry>, Vec<_>) =
            batch.into_iter().map(|p| (p.entry, p.reply)).unzip();
        let result = self.store.record_ledger(&entries).await;
        self.metrics.ledger_commit(
            entries.len(),
            started.elapsed().as_secs_f64(),
            result.is_ok(),
        );
        // The audit lines follow the commit, so none claims what was not recorded.
        let error = result.as_ref().err().map(ToString::to_string);
        for entry in &entries {
            entry.audit.log(error.as_deref());
        }
        match result {
            Ok(records) => {
                for (reply, record) in replies.into_iter().zip(records) {
                    // A caller that went away (timeout) no longer needs the answer.
                    let _ = reply.send(Ok(record));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, entries = entries.len(), "ledger commit failed; keys withheld");
                let e = LedgerError::Commit(e.to_string());
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Moves what is queued now, up to the batch limit, behind `first`.
    fn batch_after(&mut self, first: Pending) -> Vec<Pending> {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match self.queue.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        batch
    }
}

impl Task for LedgerWriter {
    fn name(&self) -> &'static str {
        "kms_ledger"
    }

    /// Stops when the last [`Ledger`] handle is gone (the KMS listener has drained its
    /// connections), not when `cancel` fires: a request still in flight at shutdown must be able
    /// to record its release, or it would fail after its caller was verified. The supervisor's
    /// drain deadline bounds the wait.
    async fn run(mut self, _cancel: CancellationToken) -> anyhow::Result<()> {
        while let Some(first) = self.queue.recv().await {
            let batch = self.batch_after(first);
            self.commit(batch).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::config::{DatabaseTarget, StorageConfig};

    async fn store(dir: &std::path::Path) -> Store {
        let cfg = StorageConfig::default();
        Store::open(&cfg, &DatabaseTarget::Sqlite(dir.join("kw.db")))
            .await
            .unwrap()
    }

    fn boot(instance: u8) -> BootObservation {
        BootObservation {
            app_id: "aa".repeat(20),
            instance_id: format!("{instance:02x}").repeat(20),
            at: 100,
            mr_aggregated: "11".repeat(32),
            compose_hash: "22".repeat(32),
            os_image_hash: "33".repeat(32),
            device_id: "44".repeat(32),
        }
    }

    fn audit(outcome: &str) -> AuditRecord {
        AuditRecord {
            at: 100,
            kind: "key_request".into(),
            outcome: outcome.into(),
            detail: "{}".into(),
        }
    }

    #[tokio::test]
    async fn concurrent_releases_are_all_recorded_with_their_audit_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        let mut registry = prometheus_client::registry::Registry::default();
        let (ledger, writer) = Ledger::new(store.clone(), KmsMetrics::new(&mut registry));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(writer.run(cancel.clone()));
        let releases = (0..50u8).map(|i| {
            let ledger = ledger.clone();
            // Ten instances, five boots each: the counts prove no boot was lost or merged.
            async move { ledger.release(boot(i % 10), audit("ok")).await }
        });
        let records = futures::future::join_all(releases).await;
        assert!(records.iter().all(Result::is_ok));
        ledger.audit(audit("refused")).await.unwrap();
        for i in 0..10u8 {
            let rec = store
                .boot_record(&"aa".repeat(20), &format!("{i:02x}").repeat(20))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(rec.boot_count, 5);
        }
        let audits = store.recent_audit(100).await.unwrap();
        assert_eq!(audits.iter().filter(|a| a.outcome == "ok").count(), 50);
        assert_eq!(audits.iter().filter(|a| a.outcome == "refused").count(), 1);
        // Shutdown: cancelling alone does not stop it; the last handle going away does.
        cancel.cancel();
        tokio::task::yield_now().await;
        assert!(!task.is_finished());
        drop(ledger);
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn without_a_writer_the_release_is_withheld() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        let mut registry = prometheus_client::registry::Registry::default();
        let (ledger, writer) = Ledger::new(store.clone(), KmsMetrics::new(&mut registry));
        drop(writer);
        let err = ledger.release(boot(1), audit("ok")).await.unwrap_err();
        assert!(matches!(err, LedgerError::Stopped), "{err}");
        assert!(
            store
                .boot_record(&"aa".repeat(20), &"01".repeat(20))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_failed_commit_fails_every_entry_of_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        let mut registry = prometheus_client::registry::Registry::default();
        let (ledger, writer) = Ledger::new(store.clone(), KmsMetrics::new(&mut registry));
        // A closed store makes every commit fail, as a full disk or a lost database would.
        store.close().await;
        let task = tokio::spawn(writer.run(CancellationToken::new()));
        let err = ledger.release(boot(1), audit("ok")).await.unwrap_err();
        assert!(matches!(err, LedgerError::Commit(_)), "{err}");
        drop(ledger);
        task.await.unwrap().unwrap();
    }
}
