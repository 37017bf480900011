//! Operator reports on the mirror, shared by `keywarden chain status|state` and the admin API.
//!
//! Flow: [`status`] reads every chain's checkpoint from the store (and probes the configured
//! endpoints, so it answers whether or not the service runs); [`state`] rebuilds each chain's
//! mirror from the stored events. Both return JSON; [`render_text`] prints it for humans.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256};
use alloy::providers::Provider;
use serde_json::{Value, json};

use super::ChainError;
use super::code::identify;
use super::config::ChainConfig;
use super::kms_projection::{self, rebuild_with};
use super::metrics::{ChainMetrics, Method};
use super::mirror::{Answering, Evaluation, MirrorState};
use super::rpc::RpcPool;
use crate::store::Store;

fn sorted<T: ToString>(items: &HashSet<T>) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(ToString::to_string).collect();
    v.sort();
    v
}

fn opt(a: Option<Address>) -> Value {
    a.map_or(Value::Null, |a| json!(a.to_string()))
}

/// The code answering for a contract and where its decisions come from.
fn code_json(answering: Option<Answering<'_>>, evaluation: Evaluation) -> Value {
    let (hash, known) = match answering {
        Some(Answering::Known(k, id)) => (json!(id.hash.to_string()), json!(k.name)),
        Some(Answering::Unknown(Some(id))) => (json!(id.hash.to_string()), Value::Null),
        Some(Answering::Unknown(None)) | None => (Value::Null, Value::Null),
    };
    json!({ "code_hash": hash, "known_as": known, "evaluation": evaluation })
}

/// The mirror as JSON with sorted lists.
pub fn state_json(m: &MirrorState) -> Value {
    let mut apps: Vec<(&Address, _)> = m.apps.iter().collect();
    apps.sort_by_key(|(a, _)| **a);
    let apps: Vec<Value> = apps
        .into_iter()
        .map(|(address, p)| {
            json!({
                "address": address.to_string(),
                "registered": m.registered_apps.contains(address),
                "has_code": p.has_code,
                "owner": opt(p.owner),
                "pending_owner": opt(p.pending_owner),
                "implementation": opt(p.implementation),
                "compose_hashes": sorted(&p.compose_hashes),
                "devices": sorted(&p.devices),
                "allow_any_device": p.allow_any_device,
                "require_tcb_up_to_date": p.require_tcb_up_to_date,
                "upgrades_disabled": p.upgrades_disabled,
                "code": code_json(m.app_answering(*address), m.app_evaluation(*address)),
            })
        })
        .collect();
    let (live_kms, live_apps) = m.live_counts();
    let k = &m.kms;
    json!({
        "kms": {
            "address": m.kms_address.to_string(),
            "owner": opt(k.owner),
            "pending_owner": opt(k.pending_owner),
            "implementation": opt(k.implementation),
            "app_implementation": opt(k.app_implementation),
            "gateway_app_id": k.gateway_app_id,
            "k256_pubkey": k.k256_pubkey.to_string(),
            "allowed_aggregated_mrs": sorted::<B256>(&k.allowed_aggregated_mrs),
            "devices": sorted::<B256>(&k.devices),
            "os_images": sorted::<B256>(&k.os_images),
            "code": code_json(Some(m.kms_answering()), m.kms_evaluation()),
        },
        "live_evaluation": { "kms": live_kms, "apps": live_apps },
        "sizes": m.sizes(),
        "apps": apps,
    })
}

/// Every chain's checkpoint with lag, and the configured endpoints' health right now.
pub async fn status(store: &Store, chain: &ChainConfig) -> Result<Value, ChainError> {
    let now = crate::clock::unix_secs_i64();
    let mut chains: Vec<Value> = Vec::new();
    for c in store.chain_checkpoints().await? {
        let kms = mirrored_kms(store, c.chain_id).await?;
        chains.push(json!({
                "chain_id": c.chain_id,
                "kms_contract": kms.map(|a| a.to_string()),
                "start_block": c.start_block,
                "processed_block": c.processed_block,
                "head_block": c.head_block,
                "lag_blocks": c.head_block.saturating_sub(c.processed_block),
                "backfill_percent": backfill_percent(&c),
                "head_seen_seconds_ago": now.saturating_sub(c.head_seen_at),
        }));
    }
    Ok(json!({ "chains": chains, "endpoints": probe(chain).await }))
}

/// The KMS contract whose mirror the store holds for `chain_id`, if any.
async fn mirrored_kms(store: &Store, chain_id: u64) -> Result<Option<Address>, ChainError> {
    Ok(store
        .chain_projections(chain_id)
        .await?
        .into_iter()
        .find(|p| p.name == kms_projection::NAME)
        .and_then(|p| Address::try_from(p.identity.as_slice()).ok()))
}

/// Share of `start_block..=head_block` processed, in percent (one decimal).
fn backfill_percent(c: &super::store::Checkpoint) -> f64 {
    let total = c.head_block.saturating_sub(c.start_block) + 1;
    let done = (c.processed_block + 1)
        .saturating_sub(c.start_block)
        .min(total);
    (done as f64 * 1000.0 / total as f64).round() / 10.0
}

/// Asks each configured endpoint for its newest block, once, with the configured timeout.
async fn probe(chain: &ChainConfig) -> Vec<Value> {
    let Some(resolved) = chain.resolve() else {
        return Vec::new();
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = ChainMetrics::new(&mut registry, 1);
    let mut out = Vec::new();
    for (index, url) in resolved.urls.iter().enumerate() {
        let pool = RpcPool::new(std::slice::from_ref(url), chain, metrics.clone());
        let started = Instant::now();
        let answer = pool
            .call(Method::EthGetBlockByNumber, |p| async move {
                p.get_block_number().await
            })
            .await;
        let ms = Duration::as_millis(&started.elapsed());
        out.push(match answer {
            Ok(block) => json!({ "index": index, "ok": true, "block": block, "latency_ms": ms }),
            Err(e) => {
                json!({ "index": index, "ok": false, "error": e.to_string(), "latency_ms": ms })
            }
        });
    }
    out
}

/// Every chain's mirror, rebuilt from the stored events, judged with `chain`'s known code.
pub async fn state(store: &Store, chain: &ChainConfig) -> Result<Value, ChainError> {
    let known = std::sync::Arc::new(chain.known_code());
    let mut chains = Vec::new();
    for c in store.chain_checkpoints().await? {
        let Some(kms) = mirrored_kms(store, c.chain_id).await? else {
            continue;
        };
        let events = store.chain_events(c.chain_id, kms_projection::NAME).await?;
        let mirror = rebuild_with(kms, known.clone(), &events);
        let mut v = state_json(&mirror);
        v["chain_id"] = json!(c.chain_id);
        v["processed_block"] = json!(c.processed_block);
        chains.push(v);
    }
    Ok(json!({ "chains": chains }))
}

/// The code identity of `address` as a ready `[[chain.known_implementations]]` entry, read with
/// `eth_getCode` through `chain`'s endpoints.
pub async fn code_identity(chain: &ChainConfig, address: Address) -> Result<Value, ChainError> {
    let urls: Vec<url::Url> = chain
        .rpc_urls
        .iter()
        .filter_map(|u| url::Url::parse(u).ok())
        .collect();
    let mut registry = prometheus_client::registry::Registry::default();
    let pool = RpcPool::new(&urls, chain, ChainMetrics::new(&mut registry, urls.len()));
    let code = pool
        .call(Method::EthGetCode, |p| async move {
            p.get_code_at(address).await
        })
        .await?;
    let Some(id) = identify(&code, address) else {
        return Err(ChainError::NoCode(address));
    };
    let known = chain.known_code();
    Ok(json!({
        "address": address.to_string(),
        "code_bytes": code.len(),
        "code_hash": id.hash.to_string(),
        "immutable_offsets": id.immutables,
        "known_as": known.classify(&id).map(|k| k.name.clone()),
    }))
}

/// JSON as indented `key: value` lines.
pub fn render_text(v: &Value) -> String {
    let mut out = String::new();
    render(v, 0, &mut out);
    out
}

fn render(v: &Value, depth: usize, out: &mut String) {
    let pad = "  ".repeat(depth);
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match v {
                    Value::Object(_) | Value::Array(_) if !is_empty(v) => {
                        out.push_str(&format!("{pad}{k}:\n"));
                        render(v, depth + 1, out);
                    }
                    _ => out.push_str(&format!("{pad}{k}: {}\n", scalar(v))),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Object(_) | Value::Array(_) => {
                        out.push_str(&format!("{pad}-\n"));
                        render(item, depth + 1, out);
                    }
                    _ => out.push_str(&format!("{pad}- {}\n", scalar(item))),
                }
            }
        }
        _ => out.push_str(&format!("{pad}{}\n", scalar(v))),
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
        other => other.to_string(),
    }
}
