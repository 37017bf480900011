//! CVM health from dstack-vmm: an in-test VMM (every real one needs TDX or SEV hardware) serving
//! exactly the documented JSON, over a unix socket and over TCP, with a token. A VM booting to
//! `done` has its boot time measured; four uptime resets are four restarts; a container going
//! into `restarting` is a container restart; memory at 95% is exported; an exited VM with a boot
//! error is in `error`; a malformed answer and a VMM gone are source errors whose VMs' series are
//! removed, not zeroed; the legacy `Teepod.` paths are followed; a wrong token is `unauthorized`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use keywarden::cvm::client::VmmClient;
use keywarden::cvm::config::VmmEntry;
use keywarden::cvm::metrics::CvmMetrics;
use keywarden::cvm::poller::{CvmView, VmmPoller};
use keywarden::secret::SecretRef;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

const TOKEN: &str = "vmm-admin-token";

/// What the in-test VMM holds.
#[derive(Default)]
struct Vmm {
    vms: Vec<Value>,
    sys: Value,
    containers: Value,
    /// Answer `Status` with something that is not the documented shape.
    malformed: bool,
    /// Serve only the legacy `Teepod.` paths.
    legacy: bool,
}

type Shared = Arc<Mutex<Vmm>>;

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"))
}

async fn prpc(
    State(vmm): State<Shared>,
    axum::extract::Path(method): axum::extract::Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&headers) {
        return (StatusCode::UNAUTHORIZED, "bad token").into_response();
    }
    let v = vmm.lock().unwrap();
    let method = match method.strip_prefix("Teepod.") {
        Some(m) if v.legacy => m.to_owned(),
        Some(_) => return (StatusCode::NOT_FOUND, "no such method").into_response(),
        None if v.legacy => return (StatusCode::NOT_FOUND, "no such method").into_response(),
        None => method,
    };
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match method.as_str() {
        "Status" if v.malformed => axum::Json(json!({"vms": 5})).into_response(),
        "Status" => {
            let brief: Vec<Value> = v
                .vms
                .iter()
                .map(|vm| {
                    let mut b = vm.clone();
                    b.as_object_mut().unwrap().remove("configuration");
                    b
                })
                .collect();
            let page = req["page"].as_u64().unwrap_or(0) as usize;
            let size = req["page_size"].as_u64().unwrap_or(100).max(1) as usize;
            let vms: Vec<Value> = brief.into_iter().skip(page * size).take(size).collect();
            axum::Json(json!({"vms": vms, "port_mapping_enabled": false, "total": v.vms.len()}))
                .into_response()
        }
        "GetInfo" => {
            let found = v.vms.iter().find(|vm| vm["id"] == req["id"]).cloned();
            axum::Json(json!({"found": found.is_some(), "info": found})).into_response()
        }
        _ => (StatusCode::NOT_FOUND, "no such method").into_response(),
    }
}

async fn guest(
    State(vmm): State<Shared>,
    axum::extract::Path(method): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&headers) {
        return (StatusCode::UNAUTHORIZED, "bad token").into_response();
    }
    let v = vmm.lock().unwrap();
    match method.as_str() {
        "SysInfo" => axum::Json(v.sys.clone()).into_response(),
        "ListContainers" => axum::Json(v.containers.clone()).into_response(),
        _ => (StatusCode::NOT_FOUND, "no such method").into_response(),
    }
}

fn router(vmm: Shared) -> axum::Router {
    axum::Router::new()
        .route("/prpc/{method}", post(prpc))
        .route("/guest/{method}", post(guest))
        .with_state(vmm)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A running VM up for an hour whose boot finished 40 s after it started.
fn web(uptime: &str) -> Value {
    json!({
        "id": "6c1e9b0e-0000-4000-8000-000000000001", "name": "web", "status": "running",
        "uptime": uptime, "app_url": "http://x", "app_id": "ab".repeat(20), "instance_id": "cd".repeat(20),
        "configuration": {"memory": 2048, "vcpu": 2, "disk_size": 20, "image": "dstack-0.5.3"},
        "exited_at": null, "boot_progress": "done", "boot_error": "", "shutdown_progress": "",
        "image_version": "0.5.3",
        "events": [
            {"event": "boot.progress", "body": "requesting app keys", "timestamp": now_ms() - 3_580_000},
            {"event": "boot.progress", "body": "done", "timestamp": now_ms() - 3_560_000}
        ]
    })
}

fn broken() -> Value {
    json!({
        "id": "6c1e9b0e-0000-4000-8000-000000000002", "name": "batch", "status": "exited",
        "uptime": "never", "app_id": "ef".repeat(20), "boot_progress": "booting",
        "boot_error": "failed to mount the data disk", "events": []
    })
}

fn containers(state: &str, status: &str) -> Value {
    json!({"containers": [{"id": "c0ffee", "names": ["/app"], "image": "nginx", "image_id": "sha256:1",
        "created": 1_700_000_000u64, "state": state, "status": status}]})
}

struct Polled {
    vmm: Shared,
    poller: VmmPoller,
    view: Arc<CvmView>,
    registry: Registry,
    _dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

/// The in-test VMM on a unix socket (or TCP), and a poller of it with the token from a file.
async fn start(unix: bool, token: &str) -> Polled {
    let vmm: Shared = Arc::new(Mutex::new(Vmm {
        vms: vec![web("1h 0m 0s"), broken()],
        sys: json!({"os_name": "dstack", "total_memory": 1000u64, "available_memory": 50u64,
            "used_memory": 950u64, "free_memory": 10u64, "uptime": 3600u64, "loadavg_one": 10,
            "disks": []}),
        containers: containers("running", "Up 2 hours (healthy)"),
        ..Vmm::default()
    }));
    let dir = tempfile::tempdir().unwrap();
    let app = router(vmm.clone());
    let (url, server) = if unix {
        let path = dir.path().join("vmm.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (format!("unix:{}", path.display()), server)
    } else {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (format!("http://{addr}"), server)
    };
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let entry = VmmEntry {
        url: url.clone(),
        token: Some(SecretRef::File(token_file)),
        poll_interval: Duration::from_secs(15),
        concurrency: 4,
    };
    let client = VmmClient::new(&entry, Duration::from_secs(2)).unwrap();
    let mut registry = Registry::default();
    let metrics = CvmMetrics::new(&mut registry, 500);
    let view = Arc::new(CvmView::default());
    let poller = VmmPoller::new(
        0,
        url,
        client,
        entry.poll_interval,
        4,
        view.clone(),
        metrics,
    );
    Polled {
        vmm,
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
    p.poller.poll_once().await;
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
    assert_eq!(p.metric("dstack_cvm_up{instance=\"web\"}"), Some(1.0));
    assert_eq!(p.metric("dstack_cvm_up{instance=\"batch\"}"), Some(0.0));
    assert_eq!(
        p.metric("dstack_cvm_memory_usage_ratio{instance=\"web\"}"),
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
        p.poller.poll_once().await;
        p.vmm.lock().unwrap().vms[0] = web("30m");
        p.poller.poll_once().await;
    }
    assert_eq!(p.vm("web").restarts, 4);
    assert_eq!(
        p.metric("dstack_cvm_restarts_total{source=\"vmm\"}"),
        Some(4.0)
    );

    // A container goes into restarting: one container restart, however long it stays there.
    p.vmm.lock().unwrap().containers = containers("restarting", "Restarting (1) 3 seconds ago");
    p.poller.poll_once().await;
    p.poller.poll_once().await;
    assert_eq!(p.vm("web").container_restarts, 1);
    assert_eq!(p.metric("dstack_cvm_container_restarts_total"), Some(1.0));

    // A malformed answer: a source error, and the VMs' series go instead of turning into zeros.
    p.vmm.lock().unwrap().malformed = true;
    p.poller.poll_once().await;
    assert_eq!(
        p.metric("dstack_cvm_source_polls_total{source=\"vmm\",outcome=\"malformed\"}"),
        Some(1.0)
    );
    assert_eq!(p.metric("dstack_cvm_up{instance=\"web\"}"), None);
    assert_eq!(
        p.metric("dstack_cvm_memory_usage_ratio{instance=\"web\"}"),
        None
    );
    assert_eq!(
        p.metric("dstack_cvm_instances{status=\"running\"}"),
        Some(0.0)
    );
    assert!(p.view.all().is_empty());

    // It answers again, then goes away: unreachable, series gone again.
    p.vmm.lock().unwrap().malformed = false;
    p.poller.poll_once().await;
    assert_eq!(p.metric("dstack_cvm_up{instance=\"web\"}"), Some(1.0));
    p.server.abort();
    let _ = (&mut p.server).await;
    p.poller.poll_once().await;
    assert_eq!(
        p.metric("dstack_cvm_source_polls_total{source=\"vmm\",outcome=\"unreachable\"}"),
        Some(1.0)
    );
    assert_eq!(p.metric("dstack_cvm_up{instance=\"web\"}"), None);
}

#[tokio::test]
async fn legacy_teepod_paths_over_tcp_are_followed_and_a_wrong_token_is_unauthorized() {
    let mut p = start(false, TOKEN).await;
    p.vmm.lock().unwrap().legacy = true;
    p.poller.poll_once().await;
    assert_eq!(p.vm("web").status, "running");
    assert_eq!(
        p.metric("dstack_cvm_instances{status=\"running\"}"),
        Some(1.0)
    );

    let mut wrong = start(false, "not-the-token").await;
    wrong.poller.poll_once().await;
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
    p.poller.poll_once().await;
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
