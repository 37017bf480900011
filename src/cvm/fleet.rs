//! The fleet as the KMS's own records show it (pure): every instance that received keys, and
//! what changed since the last look: a first boot is a deployment, each later boot a restart.

use std::collections::BTreeMap;

use crate::store::InstanceRow;

/// What happened to an instance between two looks at the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Its first boot: a CVM deployed (and restarted `restarts` more times since).
    Deployed {
        /// The instance as now recorded.
        row: InstanceRow,
        /// Later boots seen in the same look.
        restarts: u64,
    },
    /// Booted again `restarts` times.
    Restarted {
        /// The instance as now recorded.
        row: InstanceRow,
        /// Boots since the last look.
        restarts: u64,
    },
}

/// Every instance that received keys, by (app id, instance id).
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    instances: BTreeMap<(String, String), InstanceRow>,
}

impl Fleet {
    /// The fleet as recorded before this process looked: history, not news.
    pub fn load(rows: Vec<InstanceRow>) -> Self {
        let mut fleet = Self::default();
        for row in rows {
            fleet
                .instances
                .insert((row.app_id.clone(), row.instance_id.clone()), row);
        }
        fleet
    }

    /// Takes in `rows` (instances booted since the last look; rows seen before may come again)
    /// and says what changed.
    pub fn observe(&mut self, rows: Vec<InstanceRow>) -> Vec<Change> {
        let mut changes = Vec::new();
        for row in rows {
            let key = (row.app_id.clone(), row.instance_id.clone());
            let count = u64::try_from(row.record.boot_count).unwrap_or(0);
            let change = match self.instances.get(&key) {
                None => Some(Change::Deployed {
                    restarts: count.saturating_sub(1),
                    row: row.clone(),
                }),
                Some(known) => {
                    let before = u64::try_from(known.record.boot_count).unwrap_or(0);
                    (count > before).then(|| Change::Restarted {
                        restarts: count - before,
                        row: row.clone(),
                    })
                }
            };
            changes.extend(change);
            self.instances.insert(key, row);
        }
        changes
    }

    /// Every instance known.
    pub fn rows(&self) -> impl Iterator<Item = &InstanceRow> {
        self.instances.values()
    }

    /// Instances known.
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// Whether no instance is known.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// The latest boot among the instances (Unix seconds; 0 when none).
    pub fn latest_boot(&self) -> i64 {
        self.instances
            .values()
            .map(|r| r.record.last_boot)
            .max()
            .unwrap_or(0)
    }
}

/// An instance of app `aa` with `boots` boots, the latest at `last` (for the module's tests).
#[cfg(test)]
pub(super) fn test_row(instance: &str, boots: i64, last: i64) -> InstanceRow {
    InstanceRow {
        app_id: "aa".into(),
        instance_id: instance.into(),
        record: crate::store::BootRecord {
            first_boot: 10,
            last_boot: last,
            boot_count: boots,
        },
        mr_aggregated: String::new(),
        compose_hash: "cc".into(),
        os_image_hash: String::new(),
        device_id: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_row as row;

    #[test]
    fn history_is_loaded_silently_then_first_boots_deploy_and_later_boots_restart() {
        let mut fleet = Fleet::load(vec![row("old", 3, 150)]);
        assert_eq!(fleet.len(), 1);
        let changes = fleet.observe(vec![row("old", 3, 150), row("new", 1, 200)]);
        assert_eq!(
            changes,
            vec![Change::Deployed {
                row: row("new", 1, 200),
                restarts: 0
            }]
        );
        let changes = fleet.observe(vec![row("old", 5, 210), row("new", 1, 200)]);
        assert_eq!(
            changes,
            vec![Change::Restarted {
                row: row("old", 5, 210),
                restarts: 2
            }]
        );
        // Deployed and restarted between two looks.
        let changes = fleet.observe(vec![row("fast", 2, 220)]);
        assert_eq!(
            changes,
            vec![Change::Deployed {
                row: row("fast", 2, 220),
                restarts: 1
            }]
        );
        assert_eq!(fleet.latest_boot(), 220);
        assert_eq!(fleet.len(), 3);
    }
}
