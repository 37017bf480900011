//! The fleet as `cvm list`, `cvm show` and `/admin/cvm` show it: each instance's boots and
//! measurements from the boot records, joined (pure) with the newest key refusal the audit log
//! holds for it; instances only ever refused are listed apart.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::{AuditRecord, InstanceRow, Store, StoreError};

/// Refusals looked at (the newest).
const REFUSALS_READ: i64 = 1000;

/// A key request refused at the key step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// App id (hex).
    pub app_id: String,
    /// Instance id (hex).
    pub instance_id: String,
    /// Unix seconds.
    pub at: i64,
    /// The typed reason (`dstack_kms_requests_total`'s label).
    pub reason: String,
    /// What the guest was told.
    pub message: String,
}

/// One instance that received keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instance {
    /// Its boots and the measurements of the latest one.
    #[serde(flatten)]
    pub row: InstanceRow,
    /// `deployed` (one boot) or `restarted`.
    pub state: &'static str,
    /// The newest refusal of a later key request, if any.
    pub last_refusal: Option<Refusal>,
}

/// The fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FleetReport {
    /// Instances that received keys, newest boot first.
    pub instances: Vec<Instance>,
    /// Instances refused at the key step that never received keys (newest refusal each).
    pub refused_only: Vec<Refusal>,
}

/// A refusal's record read back (`None` for one that names no boot: its attestation failed).
fn refusal(r: &AuditRecord) -> Option<Refusal> {
    let d: serde_json::Value = serde_json::from_str(&r.detail).ok()?;
    let text = |k: &str| d[k].as_str().map(str::to_owned);
    Some(Refusal {
        app_id: text("app_id")?,
        instance_id: text("instance_id")?,
        at: r.at,
        reason: text("reason").unwrap_or_else(|| r.outcome.clone()),
        message: text("message").unwrap_or_default(),
    })
}

/// Joins the boot records with the refusals (any order).
pub fn join(rows: Vec<InstanceRow>, refusals: &[AuditRecord]) -> FleetReport {
    let mut newest: BTreeMap<(String, String), Refusal> = BTreeMap::new();
    for r in refusals.iter().filter_map(refusal) {
        let key = (r.app_id.clone(), r.instance_id.clone());
        if newest.get(&key).is_none_or(|n| n.at < r.at) {
            newest.insert(key, r);
        }
    }
    let mut instances: Vec<Instance> = rows
        .into_iter()
        .map(|row| {
            let key = (row.app_id.clone(), row.instance_id.clone());
            // Only a refusal after the latest release says something about the instance now.
            let last_refusal = newest.remove(&key).filter(|r| r.at >= row.record.last_boot);
            Instance {
                state: if row.record.boot_count > 1 {
                    "restarted"
                } else {
                    "deployed"
                },
                row,
                last_refusal,
            }
        })
        .collect();
    instances.sort_by_key(|i| std::cmp::Reverse(i.row.record.last_boot));
    let mut refused_only: Vec<Refusal> = newest.into_values().collect();
    refused_only.sort_by_key(|r| std::cmp::Reverse(r.at));
    FleetReport {
        instances,
        refused_only,
    }
}

/// The fleet from `store`.
pub async fn fleet(store: &Store) -> Result<FleetReport, StoreError> {
    let rows = store.instances_booted_since(0).await?;
    let refusals = store
        .audit_of(
            "key_request",
            &["refused", "security_incident"],
            0,
            REFUSALS_READ,
        )
        .await?;
    Ok(join(rows, &refusals))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cvm::fleet::test_row as row;

    fn refused(instance: &str, at: i64, reason: &str) -> AuditRecord {
        AuditRecord {
            at,
            kind: "key_request".into(),
            outcome: "refused".into(),
            detail: serde_json::json!({"app_id": "aa", "instance_id": instance, "reason": reason, "message": "no"}).to_string(),
        }
    }

    #[test]
    fn refusals_join_their_instance_or_stand_alone() {
        let report = join(
            vec![row("one", 1, 100), row("two", 3, 200)],
            &[
                refused("two", 150, "compose_hash_not_allowed"),
                refused("two", 250, "compose_hash_not_allowed"),
                refused("one", 50, "os_image_rejected"),
                refused("stuck", 300, "app_not_allowed"),
                refused("stuck", 120, "app_not_allowed"),
                // An attestation failure names no boot.
                AuditRecord {
                    detail: r#"{"reason":"bad_quote"}"#.into(),
                    ..refused("x", 400, "")
                },
            ],
        );
        let states: Vec<(&str, &str)> = report
            .instances
            .iter()
            .map(|i| (i.row.instance_id.as_str(), i.state))
            .collect();
        assert_eq!(states, vec![("two", "restarted"), ("one", "deployed")]);
        assert_eq!(report.instances[0].last_refusal.as_ref().unwrap().at, 250);
        // Refused before its keys were released: not a refusal of the instance now.
        assert_eq!(report.instances[1].last_refusal, None);
        assert_eq!(report.refused_only.len(), 1);
        assert_eq!(report.refused_only[0].instance_id, "stuck");
        assert_eq!(report.refused_only[0].at, 300);
    }
}
