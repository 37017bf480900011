//! The compose stack's keywarden part without a container engine: `deploy/compose/stack.sh`
//! (its `setup` and `serve` entry points), `deploy/compose/keywarden.toml` and each replica's
//! environment as `docker-compose.yml` gives it, run on loopback against anvil and PostgreSQL.
//! Only what a container network provides is replaced: host names by loopback addresses (the
//! replicas' certificates name `localhost` too), the volumes by directories, and each replica's
//! listeners by free ports. setup deploys the contracts with the test PKI's KMS allowed; the
//! first replica creates the root keys, the other two onboard from it; all three then hold the
//! same keys and one leads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/prometheus.rs"]
mod prometheus;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `service`'s environment in docker-compose.yml, its YAML anchors merged.
fn compose_env(service: &str) -> BTreeMap<String, String> {
    let mut doc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(root().join("docker-compose.yml")).unwrap())
            .unwrap();
    doc.apply_merge().unwrap();
    let env = &doc["services"][service]["environment"];
    let mut env = env.clone();
    env.apply_merge().unwrap();
    env.as_mapping()
        .unwrap_or_else(|| panic!("{service} has no environment mapping"))
        .iter()
        .map(|(k, v)| {
            let v = match v {
                serde_yaml::Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
            };
            (k.as_str().unwrap().to_owned(), v)
        })
        .collect()
}

/// `stack.sh ARG` with `env`, keywarden (this build) first on PATH.
fn stack(arg: &str, env: &BTreeMap<String, String>) -> Command {
    let bin = Path::new(env!("CARGO_BIN_EXE_keywarden")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("sh");
    cmd.arg(root().join("deploy/compose/stack.sh"))
        .arg(arg)
        .env("PATH", path)
        .env_remove("RUST_LOG")
        .envs(env);
    cmd
}

/// A replica started through `stack.sh serve`, killed when dropped.
struct Replica {
    child: Child,
    data: PathBuf,
    log: PathBuf,
    api: String,
    metrics: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    /// Its `/readyz` (at most 60 s): the role it names.
    async fn ready(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited early with {status}: {}",
                    self.data.display(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if let Ok(r) = common::http()
                .get(format!("http://{}/readyz", self.metrics))
                .send()
                .await
                && r.status() == 200
            {
                let body: serde_json::Value = r.json().await.unwrap();
                return body["role"].as_str().unwrap_or_default().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready: {}",
                self.data.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_stacks_setup_and_three_replicas_onboard_and_elect_one_leader() {
    let anvil = support::anvil::Anvil::spawn();
    let db = common::PgDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let shared_env = |mut env: BTreeMap<String, String>| {
        env.insert(
            "KEYWARDEN_STACK_SHARED".into(),
            shared.display().to_string(),
        );
        env
    };

    // setup, as its service runs it (twice: the second run keeps what the first made).
    let mut setup = compose_env("setup");
    setup.insert("ANVIL_RPC".into(), anvil.url().to_string());
    let setup = shared_env(setup);
    for _ in 0..2 {
        let out = stack("setup", &setup).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let chain_env = std::fs::read_to_string(shared.join("chain.env")).unwrap();
    assert!(
        chain_env.contains(&format!("[\"{}\"]", anvil.url())),
        "{chain_env}"
    );

    // The replicas, each with its compose environment and the loopback stand-ins.
    let alertmanager = prometheus::Alertmanager::start().await;
    let mut replicas: Vec<Replica> = Vec::new();
    for n in 0..3 {
        let mut env = shared_env(compose_env(&format!("keywarden-{n}")));
        let (api, metrics) = (common::free_addr(), common::free_addr());
        let data = dir.path().join(format!("keywarden-{n}-data"));
        let config =
            root().join(env["KEYWARDEN_CONFIG"].replace("/etc/keywarden/", "deploy/compose/"));
        let pki = shared.join("test-pki").display().to_string();
        for (k, v) in [
            ("KEYWARDEN_CONFIG", config.display().to_string()),
            ("KEYWARDEN_API__LISTEN", api.to_string()),
            ("KEYWARDEN_METRICS__LISTEN", metrics.to_string()),
            ("KEYWARDEN_STORAGE__DATA_DIR", data.display().to_string()),
            ("KEYWARDEN_STORAGE__DATABASE_URL", db.url.clone()),
            ("KEYWARDEN_ATTESTATION__INSECURE_TEST_PKI", pki),
            ("KEYWARDEN_TELEMETRY__OTLP__ENABLED", "false".into()),
            (
                "KEYWARDEN_ALERTS__ALERTMANAGER_URL",
                alertmanager.url.clone(),
            ),
            ("KEYWARDEN_CLUSTER__HEARTBEAT_INTERVAL", "1s".into()),
        ] {
            env.insert(k.into(), v);
        }
        if let Some(from) = env.get("ONBOARD_FROM").cloned() {
            let source = &replicas[0];
            assert_eq!(from, "https://keywarden-0:8000");
            env.insert(
                "ONBOARD_FROM".into(),
                format!(
                    "https://localhost:{}",
                    source.api.rsplit_once(':').unwrap().1
                ),
            );
            assert_eq!(env["ONBOARD_CA"], "/source/kms/root-ca.pem");
            let ca = source.data.join("kms/root-ca.pem");
            env.insert("ONBOARD_CA".into(), ca.display().to_string());
        }
        let log = dir.path().join(format!("keywarden-{n}.log"));
        let child = stack("serve", &env)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join(format!("keywarden-{n}.err"))).unwrap(),
            ))
            .spawn()
            .unwrap();
        let mut replica = Replica {
            child,
            data,
            log,
            api: api.to_string(),
            metrics: metrics.to_string(),
        };
        // keywarden-1 and -2 start once keywarden-0 is healthy (depends_on).
        replica.ready().await;
        replicas.push(replica);
    }

    // The same root keys everywhere, created once.
    let key = |r: &Replica| std::fs::read(r.data.join("kms/root-k256.key")).unwrap();
    assert!(replicas.iter().all(|r| key(r) == key(&replicas[0])));
    // One leader among them.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut roles = Vec::new();
        for r in &mut replicas {
            roles.push(r.ready().await);
        }
        if roles.iter().filter(|r| *r == "leader").count() == 1
            && roles.iter().filter(|r| *r == "follower").count() == 2
        {
            break;
        }
        assert!(Instant::now() < deadline, "roles never settled: {roles:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(replicas);
    db.drop_now().await;
}
