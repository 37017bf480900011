//! Live authorization: `isKmsAllowed` / `isAppAllowed` asked of the chain, for contracts whose
//! answering code the mirror does not know.
//!
//! Flow: [`super::Mirror`] finds that the code answering for the KMS contract or an app is not in
//! the known set and calls [`LiveAuthz::ask`] with the boot's `AppBootInfo` and the block the
//! published snapshot reflects → a cached answer for (check, boot info) at that block, or one
//! `eth_call` of the KMS contract at that block through the RPC pool (per-request timeout,
//! failover) → the contract's `(allowed, reason)`. The cache holds answers of one block only and is
//! emptied when a newer block is asked for. No answer is an error the caller turns into a refusal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use alloy::primitives::Address;
use alloy::sol_types::SolCall;

use super::ChainError;
use super::authz::{AuthQuery, Decision};
use super::contracts::DstackKms;
use super::metrics::{ChainMetrics, Check, LiveOutcome};
use super::rpc::RpcPool;

/// Answers kept per block before the cache is emptied (bounds memory on a quiet chain).
const CACHE_CAPACITY: usize = 4096;

#[derive(Default)]
struct Cache {
    block: u64,
    answers: HashMap<(Check, AuthQuery), Decision>,
}

/// Asks the KMS contract on the chain.
pub struct LiveAuthz {
    rpc: Arc<RpcPool>,
    kms: Address,
    cache: Mutex<Cache>,
    metrics: ChainMetrics,
}

impl std::fmt::Debug for LiveAuthz {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveAuthz").field("kms", &self.kms).finish()
    }
}

/// The contracts' `AppBootInfo` for a query.
pub fn boot_info(q: &AuthQuery) -> DstackKms::AppBootInfo {
    DstackKms::AppBootInfo {
        appId: q.app_id.into(),
        composeHash: q.compose_hash.into(),
        instanceId: q.instance_id.into(),
        deviceId: q.device_id.into(),
        mrAggregated: q.mr_aggregated.into(),
        mrSystem: q.mr_system.into(),
        osImageHash: q.os_image_hash.into(),
        tcbStatus: q.tcb_status.clone(),
        advisoryIds: q.advisory_ids.clone(),
    }
}

impl LiveAuthz {
    /// Asks the DstackKms at `kms` through `rpc`.
    pub fn new(rpc: Arc<RpcPool>, kms: Address, metrics: ChainMetrics) -> Self {
        Self {
            rpc,
            kms,
            cache: Mutex::new(Cache::default()),
            metrics,
        }
    }

    fn cached(&self, key: &(Check, AuthQuery), block: u64) -> Option<Decision> {
        let c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.block != block {
            return None;
        }
        c.answers.get(key).cloned()
    }

    fn remember(&self, key: (Check, AuthQuery), block: u64, d: &Decision) {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        // Answers of an older block are never kept next to a newer one's.
        if block > c.block {
            c.block = block;
            c.answers.clear();
        }
        if block == c.block {
            if c.answers.len() >= CACHE_CAPACITY {
                c.answers.clear();
            }
            c.answers.insert(key, d.clone());
        }
    }

    /// The contract's answer to `check` for `q` at `block`.
    pub async fn ask(
        &self,
        check: Check,
        q: &AuthQuery,
        block: u64,
    ) -> Result<Decision, ChainError> {
        let key = (check, q.clone());
        if let Some(d) = self.cached(&key, block) {
            self.metrics.live_call(check, LiveOutcome::Cached, None);
            return Ok(d);
        }
        let info = boot_info(q);
        let input = match check {
            Check::Kms => DstackKms::isKmsAllowedCall { bootInfo: info }.abi_encode(),
            Check::App => DstackKms::isAppAllowedCall { bootInfo: info }.abi_encode(),
        };
        let started = Instant::now();
        let answer = self
            .rpc
            .eth_call(self.kms, input, block)
            .await
            .and_then(|raw| {
                // Both functions return `(bool, string)`.
                DstackKms::isAppAllowedCall::abi_decode_returns(&raw)
                    .map(|r| Decision::from_chain(r.isAllowed, &r.reason))
                    .map_err(|e| ChainError::UndecodableAnswer(e.to_string()))
            });
        let seconds = started.elapsed().as_secs_f64();
        match answer {
            Ok(d) => {
                self.metrics
                    .live_call(check, LiveOutcome::Answered, Some(seconds));
                self.remember(key, block, &d);
                Ok(d)
            }
            Err(e) => {
                self.metrics
                    .live_call(check, LiveOutcome::Failed, Some(seconds));
                Err(e)
            }
        }
    }
}
