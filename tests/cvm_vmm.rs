//! CVM health from dstack-vmm: an in-test VMM (every real one needs TDX or SEV hardware) serving
//! exactly the documented JSON, over a unix socket and over TCP, with a token. A VM booting to
//! `done` has its boot time measured; four uptime resets are four restarts; a container going
//! into `restarting` is a container restart; memory at 95% is exported; an exited VM with a boot
//! error is in `error`; a malformed answer and a VMM gone are source errors whose VMs' series are
//! removed, not zeroed; the legacy `Teepod.` paths are followed; a wrong token is `unauthorized`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/vmm.rs"]
mod fake;

use std::sync::Arc;
use std::time::Duration;

use fake::{Shared, TOKEN, containers, web};
use keywarden::cvm::client::VmmClient;
use keywarden::cvm::config::VmmEntry;
use keywarden::cvm::metrics::CvmMetrics;
use keywarden::cvm::poller::{CvmView, VmmPoller};
use keywarden::secret::SecretRef;
use prometheus_client::registry::Registry;

struct Polled {
    vmm: Shared,
    metrics: CvmMetrics,
    poller: VmmPoller,
    view: Arc<CvmView>,
    registry: Registry,
    _dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

/// The in-test VMM on a unix socket (or TCP), and a poller of it with the token from a file.
async fn start(unix: bool, token: &str) -> Polled {
    let vmm = fake::vmm(vec![web("1h 0m 0s"), fake::broken()]);
    let dir = tempfile::tempdir().unwrap();
    let (url, server) = fake::serve(vmm.clone(), unix, dir.path()).await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let entry = VmmEntry {
        url: url.clone(),
        token: Some(SecretRef::File(token_file)),
        poll_interval: Duration::from_secs(15),
        concurrency: 4,
    };
    let mut registry = Registry::default();
    let metrics = CvmMetrics::new(&mut registry, 500);
    let view = Arc::new(CvmView::new(1));
    let poller = VmmPoller::new(
        0,
        &entry,
        Duration::from_secs(2),
        view.clone(),
        metrics.clone(),
    )
    .unwrap();
    Polled {
        vmm,
        metrics,
        poller,
        view,
        registry,
        _dir: dir,
        server,
    }
}

impl Polled {
    fn metric(&self, series: &str) -> Option<f64> {
        let text = keywarden::telemetry::encode(&self.registry).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{series} ")))
            .map(|v| v.parse().unwrap())
    }

    fn vm(&self, name: &str) -> keywarden::cvm::vmm::VmView {
        self.view
            .all()
            .into_iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("no VM {name} in {:?}", self.view.all()))
    }
}

#[tokio::test]
async fn a_vmm_over_a_unix_socket_is_polled_into_status_restarts_and_memory() {
    let mut p = start(true, TOKEN).await;
    p.poller.poll_once().await.unwrap();
    let web_vm = p.vm("web");
    assert_eq!(web_vm.status, "running");
    assert_eq!(web_vm.uptime_seconds, Some(3600));
    // Started an hour ago (poll time − uptime), done 40 s later.
    let boot = web_vm.boot_seconds.unwrap();
    assert!((39.0..42.0).contains(&boot), "{boot}");
    assert_eq!(web_vm.memory_ratio, Some(0.95));
    assert_eq!(web_vm.containers[0].name, "app");
    let batch = p.vm("batch");
    assert_eq!(batch.status, "error");
    assert_eq!(
        batch.boot_error.as_deref(),
        Some("failed to mount the data disk")
    );
    assert_eq!(
        p.metric("dstack_cvm_instances{status=\"running\"}"),
        Some(1.0)
    );
    assert_eq!(
        p.metric("dstack_cvm_instances{status=\"error\"}"),
        Some(1.0)
    );
    assert_eq!(
        p.metric("dstack_cvm_up{instance=\"web\",app=\"web-app\"}"),
        Some(1.0)
    );
    assert_eq!(
        p.metric("dstack_cvm_up{instance=\"batch\",app=\"\"}"),
        Some(0.0)
    );
    assert_eq!(
        p.metric("dstack_cvm_memory_usage_ratio{instance=\"web\",app=\"web-app\"}"),
        Some(0.95)
    );
    assert_eq!(
        p.metric("dstack_cvm_boot_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        p.metric("dstack_cvm_source_polls_total{source=\"vmm\",outcome=\"ok\"}"),
        Some(1.0)
    );

    // A restart loop: four uptime resets.
    for _ in 0..4 {
        p.vmm.lock().unwrap().vms[0] = web("4s");
        p.poller.poll_once().await.unwrap();
        p.vmm.lock().unwrap().vms[0] = web("30m");
        p.poller.poll_once().await.unwrap();
    }
    assert_eq!(p.vm("web").restarts, 4);
    assert_eq!(
        p.metric("dstack_cvm_restarts_total{source=\"vmm\"}"),
        Some(4.0)
    );

    // A container goes into restarting: one container restart, however long it stays there.
    p.vmm.lock().unwrap().containers = containers("restarting", "Restarting (1) 3 seconds ago");
    p.poller.poll_once().await.unwrap();
    p.poller.poll_once().await.unwrap();
    assert_eq!(p.vm("web").container_restarts, 1);
    assert_eq!(p.metric("dstack_cvm_container_restarts_total"), Some(1.0));

    // A malformed answer: a source error, and the VMs' series go instead of turning into zeros.
    p.vmm.lock().unwrap().malformed = true;
    assert!(matches!(
        p.poller.poll_once().await,
        Err(keywarden::cvm::client::SourceError::Malformed(_))
    ));
    assert_eq!(
        p.metric("dstack_cvm_source_polls_total{source=\"vmm\",outcome=\"malformed\"}"),
        Some(1.0)
    );
    assert_eq!(
        p.metric("dstack_cvm_up{instance=\"web\",app=\"web-app\"}"),
        None
    );
    assert_eq!(
        p.metric("dstack_cvm_memory_usage_ratio{instance=\"web\",app=\"web-app\"}"),
        None
    );
    assert_eq!(
        p.metric("dstack_cvm_instances{status=\"running\"}"),
        Some(0.0)
    );
    assert!(p.view.all().is_empty());

    // It answers again, then goes away: unreachable, series gone again.
    p.vmm.lock().unwrap().malformed = false;
    p.poller.poll_once().await.unwrap();
    assert_eq!(
        p.metric("dstack_cvm_up{instance=\"web\",app=\"web-app\"}"),
        Some(1.0)
    );
    p.server.abort();
    let _ = (&mut p.server).await;
    p.poller.poll_once().await.unwrap_err();
    assert_eq!(
        p.metric("dstack_cvm_source_polls_total{source=\"vmm\",outcome=\"unreachable\"}"),
        Some(1.0)
    );
    assert_eq!(
        p.metric("dstack_cvm_up{instance=\"web\",app=\"web-app\"}"),
        None
    );
}

#[tokio::test]
async fn legacy_teepod_paths_over_tcp_are_followed_and_a_wrong_token_is_unauthorized() {
    let mut p = start(false, TOKEN).await;
    p.vmm.lock().unwrap().legacy = true;
    p.poller.poll_once().await.unwrap();
    assert_eq!(p.vm("web").status, "running");
    assert_eq!(
        p.metric("dstack_cvm_instances{status=\"running\"}"),
        Some(1.0)
    );

    let mut wrong = start(false, "not-the-token").await;
    wrong.poller.poll_once().await.unwrap_err();
    assert_eq!(
        wrong.metric("dstack_cvm_source_polls_total{source=\"vmm\",outcome=\"unauthorized\"}"),
        Some(1.0)
    );
    assert!(wrong.view.all().is_empty());
}

#[tokio::test]
async fn per_instance_series_are_capped_and_aggregates_stay() {
    let mut p = start(true, TOKEN).await;
    let mut registry = Registry::default();
    let metrics = CvmMetrics::new(&mut registry, 1);
    // Reuse the VMM with a poller whose metrics cap per-instance series at one VM.
    p.poller.poll_once().await.unwrap();
    metrics.publish(&p.view.all());
    let text = keywarden::telemetry::encode(&registry).unwrap();
    assert_eq!(text.matches("dstack_cvm_up{").count(), 1, "{text}");
    assert!(
        text.contains("dstack_cvm_instance_series_capped 1"),
        "{text}"
    );
    assert!(
        text.contains("dstack_cvm_instances{status=\"error\"} 1"),
        "{text}"
    );
}

/// `keywarden serve` with a `[[cvm.vmm]]` entry (set through the environment) polls it and shows
/// its VMs under `/admin/cvm` and in `/metrics`.
#[tokio::test]
async fn serve_polls_a_configured_vmm_and_shows_its_vms() {
    let vmm = fake::vmm(vec![web("1h 0m 0s"), fake::broken()]);
    let dir = tempfile::tempdir().unwrap();
    let (url, _server) = fake::serve(vmm, true, dir.path()).await;
    let (token, admin_token) = (dir.path().join("token"), dir.path().join("admin-token"));
    std::fs::write(&token, TOKEN).unwrap();
    std::fs::write(&admin_token, "cvm-admin").unwrap();
    let vmm_env = format!(
        "[{{url = \"{url}\", token = \"file:{}\", poll_interval = \"1s\"}}]",
        token.display()
    );
    let admin_env = format!("file:{}", admin_token.display());
    let mut kw = common::Keywarden::start(
        &dir.path().join("data"),
        &[],
        &[
            ("KEYWARDEN_CVM__VMM", &vmm_env),
            ("KEYWARDEN_ADMIN__TOKEN", &admin_env),
        ],
    );
    kw.wait_ready().await;
    let client = common::http();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let text = client
            .get(format!("http://{}/metrics", kw.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("dstack_cvm_instances{status=\"running\"} 1") {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "never polled: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        metrics.contains("dstack_cvm_up{instance=\"web\",app=\"web-app\"} 1"),
        "{metrics}"
    );
    let admin: serde_json::Value = client
        .get(format!("http://{}/admin/cvm", kw.admin))
        .bearer_auth("cvm-admin")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let statuses: Vec<(&str, &str)> = admin["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["status"].as_str().unwrap()))
        .collect();
    assert_eq!(statuses, vec![("batch", "error"), ("web", "running")]);
    assert!(admin["records"]["instances"].as_array().unwrap().is_empty());
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
}

/// Runs `keywarden --config CONFIG cvm logs ARGS` off the test's runtime (its servers keep
/// serving): (exit code, stdout, stderr).
fn cvm_logs(
    config: &std::path::Path,
    args: &[&str],
) -> tokio::task::JoinHandle<(i32, String, String)> {
    let mut all = vec![
        "--config".to_owned(),
        config.display().to_string(),
        "cvm".to_owned(),
        "logs".to_owned(),
    ];
    all.extend(args.iter().map(ToString::to_string));
    tokio::task::spawn_blocking(move || {
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        common::run_to_end(&all, &[])
    })
}

/// `keywarden cvm logs NAME` finds the VM on the configured VMM and prints its console (the
/// last lines asked, heartbeats skipped); `--follow` prints what comes later until the stream
/// ends; an unknown VM and an unknown channel are clear errors.
#[tokio::test]
async fn cvm_logs_prints_a_vms_console_without_heartbeats() {
    let vmm = fake::vmm(vec![web("1h 0m 0s"), fake::broken()]);
    let id = web("1h")["id"].as_str().unwrap().to_owned();
    vmm.lock()
        .unwrap()
        .serial
        .insert(id, (1..=5).map(|i| format!("console line {i}")).collect());
    let dir = tempfile::tempdir().unwrap();
    let (url, _server) = fake::serve(vmm, true, dir.path()).await;
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let config = dir.path().join("keywarden.toml");
    std::fs::write(
        &config,
        format!(
            "[[cvm.vmm]]\nurl = \"{url}\"\ntoken = \"file:{}\"\n",
            token.display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| cvm_logs(&config, args);
    let (code, out, err) = run(&["web", "--lines", "2"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "console line 4\nconsole line 5\n");
    let (code, out, err) = run(&["web", "--follow", "--channel", "stdout"])
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("console line 5\nfollowed line\n"), "{out}");
    assert!(!out.contains("heartbeat"), "{out}");
    let (code, _, err) = run(&["nope"]).await.unwrap();
    assert_eq!(code, 2);
    assert!(err.contains("no VM \"nope\""), "{err}");
    let (code, _, err) = run(&["web", "--channel", "audio"]).await.unwrap();
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run(&["web", "--container", "app"]).await.unwrap();
    assert_eq!(code, 2);
    assert!(err.contains("no [cvm.guest] is configured"), "{err}");
}

/// `keywarden cvm logs NAME --container app` reaches the VM's guest agent through the gateway
/// (`https://<instance_id>-8090.<base_domain>/logs/app`, over TLS trusting the configured CA)
/// and prints the container's logs, the tail asked, following until the stream ends; a
/// container the guest does not publish is named as such.
#[tokio::test]
async fn cvm_logs_of_a_container_come_from_its_guest_agent_through_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _server) = fake::serve(fake::vmm(vec![web("1h")]), true, dir.path()).await;
    let (agent, ca_pem, _agent) = fake::serve_tls(fake::guest_agent(), "dstack.test").await;
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let ca = dir.path().join("gateway-ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let config = dir.path().join("keywarden.toml");
    std::fs::write(
        &config,
        format!(
            "[[cvm.vmm]]\nurl = \"{url}\"\ntoken = \"file:{}\"\n\n[cvm.guest]\nbase_domain = \"dstack.test\"\nconnect_to = \"{agent}\"\nca_file = \"{}\"\n",
            token.display(),
            ca.display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| cvm_logs(&config, args);
    let (code, out, err) = run(&["web", "--container", "app", "--lines", "2"])
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "app line 4\napp line 5\n");
    // By instance id, without asking the VMM, and following.
    let instance = format!("0x{:040x}", 1);
    let (code, out, err) = run(&[&instance, "--container", "app", "--follow"])
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("app line 5\napp followed line\n"), "{out}");
    let (code, _, err) = run(&["web", "--container", "db"]).await.unwrap();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no container \"db\", or the app does not publish its containers' logs"),
        "{err}"
    );
    let (code, _, err) = run(&["web", "--container", "app", "--channel", "stderr"])
        .await
        .unwrap();
    assert_eq!(code, 2, "{err}");
}

/// With the gateway polled, each VM's instance has a last-seen time (its latest WireGuard
/// handshake) and stale handshakes are counted; a gateway gone leaves no last-seen series.
#[tokio::test]
async fn the_gateway_says_when_each_vm_was_last_seen() {
    let mut p = start(true, TOKEN).await;
    p.poller.poll_once().await.unwrap();
    let now = keywarden::clock::unix_secs();
    let hosts = std::sync::Arc::new(std::sync::Mutex::new(serde_json::json!([
        {"instance_id": format!("{:040x}", 1), "app_id": "ab", "latest_handshake": now - 10},
        {"instance_id": "ff", "app_id": "ab", "latest_handshake": now - 600}
    ])));
    let dir = tempfile::tempdir().unwrap();
    let (url, server) = fake::serve_app(fake::gateway(hosts), false, dir.path()).await;
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let entry = VmmEntry {
        url,
        token: Some(SecretRef::File(token)),
        poll_interval: Duration::from_secs(15),
        concurrency: 1,
    };
    let gateway = keywarden::cvm::gateway::GatewayPoller::new(
        VmmClient::new(&entry, Duration::from_secs(2)).unwrap(),
        entry.poll_interval,
        p.view.clone(),
        p.metrics.clone(),
    );
    gateway.poll_once().await.unwrap();
    assert_eq!(p.vm("web").last_seen, Some(now - 10));
    assert_eq!(p.vm("batch").last_seen, None);
    assert_eq!(
        p.metric("dstack_cvm_last_seen_timestamp_seconds{instance=\"web\",app=\"web-app\"}"),
        Some((now - 10) as f64)
    );
    assert_eq!(p.metric("dstack_cvm_gateway_hosts"), Some(2.0));
    assert_eq!(p.metric("dstack_cvm_gateway_stale_hosts"), Some(1.0));

    server.abort();
    let _ = server.await;
    gateway.poll_once().await.unwrap_err();
    assert_eq!(
        p.metric("dstack_cvm_source_polls_total{source=\"gateway\",outcome=\"unreachable\"}"),
        Some(1.0)
    );
    assert_eq!(
        p.metric("dstack_cvm_last_seen_timestamp_seconds{instance=\"web\",app=\"web-app\"}"),
        None
    );
    assert_eq!(p.vm("web").last_seen, None);
}
