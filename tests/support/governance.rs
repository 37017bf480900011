//! A real Safe 1.4.1 and OpenZeppelin TimelockController on the test chain, through
//! `keywarden::sim::governance` (the demo's own helpers), with test-friendly panics.

// Shared by several test crates, each using a part of it.
#![allow(dead_code)]

use std::sync::Arc;

use alloy::primitives::{Address, B256, Bytes};
use keywarden::governance::metrics::GovernanceMetrics;
use keywarden::governance::watch::{GovernanceProjection, GovernanceView};
use keywarden::sim::governance as sim;
use keywarden::store::{AuditRecord, BootObservation, LedgerEntry, Store};
use prometheus_client::registry::Registry;

use super::chain_engine::{Chain, Engine, WAIT, engine_with};

pub const DELAY: u64 = 60;

async fn within<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, keywarden::chain::ChainError>>,
) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within the wait bound"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A Safe 1.4.1 (SafeL2 behind a SafeProxy) owned by `owners` with `threshold`.
pub async fn safe(c: &Chain, owners: &[Address], threshold: u64) -> Address {
    safe_of(c, sim::SafeRelease::V1_4_1, owners, threshold).await
}

/// A Safe of `release` owned by `owners` with `threshold`.
pub async fn safe_of(
    c: &Chain,
    release: sim::SafeRelease,
    owners: &[Address],
    threshold: u64,
) -> Address {
    within(
        "Safe deployment",
        sim::deploy_safe(
            &c.provider,
            c.owner,
            release,
            owners,
            threshold,
            Address::ZERO,
        ),
    )
    .await
}

/// A Safe 1.4.1 owned by `owners` with `threshold` and the CompatibilityFallbackHandler, so that
/// it can sign for another Safe it owns (EIP-1271).
pub async fn signing_safe(c: &Chain, owners: &[Address], threshold: u64) -> Address {
    let handler = within(
        "fallback handler deployment",
        sim::deploy_fallback_handler(&c.provider, c.owner),
    )
    .await;
    within(
        "Safe deployment",
        sim::deploy_safe(
            &c.provider,
            c.owner,
            sim::SafeRelease::V1_4_1,
            owners,
            threshold,
            handler,
        ),
    )
    .await
}

/// An OpenZeppelin TimelockController with `proposer`, open execution, no admin and [`DELAY`].
pub async fn timelock(c: &Chain, proposer: Address) -> Address {
    within(
        "timelock deployment",
        sim::deploy_timelock(
            &c.provider,
            c.owner,
            std::time::Duration::from_secs(DELAY),
            &[proposer],
        ),
    )
    .await
}

/// The Safe's nonce.
pub async fn safe_nonce(c: &Chain, safe: Address) -> u64 {
    within("Safe nonce", sim::safe_nonce(&c.provider, safe)).await
}

/// The safeTxHash of a plain call of `data` on `to` at `nonce`, as the Safe computes it.
pub async fn safe_tx_hash(c: &Chain, safe: Address, to: Address, data: &[u8], nonce: u64) -> B256 {
    within(
        "safeTxHash",
        sim::safe_tx_hash(&c.provider, safe, to, data, nonce),
    )
    .await
}

/// Executes a plain call of `data` on `to` from `safe` with `signatures`, sent by `from`.
pub async fn exec_with(
    c: &Chain,
    safe: Address,
    to: Address,
    data: Vec<u8>,
    signatures: Bytes,
    from: Address,
) {
    within(
        "Safe execution",
        sim::exec_with(&c.provider, safe, to, data, signatures, from),
    )
    .await;
}

/// Executes `data` on `to` from `safe` (owners `signers`, all approving: the first executes, the
/// others approve its hash on-chain first).
pub async fn exec(c: &Chain, safe: Address, signers: &[Address], to: Address, data: Vec<u8>) {
    within(
        "Safe execution",
        sim::exec_approved(&c.provider, safe, signers[0], &signers[1..], to, data),
    )
    .await;
}

/// The chain followed with the governance projection.
pub struct Watched {
    pub engine: Engine,
    pub view: Arc<GovernanceView>,
    pub metrics: GovernanceMetrics,
    pub registry: Registry,
}

impl Watched {
    /// Waits until `f` holds for the published state.
    pub async fn until(
        &self,
        what: &str,
        f: impl Fn(&keywarden::governance::state::GovernanceState) -> bool,
    ) {
        let deadline = std::time::Instant::now() + WAIT;
        while !f(&self.view.snapshot()) {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// The value of the unlabelled metric `name`.
    pub fn gauge(&self, name: &str) -> f64 {
        let text = keywarden::telemetry::encode(&self.registry).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// Follows `c` into `store` with the governance projection, which also watches the `configured`
/// Safes.
pub fn watch_with(c: &Chain, store: &Store, configured: Vec<Address>) -> Watched {
    let mut registry = Registry::default();
    let metrics = GovernanceMetrics::new(&mut registry);
    let view = Arc::new(GovernanceView::default());
    let projection = GovernanceProjection::new(c.d.kms, configured, view.clone(), metrics.clone());
    let engine = engine_with(
        &[c.anvil.url()],
        &c.d,
        store,
        vec![Box::new(projection)],
        |_| {},
    );
    Watched {
        engine,
        view,
        metrics,
        registry,
    }
}

/// Records that `count` instances of each of `apps` received keys with compose hash h(4) at `at`
/// (instance ids numbered from 1 within each app; the high digits tell apps apart).
pub async fn booted_with_h4(store: &Store, apps: &[Address], count: u64, at: i64) {
    let entries: Vec<LedgerEntry> = apps
        .iter()
        .enumerate()
        .flat_map(|(a, app)| {
            (0..count).map(move |i| LedgerEntry {
                boot: Some(BootObservation {
                    app_id: hex::encode(app),
                    instance_id: format!("{:020x}{:020x}", a, i + 1),
                    at,
                    mr_aggregated: "aa".repeat(32),
                    compose_hash: hex::encode(super::chain_engine::h(4)),
                    os_image_hash: "bb".repeat(32),
                    device_id: "cc".repeat(32),
                }),
                audit: AuditRecord::new("key_request", "ok", &serde_json::json!({})),
            })
        })
        .collect();
    store.record_ledger(&entries).await.unwrap();
}

/// Writes `keywarden.toml` in `dir` for the commands: SQLite in `dir`, the chain `c` from its
/// deployment, the Transaction Service at `service`.
pub fn command_config(dir: &std::path::Path, c: &Chain, service: &str) -> std::path::PathBuf {
    let config = dir.join("keywarden.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndatabase_url = \"sqlite://{}\"\n\n[chain]\nrpc_urls = [\"{}\"]\nkms_contract = \"{}\"\nstart_block = {}\n\n[governance]\ntransaction_service = \"{service}\"\n",
            dir.join("kw.db").display(),
            c.anvil.url(),
            c.d.kms,
            c.d.block
        ),
    )
    .unwrap();
    config
}
