//! The `[storage]` section: where state is persisted, and which database that selects.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::problem::{Problem, positive};
use crate::secret::redact_url;

/// Persistence.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory for the embedded database and key material (created with mode 0700).
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://...`; defaults to SQLite at `<data_dir>/keywarden.db`.
    pub database_url: Option<String>,
    /// Largest number of pooled database connections.
    pub max_connections: u32,
    /// How long to wait for the database when connecting or acquiring a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            database_url: None,
            max_connections: 8,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// The database the storage section selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseTarget {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL server (the URL as given).
    Postgres(String),
}

impl StorageConfig {
    /// The database selected: `database_url`, or SQLite in the data directory.
    pub fn database_target(&self) -> Result<DatabaseTarget, Problem> {
        let Some(raw) = &self.database_url else {
            return Ok(DatabaseTarget::Sqlite(self.data_dir.join("keywarden.db")));
        };
        let problem = |what: String| {
            Problem::new(
                "storage.database_url",
                what,
                "use sqlite://PATH or postgres://USER@HOST:PORT/DATABASE",
            )
        };
        let url = url::Url::parse(raw)
            .map_err(|e| problem(format!("malformed URL {:?}: {e}", redact_url(raw))))?;
        match url.scheme() {
            "sqlite" => {
                let path = raw
                    .trim_start_matches("sqlite://")
                    .trim_start_matches("sqlite:");
                let path = path.split('?').next().unwrap_or_default();
                if path.is_empty() {
                    return Err(problem("sqlite URL names no file".into()));
                }
                Ok(DatabaseTarget::Sqlite(PathBuf::from(path)))
            }
            "postgres" | "postgresql" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(problem("postgres URL names no host".into()));
                }
                Ok(DatabaseTarget::Postgres(raw.clone()))
            }
            other => Err(problem(format!("unsupported database scheme {other:?}"))),
        }
    }

    /// Problems of the section, each with its fix.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out: Vec<Problem> = self.database_target().err().into_iter().collect();
        if self.max_connections == 0 {
            out.push(Problem::new(
                "storage.max_connections",
                "must be at least 1",
                "set it to 1 or more (8 is the default)",
            ));
        }
        out.extend(positive(
            "storage.connect_timeout",
            self.connect_timeout,
            "5s",
        ));
        out
    }

    /// The section as shown to operators: credentials in the database URL redacted.
    pub fn redacted(&self) -> Self {
        Self {
            database_url: self.database_url.as_deref().map(redact_url),
            ..self.clone()
        }
    }
}
