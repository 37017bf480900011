//! Debian's real Prometheus 2.42 and Alertmanager 0.25 for integration tests, each on 127.0.0.1
//! and a free port, killed when its handle is dropped. `scripts/test` installs them
//! (`prometheus`, `prometheus-alertmanager`); `KEYWARDEN_TEST_PROMETHEUS` and
//! `KEYWARDEN_TEST_ALERTMANAGER` may point at other binaries.

// Shared by several test crates, each using a part of it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One of them running: its process and working directory.
struct Running {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary `env` names, or `default` (which must exist).
fn binary(env: &str, default: &str, package: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(default);
    assert!(
        p.is_file(),
        "{default} not found: run the suite with scripts/test (it installs Debian's {package}), or set {env}"
    );
    p
}

/// Starts `binary` with `args(dir, listen address)` in a fresh directory, and waits (at most
/// 30 s) until its `/-/ready` answers; its base URL.
async fn start(binary: &Path, args: impl FnOnce(&Path, &str) -> Vec<String>) -> (Running, String) {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(binary)
        .args(args(dir.path(), &listen))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (running, url) = (Running { child, _dir: dir }, format!("http://{listen}"));
    keywarden::tls::ensure_crypto_provider();
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = http
            .get(format!("{url}/-/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return (running, url);
        }
        assert!(
            Instant::now() < deadline,
            "{} did not become ready",
            binary.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GETs `url` as JSON.
async fn json(url: String) -> serde_json::Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// A running Prometheus.
pub struct Prometheus {
    _running: Running,
    /// Base URL.
    pub url: String,
}

impl Prometheus {
    /// Starts one with `config` (YAML) beside `files` (name, content: rule files the configuration
    /// names relative to itself), and waits until ready.
    pub async fn start(config: &str, files: &[(String, String)]) -> Self {
        let bin = binary(
            "KEYWARDEN_TEST_PROMETHEUS",
            "/usr/bin/prometheus",
            "prometheus",
        );
        let (running, url) = start(&bin, |dir, listen| {
            for (name, content) in files {
                std::fs::write(dir.join(name), content).unwrap();
            }
            std::fs::write(dir.join("prometheus.yml"), config).unwrap();
            vec![
                format!("--config.file={}", dir.join("prometheus.yml").display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                format!("--web.listen-address={listen}"),
            ]
        })
        .await;
        Self {
            _running: running,
            url,
        }
    }

    /// The alerts its rules hold now (`GET /api/v1/alerts`), pending or firing.
    pub async fn alerts(&self) -> serde_json::Value {
        json(format!("{}/api/v1/alerts", self.url)).await
    }
}

/// A running Alertmanager.
pub struct Alertmanager {
    _running: Running,
    /// Base URL.
    pub url: String,
}

impl Alertmanager {
    /// Starts one routing everything to a receiver that sends nothing, and waits until ready.
    pub async fn start() -> Self {
        Self::start_with("route:\n  receiver: none\n  group_wait: 0s\nreceivers:\n  - name: none\n")
            .await
    }

    /// Starts one with the configuration `config_yaml`, and waits until ready.
    pub async fn start_with(config_yaml: &str) -> Self {
        let bin = binary(
            "KEYWARDEN_TEST_ALERTMANAGER",
            "/usr/bin/prometheus-alertmanager",
            "prometheus-alertmanager",
        );
        let (running, url) = start(&bin, |dir, listen| {
            std::fs::write(dir.join("alertmanager.yml"), config_yaml).unwrap();
            vec![
                format!("--config.file={}", dir.join("alertmanager.yml").display()),
                format!("--storage.path={}", dir.display()),
                format!("--web.listen-address={listen}"),
                // No gossip: it would bind 0.0.0.0:9094.
                "--cluster.listen-address=".to_owned(),
            ]
        })
        .await;
        Self {
            _running: running,
            url,
        }
    }

    /// The alerts it holds (`GET /api/v2/alerts`), active or not.
    pub async fn alerts(&self) -> Vec<serde_json::Value> {
        let all = json(format!(
            "{}/api/v2/alerts?active=true&silenced=true&inhibited=true&unprocessed=true",
            self.url
        ))
        .await;
        serde_json::from_value(all).unwrap()
    }
}
