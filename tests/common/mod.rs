//! Helpers shared by the integration tests: free ports, the keywarden process, fresh PostgreSQL
//! databases.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback address with a free port.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// HTTP client for plain-HTTP loopback calls.
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// HTTPS client trusting the KMS root CA under `data_dir` (the API listener speaks TLS).
pub fn https(data_dir: &Path) -> reqwest::Client {
    https_with_identity(data_dir, None)
}

/// Like [`https`], presenting `identity_pem` (certificate + key PEM) as client certificate.
pub fn https_with_identity(data_dir: &Path, identity_pem: Option<&str>) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = std::fs::read(data_dir.join("kms/root-ca.pem")).unwrap();
    let mut b = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap());
    if let Some(pem) = identity_pem {
        b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

/// A running `keywarden` process whose stdout lines are collected. Killed on drop.
pub struct Keywarden {
    child: Option<Child>,
    stdout: Arc<Mutex<Vec<String>>>,
    pub api: SocketAddr,
    pub metrics: SocketAddr,
    pub admin: SocketAddr,
}

impl Keywarden {
    /// `https://localhost:PORT` of the API listener (the certificate is issued for localhost).
    pub fn api_url(&self) -> String {
        format!("https://localhost:{}", self.api.port())
    }

    /// The RPC server certificate (DER) the API listener serves, trusting only `ca_pem`.
    pub async fn rpc_cert_der(&self, ca_pem: &str) -> Vec<u8> {
        keywarden::tls::ensure_crypto_provider();
        let resp = reqwest::Client::builder()
            .tls_info(true)
            .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
            .build()
            .unwrap()
            .get(format!("{}/health", self.api_url()))
            .send()
            .await
            .unwrap();
        resp.extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|t| t.peer_certificate())
            .unwrap()
            .to_vec()
    }
}

impl Keywarden {
    /// The text of the metrics listener's `/metrics`.
    pub async fn metrics_text(&self) -> String {
        http()
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// Serves `router` on a free loopback port for the rest of the test; returns its address.
pub async fn serve_router(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// Harness-only key of [`Keywarden::start`]'s `env`: the open-file limit (`SOFT:HARD`) the
/// service starts under.
pub const NOFILE: &str = "NOFILE";

/// The binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keywarden"))
}

/// Runs keywarden to completion (for commands that exit), returning (code, stdout, stderr).
pub fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    run_in(Path::new("."), args, env)
}

/// [`run_to_end`] with `dir` as the working directory.
pub fn run_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = bin();
    cmd.current_dir(dir)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `keywarden serve` on free loopback ports with `data_dir` and `extra` arguments until it
/// exits (for start-up failures): (exit code, stdout, stderr).
pub fn run_serve(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let (api, metrics) = (free_addr().to_string(), free_addr().to_string());
    let mut args = vec![
        "serve",
        "--api-listen",
        &api,
        "--metrics-listen",
        &metrics,
        "--data-dir",
        data_dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_to_end(&args, env)
}

impl Keywarden {
    /// Starts `keywarden serve` with the example config, a fresh data dir and free ports.
    pub fn start(data_dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let (api, metrics, admin) = (free_addr(), free_addr(), free_addr());
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/keywarden.toml");
        // `NOFILE` (SOFT:HARD) is for the harness, not the service: the open-file limit the
        // service starts under, set by util-linux `prlimit`, which then execs it (same PID).
        let nofile = env.iter().find(|(k, _)| *k == NOFILE).map(|(_, v)| *v);
        let mut cmd = match nofile {
            Some(limits) => {
                let mut cmd = Command::new("prlimit");
                cmd.arg(format!("--nofile={limits}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_keywarden"));
                cmd
            }
            None => bin(),
        };
        cmd.arg("--config")
            .arg(&config)
            .arg("serve")
            .args(["--api-listen", &api.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra_args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env.iter().filter(|(k, _)| *k != NOFILE) {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let sink = stdout.clone();
        let pipe = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child: Some(child),
            stdout,
            api,
            metrics,
            admin,
        }
    }

    /// The service's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }

    /// Polls `/readyz` until it answers 200 (at most 10 s); panics with the logs otherwise.
    pub async fn wait_ready(&mut self) {
        let client = http();
        let url = format!("http://{}/readyz", self.metrics);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("keywarden exited early with {status}: {:?}", self.lines());
            }
            if let Ok(r) = client.get(&url).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("keywarden not ready within 10 s: {:?}", self.lines());
    }

    /// Stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Kills the service at once (SIGKILL: no drain, no step-down), and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits (at most `limit`) for the exit code.
    pub fn terminate(&mut self, limit: Duration) -> i32 {
        let mut child = self.child.take().unwrap();
        let pid = child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                // Let the reader thread drain the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("keywarden did not exit within {limit:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Keywarden {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Server URL for PostgreSQL tests (trust auth on loopback by default).
pub fn postgres_admin_url() -> String {
    std::env::var("KEYWARDEN_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh, empty PostgreSQL database; dropped by [`PgDb::drop_now`].
pub struct PgDb {
    pub url: String,
    name: String,
}

impl PgDb {
    /// Creates a database with a unique name. Fails loudly when no server answers.
    pub async fn create() -> Self {
        use sqlx::Connection;
        let admin = postgres_admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!("PostgreSQL must be running for these tests ({admin}): {e}; scripts/test installs and starts it")
        });
        let mut rnd = [0u8; 6];
        getrandom::fill(&mut rnd).unwrap();
        let name = format!("kw_test_{}", hex::encode(rnd));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').unwrap().0;
        Self {
            url: format!("{base}/{name}"),
            name,
        }
    }

    /// Drops the database (terminating leftover connections).
    pub async fn drop_now(self) {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&postgres_admin_url())
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await
        .unwrap();
    }
}

/// Starts keywarden trusting a fresh test attestation PKI (saved under `dir/pki`, data under
/// `dir/data`) with the simulated guests' OS image known; returns (process, pki).
pub fn start_with_test_pki(
    dir: &Path,
    env: &[(&str, &str)],
) -> (Keywarden, keywarden::sim::testpki::TestPki) {
    start_with_test_pki_and_images(dir, &[keywarden::sim::client::simulated_os_image()], env)
}

/// Like [`start_with_test_pki`], knowing the OS images `images`.
pub fn start_with_test_pki_and_images(
    dir: &Path,
    images: &[keywarden::kms::osimage::OsImage],
    env: &[(&str, &str)],
) -> (Keywarden, keywarden::sim::testpki::TestPki) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let pki = keywarden::sim::testpki::TestPki::generate(now - 60).unwrap();
    let pki_dir = dir.join("pki");
    pki.save(&pki_dir).unwrap();
    let images = keywarden::kms::osimage::env_value(images);
    let mut env = env.to_vec();
    env.push(("KEYWARDEN_KMS__OS_IMAGES", &images));
    let kw = Keywarden::start(
        &dir.join("data"),
        &["--insecure-test-pki", pki_dir.to_str().unwrap()],
        &env,
    );
    (kw, pki)
}
