//! Severity of what a proposal does: each decoded call, the transaction's own fields, and what
//! the KMS knows of the measurements it would remove.
//!
//! Flow: a [`SafeTx`] and its [`Decoded`] calls, with a [`Context`] (the Safe, its current
//! threshold, the timelocks' delays, and [`Usage`]: how many instances received keys with a
//! measurement lately) → [`classify`] → [`Finding`]s, each with a closed [`Rule`], a [`Severity`]
//! and a sentence. Pure: the context is read elsewhere (or absent offline, which the findings
//! say).

use alloy::primitives::{Address, B256, U256, address};
use serde::Serialize;

use super::decode::{Action, DecodeError, Decoded};
use super::safe_tx::{Operation, SafeTx};

pub use crate::alerts::Severity;

/// Why a finding was raised (closed: metric labels, dedup keys, alert names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Rule {
    /// A removal of a measurement instances received keys with inside the window.
    RemovalInUse,
    RemovalNotInUse,
    /// A removal whose use is unknown (no boot records to ask, e.g. offline).
    RemovalUsageUnknown,
    Addition,
    ProxyUpgrade,
    OwnershipChange,
    SetAppImplementation,
    KmsInfoChange,
    GatewayAppIdChange,
    UpgradesDisabled,
    AllowAnyDevice,
    TcbRequirementDropped,
    AppPolicy,
    AppRegistration,
    /// A delegatecall to anything but MultiSendCallOnly, SignMessageLib or SafeMigration.
    UntrustedDelegatecall,
    SafeOwnerRemoved,
    SafeOwnerAdded,
    SafeThresholdLowered,
    SafeThresholdRaised,
    SafeModuleEnabled,
    SafeModuleDisabled,
    SafeGuardChanged,
    SafeFallbackHandlerChanged,
    SafeMasterCopyChanged,
    HashApproval,
    TimelockSchedule,
    TimelockDelayLowered,
    TimelockDelayRaised,
    TimelockRoleChanged,
    TimelockCancel,
    /// gasPrice / gasToken / refundReceiver set: the Safe pays someone for gas.
    GasRefund,
    /// The service's safeTxHash differs from ours.
    SafeTxHashMismatch,
    /// A signature that is not a valid Safe signature for this transaction.
    InvalidSignature,
    /// A signature by someone who is not a current owner.
    NonOwnerSignature,
    /// A proposer who is neither an owner nor a configured delegate.
    UnknownProposer,
    /// The Transaction Service gives no decoding (it does not trust the target).
    ApiDecodingMissing,
    /// The Transaction Service's decoding names another function than the calldata's.
    ApiDecodingMismatch,
    /// Several proposals for one nonce.
    NonceConflict,
    /// Simulated, the proposal removes a measurement its decoded calls do not show.
    SimulationDisagrees,
    /// Simulated at the head, the proposal's call fails.
    SimulationFails,
    /// Something the simulation saw the proposal do.
    SimulatedEffect,
    /// Calldata that cannot be what it claims.
    Undecodable,
    UnknownCall,
    Transfer,
}

impl Rule {
    /// Stable name (metric label, alert name suffix).
    pub fn label(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// One thing a signer must know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Why.
    pub rule: Rule,
    /// How bad.
    pub severity: Severity,
    /// In words, naming addresses and values in full.
    pub detail: String,
    /// Instances that received keys with a removed measurement inside the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affected_instances: Option<u64>,
}

/// A measurement a proposal can take away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Measurement {
    KmsAggregatedMr { mr: B256 },
    KmsDevice { device: B256 },
    OsImage { image: B256 },
    ComposeHash { app: Address, hash: B256 },
    Device { app: Address, device: B256 },
}

/// Whether instances use a measurement: how many received keys with it inside the window, or
/// `None` when that cannot be known here.
pub trait Usage {
    /// Instances that received keys with `m` inside the window.
    fn instances(&self, m: &Measurement) -> Option<u64>;
}

/// No boot records at hand (offline verification).
pub struct UsageUnknown;

impl Usage for UsageUnknown {
    fn instances(&self, _: &Measurement) -> Option<u64> {
        None
    }
}

/// What classification knows beyond the transaction.
pub struct Context<'a> {
    /// The Safe proposing.
    pub safe: Address,
    /// Its current threshold, when known.
    pub threshold: Option<U256>,
    /// A timelock's current minimum delay, when known.
    pub min_delay: &'a dyn Fn(Address) -> Option<U256>,
    /// Measurements in use.
    pub usage: &'a dyn Usage,
    /// The window `usage` counts over, in words ("7 days").
    pub window: &'a str,
}

/// The measurement `call` removes, if it is a removal.
fn removed(call: &Decoded) -> Option<Measurement> {
    Some(match &call.action {
        Action::RemoveKmsAggregatedMr { mr } => Measurement::KmsAggregatedMr { mr: *mr },
        Action::RemoveKmsDevice { device } => Measurement::KmsDevice { device: *device },
        Action::RemoveOsImageHash { image } => Measurement::OsImage { image: *image },
        Action::RemoveComposeHash { hash } => Measurement::ComposeHash {
            app: call.to,
            hash: *hash,
        },
        Action::RemoveDevice { device } => Measurement::Device {
            app: call.to,
            device: *device,
        },
        _ => return None,
    })
}

impl Measurement {
    /// In words, as removed from `on` (the KMS contract for the KMS's own sets).
    pub fn removal_words(&self, on: Address) -> String {
        match self {
            Self::KmsAggregatedMr { mr } => format!("removes KMS aggregated MR {mr} on {on}"),
            Self::KmsDevice { device } => format!("removes KMS device {device} on {on}"),
            Self::OsImage { image } => format!("removes OS image {image} on {on}"),
            Self::ComposeHash { app, hash } => {
                format!("removes compose hash {hash} from app {app}")
            }
            Self::Device { app, device } => format!("removes device {device} from app {app}"),
        }
    }
}

/// The measurements the calls under `root` would remove.
pub fn removals(root: &Decoded) -> Vec<Measurement> {
    root.walk().into_iter().filter_map(removed).collect()
}

/// Usage counted beforehand (by the caller, from the boot records).
pub struct Counted(pub std::collections::HashMap<Measurement, u64>);

impl Usage for Counted {
    fn instances(&self, m: &Measurement) -> Option<u64> {
        self.0.get(m).copied()
    }
}

/// Delegatecall targets Safe's own tooling uses (1.4.1 MultiSendCallOnly, SignMessageLib,
/// SafeMigration; 1.3.0 MultiSendCallOnly, both deployments).
pub const TRUSTED_DELEGATECALL: [Address; 5] = [
    address!("9641d764fc13c8B624c04430C7356C1C7C8102e2"),
    address!("d53cd0aB83D845Ac265BE939c57F53AD838012c9"),
    address!("526643F69b81B008F46d95CD5ced5eC0edFFDaC6"),
    address!("40A2aCCbd92BCA938b02010E17A5b8929b49130D"),
    address!("A1dabEF33b3B82c7814B6D82A79e50F4AC44102B"),
];

fn finding(rule: Rule, severity: Severity, detail: String) -> Finding {
    Finding {
        rule,
        severity,
        detail,
        affected_instances: None,
    }
}

/// Every finding of `tx` (decoded as `calls`), worst first.
pub fn classify(
    tx: &SafeTx,
    calls: &Result<Decoded, DecodeError>,
    ctx: &Context<'_>,
) -> Vec<Finding> {
    use Severity::{Critical, Warning};
    let mut out = Vec::new();
    let refund =
        !tx.gas_price.is_zero() || !tx.gas_token.is_zero() || !tx.refund_receiver.is_zero();
    if refund {
        let drains =
            !tx.refund_receiver.is_zero() && (!tx.gas_price.is_zero() || !tx.gas_token.is_zero());
        out.push(finding(
            Rule::GasRefund,
            if drains { Critical } else { Warning },
            format!(
                "the Safe refunds gas: gasPrice {}, gasToken {}, refundReceiver {}",
                tx.gas_price, tx.gas_token, tx.refund_receiver
            ),
        ));
    }
    match calls {
        Ok(root) => {
            for call in root.walk() {
                out.extend(call_findings(call, ctx));
            }
        }
        Err(e) => out.push(finding(
            Rule::Undecodable,
            Critical,
            format!("the calldata cannot be what it claims: {e}"),
        )),
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.severity));
    out
}

fn call_findings(call: &Decoded, ctx: &Context<'_>) -> Vec<Finding> {
    use Severity::{Critical, Info, Warning};
    let mut out = Vec::new();
    let to = call.to;
    if call.operation == Operation::DelegateCall && !TRUSTED_DELEGATECALL.contains(&to) {
        out.push(finding(
            Rule::UntrustedDelegatecall,
            Critical,
            format!(
                "DELEGATECALL to {to}, which is not MultiSendCallOnly, SignMessageLib or SafeMigration: its code runs with the Safe's own storage and powers"
            ),
        ));
    }
    let on = if to == ctx.safe {
        "this Safe".to_owned()
    } else {
        format!("{to}")
    };
    let words = call.action.words();
    let removal = |m: Measurement, what: String| -> Finding {
        match ctx.usage.instances(&m) {
            Some(n) if n > 0 => Finding {
                rule: Rule::RemovalInUse,
                severity: Critical,
                detail: format!(
                    "{what}: {n} instance(s) received keys with it in the last {}; they will be refused at their next boot",
                    ctx.window
                ),
                affected_instances: Some(n),
            },
            Some(_) => Finding {
                rule: Rule::RemovalNotInUse,
                severity: Warning,
                detail: format!(
                    "{what}: no instance received keys with it in the last {}",
                    ctx.window
                ),
                affected_instances: Some(0),
            },
            None => finding(
                Rule::RemovalUsageUnknown,
                Warning,
                format!("{what}: whether instances use it is not known here (no boot records)"),
            ),
        }
    };
    let f = |rule, severity, detail: String| finding(rule, severity, detail);
    if let Some(m) = removed(call) {
        out.push(removal(m, m.removal_words(to)));
        return out;
    }
    match &call.action {
        Action::RemoveKmsAggregatedMr { .. }
        | Action::RemoveKmsDevice { .. }
        | Action::RemoveOsImageHash { .. }
        | Action::RemoveComposeHash { .. }
        | Action::RemoveDevice { .. } => {}
        Action::AddKmsAggregatedMr { .. }
        | Action::AddKmsDevice { .. }
        | Action::AddOsImageHash { .. }
        | Action::AddComposeHash { .. }
        | Action::AddDevice { .. } => out.push(f(Rule::Addition, Info, format!("{words} on {to}"))),
        Action::UpgradeToAndCall { .. } => {
            out.push(f(Rule::ProxyUpgrade, Critical, format!("{words} on {to}")))
        }
        Action::TransferOwnership { .. }
        | Action::AcceptOwnership
        | Action::RenounceOwnership => {
            out.push(f(Rule::OwnershipChange, Critical, format!("{words} of {to}")))
        }
        Action::SetAppImplementation { .. } => out.push(f(
            Rule::SetAppImplementation,
            Critical,
            format!("{words} on {to}"),
        )),
        Action::SetKmsInfo => out.push(f(Rule::KmsInfoChange, Critical, format!("{words} on {to}"))),
        Action::SetKmsQuote | Action::SetKmsEventlog => {
            out.push(f(Rule::KmsInfoChange, Warning, format!("{words} on {to}")))
        }
        Action::SetGatewayAppId { .. } => {
            out.push(f(Rule::GatewayAppIdChange, Warning, format!("{words} on {to}")))
        }
        Action::DisableUpgrades => {
            out.push(f(Rule::UpgradesDisabled, Warning, format!("{words} on app {to} (irreversible)")))
        }
        Action::SetAllowAnyDevice { allow: true } => out.push(f(
            Rule::AllowAnyDevice,
            Warning,
            format!("app {to} would accept instances on any device"),
        )),
        Action::SetRequireTcbUpToDate { require: false } => out.push(f(
            Rule::TcbRequirementDropped,
            Warning,
            format!("app {to} would accept instances whose TCB is not up to date"),
        )),
        Action::SetAllowAnyDevice { .. } | Action::SetRequireTcbUpToDate { .. } => {
            out.push(f(Rule::AppPolicy, Info, format!("{words} on app {to}")))
        }
        Action::RegisterApp { .. } | Action::DeployAndRegisterApp { .. } => {
            out.push(f(Rule::AppRegistration, Info, format!("{words} on {to}")))
        }
        Action::RemoveOwner { .. } | Action::SwapOwner { .. } => {
            out.push(f(Rule::SafeOwnerRemoved, Critical, format!("{words} on {on}")))
        }
        Action::AddOwnerWithThreshold { threshold, .. } => {
            out.push(f(Rule::SafeOwnerAdded, Warning, format!("{words} on {on}")));
            out.extend(threshold_change(*threshold, to, &on, ctx));
        }
        Action::ChangeThreshold { threshold } => {
            out.extend(threshold_change(*threshold, to, &on, ctx));
        }
        Action::EnableModule { .. } => {
            out.push(f(Rule::SafeModuleEnabled, Critical, format!("{words} on {on}")))
        }
        Action::DisableModule { .. } => {
            out.push(f(Rule::SafeModuleDisabled, Warning, format!("{words} on {on}")))
        }
        Action::SetGuard { .. } => {
            out.push(f(Rule::SafeGuardChanged, Critical, format!("{words} on {on}")))
        }
        Action::SetFallbackHandler { .. } => out.push(f(
            Rule::SafeFallbackHandlerChanged,
            Critical,
            format!("{words} on {on}"),
        )),
        Action::ChangeMasterCopy { .. } => {
            out.push(f(Rule::SafeMasterCopyChanged, Critical, format!("{words} on {on}")))
        }
        Action::ApproveHash { .. } => {
            out.push(f(Rule::HashApproval, Warning, format!("{words} on {on}")))
        }
        Action::Schedule { calls, delay, .. } => out.push(f(
            Rule::TimelockSchedule,
            Info,
            format!(
                "schedules {} call(s) in timelock {to}, executable {delay} s after it is mined",
                calls.len()
            ),
        )),
        Action::UpdateDelay { delay } => out.push(match (ctx.min_delay)(to) {
            Some(current) if *delay >= current => f(
                Rule::TimelockDelayRaised,
                Info,
                format!("timelock {to}: minimum delay {current} s → {delay} s"),
            ),
            Some(current) => f(
                Rule::TimelockDelayLowered,
                Critical,
                format!("timelock {to}: minimum delay LOWERED {current} s → {delay} s"),
            ),
            None => f(
                Rule::TimelockDelayLowered,
                Critical,
                format!("timelock {to}: minimum delay set to {delay} s; its current delay is not known here, so it may be a decrease"),
            ),
        }),
        Action::GrantRole { .. } | Action::RevokeRole { .. } => out.push(f(
            Rule::TimelockRoleChanged,
            Critical,
            format!("{words} on timelock {to}"),
        )),
        Action::RenounceRole { .. } => out.push(f(
            Rule::TimelockRoleChanged,
            Warning,
            format!("{words} on timelock {to}"),
        )),
        Action::Cancel { .. } => out.push(f(Rule::TimelockCancel, Warning, format!("{words} on {to}"))),
        Action::Unknown { .. } => out.push(f(Rule::UnknownCall, Warning, format!("{to}: {words}"))),
        Action::Transfer if !call.value.is_zero() => out.push(f(
            Rule::Transfer,
            Info,
            format!("sends {} wei to {to}", call.value),
        )),
        Action::Transfer
        | Action::ExecTransaction { .. }
        | Action::MultiSend { .. }
        | Action::Execute { .. } => {}
    }
    out
}

fn threshold_change(new: U256, to: Address, on: &str, ctx: &Context<'_>) -> Option<Finding> {
    let current = if to == ctx.safe { ctx.threshold } else { None };
    Some(match current {
        Some(c) if new >= c => finding(
            Rule::SafeThresholdRaised,
            Severity::Info,
            format!("{on}: threshold {c} → {new}"),
        ),
        Some(c) => finding(
            Rule::SafeThresholdLowered,
            Severity::Critical,
            format!("{on}: threshold LOWERED {c} → {new}"),
        ),
        None => finding(
            Rule::SafeThresholdLowered,
            Severity::Critical,
            format!(
                "{on}: threshold set to {new}; the current threshold is not known here, so it may be a decrease"
            ),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::contracts::{DstackApp, MultiSend, SafeL2, TimelockController};
    use crate::governance::decode::decode;
    use alloy::primitives::Bytes;
    use alloy::sol_types::SolCall;

    const SAFE: Address = Address::repeat_byte(0x5a);
    const APP: Address = Address::repeat_byte(0x0b);
    const TIMELOCK: Address = Address::repeat_byte(0x0c);

    struct Counts(u64);
    impl Usage for Counts {
        fn instances(&self, m: &Measurement) -> Option<u64> {
            matches!(m, Measurement::ComposeHash { .. }).then_some(self.0)
        }
    }

    fn tx(to: Address, data: Vec<u8>, operation: Operation) -> SafeTx {
        SafeTx {
            to,
            value: U256::ZERO,
            data: Bytes::from(data),
            operation,
            safe_tx_gas: U256::ZERO,
            base_gas: U256::ZERO,
            gas_price: U256::ZERO,
            gas_token: Address::ZERO,
            refund_receiver: Address::ZERO,
            nonce: U256::ZERO,
        }
    }

    fn run(
        t: &SafeTx,
        usage: &dyn Usage,
        threshold: Option<u64>,
        delay: Option<u64>,
    ) -> Vec<Finding> {
        let min_delay = move |_: Address| delay.map(U256::from);
        let ctx = Context {
            safe: SAFE,
            threshold: threshold.map(U256::from),
            min_delay: &min_delay,
            usage,
            window: "7 days",
        };
        let calls = decode(t.to, t.value, &t.data, t.operation);
        classify(t, &calls, &ctx)
    }

    fn rules(f: &[Finding]) -> Vec<(Rule, Severity)> {
        f.iter().map(|f| (f.rule, f.severity)).collect()
    }

    fn remove_compose() -> Vec<u8> {
        DstackApp::removeComposeHashCall {
            composeHash: B256::repeat_byte(0x29),
        }
        .abi_encode()
    }

    #[test]
    fn removing_a_compose_hash_in_use_is_critical_with_the_affected_count() {
        let t = tx(APP, remove_compose(), Operation::Call);
        let f = run(&t, &Counts(12), None, None);
        assert_eq!(rules(&f), vec![(Rule::RemovalInUse, Severity::Critical)]);
        assert_eq!(f[0].affected_instances, Some(12));
        assert!(f[0].detail.contains("12 instance(s)"), "{}", f[0].detail);
        assert_eq!(
            rules(&run(&t, &Counts(0), None, None)),
            vec![(Rule::RemovalNotInUse, Severity::Warning)]
        );
        assert_eq!(
            rules(&run(&t, &UsageUnknown, None, None)),
            vec![(Rule::RemovalUsageUnknown, Severity::Warning)]
        );
    }

    #[test]
    fn a_removal_scheduled_through_the_timelock_inside_a_multisend_is_found() {
        let schedule = TimelockController::scheduleCall {
            target: APP,
            value: U256::ZERO,
            data: remove_compose().into(),
            predecessor: B256::ZERO,
            salt: B256::ZERO,
            delay: U256::from(3600),
        }
        .abi_encode();
        let mut packed = vec![0u8];
        packed.extend_from_slice(TIMELOCK.as_slice());
        packed.extend_from_slice(&[0; 32]);
        packed.extend_from_slice(&U256::from(schedule.len()).to_be_bytes::<32>());
        packed.extend_from_slice(&schedule);
        let data = MultiSend::multiSendCall {
            transactions: packed.into(),
        }
        .abi_encode();
        let f = run(
            &tx(
                TRUSTED_DELEGATECALL[0],
                data.clone(),
                Operation::DelegateCall,
            ),
            &Counts(3),
            None,
            None,
        );
        assert_eq!(
            rules(&f),
            vec![
                (Rule::RemovalInUse, Severity::Critical),
                (Rule::TimelockSchedule, Severity::Info)
            ]
        );
        // The same through plain MultiSend (not call-only): an untrusted delegatecall as well.
        let f = run(
            &tx(Address::repeat_byte(0x99), data, Operation::DelegateCall),
            &Counts(3),
            None,
            None,
        );
        assert_eq!(f[0].rule, Rule::UntrustedDelegatecall);
    }

    #[test]
    fn safe_self_calls_and_timelock_changes_that_weaken_governance_are_critical() {
        let call = |data: Vec<u8>| tx(SAFE, data, Operation::Call);
        let lowered = run(
            &call(
                SafeL2::changeThresholdCall {
                    _threshold: U256::from(1),
                }
                .abi_encode(),
            ),
            &UsageUnknown,
            Some(2),
            None,
        );
        assert_eq!(
            rules(&lowered),
            vec![(Rule::SafeThresholdLowered, Severity::Critical)]
        );
        let raised = run(
            &call(
                SafeL2::changeThresholdCall {
                    _threshold: U256::from(3),
                }
                .abi_encode(),
            ),
            &UsageUnknown,
            Some(2),
            None,
        );
        assert_eq!(
            rules(&raised),
            vec![(Rule::SafeThresholdRaised, Severity::Info)]
        );
        for data in [
            SafeL2::removeOwnerCall {
                prevOwner: Address::ZERO,
                owner: Address::ZERO,
                _threshold: U256::from(1),
            }
            .abi_encode(),
            SafeL2::setGuardCall {
                guard: Address::repeat_byte(1),
            }
            .abi_encode(),
            SafeL2::enableModuleCall {
                module: Address::repeat_byte(1),
            }
            .abi_encode(),
            SafeL2::setFallbackHandlerCall {
                handler: Address::repeat_byte(1),
            }
            .abi_encode(),
        ] {
            let f = run(&call(data), &UsageUnknown, Some(2), None);
            assert_eq!(f[0].severity, Severity::Critical, "{f:?}");
        }
        let delay = |d: u64| {
            tx(
                TIMELOCK,
                TimelockController::updateDelayCall {
                    newDelay: U256::from(d),
                }
                .abi_encode(),
                Operation::Call,
            )
        };
        assert_eq!(
            rules(&run(&delay(60), &UsageUnknown, None, Some(3600))),
            vec![(Rule::TimelockDelayLowered, Severity::Critical)]
        );
        assert_eq!(
            rules(&run(&delay(7200), &UsageUnknown, None, Some(3600))),
            vec![(Rule::TimelockDelayRaised, Severity::Info)]
        );
        assert_eq!(
            run(&delay(7200), &UsageUnknown, None, None)[0].severity,
            Severity::Critical
        );
    }

    #[test]
    fn gas_refunds_and_undecodable_calldata_are_flagged() {
        let mut t = tx(
            APP,
            DstackApp::addComposeHashCall {
                composeHash: B256::ZERO,
            }
            .abi_encode(),
            Operation::Call,
        );
        t.gas_price = U256::from(1);
        t.refund_receiver = Address::repeat_byte(0x66);
        let f = run(&t, &UsageUnknown, None, None);
        assert_eq!(
            rules(&f),
            vec![
                (Rule::GasRefund, Severity::Critical),
                (Rule::Addition, Severity::Info)
            ]
        );
        t.refund_receiver = Address::ZERO;
        assert_eq!(
            run(&t, &UsageUnknown, None, None)[0].severity,
            Severity::Warning
        );
        let bad = tx(
            APP,
            [DstackApp::removeComposeHashCall::SELECTOR.as_slice(), &[1]].concat(),
            Operation::Call,
        );
        assert_eq!(
            rules(&run(&bad, &UsageUnknown, None, None)),
            vec![(Rule::Undecodable, Severity::Critical)]
        );
        assert_eq!(Rule::RemovalInUse.label(), "removal_in_use");
    }
}
