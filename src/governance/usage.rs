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

/// A window in words, in its largest whole unit ("7 days", "36 hours", "1 minute").
pub fn window_words(d: Duration) -> String {
    let secs = d.as_secs();
    let (n, unit) = [(86_400, "day"), (3_600, "hour"), (60, "minute")]
        .into_iter()
        .find(|(size, _)| secs >= *size && secs.is_multiple_of(*size))
        .map_or((secs, "second"), |(size, unit)| (secs / size, unit));
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_reads_in_its_largest_whole_unit() {
        let w = |s| window_words(Duration::from_secs(s));
        assert_eq!(w(7 * 86_400), "7 days");
        assert_eq!(w(86_400), "1 day");
        assert_eq!(w(36 * 3_600), "36 hours");
        assert_eq!(w(90 * 60), "90 minutes");
        assert_eq!(w(61), "61 seconds");
        assert_eq!(w(0), "0 seconds");
    }
}
