//! `[governance]`: Safes watched besides those discovered from the contracts' owners, and how far
//! back "in use" looks.

use std::time::Duration;

use alloy::primitives::Address;
use serde::{Deserialize, Serialize};

use crate::problem::{Problem, positive};

/// One `[[governance.safes]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SafeEntry {
    /// The Safe's address.
    pub address: String,
}

/// `[governance]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct GovernanceConfig {
    /// Safes watched besides those found by following `owner()` / `pendingOwner()` and the
    /// timelocks' roles.
    pub safes: Vec<SafeEntry>,
    /// A measurement is in use when an instance received keys with it this recently.
    #[serde(with = "humantime_serde")]
    pub in_use_window: Duration,
}

impl Default for GovernanceConfig {
    fn default() -> Self {
        Self {
            safes: Vec::new(),
            in_use_window: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl GovernanceConfig {
    /// Everything wrong with the section.
    pub fn problems(&self) -> Vec<Problem> {
        self.safes
            .iter()
            .enumerate()
            .filter(|(_, s)| s.address.parse::<Address>().is_err())
            .map(|(i, s)| {
                Problem::new(
                    format!("governance.safes[{i}].address"),
                    format!("{:?} is not an address", s.address),
                    "give the Safe's 0x-prefixed 20-byte address",
                )
            })
            .chain(positive(
                "governance.in_use_window",
                self.in_use_window,
                "7d",
            ))
            .collect()
    }

    /// The configured Safes (valid entries; [`Self::problems`] names the others).
    pub fn safe_addresses(&self) -> Vec<Address> {
        let mut out: Vec<Address> = self
            .safes
            .iter()
            .filter_map(|s| s.address.parse().ok())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_safe_address_is_named() {
        let cfg = GovernanceConfig {
            safes: vec![
                SafeEntry {
                    address: "0x5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a".into(),
                },
                SafeEntry {
                    address: "nope".into(),
                },
            ],
            ..GovernanceConfig::default()
        };
        let p = cfg.problems();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key, "governance.safes[1].address");
        assert_eq!(cfg.safe_addresses().len(), 1);
    }
}
