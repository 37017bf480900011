//! Pending Safe proposals, checked locally: nothing the Transaction Service says is taken on
//! trust.
//!
//! Flow: a [`TxRow`] from the service and what the chain says of its Safe ([`SafeState`]) →
//! [`check`]: the safeTxHash recomputed for the Safe's version (a difference is critical); each
//! confirmation's signature recovered against our hash and its owner checked against the current
//! owners (forged or non-owner: critical; an approved hash counts only when the chain shows the
//! approval; a contract signature is not counted, since only the chain can check it); the
//! proposer an owner or a configured delegate (otherwise a warning); the service's `dataDecoded`
//! compared with our own decoding (missing: a warning; different: critical); the calls
//! classified → [`Proposal`]. Pure: usage counts come in through [`Usage`].

use alloy::primitives::{Address, B256, Bytes, U256};
use serde::Serialize;

use super::classify::{self, Context, Finding, Rule, Severity, Usage};
use super::decode::{self, Action, Decoded};
use super::metrics::QueueSummary;
use super::safe_tx::{self, Operation, SafeTx};
use super::signatures::{self, SignatureKind};
use super::state::{GovernanceState, SafeState};
use super::txservice::TxRow;

/// One pending proposal, as checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Proposal {
    /// The Safe.
    pub safe: Address,
    /// Its nonce.
    pub nonce: u64,
    /// The safeTxHash we computed (the service's is checked against it).
    pub safe_tx_hash: B256,
    /// The transaction.
    pub transaction: SafeTx,
    /// Who proposed it.
    pub proposer: Option<Address>,
    /// When (Unix seconds), as the service says.
    pub submitted_at: Option<i64>,
    /// Owners whose confirmation holds.
    pub confirmed_by: Vec<Address>,
    /// When each of those confirmed (Unix seconds), where the service says.
    pub confirmed_at: Vec<(Address, i64)>,
    /// The Safe's threshold.
    pub threshold: u64,
    /// The calls in words.
    pub words: Vec<String>,
    /// Findings, worst first.
    pub findings: Vec<Finding>,
}

impl Proposal {
    /// Whether it has the confirmations to execute.
    pub fn executable(&self) -> bool {
        self.threshold > 0 && self.confirmed_by.len() as u64 >= self.threshold
    }

    /// The worst severity found.
    pub fn worst(&self) -> Severity {
        self.findings
            .iter()
            .map(|f| f.severity)
            .max()
            .unwrap_or(Severity::Info)
    }

    /// The most instances one of its removals would cut off.
    pub fn affected(&self) -> u64 {
        self.findings
            .iter()
            .filter_map(|f| f.affected_instances)
            .max()
            .unwrap_or(0)
    }
}

fn finding(rule: Rule, severity: Severity, detail: String) -> Finding {
    Finding {
        rule,
        severity,
        detail,
        affected_instances: None,
    }
}

/// Whether the service's `method` names what we decoded (`None`: we cannot tell).
fn same_method(action: &Action, method: &str) -> Option<bool> {
    let ours = match action {
        Action::Unknown { .. } | Action::Transfer => return None,
        Action::Schedule { .. } => return Some(matches!(method, "schedule" | "scheduleBatch")),
        Action::Execute { .. } => return Some(matches!(method, "execute" | "executeBatch")),
        Action::DeployAndRegisterApp { .. } => "deployAndRegisterApp",
        other => {
            return serde_json::to_value(other)
                .ok()
                .and_then(|v| v["function"].as_str().map(|f| f == method));
        }
    };
    Some(ours == method)
}

/// The transaction a row describes.
pub fn transaction(row: &TxRow) -> Result<SafeTx, safe_tx::SafeTxError> {
    Ok(SafeTx {
        to: row.to,
        value: row.value,
        data: row.data.clone(),
        operation: Operation::try_from(row.operation)?,
        safe_tx_gas: row.safe_tx_gas,
        base_gas: row.base_gas,
        gas_price: row.gas_price,
        gas_token: row.gas_token,
        refund_receiver: row.refund_receiver,
        nonce: U256::from(row.nonce),
    })
}

/// One contract owner's signature (EIP-1271) on a row, which only the chain can check: the
/// owner's `isValidSignature(preimage, data)` must answer the magic value, as the Safe asks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContractSignature {
    /// The contract owner.
    pub owner: Address,
    /// What the Safe hands it: `0x19 ‖ 0x01 ‖ domain ‖ message` of the transaction.
    pub preimage: Bytes,
    /// The signature data the confirmation carries for it.
    pub data: Bytes,
}

/// The contract signatures among `row`'s confirmations, for the chain to check before [`check`]
/// (none while the Safe's version, and so its hashes, are unknown).
pub fn contract_signatures(row: &TxRow, chain_id: u64, safe: &SafeState) -> Vec<ContractSignature> {
    let (Ok(tx), Some(version)) = (
        transaction(row),
        safe.version.as_deref().and_then(|v| v.parse().ok()),
    ) else {
        return Vec::new();
    };
    let h = safe_tx::hashes(chain_id, row.safe, version, &tx);
    let preimage = Bytes::from(safe_tx::preimage(h.domain_hash, h.message_hash));
    row.confirmations
        .iter()
        .filter(|c| c.signature_type == "CONTRACT_SIGNATURE")
        .filter_map(|c| {
            match signatures::split(&c.signature, h.safe_tx_hash)
                .ok()?
                .as_slice()
            {
                [item] if item.owner == c.owner && item.kind == SignatureKind::Contract => {
                    Some(ContractSignature {
                        owner: c.owner,
                        preimage: preimage.clone(),
                        data: item.contract_data.clone()?,
                    })
                }
                _ => None,
            }
        })
        .collect()
}

/// Checks `row` of the Safe whose on-chain state is `safe` on `chain_id`. `contracts` holds the
/// chain's answer for each contract signature (see [`contract_signatures`]): an owner absent
/// from it could not be asked.
pub fn check(
    row: &TxRow,
    chain_id: u64,
    safe: &SafeState,
    delegates: &[Address],
    contracts: &std::collections::BTreeMap<Address, bool>,
    ctx: &Context<'_>,
) -> Result<Proposal, safe_tx::SafeTxError> {
    let tx = transaction(row)?;
    let mut findings = Vec::new();
    let version = safe.version.as_deref().and_then(|v| v.parse().ok());
    let hash = match version {
        Some(v) => {
            let ours = safe_tx::hashes(chain_id, row.safe, v, &tx).safe_tx_hash;
            if ours != row.safe_tx_hash {
                findings.push(finding(
                    Rule::SafeTxHashMismatch,
                    Severity::Critical,
                    format!(
                        "the Transaction Service says safeTxHash {} but these fields hash to {ours} for Safe {} {}: what signers would sign is not what is shown",
                        row.safe_tx_hash, row.safe, v
                    ),
                ));
            }
            ours
        }
        None => {
            findings.push(finding(
                Rule::SafeTxHashMismatch,
                Severity::Warning,
                "the Safe's version is not known yet: its safeTxHash was not recomputed".into(),
            ));
            row.safe_tx_hash
        }
    };
    let mut confirmed_by: Vec<Address> = Vec::new();
    let mut confirmed_at: Vec<(Address, i64)> = Vec::new();
    for c in &row.confirmations {
        let counted = match c.signature_type.as_str() {
            "APPROVED_HASH" => {
                if safe.approvals.contains(&(hash, c.owner)) {
                    true
                } else {
                    findings.push(finding(
                        Rule::InvalidSignature,
                        Severity::Warning,
                        format!("{} is said to have approved the hash on-chain; no such approval is seen yet (not counted)", c.owner),
                    ));
                    false
                }
            }
            "CONTRACT_SIGNATURE" => match contracts.get(&c.owner) {
                Some(true) => true,
                Some(false) => {
                    findings.push(finding(
                        Rule::InvalidSignature,
                        Severity::Critical,
                        format!(
                            "the contract signature said to be from {} is refused by that contract (EIP-1271 isValidSignature): forged, or for another transaction",
                            c.owner
                        ),
                    ));
                    false
                }
                None => {
                    findings.push(finding(
                        Rule::InvalidSignature,
                        Severity::Info,
                        format!("{} signed as a contract (EIP-1271): only the chain can check it, and it could not be asked (not counted)", c.owner),
                    ));
                    false
                }
            },
            _ => match signatures::split(&c.signature, hash).as_deref() {
                Ok([item])
                    if item.owner == c.owner
                        && matches!(item.kind, SignatureKind::Eoa | SignatureKind::EthSign) =>
                {
                    true
                }
                Ok(items) => {
                    findings.push(finding(
                        Rule::InvalidSignature,
                        Severity::Critical,
                        format!(
                            "the confirmation said to be from {} is signed by {}: forged, or for another transaction",
                            c.owner,
                            items.first().map_or_else(|| "nobody".to_owned(), |i| i.owner.to_string())
                        ),
                    ));
                    false
                }
                Err(e) => {
                    findings.push(finding(
                        Rule::InvalidSignature,
                        Severity::Critical,
                        format!(
                            "the confirmation said to be from {} is not a valid signature: {e}",
                            c.owner
                        ),
                    ));
                    false
                }
            },
        };
        if counted && !safe.owners.contains(&c.owner) {
            findings.push(finding(
                Rule::NonOwnerSignature,
                Severity::Critical,
                format!(
                    "{} confirmed but is not an owner of Safe {}",
                    c.owner, row.safe
                ),
            ));
        } else if counted && !confirmed_by.contains(&c.owner) {
            confirmed_by.push(c.owner);
            if let Some(at) = c.submission_date.as_deref().and_then(unix_secs) {
                confirmed_at.push((c.owner, at));
            }
        }
    }
    if let Some(p) = row.proposer
        && !safe.owners.contains(&p)
        && !delegates.contains(&p)
    {
        findings.push(finding(
            Rule::UnknownProposer,
            Severity::Warning,
            format!("proposed by {p}, neither an owner nor a configured delegate"),
        ));
    }
    let decoded: Result<Decoded, _> = decode::decode(tx.to, tx.value, &tx.data, tx.operation);
    match (&row.data_decoded, &decoded) {
        (None, _) if !tx.data.is_empty() => findings.push(finding(
            Rule::ApiDecodingMissing,
            Severity::Warning,
            "the Transaction Service gives no decoding of the calldata (it does not trust the target): decoded here".into(),
        )),
        (Some(api), Ok(d)) if same_method(&d.action, &api.method) == Some(false) => {
            findings.push(finding(
                Rule::ApiDecodingMismatch,
                Severity::Critical,
                format!(
                    "the Transaction Service shows {:?} but the calldata is {}",
                    api.method,
                    d.action.words()
                ),
            ));
        }
        _ => {}
    }
    findings.extend(classify::classify(&tx, &decoded, ctx));
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    Ok(Proposal {
        safe: row.safe,
        nonce: row.nonce,
        safe_tx_hash: hash,
        words: decoded.as_ref().map(Decoded::words).unwrap_or_default(),
        transaction: tx,
        proposer: row.proposer,
        submitted_at: row.submission_date.as_deref().and_then(unix_secs),
        confirmed_by,
        confirmed_at,
        threshold: safe.threshold,
        findings,
    })
}

/// The summary of `pending` exported as metrics, their ages counted to `now` (Unix seconds).
pub fn summary(pending: &[&Proposal], now: i64) -> QueueSummary {
    let mut missing_confirmations = [0usize; 4];
    for p in pending {
        let have = u64::try_from(p.confirmed_by.len()).unwrap_or(u64::MAX);
        let missing = usize::try_from(p.threshold.saturating_sub(have)).unwrap_or(usize::MAX);
        missing_confirmations[missing.min(missing_confirmations.len() - 1)] += 1;
    }
    QueueSummary {
        pending: pending.len(),
        executable: pending.iter().filter(|p| p.executable()).count(),
        oldest_age: pending
            .iter()
            .filter_map(|p| p.submitted_at)
            .min()
            .map_or(0, |t| now.saturating_sub(t).max(0)),
        missing_confirmations,
    }
}

/// Signer participation: the lowest share, among the Safes followed, of current owners who
/// signed anything at or after `since` (Unix seconds): an on-chain approval or execution
/// signature, or a verified confirmation of a `pending` proposal. `None` when no Safe is followed.
pub fn participation(state: &GovernanceState, pending: &[&Proposal], since: i64) -> Option<f64> {
    let mut confirmed: std::collections::HashMap<Address, std::collections::BTreeSet<Address>> =
        std::collections::HashMap::new();
    for p in pending {
        for (owner, at) in &p.confirmed_at {
            if *at >= since {
                confirmed.entry(p.safe).or_default().insert(*owner);
            }
        }
    }
    state
        .safes
        .iter()
        .filter(|(_, s)| s.version.is_some() && !s.owners.is_empty())
        .map(|(address, s)| {
            let mut signed: std::collections::BTreeSet<Address> = s
                .owners_signed_since(u64::try_from(since).unwrap_or(0))
                .collect();
            signed.extend(
                confirmed
                    .get(address)
                    .into_iter()
                    .flatten()
                    .filter(|owner| s.owners.contains(owner)),
            );
            signed.len() as f64 / s.owners.len() as f64
        })
        .reduce(f64::min)
}

/// An RFC 3339 date of the service in Unix seconds.
fn unix_secs(date: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(date).ok()?;
    i64::try_from(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs()).ok()
}

/// Findings across one Safe's pending proposals: several for one nonce (only one can execute).
pub fn conflicts(proposals: &[Proposal]) -> Vec<(u64, usize)> {
    let mut by_nonce: std::collections::BTreeMap<u64, usize> = std::collections::BTreeMap::new();
    for p in proposals {
        *by_nonce.entry(p.nonce).or_default() += 1;
    }
    by_nonce.into_iter().filter(|(_, n)| *n > 1).collect()
}

/// The usage `ctx` needs for `row`'s removals (what the caller counts before [`check`]).
pub fn removals(row: &TxRow) -> Vec<classify::Measurement> {
    match transaction(row) {
        Ok(tx) => decode::decode(tx.to, tx.value, &tx.data, tx.operation)
            .map(|d| classify::removals(&d))
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// Makes the [`Context`] a Safe's proposals are classified in.
pub fn context<'a>(
    safe: Address,
    state: &SafeState,
    min_delay: &'a dyn Fn(Address) -> Option<U256>,
    usage: &'a dyn Usage,
    window: &'a str,
) -> Context<'a> {
    Context {
        safe,
        threshold: Some(U256::from(state.threshold)),
        min_delay,
        usage,
        window,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::contracts::DstackApp;
    use crate::governance::classify::UsageUnknown;
    use crate::governance::txservice::{Confirmation, DataDecoded};
    use alloy::primitives::Bytes;
    use alloy::signers::SignerSync;
    use alloy::signers::local::PrivateKeySigner;
    use alloy::sol_types::SolCall;

    const SAFE: Address = Address::repeat_byte(0x5a);
    const APP: Address = Address::repeat_byte(0x0b);

    fn owner(i: u8) -> PrivateKeySigner {
        PrivateKeySigner::from_bytes(&B256::repeat_byte(i)).unwrap()
    }

    fn setup() -> (SafeState, TxRow) {
        let mut state = SafeState::default();
        state.version = Some("1.4.1".into());
        state.owners = vec![owner(1).address(), owner(2).address()];
        state.threshold = 2;
        let data = DstackApp::addComposeHashCall {
            composeHash: B256::repeat_byte(4),
        }
        .abi_encode();
        let mut row = TxRow {
            safe: SAFE,
            to: APP,
            value: U256::ZERO,
            data: Bytes::from(data),
            operation: 0,
            gas_token: Address::ZERO,
            safe_tx_gas: U256::ZERO,
            base_gas: U256::ZERO,
            gas_price: U256::ZERO,
            refund_receiver: Address::ZERO,
            nonce: 3,
            safe_tx_hash: B256::ZERO,
            proposer: Some(owner(1).address()),
            submission_date: Some("2026-11-29T10:00:00Z".into()),
            is_executed: false,
            data_decoded: Some(DataDecoded {
                method: "addComposeHash".into(),
            }),
            confirmations: Vec::new(),
        };
        let tx = transaction(&row).unwrap();
        row.safe_tx_hash = safe_tx::hashes(1, SAFE, "1.4.1".parse().unwrap(), &tx).safe_tx_hash;
        (state, row)
    }

    fn confirm(row: &mut TxRow, signer: &PrivateKeySigner, claimed: Address) {
        let sig = signer.sign_hash_sync(&row.safe_tx_hash).unwrap();
        row.confirmations.push(Confirmation {
            owner: claimed,
            signature: Bytes::from(sig.as_bytes().to_vec()),
            signature_type: "EOA".into(),
            submission_date: Some("2026-11-29T11:00:00Z".into()),
        });
    }

    fn run(state: &SafeState, row: &TxRow) -> Proposal {
        let none = |_: Address| None;
        let ctx = context(SAFE, state, &none, &UsageUnknown, "7 days");
        check(row, 1, state, &[], &Default::default(), &ctx).unwrap()
    }

    fn rules(p: &Proposal) -> Vec<(Rule, Severity)> {
        p.findings.iter().map(|f| (f.rule, f.severity)).collect()
    }

    #[test]
    fn an_honest_proposal_confirmed_by_both_owners_is_executable_with_no_warning() {
        let (state, mut row) = setup();
        confirm(&mut row, &owner(1), owner(1).address());
        confirm(&mut row, &owner(2), owner(2).address());
        let p = run(&state, &row);
        assert!(p.executable());
        assert_eq!(rules(&p), vec![(Rule::Addition, Severity::Info)]);
        assert_eq!(p.submitted_at, Some(1_795_946_400));
        let at = 1_795_950_000;
        assert_eq!(
            p.confirmed_at,
            vec![(owner(1).address(), at), (owner(2).address(), at)]
        );
    }

    #[test]
    fn the_summary_buckets_proposals_by_missing_confirmations() {
        let (state, mut row) = setup();
        let none = run(&state, &row);
        confirm(&mut row, &owner(1), owner(1).address());
        let one = run(&state, &row);
        confirm(&mut row, &owner(2), owner(2).address());
        let both = run(&state, &row);
        let s = summary(&[&none, &one, &both, &none], 1_795_946_400 + 60);
        assert_eq!(s.pending, 4);
        assert_eq!(s.executable, 1);
        assert_eq!(s.oldest_age, 60);
        assert_eq!(s.missing_confirmations, [1, 1, 2, 0]);
        assert_eq!(summary(&[], 0), QueueSummary::default());
    }

    #[test]
    fn participation_counts_recent_on_chain_signatures_and_verified_confirmations() {
        use crate::governance::events::GovEvent;
        let (safe, mut row) = setup();
        let mut state = GovernanceState::new(Address::ZERO);
        let mut safe = safe;
        safe.owners.push(owner(3).address());
        state.safes.insert(SAFE, safe);
        assert_eq!(participation(&state, &[], 0), Some(0.0));
        // Owner 3 approved a hash on-chain in block 7, at 1_000; owner 1 confirmed off-chain.
        state.apply(
            &GovEvent::ApproveHash {
                safe: SAFE,
                hash: B256::ZERO,
                owner: owner(3).address(),
            },
            7,
        );
        state.apply(
            &GovEvent::BlockTime {
                safe: SAFE,
                at: 1_000,
            },
            7,
        );
        confirm(&mut row, &owner(1), owner(1).address());
        let p = run(&state.safes[&SAFE], &row);
        let pending = [&p];
        assert_eq!(participation(&state, &pending, 1_000), Some(2.0 / 3.0));
        // Older than the window: the approval no longer counts; the confirmation (later) does.
        assert_eq!(participation(&state, &pending, 1_001), Some(1.0 / 3.0));
        assert_eq!(participation(&state, &pending, 1_795_950_001), Some(0.0));
        assert_eq!(participation(&GovernanceState::default(), &[], 0), None);
    }

    #[test]
    fn a_tampered_hash_a_forged_and_a_stranger_confirmation_are_critical() {
        let (state, mut row) = setup();
        // A confirmation from a stranger, and one claimed by owner 2 but signed by owner 1.
        confirm(&mut row, &owner(9), owner(9).address());
        confirm(&mut row, &owner(1), owner(2).address());
        let p = run(&state, &row);
        assert_eq!(p.confirmed_by, Vec::<Address>::new());
        assert!(p.confirmed_at.is_empty());
        let r = rules(&p);
        assert!(
            r.contains(&(Rule::NonOwnerSignature, Severity::Critical)),
            "{r:?}"
        );
        assert!(
            r.contains(&(Rule::InvalidSignature, Severity::Critical)),
            "{r:?}"
        );
        // The service lies about the hash.
        let mut lying = row.clone();
        lying.safe_tx_hash = B256::repeat_byte(1);
        assert_eq!(
            run(&state, &lying).findings[0].rule,
            Rule::SafeTxHashMismatch
        );
    }

    #[test]
    fn the_services_decoding_is_compared_and_a_stranger_proposer_is_named() {
        let (state, mut row) = setup();
        row.data_decoded = Some(DataDecoded {
            method: "addDevice".into(),
        });
        row.proposer = Some(Address::repeat_byte(0x77));
        let r = rules(&run(&state, &row));
        assert!(
            r.contains(&(Rule::ApiDecodingMismatch, Severity::Critical)),
            "{r:?}"
        );
        assert!(
            r.contains(&(Rule::UnknownProposer, Severity::Warning)),
            "{r:?}"
        );
        row.data_decoded = None;
        assert!(rules(&run(&state, &row)).contains(&(Rule::ApiDecodingMissing, Severity::Warning)));
    }

    #[test]
    fn an_approval_counts_only_when_the_chain_shows_it() {
        let (mut state, mut row) = setup();
        row.confirmations.push(Confirmation {
            owner: owner(2).address(),
            signature: Bytes::new(),
            signature_type: "APPROVED_HASH".into(),
            submission_date: None,
        });
        assert!(run(&state, &row).confirmed_by.is_empty());
        state
            .approvals
            .insert((row.safe_tx_hash, owner(2).address()));
        assert_eq!(run(&state, &row).confirmed_by, vec![owner(2).address()]);
    }
}
