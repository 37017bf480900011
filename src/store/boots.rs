//! Boot records: what the KMS learns from every key release (spec/07 §1). The KMS's ledger
//! writes them, with the audit record of each request, in batches: one transaction covers the
//! instance rows, the served-measurement rows and the audit rows of the batch.

use serde::Serialize;
use sqlx::Row;

use super::{AuditRecord, Backend, Store, StoreError, on_backend, write_tx};

/// One key release to record. Byte fields are lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootObservation {
    /// App id.
    pub app_id: String,
    /// Instance id (empty when the app has none).
    pub instance_id: String,
    /// Unix seconds.
    pub at: i64,
    /// Aggregated measurement.
    pub mr_aggregated: String,
    /// Compose hash.
    pub compose_hash: String,
    /// OS image hash.
    pub os_image_hash: String,
    /// Device id.
    pub device_id: String,
}

/// A measurement column of `served_measurements`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServedColumn {
    /// `mr_aggregated`.
    MrAggregated,
    /// `compose_hash`.
    ComposeHash,
    /// `os_image_hash`.
    OsImageHash,
    /// `device_id`.
    DeviceId,
}

impl ServedColumn {
    fn name(self) -> &'static str {
        match self {
            Self::MrAggregated => "mr_aggregated",
            Self::ComposeHash => "compose_hash",
            Self::OsImageHash => "os_image_hash",
            Self::DeviceId => "device_id",
        }
    }
}

/// An instance's record after a boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootRecord {
    /// First boot (unix seconds).
    pub first_boot: i64,
    /// Latest boot (unix seconds).
    pub last_boot: i64,
    /// Boots seen, including this one.
    pub boot_count: i64,
}

/// One instance's row: its boots and the measurements of its latest boot. Byte fields are
/// lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceRow {
    /// App id.
    pub app_id: String,
    /// Instance id (empty when the app has none).
    pub instance_id: String,
    /// Its boots.
    #[serde(flatten)]
    pub record: BootRecord,
    /// Aggregated measurement of the latest boot.
    pub mr_aggregated: String,
    /// Compose hash of the latest boot.
    pub compose_hash: String,
    /// OS image hash of the latest boot.
    pub os_image_hash: String,
    /// Device id of the latest boot.
    pub device_id: String,
}

/// One entry of the KMS's ledger: an audit record, and the boot it records when keys are
/// being released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// The boot, for a key release; `None` for a refusal.
    pub boot: Option<BootObservation>,
    /// The audit record of the request.
    pub audit: AuditRecord,
}

impl Store {
    /// Writes a batch of ledger entries in one transaction: for each boot, bumps the instance's
    /// record and the served measurement set; for each entry, appends its audit record. Returns,
    /// per entry, the instance's record after its boot (boot_count 1 means a newly deployed
    /// CVM). All or nothing: on error no entry is written.
    pub async fn record_ledger(
        &self,
        entries: &[LedgerEntry],
    ) -> Result<Vec<Option<BootRecord>>, StoreError> {
        Ok(write_tx!(self, tx => {
            let mut records = Vec::with_capacity(entries.len());
            for entry in entries {
                let record = match &entry.boot {
                    None => None,
                    Some(b) => {
                        let row = sqlx::query(
                            "INSERT INTO boot_records (app_id, instance_id, first_boot, last_boot, boot_count, mr_aggregated, compose_hash, os_image_hash, device_id) \
                             VALUES ($1, $2, $3, $3, 1, $4, $5, $6, $7) \
                             ON CONFLICT (app_id, instance_id) DO UPDATE SET last_boot = excluded.last_boot, boot_count = boot_records.boot_count + 1, \
                             mr_aggregated = excluded.mr_aggregated, compose_hash = excluded.compose_hash, os_image_hash = excluded.os_image_hash, device_id = excluded.device_id \
                             RETURNING first_boot, last_boot, boot_count",
                        )
                        .bind(&b.app_id)
                        .bind(&b.instance_id)
                        .bind(b.at)
                        .bind(&b.mr_aggregated)
                        .bind(&b.compose_hash)
                        .bind(&b.os_image_hash)
                        .bind(&b.device_id)
                        .fetch_one(&mut *tx)
                        .await?;
                        sqlx::query(
                            "INSERT INTO served_measurements (app_id, instance_id, mr_aggregated, compose_hash, os_image_hash, device_id, first_served, last_served, times_served) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $7, 1) \
                             ON CONFLICT (app_id, instance_id, mr_aggregated, compose_hash, os_image_hash, device_id) \
                             DO UPDATE SET last_served = excluded.last_served, times_served = served_measurements.times_served + 1",
                        )
                        .bind(&b.app_id)
                        .bind(&b.instance_id)
                        .bind(&b.mr_aggregated)
                        .bind(&b.compose_hash)
                        .bind(&b.os_image_hash)
                        .bind(&b.device_id)
                        .bind(b.at)
                        .execute(&mut *tx)
                        .await?;
                        Some(BootRecord {
                            first_boot: row.try_get("first_boot")?,
                            last_boot: row.try_get("last_boot")?,
                            boot_count: row.try_get("boot_count")?,
                        })
                    }
                };
                let a = &entry.audit;
                sqlx::query(super::INSERT_AUDIT)
                    .bind(a.at)
                    .bind(&a.kind)
                    .bind(&a.outcome)
                    .bind(&a.detail)
                    .execute(&mut *tx)
                    .await?;
                records.push(record);
            }
            records
        }))
    }

    /// Instances that received keys with `value` (lowercase hex) in `column` since `since`
    /// (Unix seconds), of app `app` (lowercase hex) when given: what "in use" means when a
    /// governance proposal would remove a measurement.
    pub async fn served_instances(
        &self,
        column: ServedColumn,
        value: &str,
        app: Option<&str>,
        since: i64,
    ) -> Result<u64, StoreError> {
        let sql = format!(
            "SELECT COUNT(*) FROM (SELECT DISTINCT app_id, instance_id FROM served_measurements \
             WHERE last_served >= $1 AND {} = $2 AND ($3 = '' OR app_id = $3)) AS used",
            column.name()
        );
        let (n,): (i64,) = on_backend!(self, pool => {
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(since)
                .bind(value)
                .bind(app.unwrap_or(""))
                .fetch_one(pool)
                .await?
        });
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Instances whose latest boot is at or after `since` (Unix seconds; 0: all), oldest boot
    /// first.
    pub async fn instances_booted_since(&self, since: i64) -> Result<Vec<InstanceRow>, StoreError> {
        let rows = on_backend!(self, pool => {
            sqlx::query(
                "SELECT app_id, instance_id, first_boot, last_boot, boot_count, mr_aggregated, compose_hash, os_image_hash, device_id \
                 FROM boot_records WHERE last_boot >= $1 ORDER BY last_boot, app_id, instance_id",
            )
            .bind(since)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| {
                Ok(InstanceRow {
                    app_id: r.try_get("app_id")?,
                    instance_id: r.try_get("instance_id")?,
                    record: BootRecord {
                        first_boot: r.try_get("first_boot")?,
                        last_boot: r.try_get("last_boot")?,
                        boot_count: r.try_get("boot_count")?,
                    },
                    mr_aggregated: r.try_get("mr_aggregated")?,
                    compose_hash: r.try_get("compose_hash")?,
                    os_image_hash: r.try_get("os_image_hash")?,
                    device_id: r.try_get("device_id")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?
        });
        Ok(rows)
    }

    /// The newest audit records of `kind` with one of `outcomes` at or after `since` (Unix
    /// seconds), newest first, at most `limit`.
    pub async fn audit_of(
        &self,
        kind: &str,
        outcomes: &[&str],
        since: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let mut found = Vec::new();
        for outcome in outcomes {
            found.extend(self.audit_where(kind, outcome, since, limit).await?);
        }
        found.sort_by_key(|r| std::cmp::Reverse(r.at));
        found.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(found)
    }

    /// The record of one instance, if it ever received keys.
    pub async fn boot_record(
        &self,
        app_id: &str,
        instance_id: &str,
    ) -> Result<Option<BootRecord>, StoreError> {
        let row: Option<(i64, i64, i64)> = on_backend!(self, pool => {
            sqlx::query_as("SELECT first_boot, last_boot, boot_count FROM boot_records WHERE app_id = $1 AND instance_id = $2")
                .bind(app_id)
                .bind(instance_id)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(first_boot, last_boot, boot_count)| BootRecord {
            first_boot,
            last_boot,
            boot_count,
        }))
    }
}
