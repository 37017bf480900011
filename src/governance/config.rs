//! `[governance]`: Safes watched besides those discovered from the contracts' owners, and how far
//! back "in use" looks.

use std::time::Duration;

use alloy::primitives::Address;
use serde::{Deserialize, Serialize};

use crate::problem::{Problem, http_url, positive};
use crate::secret::SecretRef;

/// One `[[governance.safes]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SafeEntry {
    /// The Safe's address.
    pub address: String,
    /// Its Transaction Service, when not `governance.transaction_service`.
    #[serde(default)]
    pub transaction_service: Option<String>,
    /// That service's API key (`env:VAR` or `file:PATH`).
    #[serde(default)]
    pub api_key: Option<SecretRef>,
}

/// `[governance]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GovernanceConfig {
    /// Safes watched besides those found by following `owner()` / `pendingOwner()` and the
    /// timelocks' roles.
    pub safes: Vec<SafeEntry>,
    /// A measurement is in use when an instance received keys with it this recently.
    #[serde(with = "humantime_serde")]
    pub in_use_window: Duration,
    /// The Safe Transaction Service of every Safe watched (base URL: requests go to
    /// `{url}/api/...`); none: the pending queue is not watched.
    pub transaction_service: Option<String>,
    /// Its API key (`env:VAR` or `file:PATH`), sent as a Bearer token.
    pub transaction_service_api_key: Option<SecretRef>,
    /// Requests per second to one service, shared by all Safes on it.
    pub transaction_service_rate: f64,
    /// How often the pending queues are read.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Addresses allowed to propose besides the owners.
    pub delegates: Vec<String>,
}

impl Default for GovernanceConfig {
    fn default() -> Self {
        Self {
            safes: Vec::new(),
            in_use_window: Duration::from_secs(7 * 24 * 3600),
            transaction_service: None,
            transaction_service_api_key: None,
            transaction_service_rate: 5.0,
            poll_interval: Duration::from_secs(30),
            delegates: Vec::new(),
        }
    }
}

impl GovernanceConfig {
    /// Everything wrong with the section.
    pub fn problems(&self) -> Vec<Problem> {
        let address = |key: String, raw: &str| {
            raw.parse::<Address>().err().map(|_| {
                Problem::new(
                    key,
                    format!("{raw:?} is not an address"),
                    "give a 0x-prefixed 20-byte address",
                )
            })
        };
        let url = |key: &str, raw: &Option<String>| {
            http_url(
                key,
                "is",
                raw.as_deref()?,
                "use http(s)://HOST[:PORT][/PATH]",
            )
        };
        let secret = |key: &str, s: &Option<SecretRef>| {
            s.as_ref()?.resolve().err().map(|e| {
                Problem::new(
                    key,
                    e.to_string(),
                    "point it at a set environment variable or a readable file",
                )
            })
        };
        let mut out = Vec::new();
        for (i, s) in self.safes.iter().enumerate() {
            out.extend(address(
                format!("governance.safes[{i}].address"),
                &s.address,
            ));
            out.extend(url(
                &format!("governance.safes[{i}].transaction_service"),
                &s.transaction_service,
            ));
            out.extend(secret(
                &format!("governance.safes[{i}].api_key"),
                &s.api_key,
            ));
        }
        for (i, d) in self.delegates.iter().enumerate() {
            out.extend(address(format!("governance.delegates[{i}]"), d));
        }
        out.extend(url(
            "governance.transaction_service",
            &self.transaction_service,
        ));
        out.extend(secret(
            "governance.transaction_service_api_key",
            &self.transaction_service_api_key,
        ));
        if !(self.transaction_service_rate > 0.0 && self.transaction_service_rate.is_finite()) {
            out.push(Problem::new(
                "governance.transaction_service_rate",
                "must be a positive number of requests per second",
                "use 5 (the hosted service's default limit)",
            ));
        }
        out.extend(positive(
            "governance.in_use_window",
            self.in_use_window,
            "7d",
        ));
        out.extend(positive(
            "governance.poll_interval",
            self.poll_interval,
            "30s",
        ));
        out
    }

    /// The configured delegates (valid entries).
    pub fn delegate_addresses(&self) -> Vec<Address> {
        self.delegates
            .iter()
            .filter_map(|d| d.parse().ok())
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
                    transaction_service: None,
                    api_key: None,
                },
                SafeEntry {
                    address: "nope".into(),
                    transaction_service: Some("ftp://x".into()),
                    api_key: None,
                },
            ],
            ..GovernanceConfig::default()
        };
        let p = cfg.problems();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].key, "governance.safes[1].address");
        assert_eq!(p[1].key, "governance.safes[1].transaction_service");
        assert_eq!(cfg.safe_addresses().len(), 1);
    }
}
