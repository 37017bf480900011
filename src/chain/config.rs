//! The `[chain]` configuration section: which chain to mirror and how to follow it.
//!
//! Flow: part of the service configuration (file ← environment ← `serve --rpc-url/--kms-contract/
//! --start-block`); [`ChainConfig::problems`] joins the config validation; [`ChainConfig::resolve`]
//! turns it into typed values for the follower. An empty `rpc_urls` turns the mirror off.

use std::time::Duration;

use alloy::primitives::{Address, B256};
use serde::{Deserialize, Serialize};

use super::code::{CodeId, CodeKind, KnownCode};
use crate::problem::{Problem, http_url};

/// `[[chain.known_implementations]]`: code the operator vouches for, evaluated locally like our
/// own (for example dstack's released DstackKms/DstackApp implementations and their proxy).
/// `keywarden chain code-identity ADDRESS` prints an entry for deployed code.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KnownImplementation {
    /// A name shown in `chain state` and logs.
    pub name: String,
    /// `dstack_kms`, `dstack_app` or `proxy`: the semantics the code has.
    pub kind: CodeKind,
    /// keccak256 of the runtime code with the self-address immutables zeroed.
    pub code_hash: String,
    /// Byte offsets of those immutables (32-byte words), ascending.
    #[serde(default)]
    pub immutable_offsets: Vec<u32>,
}

/// Which block the follower treats as final enough to apply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Finality {
    /// The latest block minus `confirmations`.
    #[default]
    Latest,
    /// The node's `safe` block.
    Safe,
    /// The node's `finalized` block.
    Finalized,
}

/// `[chain]`: the DstackKms mirror.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChainConfig {
    /// JSON-RPC endpoints (HTTP), primary first; empty turns the mirror off.
    pub rpc_urls: Vec<String>,
    /// The DstackKms proxy address.
    pub kms_contract: Option<String>,
    /// Expected chain id; checked against `eth_chainId` at start-up when set.
    pub chain_id: Option<u64>,
    /// First block to sync (the KMS deployment block).
    pub start_block: u64,
    /// Blocks behind the latest block that are applied (`finality = "latest"` only).
    pub confirmations: u64,
    /// `latest` (with `confirmations`), `safe` or `finalized`.
    pub finality: Finality,
    /// How often the head is polled once caught up.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Largest `eth_getLogs` block range (the range shrinks on "too many results" and grows back).
    pub max_batch_blocks: u64,
    /// Recent blocks whose hashes are kept to find the common ancestor after a reorg; a deeper
    /// reorg triggers a full resync.
    pub reorg_window: u64,
    /// Authorization fails closed (`chain_state_stale`) when the follower has not seen the head and
    /// caught up for this long.
    #[serde(with = "humantime_serde")]
    pub max_staleness: Duration,
    /// Per-request timeout for each endpoint.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest JSON-RPC response body read; a larger `eth_getLogs` answer shrinks the block range,
    /// any other makes the endpoint faulty. A batch's logs are held within the same budget.
    pub max_response_bytes: usize,
    /// Code evaluated locally besides our own compiled contracts; everything else is asked of the
    /// chain with `eth_call`.
    pub known_implementations: Vec<KnownImplementation>,
}

impl Default for ChainConfig {
    fn default() -> Self {
        Self {
            rpc_urls: Vec::new(),
            kms_contract: None,
            chain_id: None,
            start_block: 0,
            confirmations: 2,
            finality: Finality::Latest,
            poll_interval: Duration::from_secs(1),
            max_batch_blocks: 2000,
            reorg_window: 64,
            max_staleness: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            max_response_bytes: 32 * 1024 * 1024,
            known_implementations: Vec::new(),
        }
    }
}

/// Smallest `chain.max_response_bytes`: a block with its header fields must fit.
const MIN_RESPONSE_BYTES: usize = 64 * 1024;

/// The `[chain]` section, checked and typed.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedChain {
    /// Endpoints, primary first.
    pub urls: Vec<url::Url>,
    /// DstackKms proxy.
    pub kms: Address,
    /// Our own contracts' code plus `known_implementations`.
    pub known: KnownCode,
    /// The rest as configured.
    pub cfg: ChainConfig,
}

impl ChainConfig {
    /// Whether the mirror runs.
    pub fn enabled(&self) -> bool {
        !self.rpc_urls.is_empty()
    }

    /// Problems of what a command that only reads from the chain needs (`chain code-identity`):
    /// the endpoint URLs and the known implementations.
    pub fn endpoint_problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut push = |key: &str, problem: String, fix: &str| {
            out.push(Problem {
                key: format!("chain.{key}"),
                problem,
                fix: fix.into(),
            })
        };
        for (i, raw) in self.rpc_urls.iter().enumerate() {
            if let Some(p) = http_url(
                "chain.rpc_urls",
                &format!("entry {i} is"),
                raw,
                "use http://HOST:PORT or https://HOST/PATH",
            ) {
                push("rpc_urls", p.problem, &p.fix);
            }
        }
        for (i, k) in self.known_implementations.iter().enumerate() {
            if k.name.trim().is_empty() {
                push(
                    "known_implementations",
                    format!("entry {i} has an empty name"),
                    "name the code, e.g. \"dstack DstackApp v0.5.3\"",
                );
            }
            if k.code_hash.parse::<B256>().is_err() {
                push(
                    "known_implementations",
                    format!("entry {i} ({}): code_hash is not 32 bytes of hex", k.name),
                    "use the code_hash printed by `keywarden chain code-identity ADDRESS`",
                );
            }
            if !k.immutable_offsets.is_sorted_by(|a, b| a < b) {
                push(
                    "known_implementations",
                    format!(
                        "entry {i} ({}): immutable_offsets are not strictly ascending",
                        k.name
                    ),
                    "use the offsets printed by `keywarden chain code-identity ADDRESS`",
                );
            }
        }
        out
    }

    /// Every problem of the section, each with its fix.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = self.endpoint_problems();
        let mut push = |key: &str, problem: String, fix: &str| {
            out.push(Problem {
                key: format!("chain.{key}"),
                problem,
                fix: fix.into(),
            })
        };
        if self.enabled() {
            match self.kms_contract.as_deref().map(str::parse::<Address>) {
                None => push(
                    "kms_contract",
                    "is not set but chain.rpc_urls is".into(),
                    "set it to the DstackKms proxy address (0x followed by 40 hex digits), or --kms-contract",
                ),
                Some(Err(e)) => push(
                    "kms_contract",
                    format!("is not an address: {e}"),
                    "use 0x followed by 40 hex digits",
                ),
                Some(Ok(_)) => {}
            }
        }
        let positive = [
            ("poll_interval", self.poll_interval),
            ("max_staleness", self.max_staleness),
            ("request_timeout", self.request_timeout),
        ];
        for (key, d) in positive {
            if d.is_zero() {
                push(
                    key,
                    "must be positive".into(),
                    "use a duration such as \"1s\"",
                );
            }
        }
        if self.max_batch_blocks == 0 {
            push(
                "max_batch_blocks",
                "must be at least 1".into(),
                "use 2000 (the default) or what your provider allows",
            );
        }
        if self.max_response_bytes < MIN_RESPONSE_BYTES {
            push(
                "max_response_bytes",
                format!("must be at least {MIN_RESPONSE_BYTES}"),
                "use 33554432 (32 MiB, the default) or more for providers with large log pages",
            );
        }
        if self.reorg_window == 0 {
            push(
                "reorg_window",
                "must be at least 1".into(),
                "use 64 (the default)",
            );
        }
        out
    }

    /// Our own contracts' code plus the valid `known_implementations` entries.
    pub fn known_code(&self) -> KnownCode {
        let mut known = KnownCode::builtin();
        for k in &self.known_implementations {
            if let Ok(hash) = k.code_hash.parse() {
                known.add(
                    k.name.clone(),
                    k.kind,
                    CodeId {
                        hash,
                        immutables: k.immutable_offsets.clone(),
                    },
                );
            }
        }
        known
    }

    /// The section as typed values; `None` when the mirror is off. Call after validation.
    pub fn resolve(&self) -> Option<ResolvedChain> {
        if !self.enabled() {
            return None;
        }
        let urls = self
            .rpc_urls
            .iter()
            .map(|u| url::Url::parse(u).ok())
            .collect::<Option<Vec<_>>>()?;
        let kms = self.kms_contract.as_deref()?.parse().ok()?;
        Some(ResolvedChain {
            urls,
            kms,
            known: self.known_code(),
            cfg: self.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_url_and_address_are_reported_with_fixes() {
        let c = ChainConfig {
            rpc_urls: vec!["not a url".into(), "ws://x".into()],
            kms_contract: Some("0x123".into()),
            ..ChainConfig::default()
        };
        let p = c.problems();
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p.iter().all(|p| !p.fix.is_empty()));
        assert!(c.resolve().is_none());
    }

    #[test]
    fn known_implementations_are_checked_and_added() {
        let good = KnownImplementation {
            name: "dstack DstackApp".into(),
            kind: CodeKind::DstackApp,
            code_hash: format!("{}", B256::repeat_byte(7)),
            immutable_offsets: vec![10, 80],
        };
        let c = ChainConfig {
            known_implementations: vec![
                good.clone(),
                KnownImplementation {
                    name: " ".into(),
                    code_hash: "0x12".into(),
                    immutable_offsets: vec![5, 5],
                    ..good.clone()
                },
            ],
            ..ChainConfig::default()
        };
        let p = c.problems();
        assert_eq!(p.len(), 3, "{p:?}");
        let known = c.known_code();
        let id = CodeId {
            hash: B256::repeat_byte(7),
            immutables: vec![10, 80],
        };
        assert_eq!(
            known.classify(&id).map(|k| k.kind),
            Some(CodeKind::DstackApp)
        );
        let parsed: ChainConfig = toml::from_str(
            "[[known_implementations]]\nname = \"x\"\nkind = \"proxy\"\ncode_hash = \"0x0707070707070707070707070707070707070707070707070707070707070707\"\n",
        )
        .expect("parses");
        assert_eq!(parsed.known_implementations[0].kind, CodeKind::Proxy);
        assert!(parsed.problems().is_empty());
    }

    #[test]
    fn off_by_default_and_resolves_when_complete() {
        assert!(ChainConfig::default().problems().is_empty());
        assert!(ChainConfig::default().resolve().is_none());
        let c = ChainConfig {
            rpc_urls: vec!["http://127.0.0.1:8545".into()],
            kms_contract: Some("0x00000000000000000000000000000000000000aa".into()),
            ..ChainConfig::default()
        };
        assert!(c.problems().is_empty());
        assert!(c.resolve().is_some());
    }
}
