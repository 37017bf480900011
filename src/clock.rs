//! Wall-clock time as keywarden records it: whole seconds since the Unix epoch.
//!
//! One helper, so that every timestamp (store rows, key timestamps, certificate validity,
//! collateral windows) reads the same clock the same way; a clock before 1970 reads as 0.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// [`unix_secs`] as the signed seconds the store's columns hold.
pub fn unix_secs_i64() -> i64 {
    i64::try_from(unix_secs()).unwrap_or(i64::MAX)
}
