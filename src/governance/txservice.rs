//! Client of the Safe Transaction Service: a Safe's pending queue, its info, and the service's
//! indexing lag.
//!
//! Flow: one [`TxService`] per service base URL, shared by every Safe on it, so one request rate
//! limit (`governance.transaction_service_rate`, 5/s) covers them all → `GET
//! /api/v2/safes/{safe}/multisig-transactions/?executed=false&nonce__gte=N&trusted=false&
//! ordering=nonce&limit=200`, following `next` (at most [`MAX_PAGES`] pages) → [`TxRow`]s (v1 and
//! v2 number shapes both accepted). Answers: 401/403 a configuration error (the API key), 404 an
//! unknown Safe, 429 honoured through `Retry-After`, 5xx and transport errors retried by the
//! caller's next poll with backoff. Nothing here is trusted: [`super::proposals`] checks every
//! row.

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, Bytes, U256};
use serde::{Deserialize, Deserializer};
use tokio::sync::Mutex;

use super::metrics::GovernanceMetrics;

/// Pages of the pending queue read per poll (200 rows each).
pub const MAX_PAGES: usize = 10;

/// Why a request to the service failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// 401 / 403: the API key is missing, wrong or not allowed.
    #[error(
        "the Transaction Service refused the request with HTTP {0} (fix: check the API key, governance.transaction_service_api_key)"
    )]
    Unauthorized(u16),
    /// 404 for a Safe: the service does not know it.
    #[error("the Transaction Service does not know Safe {0}")]
    UnknownSafe(Address),
    /// 429.
    #[error("the Transaction Service is rate limiting (retry after {0:?})")]
    RateLimited(Duration),
    /// 5xx.
    #[error("the Transaction Service failed with HTTP {0}")]
    Server(u16),
    /// Another status.
    #[error("the Transaction Service answered HTTP {0}")]
    Status(u16),
    /// No answer.
    #[error("the Transaction Service could not be reached: {0}")]
    Transport(String),
    /// An answer that is not the documented JSON.
    #[error("the Transaction Service's answer does not decode: {0}")]
    Decode(String),
    /// A `next` link pointing elsewhere than the service.
    #[error("the Transaction Service's next page points outside it: {0}")]
    ForeignLink(String),
}

impl ServiceError {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "unauthorized",
            Self::UnknownSafe(_) => "not_found",
            Self::RateLimited(_) => "rate_limited",
            Self::Server(_) => "server_error",
            Self::Status(_) => "error",
            Self::Transport(_) => "unreachable",
            Self::Decode(_) | Self::ForeignLink(_) => "undecodable",
        }
    }
}

/// A number the service writes as a string (v2) or a number (v1).
fn flexible_u256<'de, D: Deserializer<'de>>(d: D) -> Result<U256, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        N(u64),
    }
    match N::deserialize(d)? {
        N::N(n) => Ok(U256::from(n)),
        N::S(s) => U256::from_str_radix(&s, 10).map_err(serde::de::Error::custom),
    }
}

fn flexible_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = flexible_u256(d)?;
    u64::try_from(v).map_err(|_| serde::de::Error::custom("number beyond 64 bits"))
}

fn optional_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
    Ok(Option::<Bytes>::deserialize(d)?.unwrap_or_default())
}

fn zero_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<Address, D::Error> {
    Ok(Option::<Address>::deserialize(d)?.unwrap_or_default())
}

/// One confirmation the service holds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Confirmation {
    /// The owner it claims to be from.
    pub owner: Address,
    /// The signature (absent for an on-chain approval).
    #[serde(default, deserialize_with = "optional_bytes")]
    pub signature: Bytes,
    /// `EOA`, `ETH_SIGN`, `APPROVED_HASH` or `CONTRACT_SIGNATURE`.
    #[serde(default)]
    pub signature_type: String,
    /// When it was given (RFC 3339), as the service says.
    #[serde(default)]
    pub submission_date: Option<String>,
}

/// The part of `dataDecoded` compared with our own decoding.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DataDecoded {
    /// Function name.
    pub method: String,
}

/// One multisig transaction row.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TxRow {
    /// The Safe.
    pub safe: Address,
    /// Target.
    pub to: Address,
    /// Wei (a string).
    #[serde(deserialize_with = "flexible_u256")]
    pub value: U256,
    /// Calldata (`null` for none).
    #[serde(default, deserialize_with = "optional_bytes")]
    pub data: Bytes,
    /// 0 call, 1 delegatecall.
    pub operation: u8,
    /// Refund token.
    #[serde(default, deserialize_with = "zero_if_null")]
    pub gas_token: Address,
    /// safeTxGas.
    #[serde(deserialize_with = "flexible_u256")]
    pub safe_tx_gas: U256,
    /// baseGas.
    #[serde(deserialize_with = "flexible_u256")]
    pub base_gas: U256,
    /// gasPrice.
    #[serde(deserialize_with = "flexible_u256")]
    pub gas_price: U256,
    /// Refund receiver.
    #[serde(default, deserialize_with = "zero_if_null")]
    pub refund_receiver: Address,
    /// Nonce.
    #[serde(deserialize_with = "flexible_u64")]
    pub nonce: u64,
    /// The hash the service claims.
    pub safe_tx_hash: B256,
    /// Who proposed it.
    #[serde(default)]
    pub proposer: Option<Address>,
    /// When it was proposed (RFC 3339).
    #[serde(default)]
    pub submission_date: Option<String>,
    /// Whether it executed.
    #[serde(default)]
    pub is_executed: bool,
    /// The service's own decoding (never trusted; `null` when it could not or would not).
    #[serde(default)]
    pub data_decoded: Option<DataDecoded>,
    /// Confirmations.
    #[serde(default)]
    pub confirmations: Vec<Confirmation>,
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    next: Option<String>,
    results: Vec<TxRow>,
}

/// What the service says of a Safe.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SafeInfo {
    /// Nonce.
    #[serde(deserialize_with = "flexible_u64")]
    pub nonce: u64,
    /// Threshold.
    pub threshold: u64,
    /// Owners.
    pub owners: Vec<Address>,
    /// Version.
    #[serde(default)]
    pub version: Option<String>,
}

/// `/api/v1/about/indexing/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Indexing {
    /// Newest block the node has.
    pub current_block_number: u64,
    /// Newest block whose Safe transactions the service indexed.
    #[serde(default)]
    pub master_copies_block_number: Option<u64>,
    /// Whether it is caught up.
    #[serde(default)]
    pub synced: bool,
}

/// Requests at most `rate` per second, shared by everyone holding the limiter.
#[derive(Debug)]
struct Limiter {
    next: Mutex<Instant>,
    spacing: Duration,
}

impl Limiter {
    fn new(rate: f64) -> Self {
        Self {
            next: Mutex::new(Instant::now()),
            spacing: Duration::from_secs_f64(1.0 / rate.max(0.01)),
        }
    }

    /// Waits for this request's slot; `at_least` pushes every later slot back (Retry-After).
    async fn slot(&self) {
        let wait = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let at = (*next).max(now);
            *next = at + self.spacing;
            at - now
        };
        tokio::time::sleep(wait).await;
    }

    async fn hold_off(&self, d: Duration) {
        let mut next = self.next.lock().await;
        *next = (*next).max(Instant::now() + d);
    }
}

/// One Transaction Service.
#[derive(Debug, Clone)]
pub struct TxService {
    base: Arc<str>,
    api_key: Option<Arc<str>>,
    http: reqwest::Client,
    limiter: Arc<Limiter>,
    metrics: GovernanceMetrics,
}

impl TxService {
    /// A client of the service at `base` (e.g. `https://safe-tx.example.org`; requests go to
    /// `{base}/api/...`), at most `rate` requests per second.
    pub fn new(
        base: &str,
        api_key: Option<String>,
        rate: f64,
        timeout: Duration,
        metrics: GovernanceMetrics,
    ) -> Self {
        crate::tls::ensure_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self {
            base: base.trim_end_matches('/').into(),
            api_key: api_key.map(Into::into),
            http,
            limiter: Arc::new(Limiter::new(rate)),
            metrics,
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        safe: Option<Address>,
    ) -> Result<T, ServiceError> {
        if !url.starts_with(&*self.base) {
            return Err(ServiceError::ForeignLink(url.chars().take(200).collect()));
        }
        self.limiter.slot().await;
        let started = Instant::now();
        let mut req = self.http.get(url);
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        let result = async {
            let resp = req.send().await.map_err(|e| {
                ServiceError::Transport(crate::problem::one_line(&e.without_url().to_string()))
            })?;
            let status = resp.status().as_u16();
            match status {
                200..=299 => {}
                401 | 403 => return Err(ServiceError::Unauthorized(status)),
                404 if safe.is_some() => {
                    return Err(ServiceError::UnknownSafe(safe.unwrap_or_default()));
                }
                429 => {
                    let wait = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map_or(Duration::from_secs(1), Duration::from_secs);
                    self.limiter.hold_off(wait).await;
                    return Err(ServiceError::RateLimited(wait));
                }
                500..=599 => return Err(ServiceError::Server(status)),
                _ => return Err(ServiceError::Status(status)),
            }
            resp.json::<T>().await.map_err(|e| {
                ServiceError::Decode(crate::problem::one_line(&e.without_url().to_string()))
            })
        }
        .await;
        let outcome = result.as_ref().map_or_else(ServiceError::label, |_| "ok");
        self.metrics.service_request(outcome, started.elapsed());
        result
    }

    /// The service's view of `safe`.
    pub async fn safe(&self, safe: Address) -> Result<SafeInfo, ServiceError> {
        self.get(&format!("{}/api/v1/safes/{safe}/", self.base), Some(safe))
            .await
    }

    /// The pending queue of `safe` from `nonce` on, every page (at most [`MAX_PAGES`]).
    pub async fn pending(&self, safe: Address, nonce: u64) -> Result<Vec<TxRow>, ServiceError> {
        let mut url = format!(
            "{}/api/v2/safes/{safe}/multisig-transactions/?executed=false&nonce__gte={nonce}&trusted=false&ordering=nonce&limit=200",
            self.base
        );
        let mut out = Vec::new();
        for _ in 0..MAX_PAGES {
            let page: Page = self.get(&url, Some(safe)).await?;
            out.extend(page.results);
            match page.next {
                Some(next) => url = next,
                None => return Ok(out),
            }
        }
        Ok(out)
    }

    /// The service's indexing state.
    pub async fn indexing(&self) -> Result<Indexing, ServiceError> {
        self.get(&format!("{}/api/v1/about/indexing/", self.base), None)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROW_V2: &str = r#"{
        "safe": "0x5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a",
        "to": "0x0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
        "value": "0",
        "data": null,
        "operation": 0,
        "gasToken": "0x0000000000000000000000000000000000000000",
        "safeTxGas": "0",
        "baseGas": "0",
        "gasPrice": "0",
        "refundReceiver": null,
        "nonce": "7",
        "safeTxHash": "0x1111111111111111111111111111111111111111111111111111111111111111",
        "proposer": "0x0101010101010101010101010101010101010101",
        "submissionDate": "2026-11-29T10:00:00Z",
        "isExecuted": false,
        "dataDecoded": null,
        "confirmations": [
            {"owner": "0x0101010101010101010101010101010101010101", "submissionDate": "2026-11-29T10:00:00Z",
             "transactionHash": null, "signature": "0x01", "signatureType": "EOA"}
        ],
        "trusted": false
    }"#;

    #[test]
    fn v2_strings_and_v1_numbers_both_decode() {
        let v2: TxRow = serde_json::from_str(ROW_V2).unwrap();
        assert_eq!(v2.nonce, 7);
        assert!(v2.data.is_empty());
        assert_eq!(v2.refund_receiver, Address::ZERO);
        assert_eq!(v2.confirmations[0].signature_type, "EOA");
        let v1 = ROW_V2
            .replace(r#""nonce": "7""#, r#""nonce": 7"#)
            .replace(r#""safeTxGas": "0""#, r#""safeTxGas": 0"#)
            .replace(r#""baseGas": "0""#, r#""baseGas": 0"#);
        let v1: TxRow = serde_json::from_str(&v1).unwrap();
        assert_eq!(v1, v2);
        let info: SafeInfo = serde_json::from_str(
            r#"{"address":"0x5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a","nonce":"3","threshold":2,"owners":[],"version":"1.4.1"}"#,
        )
        .unwrap();
        assert_eq!(info.nonce, 3);
    }

    #[test]
    fn the_indexing_answer_decodes() {
        let i: Indexing = serde_json::from_str(
            r#"{"currentBlockNumber": 100, "currentBlockTimestamp": "2026-11-30T00:00:00Z",
                "erc20BlockNumber": 98, "erc20BlockTimestamp": "2026-11-30T00:00:00Z", "erc20Synced": true,
                "masterCopiesBlockNumber": 97, "masterCopiesBlockTimestamp": "2026-11-30T00:00:00Z",
                "masterCopiesSynced": true, "synced": true}"#,
        )
        .unwrap();
        assert_eq!(
            (i.current_block_number, i.master_copies_block_number),
            (100, Some(97))
        );
    }

    #[test]
    fn a_row_that_is_not_the_documented_shape_is_an_error_not_a_panic() {
        assert!(serde_json::from_str::<TxRow>(r#"{"nonce": "x"}"#).is_err());
        assert!(
            serde_json::from_str::<TxRow>(&ROW_V2.replace(r#""nonce": "7""#, r#""nonce": "-1""#))
                .is_err()
        );
    }

    #[tokio::test]
    async fn the_limiter_spaces_requests_and_holds_off_after_a_retry_after() {
        let l = Limiter::new(20.0);
        let started = Instant::now();
        for _ in 0..5 {
            l.slot().await;
        }
        assert!(
            started.elapsed() >= Duration::from_millis(190),
            "{:?}",
            started.elapsed()
        );
        l.hold_off(Duration::from_millis(300)).await;
        let before = Instant::now();
        l.slot().await;
        assert!(before.elapsed() >= Duration::from_millis(250));
    }
}
