//! OTLP trace export, received by in-process collectors on loopback (gRPC and HTTP/protobuf):
//! the `trace_id` in a JSON log line equals the exported span's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Keywarden, free_addr};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message as _;

/// (span name, trace id hex, service.name) of every span received.
type Received = Arc<Mutex<Vec<(String, String, String)>>>;

fn record(received: &Received, req: &ExportTraceServiceRequest) {
    for rs in &req.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
            .and_then(|a| a.value.as_ref())
            .map(|v| format!("{:?}", v.value))
            .unwrap_or_default();
        for ss in &rs.scope_spans {
            for span in &ss.spans {
                received.lock().unwrap().push((
                    span.name.clone(),
                    hex::encode(&span.trace_id),
                    service.clone(),
                ));
            }
        }
    }
}

struct Collector(Received);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        record(&self.0, request.get_ref());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn start_grpc_collector(
    received: Received,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let addr = free_addr();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let incoming = tokio_stream_from(listener);
    let handle = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(received)))
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    (addr, handle)
}

/// Adapts a bound listener to the stream tonic serves from (so the port is ours before keywarden starts).
fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| s);
        Some((next, l))
    })
}

async fn start_http_collector(
    received: Received,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let addr = free_addr();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let received = received.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).unwrap();
                record(&received, &req);
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse {
                        partial_success: None,
                    }
                    .encode_to_vec(),
                )
            }
        }),
    );
    let handle = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, handle)
}

async fn exported_span_matches_log_trace_id(protocol: &str) {
    let received: Received = Arc::default();
    let (addr, collector) = match protocol {
        "grpc" => start_grpc_collector(received.clone()).await,
        _ => start_http_collector(received.clone()).await,
    };
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{addr}");
    let mut kw = Keywarden::start(
        dir.path(),
        &[],
        &[
            ("KEYWARDEN_TELEMETRY__OTLP__ENABLED", "true"),
            ("KEYWARDEN_TELEMETRY__OTLP__PROTOCOL", protocol),
            ("KEYWARDEN_TELEMETRY__OTLP__ENDPOINT", &endpoint),
            ("KEYWARDEN_TELEMETRY__OTLP__SERVICE_NAME", "keywarden-test"),
        ],
    );
    kw.wait_ready().await;
    let r = common::https(dir.path())
        .get(format!("{}/health", kw.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Shutdown flushes the batch exporter (the collectors run on the other worker thread while
    // this one blocks waiting for the exit).
    assert_eq!(kw.terminate(Duration::from_secs(10)), 0);

    let ready = kw
        .lines()
        .into_iter()
        .find(|l| l.contains("\"keywarden ready\""))
        .expect("ready log line");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let trace_id = ready["trace_id"].as_str().unwrap().to_owned();

    let spans = received.lock().unwrap().clone();
    let startup = spans
        .iter()
        .find(|(name, _, _)| name == "keywarden.startup")
        .unwrap_or_else(|| panic!("no startup span exported over {protocol}: {spans:?}"));
    assert_eq!(
        startup.1, trace_id,
        "log line and exported span must share the trace id"
    );
    assert!(
        startup.2.contains("keywarden-test"),
        "service.name: {}",
        startup.2
    );
    assert!(
        spans.iter().any(|(name, _, _)| name == "http.request"),
        "request spans are exported too: {spans:?}"
    );
    collector.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_exported_span_carries_the_logged_trace_id() {
    exported_span_matches_log_trace_id("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_exported_span_carries_the_logged_trace_id() {
    exported_span_matches_log_trace_id("http").await;
}
