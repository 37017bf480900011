//! A real anvil with our contracts and a sync engine following it, for the chain tests.

// Shared by several test crates, each using a part of it.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use keywarden::chain::contracts::{DstackApp, DstackKms};
use keywarden::chain::follower::Projections;
use keywarden::chain::metrics::ChainMetrics;
use keywarden::chain::mirror::MirrorState;
use keywarden::chain::{ChainConfig, Mirror};
use keywarden::config::{DatabaseTarget, StorageConfig};
use keywarden::runtime::{Readiness, Task};
use keywarden::sim::deploy::{Deployment, deploy};
use keywarden::store::Store;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::support::anvil::Anvil;

/// Bound on every wait for the engine.
pub const WAIT: Duration = Duration::from_secs(30);

pub struct Chain {
    pub anvil: Anvil,
    pub provider: DynProvider,
    pub d: Deployment,
    pub owner: Address,
    pub other: Address,
}

pub async fn chain() -> Chain {
    let anvil = Anvil::spawn();
    let d = deploy(&anvil.url()).await.expect("deploy");
    // No client-side nonce cache: anvil fills nonces itself, which stays right across reorgs.
    let provider = ProviderBuilder::new()
        .disable_recommended_fillers()
        .connect_http(anvil.url())
        .erased();
    let accounts = provider.get_accounts().await.unwrap();
    Chain {
        anvil,
        provider,
        d,
        owner: accounts[0],
        other: accounts[1],
    }
}

impl Chain {
    pub fn kms(&self) -> DstackKms::DstackKmsInstance<DynProvider> {
        DstackKms::new(self.d.kms, self.provider.clone())
    }
    pub fn app(&self, at: Address) -> DstackApp::DstackAppInstance<DynProvider> {
        DstackApp::new(at, self.provider.clone())
    }
    pub async fn head(&self) -> u64 {
        self.provider.get_block_number().await.unwrap()
    }
}

/// Sends a contract call from an account and returns the receipt (waiting at most [`WAIT`]),
/// asserting success.
macro_rules! send {
    ($call:expr, $from:expr) => {{
        let pending = $call.from($from).send().await.expect("send");
        let receipt = tokio::time::timeout($crate::chain_engine::WAIT, pending.get_receipt())
            .await
            .expect("receipt within the wait bound")
            .expect("receipt");
        assert!(receipt.status(), "transaction reverted");
        receipt
    }};
}

pub fn deployed_app(r: &alloy::rpc::types::TransactionReceipt) -> Address {
    r.inner
        .logs()
        .iter()
        .find_map(|l| l.log_decode::<DstackKms::AppDeployedViaFactory>().ok())
        .expect("AppDeployedViaFactory")
        .inner
        .data
        .appId
}

pub fn h(n: u8) -> B256 {
    B256::with_last_byte(n)
}

pub async fn sqlite_store(dir: &std::path::Path) -> Store {
    let cfg = StorageConfig {
        data_dir: dir.to_path_buf(),
        ..Default::default()
    };
    Store::open(&cfg, &DatabaseTarget::Sqlite(dir.join("kw.db")))
        .await
        .unwrap()
}

/// A store on SQLite in `dir`, or on the PostgreSQL database `db`.
pub async fn store_on(db: Option<&super::common::PgDb>, dir: &std::path::Path) -> Store {
    match db {
        None => sqlite_store(dir).await,
        Some(db) => Store::open(
            &StorageConfig::default(),
            &DatabaseTarget::Postgres(db.url.clone()),
        )
        .await
        .unwrap(),
    }
}

pub struct Engine {
    pub mirror: Arc<Mirror>,
    pub registry: Registry,
    pub cancel: CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub fn engine(
    urls: &[url::Url],
    d: &Deployment,
    store: &Store,
    tweak: impl FnOnce(&mut ChainConfig),
) -> Engine {
    engine_with(urls, d, store, Vec::new(), tweak)
}

/// An engine whose follower also feeds `others` after the KMS mirror.
pub fn engine_with(
    urls: &[url::Url],
    d: &Deployment,
    store: &Store,
    others: Projections,
    tweak: impl FnOnce(&mut ChainConfig),
) -> Engine {
    let mut cfg = ChainConfig {
        rpc_urls: urls.iter().map(ToString::to_string).collect(),
        kms_contract: Some(d.kms.to_string()),
        start_block: d.block,
        confirmations: 0,
        poll_interval: Duration::from_millis(50),
        request_timeout: Duration::from_secs(2),
        ..ChainConfig::default()
    };
    tweak(&mut cfg);
    assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
    let resolved = cfg.resolve().unwrap();
    let mut registry = Registry::default();
    let metrics = ChainMetrics::new(&mut registry, urls.len());
    let (mirror, task) = keywarden::chain::follow(
        resolved,
        store.clone(),
        Readiness::default(),
        metrics,
        others,
    );
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(task.run(cancel.clone()));
    Engine {
        mirror,
        registry,
        cancel,
        handle,
    }
}

impl Engine {
    /// Waits until the engine has processed `block` and is fresh.
    pub async fn caught_up_to(&self, block: u64) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.mirror.progress().processed_block >= block && self.mirror.is_fresh() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "engine did not reach block {block} within {WAIT:?}: {:?}",
            self.mirror.progress()
        );
    }

    /// Waits until `f` holds for the mirror.
    pub async fn until(&self, what: &str, f: impl Fn(&MirrorState) -> bool) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if f(&self.mirror.snapshot()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("mirror never satisfied: {what}");
    }

    /// Sum of a metric family's series whose labels contain `label` (e.g. `method="eth_getLogs"`).
    pub fn metric_with(&self, name: &str, label: &str) -> f64 {
        let text = keywarden::telemetry::encode(&self.registry).unwrap();
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{'))
            })
            .filter(|l| l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Sum of every series of a metric family.
    pub fn metric(&self, name: &str) -> f64 {
        let text = keywarden::telemetry::encode(&self.registry).unwrap();
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        self.handle.await.unwrap().unwrap();
    }
}
