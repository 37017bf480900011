//! Debian's real Alertmanager 0.25 for integration tests, on 127.0.0.1 and a free port, killed
//! when the handle is dropped. `scripts/test` installs it (`prometheus-alertmanager`);
//! `KEYWARDEN_TEST_ALERTMANAGER` may point at another binary.

// Shared by several test crates, each using a part of it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Alertmanager.
pub struct Alertmanager {
    child: Child,
    /// Base URL.
    pub url: String,
    _dir: tempfile::TempDir,
}

fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYWARDEN_TEST_ALERTMANAGER") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from("/usr/bin/prometheus-alertmanager");
    assert!(
        p.is_file(),
        "Alertmanager not found at {}: run the suite with scripts/test (it installs Debian's prometheus-alertmanager), or set KEYWARDEN_TEST_ALERTMANAGER",
        p.display()
    );
    p
}

impl Alertmanager {
    /// Starts one routing everything to a receiver that sends nothing, and waits until ready.
    pub async fn start() -> Self {
        Self::start_with("route:\n  receiver: none\n  group_wait: 0s\nreceivers:\n  - name: none\n")
            .await
    }

    /// Starts one with the configuration `config` (YAML), and waits until ready.
    pub async fn start_with(config_yaml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(&config, config_yaml).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(binary())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.path().display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // No gossip: it would bind 0.0.0.0:9094.
            .arg("--cluster.listen-address=")
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let am = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        keywarden::tls::ensure_crypto_provider();
        let http = reqwest::Client::new();
        loop {
            let ready = http
                .get(format!("{}/-/ready", am.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return am;
            }
            assert!(
                Instant::now() < deadline,
                "Alertmanager did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The alerts it holds (`GET /api/v2/alerts`), active or not.
    pub async fn alerts(&self) -> Vec<serde_json::Value> {
        reqwest::get(format!(
            "{}/api/v2/alerts?active=true&silenced=true&inhibited=true&unprocessed=true",
            self.url
        ))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
