//! `keywarden loadgen`: drives GetAppKey at a KMS with simulated guests and reports throughput,
//! latency percentiles and errors by kind (and the server's peak resident memory when its
//! metrics URL is given).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::client::{ClientError, Guest};

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Requests sent.
    pub requests: u64,
    /// Requests answered with keys.
    pub ok: u64,
    /// Errors by kind (`http_503`, `http_400`, `transport`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Wall time of the run (seconds).
    pub duration_seconds: f64,
    /// Successful requests per second.
    pub throughput_rps: f64,
    /// Latency of successful requests (milliseconds).
    pub ok_latency_ms: Percentiles,
    /// Latency of refused requests (milliseconds), e.g. how fast overload 503s come back.
    pub refused_latency_ms: Percentiles,
    /// Server resident memory at the start and its peak during the run (bytes), if sampled.
    pub server_rss_bytes: Option<(i64, i64)>,
}

/// Latency percentiles.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        Self {
            count: v.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// How load is offered.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// `concurrency` clients, each sending its next request when the previous one is answered.
    Closed {
        /// Clients.
        concurrency: usize,
    },
    /// Requests arrive at `rate` per second whatever the answers (how overload is offered in
    /// production); at most `max_in_flight` are outstanding, beyond it an arrival is counted as
    /// `client_backlog` and not sent.
    Open {
        /// Arrivals per second.
        rate: f64,
        /// Outstanding requests allowed.
        max_in_flight: usize,
    },
}

/// Results collected by the clients.
#[derive(Default)]
struct Tally {
    ok: Vec<f64>,
    refused: Vec<f64>,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_owned()).or_default() += 1;
    }

    fn merge(&mut self, other: Tally) {
        self.ok.extend(other.ok);
        self.refused.extend(other.refused);
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
    }
}

/// Sends one GetAppKey and records its outcome and latency.
async fn one_request(guest: &Guest, vm_config: &str, tally: &mut Tally) {
    let t = Instant::now();
    let result = guest.get_app_key(vm_config).await;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    match result {
        Ok(_) => tally.ok.push(ms),
        Err(ClientError::Refused { status, .. }) => {
            tally.refused.push(ms);
            tally.error(&format!("http_{status}"));
        }
        Err(ClientError::Transport { .. }) => tally.error("transport"),
        Err(ClientError::NotKms(_)) => tally.error("not_kms"),
        Err(ClientError::Local(_)) => tally.error("local"),
    }
}

/// Offers `load` to the KMS through `guest` for `duration`.
pub async fn run(
    guest: Guest,
    load: Load,
    duration: Duration,
    metrics_url: Option<String>,
) -> Report {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let peak = Arc::new(AtomicI64::new(0));
    let sampler = metrics_url.map(|url| {
        let peak = peak.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut first = None;
            while Instant::now() < deadline {
                if let Some(rss) = sample_rss(&http, &url).await {
                    first.get_or_insert(rss);
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            first
        })
    });
    let vm_config: Arc<str> = super::client::simulated_vm_config().into();
    let mut tally = Tally::default();
    match load {
        Load::Closed { concurrency } => {
            let workers: Vec<_> = (0..concurrency.max(1))
                .map(|_| {
                    let (guest, vm_config) = (guest.clone(), vm_config.clone());
                    tokio::spawn(async move {
                        let mut tally = Tally::default();
                        while Instant::now() < deadline {
                            one_request(&guest, &vm_config, &mut tally).await;
                        }
                        tally
                    })
                })
                .collect();
            for w in workers {
                if let Ok(t) = w.await {
                    tally.merge(t);
                }
            }
        }
        Load::Open {
            rate,
            max_in_flight,
        } => {
            let slots = Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1)));
            let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1e-3)));
            // Late ticks are sent at once: the offered rate holds even when the client lags.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut requests = tokio::task::JoinSet::new();
            while Instant::now() < deadline {
                ticks.tick().await;
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tally.error("client_backlog");
                    continue;
                };
                let (guest, vm_config) = (guest.clone(), vm_config.clone());
                requests.spawn(async move {
                    let mut tally = Tally::default();
                    one_request(&guest, &vm_config, &mut tally).await;
                    drop(slot);
                    tally
                });
                // Collect finished requests as we go so memory stays bounded.
                while let Some(Ok(t)) = requests.try_join_next() {
                    tally.merge(t);
                }
            }
            while let Some(done) = requests.join_next().await {
                if let Ok(t) = done {
                    tally.merge(t);
                }
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let server_rss_bytes = match sampler {
        Some(s) => s
            .await
            .ok()
            .flatten()
            .map(|first| (first, peak.load(Ordering::Relaxed))),
        None => None,
    };
    let ok_count = tally.ok.len() as u64;
    Report {
        requests: ok_count + tally.errors.values().sum::<u64>(),
        ok: ok_count,
        errors: tally.errors,
        duration_seconds: elapsed,
        throughput_rps: ok_count as f64 / elapsed.max(1e-9),
        ok_latency_ms: Percentiles::of(tally.ok),
        refused_latency_ms: Percentiles::of(tally.refused),
        server_rss_bytes,
    }
}

async fn sample_rss(http: &reqwest::Client, url: &str) -> Option<i64> {
    let text = http.get(url).send().await.ok()?.text().await.ok()?;
    crate::telemetry::sample_value(&text, "keywarden_process_resident_memory_bytes")
        .map(|v| v as i64)
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "requests {} ok {} in {:.1} s: {:.0} keys/s",
            self.requests, self.ok, self.duration_seconds, self.throughput_rps
        )?;
        let p = &self.ok_latency_ms;
        writeln!(
            f,
            "ok latency ms: p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
            p.p50, p.p90, p.p99, p.max
        )?;
        if self.refused_latency_ms.count > 0 {
            let p = &self.refused_latency_ms;
            writeln!(
                f,
                "refused latency ms: p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
                p.p50, p.p90, p.p99, p.max
            )?;
        }
        for (kind, n) in &self.errors {
            writeln!(f, "errors {kind}: {n}")?;
        }
        if let Some((start, peak)) = self.server_rss_bytes {
            writeln!(
                f,
                "server RSS: {:.1} MB at start, {:.1} MB peak",
                start as f64 / 1e6,
                peak as f64 / 1e6
            )?;
        }
        Ok(())
    }
}
