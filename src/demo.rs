//! `keywarden demo`: the whole key-dispatch story on one machine, with real components.
//!
//! Flow: anvil (installed from npm if missing) → our DstackKms/DstackApp deployed → the demo
//! app's compose hash and the simulated OS image allowed on-chain → a test attestation PKI →
//! `keywarden serve` on SQLite following the chain → simulated CVMs get their keys over RA-TLS →
//! the compose hash is removed on-chain → the next boot is refused → summary, then wait for
//! Ctrl-C or `--duration`. Everything runs on 127.0.0.1; every process started is stopped.

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, FixedBytes};
use alloy::providers::{Provider, ProviderBuilder};
use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

use crate::chain::contracts::{DstackApp, DstackKms};
use crate::sim::client::{self, Guest};
use crate::sim::testpki::TestPki;

/// The demo app's docker-compose (its SHA-256 is the compose hash allowed on-chain).
const DEMO_COMPOSE: &str = r#"{"manifest_version":2,"name":"keywarden-demo","runner":"docker-compose","docker_compose_file":"services:\n  app:\n    image: nginx:stable\n"}"#;
const ANVIL: &str = "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil";

/// `keywarden demo` options.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Stop after this many seconds once the story has run (default: run until Ctrl-C).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<u64>,
    /// Where the demo keeps its database, keys and logs (replaced on every run).
    #[arg(long, value_name = "DIR", default_value = "demo-data")]
    pub data_dir: PathBuf,
    /// Simulated CVMs to boot.
    #[arg(long, default_value_t = 3)]
    pub cvms: u8,
}

/// A child process stopped (SIGTERM, then kill) when dropped.
struct Managed(Child, &'static str);

impl Managed {
    fn stop(&mut self) {
        if self.0.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        eprintln!("demo: {} did not stop on SIGTERM; killed", self.1);
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn step(text: impl std::fmt::Display) {
    println!("==> {text}");
}

/// Finds anvil, installing the pinned npm packages when it is missing.
fn anvil_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("KEYWARDEN_ANVIL") {
        return Ok(PathBuf::from(p));
    }
    let path = PathBuf::from(ANVIL);
    if !path.exists() {
        step("installing anvil from npm (npm ci, pinned by package-lock.json)");
        let ok = Command::new("npm")
            .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
            .status()
            .context("cannot run npm; install Node.js and npm, or run from the repository root")?
            .success();
        if !ok || !path.exists() {
            bail!("npm ci did not install {ANVIL}; run the demo from the repository root");
        }
    }
    Ok(path)
}

fn start_anvil(bin: &Path) -> anyhow::Result<(Managed, url::Url)> {
    let addr = free_addr()?;
    let mut child = Command::new(bin)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &addr.port().to_string(),
            "--block-time",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stdout = child.stdout.take().context("anvil stdout")?;
    let mut managed = Managed(child, "anvil");
    let mut lines = BufReader::new(stdout).lines();
    let listening = lines
        .by_ref()
        .take(400)
        .map_while(Result::ok)
        .any(|l| l.contains("Listening on"));
    if !listening {
        managed.stop();
        bail!("anvil did not start listening");
    }
    // Keep draining anvil's output so it never blocks on a full pipe.
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
    Ok((managed, url::Url::parse(&format!("http://{addr}"))?))
}

async fn wait_ready(metrics: SocketAddr, keywarden: &mut Managed) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(status) = keywarden.0.try_wait()? {
            bail!("keywarden exited during start-up ({status}); see its log");
        }
        if let Ok(r) = http.get(format!("http://{metrics}/readyz")).send().await
            && r.status() == 200
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("keywarden was not ready within 60 s; see its log")
}

/// Waits until the mirror has processed `block` (from `dstack_chain_processed_block`).
async fn wait_processed(metrics: SocketAddr, block: u64) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let text = match http.get(format!("http://{metrics}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let processed =
            crate::telemetry::sample_value(&text, "dstack_chain_processed_block").unwrap_or(0.0);
        if processed >= block as f64 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the chain mirror did not reach block {block} within 60 s")
}

/// Runs the demo. Returns when the story is done and the duration passed (or Ctrl-C).
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let anvil_bin = anvil_binary()?;
    let (mut anvil, rpc) = start_anvil(&anvil_bin)?;
    step(format!("anvil running at {rpc} (1 s blocks)"));

    let deployment = crate::sim::deploy::deploy(&rpc).await?;
    step(format!(
        "deployed DstackKms {} and demo app {} at block {}",
        deployment.kms, deployment.app, deployment.block
    ));
    let provider = ProviderBuilder::new().connect_http(rpc.clone());
    let owner: Address = *provider
        .get_accounts()
        .await?
        .first()
        .context("anvil has no accounts")?;
    let kms = DstackKms::new(deployment.kms, &provider);
    let app = DstackApp::new(deployment.app, &provider);
    let compose_hash: [u8; 32] = Sha256::digest(DEMO_COMPOSE.as_bytes()).into();
    kms.addOsImageHash(FixedBytes(client::SIMULATED_OS_IMAGE_HASH))
        .from(owner)
        .send()
        .await?
        .get_receipt()
        .await?;
    app.addComposeHash(FixedBytes(compose_hash))
        .from(owner)
        .send()
        .await?
        .get_receipt()
        .await?;
    let policy_block = app
        .setAllowAnyDevice(true)
        .from(owner)
        .send()
        .await?
        .get_receipt()
        .await?
        .block_number
        .unwrap_or_default();
    step(format!(
        "on-chain policy: OS image {} and compose hash {} allowed, any device",
        hex::encode(client::SIMULATED_OS_IMAGE_HASH),
        hex::encode(compose_hash)
    ));

    let dir = &args.data_dir;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let now = crate::clock::unix_secs();
    let pki = TestPki::generate(now.saturating_sub(60))?;
    let pki_dir = dir.join("test-pki");
    pki.save(&pki_dir)?;
    step(format!(
        "TEST attestation PKI in {} (simulated TDX quotes; trusted only via --insecure-test-pki)",
        pki_dir.display()
    ));

    let (api, metrics) = (free_addr()?, free_addr()?);
    let data = dir.join("data");
    let log_path = dir.join("keywarden.log");
    let log = std::fs::File::create(&log_path)?;
    let images = crate::kms::osimage::env_value(&[client::simulated_os_image()]);
    let child = Command::new(std::env::current_exe()?)
        .args(["serve", "--api-listen", &api.to_string()])
        .args(["--metrics-listen", &metrics.to_string()])
        .arg("--data-dir")
        .arg(&data)
        .arg("--insecure-test-pki")
        .arg(&pki_dir)
        .args(["--rpc-url", rpc.as_str()])
        .args(["--kms-contract", &deployment.kms.to_string()])
        .args(["--start-block", &deployment.block.to_string()])
        .env("KEYWARDEN_KMS__OS_IMAGES", images)
        .env("KEYWARDEN_TELEMETRY__LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let mut keywarden = Managed(child, "keywarden");
    wait_ready(metrics, &mut keywarden).await?;
    // Ready means caught up with the confirmed head; the policy above may still be within the
    // confirmation depth.
    wait_processed(metrics, policy_block).await?;
    let url = format!("https://localhost:{}", api.port());
    step(format!(
        "keywarden serving the KMS at {url}, metrics at http://{metrics}/metrics, log in {}",
        log_path.display()
    ));

    let ca = std::fs::read_to_string(data.join("kms/root-ca.pem"))?;
    let app_id: [u8; 20] = deployment.app.into_array();
    let boot = |instance: u8| {
        let spec = client::guest_spec(app_id, DEMO_COMPOSE.as_bytes(), vec![instance; 20]);
        let (url, ca, pki) = (url.clone(), ca.clone(), &pki);
        async move {
            let guest = Guest::enroll(&url, Some(ca), pki, &spec, false).await?;
            guest.get_app_key(&client::simulated_vm_config()).await
        }
    };
    for i in 1..=args.cvms {
        let keys = boot(i)
            .await
            .with_context(|| format!("CVM {i} did not get its keys"))?;
        step(format!(
            "CVM {i} booted: got its keys over RA-TLS (disk key {}..., k256 key {}...)",
            &hex::encode(&keys.disk_crypt_key)[..16],
            &hex::encode(&keys.k256_key)[..16]
        ));
    }

    let receipt = app
        .removeComposeHash(FixedBytes(compose_hash))
        .from(owner)
        .send()
        .await?
        .get_receipt()
        .await?;
    let removed_at = Instant::now();
    step(format!(
        "removed the compose hash on-chain (block {})",
        receipt.block_number.unwrap_or_default()
    ));
    let deadline = removed_at + Duration::from_secs(30);
    let refusal = loop {
        match boot(100).await {
            Err(client::ClientError::Refused { status, message }) => {
                break format!("{status}: {message}");
            }
            Err(e) => bail!("unexpected error after the revocation: {e}"),
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(_) => bail!("the next boot was still served 30 s after the revocation"),
        }
    };
    step(format!(
        "the next boot was refused {:.1} s after the revocation: {refusal}",
        removed_at.elapsed().as_secs_f64()
    ));
    println!();
    println!(
        "summary: {} CVMs got keys; after removing the compose hash on-chain the next boot was refused.",
        args.cvms
    );
    println!(
        "metrics: http://{metrics}/metrics   chain status: keywarden chain status --data-dir {}",
        data.display()
    );

    match args.duration {
        Some(secs) => {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(secs)) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        None => {
            println!("running until Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    keywarden.stop();
    anvil.stop();
    step("stopped keywarden and anvil");
    Ok(())
}
