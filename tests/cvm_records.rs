//! CVM health from the KMS's own records: instances found at start-up are history; a first boot
//! recorded afterwards is a deployment, a later boot a restart (counted, with the fleet gauges);
//! `cvm list` / `cvm show` join each instance with its newest refusal since its last boot and list
//! the instances only ever refused. Joined with a polled (in-test) dstack-vmm: a VM stuck before
//! its keys is named with the KMS's refusal, and an instance that got keys on no polled VMM is
//! unmonitored. SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(unused_macros)]
#[path = "support/chain_engine.rs"]
mod chain_engine;
mod common;
#[path = "support/vmm.rs"]
mod fake;
mod support;

use std::time::{Duration, Instant};

use chain_engine::store_on;
use std::sync::Arc;

use keywarden::cvm::config::VmmEntry;
use keywarden::cvm::metrics::CvmMetrics;
use keywarden::cvm::poller::{CvmView, VmmPoller};
use keywarden::cvm::records::RecordsWatcher;
use keywarden::runtime::Task;
use keywarden::store::{AuditRecord, BootObservation, LedgerEntry, Store};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const APP: &str = "a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0";

fn instance(n: u8) -> String {
    hex::encode([n; 20])
}

fn boot(n: u8, at: i64) -> LedgerEntry {
    LedgerEntry {
        boot: Some(BootObservation {
            app_id: APP.into(),
            instance_id: instance(n),
            at,
            mr_aggregated: "aa".repeat(32),
            compose_hash: "cc".repeat(32),
            os_image_hash: "bb".repeat(32),
            device_id: "dd".repeat(32),
        }),
        audit: AuditRecord::new("key_request", "ok", &json!({})),
    }
}

fn refusal(n: u8, at: i64, reason: &str) -> LedgerEntry {
    let mut audit = AuditRecord::new(
        "key_request",
        "refused",
        &json!({"app_id": APP, "instance_id": instance(n), "reason": reason, "message": "Boot denied"}),
    );
    audit.at = at;
    LedgerEntry { boot: None, audit }
}

fn metric(registry: &Registry, line: &str) -> f64 {
    let text = keywarden::telemetry::encode(registry).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{line} ")))
        .unwrap_or_else(|| panic!("no {line} in {text}"))
        .parse()
        .unwrap()
}

async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `keywarden ARGS --database-url URL` (with `--config CONFIG` first when given).
async fn cli(config: Option<&std::path::Path>, url: &str, args: &[&str]) -> (i32, String, String) {
    let mut all: Vec<String> = config
        .map(|c| vec!["--config".to_owned(), c.display().to_string()])
        .unwrap_or_default();
    all.extend(args.iter().map(ToString::to_string));
    all.extend(["--database-url".into(), url.into()]);
    tokio::task::spawn_blocking(move || {
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        common::run_to_end(&all, &[])
    })
    .await
    .unwrap()
}

async fn fleet_from_boot_records(db: Option<&common::PgDb>) {
    let dir = tempfile::tempdir().unwrap();
    let store: Store = store_on(db, dir.path()).await;
    let url = match db {
        Some(db) => db.url.clone(),
        None => format!("sqlite://{}", dir.path().join("kw.db").display()),
    };
    let now = keywarden::clock::unix_secs_i64();
    // History: instance 1 booted before the watcher looked.
    store.record_ledger(&[boot(1, now - 60)]).await.unwrap();

    // One VMM runs instance 1 (booted) and instance 3 (stuck at its key request for 10 minutes).
    let mut stuck = fake::running(3, "stuck", "10m");
    stuck["instance_id"] = json!(instance(3));
    stuck["boot_progress"] = json!("requesting app keys");
    stuck["events"] = json!([]);
    let mut booted = fake::running(1, "booted", "1h 0m 0s");
    booted["instance_id"] = json!(instance(1));
    let (vmm_url, server) = fake::serve(fake::vmm(vec![booted, stuck]), true, dir.path()).await;
    let token = dir.path().join("vmm-token");
    std::fs::write(&token, fake::TOKEN).unwrap();
    let entry = VmmEntry {
        url: vmm_url.clone(),
        token: Some(keywarden::secret::SecretRef::File(token)),
        poll_interval: Duration::from_secs(15),
        concurrency: 4,
    };
    let mut registry = Registry::default();
    let metrics = CvmMetrics::new(&mut registry, 500);
    let view = Arc::new(CvmView::new(1));
    let mut poller = VmmPoller::new(
        0,
        &entry,
        Duration::from_secs(2),
        view.clone(),
        metrics.clone(),
    )
    .unwrap();
    poller.poll_once().await.unwrap();
    let timeout = Duration::from_secs(300);
    let window = Duration::from_secs(7 * 86400);
    let watcher = RecordsWatcher::new(store.clone(), metrics, view.clone(), timeout, window);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(watcher.run(cancel.clone()));
    until("the history is loaded", || {
        metric(&registry, "dstack_cvm_known_instances") == 1.0
    })
    .await;
    assert_eq!(metric(&registry, "dstack_cvm_deployments_total"), 0.0);

    // Instance 2 deploys, instance 1 restarts; 2 is refused afterwards, 3 is only ever refused.
    store
        .record_ledger(&[
            boot(2, now),
            boot(1, now),
            refusal(2, now + 1, "not_authorized"),
            refusal(3, now - 5, "attestation_rejected"),
            refusal(3, now - 1, "not_authorized"),
            refusal(1, now - 120, "os_image_rejected"),
        ])
        .await
        .unwrap();
    until("the deployment and the restart are counted", || {
        metric(&registry, "dstack_cvm_deployments_total") == 1.0
            && metric(&registry, "dstack_cvm_restarts_total{source=\"kms\"}") == 1.0
    })
    .await;
    assert_eq!(metric(&registry, "dstack_cvm_known_instances"), 2.0);
    assert_eq!(
        metric(&registry, "dstack_cvm_last_boot_timestamp_seconds"),
        now as f64
    );
    // Instance 2 got keys on no polled VMM; the VM of instance 3 is stuck.
    until("the fleet join is exported", || {
        metric(&registry, "dstack_cvm_unmonitored_instances") == 1.0
            && metric(&registry, "dstack_cvm_stuck_instances") == 1.0
    })
    .await;
    // Seen once: looking again counts nothing more.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(metric(&registry, "dstack_cvm_deployments_total"), 1.0);
    cancel.cancel();
    task.await.unwrap().unwrap();

    // The join names the stuck VM with the KMS's refusal, and the unmonitored instance.
    let report = keywarden::cvm::report::fleet(&store).await.unwrap();
    let since = now - 86400;
    let joined =
        keywarden::cvm::report::join_vms(&report, &view.all(), view.complete(), timeout, since);
    assert_eq!(joined.stuck.len(), 1);
    assert_eq!(joined.stuck[0].vm.name, "stuck");
    assert_eq!(
        joined.stuck[0].refusal.as_ref().unwrap().reason,
        "not_authorized"
    );
    let unlisted: Vec<String> = joined
        .unmonitored
        .unwrap()
        .into_iter()
        .map(|r| r.instance_id)
        .collect();
    assert_eq!(unlisted, vec![instance(2)]);

    // The same from a shell, the VMM looked at once: `cvm list` with the VMs beside the records.
    let config = dir.path().join("keywarden.toml");
    std::fs::write(
        &config,
        format!(
            "[[cvm.vmm]]\nurl = {vmm_url:?}\ntoken = {:?}\n",
            format!("file:{}", dir.path().join("vmm-token").display())
        ),
    )
    .unwrap();
    let config = Some(config.as_path());
    let (code, out, err) = cli(config, &url, &["cvm", "list", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let by_id = |n: u8| {
        v["records"]["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["instance_id"] == instance(n))
            .unwrap_or_else(|| panic!("no instance {n} in {v}"))
            .clone()
    };
    assert_eq!(by_id(1)["state"], "restarted");
    assert_eq!(by_id(1)["boot_count"], 2);
    // Refused before its latest boot: nothing to say about it now.
    assert!(by_id(1)["last_refusal"].is_null());
    assert_eq!(by_id(2)["state"], "deployed");
    assert_eq!(by_id(2)["last_refusal"]["reason"], "not_authorized");
    assert_eq!(by_id(2)["compose_hash"], "cc".repeat(32));
    let only = v["records"]["refused_only"].as_array().unwrap();
    assert_eq!(only.len(), 1, "{v}");
    assert_eq!(only[0]["instance_id"], instance(3));
    assert_eq!(only[0]["reason"], "not_authorized");
    assert_eq!(v["vms"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["joined"]["stuck"][0]["vm"]["name"], "stuck");
    assert_eq!(v["joined"]["unmonitored"][0]["instance_id"], instance(2));
    assert_eq!(v["failed_sources"], json!([]));

    let (code, out, err) = cli(config, &url, &["cvm", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("refused at the key step, never received keys"),
        "{out}"
    );
    assert!(
        out.contains("2 instance(s) received keys; 1 more only refused"),
        "{out}"
    );
    let row = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no VM {name} in {out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    // Columns: name, app, status, uptime, boot time (about 40 s), memory, containers.
    let booted = row("booted");
    assert!(booted.starts_with("booted booted-app running 1h "), "{out}");
    assert!(booted.contains("s 95% 1/1 running "), "{out}");
    assert!(booted.contains("2 boot(s), last "), "{out}");
    assert!(row("stuck").contains("refused: not_authorized"), "{out}");
    assert!(
        out.contains("stuck at key request: VM stuck")
            && out.contains("the KMS refused it: not_authorized"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "warning: unmonitored host: instance {}",
            instance(2)
        )),
        "{out}"
    );
    // Only the records: no VMM asked.
    let (code, out, err) = cli(config, &url, &["cvm", "list", "--records-only"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("on the dstack-vmm hosts"), "{out}");

    let (code, out, err) = cli(
        config,
        &url,
        &["cvm", "show", &format!("0x{}", &instance(1)[..6])],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("restarted (2 boot(s), 1 restart(s))"), "{out}");
    assert!(out.contains("vm              booted ("), "{out}");
    assert!(out.contains("memory          95.0% in use"), "{out}");
    assert!(
        out.contains("  app                  running     Up 2 hours (healthy)"),
        "{out}"
    );
    // By the VM's name; a VM that never received keys shows only the VM.
    let (code, out, err) = cli(config, &url, &["cvm", "show", "stuck", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["instance"].is_null(), "{v}");
    assert_eq!(v["vm"]["boot_progress"], "requesting app keys");
    let (code, _, err) = cli(None, &url, &["cvm", "show", "abz"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("no instance \"abz\" received keys"), "{err}");
    let (code, _, err) = cli(config, &url, &["cvm", "show", "ffff"]).await;
    assert_eq!(code, 2);
    assert!(
        err.contains("no instance \"ffff\"") && err.contains("no VM on the configured VMMs"),
        "{err}"
    );
    // A VMM that does not answer: named, and the records still shown.
    server.abort();
    let _ = server.await;
    let (code, out, err) = cli(config, &url, &["cvm", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!(
            "warning: {vmm_url} gave no usable answer: unreachable"
        )),
        "{err}"
    );
    assert!(out.contains("2 instance(s) received keys"), "{out}");
    store.close().await;
}

#[tokio::test]
async fn deployments_and_restarts_come_from_the_boot_records_on_sqlite() {
    fleet_from_boot_records(None).await;
}

#[tokio::test]
async fn deployments_and_restarts_come_from_the_boot_records_on_postgres() {
    let db = common::PgDb::create().await;
    fleet_from_boot_records(Some(&db)).await;
    db.drop_now().await;
}
