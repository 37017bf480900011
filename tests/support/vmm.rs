//! An in-test dstack-vmm (every real one needs TDX or SEV hardware) serving exactly the
//! documented JSON (spec/07 §2) over a unix socket or TCP, with a token, optionally slow.

// Shared by the CVM tests and benchmark, each using a part of it.
#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt as _;
use serde_json::{Value, json};

/// The token the in-test VMM expects.
pub const TOKEN: &str = "vmm-admin-token";

/// What the in-test VMM holds.
#[derive(Default)]
pub struct Vmm {
    pub vms: Vec<Value>,
    pub sys: Value,
    pub containers: Value,
    /// Answer `Status` with something that is not the documented shape.
    pub malformed: bool,
    /// Serve only the legacy `Teepod.` paths.
    pub legacy: bool,
    /// How long each answer takes.
    pub latency: Duration,
    /// Each VM's serial console, by VM id.
    pub serial: std::collections::HashMap<String, Vec<String>>,
}

pub type Shared = Arc<Mutex<Vmm>>;

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
    pause(&vmm).await;
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
    pause(&vmm).await;
    let v = vmm.lock().unwrap();
    match method.as_str() {
        "SysInfo" => axum::Json(v.sys.clone()).into_response(),
        "ListContainers" => axum::Json(v.containers.clone()).into_response(),
        _ => (StatusCode::NOT_FOUND, "no such method").into_response(),
    }
}

async fn pause(vmm: &Shared) {
    let latency = vmm.lock().unwrap().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
}

/// `GET /logs?id&follow&ansi&lines&ch`: the console as the VMM streams it, a heartbeat among
/// the lines; following adds one line a little later, then ends (a bounded stream).
async fn logs(
    State(vmm): State<Shared>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    if !authorized(&headers) {
        return (StatusCode::UNAUTHORIZED, "bad token").into_response();
    }
    if !matches!(
        q.get("ch").map(String::as_str),
        None | Some("serial" | "stdout" | "stderr")
    ) {
        return (StatusCode::BAD_REQUEST, "unknown channel").into_response();
    }
    let Some(lines) = q
        .get("id")
        .and_then(|id| vmm.lock().unwrap().serial.get(id).cloned())
    else {
        return (StatusCode::NOT_FOUND, "VM not found").into_response();
    };
    let tail: usize = q
        .get("lines")
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let mut text: Vec<String> = lines[lines.len().saturating_sub(tail)..].to_vec();
    text.insert(text.len().min(1), "[vmm heartbeat]".to_owned());
    let first = text.join("\n") + "\n";
    let follow = q.get("follow").is_some_and(|f| f == "true");
    let later = async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, std::io::Error>(axum::body::Bytes::from("followed line\n"))
    };
    let mut chunks: Vec<
        futures::future::BoxFuture<'static, Result<axum::body::Bytes, std::io::Error>>,
    > = vec![Box::pin(async move { Ok(axum::body::Bytes::from(first)) })];
    if follow {
        chunks.push(Box::pin(later));
    }
    let stream = futures::stream::iter(chunks).then(|f| f);
    axum::body::Body::from_stream(stream).into_response()
}

fn router(vmm: Shared) -> axum::Router {
    axum::Router::new()
        .route("/logs", axum::routing::get(logs))
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

/// VM number `n`, named `name` (its app `{name}-app`), running for `uptime`; its boot finished
/// 40 s after it started an hour ago.
pub fn running(n: u64, name: &str, uptime: &str) -> Value {
    json!({
        "id": format!("6c1e9b0e-0000-4000-8000-{n:012x}"), "name": name, "status": "running",
        "uptime": uptime, "app_url": "http://x", "app_id": "ab".repeat(20), "instance_id": format!("{n:040x}"),
        "configuration": {"memory": 2048, "vcpu": 2, "disk_size": 20, "image": "dstack-0.5.3",
            "compose_file": json!({"manifest_version": 2, "name": format!("{name}-app"),
                "runner": "docker-compose", "public_logs": true}).to_string()},
        "exited_at": null, "boot_progress": "done", "boot_error": "", "shutdown_progress": "",
        "image_version": "0.5.3",
        "events": [
            {"event": "boot.progress", "body": "requesting app keys", "timestamp": now_ms() - 3_580_000},
            {"event": "boot.progress", "body": "done", "timestamp": now_ms() - 3_560_000}
        ]
    })
}

/// The VM named `web`.
pub fn web(uptime: &str) -> Value {
    running(1, "web", uptime)
}

pub fn broken() -> Value {
    json!({
        "id": "6c1e9b0e-0000-4000-8000-000000000002", "name": "batch", "status": "exited",
        "uptime": "never", "app_id": "ef".repeat(20), "boot_progress": "booting",
        "boot_error": "failed to mount the data disk", "events": []
    })
}

pub fn containers(state: &str, status: &str) -> Value {
    json!({"containers": [{"id": "c0ffee", "names": ["/app"], "image": "nginx", "image_id": "sha256:1",
        "created": 1_700_000_000u64, "state": state, "status": status}]})
}

/// A VMM holding `vms`, a guest at 95% memory with one running container.
pub fn vmm(vms: Vec<Value>) -> Shared {
    Arc::new(Mutex::new(Vmm {
        vms,
        sys: json!({"os_name": "dstack", "total_memory": 1000u64, "available_memory": 50u64,
            "used_memory": 950u64, "free_memory": 10u64, "uptime": 3600u64, "loadavg_one": 10,
            "disks": []}),
        containers: containers("running", "Up 2 hours (healthy)"),
        ..Vmm::default()
    }))
}

/// Serves `vmm` on a unix socket in `dir` (or on TCP at 127.0.0.1); its URL as configured.
pub async fn serve(vmm: Shared, unix: bool, dir: &Path) -> (String, tokio::task::JoinHandle<()>) {
    serve_app(router(vmm), unix, dir).await
}

/// Serves `vms` on a unix socket in `dir`, with the token in a file there: the value of
/// `KEYWARDEN_CVM__VMM` that has `keywarden serve` poll it every `poll_interval`, and the server.
pub async fn configured(
    vms: Vec<Value>,
    dir: &Path,
    poll_interval: &str,
) -> (String, tokio::task::JoinHandle<()>) {
    let (url, server) = serve(vmm(vms), true, dir).await;
    let token = dir.join("vmm-token");
    std::fs::write(&token, TOKEN).unwrap();
    let entry = format!(
        "[{{ url = {url:?}, token = \"file:{}\", poll_interval = \"{poll_interval}\" }}]",
        token.display()
    );
    (entry, server)
}

/// An in-test dstack gateway admin API: `Admin.Status` with `hosts`, behind the token.
pub fn gateway(hosts: Arc<Mutex<Value>>) -> axum::Router {
    axum::Router::new().route(
        "/prpc/Admin.Status",
        post(move |headers: HeaderMap| {
            let hosts = hosts.lock().unwrap().clone();
            async move {
                if !authorized(&headers) {
                    return (StatusCode::UNAUTHORIZED, "bad token").into_response();
                }
                axum::Json(json!({"hosts": hosts, "num_connections": 1})).into_response()
            }
        }),
    )
}

/// Serves `app` on a unix socket in `dir` (or on TCP at 127.0.0.1); its URL as configured.
pub async fn serve_app(
    app: axum::Router,
    unix: bool,
    dir: &Path,
) -> (String, tokio::task::JoinHandle<()>) {
    if unix {
        let path = dir.join("vmm.sock");
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
    }
}

/// An in-test guest agent's `GET /logs/{container}` (spec/07 §4): container `app` has five
/// lines (the `tail` asked; one more a little later when following); any other name is 404, as
/// for an app whose compose does not set `public_logs`.
pub fn guest_agent() -> axum::Router {
    axum::Router::new().route(
        "/logs/{container}",
        axum::routing::get(
            |axum::extract::Path(container): axum::extract::Path<String>,
             axum::extract::Query(q): axum::extract::Query<
                std::collections::HashMap<String, String>,
            >| async move {
                if container != "app" || q.get("text").map(String::as_str) != Some("true") {
                    return (StatusCode::NOT_FOUND, "Not Found").into_response();
                }
                let tail: usize = q.get("tail").and_then(|n| n.parse().ok()).unwrap_or(100);
                let lines: Vec<String> = (1..=5).map(|i| format!("app line {i}")).collect();
                let first = lines[lines.len().saturating_sub(tail)..].join("\n") + "\n";
                let follow = q.get("follow").is_some_and(|f| f == "true");
                let mut chunks: Vec<
                    futures::future::BoxFuture<'static, Result<axum::body::Bytes, std::io::Error>>,
                > = vec![Box::pin(async move { Ok(axum::body::Bytes::from(first)) })];
                if follow {
                    chunks.push(Box::pin(async {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok(axum::body::Bytes::from("app followed line\n"))
                    }));
                }
                axum::body::Body::from_stream(futures::stream::iter(chunks).then(|f| f))
                    .into_response()
            },
        ),
    )
}

/// Serves `app` over TLS on 127.0.0.1 with a self-signed certificate for `*.{domain}`: its
/// address, the certificate (PEM, the one root to trust) and the server's handle.
pub async fn serve_tls(
    app: axum::Router,
    domain: &str,
) -> (std::net::SocketAddr, String, tokio::task::JoinHandle<()>) {
    keywarden::tls::ensure_crypto_provider();
    let issued = rcgen::generate_simple_self_signed(vec![format!("*.{domain}")]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(issued.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![issued.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(tls),
                        hyper_util::service::TowerToHyperService::new(app),
                    )
                    .await;
            });
        }
    });
    (addr, issued.cert.pem(), server)
}
