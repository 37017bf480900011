//! The store suite, run against SQLite and against the real PostgreSQL server, each test on a
//! fresh database.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use keywarden::config::{DatabaseTarget, StorageConfig};
use keywarden::store::{AuditRecord, Store};

/// Runs `body` once on a fresh SQLite store and once on a fresh PostgreSQL database.
macro_rules! on_both_backends {
    ($name:ident, |$open:ident| $body:block) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn sqlite() {
                let dir = tempfile::tempdir().unwrap();
                let cfg = StorageConfig {
                    data_dir: dir.path().to_path_buf(),
                    ..Default::default()
                };
                let target = DatabaseTarget::Sqlite(dir.path().join("kw.db"));
                let $open = || Store::open(&cfg, &target);
                $body
            }

            #[tokio::test]
            async fn postgres() {
                let db = common::PgDb::create().await;
                let cfg = StorageConfig::default();
                let target = DatabaseTarget::Postgres(db.url.clone());
                {
                    let $open = || Store::open(&cfg, &target);
                    $body
                }
                db.drop_now().await;
            }
        }
    };
}

on_both_backends!(migrations_are_idempotent_across_restarts, |open| {
    let s = open().await.unwrap();
    s.ping(std::time::Duration::from_secs(2)).await.unwrap();
    s.close().await;
    let s = open().await.unwrap();
    s.ping(std::time::Duration::from_secs(2)).await.unwrap();
    s.close().await;
});

on_both_backends!(node_id_is_created_once_and_survives_restart, |open| {
    let s = open().await.unwrap();
    let (a, b, c) = tokio::join!(s.node_id(1), s.node_id(2), s.node_id(3));
    let a = a.unwrap();
    assert_eq!(a.len(), 32);
    assert_eq!(a, b.unwrap());
    assert_eq!(a, c.unwrap());
    s.close().await;
    let s = open().await.unwrap();
    assert_eq!(s.node_id(4).await.unwrap(), a);
    s.close().await;
});

on_both_backends!(
    an_unclean_previous_run_of_the_same_replica_is_detected,
    |open| {
        let s = open().await.unwrap();
        let first = s.begin_run("r1", "0.1.0", "abc", 10).await.unwrap();
        assert_eq!(first.runs, 1);
        assert!(!first.previous_unclean);
        // No end_run: the process "crashed".
        let second = s.begin_run("r1", "0.1.0", "abc", 20).await.unwrap();
        assert!(second.previous_unclean);
        assert_eq!(second.runs, 2);
        s.end_run(second.run_id, 30).await.unwrap();
        let third = s.begin_run("r1", "0.1.0", "abc", 40).await.unwrap();
        assert!(!third.previous_unclean);
        assert_eq!(third.runs, 3);
        // Another replica on the same database starts while r1 runs: its own first run, clean.
        let other = s.begin_run("r2", "0.1.0", "abc", 50).await.unwrap();
        assert!(!other.previous_unclean);
        assert_eq!(other.runs, 1);
        s.close().await;
    }
);

on_both_backends!(a_kept_value_is_replaced_and_survives_a_reopen, |open| {
    let s = open().await.unwrap();
    assert_eq!(s.meta("governance_notifier_block").await.unwrap(), None);
    s.set_meta("governance_notifier_block", "10", 1)
        .await
        .unwrap();
    s.set_meta("governance_notifier_block", "12", 2)
        .await
        .unwrap();
    s.close().await;
    let s = open().await.unwrap();
    assert_eq!(
        s.meta("governance_notifier_block")
            .await
            .unwrap()
            .as_deref(),
        Some("12")
    );
    s.close().await;
});

on_both_backends!(audit_records_come_back_newest_first, |open| {
    let s = open().await.unwrap();
    for i in 0..5 {
        s.append_audit(&AuditRecord {
            at: i,
            kind: "admin_auth".into(),
            outcome: if i % 2 == 0 { "refused" } else { "ok" }.into(),
            detail: format!("{{\"i\":{i}}}"),
        })
        .await
        .unwrap();
    }
    let recent = s.recent_audit(3).await.unwrap();
    assert_eq!(
        recent.iter().map(|r| r.at).collect::<Vec<_>>(),
        vec![4, 3, 2]
    );
    assert_eq!(recent[0].outcome, "refused");
    assert_eq!(recent[0].detail, "{\"i\":4}");
    s.close().await;
});

#[tokio::test]
async fn unreachable_postgres_is_a_clear_error() {
    let cfg = StorageConfig {
        connect_timeout: std::time::Duration::from_millis(500),
        ..Default::default()
    };
    let port = common::free_port();
    let err = Store::open(
        &cfg,
        &DatabaseTarget::Postgres(format!("postgres://kw:secretpw@127.0.0.1:{port}/kw")),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("cannot open database"), "{err}");
    assert!(err.contains("fix:"), "{err}");
    assert!(
        !err.contains("secretpw"),
        "password must be redacted: {err}"
    );
}

#[tokio::test]
async fn data_dir_under_a_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let cfg = StorageConfig::default();
    let err = Store::open(&cfg, &DatabaseTarget::Sqlite(file.join("sub/kw.db")))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot use data directory"), "{err}");
    assert!(err.contains("--data-dir"), "{err}");
}

on_both_backends!(collateral_cache_round_trips_and_replaces, |open| {
    use keywarden::attestation::collateral::{CachedCollateral, CollateralCache};
    use keywarden::sim::testpki::TestPki;
    let s = open().await.unwrap();
    assert!(s.get("00906ED50000", "platform").await.unwrap().is_none());
    let pki = TestPki::generate(1_700_000_000).unwrap();
    let first = CachedCollateral {
        collateral: pki.collateral().clone(),
        next_update: 1_700_086_400,
        fetched_at: 1_700_000_000,
    };
    s.put("00906ED50000", "platform", &first).await.unwrap();
    let got = s.get("00906ED50000", "platform").await.unwrap().unwrap();
    assert_eq!(got.next_update, first.next_update);
    assert_eq!(got.collateral.tcb_info, first.collateral.tcb_info);
    assert!(
        s.get("00906ED50000", "processor").await.unwrap().is_none(),
        "keyed by CA too"
    );
    let second = CachedCollateral {
        next_update: 1_700_172_800,
        fetched_at: 1_700_090_000,
        ..first
    };
    s.put("00906ED50000", "platform", &second).await.unwrap();
    let got = s.get("00906ED50000", "platform").await.unwrap().unwrap();
    assert_eq!(
        (got.next_update, got.fetched_at),
        (1_700_172_800, 1_700_090_000)
    );
    s.close().await;
    // Survives a restart.
    let s = open().await.unwrap();
    assert!(s.get("00906ED50000", "platform").await.unwrap().is_some());
    s.close().await;
});

on_both_backends!(
    ledger_batches_count_boots_and_store_their_audit_rows,
    |open| {
        use keywarden::store::{BootObservation, LedgerEntry};
        let s = open().await.unwrap();
        let entry = |at: i64, compose: &str| LedgerEntry {
            boot: Some(BootObservation {
                app_id: "aa".repeat(20),
                instance_id: "bb".repeat(20),
                at,
                mr_aggregated: "cc".repeat(32),
                compose_hash: compose.to_owned(),
                os_image_hash: "dd".repeat(32),
                device_id: "ee".repeat(32),
            }),
            audit: AuditRecord {
                at,
                kind: "key_request".into(),
                outcome: "ok".into(),
                detail: format!("{{\"at\":{at}}}"),
            },
        };
        assert!(
            s.boot_record(&"aa".repeat(20), &"bb".repeat(20))
                .await
                .unwrap()
                .is_none()
        );
        let first = s.record_ledger(&[entry(100, "01")]).await.unwrap();
        let first = first[0].clone().unwrap();
        assert_eq!(
            (first.first_boot, first.last_boot, first.boot_count),
            (100, 100, 1)
        );
        // One batch: each boot sees the count as of its place in the batch; a refusal's entry has no
        // boot record.
        let refusal = LedgerEntry {
            boot: None,
            ..entry(250, "02")
        };
        let batch = s
            .record_ledger(&[entry(200, "02"), refusal, entry(300, "02")])
            .await
            .unwrap();
        let counts: Vec<Option<i64>> = batch
            .iter()
            .map(|r| r.as_ref().map(|r| r.boot_count))
            .collect();
        assert_eq!(counts, vec![Some(2), None, Some(3)]);
        // Concurrent batches are all counted.
        let (e4, e5) = ([entry(400, "02")], [entry(401, "02")]);
        let (a, b) = tokio::join!(s.record_ledger(&e4), s.record_ledger(&e5));
        a.unwrap();
        b.unwrap();
        let rec = s
            .boot_record(&"aa".repeat(20), &"bb".repeat(20))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.boot_count, 5);
        assert_eq!(rec.first_boot, 100);
        let audits = s.recent_audit(10).await.unwrap();
        assert_eq!(audits.len(), 6, "{audits:?}");
        assert_eq!(audits.iter().filter(|a| a.at == 250).count(), 1);
        s.close().await;
    }
);

#[tokio::test]
async fn postgres_connections_are_encrypted_when_the_url_requires_tls() {
    use sqlx::Connection as _;
    let mut admin = sqlx::PgConnection::connect(&common::postgres_admin_url())
        .await
        .unwrap();
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    if ssl != "on" {
        eprintln!("SKIPPED: this PostgreSQL server has ssl off, so TLS cannot be tested here");
        return;
    }
    let db = common::PgDb::create().await;
    let name = db.url.rsplit_once('/').unwrap().1.to_owned();
    let target = DatabaseTarget::Postgres(format!("{}?sslmode=require", db.url));
    let store = Store::open(&StorageConfig::default(), &target)
        .await
        .unwrap();
    store.node_id(1).await.unwrap();
    let (all, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
         JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1",
    )
    .bind(&name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(
        all > 0 && encrypted == all,
        "{encrypted} of {all} connections use TLS"
    );
    store.close().await;
    db.drop_now().await;
}
