//! An in-process Safe Transaction Service serving exactly the documented JSON (v2 string numbers,
//! paged with `next`), fed from the real on-chain Safes: a row is pending while its nonce is not
//! used. The real service cannot run here. Shared by the governance tests and benchmark.

// Shared by several test crates, each using a part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use alloy::primitives::{Address, B256};
use alloy::providers::DynProvider;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keywarden::chain::contracts::SafeL2;
use serde_json::{Value, json};

/// The service's state: rows as the test put them, and failures to inject.
#[derive(Clone)]
pub struct Service {
    /// Every proposal row, of any Safe.
    pub rows: Arc<Mutex<Vec<Value>>>,
    /// Requests still to refuse with 429, and with 503.
    pub too_many: Arc<AtomicUsize>,
    pub failing: Arc<AtomicUsize>,
    /// Requests received, and when.
    pub requests: Arc<AtomicUsize>,
    pub times: Arc<Mutex<Vec<std::time::Instant>>>,
    /// Rows per page (at most the client's `limit`).
    page: usize,
    provider: DynProvider,
    base: Arc<Mutex<String>>,
}

async fn on_chain_nonce(s: &Service, safe: Address) -> u64 {
    SafeL2::new(safe, s.provider.clone())
        .nonce()
        .call()
        .await
        .unwrap()
        .to::<u64>()
}

fn refuse(s: &Service) -> Option<Response> {
    s.requests.fetch_add(1, Ordering::SeqCst);
    s.times.lock().unwrap().push(std::time::Instant::now());
    let take = |c: &AtomicUsize| {
        c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    };
    if take(&s.too_many) {
        return Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "1")],
                "slow down",
            )
                .into_response(),
        );
    }
    if take(&s.failing) {
        return Some((StatusCode::SERVICE_UNAVAILABLE, "down").into_response());
    }
    None
}

async fn multisig(
    State(s): State<Service>,
    Path(safe): Path<Address>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = refuse(&s) {
        return r;
    }
    let nonce = on_chain_nonce(&s, safe).await;
    let pending: Vec<Value> = s
        .rows
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r["safe"].as_str().and_then(|a| a.parse().ok()) == Some(safe))
        .filter(|r| r["nonce"].as_str().unwrap().parse::<u64>().unwrap() >= nonce)
        .cloned()
        .collect();
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(100);
    let page = limit.clamp(1, s.page);
    let offset: usize = q.get("offset").and_then(|o| o.parse().ok()).unwrap_or(0);
    let base = s.base.lock().unwrap().clone();
    let next = (offset + page < pending.len()).then(|| {
        format!(
            "{base}/api/v2/safes/{safe}/multisig-transactions/?executed=false&nonce__gte={nonce}&trusted=false&ordering=nonce&limit={limit}&offset={}",
            offset + page
        )
    });
    let results: Vec<Value> = pending.iter().skip(offset).take(page).cloned().collect();
    axum::Json(json!({
        "count": pending.len(),
        "next": next,
        "previous": null,
        "results": results,
        "countUniqueNonce": pending.len(),
    }))
    .into_response()
}

async fn indexing(State(s): State<Service>) -> Response {
    if let Some(r) = refuse(&s) {
        return r;
    }
    axum::Json(json!({
        "currentBlockNumber": 100, "currentBlockTimestamp": "2026-11-30T00:00:00Z",
        "erc20BlockNumber": 98, "erc20BlockTimestamp": "2026-11-30T00:00:00Z", "erc20Synced": true,
        "masterCopiesBlockNumber": 97, "masterCopiesBlockTimestamp": "2026-11-30T00:00:00Z",
        "masterCopiesSynced": true, "synced": true
    }))
    .into_response()
}

/// Starts the service on 127.0.0.1, reading Safe nonces through `provider`, serving `page` rows
/// per page. Returns its base URL.
pub async fn service(provider: DynProvider, page: usize) -> (String, Service) {
    let s = Service {
        rows: Arc::default(),
        too_many: Arc::default(),
        failing: Arc::default(),
        requests: Arc::default(),
        times: Arc::default(),
        page,
        provider,
        base: Arc::default(),
    };
    let router = axum::Router::new()
        .route(
            "/api/v2/safes/{safe}/multisig-transactions/",
            axum::routing::get(multisig),
        )
        .route("/api/v1/about/indexing/", axum::routing::get(indexing))
        .with_state(s.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    *s.base.lock().unwrap() = base.clone();
    (base, s)
}

impl Service {
    /// The most requests received within any one second.
    pub fn peak_per_second(&self) -> usize {
        let times = self.times.lock().unwrap();
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|t| t.duration_since(times[i]) < std::time::Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }
}

/// A row as the service's v2 API has it, with the service's own decoding `decoded`.
#[allow(clippy::too_many_arguments)]
pub fn row(
    safe: Address,
    to: Address,
    data: &[u8],
    nonce: u64,
    hash: B256,
    proposer: Address,
    confirmations: Vec<Value>,
    decoded: Value,
) -> Value {
    json!({
        "safe": safe.to_string(), "to": to.to_string(), "value": "0",
        "data": format!("0x{}", hex::encode(data)), "operation": 0,
        "gasToken": Address::ZERO.to_string(), "safeTxGas": "0", "baseGas": "0", "gasPrice": "0",
        "refundReceiver": Address::ZERO.to_string(), "nonce": nonce.to_string(),
        "executionDate": null, "submissionDate": "2026-11-30T00:00:00Z", "modified": "2026-11-30T00:00:00Z",
        "blockNumber": null, "transactionHash": null, "safeTxHash": hash.to_string(),
        "proposer": proposer.to_string(), "proposedByDelegate": null, "executor": null,
        "isExecuted": false, "isSuccessful": null, "origin": "{}",
        "dataDecoded": decoded,
        "confirmationsRequired": 2, "confirmations": confirmations, "trusted": false, "signatures": null
    })
}

/// A confirmation claimed by `claimed`, signed (over `hash`) by `by`.
pub fn confirmation(claimed: Address, by: &PrivateKeySigner, hash: B256) -> Value {
    json!({
        "owner": claimed.to_string(), "submissionDate": "2026-11-30T00:00:00Z", "transactionHash": null,
        "signature": format!("0x{}", hex::encode(by.sign_hash_sync(&hash).unwrap().as_bytes())),
        "signatureType": "EOA"
    })
}
