//! Peer-KMS probes against a real `keywarden serve` (the KMS RPC over TLS on loopback):
//! `/health` and `KMS.GetMeta` answer over TLS trusting that KMS's root CA, and its certificate's
//! expiry is read; its `/metrics` gives upstream's two attestation counters, re-exported; a page
//! that is not metrics is a malformed scrape; a CA it does not chain to fails the probe; a KMS
//! that stops is seen down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use keywarden::cvm::config::PeerKms;
use keywarden::cvm::metrics::CvmMetrics;
use keywarden::cvm::peer::{PeerProber, ProbeError, ScrapeError};
use keywarden::runtime::Task;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

fn metric(registry: &Registry, series: &str) -> Option<f64> {
    let text = keywarden::telemetry::encode(registry).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{series} ")))
        .map(|v| v.parse().unwrap())
}

#[tokio::test]
async fn a_peer_kms_is_probed_over_tls_and_seen_down_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut kw = common::Keywarden::start(&data, &[], &[]);
    kw.wait_ready().await;
    let peer = PeerKms {
        url: format!("https://localhost:{}", kw.api.port()),
        ca_file: data.join("kms/root-ca.pem"),
        probe_interval: Duration::from_millis(200),
        metrics_url: Some(format!("http://{}/metrics", kw.metrics)),
    };
    let mut registry = Registry::default();
    let metrics = CvmMetrics::new(&mut registry, 500);

    let prober = PeerProber::new(0, &peer, Duration::from_secs(5), metrics.clone()).unwrap();
    let (_, expiry) = prober.probe().await.unwrap();
    let expiry = expiry.expect("the certificate's expiry is read");
    assert!(expiry > 86_400, "{expiry}");
    let own = |name: &str, text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    };
    let text = kw.metrics_text().await;
    assert_eq!(
        prober.scrape().await.unwrap(),
        Some((
            own("dstack_kms_attestation_requests_total", &text),
            own("dstack_kms_attestation_failures_total", &text)
        ))
    );
    // A page that is not metrics: malformed, not zeros.
    let not_metrics = PeerProber::new(
        3,
        &PeerKms {
            metrics_url: Some(format!("{}/health", kw.api_url())),
            ..peer.clone()
        },
        Duration::from_secs(5),
        metrics.clone(),
    )
    .unwrap();
    assert!(matches!(
        not_metrics.scrape().await,
        Err(ScrapeError::Malformed(_))
    ));

    // A CA the KMS's certificate does not chain to: the TLS handshake fails.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, other.cert.pem()).unwrap();
    let stranger = PeerKms {
        ca_file: other_ca,
        ..peer.clone()
    };
    let refused = PeerProber::new(1, &stranger, Duration::from_secs(5), metrics.clone())
        .unwrap()
        .probe()
        .await
        .unwrap_err();
    assert!(matches!(refused, ProbeError::Unreachable(_)), "{refused}");
    // An unreadable CA file is a clear error.
    let missing = PeerKms {
        ca_file: dir.path().join("missing.pem"),
        ..peer.clone()
    };
    assert!(matches!(
        PeerProber::new(2, &missing, Duration::from_secs(5), metrics.clone()),
        Err(ProbeError::Ca(..))
    ));

    // The task: up while the KMS serves, down once it stops.
    let cancel = CancellationToken::new();
    let task = tokio::spawn(prober.run(cancel.clone()));
    let until = |what: &str, want: f64| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let registry = &registry;
        let what = what.to_owned();
        async move {
            while metric(registry, "dstack_cvm_peer_kms_up{peer=\"0\"}") != Some(want) {
                assert!(Instant::now() < deadline, "never {what}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    until("up", 1.0).await;
    assert!(
        metric(
            &registry,
            "dstack_cvm_peer_kms_cert_expiry_seconds{peer=\"0\"}"
        )
        .unwrap()
            > 86_400.0
    );
    assert!(
        metric(
            &registry,
            "dstack_cvm_peer_kms_probe_duration_seconds{peer=\"0\"}"
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(
        metric(
            &registry,
            "dstack_cvm_peer_kms_attestation_requests_total{peer=\"0\"}"
        ),
        Some(own(
            "dstack_kms_attestation_requests_total",
            &kw.metrics_text().await
        ) as f64)
    );
    assert_eq!(
        metric(
            &registry,
            "dstack_cvm_source_polls_total{source=\"peer_metrics\",outcome=\"ok\"}"
        )
        .map(|n| n >= 1.0),
        Some(true)
    );
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
    until("down", 0.0).await;
    cancel.cancel();
    task.await.unwrap().unwrap();
}
