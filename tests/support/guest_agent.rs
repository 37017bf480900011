//! An in-test dstack guest agent (the real one runs only inside a CVM) speaking exactly its API
//! (spec/01 §9) on a unix socket: `POST /Info` and `POST /GetQuote` with JSON bodies, answering
//! with test-PKI quotes of a KMS guest running the simulated OS image, the event log and
//! `vm_config` alongside. It counts the quotes it gave and the `Host` headers it saw.

use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use keywarden::attestation::versioned::{self, Platform};
use keywarden::sim::client::{SIMULATED_OS_IMAGE_HASH, guest_spec};
use keywarden::sim::testpki::{GuestSpec, TestPki};
use serde_json::{Value, json};

/// What the agent saw.
#[derive(Default)]
pub struct Seen {
    /// Report data of each quote given.
    pub quoted: Vec<Vec<u8>>,
    /// Every request's `Host`.
    pub hosts: Vec<String>,
}

struct Agent {
    pki: TestPki,
    guest: GuestSpec,
    seen: Arc<Mutex<Seen>>,
}

fn note_host(agent: &Agent, headers: &HeaderMap) {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    agent.seen.lock().unwrap().hosts.push(host);
}

async fn info(State(agent): State<Arc<Agent>>, headers: HeaderMap) -> Response {
    note_host(&agent, &headers);
    axum::Json(json!({
        "app_id": hex::encode(agent.guest.app_id),
        "instance_id": "",
        "compose_hash": hex::encode(agent.guest.compose_hash),
        "os_image_hash": hex::encode(SIMULATED_OS_IMAGE_HASH),
        "app_name": "keywarden-kms",
    }))
    .into_response()
}

async fn get_quote(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    note_host(&agent, &headers);
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(given) = req["report_data"]
        .as_str()
        .and_then(|h| hex::decode(h).ok())
        .filter(|d| (1..=64).contains(&d.len()))
    else {
        return (
            StatusCode::BAD_REQUEST,
            "report_data must be 1..64 bytes of hex",
        )
            .into_response();
    };
    let mut report_data = [0u8; 64];
    report_data[..given.len()].copy_from_slice(&given);
    let raw = agent
        .pki
        .dstack_attestation(&agent.guest, &report_data)
        .unwrap();
    let Platform::Tdx { quote, event_log } = versioned::parse(&raw).unwrap().platform else {
        unreachable!("the test PKI makes TDX quotes")
    };
    agent.seen.lock().unwrap().quoted.push(given);
    axum::Json(json!({
        "quote": hex::encode(quote),
        "event_log": serde_json::to_string(&event_log).unwrap(),
        "report_data": hex::encode(report_data),
        "vm_config": keywarden::sim::client::simulated_vm_config(),
    }))
    .into_response()
}

/// Serves a guest agent for a KMS guest of `pki` on a socket in `dir`: the socket's path, what
/// it sees, and the server's handle.
pub async fn serve(
    pki: TestPki,
    dir: &Path,
) -> (
    std::path::PathBuf,
    Arc<Mutex<Seen>>,
    tokio::task::JoinHandle<()>,
) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let agent = Arc::new(Agent {
        pki,
        guest: guest_spec([0; 20], br#"{"name":"keywarden-kms"}"#, Vec::new()),
        seen: seen.clone(),
    });
    let app = axum::Router::new()
        .route("/Info", axum::routing::post(info))
        .route("/GetQuote", axum::routing::post(get_quote))
        .with_state(agent);
    let path = dir.join("dstack.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (path, seen, server)
}
