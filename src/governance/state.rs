//! The governance state the watcher keeps: who owns DstackKms and each app, what each owner is
//! (Safe, TimelockController, EOA), every Safe's owners, threshold, nonce, modules, guard,
//! fallback handler and executions, and every timelock's roles, delay and operation queue.
//!
//! Flow: stored rows (logs and observations, in chain order) → [`GovernanceState::apply`] (pure,
//! idempotent where the chain's state is set, incremental where events count) → published
//! snapshot → topology, metrics, queue. An observation is the chain's answer at its block and
//! replaces what events had built up to it.

use std::collections::{BTreeMap, BTreeSet};

use alloy::primitives::{Address, B256, Bytes, U256};
use serde::Serialize;

use super::events::{ContractKind, GovEvent};

/// Most executions kept per Safe (the newest).
const EXECUTIONS_KEPT: usize = 256;

/// An owner and a pending owner (two-step ownership).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Ownership {
    /// `owner()`.
    pub owner: Option<Address>,
    /// `pendingOwner()`.
    pub pending: Option<Address>,
}

/// One executed Safe transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Execution {
    /// Its safeTxHash.
    pub safe_tx_hash: B256,
    /// Whether the inner call succeeded.
    pub success: bool,
    /// Block.
    pub block: u64,
    /// Nonce, target, value, calldata, operation and signers, from `SafeMultiSigTransaction`
    /// (SafeL2); `None` for a plain Safe, which does not emit it.
    pub details: Option<ExecutionDetails>,
}

/// What SafeL2 records of an execution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecutionDetails {
    /// Nonce.
    pub nonce: u64,
    /// Target.
    pub to: Address,
    /// Wei sent.
    pub value: U256,
    /// Calldata.
    pub data: Bytes,
    /// 0 call, 1 delegatecall.
    pub operation: u8,
    /// Who signed (decoded from the signature list).
    pub signers: Vec<Address>,
}

/// One Safe.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SafeState {
    /// `VERSION()` when observed.
    pub version: Option<String>,
    /// Owners, in the Safe's order.
    pub owners: Vec<Address>,
    /// Threshold.
    pub threshold: u64,
    /// Nonce: the next transaction's.
    pub nonce: u64,
    /// Enabled modules.
    pub modules: BTreeSet<Address>,
    /// Transaction guard (zero: none).
    pub guard: Address,
    /// Fallback handler.
    pub fallback_handler: Address,
    /// Executions, oldest first (at most the newest [`EXECUTIONS_KEPT`]).
    pub executions: Vec<Execution>,
    /// On-chain approvals: (safeTxHash, owner).
    pub approvals: BTreeSet<(B256, Address)>,
    /// A `SafeMultiSigTransaction` (and its signature list) waiting for its outcome event.
    #[serde(skip)]
    recorded: Option<(ExecutionDetails, Bytes)>,
    /// Module transactions seen.
    pub module_transactions: u64,
    /// The last block in which each address signed on-chain (approved a hash, or signed an
    /// execution).
    #[serde(skip)]
    last_signed: BTreeMap<Address, u64>,
    /// Timestamps of the blocks in `last_signed`.
    #[serde(skip)]
    signing_times: BTreeMap<u64, u64>,
}

impl SafeState {
    /// Current owners who signed on-chain at or after `since` (Unix seconds).
    pub fn owners_signed_since(&self, since: u64) -> impl Iterator<Item = Address> + '_ {
        self.owners.iter().copied().filter(move |o| {
            self.last_signed
                .get(o)
                .and_then(|b| self.signing_times.get(b))
                .is_some_and(|t| *t >= since)
        })
    }
}

/// Where a timelock operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationStatus {
    /// Scheduled, not executed or cancelled.
    Pending,
    /// Every call executed.
    Done,
    /// Cancelled.
    Cancelled,
}

/// One call of a timelock operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScheduledCall {
    /// Target.
    pub target: Address,
    /// Wei.
    pub value: U256,
    /// Calldata.
    pub data: Bytes,
}

/// One timelock operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimelockOperation {
    /// Its calls, by index.
    pub calls: BTreeMap<u64, ScheduledCall>,
    /// Delay given when scheduled (seconds).
    pub delay: u64,
    /// Block it was scheduled in.
    pub scheduled_block: u64,
    /// When it becomes executable (Unix seconds, `getTimestamp`).
    pub ready_at: Option<u64>,
    /// Indexes executed.
    pub executed: BTreeSet<u64>,
    /// Status.
    pub status: OperationStatus,
}

/// One TimelockController.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TimelockState {
    /// Minimum delay (seconds).
    pub min_delay: u64,
    /// Role → holders.
    pub roles: BTreeMap<B256, BTreeSet<Address>>,
    /// Operations by id.
    pub operations: BTreeMap<B256, TimelockOperation>,
}

/// What an address is, as the watcher knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A Safe.
    Safe,
    /// A TimelockController.
    Timelock,
    /// No code.
    Eoa,
    /// Other code.
    Contract,
}

/// The whole governance state of one chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GovernanceState {
    /// The chain (0 until the follower read it).
    pub chain_id: u64,
    /// The DstackKms contract.
    pub kms: Address,
    /// Block the state is at.
    pub block: u64,
    /// That block's timestamp (Unix seconds; 0 when not known): chain time, which decides when a
    /// timelock operation is ready.
    pub time: u64,
    /// Ownership of the KMS contract and of each registered app.
    pub owned: BTreeMap<Address, Ownership>,
    /// Registered apps.
    pub apps: BTreeSet<Address>,
    /// What each observed address is.
    pub roles: BTreeMap<Address, Role>,
    /// Safes.
    pub safes: BTreeMap<Address, SafeState>,
    /// Timelocks.
    pub timelocks: BTreeMap<Address, TimelockState>,
}

fn nonzero(a: Address) -> Option<Address> {
    (!a.is_zero()).then_some(a)
}

impl GovernanceState {
    /// An empty state for `kms`.
    pub fn new(kms: Address) -> Self {
        let mut s = Self {
            kms,
            ..Self::default()
        };
        s.owned.insert(kms, Ownership::default());
        s
    }

    /// Applies one event.
    pub fn apply(&mut self, e: &GovEvent, block: u64) {
        match e {
            GovEvent::AppRegistered { app, .. } => {
                self.apps.insert(*app);
                self.owned.entry(*app).or_default();
            }
            GovEvent::OwnershipTransferStarted { contract, pending } => {
                self.owned.entry(*contract).or_default().pending = nonzero(*pending);
            }
            GovEvent::OwnershipTransferred { contract, owner } => {
                let o = self.owned.entry(*contract).or_default();
                o.owner = nonzero(*owner);
                o.pending = None;
            }
            GovEvent::SafeSetup {
                safe,
                owners,
                threshold,
            } => {
                let s = self.safes.entry(*safe).or_default();
                s.owners.clone_from(owners);
                s.threshold = *threshold;
            }
            GovEvent::AddedOwner { safe, owner } => {
                let s = self.safes.entry(*safe).or_default();
                if !s.owners.contains(owner) {
                    // The Safe links a new owner at the head of its list.
                    s.owners.insert(0, *owner);
                }
            }
            GovEvent::RemovedOwner { safe, owner } => {
                self.safes
                    .entry(*safe)
                    .or_default()
                    .owners
                    .retain(|o| o != owner);
            }
            GovEvent::ChangedThreshold { safe, threshold } => {
                self.safes.entry(*safe).or_default().threshold = *threshold;
            }
            GovEvent::EnabledModule { safe, module } => {
                self.safes.entry(*safe).or_default().modules.insert(*module);
            }
            GovEvent::DisabledModule { safe, module } => {
                self.safes.entry(*safe).or_default().modules.remove(module);
            }
            GovEvent::ChangedGuard { safe, guard } => {
                self.safes.entry(*safe).or_default().guard = *guard;
            }
            GovEvent::ChangedFallbackHandler { safe, handler } => {
                self.safes.entry(*safe).or_default().fallback_handler = *handler;
            }
            GovEvent::ApproveHash { safe, hash, owner } => {
                let s = self.safes.entry(*safe).or_default();
                s.approvals.insert((*hash, *owner));
                s.last_signed.insert(*owner, block);
            }
            GovEvent::BlockTime { safe, at } => {
                let s = self.safes.entry(*safe).or_default();
                s.signing_times.insert(block, *at);
                let used: BTreeSet<u64> = s.last_signed.values().copied().collect();
                s.signing_times.retain(|b, _| used.contains(b));
            }
            GovEvent::SafeMultiSigTransaction {
                safe,
                to,
                value,
                data,
                operation,
                signatures,
                nonce,
            } => {
                // Signers are named once the outcome event gives the safeTxHash they signed.
                let details = ExecutionDetails {
                    nonce: *nonce,
                    to: *to,
                    value: *value,
                    data: data.clone(),
                    operation: *operation,
                    signers: Vec::new(),
                };
                self.safes.entry(*safe).or_default().recorded = Some((details, signatures.clone()));
            }
            GovEvent::ExecutionSuccess { safe, hash }
            | GovEvent::ExecutionFailure { safe, hash } => {
                let success = matches!(e, GovEvent::ExecutionSuccess { .. });
                let s = self.safes.entry(*safe).or_default();
                let details = s.recorded.take().map(|(mut d, signatures)| {
                    d.signers = super::signatures::split(&signatures, *hash)
                        .map(|items| items.into_iter().map(|i| i.owner).collect())
                        .unwrap_or_default();
                    d
                });
                for signer in details.iter().flat_map(|d| &d.signers) {
                    s.last_signed.insert(*signer, block);
                }
                s.nonce = s.nonce.saturating_add(1);
                s.executions.push(Execution {
                    safe_tx_hash: *hash,
                    success,
                    block,
                    details,
                });
                if s.executions.len() > EXECUTIONS_KEPT {
                    let excess = s.executions.len() - EXECUTIONS_KEPT;
                    s.executions.drain(..excess);
                }
            }
            GovEvent::SafeModuleTransaction { safe, .. } => {
                self.safes.entry(*safe).or_default().module_transactions += 1;
            }
            GovEvent::CallScheduled {
                timelock,
                id,
                index,
                target,
                value,
                data,
                delay,
            } => {
                let t = self.timelocks.entry(*timelock).or_default();
                let op = t
                    .operations
                    .entry(*id)
                    .or_insert_with(|| TimelockOperation {
                        calls: BTreeMap::new(),
                        delay: *delay,
                        scheduled_block: block,
                        ready_at: None,
                        executed: BTreeSet::new(),
                        status: OperationStatus::Pending,
                    });
                op.calls.insert(
                    *index,
                    ScheduledCall {
                        target: *target,
                        value: *value,
                        data: data.clone(),
                    },
                );
            }
            GovEvent::CallExecuted {
                timelock,
                id,
                index,
            } => {
                let t = self.timelocks.entry(*timelock).or_default();
                if let Some(op) = t.operations.get_mut(id) {
                    op.executed.insert(*index);
                    if op.calls.keys().all(|i| op.executed.contains(i)) {
                        op.status = OperationStatus::Done;
                    }
                }
            }
            GovEvent::Cancelled { timelock, id } => {
                let t = self.timelocks.entry(*timelock).or_default();
                if let Some(op) = t.operations.get_mut(id) {
                    op.status = OperationStatus::Cancelled;
                }
            }
            GovEvent::MinDelayChange { timelock, delay } => {
                self.timelocks.entry(*timelock).or_default().min_delay = *delay;
            }
            GovEvent::RoleGranted {
                timelock,
                role,
                account,
            } => {
                self.timelocks
                    .entry(*timelock)
                    .or_default()
                    .roles
                    .entry(*role)
                    .or_default()
                    .insert(*account);
            }
            GovEvent::RoleRevoked {
                timelock,
                role,
                account,
            } => {
                if let Some(holders) = self
                    .timelocks
                    .entry(*timelock)
                    .or_default()
                    .roles
                    .get_mut(role)
                {
                    holders.remove(account);
                }
            }
            GovEvent::Observed { address, kind } => self.observe(*address, kind),
            GovEvent::OperationReady { timelock, id, at } => {
                if let Some(op) = self
                    .timelocks
                    .entry(*timelock)
                    .or_default()
                    .operations
                    .get_mut(id)
                {
                    op.ready_at = Some(*at);
                }
            }
        }
    }

    fn observe(&mut self, address: Address, kind: &ContractKind) {
        let role = match kind {
            ContractKind::Eoa => Role::Eoa,
            ContractKind::Contract => Role::Contract,
            ContractKind::Timelock { min_delay } => {
                self.timelocks.entry(address).or_default().min_delay = *min_delay;
                Role::Timelock
            }
            ContractKind::Safe {
                version,
                owners,
                threshold,
                nonce,
                modules,
                guard,
                fallback_handler,
            } => {
                let s = self.safes.entry(address).or_default();
                s.version = Some(version.clone());
                s.owners.clone_from(owners);
                s.threshold = *threshold;
                s.nonce = *nonce;
                s.modules = modules.iter().copied().collect();
                s.guard = *guard;
                s.fallback_handler = *fallback_handler;
                Role::Safe
            }
        };
        self.roles.insert(address, role);
    }

    /// Pending timelock operations: (timelock, id, operation).
    pub fn queue(&self) -> Vec<(Address, B256, &TimelockOperation)> {
        self.timelocks
            .iter()
            .flat_map(|(t, s)| {
                s.operations
                    .iter()
                    .filter(|(_, op)| op.status == OperationStatus::Pending)
                    .map(move |(id, op)| (*t, *id, op))
            })
            .collect()
    }
}
