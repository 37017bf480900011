//! "In use", from the KMS's own records: how many instances received keys with a measurement
//! within the window (`served_measurements`).

use std::collections::HashMap;
use std::time::Duration;

use alloy::primitives::B256;

use super::classify::{Counted, Measurement};
use crate::store::{ServedColumn, Store, StoreError};

/// Counts, for each of `removed`, the instances that received keys with it within `window`.
pub async fn counted(
    store: &Store,
    window: Duration,
    removed: &[Measurement],
) -> Result<Counted, StoreError> {
    let since = crate::clock::unix_secs_i64()
        .saturating_sub(i64::try_from(window.as_secs()).unwrap_or(i64::MAX));
    let hex = |b: &B256| hex::encode(b);
    let mut counts = HashMap::new();
    for m in removed {
        let (column, value, app) = match m {
            Measurement::KmsAggregatedMr { mr } => (ServedColumn::MrAggregated, hex(mr), None),
            Measurement::KmsDevice { device } => (ServedColumn::DeviceId, hex(device), None),
            Measurement::OsImage { image } => (ServedColumn::OsImageHash, hex(image), None),
            Measurement::ComposeHash { app, hash } => {
                (ServedColumn::ComposeHash, hex(hash), Some(hex::encode(app)))
            }
            Measurement::Device { app, device } => {
                (ServedColumn::DeviceId, hex(device), Some(hex::encode(app)))
            }
        };
        let n = store
            .served_instances(column, &value, app.as_deref(), since)
            .await?;
        counts.insert(*m, n);
    }
    Ok(Counted(counts))
}

/// A window in words ("7days").
pub fn window_words(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}
