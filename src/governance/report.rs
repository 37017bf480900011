//! Governance reports read from the store, whether or not the service runs
//! (`governance topology`, and `/admin/governance/topology` without a running watcher).

use serde_json::{Value, json};

use super::GovernanceError;
use super::state::{GovernanceState, OperationStatus};
use super::watch::{self, NAME};
use crate::store::Store;

/// Every chain's governance state, rebuilt from the stored rows.
pub async fn stored_states(store: &Store) -> Result<Vec<GovernanceState>, GovernanceError> {
    let mut out = Vec::new();
    for c in store.chain_checkpoints().await? {
        let identity = store
            .chain_projections(c.chain_id)
            .await?
            .into_iter()
            .find(|p| p.name == NAME);
        let Some(kms) = identity.and_then(|i| watch::identity_kms(&i.identity)) else {
            continue;
        };
        let rows = store.chain_events(c.chain_id, NAME).await?;
        let mut state = watch::rebuild(kms, &rows);
        state.chain_id = c.chain_id;
        state.block = c.processed_block;
        out.push(state);
    }
    Ok(out)
}

/// Every chain's governance tree, rebuilt from the stored rows.
pub async fn topology(store: &Store) -> Result<Value, GovernanceError> {
    let chains: Vec<Value> = stored_states(store)
        .await?
        .iter()
        .map(|state| {
            let mut v = super::topology::topology(state);
            v["chain_id"] = json!(state.chain_id);
            v
        })
        .collect();
    Ok(json!({ "chains": chains }))
}

/// What governance did on `state`'s chain, newest first: executed Safe transactions (decoded
/// where SafeL2 recorded them) and finished timelock operations.
pub fn history(state: &GovernanceState) -> Value {
    let mut entries: Vec<(u64, Value)> = Vec::new();
    for (safe, s) in &state.safes {
        for e in &s.executions {
            let what = e.details.as_ref().map_or_else(
                || "details unavailable (a plain Safe does not record them)".to_owned(),
                |d| {
                    let words = super::decode::decode(
                        d.to,
                        d.value,
                        &d.data,
                        super::safe_tx::Operation::try_from(d.operation)
                            .unwrap_or(super::safe_tx::Operation::Call),
                    )
                    .map(|x| x.words().join("; "))
                    .unwrap_or_else(|err| format!("undecodable: {err}"));
                    format!("nonce {}, signed by {:?}: {words}", d.nonce, d.signers)
                },
            );
            let outcome = if e.success { "executed" } else { "failed" };
            entries.push((
                e.block,
                json!({
                    "block": e.block,
                    "kind": "safe_transaction",
                    "safe": safe.to_string(),
                    "safe_tx_hash": e.safe_tx_hash.to_string(),
                    "outcome": outcome,
                    "summary": format!("Safe {safe} {outcome} {}: {what}", e.safe_tx_hash),
                }),
            ));
        }
    }
    for (timelock, t) in &state.timelocks {
        for (id, op) in &t.operations {
            if op.status == OperationStatus::Pending {
                continue;
            }
            let outcome = match op.status {
                OperationStatus::Done => "executed",
                _ => "cancelled",
            };
            entries.push((
                op.scheduled_block,
                json!({
                    "block": op.scheduled_block,
                    "kind": "timelock_operation",
                    "timelock": timelock.to_string(),
                    "operation": id.to_string(),
                    "outcome": outcome,
                    "summary": format!("timelock {timelock} operation {id} {outcome} ({} call(s))", op.calls.len()),
                }),
            ));
        }
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    json!({
        "chain_id": state.chain_id,
        "entries": entries.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
    })
}
