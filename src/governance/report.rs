//! Governance reports read from the store, whether or not the service runs
//! (`governance topology`, and `/admin/governance/topology` without a running watcher).

use serde_json::{Value, json};

use super::GovernanceError;
use super::watch::{self, NAME};
use crate::store::Store;

/// Every chain's governance tree, rebuilt from the stored rows.
pub async fn topology(store: &Store) -> Result<Value, GovernanceError> {
    let mut chains = Vec::new();
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
        state.block = c.processed_block;
        let mut v = super::topology::topology(&state);
        v["chain_id"] = json!(c.chain_id);
        chains.push(v);
    }
    Ok(json!({ "chains": chains }))
}
