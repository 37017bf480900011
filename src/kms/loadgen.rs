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

/// Runs `concurrency` workers against `guest` for `duration`.
pub async fn run(
    guest: Guest,
    concurrency: usize,
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
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let guest = guest.clone();
            let vm_config = super::client::simulated_vm_config();
            tokio::spawn(async move {
                let mut ok = Vec::new();
                let mut refused = Vec::new();
                let mut errors: BTreeMap<String, u64> = BTreeMap::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let result = guest.get_app_key(&vm_config).await;
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    match result {
                        Ok(_) => ok.push(ms),
                        Err(e) => {
                            let kind = match e {
                                ClientError::Refused { status, .. } => {
                                    refused.push(ms);
                                    format!("http_{status}")
                                }
                                ClientError::Transport { .. } => "transport".into(),
                                ClientError::NotKms(_) => "not_kms".into(),
                                ClientError::Local(_) => "local".into(),
                            };
                            *errors.entry(kind).or_default() += 1;
                        }
                    }
                }
                (ok, refused, errors)
            })
        })
        .collect();
    let (mut ok, mut refused, mut errors) =
        (Vec::new(), Vec::new(), BTreeMap::<String, u64>::new());
    for w in workers {
        if let Ok((o, r, e)) = w.await {
            ok.extend(o);
            refused.extend(r);
            for (k, n) in e {
                *errors.entry(k).or_default() += n;
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
    let ok_count = ok.len() as u64;
    Report {
        requests: ok_count + errors.values().sum::<u64>(),
        ok: ok_count,
        errors,
        duration_seconds: elapsed,
        throughput_rps: ok_count as f64 / elapsed.max(1e-9),
        ok_latency_ms: Percentiles::of(ok),
        refused_latency_ms: Percentiles::of(refused),
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
