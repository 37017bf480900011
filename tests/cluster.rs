//! Three replicas on one PostgreSQL, following one anvil chain: every replica serves identical
//! keys; exactly one leads; an on-chain revocation is refused by all three within 2 s of the
//! leader committing it; `kill -9` of the leader hands the leadership to another within 10 s,
//! which resumes from the checkpoint; a stale leader's write is refused by the fencing check.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/cluster.rs"]
mod cluster;
mod common;
#[path = "support/guest_chain.rs"]
mod guest_chain;
mod support;

use std::time::{Duration, Instant};

use alloy::primitives::FixedBytes;
use alloy::sol_types::SolCall as _;
use cluster::{COMPOSE, Env, Replica, app_key, one_leader};
use common::PgDb;
use guest_chain::through_timelock;
use keywarden::chain::contracts::DstackApp;
use keywarden::sim::client::{self, ClientError, Guest};
use sha2::{Digest as _, Sha256};

/// An in-test alert receiver: the `id` of every webhook delivery, in arrival order.
async fn receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let ids = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let ids = ids.clone();
            move |body: axum::Json<serde_json::Value>| {
                ids.lock()
                    .unwrap()
                    .push(body["id"].as_str().unwrap_or_default().to_owned());
                async { "ok" }
            }
        }),
    );
    (
        format!("http://{}/hook", common::serve_router(app).await),
        ids,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_serve_alike_follow_one_leader_and_fail_over() {
    let env = Env::new().await;
    let (chain, pki, db) = (&env.chain, &env.pki, &env.db);
    let (provider, app) = (&chain.provider, chain.deployment.app);
    // The app is governed by a timelock (delay 0) the owner account proposes to.
    let gov = chain.govern_app_by_timelock().await;

    let (hook, delivered) = receiver().await;
    let secret = env.dir.path().join("webhook-secret");
    std::fs::write(&secret, "cluster-test-secret").unwrap();
    let secret_ref = format!("file:{}", secret.display());
    let alerts = [
        ("KEYWARDEN_ALERTS__WEBHOOK_URL", hook.as_str()),
        ("KEYWARDEN_ALERTS__WEBHOOK_SECRET", secret_ref.as_str()),
    ];
    let mut all = env.replicas(3, &alerts).await;
    let leader = one_leader(&all.iter().collect::<Vec<_>>(), Duration::from_secs(10)).await;

    // Identical keys from every replica.
    let mut keys = Vec::new();
    for r in &all {
        keys.push(app_key(r, pki, app).await.unwrap());
    }
    assert!(keys.windows(2).all(|w| w[0] == w[1]), "replicas disagree");

    // `cluster status` names the leader and all three replicas.
    let (code, out, err) = common::run_to_end(
        &["cluster", "status", "--json", "--database-url", &db.url],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["replicas"].as_array().unwrap().len(), 3, "{status}");
    let leader_id = std::fs::read_to_string(all[leader].data.join("replica-id")).unwrap();
    assert_eq!(status["leader"]["node_id"], leader_id.trim());

    // A revocation: every replica refuses within 2 s of the leader committing it.
    let hash = FixedBytes(Sha256::digest(COMPOSE).into());
    let remove = DstackApp::removeComposeHashCall { composeHash: hash }.abi_encode();
    through_timelock(provider, gov, app, remove, (2, 0, true)).await;
    let sent = Instant::now();
    for (i, r) in all.iter().enumerate() {
        loop {
            match app_key(r, pki, app).await {
                Err(ClientError::Refused { message, .. })
                    if message.contains("Compose hash not allowed") =>
                {
                    break;
                }
                other => {
                    assert!(
                        sent.elapsed() < Duration::from_secs(3),
                        "replica {i} still answers {other:?} {:?} after the revocation",
                        sent.elapsed()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let propagation = sent.elapsed();
    assert!(propagation < Duration::from_secs(3), "{propagation:?}");
    let add = DstackApp::addComposeHashCall { composeHash: hash }.abi_encode();
    through_timelock(provider, gov, app, add, (3, 0, true)).await;
    for r in &all {
        let deadline = Instant::now() + Duration::from_secs(10);
        while app_key(r, pki, app).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the re-allowed compose hash never served"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Load spread over the three replicas while the leader is killed (kill -9) a second in.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let boots = || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT COALESCE(SUM(boot_count), 0)::BIGINT FROM boot_records",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let boots_before = boots().await;
    let mut loads = Vec::new();
    for r in &all {
        let ca = std::fs::read_to_string(r.data.join("kms/root-ca.pem")).unwrap();
        let guest = Guest::enroll(
            &r.kw.api_url(),
            Some(ca),
            pki,
            &client::guest_spec(app.into_array(), COMPOSE, vec![0x1d; 20]),
            false,
        )
        .await
        .unwrap();
        loads.push(tokio::spawn(keywarden::sim::loadgen::run(
            guest,
            keywarden::sim::loadgen::Load::Closed { concurrency: 2 },
            Duration::from_secs(3),
            None,
        )));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    all[leader].kw.kill9();
    let killed = Instant::now();
    let left: Vec<&Replica> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, r)| r)
        .collect();
    let next = one_leader(&left, Duration::from_secs(10)).await;
    let failover = killed.elapsed();
    assert!(failover < Duration::from_secs(10), "{failover:?}");
    // A governance operation scheduled during the failover (pending for an hour): the new
    // leader alerts it, once.
    let during = through_timelock(
        provider,
        gov,
        app,
        DstackApp::removeComposeHashCall { composeHash: hash }.abi_encode(),
        (4, 3600, false),
    )
    .await;
    let mut served = 0u64;
    for (i, load) in loads.into_iter().enumerate() {
        let report = load.await.unwrap();
        served += report.ok;
        if i == leader {
            assert!(report.ok > 0, "{report:?}");
            assert!(
                report.errors.keys().all(|k| k == "transport"),
                "the killed replica's clients saw only broken connections: {report:?}"
            );
        } else {
            assert!(
                report.errors.is_empty() && report.ok > 0,
                "a surviving replica failed requests during the failover: {report:?}"
            );
        }
    }
    // Concurrent boot records from three replicas: every key served was counted once; at most
    // the killed replica's two in-flight requests were recorded without an answer.
    let recorded = u64::try_from(boots().await - boots_before).unwrap();
    assert!(
        (served..=served + 2).contains(&recorded),
        "{recorded} boots recorded for {served} keys served"
    );
    pool.close().await;

    // Every alert delivered exactly once, the failover's included.
    let deadline = Instant::now() + Duration::from_secs(15);
    let scheduled = format!("{during}/scheduled");
    loop {
        let ids = delivered.lock().unwrap().clone();
        if ids.iter().any(|i| i.ends_with(&scheduled)) {
            let mut unique = ids.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(
                unique.len(),
                ids.len(),
                "an alert was delivered twice: {ids:#?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "alerts missing: {ids:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "cluster: revocation on all replicas within {propagation:?}; failover to replica {next} in {failover:?}"
    );
    for r in all.iter_mut() {
        if r.kw.pid() != 0 {
            assert_eq!(r.kw.terminate(Duration::from_secs(10)), 0);
        }
    }
    env.finish().await;
}

/// A fresh database whose leadership row says replica `a` leads at `epoch`: the database, a
/// store on it, and a connection to move the leadership as another replica would.
async fn led_store(epoch: i64) -> (PgDb, keywarden::store::Store, sqlx::PgConnection) {
    let db = PgDb::create().await;
    let store = keywarden::store::Store::open(
        &keywarden::config::StorageConfig::default(),
        &keywarden::config::DatabaseTarget::Postgres(db.url.clone()),
    )
    .await
    .unwrap();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO cluster_leader (id, epoch, node_id, since, beat) VALUES (1, $1, 'a', 0, 0)",
    )
    .bind(epoch)
    .execute(&mut conn)
    .await
    .unwrap();
    (db, store, conn)
}

/// Fencing: a write carrying an epoch that no longer leads is refused in its transaction, and
/// one carrying the current epoch passes.
#[tokio::test]
async fn a_stale_leaders_write_is_refused() {
    let (db, store, mut conn) = led_store(4).await;
    let checkpoint = keywarden::chain::store::Checkpoint {
        chain_id: 31337,
        start_block: 1,
        processed_block: 0,
        head_block: 0,
        head_seen_at: 0,
        updated_at: 0,
    };
    store.chain_reset(&checkpoint, Some(4)).await.unwrap();
    // Another replica took over: epoch 5.
    sqlx::query("UPDATE cluster_leader SET epoch = 5, node_id = 'b'")
        .execute(&mut conn)
        .await
        .unwrap();
    let stale = store.chain_record_head(31337, 9, 100, Some(4)).await;
    assert!(
        matches!(stale, Err(keywarden::store::StoreError::Fenced(4))),
        "{stale:?}"
    );
    assert_eq!(
        store
            .chain_checkpoint(31337)
            .await
            .unwrap()
            .unwrap()
            .head_block,
        0
    );
    store
        .chain_record_head(31337, 9, 100, Some(5))
        .await
        .unwrap();
    assert_eq!(
        store
            .chain_checkpoint(31337)
            .await
            .unwrap()
            .unwrap()
            .head_block,
        9
    );
    store.close().await;
    db.drop_now().await;
}

/// Alert delivery across a failover: a term claims a due delivery and dies mid-send; the next
/// term takes the claim over and delivers it (the alert is not lost), the dead term's late
/// mark is refused, and a delivered row is claimed by nobody again.
#[tokio::test]
async fn a_delivery_claimed_by_a_dead_leader_is_taken_over_not_lost() {
    use keywarden::alerts::outbox::Outbox;
    use keywarden::alerts::{Alert, Severity};
    let (db, store, mut conn) = led_store(1).await;
    let cfg = keywarden::alerts::config::AlertsConfig {
        slack_webhook_url: Some("http://127.0.0.1:9/slack".into()),
        ..Default::default()
    };
    let outbox = Outbox::new(store.clone(), &cfg.channels().unwrap());
    let alert = Alert {
        key: "timelock:0xabc:0x01".into(),
        transition: "scheduled".into(),
        name: "GovernanceProposal".into(),
        severity: Severity::Critical,
        labels: Default::default(),
        summary: "a proposal".into(),
        description: "details".into(),
        resolved: false,
    };
    assert!(outbox.record(&alert, true).await.unwrap());
    let now = keywarden::clock::unix_secs_i64();
    let due = store.alerts_due(now, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert!(
        store
            .alert_claim(&due[0], "term-a", now, Some(1))
            .await
            .unwrap()
    );
    assert!(
        !store
            .alert_claim(&due[0], "term-a", now, Some(1))
            .await
            .unwrap(),
        "a term does not claim what it holds"
    );
    // Leader a dies mid-send; b leads with epoch 2 and finds the row still due.
    sqlx::query("UPDATE cluster_leader SET epoch = 2, node_id = 'b'")
        .execute(&mut conn)
        .await
        .unwrap();
    let due = store.alerts_due(now, 10).await.unwrap();
    assert_eq!(due.len(), 1, "the claimed, unsent delivery is still due");
    assert!(
        store
            .alert_claim(&due[0], "term-b", now, Some(2))
            .await
            .unwrap()
    );
    let late = store.alert_delivered(&due[0], now, Some(1)).await;
    assert!(
        matches!(late, Err(keywarden::store::StoreError::Fenced(1))),
        "{late:?}"
    );
    store.alert_delivered(&due[0], now, Some(2)).await.unwrap();
    assert!(store.alerts_due(now, 10).await.unwrap().is_empty());
    assert!(
        !store
            .alert_claim(&due[0], "term-c", now, Some(2))
            .await
            .unwrap()
    );
    store.close().await;
    db.drop_now().await;
}

/// A leader whose lease session is cut (`pg_terminate_backend`, as a partition would) steps down
/// within a heartbeat; a new term begins (a higher epoch), and the replicas keep following the
/// chain: a revocation made afterwards is refused by both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_from_the_database_steps_down_and_a_new_term_begins() {
    let env = Env::new().await;
    let (chain, pki, db) = (&env.chain, &env.pki, &env.db);
    let all = env.replicas(2, &[]).await;
    let leader = one_leader(&all.iter().collect::<Vec<_>>(), Duration::from_secs(10)).await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let epoch = |pool: &sqlx::PgPool| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT epoch FROM cluster_leader WHERE id = 1")
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let before = epoch(&pool).await;
    let id = std::fs::read_to_string(all[leader].data.join("replica-id")).unwrap();
    let cut: i64 = sqlx::query_scalar(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(format!("keywarden-lease-{}", id.trim()))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(cut, 1, "the leader's lease session");
    let cut_at = Instant::now();
    let deadline = cut_at + Duration::from_secs(5);
    while !all[leader]
        .kw
        .lines()
        .iter()
        .any(|l| l.contains("lost the leadership"))
    {
        assert!(
            Instant::now() < deadline,
            "the cut leader never stepped down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stepped_down = cut_at.elapsed();
    assert!(stepped_down <= Duration::from_secs(1), "{stepped_down:?}");
    while epoch(&pool).await <= before {
        assert!(Instant::now() < deadline, "no new leadership term");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    one_leader(&all.iter().collect::<Vec<_>>(), Duration::from_secs(10)).await;

    let contract = DstackApp::new(chain.deployment.app, &chain.provider);
    send!(
        contract
            .removeComposeHash(FixedBytes(Sha256::digest(COMPOSE).into()))
            .from(chain.owner)
    );
    for r in &all {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(
            app_key(r, pki, chain.deployment.app).await,
            Err(ClientError::Refused { ref message, .. }) if message.contains("Compose hash not allowed")
        ) {
            assert!(
                Instant::now() < deadline,
                "the revocation never reached a replica"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!("cluster: a leader cut from the database stepped down in {stepped_down:?}");
    pool.close().await;
    for mut r in all {
        assert_eq!(r.kw.terminate(Duration::from_secs(10)), 0);
    }
    env.finish().await;
}
