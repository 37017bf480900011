//! Start-up benchmark: process start to `/readyz` 200 on SQLite (fresh and existing data
//! directory), and idle resident memory. Run with `cargo bench --bench startup`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 20;

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn ready(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(50)) else {
        return false;
    };
    let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    buf[..n].starts_with(b"HTTP/1.1 200")
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Starts keywarden on `data_dir`, returns (time to ready, idle RSS after 2 s).
fn one_run(data_dir: &std::path::Path, measure_rss: bool) -> (Duration, Option<u64>) {
    let (api, metrics) = (free_addr(), free_addr());
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keywarden"))
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/keywarden.toml"),
            "serve",
        ])
        .args([
            "--api-listen",
            &api.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = start + Duration::from_secs(10);
    while !ready(metrics) {
        assert!(Instant::now() < deadline, "not ready within 10 s");
        std::thread::sleep(Duration::from_micros(500));
    }
    let elapsed = start.elapsed();
    let rss = measure_rss.then(|| {
        std::thread::sleep(Duration::from_secs(2));
        rss_bytes(child.id())
    });
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    (elapsed, rss)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn main() {
    let mut fresh = Vec::new();
    let mut warm = Vec::new();
    let mut rss = Vec::new();
    for i in 0..RUNS {
        let dir = tempfile::tempdir().unwrap();
        fresh.push(one_run(dir.path(), false).0);
        let (t, r) = one_run(dir.path(), i < 5);
        warm.push(t);
        rss.extend(r);
    }
    fresh.sort();
    warm.sort();
    rss.sort();
    for (name, v) in [
        ("fresh data dir (migrations)", &fresh),
        ("existing data dir", &warm),
    ] {
        println!(
            "start -> /readyz 200, {name}: median {:.1} ms, p99 {:.1} ms, max {:.1} ms (n={})",
            pct(v, 0.5).as_secs_f64() * 1e3,
            pct(v, 0.99).as_secs_f64() * 1e3,
            v.last().unwrap().as_secs_f64() * 1e3,
            v.len()
        );
    }
    println!(
        "idle resident memory: median {:.1} MB, max {:.1} MB (n={})",
        rss[rss.len() / 2] as f64 / 1e6,
        *rss.last().unwrap() as f64 / 1e6,
        rss.len()
    );
}
