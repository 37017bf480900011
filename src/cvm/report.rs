//! The fleet as `cvm list`, `cvm show` and `/admin/cvm` show it: each instance's boots and
//! measurements from the boot records, joined (pure) with the newest key refusal the audit log
//! holds for it; instances only ever refused are listed apart.

use std::collections::BTreeMap;

use serde::Serialize;

use super::vmm::VmView;
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

/// A VM that has not finished booting within the boot timeout: stuck, most likely at its key
/// request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stuck {
    /// The VM.
    pub vm: VmView,
    /// The KMS's newest refusal of its instance, when it refused it.
    pub refusal: Option<Refusal>,
}

/// The polled VMs joined with the KMS's records by instance id.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Joined {
    /// VMs running but not booted within the boot timeout.
    pub stuck: Vec<Stuck>,
    /// Instances that received keys since the window began and run on no polled VMM: a warning,
    /// they may run on a rogue or unlisted host. `None` while that cannot be told (no VMM
    /// configured, or one not answering).
    pub unmonitored: Option<Vec<InstanceRow>>,
}

/// The VMs running for longer than `boot_timeout` whose boot is not `done`.
pub fn stuck(vms: &[VmView], boot_timeout: std::time::Duration) -> Vec<&VmView> {
    vms.iter()
        .filter(|v| {
            v.status == "running"
                && v.boot_progress.as_deref() != Some("done")
                && v.uptime_seconds
                    .is_some_and(|u| u >= boot_timeout.as_secs())
        })
        .collect()
}

/// The instances among `rows` booted at or after `since` that no VM in `vms` runs.
pub fn unmonitored<'a>(
    rows: impl IntoIterator<Item = &'a InstanceRow>,
    vms: &[VmView],
    since: i64,
) -> Vec<&'a InstanceRow> {
    let watched: std::collections::BTreeSet<String> = vms
        .iter()
        .filter_map(|v| v.instance_id.as_deref())
        .map(|i| i.trim_start_matches("0x").to_ascii_lowercase())
        .collect();
    rows.into_iter()
        .filter(|r| r.record.last_boot >= since && !watched.contains(&r.instance_id))
        .collect()
}

/// Joins `vms` (from VMMs that all answered when `complete`) with `report`.
pub fn join_vms(
    report: &FleetReport,
    vms: &[VmView],
    complete: bool,
    boot_timeout: std::time::Duration,
    since: i64,
) -> Joined {
    let refusal_of = |instance: &str| {
        report
            .instances
            .iter()
            .filter(|i| i.row.instance_id == instance)
            .find_map(|i| i.last_refusal.clone())
            .or_else(|| {
                report
                    .refused_only
                    .iter()
                    .find(|r| r.instance_id == instance)
                    .cloned()
            })
    };
    Joined {
        stuck: stuck(vms, boot_timeout)
            .into_iter()
            .map(|vm| Stuck {
                refusal: vm
                    .instance_id
                    .as_deref()
                    .and_then(|i| refusal_of(&i.trim_start_matches("0x").to_ascii_lowercase())),
                vm: vm.clone(),
            })
            .collect(),
        unmonitored: complete.then(|| {
            unmonitored(report.instances.iter().map(|i| &i.row), vms, since)
                .into_iter()
                .cloned()
                .collect()
        }),
    }
}

/// The fleet as `/admin/cvm` and `cvm list --json` give it: the KMS's records, every polled
/// VM, and the two joined.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Overview {
    /// The KMS's records.
    pub records: FleetReport,
    /// Every VM of the VMMs that answered.
    pub vms: Vec<VmView>,
    /// Stuck VMs and unmonitored instances.
    pub joined: Joined,
}

/// Joins `records` with `vms` (from VMMs that all answered when `complete`) as `cfg` sets the
/// boot timeout and the unmonitored window, at `now` (Unix seconds).
pub fn overview(
    records: FleetReport,
    vms: Vec<VmView>,
    complete: bool,
    cfg: &super::config::CvmConfig,
    now: i64,
) -> Overview {
    let since =
        now.saturating_sub(i64::try_from(cfg.unmonitored_window.as_secs()).unwrap_or(i64::MAX));
    let joined = join_vms(&records, &vms, complete, cfg.boot_timeout, since);
    Overview {
        records,
        vms,
        joined,
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

    fn vm(name: &str, instance: &str, progress: &str, uptime: u64) -> VmView {
        VmView {
            vmm: "unix:/vmm.sock".into(),
            app: None,
            id: name.into(),
            name: name.into(),
            app_id: "aa".into(),
            instance_id: Some(instance.into()),
            status: "running",
            uptime_seconds: Some(uptime),
            boot_seconds: None,
            boot_progress: Some(progress.into()),
            last_seen: None,
            boot_error: None,
            restarts: 0,
            container_restarts: 0,
            memory_ratio: None,
            containers: Vec::new(),
        }
    }

    #[test]
    fn vms_join_the_records_stuck_with_their_refusal_and_unlisted_instances_are_named() {
        let report = join(
            vec![row("one", 1, 100), row("two", 1, 200), row("old", 1, 5)],
            &[refused("stuck", 300, "app_not_allowed")],
        );
        let vms = vec![
            vm("a", "one", "done", 9000),
            vm("b", "stuck", "requesting app keys", 600),
            vm("c", "slow", "requesting app keys", 60),
        ];
        let timeout = std::time::Duration::from_secs(300);
        let j = join_vms(&report, &vms, true, timeout, 50);
        assert_eq!(j.stuck.len(), 1);
        assert_eq!(j.stuck[0].vm.name, "b");
        assert_eq!(
            j.stuck[0].refusal.as_ref().unwrap().reason,
            "app_not_allowed"
        );
        // "two" booted recently on no polled VMM; "old" booted before the window.
        let unlisted: Vec<&str> = j
            .unmonitored
            .as_ref()
            .unwrap()
            .iter()
            .map(|r| r.instance_id.as_str())
            .collect();
        assert_eq!(unlisted, vec!["two"]);
        // A VMM not answering: nothing can be said about unlisted instances.
        assert_eq!(
            join_vms(&report, &vms, false, timeout, 50).unmonitored,
            None
        );
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
