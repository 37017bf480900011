//! Debian's real Prometheus 2.42 for integration tests, on 127.0.0.1 and a free port, killed when
//! the handle is dropped. `scripts/test` installs it (`prometheus`); `KEYWARDEN_TEST_PROMETHEUS`
//! may point at another binary.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Prometheus.
pub struct Prometheus {
    child: Child,
    /// Base URL.
    pub url: String,
    _dir: tempfile::TempDir,
}

fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYWARDEN_TEST_PROMETHEUS") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from("/usr/bin/prometheus");
    assert!(
        p.is_file(),
        "Prometheus not found at {}: run the suite with scripts/test (it installs Debian's prometheus), or set KEYWARDEN_TEST_PROMETHEUS",
        p.display()
    );
    p
}

impl Prometheus {
    /// Starts one with `config` (YAML) beside `files` (name, content: rule files the configuration
    /// names relative to itself), and waits until ready.
    pub async fn start(config: &str, files: &[(String, String)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(binary())
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let prometheus = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        keywarden::tls::ensure_crypto_provider();
        let http = reqwest::Client::new();
        loop {
            let ready = http
                .get(format!("{}/-/ready", prometheus.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return prometheus;
            }
            assert!(Instant::now() < deadline, "Prometheus did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The alerts its rules hold now (`GET /api/v1/alerts`), pending or firing.
    pub async fn alerts(&self) -> serde_json::Value {
        reqwest::get(format!("{}/api/v1/alerts", self.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
