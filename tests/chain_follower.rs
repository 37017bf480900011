//! One follower per chain, several projections, on a real anvil: a store written by the release
//! before projections (one checkpoint naming the KMS contract, untagged events) is migrated and
//! continues without a resync, on SQLite and PostgreSQL; a second projection costs no extra
//! `eth_getLogs` round and, added later, gets only its own history up to the checkpoint; another
//! KMS contract refetches the KMS projection alone and keeps the checkpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod support;
#[macro_use]
#[path = "support/chain_engine.rs"]
mod chain_engine;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use alloy::primitives::{Address, B256};
use alloy::providers::Provider;
use alloy::providers::ext::AnvilApi;
use chain_engine::{Chain, chain, deployed_app, engine, engine_with, h, sqlite_store, store_on};
use futures::future::BoxFuture;
use keywarden::chain::ChainError;
use keywarden::chain::projection::{At, ChainReads, Discovered, Processed, Projection};
use keywarden::chain::store::StoredEvent;

const GET_LOGS: &str = "method=\"eth_getLogs\"";

/// A second projection: every log of the contracts it is given, kept as is.
struct EveryLog {
    watched: BTreeSet<Address>,
    rows: Vec<StoredEvent>,
    published: Arc<Mutex<Vec<StoredEvent>>>,
}

impl EveryLog {
    fn new(watched: &[Address]) -> (Self, Arc<Mutex<Vec<StoredEvent>>>) {
        let published = Arc::new(Mutex::new(Vec::new()));
        let p = Self {
            watched: watched.iter().copied().collect(),
            rows: Vec::new(),
            published: published.clone(),
        };
        (p, published)
    }
}

impl Projection for EveryLog {
    fn name(&self) -> &'static str {
        "every_log"
    }
    fn identity(&self) -> Vec<u8> {
        self.watched.iter().flat_map(|a| a.to_vec()).collect()
    }
    fn addresses(&self) -> BTreeSet<Address> {
        self.watched.clone()
    }
    fn decode(&self, _: Address, _: &[B256], _: &[u8]) -> Option<&'static str> {
        Some("Log")
    }
    fn discover(&self, _: &[StoredEvent]) -> Vec<Discovered> {
        Vec::new()
    }
    fn complete<'a>(
        &'a self,
        _: &'a ChainReads,
        _: &'a [StoredEvent],
        _: At,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, ChainError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn reconcile<'a>(
        &'a self,
        _: &'a ChainReads,
        _: &'a [StoredEvent],
        _: At,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, ChainError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn apply(&mut self, rows: &[StoredEvent], _: Processed) {
        self.rows.extend_from_slice(rows);
    }
    fn rebuild(&mut self, stored: &[StoredEvent], _: Processed) {
        self.rows = stored.to_vec();
    }
    fn publish(&self) {
        *self.published.lock().unwrap() = self.rows.clone();
    }
}

/// Some history on the default deployment: allow-list changes and a second app.
async fn activity(c: &Chain) -> Address {
    let (kms, app, o) = (c.kms(), c.app(c.d.app), c.owner);
    send!(kms.addOsImageHash(h(1)), o);
    send!(app.addComposeHash(h(4)), o);
    send!(app.addDevice(h(3)), o);
    let second = deployed_app(&send!(
        kms.deployAndRegisterApp_1(o, false, true, false, B256::ZERO, h(5)),
        o
    ));
    c.provider.anvil_mine(Some(2), None).await.unwrap();
    second
}

/// Every log `address` emitted on the chain, as `(block, index)`.
async fn logs_of(c: &Chain, address: Address, from: u64) -> Vec<(u64, u64)> {
    let filter = alloy::rpc::types::Filter::new()
        .address(address)
        .from_block(from);
    c.provider
        .get_logs(&filter)
        .await
        .unwrap()
        .iter()
        .map(|l| (l.block_number.unwrap(), l.log_index.unwrap()))
        .collect()
}

/// The logs among stored rows (not the synthetic observations).
fn logs(rows: Vec<StoredEvent>) -> Vec<StoredEvent> {
    rows.into_iter().filter(|r| !r.topics.is_empty()).collect()
}

fn positions(rows: &[StoredEvent]) -> Vec<(u64, u64)> {
    rows.iter().map(|r| (r.block_number, r.log_index)).collect()
}

/// Writes `from`'s chain data into a database at the schema of the release before projections
/// (the repository's own migrations up to 0004), in that release's layout.
macro_rules! previous_layout {
    ($pool:expr, $from:expr, $chain_id:expr, $kms:expr) => {{
        let pool = $pool;
        let cp = $from.chain_checkpoint($chain_id).await.unwrap().unwrap();
        sqlx::query(
            "INSERT INTO chain_checkpoints (chain_id, kms_contract, start_block, processed_block, head_block, head_seen_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(cp.chain_id as i64)
        .bind($kms.to_vec())
        .bind(cp.start_block as i64)
        .bind(cp.processed_block as i64)
        .bind(cp.head_block as i64)
        .bind(cp.head_seen_at)
        .bind(cp.updated_at)
        .execute(&pool)
        .await
        .unwrap();
        for (number, hash, timestamp) in $from.chain_recent_blocks($chain_id).await.unwrap() {
            sqlx::query("INSERT INTO chain_blocks (chain_id, block_number, block_hash, timestamp) VALUES ($1, $2, $3, $4)")
                .bind(cp.chain_id as i64)
                .bind(number as i64)
                .bind(hash.to_vec())
                .bind(timestamp)
                .execute(&pool)
                .await
                .unwrap();
        }
        for e in $from.chain_events($chain_id, "kms").await.unwrap() {
            sqlx::query(
                "INSERT INTO chain_events (chain_id, block_number, log_index, block_hash, address, kind, topics, data) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(cp.chain_id as i64)
            .bind(e.block_number as i64)
            .bind(e.log_index as i64)
            .bind(e.block_hash.to_vec())
            .bind(e.address.to_vec())
            .bind(e.kind.clone())
            .bind(e.topics.iter().flat_map(|t| t.0).collect::<Vec<u8>>())
            .bind(e.data.clone())
            .execute(&pool)
            .await
            .unwrap();
        }
        pool.close().await;
    }};
}

/// The migrations the release before projections shipped.
async fn previous_migrations(backend: &str) -> sqlx::migrate::Migrator {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend);
    let mut m = sqlx::migrate::Migrator::new(dir).await.unwrap();
    let old: Vec<_> = m
        .migrations
        .iter()
        .filter(|m| m.version <= 4)
        .cloned()
        .collect();
    assert_eq!(
        old.len(),
        4,
        "migrations 0001..0004 are the previous release's"
    );
    m.migrations = std::borrow::Cow::Owned(old);
    m
}

async fn previous_release_store_continues(db: Option<&common::PgDb>) {
    let c = chain().await;
    activity(&c).await;
    let chain_id = c.provider.get_chain_id().await.unwrap();
    let head = c.head().await;
    let ref_dir = tempfile::tempdir().unwrap();
    let reference = sqlite_store(ref_dir.path()).await;
    let e = engine(&[c.anvil.url()], &c.d, &reference, |_| {});
    e.caught_up_to(head).await;
    e.stop().await;

    // The previous release's database, holding what it had synced.
    let dir = tempfile::tempdir().unwrap();
    match db {
        None => {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(dir.path().join("kw.db"))
                .create_if_missing(true);
            let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
            previous_migrations("sqlite")
                .await
                .run(&pool)
                .await
                .unwrap();
            previous_layout!(pool, reference, chain_id, c.d.kms);
        }
        Some(db) => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            previous_migrations("postgres")
                .await
                .run(&pool)
                .await
                .unwrap();
            previous_layout!(pool, reference, chain_id, c.d.kms);
        }
    }

    // Opened by this release: migrated, every row kept, tagged as the KMS mirror's.
    let store = store_on(db, dir.path()).await;
    let before = reference.chain_events(chain_id, "kms").await.unwrap();
    assert_eq!(store.chain_events(chain_id, "kms").await.unwrap(), before);
    assert_eq!(
        store.chain_checkpoint(chain_id).await.unwrap(),
        reference.chain_checkpoint(chain_id).await.unwrap()
    );
    let identities = store.chain_projections(chain_id).await.unwrap();
    assert_eq!(identities.len(), 1);
    assert_eq!(
        (
            identities[0].name.as_str(),
            identities[0].identity.as_slice()
        ),
        ("kms", c.d.kms.as_slice())
    );

    // It continues where the previous release stopped: nothing fetched again.
    let e = engine(&[c.anvil.url()], &c.d, &store, |_| {});
    e.caught_up_to(head).await;
    assert_eq!(
        e.metric_with("dstack_chain_rpc_requests_total", GET_LOGS),
        0.0
    );
    assert!(
        e.mirror.snapshot().apps[&c.d.app]
            .compose_hashes
            .contains(&h(4))
    );
    send!(c.app(c.d.app).removeComposeHash(h(4)), c.owner);
    e.until("compose hash removed", |m| {
        !m.apps[&c.d.app].compose_hashes.contains(&h(4))
    })
    .await;
    let head = c.head().await;
    e.caught_up_to(head).await;
    assert_eq!(e.metric("dstack_chain_resyncs_total"), 0.0);
    assert_eq!(e.metric("dstack_chain_reorgs_total"), 0.0);

    // No row lost or duplicated: the rows of before, then the new ones; the same logs and the same
    // mirror as a store synced from scratch (whose observations may sit at other blocks: it first
    // saw the KMS contract's code at another range's end).
    let continued = store.chain_events(chain_id, "kms").await.unwrap();
    assert_eq!(continued[..before.len()], before[..]);
    assert!(continued.len() > before.len());
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = sqlite_store(fresh_dir.path()).await;
    let f = engine(&[c.anvil.url()], &c.d, &fresh, |_| {});
    f.caught_up_to(head).await;
    assert_eq!(*f.mirror.snapshot(), *e.mirror.snapshot());
    f.stop().await;
    e.stop().await;
    assert_eq!(
        logs(continued),
        logs(fresh.chain_events(chain_id, "kms").await.unwrap())
    );
    store.close().await;
}

#[tokio::test]
async fn a_store_of_the_release_before_projections_continues_without_resync_on_sqlite() {
    previous_release_store_continues(None).await;
}

#[tokio::test]
async fn a_store_of_the_release_before_projections_continues_without_resync_on_postgres() {
    let db = common::PgDb::create().await;
    previous_release_store_continues(Some(&db)).await;
    db.drop_now().await;
}

#[tokio::test]
async fn a_second_projection_shares_the_log_rounds_and_added_later_gets_only_its_history() {
    let c = chain().await;
    let second = activity(&c).await;
    let chain_id = c.provider.get_chain_id().await.unwrap();
    let head = c.head().await;
    // Small ranges, so that the sync takes several rounds.
    let small = |cfg: &mut keywarden::chain::ChainConfig| cfg.max_batch_blocks = 2;

    let alone_dir = tempfile::tempdir().unwrap();
    let alone = sqlite_store(alone_dir.path()).await;
    let e = engine(&[c.anvil.url()], &c.d, &alone, small);
    e.caught_up_to(head).await;
    let rounds_alone = e.metric_with("dstack_chain_rpc_requests_total", GET_LOGS);
    e.stop().await;

    // A projection watching the KMS contract (which the mirror watches too) and a contract the
    // mirror does not: the same rounds, each with one more address.
    let both_dir = tempfile::tempdir().unwrap();
    let both = sqlite_store(both_dir.path()).await;
    let watched = [c.d.kms, c.d.app_implementation];
    let (every, published) = EveryLog::new(&watched);
    let e = engine_with(&[c.anvil.url()], &c.d, &both, vec![Box::new(every)], small);
    e.caught_up_to(head).await;
    assert_eq!(
        e.metric_with("dstack_chain_rpc_requests_total", GET_LOGS),
        rounds_alone
    );
    e.stop().await;
    let mut expected = logs_of(&c, c.d.kms, c.d.block).await;
    expected.extend(logs_of(&c, c.d.app_implementation, c.d.block).await);
    expected.sort();
    assert_eq!(positions(&published.lock().unwrap()), expected);
    assert_eq!(
        positions(&both.chain_events(chain_id, "every_log").await.unwrap()),
        expected
    );
    let kms_rows = alone.chain_events(chain_id, "kms").await.unwrap();
    assert_eq!(both.chain_events(chain_id, "kms").await.unwrap(), kms_rows);

    // Added to a store that only had the mirror: its history up to the checkpoint is fetched for
    // its address alone; the mirror's rows and the checkpoint stay.
    let checkpoint = alone.chain_checkpoint(chain_id).await.unwrap().unwrap();
    let second_logs = logs_of(&c, second, c.d.block).await;
    assert!(!second_logs.is_empty());
    let (every, published) = EveryLog::new(&[second]);
    let e = engine_with(&[c.anvil.url()], &c.d, &alone, vec![Box::new(every)], small);
    e.caught_up_to(head).await;
    assert_eq!(positions(&published.lock().unwrap()), second_logs);
    assert_eq!(alone.chain_events(chain_id, "kms").await.unwrap(), kms_rows);
    let after = alone.chain_checkpoint(chain_id).await.unwrap().unwrap();
    assert_eq!(
        (after.start_block, after.processed_block),
        (checkpoint.start_block, checkpoint.processed_block)
    );
    assert_eq!(e.metric("dstack_chain_resyncs_total"), 0.0);
    // It then follows like the mirror: a new log of its contract reaches both.
    send!(c.app(second).addComposeHash(h(6)), c.owner);
    e.until("compose hash added", |m| {
        m.apps[&second].compose_hashes.contains(&h(6))
    })
    .await;
    e.caught_up_to(c.head().await).await;
    let now = logs_of(&c, second, c.d.block).await;
    assert_eq!(positions(&published.lock().unwrap()), now);
    assert!(now.len() > second_logs.len());
    e.stop().await;
}

#[tokio::test]
async fn another_kms_contract_refetches_the_kms_projection_alone_and_keeps_the_checkpoint() {
    let c = chain().await;
    activity(&c).await;
    let chain_id = c.provider.get_chain_id().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let (every, _) = EveryLog::new(&[c.d.app]);
    let e = engine_with(
        &[c.anvil.url()],
        &c.d,
        &store,
        vec![Box::new(every)],
        |_| {},
    );
    e.caught_up_to(c.head().await).await;
    e.stop().await;
    let every_rows = store.chain_events(chain_id, "every_log").await.unwrap();

    // A second KMS on the same chain, configured with the same start block.
    let mut other = keywarden::sim::deploy::deploy(&c.anvil.url())
        .await
        .unwrap();
    send!(
        keywarden::chain::contracts::DstackApp::new(other.app, c.provider.clone())
            .addComposeHash(h(7)),
        c.owner
    );
    let head = c.head().await;
    other.block = c.d.block;
    let (every, published) = EveryLog::new(&[c.d.app]);
    let e = engine_with(
        &[c.anvil.url()],
        &other,
        &store,
        vec![Box::new(every)],
        |_| {},
    );
    e.caught_up_to(head).await;
    let m = e.mirror.snapshot();
    assert_eq!(m.kms_address, other.kms);
    assert!(m.apps[&other.app].compose_hashes.contains(&h(7)));
    assert!(
        !m.apps.contains_key(&c.d.app),
        "the first KMS's app is gone"
    );
    assert_eq!(e.metric("dstack_chain_resyncs_total"), 0.0);
    e.stop().await;
    // The other projection kept its rows (not fetched again, not rewound).
    assert_eq!(&*published.lock().unwrap(), &every_rows);
    let projections = store.chain_projections(chain_id).await.unwrap();
    let kms = projections.iter().find(|p| p.name == "kms").unwrap();
    assert_eq!(kms.identity, other.kms.to_vec());

    // The same mirror, and the same logs, as a store that only ever followed the second KMS
    // (observations may be made at other blocks: its code was first seen at another range's end).
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = sqlite_store(fresh_dir.path()).await;
    let e = engine(&[c.anvil.url()], &other, &fresh, |_| {});
    e.caught_up_to(head).await;
    assert_eq!(*e.mirror.snapshot(), *m);
    e.stop().await;
    assert_eq!(
        logs(store.chain_events(chain_id, "kms").await.unwrap()),
        logs(fresh.chain_events(chain_id, "kms").await.unwrap())
    );
}
