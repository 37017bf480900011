//! The RPC endpoint pool: health-scored failover with backoff over a chain's HTTP endpoints.
//!
//! Flow: [`RpcPool::call`] runs one request on the healthiest endpoint that is not backed off
//! (ties go to the earlier endpoint in `chain.rpc_urls`, so the primary is used whenever it is
//! healthy), with `chain.request_timeout`. A failure halves the endpoint's score, backs it off
//! exponentially and moves the request to the next endpoint (a failover); the score climbs back
//! over a minute without failures, so a recovered primary is preferred again. When every endpoint is
//! backed off, the one that recovers first is tried anyway, so the pool never stops trying. An
//! `eth_getLogs` refusal for too many results is returned as [`ChainError::TooManyResults`]
//! without blaming the endpoint: the follower shrinks its range instead. Every request is counted
//! and timed by endpoint index, method and outcome.
//!
//! No endpoint is used before it has shown, with `eth_chainId`, that it serves the pool's chain
//! (`chain.chain_id`, or the first chain an endpoint reported when none is configured). The check
//! is repeated after every failure of the endpoint and every [`CHAIN_RECHECK`] while it serves; an
//! endpoint on another chain is skipped, reported (ERROR line, metric, endpoint status) and
//! checked again every [`WRONG_CHAIN_RECHECK`].

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::client::RpcClient;
use alloy::transports::TransportResult;
use serde::Serialize;

use super::ChainError;
use super::config::ChainConfig;
use super::metrics::{ChainMetrics, Method, RpcOutcome};
use super::transport::{CappedHttp, is_too_large};

/// First backoff after a failure; doubles per consecutive failure up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(250);
/// Longest backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A failed endpoint's score climbs back to full over this long without new failures, so a
/// recovered primary is preferred again rather than staying behind a healthy backup for good.
const SCORE_RECOVERY: Duration = Duration::from_secs(60);

/// A serving endpoint's chain id is checked again this often.
pub const CHAIN_RECHECK: Duration = Duration::from_secs(60);
/// An endpoint found on another chain is checked again this often.
pub const WRONG_CHAIN_RECHECK: Duration = Duration::from_secs(30);

/// Messages nodes use to refuse an `eth_getLogs` range (geth, erigon, anvil, hosted providers).
const TOO_MANY_RESULTS: [&str; 8] = [
    "query returned more than",
    "too many results",
    "too many logs",
    "block range too large",
    "block range is too large",
    "exceed maximum block range",
    "limit exceeded",
    "response size exceeded",
];

/// Whether `err` is a node refusing an `eth_getLogs` range as too large.
/// Whether a node's error answer says the call reverted.
fn is_revert(e: &alloy::transports::TransportError) -> bool {
    e.as_error_resp()
        .is_some_and(|p| p.code == 3 || p.message.to_ascii_lowercase().contains("revert"))
}

/// Whether an error is a node refusing an `eth_getLogs` range as too large.
pub fn is_too_many_results(err: &dyn std::fmt::Display) -> bool {
    let text = err.to_string().to_ascii_lowercase();
    TOO_MANY_RESULTS.iter().any(|p| text.contains(p))
}

#[derive(Debug, Clone)]
struct Health {
    /// Exponentially weighted success rate, 0..=1.
    score: f64,
    consecutive_failures: u32,
    retry_at: Option<Instant>,
    last_failure: Option<Instant>,
    last_error: Option<String>,
}

impl Health {
    /// The score, recovered linearly towards 1 since the last failure.
    fn effective_score(&self, now: Instant) -> f64 {
        match self.last_failure {
            Some(t) => {
                let healed =
                    now.saturating_duration_since(t).as_secs_f64() / SCORE_RECOVERY.as_secs_f64();
                self.score + (1.0 - self.score) * healed.min(1.0)
            }
            None => self.score,
        }
    }

    fn backed_off(&self, now: Instant) -> bool {
        self.retry_at.is_some_and(|t| t > now)
    }
}

/// What an endpoint's `eth_chainId` showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChainCheck {
    /// Not checked since it was created or last failed.
    Unchecked,
    /// Serves the pool's chain (checked at).
    Verified(Instant),
    /// Serves another chain (its id, checked at).
    Wrong(u64, Instant),
}

struct Endpoint {
    provider: DynProvider,
    /// Host and port, for log lines (never the path or credentials).
    host: String,
    health: Mutex<Health>,
    chain: Mutex<ChainCheck>,
}

/// One endpoint's health, for `chain status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EndpointHealth {
    /// Position in `chain.rpc_urls`.
    pub index: u16,
    /// Success score (1 = every recent request succeeded).
    pub score: f64,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Backed off right now.
    pub backed_off: bool,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// The chain id it serves, when that is not the pool's chain (it is not used).
    pub wrong_chain: Option<u64>,
}

/// The endpoints of one chain.
pub struct RpcPool {
    endpoints: Vec<Endpoint>,
    timeout: Duration,
    metrics: ChainMetrics,
    /// The chain every endpoint must serve (configured, or pinned by the first answer).
    chain_id: Mutex<Option<u64>>,
}

impl RpcPool {
    /// A pool over `urls` (HTTP), each request bounded by `chain.request_timeout` and each
    /// response by `chain.max_response_bytes`.
    pub fn new(urls: &[url::Url], chain: &ChainConfig, metrics: ChainMetrics) -> Self {
        crate::tls::ensure_crypto_provider();
        let endpoints = urls
            .iter()
            .map(|u| Endpoint {
                host: format!(
                    "{}:{}",
                    u.host_str().unwrap_or("?"),
                    u.port_or_known_default().unwrap_or(0)
                ),
                chain: Mutex::new(ChainCheck::Unchecked),
                provider: ProviderBuilder::new()
                    .disable_recommended_fillers()
                    .connect_client(RpcClient::new(
                        CappedHttp::new(u.clone(), chain.max_response_bytes),
                        false,
                    ))
                    .erased(),
                health: Mutex::new(Health {
                    score: 1.0,
                    consecutive_failures: 0,
                    retry_at: None,
                    last_failure: None,
                    last_error: None,
                }),
            })
            .collect();
        Self {
            endpoints,
            timeout: chain.request_timeout,
            metrics,
            chain_id: Mutex::new(None),
        }
    }

    /// Requires every endpoint to serve `chain_id` (`chain.chain_id`); without it, the first chain
    /// an endpoint reports is pinned.
    pub fn expect_chain_id(&self, chain_id: Option<u64>) {
        *self.chain_id.lock().unwrap_or_else(|e| e.into_inner()) = chain_id;
    }

    fn chain_check(&self, i: usize) -> ChainCheck {
        *self.endpoints[i]
            .chain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn set_chain_check(&self, i: usize, c: ChainCheck) {
        *self.endpoints[i]
            .chain
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = c;
        self.metrics
            .endpoint_wrong_chain(index_label(i), matches!(c, ChainCheck::Wrong(..)));
    }

    /// Whether endpoint `i` may be used: checks its chain id first when due. `Err` is the
    /// endpoint's failure to answer (it is then backed off like any other failure).
    async fn usable(&self, i: usize) -> Result<bool, String> {
        let due = match self.chain_check(i) {
            ChainCheck::Unchecked => true,
            ChainCheck::Verified(at) => at.elapsed() >= CHAIN_RECHECK,
            ChainCheck::Wrong(_, at) => at.elapsed() >= WRONG_CHAIN_RECHECK,
        };
        if !due {
            return Ok(matches!(self.chain_check(i), ChainCheck::Verified(_)));
        }
        let started = Instant::now();
        let answer =
            tokio::time::timeout(self.timeout, self.endpoints[i].provider.get_chain_id()).await;
        let seconds = started.elapsed().as_secs_f64();
        let label = index_label(i);
        let actual = match answer {
            Ok(Ok(id)) => {
                self.metrics
                    .rpc(label, Method::EthChainId, RpcOutcome::Ok, seconds);
                id
            }
            Ok(Err(e)) => {
                self.metrics
                    .rpc(label, Method::EthChainId, RpcOutcome::Error, seconds);
                return Err(one_line(&e));
            }
            Err(_) => {
                self.metrics
                    .rpc(label, Method::EthChainId, RpcOutcome::Timeout, seconds);
                return Err(format!("no answer within {:?}", self.timeout));
            }
        };
        let expected = *self
            .chain_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(actual);
        let now = Instant::now();
        if actual == expected {
            self.set_chain_check(i, ChainCheck::Verified(now));
            return Ok(true);
        }
        if !matches!(self.chain_check(i), ChainCheck::Wrong(id, _) if id == actual) {
            tracing::error!(
                endpoint = i,
                host = %self.endpoints[i].host,
                serves_chain = actual,
                expected_chain = expected,
                "RPC endpoint serves another chain: it is not used (fix: point chain.rpc_urls at the right chain)"
            );
        }
        self.set_chain_check(i, ChainCheck::Wrong(actual, now));
        Ok(false)
    }

    /// Checks the chain id of every endpoint that is due (before first use, after a failure,
    /// and every [`CHAIN_RECHECK`] / [`WRONG_CHAIN_RECHECK`]), so a misconfigured backup is
    /// reported before it is needed.
    pub async fn check_chains(&self) {
        for i in 0..self.endpoints.len() {
            if let Err(e) = self.usable(i).await {
                self.record(i, Err(e));
            }
        }
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether the pool has no endpoint.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Endpoints found on another chain: (index, host, the chain they serve).
    pub fn wrong_chain(&self) -> Vec<(usize, String, u64)> {
        (0..self.endpoints.len())
            .filter_map(|i| match self.chain_check(i) {
                ChainCheck::Wrong(id, _) => Some((i, self.endpoints[i].host.clone(), id)),
                _ => None,
            })
            .collect()
    }

    /// Marks endpoint `i` as faulty (backed off, its chain checked again), for a fault the pool
    /// cannot see itself, such as history the other endpoints contradict.
    pub fn fault(&self, i: usize, why: &str) {
        tracing::warn!(endpoint = i, host = %self.endpoints[i].host, "RPC endpoint fault: {why}");
        self.record(i, Err(why.to_owned()));
    }

    /// Runs `request` once on every endpoint that serves the pool's chain, without failover:
    /// (index, answer) for each, to compare what they say.
    pub async fn each<T, F, Fut>(
        &self,
        method: Method,
        request: F,
    ) -> Vec<(usize, Result<T, String>)>
    where
        F: Fn(DynProvider) -> Fut,
        Fut: Future<Output = TransportResult<T>>,
    {
        let mut out = Vec::new();
        for i in 0..self.endpoints.len() {
            match self.usable(i).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    self.record(i, Err(e.clone()));
                    out.push((i, Err(e)));
                    continue;
                }
            }
            let answer = self
                .attempt(i, method, &request)
                .await
                .map_err(|e| match e {
                    Attempt::TooManyResults(m) | Attempt::Failed(m) | Attempt::Reverted(m) => m,
                });
            out.push((i, answer));
        }
        out
    }

    fn health(&self, i: usize) -> Health {
        self.endpoints[i]
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Endpoint health snapshots, in configuration order.
    pub fn status(&self) -> Vec<EndpointHealth> {
        let now = Instant::now();
        (0..self.endpoints.len())
            .map(|i| {
                let h = self.health(i);
                EndpointHealth {
                    index: index_label(i),
                    score: h.effective_score(now),
                    consecutive_failures: h.consecutive_failures,
                    backed_off: h.backed_off(now),
                    last_error: h.last_error,
                    wrong_chain: match self.chain_check(i) {
                        ChainCheck::Wrong(id, _) => Some(id),
                        _ => None,
                    },
                }
            })
            .collect()
    }

    /// Endpoint indexes in the order to try them (and the `endpoint_up` gauges refreshed).
    fn order(&self) -> Vec<usize> {
        let now = Instant::now();
        let mut idx: Vec<(usize, bool, i64, Option<Instant>)> = (0..self.endpoints.len())
            .map(|i| {
                let h = self.health(i);
                let backed = h.backed_off(now);
                self.metrics.endpoint_up(index_label(i), !backed);
                // Coarse buckets, so the primary wins among similarly healthy endpoints.
                let bucket = (h.effective_score(now) * 4.0).round() as i64;
                (i, backed, bucket, h.retry_at)
            })
            .collect();
        // Usable first, by score bucket, then index; backed-off ones last, soonest retry first.
        idx.sort_by(|a, b| {
            a.1.cmp(&b.1)
                .then_with(|| b.2.cmp(&a.2))
                .then_with(|| a.3.cmp(&b.3))
                .then_with(|| a.0.cmp(&b.0))
        });
        idx.into_iter().map(|(i, ..)| i).collect()
    }

    fn record(&self, i: usize, ok: Result<(), String>) {
        let mut h = self.endpoints[i]
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match ok {
            Ok(()) => {
                h.score = h.effective_score(Instant::now()) * 0.8 + 0.2;
                h.last_failure = None;
                h.consecutive_failures = 0;
                h.retry_at = None;
            }
            Err(e) => {
                // A failed endpoint may come back as another node: check its chain again.
                {
                    let mut c = self.endpoints[i]
                        .chain
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if matches!(*c, ChainCheck::Verified(_)) {
                        *c = ChainCheck::Unchecked;
                    }
                }
                let now = Instant::now();
                h.score = h.effective_score(now) * 0.5;
                h.last_failure = Some(now);
                h.consecutive_failures = h.consecutive_failures.saturating_add(1);
                let factor = 1u32 << h.consecutive_failures.min(8);
                h.retry_at = Some(now + (BASE_BACKOFF * factor).min(MAX_BACKOFF));
                h.last_error = Some(e);
            }
        }
        self.metrics
            .endpoint_up(index_label(i), h.retry_at.is_none());
    }

    /// One request on endpoint `i`: timed, counted, and recorded in the endpoint's health (an
    /// `eth_getLogs` range refused as too large is not the endpoint's fault).
    async fn attempt<T, F, Fut>(&self, i: usize, method: Method, request: &F) -> Result<T, Attempt>
    where
        F: Fn(DynProvider) -> Fut,
        Fut: Future<Output = TransportResult<T>>,
    {
        let started = Instant::now();
        let result =
            tokio::time::timeout(self.timeout, request(self.endpoints[i].provider.clone())).await;
        let seconds = started.elapsed().as_secs_f64();
        let label = index_label(i);
        let (outcome, answer) = match result {
            Ok(Ok(v)) => (RpcOutcome::Ok, Ok(v)),
            // An oversized log range is the range's fault; any other oversized answer the node's.
            Ok(Err(e))
                if method == Method::EthGetLogs
                    && (is_too_many_results(&e) || is_too_large(&e)) =>
            {
                (
                    RpcOutcome::TooManyResults,
                    Err(Attempt::TooManyResults(one_line(&e))),
                )
            }
            // A revert is the chain's answer: every endpoint would give it.
            Ok(Err(e)) if method == Method::EthCall && is_revert(&e) => {
                (RpcOutcome::Reverted, Err(Attempt::Reverted(one_line(&e))))
            }
            Ok(Err(e)) => (RpcOutcome::Error, Err(Attempt::Failed(one_line(&e)))),
            Err(_) => (
                RpcOutcome::Timeout,
                Err(Attempt::Failed(format!(
                    "no answer within {:?}",
                    self.timeout
                ))),
            ),
        };
        self.metrics.rpc(label, method, outcome, seconds);
        match &answer {
            Ok(_) | Err(Attempt::Reverted(_)) => self.record(i, Ok(())),
            Err(Attempt::Failed(m)) => self.record(i, Err(m.clone())),
            Err(Attempt::TooManyResults(_)) => {}
        }
        answer
    }

    /// Runs `request` on the best endpoint, failing over to the others on error or timeout.
    pub async fn call<T, F, Fut>(&self, method: Method, request: F) -> Result<T, ChainError>
    where
        F: Fn(DynProvider) -> Fut,
        Fut: Future<Output = TransportResult<T>>,
    {
        let mut last = String::from("no RPC endpoint configured");
        for (attempt, i) in self.order().into_iter().enumerate() {
            if attempt > 0 {
                self.metrics.failover();
            }
            match self.usable(i).await {
                Ok(true) => {}
                Ok(false) => {
                    last = format!("endpoint {i} serves another chain");
                    continue;
                }
                Err(e) => {
                    last = format!("endpoint {i}: {e}");
                    self.record(i, Err(e));
                    continue;
                }
            }
            match self.attempt(i, method, &request).await {
                Ok(v) => return Ok(v),
                Err(Attempt::TooManyResults(m)) => return Err(ChainError::TooManyResults(m)),
                Err(Attempt::Reverted(m)) => return Err(ChainError::CallReverted(m)),
                Err(Attempt::Failed(m)) => last = format!("endpoint {i}: {m}"),
            }
        }
        Err(ChainError::AllEndpointsFailed { method, last })
    }
}

impl RpcPool {
    /// `eth_call` of `input` on `to` at `block`, with the pool's failover and timeout.
    pub async fn eth_call(
        &self,
        to: alloy::primitives::Address,
        input: Vec<u8>,
        block: u64,
    ) -> Result<alloy::primitives::Bytes, ChainError> {
        let tx = alloy::rpc::types::TransactionRequest::default()
            .to(to)
            .input(input.into());
        let tx = &tx;
        self.call(Method::EthCall, |p| async move {
            p.call(tx.clone())
                .block(alloy::eips::BlockId::number(block))
                .await
        })
        .await
    }
}

/// Why one attempt on one endpoint failed.
enum Attempt {
    /// `eth_getLogs` refused the range as too large.
    TooManyResults(String),
    /// `eth_call` reverted.
    Reverted(String),
    /// Any other error or a timeout.
    Failed(String),
}

fn index_label(i: usize) -> u16 {
    u16::try_from(i).unwrap_or(u16::MAX)
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    let s: String = e
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    s.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_range_refusals() {
        assert!(is_too_many_results(
            &"server returned an error response: error code -32005: query returned more than 10000 results"
        ));
        assert!(is_too_many_results(&"Block range too large"));
        assert!(!is_too_many_results(&"connection refused"));
    }

    #[test]
    fn a_failed_endpoint_heals_back_to_full_score() {
        let now = Instant::now();
        let h = Health {
            score: 0.5,
            consecutive_failures: 1,
            retry_at: None,
            last_failure: Some(now),
            last_error: None,
        };
        assert!((h.effective_score(now) - 0.5).abs() < 1e-9);
        let later = now + SCORE_RECOVERY / 2;
        assert!((h.effective_score(later) - 0.75).abs() < 1e-9);
        assert!((h.effective_score(now + SCORE_RECOVERY * 2) - 1.0).abs() < 1e-9);
    }

    #[tokio::test]
    async fn failing_primary_fails_over_and_is_backed_off() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = ChainMetrics::new(&mut registry, 2);
        // Nothing listens on port 9 of loopback: connection refused at once.
        let urls: Vec<url::Url> = ["http://127.0.0.1:9", "http://127.0.0.1:9"]
            .iter()
            .map(|u| u.parse().unwrap_or_else(|e| panic!("{e}")))
            .collect();
        let cfg = ChainConfig {
            request_timeout: Duration::from_secs(2),
            ..ChainConfig::default()
        };
        let pool = RpcPool::new(&urls, &cfg, metrics);
        let err = pool
            .call(
                Method::EthChainId,
                |p| async move { p.get_chain_id().await },
            )
            .await;
        assert!(matches!(err, Err(ChainError::AllEndpointsFailed { .. })));
        let status = pool.status();
        assert!(
            status
                .iter()
                .all(|s| s.backed_off && s.consecutive_failures == 1)
        );
    }
}
