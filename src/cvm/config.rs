//! `[cvm]`: the dstack-vmm hosts polled, and how many per-instance series may exist.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::problem::{Problem, http_url, positive};
use crate::secret::SecretRef;

/// One `[[cvm.vmm]]` entry (also the shape of `[cvm.gateway]`: a dstack host API).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmmEntry {
    /// `http(s)://host:port` or `unix:/path/to/vmm.sock`.
    pub url: String,
    /// Bearer token (`env:VAR` or `file:PATH`), when the VMM's auth is on.
    #[serde(default)]
    pub token: Option<SecretRef>,
    /// How often it is polled.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Requests in flight to it at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(15)
}

fn default_concurrency() -> usize {
    8
}

/// One `[[cvm.peer_kms]]` entry: another KMS to probe.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerKms {
    /// Its RPC base URL (`https://host:port`).
    pub url: String,
    /// Its root CA (PEM), which its RPC certificate chains to.
    pub ca_file: PathBuf,
    /// How often it is probed.
    #[serde(default = "default_probe_interval", with = "humantime_serde")]
    pub probe_interval: Duration,
    /// Its Prometheus `/metrics`, whose attestation counters are scraped each probe (upstream
    /// dstack KMS: the RPC address's `/metrics`; keywarden: its metrics listener's).
    #[serde(default)]
    pub metrics_url: Option<String>,
}

fn default_probe_interval() -> Duration {
    Duration::from_secs(30)
}

/// One `[[cvm.nitro_proxy]]` entry: the vsock proxy a Nitro Enclave needs on this host, and how to
/// tell it runs (each check optional, at least one).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NitroProxy {
    /// A systemd unit that must be active (e.g. `nitro-enclaves-vsock-proxy.service`).
    #[serde(default)]
    pub systemd_unit: Option<String>,
    /// Text a running process's command line must contain (e.g. `vsock-proxy 8000`).
    #[serde(default)]
    pub process: Option<String>,
    /// A TCP port something must listen on.
    #[serde(default)]
    pub listening_port: Option<u16>,
    /// An address a TCP connection must succeed to.
    #[serde(default)]
    pub connect: Option<std::net::SocketAddr>,
    /// How long that connection may take.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How often the checks run.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub check_interval: Duration,
}

/// `[cvm.guest]`: how a CVM's guest agent is reached through the dstack gateway, for its
/// containers' logs (`https://<instance_id>-8090.<base_domain>/`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GuestAgent {
    /// The gateway's base domain (e.g. `dstack.example.org`).
    pub base_domain: String,
    /// Connect here instead of resolving the name (e.g. the gateway's own address).
    #[serde(default)]
    pub connect_to: Option<std::net::SocketAddr>,
    /// The only root CA (PEM) the gateway's certificate may chain to; the system's roots when
    /// absent.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl GuestAgent {
    /// The base URL of the guest agent of `instance_id` (hex, no `0x`).
    pub fn url(&self, instance_id: &str) -> String {
        format!("https://{instance_id}-8090.{}", self.base_domain)
    }
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}

/// `[cvm]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CvmConfig {
    /// The dstack-vmm hosts polled.
    pub vmm: Vec<VmmEntry>,
    /// Other KMS instances probed (ours or upstream dstack's).
    pub peer_kms: Vec<PeerKms>,
    /// Nitro Enclave vsock proxies on this host.
    pub nitro_proxy: Vec<NitroProxy>,
    /// The dstack gateway's admin API, whose WireGuard handshakes say when each instance was
    /// last seen (`concurrency` unused).
    pub gateway: Option<VmmEntry>,
    /// The guest agents behind the gateway, for `cvm logs --container`.
    pub guest: Option<GuestAgent>,
    /// Per-instance series (labels `instance` and `app`) at most; aggregates always exist.
    pub max_instance_series: usize,
    /// Per-request timeout to a source.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A running VM whose boot is not done this long after it started is stuck.
    #[serde(with = "humantime_serde")]
    pub boot_timeout: Duration,
    /// An instance that received keys this recently but runs on no polled VMM is unmonitored.
    #[serde(with = "humantime_serde")]
    pub unmonitored_window: Duration,
}

impl Default for CvmConfig {
    fn default() -> Self {
        Self {
            vmm: Vec::new(),
            peer_kms: Vec::new(),
            nitro_proxy: Vec::new(),
            gateway: None,
            guest: None,
            max_instance_series: 500,
            request_timeout: Duration::from_secs(5),
            boot_timeout: Duration::from_secs(300),
            unmonitored_window: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl CvmConfig {
    /// Everything wrong with the section.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let entries = self
            .vmm
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("cvm.vmm[{i}]"), v))
            .chain(self.gateway.iter().map(|g| ("cvm.gateway".to_owned(), g)));
        for (key, v) in entries {
            match v.url.strip_prefix("unix:") {
                Some(path) if !path.starts_with('/') => out.push(Problem::new(
                    format!("{key}.url"),
                    format!("{:?} is not an absolute socket path", v.url),
                    "write unix:/absolute/path/to/vmm.sock",
                )),
                Some(_) => {}
                None => out.extend(http_url(
                    &format!("{key}.url"),
                    "is",
                    &v.url,
                    "write http://HOST:PORT (e.g. http://127.0.0.1:9080) or unix:/path/to/vmm.sock",
                )),
            }
            out.extend(positive(
                &format!("{key}.poll_interval"),
                v.poll_interval,
                "15s",
            ));
            if !(1..=64).contains(&v.concurrency) {
                out.push(Problem::new(
                    format!("{key}.concurrency"),
                    format!("{} is outside 1..=64", v.concurrency),
                    "set a number of requests in flight from 1 to 64 (default 8)",
                ));
            }
        }
        for (i, n) in self.nitro_proxy.iter().enumerate() {
            let key = format!("cvm.nitro_proxy[{i}]");
            if n.systemd_unit.is_none()
                && n.process.is_none()
                && n.listening_port.is_none()
                && n.connect.is_none()
            {
                out.push(Problem::new(
                    key.clone(),
                    "no check is configured",
                    "set at least one of systemd_unit, process, listening_port, connect",
                ));
            }
            out.extend(
                [
                    (format!("{key}.connect_timeout"), n.connect_timeout, "2s"),
                    (format!("{key}.check_interval"), n.check_interval, "15s"),
                ]
                .iter()
                .filter_map(|(k, d, ex)| positive(k, *d, ex)),
            );
        }
        for (i, p) in self.peer_kms.iter().enumerate() {
            let key = format!("cvm.peer_kms[{i}]");
            match url::Url::parse(&p.url) {
                Ok(u) if u.scheme() == "https" => {}
                _ => out.push(Problem::new(
                    format!("{key}.url"),
                    format!("{:?} is not an https URL", p.url),
                    "write the KMS's RPC address, e.g. https://kms.example.org:8000",
                )),
            }
            out.extend(positive(
                &format!("{key}.probe_interval"),
                p.probe_interval,
                "30s",
            ));
            if let Some(m) = &p.metrics_url {
                out.extend(http_url(
                    &format!("{key}.metrics_url"),
                    "is",
                    m,
                    "write the peer's metrics address, e.g. https://kms.example.org:8000/metrics",
                ));
            }
        }
        if let Some(g) = &self.guest {
            let d = g.base_domain.trim();
            if d.is_empty() || d.contains("://") || d.contains('/') || d.starts_with('.') {
                out.push(Problem::new(
                    "cvm.guest.base_domain",
                    format!("{:?} is not a domain name", g.base_domain),
                    "write the gateway's base domain alone, e.g. dstack.example.org",
                ));
            }
        }
        if !(1..=100_000).contains(&self.max_instance_series) {
            out.push(Problem::new(
                "cvm.max_instance_series",
                format!("{} is outside 1..=100000", self.max_instance_series),
                "set how many per-instance series may exist (default 500)",
            ));
        }
        out.extend(positive("cvm.request_timeout", self.request_timeout, "5s"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::client::Endpoint;

    #[test]
    fn vmm_addresses_are_urls_or_absolute_sockets() {
        let entry = |url: &str| VmmEntry {
            url: url.into(),
            token: None,
            poll_interval: default_poll_interval(),
            concurrency: 8,
        };
        let cfg = CvmConfig {
            vmm: vec![
                entry("http://127.0.0.1:9080/"),
                entry("unix:/run/dstack/vmm.sock"),
                entry("unix:vmm.sock"),
                entry("ftp://x"),
            ],
            ..CvmConfig::default()
        };
        let keys: Vec<String> = cfg.problems().into_iter().map(|p| p.key).collect();
        assert_eq!(keys, vec!["cvm.vmm[2].url", "cvm.vmm[3].url"]);
        assert_eq!(
            Endpoint::parse(&cfg.vmm[0].url),
            Endpoint::Http("http://127.0.0.1:9080".into())
        );
        assert_eq!(
            Endpoint::parse(&cfg.vmm[1].url),
            Endpoint::Unix("/run/dstack/vmm.sock".into())
        );
        assert!(CvmConfig::default().problems().is_empty());
    }

    #[test]
    fn a_nitro_proxy_needs_a_check_and_the_gateway_a_url() {
        let cfg = CvmConfig {
            nitro_proxy: vec![
                NitroProxy {
                    systemd_unit: None,
                    process: None,
                    listening_port: None,
                    connect: None,
                    connect_timeout: default_connect_timeout(),
                    check_interval: default_poll_interval(),
                },
                NitroProxy {
                    listening_port: Some(8000),
                    connect_timeout: Duration::ZERO,
                    systemd_unit: None,
                    process: None,
                    connect: None,
                    check_interval: default_poll_interval(),
                },
            ],
            gateway: Some(VmmEntry {
                url: "gateway:8011".into(),
                token: None,
                poll_interval: default_poll_interval(),
                concurrency: default_concurrency(),
            }),
            ..CvmConfig::default()
        };
        let keys: Vec<String> = cfg.problems().into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            vec![
                "cvm.gateway.url",
                "cvm.nitro_proxy[0]",
                "cvm.nitro_proxy[1].connect_timeout"
            ]
        );
    }

    #[test]
    fn the_guest_agents_base_domain_is_a_bare_domain() {
        let with = |d: &str| CvmConfig {
            guest: Some(GuestAgent {
                base_domain: d.into(),
                connect_to: None,
                ca_file: None,
            }),
            ..CvmConfig::default()
        };
        assert!(with("dstack.example.org").problems().is_empty());
        for bad in [
            "",
            "https://dstack.example.org",
            "dstack.example.org/x",
            ".example.org",
        ] {
            let keys: Vec<String> = with(bad).problems().into_iter().map(|p| p.key).collect();
            assert_eq!(keys, vec!["cvm.guest.base_domain"], "{bad}");
        }
        assert_eq!(
            with("dstack.example.org").guest.unwrap().url("ab12"),
            "https://ab12-8090.dstack.example.org"
        );
    }

    #[test]
    fn a_peer_kms_is_reached_over_https_only_and_its_metrics_over_http_or_https() {
        let peer = |url: &str, metrics: Option<&str>| PeerKms {
            url: url.into(),
            ca_file: "/etc/kms-ca.pem".into(),
            probe_interval: default_probe_interval(),
            metrics_url: metrics.map(str::to_owned),
        };
        let cfg = CvmConfig {
            peer_kms: vec![
                peer(
                    "https://kms.example.org:8000",
                    Some("https://kms.example.org:8000/metrics"),
                ),
                peer("http://kms:8000", Some("http://127.0.0.1:9100/metrics")),
                peer("https://kms:8000", Some("kms:8000/metrics")),
            ],
            ..CvmConfig::default()
        };
        let keys: Vec<String> = cfg.problems().into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            vec!["cvm.peer_kms[1].url", "cvm.peer_kms[2].metrics_url"]
        );
    }
}
