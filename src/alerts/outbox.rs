//! The alert tables of the store, and the [`Outbox`] producers record transitions into.
//!
//! Flow: [`Outbox::record`] inserts the transition into `alert_transitions`; only when that row
//! is new does it queue one `alert_deliveries` row per channel and update `alert_firing` (what
//! Alertmanager keeps seeing), all in one transaction. The delivery task reads due rows
//! ([`Store::alerts_due`]), claims each for its leadership term ([`Store::alert_claim`]), sends
//! it, and marks it delivered or due again later; each write carries the term's epoch. A claim
//! of a term that ended (a leader that died mid-send) is taken over by the next term: that one
//! delivery may then arrive twice (same stable alert id), none is lost.

use sqlx::Row;

use super::channel::Channel;
use super::{Alert, AlertsError};
use crate::store::{Backend, Store, StoreError, on_backend, write_tx};

/// Where producers record alert transitions.
#[derive(Clone, Debug)]
pub struct Outbox {
    store: Store,
    channels: Vec<&'static str>,
}

/// One delivery to make.
#[derive(Debug, Clone)]
pub struct Due {
    /// The alert.
    pub alert: Alert,
    /// Channel label.
    pub channel: String,
    /// Attempts so far.
    pub attempts: i64,
    /// When the subject started firing (Unix seconds).
    pub starts_at: i64,
}

/// One alert Alertmanager must keep seeing.
#[derive(Debug, Clone)]
pub struct Firing {
    /// The alert (its latest transition).
    pub alert: Alert,
    /// Since when.
    pub starts_at: i64,
    /// Resolved at.
    pub ends_at: Option<i64>,
}

fn decode_alert(text: &str) -> Result<Alert, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Query(sqlx::Error::Decode(format!("stored alert: {e}").into())))
}

impl Outbox {
    /// An outbox queueing deliveries to `channels`.
    pub fn new(store: Store, channels: &[Channel]) -> Self {
        Self {
            store,
            channels: channels.iter().map(Channel::label).collect(),
        }
    }

    /// Records `alert`'s transition. When it was not recorded before and `deliver` holds, one
    /// delivery per channel is queued with it, in the same transaction. Returns whether the
    /// transition was new.
    pub async fn record(&self, alert: &Alert, deliver: bool) -> Result<bool, AlertsError> {
        let json = serde_json::to_string(alert).map_err(|e| AlertsError::Stored(e.to_string()))?;
        let channels: &[&str] = if deliver { &self.channels } else { &[] };
        Ok(self
            .store
            .alert_record(alert, &json, channels, crate::clock::unix_secs_i64())
            .await?)
    }

    /// Every recorded (subject, transition) whose subject starts with `prefix`.
    pub async fn transitions(&self, prefix: &str) -> Result<Vec<(String, String)>, AlertsError> {
        Ok(self.store.alert_transitions(prefix).await?)
    }
}

impl Store {
    /// Records `alert`'s transition (serialized as `json`); when new, queues a delivery to each
    /// of `channels` (and, for Alertmanager, updates what it keeps seeing), in one transaction.
    pub async fn alert_record(
        &self,
        alert: &Alert,
        json: &str,
        channels: &[&str],
        now: i64,
    ) -> Result<bool, StoreError> {
        Ok(write_tx!(self, tx => {
            let (seq,): (i64,) =
                sqlx::query_as("SELECT COALESCE(MAX(seq), 0) + 1 FROM alert_transitions")
                    .fetch_one(&mut *tx)
                    .await?;
            let inserted = sqlx::query(
                "INSERT INTO alert_transitions (alert_key, transition, recorded_at, seq) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (alert_key, transition) DO NOTHING",
            )
            .bind(&alert.key)
            .bind(&alert.transition)
            .bind(now)
            .bind(seq)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if inserted {
                for channel in channels {
                    sqlx::query(
                        "INSERT INTO alert_deliveries (alert_key, transition, channel, seq, alert, created_at, attempts, next_attempt_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, 0, $6)",
                    )
                    .bind(&alert.key)
                    .bind(&alert.transition)
                    .bind(*channel)
                    .bind(seq)
                    .bind(json)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                if channels.contains(&"alertmanager") {
                    sqlx::query(
                        "INSERT INTO alert_firing (alert_key, alert, starts_at, ends_at) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (alert_key) DO UPDATE SET alert = excluded.alert, ends_at = excluded.ends_at",
                    )
                    .bind(&alert.key)
                    .bind(json)
                    .bind(now)
                    .bind(alert.resolved.then_some(now))
                    .execute(&mut *tx)
                    .await?;
                }
            }
            inserted
        }))
    }

    /// Every recorded (subject, transition) whose subject starts with `prefix`.
    pub async fn alert_transitions(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let pattern = format!("{}%", prefix.replace('%', "\\%").replace('_', "\\_"));
        Ok(on_backend!(self, pool => {
            sqlx::query(
                "SELECT alert_key, transition FROM alert_transitions WHERE alert_key LIKE $1 ESCAPE '\\' ORDER BY alert_key",
            )
            .bind(pattern)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("alert_key")?, r.try_get("transition")?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()?
        }))
    }

    /// Deliveries due at `now` (oldest first, at most `limit`).
    pub async fn alerts_due(&self, now: i64, limit: i64) -> Result<Vec<Due>, StoreError> {
        let rows = on_backend!(self, pool => {
            sqlx::query(
                "SELECT d.alert, d.channel, d.attempts, COALESCE(f.starts_at, d.created_at) AS starts_at \
                 FROM alert_deliveries d LEFT JOIN alert_firing f ON f.alert_key = d.alert_key \
                 WHERE d.delivered_at IS NULL AND d.next_attempt_at <= $1 \
                 ORDER BY d.seq, d.channel LIMIT $2",
            )
            .bind(now)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>("alert")?,
                    r.try_get::<String, _>("channel")?,
                    r.try_get::<i64, _>("attempts")?,
                    r.try_get::<i64, _>("starts_at")?,
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?
        });
        rows.into_iter()
            .map(|(alert, channel, attempts, starts_at)| {
                Ok(Due {
                    alert: decode_alert(&alert)?,
                    channel,
                    attempts,
                    starts_at,
                })
            })
            .collect()
    }

    /// Claims a due delivery for the leadership term `term` (holding `epoch` in a cluster):
    /// `false` when it was delivered meanwhile or this term already holds it. A claim of another
    /// (ended) term is taken over.
    pub async fn alert_claim(
        &self,
        d: &Due,
        term: &str,
        now: i64,
        epoch: Option<i64>,
    ) -> Result<bool, StoreError> {
        Ok(write_tx!(self, tx => {
            crate::store::fence!(tx, epoch);
            sqlx::query(
                "UPDATE alert_deliveries SET claimed_by = $1, claimed_at = $2 \
                 WHERE alert_key = $3 AND transition = $4 AND channel = $5 AND delivered_at IS NULL \
                 AND (claimed_by IS NULL OR claimed_by <> $1)",
            )
            .bind(term)
            .bind(now)
            .bind(&d.alert.key)
            .bind(&d.alert.transition)
            .bind(&d.channel)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1
        }))
    }

    /// Marks a delivery done (once: a second call changes nothing) and releases its claim.
    pub async fn alert_delivered(
        &self,
        d: &Due,
        now: i64,
        epoch: Option<i64>,
    ) -> Result<(), StoreError> {
        write_tx!(self, tx => {
            crate::store::fence!(tx, epoch);
            sqlx::query(
                "UPDATE alert_deliveries SET delivered_at = $1, attempts = attempts + 1, last_error = NULL, \
                 claimed_by = NULL, claimed_at = NULL \
                 WHERE alert_key = $2 AND transition = $3 AND channel = $4 AND delivered_at IS NULL",
            )
            .bind(now)
            .bind(&d.alert.key)
            .bind(&d.alert.transition)
            .bind(&d.channel)
            .execute(&mut *tx)
            .await?;
        });
        Ok(())
    }

    /// Records a failed attempt and releases the claim; the delivery is due again at `next`.
    pub async fn alert_failed(
        &self,
        d: &Due,
        next: i64,
        error: &str,
        epoch: Option<i64>,
    ) -> Result<(), StoreError> {
        write_tx!(self, tx => {
            crate::store::fence!(tx, epoch);
            sqlx::query(
                "UPDATE alert_deliveries SET attempts = attempts + 1, next_attempt_at = $1, last_error = $2, \
                 claimed_by = NULL, claimed_at = NULL \
                 WHERE alert_key = $3 AND transition = $4 AND channel = $5 AND delivered_at IS NULL",
            )
            .bind(next)
            .bind(error)
            .bind(&d.alert.key)
            .bind(&d.alert.transition)
            .bind(&d.channel)
            .execute(&mut *tx)
            .await?;
        });
        Ok(())
    }

    /// Alerts firing, or resolved since `resolved_since` (Alertmanager must see the end too).
    pub async fn alerts_firing(&self, resolved_since: i64) -> Result<Vec<Firing>, StoreError> {
        let rows = on_backend!(self, pool => {
            sqlx::query(
                "SELECT alert, starts_at, ends_at FROM alert_firing \
                 WHERE ends_at IS NULL OR ends_at >= $1 ORDER BY alert_key",
            )
            .bind(resolved_since)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>("alert")?,
                    r.try_get::<i64, _>("starts_at")?,
                    r.try_get::<Option<i64>, _>("ends_at")?,
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?
        });
        rows.into_iter()
            .map(|(alert, starts_at, ends_at)| {
                Ok(Firing {
                    alert: decode_alert(&alert)?,
                    starts_at,
                    ends_at,
                })
            })
            .collect()
    }

    /// Undelivered rows per channel.
    pub async fn alerts_pending(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(on_backend!(self, pool => {
            sqlx::query(
                "SELECT channel, COUNT(*) AS n FROM alert_deliveries WHERE delivered_at IS NULL GROUP BY channel",
            )
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("channel")?, r.try_get("n")?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()?
        }))
    }
}
