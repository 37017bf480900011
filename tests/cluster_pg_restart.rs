//! PostgreSQL restarted under load (its own test binary: it stops the shared server). While the
//! database is down, key requests fail closed with 503 `store_unavailable` (no record, no
//! keys); nothing is half-written (every key released has exactly its boot record); once the
//! database is back, service resumes without restarting keywarden.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keywarden::sim::client::{ClientError, Guest, guest_spec, simulated_vm_config};
use sqlx::Row as _;

/// The newest local PostgreSQL cluster's version, when `pg_ctlcluster` can restart it.
fn cluster_version() -> Option<String> {
    Command::new("pg_ctlcluster").arg("--help").output().ok()?;
    let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    versions.sort_by_key(|v| v.parse::<u32>().unwrap_or(0));
    versions.pop()
}

fn pg_ctl(version: &str, action: &str) {
    let ok = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, "main", action])
        .status()
        .unwrap()
        .success();
    assert!(ok, "pg_ctlcluster {version} main {action} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_fails_key_requests_closed_and_service_resumes_by_itself() {
    let Some(version) = cluster_version() else {
        eprintln!(
            "SKIPPED: no pg_ctlcluster / Debian PostgreSQL cluster to restart on this machine"
        );
        return;
    };
    let db = common::PgDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut kw, pki) = common::start_with_test_pki(
        dir.path(),
        &[
            ("KEYWARDEN_STORAGE__DATABASE_URL", &db.url),
            ("KEYWARDEN_STORAGE__CONNECT_TIMEOUT", "1s"),
            ("KEYWARDEN_CLUSTER__ENABLED", "true"),
            ("KEYWARDEN_CLUSTER__HEARTBEAT_INTERVAL", "1s"),
            ("KEYWARDEN_AUTH__BACKEND", "dev"),
            ("KEYWARDEN_AUTH__INSECURE_DEV_AUTH", "true"),
        ],
    );
    kw.wait_ready().await;
    let ca = std::fs::read_to_string(dir.path().join("data/kms/root-ca.pem")).unwrap();
    let url = kw.api_url();
    let request = |n: u8| {
        let (url, ca, pki) = (url.clone(), ca.clone(), &pki);
        async move {
            let guest = Guest::enroll(
                &url,
                Some(ca),
                pki,
                &guest_spec([0xa1; 20], b"services: {}", vec![n; 20]),
                true,
            )
            .await?;
            guest.get_app_key(&simulated_vm_config()).await
        }
    };
    assert!(request(1).await.is_ok());

    // Load while the database goes down for 3 s and comes back.
    let down = Arc::new(AtomicBool::new(false));
    let stopper = {
        let (down, version) = (down.clone(), version.clone());
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(500));
            pg_ctl(&version, "stop");
            down.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_secs(3));
            down.store(false, Ordering::SeqCst);
            pg_ctl(&version, "start");
        })
    };
    let (mut served, mut unavailable, mut while_down) = (1u64, 0u64, 0u64);
    let started = Instant::now();
    let mut n: u8 = 2;
    let resumed_at = loop {
        let was_down = down.load(Ordering::SeqCst);
        match request(n).await {
            Ok(_) => {
                served += 1;
                if stopper.is_finished() && unavailable > 0 {
                    break started.elapsed();
                }
            }
            Err(ClientError::Refused {
                status: 503,
                message,
            }) if message.contains("could not record the key release") => {
                unavailable += 1;
                while_down += u64::from(was_down);
            }
            Err(other) => panic!("a key request during the outage failed otherwise: {other:?}"),
        }
        n = n.wrapping_add(1).max(2);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "service never resumed: {served} served, {unavailable} refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stopper.await.unwrap();
    assert!(while_down > 0, "no request met the outage");

    // Nothing half-written: each key served has its boot record, each refusal none.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let boots: i64 =
        sqlx::query("SELECT COALESCE(SUM(boot_count), 0)::BIGINT AS n FROM boot_records")
            .fetch_one(&pool)
            .await
            .unwrap()
            .get("n");
    assert_eq!(boots, i64::try_from(served).unwrap());
    pool.close().await;
    assert!(
        kw.lines()
            .iter()
            .any(|l| l.contains("the key release could not be recorded; keys withheld"))
    );
    eprintln!(
        "postgres restart: {unavailable} request(s) refused with 503 while it was down, {served} served; resumed {resumed_at:?} after the load began"
    );
    assert_eq!(kw.terminate(Duration::from_secs(10)), 0);
    db.drop_now().await;
}
