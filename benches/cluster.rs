//! High-availability benchmark: three replicas on one PostgreSQL following one anvil chain.
//!
//! 1. failover: `kill -9` of the leader → the new leader's first committed batch (a block mined
//!    right after the kill, in the checkpoint, under a new leader), over 10 kills: median, max;
//! 2. revocation propagation: a compose hash removed on chain → refused by all three replicas,
//!    over 20 removals: median, p99;
//! 3. key throughput: closed-loop load on one replica, then spread over three (they share this
//!    machine's cores, so the ratio says what replication costs here, not what it buys).
//!
//! Run with `cargo bench --bench cluster`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/cluster.rs"]
mod cluster;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/support/guest_chain.rs"]
mod guest_chain;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use alloy::primitives::FixedBytes;
use cluster::{COMPOSE, Env, Replica, one_leader};
use keywarden::chain::contracts::DstackApp;
use keywarden::sim::client::{self, ClientError, Guest};
use keywarden::sim::loadgen::{Load, run};
use keywarden::sim::testpki::TestPki;
use sha2::{Digest as _, Sha256};

const KILLS: usize = 10;
const REVOCATIONS: usize = 20;
const LOAD: Duration = Duration::from_secs(5);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{name}: median {:?}, p99 {:?}, max {:?} over {}",
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v[v.len() - 1],
        v.len()
    );
}

async fn guest(r: &Replica, pki: &TestPki, app: alloy::primitives::Address) -> Guest {
    let ca = std::fs::read_to_string(r.data.join("kms/root-ca.pem")).unwrap();
    Guest::enroll(
        &r.kw.api_url(),
        Some(ca),
        pki,
        &client::guest_spec(app.into_array(), COMPOSE, vec![0x1d; 20]),
        false,
    )
    .await
    .unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let env = Env::new().await;
    let (chain, pki, db) = (&env.chain, &env.pki, &env.db);
    let quiet = [("RUST_LOG", "warn")];
    let mut all = env.replicas(3, &quiet).await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let app = DstackApp::new(chain.deployment.app, &chain.provider);
    let owner = chain.owner;

    // 1. Failover.
    let mut failovers = Vec::new();
    for k in 0..KILLS {
        let leader = one_leader(&all.iter().collect::<Vec<_>>(), Duration::from_secs(20)).await;
        let killed_id = std::fs::read_to_string(all[leader].data.join("replica-id"))
            .unwrap()
            .trim()
            .to_owned();
        all[leader].kw.kill9();
        let killed = Instant::now();
        let receipt = send!(
            app.addComposeHash(FixedBytes(Sha256::digest(format!("failover {k}")).into()))
                .from(owner)
        );
        let block = i64::try_from(receipt.block_number.unwrap()).unwrap();
        loop {
            let (node, processed): (String, i64) = sqlx::query_as(
                "SELECT l.node_id, c.processed_block FROM cluster_leader l, chain_checkpoints c",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            if node != killed_id && processed >= block {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "no new leader's batch"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        failovers.push(killed.elapsed());
        all[leader] = env.replica(leader, &quiet).await;
    }
    summary(
        "failover (kill -9 → new leader's first committed batch)",
        failovers,
    );

    // 2. Revocation propagation.
    let mut guests = Vec::new();
    for r in &all {
        guests.push(guest(r, pki, chain.deployment.app).await);
    }
    let hash = FixedBytes(Sha256::digest(COMPOSE).into());
    let mut propagation = Vec::new();
    for _ in 0..REVOCATIONS {
        send!(app.removeComposeHash(hash).from(owner));
        let sent = Instant::now();
        for g in &guests {
            while !matches!(
                g.get_app_key(&client::simulated_vm_config()).await,
                Err(ClientError::Refused { .. })
            ) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        propagation.push(sent.elapsed());
        send!(app.addComposeHash(hash).from(owner));
        for g in &guests {
            while g.get_app_key(&client::simulated_vm_config()).await.is_err() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    summary(
        "revocation propagation (receipt → refused by all three)",
        propagation,
    );

    // 3. Key throughput: one replica, then three.
    let single = run(
        guest(&all[0], pki, chain.deployment.app).await,
        Load::Closed { concurrency: 16 },
        LOAD,
        None,
    )
    .await;
    let mut spread = Vec::new();
    for r in &all {
        spread.push(tokio::spawn(run(
            guest(r, pki, chain.deployment.app).await,
            Load::Closed { concurrency: 16 },
            LOAD,
            None,
        )));
    }
    let mut three = 0.0;
    let mut errors = 0u64;
    for s in spread {
        let report = s.await.unwrap();
        three += report.throughput_rps;
        errors += report.errors.values().sum::<u64>();
    }
    println!(
        "key throughput: one replica {:.0}/s (p99 {:.1} ms), three replicas {three:.0}/s ({errors} errors); ratio {:.2}",
        single.throughput_rps,
        single.ok_latency_ms.p99,
        three / single.throughput_rps
    );
    pool.close().await;
    for mut r in all {
        r.kw.terminate(Duration::from_secs(10));
    }
    env.finish().await;
}
