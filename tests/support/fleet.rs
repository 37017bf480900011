//! A keywarden with every CVM source configured, for the tests that read its whole `/metrics`:
//! another keywarden as a peer KMS (its `/metrics` scraped too), a vsock proxy that is not
//! running, and an in-test dstack-vmm with a running VM that also serves as the gateway. Includers
//! also include `common` and the in-test VMM as `fake`.

use std::time::{Duration, Instant};

use crate::{common, fake};

/// The running pair and the in-test servers, with the first `/metrics` that has every per-entry
/// series.
pub struct Fleet {
    pub kw: common::Keywarden,
    pub peer: common::Keywarden,
    pub metrics: String,
    _servers: [tokio::task::JoinHandle<()>; 2],
}

impl Fleet {
    /// Starts both under `dir` and waits (at most 10 s) until the per-entry series exist.
    pub async fn start(dir: &std::path::Path) -> Self {
        let mut peer = common::Keywarden::start(&dir.join("peer"), &[], &[]);
        peer.wait_ready().await;
        let peers = format!(
            "[{{ url = \"{}\", ca_file = {:?}, probe_interval = \"100ms\", metrics_url = \"http://{}/metrics\" }}]",
            peer.api_url(),
            dir.join("peer/kms/root-ca.pem").display().to_string(),
            peer.metrics,
        );
        let proxies = format!(
            "[{{ listening_port = {}, check_interval = \"100ms\" }}]",
            common::free_port()
        );
        let (vmms, vmm) = fake::configured(vec![fake::web("1h")], dir, "100ms").await;
        let handshake = keywarden::clock::unix_secs() - 10;
        let hosts = std::sync::Arc::new(std::sync::Mutex::new(serde_json::json!([
            {"instance_id": format!("{:040x}", 1), "app_id": "ab", "latest_handshake": handshake}
        ])));
        let (gateway_url, gateway) = fake::serve_app(fake::gateway(hosts), false, dir).await;
        // The in-test gateway checks the same token the VMM does, in the file `configured` wrote.
        let gateway_token = format!("file:{}", dir.join("vmm-token").display());
        let env = [
            ("KEYWARDEN_CVM__PEER_KMS", peers.as_str()),
            ("KEYWARDEN_CVM__NITRO_PROXY", proxies.as_str()),
            ("KEYWARDEN_CVM__VMM", vmms.as_str()),
            ("KEYWARDEN_CVM__GATEWAY__URL", gateway_url.as_str()),
            ("KEYWARDEN_CVM__GATEWAY__TOKEN", gateway_token.as_str()),
            ("KEYWARDEN_CVM__GATEWAY__POLL_INTERVAL", "100ms"),
        ];
        let mut kw = common::Keywarden::start(&dir.join("data"), &[], &env);
        kw.wait_ready().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let metrics = loop {
            let text = kw.metrics_text().await;
            if [
                "dstack_cvm_peer_kms_cert_expiry_seconds{",
                "dstack_cvm_peer_kms_attestation_requests_total{",
                "dstack_cvm_vsock_proxy_up{",
                "dstack_cvm_memory_usage_ratio{",
                "dstack_cvm_last_seen_timestamp_seconds{",
            ]
            .iter()
            .all(|s| text.contains(s))
            {
                break text;
            }
            assert!(Instant::now() < deadline, "{text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Self {
            kw,
            peer,
            metrics,
            _servers: [vmm, gateway],
        }
    }

    /// Stops both; each exits 0.
    pub fn stop(mut self) {
        assert_eq!(self.kw.terminate(Duration::from_secs(5)), 0);
        assert_eq!(self.peer.terminate(Duration::from_secs(5)), 0);
    }
}
