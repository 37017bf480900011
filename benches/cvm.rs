//! CVM health benchmark: 10 in-test dstack-vmm hosts × 100 running VMs, every answer 5 ms late,
//! polled by 10 `cvm_vmm` pollers at once (target: a whole round within a 15 s interval; its
//! duration and the CPU it took), then the `/metrics` encoding with those 1,000 VMs and the
//! per-instance cap at 500 (target ≤ 50 ms) and the resident set over 100 rounds (target: flat).
//! The VMMs run in this process, so the CPU figures include serving them.
//!
//! Run with `cargo bench --bench cvm`; `KEYWARDEN_BENCH_ROUNDS` changes the 100 rounds.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/vmm.rs"]
mod fake;

use std::sync::Arc;
use std::time::{Duration, Instant};

use keywarden::cvm::config::VmmEntry;
use keywarden::cvm::metrics::CvmMetrics;
use keywarden::cvm::poller::{CvmView, VmmPoller};
use keywarden::secret::SecretRef;
use prometheus_client::registry::Registry;

const VMMS: u64 = 10;
const VMS: u64 = 100;
const LATENCY: Duration = Duration::from_millis(5);

/// CPU time of this process (user + system), from `/proc/self/stat` (clock ticks of 10 ms).
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command (which may hold spaces), counted from 3: utime is 14, stime 15.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{name}: n={} median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        samples.len(),
        at(0.5).as_secs_f64() * 1000.0,
        at(0.99).as_secs_f64() * 1000.0,
        samples.last().unwrap().as_secs_f64() * 1000.0
    );
}

fn main() {
    let rounds: usize = std::env::var("KEYWARDEN_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, fake::TOKEN).unwrap();
        let mut registry = Registry::default();
        let metrics = CvmMetrics::new(&mut registry, 500);
        let view = Arc::new(CvmView::new(VMMS as usize));
        let mut pollers = Vec::new();
        let mut servers = Vec::new();
        for k in 0..VMMS {
            let vms = (0..VMS)
                .map(|i| fake::running(k * VMS + i + 1, &format!("vmm{k}-vm{i:03}"), "2h 0m 0s"))
                .collect();
            let vmm = fake::vmm(vms);
            vmm.lock().unwrap().latency = LATENCY;
            let (url, server) = fake::serve(vmm, false, dir.path()).await;
            servers.push(server);
            let entry = VmmEntry {
                url: url.clone(),
                token: Some(SecretRef::File(token.clone())),
                poll_interval: Duration::from_secs(15),
                concurrency: 8,
            };
            pollers.push(
                VmmPoller::new(
                    usize::try_from(k).unwrap(),
                    &entry,
                    Duration::from_secs(5),
                    view.clone(),
                    metrics.clone(),
                )
                .unwrap(),
            );
        }
        println!(
            "== {VMMS} VMMs x {VMS} VMs, {} ms per answer, {rounds} rounds of one poll each, all VMMs at once",
            LATENCY.as_millis()
        );
        let mut round_times = Vec::with_capacity(rounds);
        let mut round_cpu = Vec::with_capacity(rounds);
        let mut scrapes = Vec::with_capacity(rounds);
        let mut rss = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let (started, cpu_before) = (Instant::now(), cpu());
            for polled in futures::future::join_all(pollers.iter_mut().map(VmmPoller::poll_once)).await {
                polled.expect("every VMM answers");
            }
            round_times.push(started.elapsed());
            round_cpu.push(cpu().saturating_sub(cpu_before));
            let started = Instant::now();
            let text = keywarden::telemetry::encode(&registry).unwrap();
            scrapes.push(started.elapsed());
            assert_eq!(text.matches("dstack_cvm_up{").count(), 500);
            rss.push(rss_mib());
        }
        assert_eq!(view.all().len(), (VMMS * VMS) as usize);
        let first = round_times[0];
        println!(
            "first round (GetInfo for every VM): {:.2} s, CPU {:.2} s",
            first.as_secs_f64(),
            round_cpu[0].as_secs_f64()
        );
        summary("round (all 10 VMMs polled)", round_times[1..].to_vec());
        summary("CPU per round", round_cpu[1..].to_vec());
        summary("/metrics encoding, 1,000 VMs, cap 500", scrapes);
        println!(
            "RSS: {:.1} MiB after round 1, {:.1} MiB after round 10, {:.1} MiB after round {rounds}",
            rss[0],
            rss[9.min(rss.len() - 1)],
            rss[rss.len() - 1]
        );
        for s in servers {
            s.abort();
        }
    });
}
