//! Replicas of one keywarden cluster for the HA tests and benchmark: each `keywarden serve` with
//! its own data directory on one PostgreSQL, following one anvil chain, trusting one test PKI.

// Shared by the cluster tests and benchmark, each using a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use keywarden::sim::client::{self, ClientError, Guest};
use keywarden::sim::testpki::TestPki;

use crate::common::Keywarden;

/// The compose file the simulated guests run (allowed on chain by `allow_simulated_guest`).
pub const COMPOSE: &[u8] = b"{\"name\":\"cluster-test\"}";

pub struct Replica {
    pub kw: Keywarden,
    pub data: PathBuf,
}

/// Starts replica `n` of the cluster on `db` (its own data directory under `dir`).
pub fn start(
    n: usize,
    dir: &Path,
    db: &str,
    chain: &[String],
    pki_dir: &Path,
    extra_env: &[(&str, &str)],
) -> Replica {
    let data = dir.join(format!("replica-{n}"));
    let images = keywarden::kms::osimage::env_value(&[client::simulated_os_image()]);
    let mut env: Vec<(&str, &str)> = vec![
        ("KEYWARDEN_KMS__OS_IMAGES", &images),
        ("KEYWARDEN_CLUSTER__ENABLED", "true"),
        ("KEYWARDEN_CLUSTER__HEARTBEAT_INTERVAL", "1s"),
        ("KEYWARDEN_CLUSTER__CATCH_UP_INTERVAL", "1s"),
        ("KEYWARDEN_CHAIN__CONFIRMATIONS", "0"),
        ("KEYWARDEN_CHAIN__POLL_INTERVAL", "100ms"),
        ("KEYWARDEN_CHAIN__MAX_STALENESS", "10s"),
    ];
    env.extend_from_slice(extra_env);
    let mut args = vec![
        "--insecure-test-pki",
        pki_dir.to_str().unwrap(),
        "--database-url",
        db,
    ];
    args.extend(chain.iter().map(String::as_str));
    let kw = Keywarden::start(&data, &args, &env);
    Replica { kw, data }
}

pub async fn app_key(
    r: &Replica,
    pki: &TestPki,
    app: Address,
) -> Result<keywarden::kms::proto::AppKeyResponse, ClientError> {
    let ca = std::fs::read_to_string(r.data.join("kms/root-ca.pem")).unwrap();
    let guest = Guest::enroll(
        &r.kw.api_url(),
        Some(ca),
        pki,
        &client::guest_spec(app.into_array(), COMPOSE, vec![0x1d; 20]),
        true,
    )
    .await?;
    guest.get_app_key(&client::simulated_vm_config()).await
}

pub async fn roles(replicas: &[&Replica]) -> Vec<String> {
    let mut out = Vec::new();
    for r in replicas {
        let ready: serde_json::Value = crate::common::http()
            .get(format!("http://{}/readyz", r.kw.metrics))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        out.push(ready["role"].as_str().unwrap_or("none").to_owned());
    }
    out
}

/// Waits (at most `limit`) until exactly one of `replicas` leads; its index.
pub async fn one_leader(replicas: &[&Replica], limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let now = roles(replicas).await;
        let leaders: Vec<usize> = (0..now.len()).filter(|i| now[*i] == "leader").collect();
        if let [one] = leaders.as_slice() {
            return *one;
        }
        assert!(Instant::now() < deadline, "roles never settled: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Gives the replica whose data directory is `to` the root keys of the one in `from` (as
/// restored from its backup; `kms onboard` is tested on its own).
pub fn copy_keys(from: &Path, to: &Path) {
    let to = to.join("kms");
    std::fs::create_dir_all(&to).unwrap();
    for f in std::fs::read_dir(from.join("kms")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
    }
}

/// What the cluster tests and benchmark start from: anvil with our contracts and the simulated
/// guest allowed, a fresh PostgreSQL database, a test PKI, and the `serve` arguments that follow
/// that chain.
pub struct Env {
    pub anvil: crate::support::anvil::Anvil,
    pub chain: crate::guest_chain::GuestChain,
    pub db: crate::common::PgDb,
    pub dir: tempfile::TempDir,
    pub pki: TestPki,
    pub pki_dir: PathBuf,
    pub args: Vec<String>,
}

impl Env {
    pub async fn new() -> Self {
        let anvil = crate::support::anvil::Anvil::spawn();
        let chain = crate::guest_chain::allow_simulated_guest(&anvil.url(), COMPOSE).await;
        let db = crate::common::PgDb::create().await;
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::generate(keywarden::clock::unix_secs() - 60).unwrap();
        let pki_dir = dir.path().join("pki");
        pki.save(&pki_dir).unwrap();
        let args = chain.serve_args(&anvil.url());
        Self {
            anvil,
            chain,
            db,
            dir,
            pki,
            pki_dir,
            args,
        }
    }

    /// Drops the database (the chain and the directory go with `self`).
    pub async fn finish(self) {
        self.db.drop_now().await;
    }

    /// Replica `n` (its data directory kept across restarts), ready.
    pub async fn replica(&self, n: usize, env: &[(&str, &str)]) -> Replica {
        let mut r = start(
            n,
            self.dir.path(),
            &self.db.url,
            &self.args,
            &self.pki_dir,
            env,
        );
        r.kw.wait_ready().await;
        r
    }

    /// `count` replicas with `env`, each ready: the first creates the root keys, the others
    /// start from a copy of them.
    pub async fn replicas(&self, count: usize, env: &[(&str, &str)]) -> Vec<Replica> {
        let first = self.replica(0, env).await;
        let mut all = vec![];
        for n in 1..count {
            copy_keys(&first.data, &self.dir.path().join(format!("replica-{n}")));
        }
        all.push(first);
        for n in 1..count {
            all.push(self.replica(n, env).await);
        }
        all
    }
}
