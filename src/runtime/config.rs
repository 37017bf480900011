//! The `[runtime]` section: process-level behaviour.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::problem::Problem;

/// Process-level behaviour.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// How long shutdown may take to drain in-flight work before the process gives up.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

impl RuntimeConfig {
    /// Problems of the section, each with its fix.
    pub fn problems(&self) -> Vec<Problem> {
        if self.shutdown_timeout.is_zero() || self.shutdown_timeout > Duration::from_secs(600) {
            return vec![Problem::new(
                "runtime.shutdown_timeout",
                format!(
                    "{} is outside 1ms..10m",
                    humantime::format_duration(self.shutdown_timeout)
                ),
                "use a duration such as \"10s\"",
            )];
        }
        Vec::new()
    }
}
