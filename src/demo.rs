//! `keywarden demo`: the whole key-dispatch story on one machine, with real components.
//!
//! Flow: anvil and the Safe / OpenZeppelin artifacts (found, or installed from npm into
//! keywarden's cache: `sim::toolchain`) → our DstackKms/DstackApp deployed → the demo
//! app's compose hash and the simulated OS image allowed on-chain → a real Safe 1.4.1 (2 of 3)
//! and OpenZeppelin TimelockController take both contracts over → a test attestation PKI →
//! `keywarden serve` on SQLite following the chain, alerting the signers' webhook → simulated
//! CVMs get their keys over RA-TLS (one restarts) → the Safe schedules, through the timelock, the removal of the
//! compose hash → keywarden's critical alert, naming the instances it cuts off, is printed → the
//! delay passes (chain time advanced) and the timelock executes → the next boot is refused →
//! `keywarden cvm list` (the fleet from the KMS's records) → summary, then wait for Ctrl-C or
//! `--duration`. Everything runs on 127.0.0.1; every process
//! and server started is stopped.

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, Bytes, FixedBytes, U256};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::sol_types::SolCall as _;
use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::chain::contracts::{DstackApp, DstackKms, TimelockController};
use crate::sim::client::{self, Guest};
use crate::sim::governance as gov;
use crate::sim::testpki::TestPki;

/// The demo app's docker-compose (its SHA-256 is the compose hash allowed on-chain).
const DEMO_COMPOSE: &str = r#"{"manifest_version":2,"name":"keywarden-demo","runner":"docker-compose","docker_compose_file":"services:\n  app:\n    image: nginx:stable\n"}"#;
/// The demo timelock's minimum delay; the demo advances chain time past it instead of waiting.
const TIMELOCK_DELAY: Duration = Duration::from_secs(3600);
/// How long the demo waits for keywarden's alerts.
const ALERT_WAIT: Duration = Duration::from_secs(60);

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

/// The demo's governance: a 2-of-3 Safe, the only proposer of a timelock that owns the contracts.
struct Governance {
    safe: Address,
    timelock: Address,
    /// The Safe's owners (anvil's accounts 1 to 3).
    signers: Vec<Address>,
    /// The last block of the hand-over.
    block: u64,
}

/// Advances the node's clock by `by` and mines a block (a development node only).
async fn advance_chain_time<P: Provider>(provider: &P, by: Duration) -> anyhow::Result<()> {
    provider
        .raw_request::<_, i64>("evm_increaseTime".into(), (by.as_secs(),))
        .await?;
    provider
        .raw_request::<_, String>("evm_mine".into(), ())
        .await?;
    Ok(())
}

/// Deploys the Safe and the timelock and hands both contracts over: `owner` transfers ownership
/// to the timelock, and the Safe has the timelock accept it (scheduled, then executed after the
/// delay).
async fn govern<P: Provider>(
    provider: &P,
    owner: Address,
    kms: Address,
    app: Address,
) -> anyhow::Result<Governance> {
    let accounts = provider.get_accounts().await?;
    let signers = accounts
        .get(1..4)
        .context("anvil has fewer than 4 accounts")?
        .to_vec();
    let safe = gov::deploy_safe(
        provider,
        owner,
        gov::SafeRelease::V1_4_1,
        &signers,
        2,
        Address::ZERO,
    )
    .await?;
    let timelock = gov::deploy_timelock(provider, owner, TIMELOCK_DELAY, &[safe]).await?;
    // DstackKms and DstackApp share Ownable2Step's transferOwnership.
    let transfer = DstackApp::transferOwnershipCall { newOwner: timelock }.abi_encode();
    for contract in [kms, app] {
        let tx = alloy::rpc::types::TransactionRequest::default()
            .from(owner)
            .to(contract)
            .input(Bytes::from(transfer.clone()).into());
        provider.send_transaction(tx).await?.get_receipt().await?;
    }
    let accept: Bytes = DstackApp::acceptOwnershipCall {}.abi_encode().into();
    let (targets, values, payloads) = (
        vec![kms, app],
        vec![U256::ZERO; 2],
        vec![accept.clone(), accept],
    );
    let salt = B256::repeat_byte(1);
    let schedule = TimelockController::scheduleBatchCall {
        targets: targets.clone(),
        values: values.clone(),
        payloads: payloads.clone(),
        predecessor: B256::ZERO,
        salt,
        delay: U256::from(TIMELOCK_DELAY.as_secs()),
    }
    .abi_encode();
    gov::exec_approved(
        provider,
        safe,
        signers[0],
        &signers[1..2],
        timelock,
        schedule,
    )
    .await?;
    advance_chain_time(provider, TIMELOCK_DELAY).await?;
    let receipt = TimelockController::new(timelock, provider)
        .executeBatch(targets, values, payloads, B256::ZERO, salt)
        .from(owner)
        .send()
        .await?
        .get_receipt()
        .await?;
    if !receipt.status() {
        bail!("the timelock did not take the contracts over");
    }
    Ok(Governance {
        safe,
        timelock,
        signers,
        block: receipt.block_number.unwrap_or_default(),
    })
}

/// The signers' inbox: a webhook receiver on 127.0.0.1 that checks each delivery's HMAC
/// signature and hands the alert over. Stopped through the returned handle.
async fn signers_inbox(
    secret: Vec<u8>,
) -> anyhow::Result<(
    SocketAddr,
    mpsc::UnboundedReceiver<serde_json::Value>,
    tokio::task::JoinHandle<()>,
)> {
    use axum::http::{HeaderMap, StatusCode};
    let (tx, rx) = mpsc::unbounded_channel();
    let router = axum::Router::new().route(
        "/alerts",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let (tx, secret) = (tx.clone(), secret.clone());
            async move {
                let header = |k: &str| {
                    headers
                        .get(k)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                let ts: i64 = header("x-keywarden-timestamp").parse().unwrap_or(0);
                let signed = crate::alerts::channel::signature(&secret, ts, &body);
                if header("x-keywarden-signature") != signed {
                    return StatusCode::UNAUTHORIZED;
                }
                match serde_json::from_slice(&body) {
                    Ok(alert) => {
                        let _ = tx.send(alert);
                        StatusCode::OK
                    }
                    Err(_) => StatusCode::BAD_REQUEST,
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((addr, rx, server))
}

/// The first alert from `inbox` with `transition`, within [`ALERT_WAIT`].
async fn wait_alert(
    inbox: &mut mpsc::UnboundedReceiver<serde_json::Value>,
    transition: &str,
) -> anyhow::Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + ALERT_WAIT;
    loop {
        match tokio::time::timeout_at(deadline, inbox.recv()).await {
            Ok(Some(alert)) if alert["transition"] == transition => return Ok(alert),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => bail!(
                "no {transition:?} alert reached the signers' webhook within {} s; see keywarden's log",
                ALERT_WAIT.as_secs()
            ),
        }
    }
}

/// Runs the demo. Returns when the story is done and the duration passed (or Ctrl-C).
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let anvil_bin = crate::sim::toolchain::anvil(&crate::sim::toolchain::ensure()?);
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
    let governance = govern(&provider, owner, deployment.kms, deployment.app).await?;
    step(format!(
        "governance: a 2-of-3 Safe {} (Safe 1.4.1) is the only proposer of the TimelockController {} (delay {} s), which now owns DstackKms and the app",
        governance.safe,
        governance.timelock,
        TIMELOCK_DELAY.as_secs()
    ));

    let dir = &args.data_dir;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let now = crate::clock::unix_secs();
    let pki = TestPki::generate(now.saturating_sub(60))?;
    let pki_dir = dir.join("test-pki");
    pki.save(&pki_dir)?;
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let secret = hex::encode(secret);
    let secret_file = dir.join("alerts-webhook.secret");
    std::fs::write(&secret_file, &secret)?;
    let (inbox_addr, mut inbox, inbox_server) = signers_inbox(secret.into_bytes()).await?;
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
        .env(
            "KEYWARDEN_ALERTS__WEBHOOK_URL",
            format!("http://{inbox_addr}/alerts"),
        )
        .env(
            "KEYWARDEN_ALERTS__WEBHOOK_SECRET",
            format!("file:{}", secret_file.display()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let mut keywarden = Managed(child, "keywarden");
    wait_ready(metrics, &mut keywarden).await?;
    // Ready means caught up with the confirmed head; the policy above may still be within the
    // confirmation depth.
    wait_processed(metrics, policy_block.max(governance.block)).await?;
    let url = format!("https://localhost:{}", api.port());
    step(format!(
        "keywarden serving the KMS at {url}, metrics at http://{metrics}/metrics, alerts to the signers' webhook http://{inbox_addr}/alerts, log in {}",
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

    let keys = boot(1).await.context("CVM 1 did not get its keys again")?;
    step(format!(
        "CVM 1 restarted: got the same keys again (disk key {}...)",
        &hex::encode(&keys.disk_crypt_key)[..16]
    ));

    // The Safe proposes, through the timelock, removing the compose hash the CVMs booted with.
    let remove: Bytes = DstackApp::removeComposeHashCall {
        composeHash: FixedBytes(compose_hash),
    }
    .abi_encode()
    .into();
    let salt = B256::repeat_byte(2);
    let schedule = TimelockController::scheduleCall {
        target: deployment.app,
        value: U256::ZERO,
        data: remove.clone(),
        predecessor: B256::ZERO,
        salt,
        delay: U256::from(TIMELOCK_DELAY.as_secs()),
    }
    .abi_encode();
    let signers = &governance.signers;
    gov::exec_approved(
        &provider,
        governance.safe,
        signers[0],
        &signers[1..2],
        governance.timelock,
        schedule,
    )
    .await?;
    step(
        "the Safe (2 of 3 signers) scheduled, through the timelock, the removal of the compose hash",
    );
    let alert = wait_alert(&mut inbox, "scheduled").await?;
    step(format!(
        "signers alerted before execution: [{}] {} (affected_instances={})",
        alert["severity"]
            .as_str()
            .unwrap_or_default()
            .to_uppercase(),
        alert["summary"].as_str().unwrap_or_default(),
        alert["labels"]["affected_instances"]
            .as_str()
            .unwrap_or("?"),
    ));

    advance_chain_time(&provider, TIMELOCK_DELAY).await?;
    let receipt = TimelockController::new(governance.timelock, &provider)
        .execute(deployment.app, U256::ZERO, remove, B256::ZERO, salt)
        .from(owner)
        .send()
        .await?
        .get_receipt()
        .await?;
    if !receipt.status() {
        bail!("the timelock did not execute the removal");
    }
    let removed_at = Instant::now();
    step(format!(
        "chain time advanced past the {} s delay; the timelock executed the removal (block {})",
        TIMELOCK_DELAY.as_secs(),
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
    let resolved = wait_alert(&mut inbox, "executed").await?;
    step(format!(
        "the signers' alert resolved: {}",
        resolved["summary"].as_str().unwrap_or_default()
    ));
    println!();
    println!("$ keywarden cvm list --data-dir {}", data.display());
    let list = Command::new(std::env::current_exe()?)
        .args(["cvm", "list", "--data-dir"])
        .arg(&data)
        .output()?;
    if !list.status.success() {
        bail!(
            "keywarden cvm list failed: {}",
            String::from_utf8_lossy(&list.stderr)
        );
    }
    print!("{}", String::from_utf8_lossy(&list.stdout));
    println!();
    println!(
        "summary: {} CVMs got keys; the Safe's proposal to remove their compose hash raised a critical alert naming the instances it cuts off before it was executed; after execution the next boot was refused.",
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
    inbox_server.abort();
    step("stopped keywarden, anvil and the signers' webhook");
    Ok(())
}
