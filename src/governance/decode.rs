//! Decoding what a Safe transaction calls, all the way down: MultiSend items, TimelockController
//! `schedule`/`scheduleBatch`/`execute`/`executeBatch` and nested Safe `execTransaction`s are
//! unpacked into their inner calls; DstackKms, DstackApp, Safe self-calls and timelock
//! administration become typed [`Action`]s; anything else stays a selector and a length.
//!
//! Flow: a call (target, value, data, operation) → [`decode`] → a [`Decoded`] tree, with
//! [`Decoded::words`] for plain-language lines. Pure, bounded (depth [`MAX_DEPTH`], calls
//! [`MAX_CALLS`], data [`MAX_DATA`]): hostile calldata gives a [`DecodeError`], never a panic. The
//! Transaction Service's `dataDecoded` is never used: this is what it is compared with.

use alloy::primitives::{Address, B256, Bytes, FixedBytes, U256};
use alloy::sol_types::SolCall;
use serde::Serialize;

use super::safe_tx::Operation;
use crate::chain::contracts::{DstackApp, DstackKms, MultiSend, SafeL2, TimelockController};

/// Deepest nesting followed (MultiSend in a timelock call in a Safe transaction is 3).
pub const MAX_DEPTH: usize = 8;
/// Most calls in one tree.
pub const MAX_CALLS: usize = 512;
/// Largest calldata decoded.
pub const MAX_DATA: usize = 1 << 20;

mod legacy {
    #![allow(missing_docs)]
    // Removed from Safe's ABI after 1.1.1, still callable on older Safes.
    alloy::sol! {
        function changeMasterCopy(address _masterCopy);
    }
}

/// One call and what it does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decoded {
    /// Target.
    pub to: Address,
    /// Wei sent.
    pub value: U256,
    /// Call or delegatecall.
    pub operation: Operation,
    /// What the calldata asks.
    pub action: Action,
}

/// What a call asks, by function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "function", rename_all = "camelCase")]
#[allow(missing_docs)]
pub enum Action {
    /// No calldata: a plain transfer of `value`.
    Transfer,
    AddKmsAggregatedMr {
        mr: B256,
    },
    RemoveKmsAggregatedMr {
        mr: B256,
    },
    AddKmsDevice {
        device: B256,
    },
    RemoveKmsDevice {
        device: B256,
    },
    AddOsImageHash {
        image: B256,
    },
    RemoveOsImageHash {
        image: B256,
    },
    SetKmsInfo,
    SetKmsQuote,
    SetKmsEventlog,
    SetGatewayAppId {
        id: String,
    },
    SetAppImplementation {
        implementation: Address,
    },
    RegisterApp {
        app: Address,
    },
    DeployAndRegisterApp {
        owner: Address,
        compose_hash: B256,
        device: B256,
    },
    AddComposeHash {
        hash: B256,
    },
    RemoveComposeHash {
        hash: B256,
    },
    AddDevice {
        device: B256,
    },
    RemoveDevice {
        device: B256,
    },
    SetAllowAnyDevice {
        allow: bool,
    },
    SetRequireTcbUpToDate {
        require: bool,
    },
    DisableUpgrades,
    /// A UUPS upgrade; `data` runs in the proxy's context.
    UpgradeToAndCall {
        implementation: Address,
        data_len: usize,
    },
    TransferOwnership {
        new_owner: Address,
    },
    AcceptOwnership,
    RenounceOwnership,
    AddOwnerWithThreshold {
        owner: Address,
        threshold: U256,
    },
    RemoveOwner {
        owner: Address,
        threshold: U256,
    },
    SwapOwner {
        old_owner: Address,
        new_owner: Address,
    },
    ChangeThreshold {
        threshold: U256,
    },
    EnableModule {
        module: Address,
    },
    DisableModule {
        module: Address,
    },
    SetGuard {
        guard: Address,
    },
    SetFallbackHandler {
        handler: Address,
    },
    ChangeMasterCopy {
        master_copy: Address,
    },
    ApproveHash {
        hash: B256,
    },
    /// A Safe transaction executed by this one (a nested Safe).
    ExecTransaction {
        call: Box<Decoded>,
    },
    MultiSend {
        calls: Vec<Decoded>,
    },
    /// Timelock `schedule` / `scheduleBatch`.
    Schedule {
        calls: Vec<Decoded>,
        predecessor: B256,
        salt: B256,
        delay: U256,
    },
    /// Timelock `execute` / `executeBatch`.
    Execute {
        calls: Vec<Decoded>,
        predecessor: B256,
        salt: B256,
    },
    Cancel {
        id: B256,
    },
    UpdateDelay {
        delay: U256,
    },
    GrantRole {
        role: B256,
        account: Address,
    },
    RevokeRole {
        role: B256,
        account: Address,
    },
    RenounceRole {
        role: B256,
        account: Address,
    },
    /// A function none of our ABIs knows.
    Unknown {
        selector: Option<FixedBytes<4>>,
        data_len: usize,
    },
}

/// Calldata that cannot be what it claims.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Nesting beyond [`MAX_DEPTH`].
    #[error("calls nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// More than [`MAX_CALLS`] calls.
    #[error("more than {MAX_CALLS} calls in one transaction")]
    TooManyCalls,
    /// Calldata beyond [`MAX_DATA`].
    #[error("calldata of {0} bytes exceeds {MAX_DATA}")]
    TooLarge(usize),
    /// A known function's arguments do not decode.
    #[error("{function}: arguments do not decode ({reason})")]
    Arguments {
        /// The function.
        function: &'static str,
        /// Why.
        reason: String,
    },
    /// A MultiSend item runs past the end of the packed list.
    #[error("multiSend item at byte {0} is truncated")]
    MultiSendItem(usize),
    /// A MultiSend item names an operation other than call or delegatecall.
    #[error("multiSend item at byte {offset}: {reason}")]
    MultiSendOperation {
        /// Byte offset of the item.
        offset: usize,
        /// Why.
        reason: String,
    },
    /// A batch's targets, values and payloads differ in count.
    #[error("{0}: targets, values and payloads differ in count")]
    BatchLengths(&'static str),
}

/// Decodes the call `data` to `to`, recursively.
pub fn decode(
    to: Address,
    value: U256,
    data: &[u8],
    operation: Operation,
) -> Result<Decoded, DecodeError> {
    let mut budget = MAX_CALLS;
    decode_at(to, value, data, operation, 0, &mut budget)
}

fn args<C: SolCall>(function: &'static str, data: &[u8]) -> Result<C, DecodeError> {
    C::abi_decode(data).map_err(|e| DecodeError::Arguments {
        function,
        reason: e.to_string(),
    })
}

/// Tries each function in turn by selector; `$body` maps the decoded call.
macro_rules! by_selector {
    ($selector:expr, $data:expr, { $($ty:ty => |$c:ident| $body:expr),* $(,)? }) => {
        $(
            if $selector == <$ty>::SELECTOR {
                let $c: $ty = args::<$ty>(<$ty>::SIGNATURE, $data)?;
                return Ok($body);
            }
        )*
    };
}

fn decode_at(
    to: Address,
    value: U256,
    data: &[u8],
    operation: Operation,
    depth: usize,
    budget: &mut usize,
) -> Result<Decoded, DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    *budget = budget.checked_sub(1).ok_or(DecodeError::TooManyCalls)?;
    if data.len() > MAX_DATA {
        return Err(DecodeError::TooLarge(data.len()));
    }
    let action = action(data, depth, budget)?;
    Ok(Decoded {
        to,
        value,
        operation,
        action,
    })
}

fn action(data: &[u8], depth: usize, budget: &mut usize) -> Result<Action, DecodeError> {
    use DstackApp as A;
    use DstackKms as K;
    use SafeL2 as S;
    use TimelockController as T;
    if data.is_empty() {
        return Ok(Action::Transfer);
    }
    let Some(selector) = data.get(..4).map(|s| [s[0], s[1], s[2], s[3]]) else {
        return Ok(Action::Unknown {
            selector: None,
            data_len: data.len(),
        });
    };
    let inner = |to: Address, value: U256, data: &[u8], budget: &mut usize| {
        decode_at(to, value, data, Operation::Call, depth + 1, budget)
    };
    by_selector!(selector, data, {
        K::addKmsAggregatedMrCall => |c| Action::AddKmsAggregatedMr { mr: c.mrAggregated },
        K::removeKmsAggregatedMrCall => |c| Action::RemoveKmsAggregatedMr { mr: c.mrAggregated },
        K::addKmsDeviceCall => |c| Action::AddKmsDevice { device: c.deviceId },
        K::removeKmsDeviceCall => |c| Action::RemoveKmsDevice { device: c.deviceId },
        K::addOsImageHashCall => |c| Action::AddOsImageHash { image: c.osImageHash },
        K::removeOsImageHashCall => |c| Action::RemoveOsImageHash { image: c.osImageHash },
        K::setKmsInfoCall => |_c| Action::SetKmsInfo,
        K::setKmsQuoteCall => |_c| Action::SetKmsQuote,
        K::setKmsEventlogCall => |_c| Action::SetKmsEventlog,
        K::setGatewayAppIdCall => |c| Action::SetGatewayAppId { id: c.appId },
        K::setAppImplementationCall => |c| Action::SetAppImplementation { implementation: c.implementation },
        K::registerAppCall => |c| Action::RegisterApp { app: c.appId },
        K::deployAndRegisterApp_0Call => |c| Action::DeployAndRegisterApp { owner: c.initialOwner, compose_hash: c.initialComposeHash, device: c.initialDeviceId },
        K::deployAndRegisterApp_1Call => |c| Action::DeployAndRegisterApp { owner: c.initialOwner, compose_hash: c.initialComposeHash, device: c.initialDeviceId },
        K::upgradeToAndCallCall => |c| Action::UpgradeToAndCall { implementation: c.newImplementation, data_len: c.data.len() },
        K::transferOwnershipCall => |c| Action::TransferOwnership { new_owner: c.newOwner },
        K::acceptOwnershipCall => |_c| Action::AcceptOwnership,
        K::renounceOwnershipCall => |_c| Action::RenounceOwnership,
        A::addComposeHashCall => |c| Action::AddComposeHash { hash: c.composeHash },
        A::removeComposeHashCall => |c| Action::RemoveComposeHash { hash: c.composeHash },
        A::addDeviceCall => |c| Action::AddDevice { device: c.deviceId },
        A::removeDeviceCall => |c| Action::RemoveDevice { device: c.deviceId },
        A::setAllowAnyDeviceCall => |c| Action::SetAllowAnyDevice { allow: c.allowAny },
        A::setRequireTcbUpToDateCall => |c| Action::SetRequireTcbUpToDate { require: c.requireUpToDate },
        A::disableUpgradesCall => |_c| Action::DisableUpgrades,
        S::addOwnerWithThresholdCall => |c| Action::AddOwnerWithThreshold { owner: c.owner, threshold: c._threshold },
        S::removeOwnerCall => |c| Action::RemoveOwner { owner: c.owner, threshold: c._threshold },
        S::swapOwnerCall => |c| Action::SwapOwner { old_owner: c.oldOwner, new_owner: c.newOwner },
        S::changeThresholdCall => |c| Action::ChangeThreshold { threshold: c._threshold },
        S::enableModuleCall => |c| Action::EnableModule { module: c.module },
        S::disableModuleCall => |c| Action::DisableModule { module: c.module },
        S::setGuardCall => |c| Action::SetGuard { guard: c.guard },
        S::setFallbackHandlerCall => |c| Action::SetFallbackHandler { handler: c.handler },
        legacy::changeMasterCopyCall => |c| Action::ChangeMasterCopy { master_copy: c._masterCopy },
        S::approveHashCall => |c| Action::ApproveHash { hash: c.hashToApprove },
        T::cancelCall => |c| Action::Cancel { id: c.id },
        T::updateDelayCall => |c| Action::UpdateDelay { delay: c.newDelay },
        T::grantRoleCall => |c| Action::GrantRole { role: c.role, account: c.account },
        T::revokeRoleCall => |c| Action::RevokeRole { role: c.role, account: c.account },
        T::renounceRoleCall => |c| Action::RenounceRole { role: c.role, account: c.callerConfirmation },
    });
    if selector == S::execTransactionCall::SELECTOR {
        let c: S::execTransactionCall = args("execTransaction", data)?;
        let operation = Operation::try_from(c.operation).map_err(|e| DecodeError::Arguments {
            function: "execTransaction",
            reason: e.to_string(),
        })?;
        let call = decode_at(c.to, c.value, &c.data, operation, depth + 1, budget)?;
        return Ok(Action::ExecTransaction {
            call: Box::new(call),
        });
    }
    if selector == MultiSend::multiSendCall::SELECTOR {
        let c: MultiSend::multiSendCall = args("multiSend", data)?;
        return Ok(Action::MultiSend {
            calls: multi_send_items(&c.transactions, depth, budget)?,
        });
    }
    if selector == T::scheduleCall::SELECTOR {
        let c: T::scheduleCall = args("schedule", data)?;
        return Ok(Action::Schedule {
            calls: vec![inner(c.target, c.value, &c.data, budget)?],
            predecessor: c.predecessor,
            salt: c.salt,
            delay: c.delay,
        });
    }
    if selector == T::scheduleBatchCall::SELECTOR {
        let c: T::scheduleBatchCall = args("scheduleBatch", data)?;
        return Ok(Action::Schedule {
            calls: batch(
                "scheduleBatch",
                &c.targets,
                &c.values,
                &c.payloads,
                |t, v, d, b| inner(t, v, d, b),
                budget,
            )?,
            predecessor: c.predecessor,
            salt: c.salt,
            delay: c.delay,
        });
    }
    if selector == T::executeCall::SELECTOR {
        let c: T::executeCall = args("execute", data)?;
        return Ok(Action::Execute {
            calls: vec![inner(c.target, c.value, &c.payload, budget)?],
            predecessor: c.predecessor,
            salt: c.salt,
        });
    }
    if selector == T::executeBatchCall::SELECTOR {
        let c: T::executeBatchCall = args("executeBatch", data)?;
        return Ok(Action::Execute {
            calls: batch(
                "executeBatch",
                &c.targets,
                &c.values,
                &c.payloads,
                |t, v, d, b| inner(t, v, d, b),
                budget,
            )?,
            predecessor: c.predecessor,
            salt: c.salt,
        });
    }
    Ok(Action::Unknown {
        selector: Some(FixedBytes(selector)),
        data_len: data.len(),
    })
}

fn batch(
    function: &'static str,
    targets: &[Address],
    values: &[U256],
    payloads: &[Bytes],
    mut each: impl FnMut(Address, U256, &[u8], &mut usize) -> Result<Decoded, DecodeError>,
    budget: &mut usize,
) -> Result<Vec<Decoded>, DecodeError> {
    if targets.len() != values.len() || targets.len() != payloads.len() {
        return Err(DecodeError::BatchLengths(function));
    }
    targets
        .iter()
        .zip(values)
        .zip(payloads)
        .map(|((t, v), d)| each(*t, *v, d, budget))
        .collect()
}

/// MultiSend's packed list: `operation (1) ‖ to (20) ‖ value (32) ‖ length (32) ‖ data`.
fn multi_send_items(
    packed: &[u8],
    depth: usize,
    budget: &mut usize,
) -> Result<Vec<Decoded>, DecodeError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < packed.len() {
        let header = packed
            .get(at..at + 85)
            .ok_or(DecodeError::MultiSendItem(at))?;
        let operation =
            Operation::try_from(header[0]).map_err(|e| DecodeError::MultiSendOperation {
                offset: at,
                reason: e.to_string(),
            })?;
        let to = Address::from_slice(&header[1..21]);
        let value = U256::from_be_slice(&header[21..53]);
        let len = usize::try_from(U256::from_be_slice(&header[53..85]))
            .map_err(|_| DecodeError::MultiSendItem(at))?;
        let start = at + 85;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= packed.len())
            .ok_or(DecodeError::MultiSendItem(at))?;
        out.push(decode_at(
            to,
            value,
            &packed[start..end],
            operation,
            depth + 1,
            budget,
        )?);
        at = end;
    }
    Ok(out)
}

impl Decoded {
    /// Plain-language lines, one per call, nested calls indented beneath their parent.
    pub fn words(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.words_into(0, &mut out);
        out
    }

    fn words_into(&self, indent: usize, out: &mut Vec<String>) {
        let pad = "  ".repeat(indent);
        let via = match self.operation {
            Operation::Call => "",
            Operation::DelegateCall => "DELEGATECALL ",
        };
        let value = if self.value.is_zero() {
            String::new()
        } else {
            format!(" sending {} wei", self.value)
        };
        out.push(format!(
            "{pad}{via}{}: {}{value}",
            self.to,
            self.action.words()
        ));
        for child in self.action.children() {
            child.words_into(indent + 1, out);
        }
    }

    /// This call and every call beneath it, depth first.
    pub fn walk(&self) -> Vec<&Decoded> {
        let mut out = vec![self];
        for c in self.action.children() {
            out.extend(c.walk());
        }
        out
    }
}

impl Action {
    /// The calls nested in this one.
    pub fn children(&self) -> &[Decoded] {
        match self {
            Self::ExecTransaction { call } => std::slice::from_ref(call),
            Self::MultiSend { calls }
            | Self::Schedule { calls, .. }
            | Self::Execute { calls, .. } => calls,
            _ => &[],
        }
    }

    /// What the function does, in words.
    pub fn words(&self) -> String {
        match self {
            Self::Transfer => "plain transfer".into(),
            Self::AddKmsAggregatedMr { mr } => format!("allow KMS aggregated MR {mr}"),
            Self::RemoveKmsAggregatedMr { mr } => format!("REMOVE KMS aggregated MR {mr}"),
            Self::AddKmsDevice { device } => format!("allow KMS device {device}"),
            Self::RemoveKmsDevice { device } => format!("REMOVE KMS device {device}"),
            Self::AddOsImageHash { image } => format!("allow OS image {image}"),
            Self::RemoveOsImageHash { image } => format!("REMOVE OS image {image}"),
            Self::SetKmsInfo => "replace the KMS info (root keys, quote, event log)".into(),
            Self::SetKmsQuote => "replace the KMS quote".into(),
            Self::SetKmsEventlog => "replace the KMS event log".into(),
            Self::SetGatewayAppId { id } => format!("set the gateway app id to {id:?}"),
            Self::SetAppImplementation { implementation } => {
                format!("set the implementation of new apps to {implementation}")
            }
            Self::RegisterApp { app } => format!("register app {app}"),
            Self::DeployAndRegisterApp {
                owner,
                compose_hash,
                device,
            } => format!(
                "deploy and register an app owned by {owner} (compose hash {compose_hash}, device {device})"
            ),
            Self::AddComposeHash { hash } => format!("allow compose hash {hash}"),
            Self::RemoveComposeHash { hash } => format!("REMOVE compose hash {hash}"),
            Self::AddDevice { device } => format!("allow device {device}"),
            Self::RemoveDevice { device } => format!("REMOVE device {device}"),
            Self::SetAllowAnyDevice { allow } => format!("set allowAnyDevice to {allow}"),
            Self::SetRequireTcbUpToDate { require } => {
                format!("set requireTcbUpToDate to {require}")
            }
            Self::DisableUpgrades => "disable upgrades for good".into(),
            Self::UpgradeToAndCall {
                implementation,
                data_len,
            } => format!(
                "UPGRADE the proxy to {implementation} (then run {data_len} bytes of calldata in its context)"
            ),
            Self::TransferOwnership { new_owner } => {
                format!("start transferring ownership to {new_owner}")
            }
            Self::AcceptOwnership => "accept a pending ownership transfer".into(),
            Self::RenounceOwnership => "RENOUNCE ownership (no owner afterwards)".into(),
            Self::AddOwnerWithThreshold { owner, threshold } => {
                format!("add Safe owner {owner}, threshold {threshold}")
            }
            Self::RemoveOwner { owner, threshold } => {
                format!("REMOVE Safe owner {owner}, threshold {threshold}")
            }
            Self::SwapOwner {
                old_owner,
                new_owner,
            } => format!("replace Safe owner {old_owner} by {new_owner}"),
            Self::ChangeThreshold { threshold } => format!("set the Safe threshold to {threshold}"),
            Self::EnableModule { module } => {
                format!("ENABLE module {module} (it can execute without signatures)")
            }
            Self::DisableModule { module } => format!("disable module {module}"),
            Self::SetGuard { guard } => format!("set the transaction guard to {guard}"),
            Self::SetFallbackHandler { handler } => {
                format!("set the fallback handler to {handler}")
            }
            Self::ChangeMasterCopy { master_copy } => {
                format!("CHANGE the Safe's master copy to {master_copy}")
            }
            Self::ApproveHash { hash } => format!("approve Safe transaction hash {hash}"),
            Self::ExecTransaction { .. } => "execute a transaction of this Safe:".into(),
            Self::MultiSend { calls } => format!("multiSend of {} calls:", calls.len()),
            Self::Schedule { calls, delay, .. } => format!(
                "schedule {} call(s) in the timelock, executable after {delay} s:",
                calls.len()
            ),
            Self::Execute { calls, .. } => {
                format!("execute {} scheduled call(s) of the timelock:", calls.len())
            }
            Self::Cancel { id } => format!("cancel timelock operation {id}"),
            Self::UpdateDelay { delay } => format!("set the timelock's minimum delay to {delay} s"),
            Self::GrantRole { role, account } => {
                format!("GRANT timelock role {} to {account}", role_name(*role))
            }
            Self::RevokeRole { role, account } => {
                format!("REVOKE timelock role {} from {account}", role_name(*role))
            }
            Self::RenounceRole { role, account } => {
                format!("renounce timelock role {} of {account}", role_name(*role))
            }
            Self::Unknown {
                selector: Some(s),
                data_len,
            } => format!("unknown function {s} ({data_len} bytes of calldata)"),
            Self::Unknown {
                selector: None,
                data_len,
            } => format!("{data_len} bytes of calldata that name no function"),
        }
    }
}

/// TimelockController's role names.
pub fn role_name(role: B256) -> String {
    const PROPOSER: B256 = alloy::primitives::b256!(
        "b09aa5aeb3702cfd50b6b62bc4532604938f21248a27a1d5ca736082b6819cc1"
    );
    const EXECUTOR: B256 = alloy::primitives::b256!(
        "d8aa0f3194971a2a116679f7c2090f6939c8d4e01a2a8d7e41d55e5351469e63"
    );
    const CANCELLER: B256 = alloy::primitives::b256!(
        "fd643c72710c63c0180259aba6b2d05451e3591a24e58b62239378085726f783"
    );
    match role {
        PROPOSER => "PROPOSER".into(),
        EXECUTOR => "EXECUTOR".into(),
        CANCELLER => "CANCELLER".into(),
        r if r.is_zero() => "DEFAULT_ADMIN".into(),
        r => r.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pack(items: &[(u8, Address, U256, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (op, to, value, data) in items {
            out.push(*op);
            out.extend_from_slice(to.as_slice());
            out.extend_from_slice(&value.to_be_bytes::<32>());
            out.extend_from_slice(&U256::from(data.len()).to_be_bytes::<32>());
            out.extend_from_slice(data);
        }
        out
    }

    const KMS: Address = Address::repeat_byte(0x0a);
    const APP: Address = Address::repeat_byte(0x0b);
    const TIMELOCK: Address = Address::repeat_byte(0x0c);
    const MULTISEND: Address = Address::repeat_byte(0x0d);

    #[test]
    fn a_multisend_of_a_timelock_schedule_is_decoded_down_to_the_app_call() {
        let remove = DstackApp::removeComposeHashCall {
            composeHash: B256::repeat_byte(0x29),
        }
        .abi_encode();
        let schedule = TimelockController::scheduleCall {
            target: APP,
            value: U256::ZERO,
            data: remove.into(),
            predecessor: B256::ZERO,
            salt: B256::ZERO,
            delay: U256::from(86400),
        }
        .abi_encode();
        let add_image = DstackKms::addOsImageHashCall {
            osImageHash: B256::repeat_byte(1),
        }
        .abi_encode();
        let packed = pack(&[
            (0, TIMELOCK, U256::ZERO, schedule),
            (0, KMS, U256::ZERO, add_image),
        ]);
        let data = MultiSend::multiSendCall {
            transactions: packed.into(),
        }
        .abi_encode();
        let d = decode(MULTISEND, U256::ZERO, &data, Operation::DelegateCall).unwrap();
        let Action::MultiSend { calls } = &d.action else {
            panic!("{d:?}")
        };
        assert_eq!(calls.len(), 2);
        let Action::Schedule {
            calls: inner,
            delay,
            ..
        } = &calls[0].action
        else {
            panic!("{:?}", calls[0])
        };
        assert_eq!(*delay, U256::from(86400));
        assert_eq!(
            inner[0],
            Decoded {
                to: APP,
                value: U256::ZERO,
                operation: Operation::Call,
                action: Action::RemoveComposeHash {
                    hash: B256::repeat_byte(0x29)
                },
            }
        );
        assert_eq!(
            calls[1].action,
            Action::AddOsImageHash {
                image: B256::repeat_byte(1)
            }
        );
        assert_eq!(d.walk().len(), 4);
        let words = d.words();
        assert_eq!(words.len(), 4);
        assert!(words[0].starts_with("DELEGATECALL"));
        assert!(words[2].starts_with("    ") && words[2].contains("REMOVE compose hash"));
    }

    #[test]
    fn hostile_calldata_gets_a_typed_error() {
        // A known selector with arguments that do not decode.
        let bad = [
            DstackApp::removeComposeHashCall::SELECTOR.as_slice(),
            &[1, 2, 3],
        ]
        .concat();
        assert!(matches!(
            decode(APP, U256::ZERO, &bad, Operation::Call),
            Err(DecodeError::Arguments { .. })
        ));
        // A MultiSend item whose length runs past the end.
        let mut packed = pack(&[(0, KMS, U256::ZERO, vec![1, 2, 3, 4])]);
        packed.truncate(packed.len() - 1);
        let data = MultiSend::multiSendCall {
            transactions: packed.into(),
        }
        .abi_encode();
        assert_eq!(
            decode(MULTISEND, U256::ZERO, &data, Operation::DelegateCall),
            Err(DecodeError::MultiSendItem(0))
        );
        // An operation that is neither call nor delegatecall.
        let data = MultiSend::multiSendCall {
            transactions: pack(&[(2, KMS, U256::ZERO, vec![])]).into(),
        }
        .abi_encode();
        assert!(matches!(
            decode(MULTISEND, U256::ZERO, &data, Operation::DelegateCall),
            Err(DecodeError::MultiSendOperation { offset: 0, .. })
        ));
        // MultiSends nested beyond the depth bound.
        let mut data = DstackKms::acceptOwnershipCall {}.abi_encode();
        for _ in 0..=MAX_DEPTH {
            data = MultiSend::multiSendCall {
                transactions: pack(&[(1, MULTISEND, U256::ZERO, data)]).into(),
            }
            .abi_encode();
        }
        assert_eq!(
            decode(MULTISEND, U256::ZERO, &data, Operation::DelegateCall),
            Err(DecodeError::TooDeep)
        );
        // Too many calls.
        let items: Vec<_> = (0..MAX_CALLS)
            .map(|_| (0u8, KMS, U256::ZERO, vec![]))
            .collect();
        let data = MultiSend::multiSendCall {
            transactions: pack(&items).into(),
        }
        .abi_encode();
        assert_eq!(
            decode(MULTISEND, U256::ZERO, &data, Operation::DelegateCall),
            Err(DecodeError::TooManyCalls)
        );
    }

    #[test]
    fn unknown_functions_and_transfers_are_kept_as_such() {
        assert_eq!(
            decode(KMS, U256::from(1), &[], Operation::Call)
                .unwrap()
                .action,
            Action::Transfer
        );
        assert_eq!(
            decode(
                KMS,
                U256::ZERO,
                &[0xde, 0xad, 0xbe, 0xef, 0],
                Operation::Call
            )
            .unwrap()
            .action,
            Action::Unknown {
                selector: Some(FixedBytes([0xde, 0xad, 0xbe, 0xef])),
                data_len: 5
            }
        );
        assert_eq!(
            decode(KMS, U256::ZERO, &[0xde], Operation::Call)
                .unwrap()
                .action,
            Action::Unknown {
                selector: None,
                data_len: 1
            }
        );
        assert_eq!(role_name(B256::ZERO), "DEFAULT_ADMIN");
    }

    proptest! {
        #[test]
        fn the_decoder_never_panics_on_arbitrary_calldata(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(KMS, U256::ZERO, &data, Operation::Call);
        }

        #[test]
        fn multisend_never_panics_on_arbitrary_packed_lists(packed in proptest::collection::vec(any::<u8>(), 0..600)) {
            let data = MultiSend::multiSendCall { transactions: packed.into() }.abi_encode();
            let _ = decode(MULTISEND, U256::ZERO, &data, Operation::DelegateCall);
        }

        #[test]
        fn known_selectors_with_arbitrary_arguments_never_panic(which in 0usize..6, tail in proptest::collection::vec(any::<u8>(), 0..400)) {
            let selector = [
                MultiSend::multiSendCall::SELECTOR,
                TimelockController::scheduleBatchCall::SELECTOR,
                TimelockController::executeBatchCall::SELECTOR,
                SafeL2::execTransactionCall::SELECTOR,
                DstackKms::setKmsInfoCall::SELECTOR,
                TimelockController::scheduleCall::SELECTOR,
            ][which];
            let data = [selector.as_slice(), &tail].concat();
            let _ = decode(KMS, U256::ZERO, &data, Operation::Call);
        }
    }
}
