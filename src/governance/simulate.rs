//! What a pending proposal would do, seen by running it: decoding reads what a proposal says,
//! simulation sees what it does, whatever path its calls take (a delegatecall to unknown code
//! that removes a compose hash included).
//!
//! Flow: a proposal of a Safe → [`Simulator::proposal`]: one `eth_simulateV1` request at the
//! head: block 1 overrides the Safe's storage so a simulator address is its only owner with
//! threshold 1, its nonce the proposal's and no guard, then calls `execTransaction` from that
//! address with an approved-hash signature; block 2 executes, as the timelock, every call block 1
//! scheduled in a TimelockController → the emitted logs → [`effects`] (pure: DstackKms / DstackApp
//! removals, ownership, upgrades, Safe changes, execution failure) → [`compare`] (pure) with what
//! the decoding said: a removal the decoding does not show is critical. A node answering neither
//! `eth_simulateV1` is said once; decoding alone is used then.

use std::sync::atomic::{AtomicBool, Ordering};

use alloy::primitives::{Address, B256, Bytes, U256, keccak256};
use alloy::sol_types::SolCall;
use serde_json::{Value, json};

use super::classify::{Finding, Measurement, Rule, Severity, Usage};
use super::events::GovEvent;
use super::safe_tx::SafeTx;
use crate::chain::ChainError;
use crate::chain::contracts::SafeL2;
use crate::chain::events::{self as kms_events, Event};
use crate::chain::projection::ChainReads;

/// The address the simulation executes from (made the Safe's only owner).
pub const SIMULATOR: Address = Address::repeat_byte(0x5e);

/// Safe 1.3.0 / 1.4.1 storage: the owners mapping's slot, the threshold, the nonce.
const OWNERS_SLOT: u64 = 2;
const THRESHOLD_SLOT: u64 = 4;
const NONCE_SLOT: u64 = 5;
/// `keccak256("guard_manager.guard.address")`.
const GUARD_SLOT: B256 =
    alloy::primitives::b256!("4a204f620c8c5ccdca3fd54d003badd85ba500436a431f0cbda4f558c93c34c8");

/// What a simulated proposal did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// Measurements removed.
    pub removed: Vec<Measurement>,
    /// Other notable changes, in words.
    pub changes: Vec<String>,
    /// The Safe reported the inner call failed, or a call reverted.
    pub failed: bool,
}

/// A log as `eth_simulateV1` returns it.
fn log_parts(v: &Value) -> Option<(Address, Vec<B256>, Bytes)> {
    let address = v["address"].as_str()?.parse().ok()?;
    let topics = v["topics"]
        .as_array()?
        .iter()
        .map(|t| t.as_str()?.parse().ok())
        .collect::<Option<Vec<B256>>>()?;
    let data = v["data"].as_str()?.parse().ok()?;
    Some((address, topics, data))
}

/// The effects of simulated logs (pure). `kms` is the watched DstackKms.
pub fn effects(kms: Address, logs: &[(Address, Vec<B256>, Bytes)], reverted: bool) -> Effects {
    let mut out = Effects {
        failed: reverted,
        ..Effects::default()
    };
    for (emitter, topics, data) in logs {
        match kms_events::decode(kms, *emitter, topics, data) {
            Some(Event::ComposeHash(app, hash, false)) => {
                out.removed.push(Measurement::ComposeHash { app, hash })
            }
            Some(Event::Device(app, device, false)) => {
                out.removed.push(Measurement::Device { app, device })
            }
            Some(Event::OsImage(image, false)) => out.removed.push(Measurement::OsImage { image }),
            Some(Event::KmsAggregatedMr(mr, false)) => {
                out.removed.push(Measurement::KmsAggregatedMr { mr })
            }
            Some(Event::KmsDevice(device, false)) => {
                out.removed.push(Measurement::KmsDevice { device })
            }
            Some(Event::Upgraded(a, imp)) => out.changes.push(format!("{a} upgraded to {imp}")),
            Some(Event::OwnershipTransferStarted(a, to)) => out
                .changes
                .push(format!("ownership of {a} offered to {to}")),
            Some(Event::OwnershipTransferred(a, to)) => {
                out.changes.push(format!("{a} now owned by {to}"))
            }
            _ => match super::events::decode(kms, *emitter, topics, data) {
                Some(GovEvent::ExecutionFailure { .. }) => out.failed = true,
                Some(GovEvent::RemovedOwner { safe, owner }) => out
                    .changes
                    .push(format!("{owner} removed from Safe {safe}")),
                Some(GovEvent::ChangedThreshold { safe, threshold }) => out
                    .changes
                    .push(format!("Safe {safe} threshold set to {threshold}")),
                Some(GovEvent::EnabledModule { safe, module }) => out
                    .changes
                    .push(format!("module {module} enabled on Safe {safe}")),
                Some(GovEvent::ChangedGuard { safe, guard }) => out
                    .changes
                    .push(format!("Safe {safe} guard set to {guard}")),
                _ => {}
            },
        }
    }
    out
}

/// Findings from comparing what simulation did with the removals decoding found (pure).
pub fn compare(
    kms: Address,
    decoded: &[Measurement],
    e: &Effects,
    usage: &dyn Usage,
    window: &str,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for m in e.removed.iter().filter(|m| !decoded.contains(m)) {
        let affected = usage.instances(m);
        let used = affected.map_or_else(
            || "whether instances use it is not known here".to_owned(),
            |n| format!("{n} instance(s) received keys with it in the last {window}"),
        );
        out.push(Finding {
            rule: Rule::SimulationDisagrees,
            severity: Severity::Critical,
            detail: format!(
                "simulated, it {} though its decoded calls do not say so; {used}",
                m.removal_words(kms)
            ),
            affected_instances: affected,
        });
    }
    if e.failed {
        out.push(Finding {
            rule: Rule::SimulationFails,
            severity: Severity::Warning,
            detail: "simulated at the head, its call fails".into(),
            affected_instances: None,
        });
    }
    for c in &e.changes {
        out.push(Finding {
            rule: Rule::SimulatedEffect,
            severity: Severity::Info,
            detail: format!("simulated effect: {c}"),
            affected_instances: None,
        });
    }
    out
}

/// Runs proposals in simulation.
pub struct Simulator {
    reads: ChainReads,
    kms: Address,
    supported: AtomicBool,
}

fn word(v: U256) -> String {
    format!("0x{}", hex::encode(v.to_be_bytes::<32>()))
}

impl Simulator {
    /// The DstackKms whose effects are judged.
    pub fn kms(&self) -> Address {
        self.kms
    }

    /// The chain reads it simulates through.
    pub fn reads(&self) -> &ChainReads {
        &self.reads
    }

    /// A simulator through `reads`, judging effects on `kms` and its apps.
    pub fn new(reads: ChainReads, kms: Address) -> Self {
        Self {
            reads,
            kms,
            supported: AtomicBool::new(true),
        }
    }

    /// The effects of `tx` proposed to `safe`, simulated at the head; `None` when the node cannot
    /// simulate.
    pub async fn proposal(
        &self,
        safe: Address,
        tx: &SafeTx,
    ) -> Result<Option<Effects>, ChainError> {
        if !self.supported.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let owner_slot = keccak256(
            [
                B256::left_padding_from(SIMULATOR.as_slice()).0,
                U256::from(OWNERS_SLOT).to_be_bytes::<32>(),
            ]
            .concat(),
        );
        let mut signature = B256::left_padding_from(SIMULATOR.as_slice()).to_vec();
        signature.extend_from_slice(&[0; 32]);
        signature.push(1);
        let exec = SafeL2::execTransactionCall {
            to: tx.to,
            value: tx.value,
            data: tx.data.clone(),
            operation: tx.operation.as_u8(),
            safeTxGas: tx.safe_tx_gas,
            baseGas: tx.base_gas,
            gasPrice: tx.gas_price,
            gasToken: tx.gas_token,
            refundReceiver: tx.refund_receiver,
            signatures: signature.into(),
        }
        .abi_encode();
        let first = json!({
            "stateOverrides": {
                safe.to_string(): {
                    "stateDiff": {
                        owner_slot.to_string(): word(U256::from(1)),
                        word(U256::from(THRESHOLD_SLOT)): word(U256::from(1)),
                        word(U256::from(NONCE_SLOT)): word(tx.nonce),
                        GUARD_SLOT.to_string(): word(U256::ZERO),
                    }
                },
                SIMULATOR.to_string(): { "balance": "0x56bc75e2d63100000" }
            },
            "calls": [{
                "from": SIMULATOR.to_string(),
                "to": safe.to_string(),
                "data": format!("0x{}", hex::encode(&exec)),
                "gas": "0x1c9c380",
            }]
        });
        let Some(block1) = self.run(std::slice::from_ref(&first)).await? else {
            return Ok(None);
        };
        let (logs1, reverted1) = block_logs(&block1, 0);
        // Timelock calls scheduled by the proposal, executed as the timelock.
        let scheduled: Vec<Value> = logs1
            .iter()
            .filter_map(|(emitter, topics, data)| {
                match super::events::decode(self.kms, *emitter, topics, data)? {
                    GovEvent::CallScheduled {
                        timelock,
                        target,
                        value,
                        data,
                        ..
                    } => Some(json!({
                        "from": timelock.to_string(),
                        "to": target.to_string(),
                        "value": format!("0x{value:x}"),
                        "data": format!("0x{}", hex::encode(&data)),
                        "gas": "0x1c9c380",
                    })),
                    _ => None,
                }
            })
            .collect();
        let (mut logs, mut reverted) = (logs1, reverted1);
        if !scheduled.is_empty() {
            let second = json!({ "calls": scheduled });
            let Some(blocks) = self.run(&[first, second]).await? else {
                return Ok(None);
            };
            let (logs2, reverted2) = block_logs(&blocks, 1);
            logs.extend(logs2);
            reverted |= reverted2;
        }
        Ok(Some(effects(self.kms, &logs, reverted)))
    }

    /// One `eth_simulateV1` request; `None` (said once) when the node does not offer it.
    async fn run(&self, blocks: &[Value]) -> Result<Option<Value>, ChainError> {
        let params = json!([{ "blockStateCalls": blocks, "validation": false }, "latest"]);
        match self.reads.simulate(&params).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_unsupported(&e) => {
                if self.supported.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "governance: the node does not simulate (eth_simulateV1); proposals are judged by decoding alone");
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

fn is_unsupported(e: &ChainError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("method not found") || text.contains("not supported") || text.contains("-32601")
}

/// Logs of block `i` of a simulation answer, and whether a call in it reverted.
fn block_logs(answer: &Value, i: usize) -> (Vec<(Address, Vec<B256>, Bytes)>, bool) {
    let calls = answer[i]["calls"].as_array().cloned().unwrap_or_default();
    let reverted = calls.iter().any(|c| c["status"].as_str() == Some("0x0"));
    let logs = calls
        .iter()
        .flat_map(|c| c["logs"].as_array().cloned().unwrap_or_default())
        .filter_map(|l| log_parts(&l))
        .collect();
    (logs, reverted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::contracts::DstackApp;
    use crate::governance::classify::Counted;
    use alloy::sol_types::SolEvent;

    #[test]
    fn a_removal_only_the_simulation_shows_is_critical_with_its_count() {
        let kms = Address::repeat_byte(0x0a);
        let app = Address::repeat_byte(0x0b);
        let hash = B256::repeat_byte(0x29);
        let log = (
            app,
            vec![DstackApp::ComposeHashRemoved::SIGNATURE_HASH],
            Bytes::from(hash.to_vec()),
        );
        let e = effects(kms, &[log], false);
        let m = Measurement::ComposeHash { app, hash };
        assert_eq!(e.removed, vec![m]);
        let usage = Counted(std::collections::HashMap::from([(m, 12)]));
        let f = compare(kms, &[], &e, &usage, "7 days");
        assert_eq!(
            (f[0].rule, f[0].severity, f[0].affected_instances),
            (Rule::SimulationDisagrees, Severity::Critical, Some(12))
        );
        // Decoding saw it: nothing to add.
        assert!(compare(kms, &[m], &e, &usage, "7 days").is_empty());
    }
}
