//! Persistence: one store API over SQLite (embedded default) and PostgreSQL (selected by URL).
//!
//! Flow: [`Store::open`] creates the data directory (mode 0700), connects, and runs the
//! backend's migrations (`migrations/sqlite`, `migrations/postgres`) before anything else uses
//! it. Every method is written once: the `on_backend!`/`write_tx!` macros expand the same query
//! code for each pool type (`on_backend!` reads, `on_writer!`/`write_tx!` write). Check-then-write
//! steps run inside one write transaction. SQLite allows one writer at a time, so its writes go
//! through a pool of exactly one connection: writers queue in-process, in order, instead of
//! meeting `SQLITE_BUSY` and sleeping in SQLite's busy handler (which put 100 ms stalls into
//! the key path's tail under load); reads use the other pool concurrently (WAL).
//! Other modules' tables are served from child modules here (`collateral`: the TDX collateral
//! cache behind `attestation::collateral::CollateralCache`; `boots`: the KMS's boot records), so
//! the backend stays private. [`config`] is the `[storage]` section and the database it
//! selects; [`AuditRecord`] is written to the `audit` log target once storing it was tried.

mod boots;
mod collateral;
pub mod config;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::Row;

pub use boots::{BootObservation, BootRecord, InstanceRow, LedgerEntry, ServedColumn};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::secret::redact_url;
use config::{DatabaseTarget, StorageConfig};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created or is not a directory.
    #[error(
        "cannot use data directory {path}: {reason} (fix: choose a writable directory with --data-dir or storage.data_dir)"
    )]
    DataDir {
        /// The directory.
        path: String,
        /// The operating system's reason.
        reason: String,
    },
    /// Another running service holds the data directory.
    #[error(
        "data directory {path} is in use by another running keywarden (fix: stop it, or give this one its own --data-dir)"
    )]
    DataDirInUse {
        /// The directory.
        path: String,
    },
    /// The database could not be opened or reached.
    #[error("cannot open database {target}: {reason} (fix: {fix})")]
    Connect {
        /// The database, credentials redacted.
        target: String,
        /// Why.
        reason: String,
        /// What to do.
        fix: &'static str,
    },
    /// A migration failed; the database is left at the last migration that completed.
    #[error(
        "database migration failed on {target}: {reason} (fix: check that the database belongs to keywarden and the user may create tables)"
    )]
    Migrate {
        /// The database, credentials redacted.
        target: String,
        /// Why.
        reason: String,
    },
    /// A query failed.
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
    /// The database did not answer in time.
    #[error("database did not answer within {0:?}")]
    Timeout(Duration),
    /// A singleton write of a leader whose leadership has passed to another replica.
    #[error("this replica's leadership (epoch {0}) has passed to another replica: write refused")]
    Fenced(i64),
}

/// The pools of the selected database (visible to sibling modules' `impl Store` blocks).
#[derive(Clone, Debug)]
pub(crate) enum Backend {
    /// SQLite: readers, and the single writer connection.
    Sqlite {
        /// Read-only work.
        read: SqlitePool,
        /// Every write (one connection).
        write: SqlitePool,
    },
    /// PostgreSQL (one pool; the server arbitrates writers).
    Postgres(PgPool),
}

/// Expands `$body` once per backend with `$pool` bound to that backend's pool for reads.
macro_rules! on_backend {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite { read: $pool, .. } => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

/// Like `on_backend!`, with `$pool` bound to the pool that writes (a single statement that needs
/// no transaction).
macro_rules! on_writer {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite { write: $pool, .. } => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

/// Runs `$body` in a write transaction bound to `$tx`, committing if it completes; an early
/// return (`?`) drops the transaction, which rolls it back.
macro_rules! write_tx {
    ($store:expr, $tx:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite { write, .. } => {
                // IMMEDIATE: take the write lock up front, so another process (a CLI) meets
                // the busy timeout at BEGIN rather than a failed lock upgrade mid-transaction.
                let mut $tx = write.begin_with("BEGIN IMMEDIATE").await?;
                let out = $body;
                $tx.commit().await?;
                out
            }
            Backend::Postgres(pool) => {
                let mut $tx = pool.begin().await?;
                let out = $body;
                $tx.commit().await?;
                out
            }
        }
    };
}

/// Inside `write_tx!`: with `Some(epoch)` (a cluster leader's write), refuses the transaction
/// unless `epoch` still holds the leadership. The check is an update of the leadership row, so a
/// new leader's epoch bump waits for this transaction, and one made after the bump matches
/// nothing: two leaders never write at once.
macro_rules! fence {
    ($tx:ident, $epoch:expr) => {
        if let Some(epoch) = $epoch {
            let held =
                sqlx::query("UPDATE cluster_leader SET epoch = epoch WHERE id = 1 AND epoch = $1")
                    .bind(epoch)
                    .execute(&mut *$tx)
                    .await?
                    .rows_affected();
            if held != 1 {
                return Err($crate::store::StoreError::Fenced(epoch).into());
            }
        }
    };
}

// Sibling modules extend `Store` with these macros.
#[allow(unused_imports)]
pub(crate) use {fence, on_backend, on_writer, write_tx};

/// Appends one audit row (shared by single appends and ledger batches).
const INSERT_AUDIT: &str =
    "INSERT INTO audit_log (at, kind, outcome, detail) VALUES ($1, $2, $3, $4)";

/// The persistent store. Cheap to clone (pools are shared).
#[derive(Clone, Debug)]
pub struct Store {
    pub(crate) backend: Backend,
    target: String,
}

/// What [`Store::begin_run`] found and recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStart {
    /// Id of this run's row.
    pub run_id: i64,
    /// How many times the service has started on this store, including this one.
    pub runs: i64,
    /// The previous run ended without a clean shutdown.
    pub previous_unclean: bool,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// Unix seconds.
    pub at: i64,
    /// What happened (`service_start`, `admin_auth`, `key_request`, ...).
    pub kind: String,
    /// `ok`, `refused`, ... (a closed set per kind).
    pub outcome: String,
    /// JSON object with the details.
    pub detail: String,
}

impl AuditRecord {
    /// A record of `kind` with `outcome` now, not yet stored or logged.
    pub fn new(kind: &str, outcome: &str, detail: &serde_json::Value) -> Self {
        Self {
            at: crate::clock::unix_secs_i64(),
            kind: kind.to_owned(),
            outcome: outcome.to_owned(),
            detail: detail.to_string(),
        }
    }

    /// The record's line on the audit log target, written once storing it was attempted: as
    /// stored, or an ERROR line with the `error` that kept it from being stored. An `ok` that
    /// could not be recorded is logged as `failed`, because whatever it allowed is withheld.
    pub fn log(&self, error: Option<&str>) {
        let (kind, detail) = (self.kind.as_str(), self.detail.as_str());
        match error {
            None => {
                tracing::info!(target: crate::telemetry::AUDIT_TARGET, kind, outcome = self.outcome, detail, "audit");
            }
            Some(error) => {
                let outcome = match self.outcome.as_str() {
                    "ok" => "failed",
                    other => other,
                };
                tracing::error!(target: crate::telemetry::AUDIT_TARGET, kind, outcome, detail, error, "audit record could not be stored");
            }
        }
    }
}

impl Store {
    /// Opens (creating if needed) the configured database and migrates it.
    pub async fn open(cfg: &StorageConfig, target: &DatabaseTarget) -> Result<Self, StoreError> {
        let store = match target {
            DatabaseTarget::Sqlite(path) => Self::open_sqlite(cfg, path).await?,
            DatabaseTarget::Postgres(url) => Self::open_postgres(cfg, url).await?,
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn open_sqlite(cfg: &StorageConfig, path: &Path) -> Result<Self, StoreError> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        create_private_dir(&dir)?;
        // Created 0600 before SQLite opens it (its -wal and -shm files take the same mode): it
        // holds boot records and audit.
        #[cfg(unix)]
        if !path.exists() {
            let created = std::os::unix::fs::OpenOptionsExt::mode(
                std::fs::OpenOptions::new().write(true).create_new(true),
                0o600,
            )
            .open(path);
            if let Err(e) = created
                && e.kind() != std::io::ErrorKind::AlreadyExists
            {
                return Err(StoreError::DataDir {
                    path: path.display().to_string(),
                    reason: e.kind().to_string(),
                });
            }
        }
        let target = format!("sqlite://{}", path.display());
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a committed key-release or checkpoint must survive power loss.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(cfg.connect_timeout)
            .foreign_keys(true);
        let connect = |max: u32, opts: SqliteConnectOptions| {
            SqlitePoolOptions::new()
                .max_connections(max)
                .acquire_timeout(cfg.connect_timeout)
                .connect_with(opts)
        };
        let connect_error = |e: sqlx::Error| StoreError::Connect {
            target: target.clone(),
            reason: one_line(&e),
            fix: "check that the file's directory is writable and the file is an SQLite database",
        };
        // The writer first: it creates the file and switches it to WAL before readers open it.
        let write = connect(1, opts.clone()).await.map_err(connect_error)?;
        let read = connect(cfg.max_connections, opts)
            .await
            .map_err(connect_error)?;
        Ok(Self {
            backend: Backend::Sqlite { read, write },
            target,
        })
    }

    async fn open_postgres(cfg: &StorageConfig, url: &str) -> Result<Self, StoreError> {
        let target = redact_url(url);
        let fix = "check that PostgreSQL is running and the URL's host, port, user and database are right";
        let opts = PgConnectOptions::from_str(url).map_err(|e| StoreError::Connect {
            target: target.clone(),
            reason: one_line(&e),
            fix,
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(cfg.connect_timeout)
            .connect_with(opts)
            .await
            .map_err(|e| StoreError::Connect {
                target: target.clone(),
                reason: one_line(&e),
                fix,
            })?;
        Ok(Self {
            backend: Backend::Postgres(pool),
            target,
        })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let result = match &self.backend {
            Backend::Sqlite { write, .. } => sqlx::migrate!("migrations/sqlite").run(write).await,
            Backend::Postgres(pool) => sqlx::migrate!("migrations/postgres").run(pool).await,
        };
        result.map_err(|e| StoreError::Migrate {
            target: self.target.clone(),
            reason: one_line(&e),
        })
    }

    /// `sqlite` or `postgres`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite { .. } => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// The database this store uses, credentials redacted.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Answers when the database does, within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Result<(), StoreError> {
        let q = async {
            on_backend!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))
        };
        tokio::time::timeout(timeout, q)
            .await
            .map_err(|_| StoreError::Timeout(timeout))?
            .map_err(StoreError::from)
    }

    /// Closes every pooled connection (waits for checked-out ones to come back).
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite { read, write } => {
                read.close().await;
                write.close().await;
            }
            Backend::Postgres(pool) => pool.close().await,
        }
    }

    /// This node's stable identity, created on first use. Check-then-write in one transaction,
    /// so concurrent first starts agree on one id.
    pub async fn node_id(&self, now: i64) -> Result<String, StoreError> {
        let mut fresh = [0u8; 16];
        getrandom::fill(&mut fresh)
            .map_err(|e| StoreError::Query(sqlx::Error::Protocol(format!("no randomness: {e}"))))?;
        let fresh = hex::encode(fresh);
        Ok(write_tx!(self, tx => {
            sqlx::query("INSERT INTO meta (key, value, updated_at) VALUES ('node_id', $1, $2) ON CONFLICT (key) DO NOTHING")
                .bind(&fresh)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            let row = sqlx::query("SELECT value FROM meta WHERE key = 'node_id'")
                .fetch_one(&mut *tx)
                .await?;
            row.try_get::<String, _>("value")?
        }))
    }

    /// A value kept under `key` in the store's own key-value table, if any.
    pub async fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(on_backend!(self, pool => {
            sqlx::query("SELECT value FROM meta WHERE key = $1")
                .bind(key)
                .fetch_optional(pool)
                .await?
                .map(|row| row.try_get::<String, _>("value"))
                .transpose()?
        }))
    }

    /// Keeps `value` under `key` (replacing what was there).
    pub async fn set_meta(&self, key: &str, value: &str, now: i64) -> Result<(), StoreError> {
        on_writer!(self, pool => {
            sqlx::query("INSERT INTO meta (key, value, updated_at) VALUES ($1, $2, $3) ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at")
                .bind(key)
                .bind(value)
                .bind(now)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Records a process start of `replica` (the data directory's id); tells whether that
    /// replica's previous run ended cleanly.
    pub async fn begin_run(
        &self,
        replica: &str,
        version: &str,
        git_sha: &str,
        now: i64,
    ) -> Result<RunStart, StoreError> {
        Ok(write_tx!(self, tx => {
            let last = sqlx::query("SELECT stopped_at FROM service_runs WHERE replica = $1 ORDER BY id DESC LIMIT 1")
                .bind(replica)
                .fetch_optional(&mut *tx)
                .await?;
            let previous_unclean = match last {
                Some(row) => row.try_get::<Option<i64>, _>("stopped_at")?.is_none(),
                None => false,
            };
            let row = sqlx::query("INSERT INTO service_runs (started_at, version, git_sha, replica) VALUES ($1, $2, $3, $4) RETURNING id")
                .bind(now)
                .bind(version)
                .bind(git_sha)
                .bind(replica)
                .fetch_one(&mut *tx)
                .await?;
            let run_id: i64 = row.try_get("id")?;
            let runs: i64 = sqlx::query("SELECT COUNT(*) AS n FROM service_runs WHERE replica = $1")
                .bind(replica)
                .fetch_one(&mut *tx)
                .await?
                .try_get("n")?;
            RunStart { run_id, runs, previous_unclean }
        }))
    }

    /// Marks a run as cleanly stopped.
    pub async fn end_run(&self, run_id: i64, now: i64) -> Result<(), StoreError> {
        on_writer!(self, pool => {
            sqlx::query("UPDATE service_runs SET stopped_at = $1 WHERE id = $2")
                .bind(now)
                .bind(run_id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Appends one audit record.
    pub async fn append_audit(&self, rec: &AuditRecord) -> Result<(), StoreError> {
        on_writer!(self, pool => {
            sqlx::query(INSERT_AUDIT)
                .bind(rec.at)
                .bind(&rec.kind)
                .bind(&rec.outcome)
                .bind(&rec.detail)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The newest audit records, newest first.
    pub async fn recent_audit(&self, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
        self.audit_where("", "", i64::MIN, limit).await
    }

    /// The newest audit records of `kind` and `outcome` (empty: any) at or after `since` (Unix
    /// seconds), newest first, at most `limit`.
    async fn audit_where(
        &self,
        kind: &str,
        outcome: &str,
        since: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = on_backend!(self, pool => {
            sqlx::query(
                "SELECT at, kind, outcome, detail FROM audit_log \
                 WHERE ($1 = '' OR kind = $1) AND ($2 = '' OR outcome = $2) AND at >= $3 \
                 ORDER BY id DESC LIMIT $4",
            )
                .bind(kind)
                .bind(outcome)
                .bind(since)
                .bind(limit)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| {
                    Ok(AuditRecord {
                        at: r.try_get("at")?,
                        kind: r.try_get("kind")?,
                        outcome: r.try_get("outcome")?,
                        detail: r.try_get("detail")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?
        });
        Ok(rows)
    }
}

/// The exclusive lock one running service holds on its data directory (released when dropped,
/// or by the kernel when the process dies).
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

/// Name of the lock file in the data directory.
pub const LOCK_FILE: &str = "keywarden.lock";

/// Takes the data directory for this process (creating it, mode 0700, if needed): a second
/// service on the same directory would share its SQLite file and key files.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, StoreError> {
    create_private_dir(dir)?;
    let path = dir.join(LOCK_FILE);
    let mut open = std::fs::OpenOptions::new();
    open.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
    let file = open.open(&path).map_err(|e| StoreError::DataDir {
        path: path.display().to_string(),
        reason: e.kind().to_string(),
    })?;
    match file.try_lock() {
        Ok(()) => Ok(DataDirLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::DataDirInUse {
            path: dir.display().to_string(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::DataDir {
            path: path.display().to_string(),
            reason: e.kind().to_string(),
        }),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    let err = |e: std::io::Error| StoreError::DataDir {
        path: dir.display().to_string(),
        reason: e.kind().to_string(),
    };
    if !dir.exists() {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(err)?;
    } else if !dir.is_dir() {
        return Err(StoreError::DataDir {
            path: dir.display().to_string(),
            reason: "exists and is not a directory".into(),
        });
    }
    Ok(())
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
