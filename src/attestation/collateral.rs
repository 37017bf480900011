//! TDX collateral: a PCCS / Intel PCS client, and a cache (persisted by the caller's store)
//! keyed by FMSPC and PCK CA, refreshed ahead of `nextUpdate`.
//!
//! Expired collateral is never used: a cached entry past its `nextUpdate` is only a reason to
//! fetch, and a fetched set that is already expired is refused. When a refresh fails while the
//! cached set is still valid, the cached set is served (and the failure counted).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dcap_qvl::QuoteCollateralV3;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::metrics::{AttestationMetrics, FetchSkipped};
use super::reason::{Result, check_size, reject};
use super::tdx::{self, MAX_COLLATERAL_LEN};

/// A collateral set with the time it stops being valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedCollateral {
    /// The collateral.
    pub collateral: QuoteCollateralV3,
    /// Earliest `nextUpdate` of TCB info, QE identity and both CRLs (unix seconds).
    pub next_update: u64,
    /// When it was fetched (unix seconds).
    pub fetched_at: u64,
}

/// Persistent collateral cache, implemented by the service store; object-safe.
pub trait CollateralCache: Send + Sync {
    /// The cached set for `fmspc` (upper-case hex) and `ca` (`processor` | `platform`).
    fn get<'a>(
        &'a self,
        fmspc: &'a str,
        ca: &'a str,
    ) -> BoxFuture<'a, Result<Option<CachedCollateral>>>;
    /// Stores (replaces) the set for `fmspc` and `ca`.
    fn put<'a>(
        &'a self,
        fmspc: &'a str,
        ca: &'a str,
        value: &'a CachedCollateral,
    ) -> BoxFuture<'a, Result<()>>;
}

/// In-memory [`CollateralCache`] (tests and single-process use).
#[derive(Debug, Default)]
pub struct MemoryCollateralCache(Mutex<HashMap<(String, String), CachedCollateral>>);

impl CollateralCache for MemoryCollateralCache {
    fn get<'a>(
        &'a self,
        fmspc: &'a str,
        ca: &'a str,
    ) -> BoxFuture<'a, Result<Option<CachedCollateral>>> {
        let v = self
            .0
            .lock()
            .ok()
            .and_then(|m| m.get(&(fmspc.to_owned(), ca.to_owned())).cloned());
        Box::pin(async move { Ok(v) })
    }

    fn put<'a>(
        &'a self,
        fmspc: &'a str,
        ca: &'a str,
        value: &'a CachedCollateral,
    ) -> BoxFuture<'a, Result<()>> {
        if let Ok(mut m) = self.0.lock() {
            m.insert((fmspc.to_owned(), ca.to_owned()), value.clone());
        }
        Box::pin(async { Ok(()) })
    }
}

/// HTTP client of the PCCS / PCS v4 API.
#[derive(Debug, Clone)]
pub struct PccsClient {
    http: reqwest::Client,
    base_url: String,
}

#[derive(Deserialize)]
struct TcbInfoResponse {
    #[serde(rename = "tcbInfo")]
    tcb_info: serde_json::Value,
    signature: String,
}

#[derive(Deserialize)]
struct QeIdentityResponse {
    #[serde(rename = "enclaveIdentity")]
    enclave_identity: serde_json::Value,
    signature: String,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> super::reason::AttestationError {
    reject!(CollateralUnavailable, "{what}: {e}")
}

impl PccsClient {
    /// A client for `base_url` (e.g. `https://pccs.phala.network` or Intel PCS
    /// `https://api.trustedservices.intel.com`).
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self> {
        // reqwest is built without a default provider: ring is the process-wide choice
        crate::tls::ensure_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| reject!(ConfigInvalid, "HTTP client: {e}"))?;
        let base_url = base_url
            .trim_end_matches('/')
            .trim_end_matches("/sgx/certification/v4")
            .trim_end_matches("/tdx/certification/v4")
            .to_owned();
        Ok(Self { http, base_url })
    }

    async fn get(&self, url: &str) -> Result<reqwest::Response> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| unavailable(url, e))?;
        if !resp.status().is_success() {
            return Err(unavailable(url, resp.status()));
        }
        Ok(resp)
    }

    async fn body(resp: reqwest::Response, url: &str) -> Result<Vec<u8>> {
        let body = resp.bytes().await.map_err(|e| unavailable(url, e))?;
        check_size("collateral response", &body, MAX_COLLATERAL_LEN)?;
        Ok(body.to_vec())
    }

    fn header(resp: &reqwest::Response, names: &[&str]) -> Result<String> {
        names
            .iter()
            .find_map(|n| resp.headers().get(*n))
            .and_then(|v| v.to_str().ok())
            .map(percent_decode)
            .ok_or_else(|| reject!(CollateralInvalid, "missing header {}", names.join(" / ")))
    }

    /// Fetches the collateral for a TDX (or SGX) platform with `fmspc` (hex) under PCK CA `ca`.
    pub async fn fetch(&self, fmspc: &str, ca: &str, sgx: bool) -> Result<QuoteCollateralV3> {
        let tee = if sgx { "sgx" } else { "tdx" };
        let url =
            |tee: &str, path: &str| format!("{}/{tee}/certification/v4/{path}", self.base_url);

        let pck_url = url("sgx", &format!("pckcrl?ca={ca}&encoding=der"));
        let resp = self.get(&pck_url).await?;
        let pck_crl_issuer_chain = Self::header(&resp, &["SGX-PCK-CRL-Issuer-Chain"])?;
        let pck_crl = Self::body(resp, &pck_url).await?;

        let tcb_url = url(tee, &format!("tcb?fmspc={fmspc}"));
        let resp = self.get(&tcb_url).await?;
        let tcb_info_issuer_chain = Self::header(
            &resp,
            &["SGX-TCB-Info-Issuer-Chain", "TCB-Info-Issuer-Chain"],
        )?;
        let tcb: TcbInfoResponse = serde_json::from_slice(&Self::body(resp, &tcb_url).await?)
            .map_err(|e| reject!(CollateralInvalid, "TCB info response: {e}"))?;

        let qe_url = url(tee, "qe/identity");
        let resp = self.get(&qe_url).await?;
        let qe_identity_issuer_chain = Self::header(&resp, &["SGX-Enclave-Identity-Issuer-Chain"])?;
        let qe: QeIdentityResponse = serde_json::from_slice(&Self::body(resp, &qe_url).await?)
            .map_err(|e| reject!(CollateralInvalid, "QE identity response: {e}"))?;

        let root_ca_crl = self.root_ca_crl(&qe_identity_issuer_chain).await?;
        let signature =
            |s: &str| hex::decode(s).map_err(|e| reject!(CollateralInvalid, "signature hex: {e}"));
        Ok(QuoteCollateralV3 {
            pck_crl_issuer_chain,
            root_ca_crl,
            pck_crl,
            tcb_info_issuer_chain,
            // the signature covers the compact JSON of the object; serde_json keeps key order
            tcb_info: tcb.tcb_info.to_string(),
            tcb_info_signature: signature(&tcb.signature)?,
            qe_identity_issuer_chain,
            qe_identity: qe.enclave_identity.to_string(),
            qe_identity_signature: signature(&qe.signature)?,
            pck_certificate_chain: None,
        })
    }

    /// PCCS serves the root CA CRL as hex at `rootcacrl`; Intel PCS publishes it at the CRL
    /// distribution point of the root certificate.
    async fn root_ca_crl(&self, issuer_chain: &str) -> Result<Vec<u8>> {
        let pccs_url = format!("{}/sgx/certification/v4/rootcacrl", self.base_url);
        if let Ok(resp) = self.get(&pccs_url).await {
            let body = Self::body(resp, &pccs_url).await?;
            let text = String::from_utf8_lossy(&body);
            return Ok(hex::decode(text.trim()).unwrap_or(body));
        }
        let root = x509_parser::pem::Pem::iter_from_buffer(issuer_chain.as_bytes())
            .filter_map(|p| p.ok())
            .last()
            .ok_or_else(|| reject!(CollateralInvalid, "empty issuer chain"))?;
        let url = crl_distribution_point(&root.contents)
            .ok_or_else(|| reject!(CollateralUnavailable, "no root CA CRL source"))?;
        let resp = self.get(&url).await?;
        Self::body(resp, &url).await
    }
}

fn crl_distribution_point(der: &[u8]) -> Option<String> {
    use x509_parser::extensions::{DistributionPointName, GeneralName, ParsedExtension};
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::CRLDistributionPoints(points) => {
                points
                    .iter()
                    .find_map(|p| match p.distribution_point.as_ref()? {
                        DistributionPointName::FullName(names) => {
                            names.iter().find_map(|n| match n {
                                GeneralName::URI(u) => Some((*u).to_owned()),
                                _ => None,
                            })
                        }
                        DistributionPointName::NameRelativeToCRLIssuer(_) => None,
                    })
            }
            _ => None,
        })
}

/// Decodes `%XX` escapes (PCCS URL-encodes the PEM chains it puts in headers; `+` stays `+`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hexpair = b.get(i + 1..i + 3).and_then(|h| {
            std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        });
        match (b[i], hexpair) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Earliest `nextUpdate` among TCB info, QE identity and both CRLs.
pub fn collateral_next_update(c: &QuoteCollateralV3) -> Result<u64> {
    let json_next = |json: &str, what: &str| -> Result<u64> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| reject!(CollateralInvalid, "{what}: {e}"))?;
        let s = v["nextUpdate"]
            .as_str()
            .ok_or_else(|| reject!(CollateralInvalid, "{what} has no nextUpdate"))?;
        let t = humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
            .map_err(|e| reject!(CollateralInvalid, "{what} nextUpdate: {e}"))?;
        Ok(t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0))
    };
    let crl_next = |der: &[u8], what: &str| -> Result<u64> {
        let (_, crl) = x509_parser::parse_x509_crl(der)
            .map_err(|e| reject!(CollateralInvalid, "{what}: {e}"))?;
        let next = crl
            .next_update()
            .ok_or_else(|| reject!(CollateralInvalid, "{what} has no nextUpdate"))?;
        Ok(u64::try_from(next.timestamp()).unwrap_or(0))
    };
    Ok(json_next(&c.tcb_info, "TCB info")?
        .min(json_next(&c.qe_identity, "QE identity")?)
        .min(crl_next(&c.root_ca_crl, "root CA CRL")?)
        .min(crl_next(&c.pck_crl, "PCK CRL")?))
}

/// Collateral for quotes: cache first, PCCS when missing or due for refresh.
///
/// A fetch happens only after the caller's check of the quote has passed (see
/// [`CollateralProvider::for_quote`]), at most `attestation.collateral_max_concurrent_fetches`
/// at once (more are refused at once, never queued behind the PCCS), once per platform however
/// many requests need it, and not again for `attestation.collateral_failure_ttl` after a failure.
#[derive(Clone)]
pub struct CollateralProvider {
    client: PccsClient,
    cache: Arc<dyn CollateralCache>,
    refresh_margin: u64,
    metrics: Option<AttestationMetrics>,
    fetches: Arc<Fetches>,
}

/// A platform's collateral: FMSPC (upper-case hex) and PCK CA.
type Platform = (String, String);

/// The fetches in progress and the recent failures.
struct Fetches {
    slots: Arc<tokio::sync::Semaphore>,
    max: usize,
    /// One lock per platform being fetched: later requests wait for the first one's result.
    flights: Mutex<HashMap<Platform, Arc<tokio::sync::Mutex<()>>>>,
    failures: Mutex<Failures>,
}

/// Recent fetch failures by platform (the negative cache), at most [`MAX_FAILURES`].
struct Failures {
    ttl: Duration,
    by_platform: HashMap<Platform, (Instant, String)>,
}

/// Platforms whose failure is remembered; fetches happen only for quotes whose PCK chain
/// verified, so these are real platforms and few.
const MAX_FAILURES: usize = 1024;

impl Failures {
    /// The failure of `platform` within the TTL, and how long ago.
    fn recent(&self, platform: &Platform, now: Instant) -> Option<(Duration, String)> {
        let (at, why) = self.by_platform.get(platform)?;
        let age = now.saturating_duration_since(*at);
        (age < self.ttl).then(|| (age, why.clone()))
    }

    fn record(&mut self, platform: Platform, now: Instant, why: String) {
        if self.by_platform.len() >= MAX_FAILURES {
            let ttl = self.ttl;
            self.by_platform
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < ttl);
            if self.by_platform.len() >= MAX_FAILURES
                && let Some(oldest) = self
                    .by_platform
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone())
            {
                self.by_platform.remove(&oldest);
            }
        }
        self.by_platform.insert(platform, (now, why));
    }
}

impl std::fmt::Debug for CollateralProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollateralProvider")
            .field("client", &self.client)
            .field("refresh_margin", &self.refresh_margin)
            .finish_non_exhaustive()
    }
}

impl CollateralProvider {
    /// Builds a provider from the `[attestation]` config.
    pub fn new(
        config: &super::AttestationConfig,
        cache: Arc<dyn CollateralCache>,
        metrics: Option<AttestationMetrics>,
    ) -> Result<Self> {
        let max = config.collateral_max_concurrent_fetches;
        Ok(Self {
            client: PccsClient::new(&config.pccs_url, config.collateral_fetch_timeout)?,
            cache,
            refresh_margin: config.collateral_refresh_margin.as_secs(),
            metrics,
            fetches: Arc::new(Fetches {
                slots: Arc::new(tokio::sync::Semaphore::new(max)),
                max,
                flights: Mutex::default(),
                failures: Mutex::new(Failures {
                    ttl: config.collateral_failure_ttl,
                    by_platform: HashMap::new(),
                }),
            }),
        })
    }

    /// The collateral for `quote` at `now` (unix seconds). `check` runs only when the collateral
    /// has to be fetched, before the fetch, and its refusal is returned: the caller's check of
    /// what the quote proves on its own (see [`super::tdx::preverify_quote`]).
    pub async fn for_quote<E: From<super::reason::AttestationError>>(
        &self,
        quote: &[u8],
        now: u64,
        check: impl Future<Output = std::result::Result<(), E>>,
    ) -> std::result::Result<QuoteCollateralV3, E> {
        let parsed = tdx::parse_quote(quote)?;
        let fmspc = dcap_qvl::intel::quote_fmspc(&parsed)
            .map_err(|e| reject!(QuoteMalformed, "PCK certificate FMSPC: {e:#}"))?;
        let ca = dcap_qvl::intel::quote_ca(&parsed)
            .map_err(|e| reject!(QuoteMalformed, "PCK certificate CA: {e:#}"))?
            .as_id_str();
        let platform = (hex::encode_upper(fmspc), ca.to_owned());
        let hit = self.fresh(self.cached(&platform).await.as_ref(), now);
        self.record_cache(hit.is_some());
        if let Some(c) = hit {
            return Ok(c);
        }
        check.await?;
        let flight = {
            let mut flights = self
                .fetches
                .flights
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            Arc::clone(flights.entry(platform.clone()).or_default())
        };
        let _flight = flight.lock().await;
        // The request that held the lock may have fetched it meanwhile.
        let cached = self.cached(&platform).await;
        if let Some(c) = self.fresh(cached.as_ref(), now) {
            return Ok(c);
        }
        let result = self
            .fetch(&platform, parsed.header.is_sgx(), now, cached)
            .await;
        self.fetches
            .flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&platform);
        Ok(result?)
    }

    /// The stored set for `platform`; an unreadable entry is a miss, never valid collateral.
    async fn cached(&self, (fmspc, ca): &Platform) -> Option<CachedCollateral> {
        self.cache.get(fmspc, ca).await.ok().flatten()
    }

    /// The stored set when it is not yet due for refresh.
    fn fresh(&self, cached: Option<&CachedCollateral>, now: u64) -> Option<QuoteCollateralV3> {
        cached
            .filter(|c| now.saturating_add(self.refresh_margin) < c.next_update)
            .map(|c| c.collateral.clone())
    }

    /// Fetches the platform's collateral (one flight holds it); `cached`, while still valid, is
    /// served when the fetch fails or is not attempted.
    async fn fetch(
        &self,
        platform: &Platform,
        sgx: bool,
        now: u64,
        cached: Option<CachedCollateral>,
    ) -> Result<QuoteCollateralV3> {
        let (fmspc, ca) = (platform.0.as_str(), platform.1.as_str());
        let cached = cached.filter(|old| now < old.next_update);
        let skipped = |why: FetchSkipped, detail: String| {
            if let Some(m) = &self.metrics {
                m.record_fetch_skipped(why);
            }
            match &cached {
                Some(old) => Ok(old.collateral.clone()),
                None => Err(reject!(CollateralUnavailable, "{detail}")),
            }
        };
        let recent = self
            .fetches
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recent(platform, Instant::now());
        if let Some((age, why)) = recent {
            return skipped(
                FetchSkipped::RecentFailure,
                format!(
                    "collateral for FMSPC {fmspc} ({ca}) failed {}s ago and is retried after attestation.collateral_failure_ttl: {why}",
                    age.as_secs()
                ),
            );
        }
        let Ok(_slot) = self.fetches.slots.clone().try_acquire_owned() else {
            return skipped(
                FetchSkipped::Busy,
                format!(
                    "{} collateral fetches are already in progress (attestation.collateral_max_concurrent_fetches)",
                    self.fetches.max
                ),
            );
        };
        let started = Instant::now();
        let fetched = self.client.fetch(fmspc, ca, sgx).await.and_then(|c| {
            let next_update = collateral_next_update(&c)?;
            Ok(CachedCollateral {
                collateral: c,
                next_update,
                fetched_at: now,
            })
        });
        if let Some(m) = &self.metrics {
            m.record_collateral_fetch(started.elapsed().as_secs_f64(), fetched.is_ok());
        }
        let err = match fetched {
            Ok(fresh) if fresh.next_update > now => {
                // a cache write failure costs a refetch later, not this request
                let _ = self.cache.put(fmspc, ca, &fresh).await;
                return Ok(fresh.collateral);
            }
            Ok(fresh) => reject!(
                CollateralExpired,
                "PCCS served collateral that expired at {}",
                fresh.next_update
            ),
            Err(e) => e,
        };
        self.fetches
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(platform.clone(), Instant::now(), err.to_string());
        match cached {
            Some(old) => {
                tracing::warn!(
                    fmspc,
                    ca,
                    error = %err,
                    "collateral refresh failed; serving the still-valid cached set"
                );
                Ok(old.collateral)
            }
            None => Err(err),
        }
    }

    fn record_cache(&self, hit: bool) {
        if let Some(m) = &self.metrics {
            m.record_cache(hit);
        }
    }
}

/// Where TDX collateral comes from: PCCS (cached in the store), or the test PKI's own set for
/// quotes it issued when `insecure_test_pki` is configured.
pub struct CollateralSource {
    pccs: CollateralProvider,
    test: Option<QuoteCollateralV3>,
}

impl CollateralSource {
    /// Builds the source; `test` is the test PKI's collateral when `insecure_test_pki` is set
    /// ([`super::testroot::load_collateral`]).
    pub fn new(pccs: CollateralProvider, test: Option<QuoteCollateralV3>) -> Self {
        Self { pccs, test }
    }

    /// The collateral to verify `quote` with at `now`; `check` runs before a PCCS fetch (see
    /// [`CollateralProvider::for_quote`]).
    pub async fn for_quote<E: From<super::reason::AttestationError>>(
        &self,
        quote: &[u8],
        now: u64,
        check: impl Future<Output = std::result::Result<(), E>>,
    ) -> std::result::Result<QuoteCollateralV3, E> {
        if let Some(test) = &self.test {
            let parsed = tdx::parse_quote(quote)?;
            if dcap_qvl::intel::quote_fmspc(&parsed).ok() == Some(super::testroot::TEST_FMSPC) {
                return Ok(test.clone());
            }
        }
        self.pccs.for_quote(quote, now, check).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_keeps_plus() {
        assert_eq!(percent_decode("a%2Bb+c%0A%zz"), "a+b+c\n%zz");
    }
}
