//! The `cvm_nitro_proxy` task, one per `[[cvm.nitro_proxy]]`: is the vsock proxy a Nitro
//! Enclave needs running on this host (spec/07 §3)? Each configured check is run every
//! `check_interval`: a systemd unit's active state (`systemctl is-active`), a process whose command
//! line contains a text (`/proc/*/cmdline`), a TCP port in LISTEN (`/proc/net/tcp`, `tcp6`), and a
//! functional TCP connect. The proxy is up when every configured check passes; each failing check
//! is logged with its reason when that changes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::config::NitroProxy;
use super::metrics::CvmMetrics;
use crate::runtime::Task;

/// One check's name (metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Check {
    /// `systemctl is-active`.
    Systemd,
    /// A process's command line.
    Process,
    /// A listening TCP port.
    Listening,
    /// A TCP connect.
    Connect,
}

impl Check {
    /// Every check, in label order.
    pub const ALL: [Self; 4] = [Self::Systemd, Self::Process, Self::Listening, Self::Connect];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Systemd => "systemd",
            Self::Process => "process",
            Self::Listening => "listening",
            Self::Connect => "connect",
        }
    }
}

/// Whether `stat` (a `/proc/net/tcp` or `tcp6` table) has a socket in LISTEN on `port` (pure).
pub fn listening_in(table: &str, port: u16) -> bool {
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1).unwrap_or_default();
        let state = fields.nth(1).unwrap_or_default();
        state == "0A"
            && local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                == Some(port)
    })
}

/// Whether a command line (NUL-separated arguments) contains `text` once its arguments are
/// joined by spaces (pure).
pub fn cmdline_matches(raw: &[u8], text: &str) -> bool {
    let joined: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    !joined.is_empty() && joined.join(" ").contains(text)
}

/// Each check's label and whether it passed, as the metrics take them.
pub fn passed(results: &[(Check, Result<(), String>)]) -> Vec<(&'static str, bool)> {
    results
        .iter()
        .map(|(c, r)| (c.label(), r.is_ok()))
        .collect()
}

/// The checks of one vsock proxy.
pub struct ProxyChecker {
    index: usize,
    proxy: NitroProxy,
    metrics: CvmMetrics,
}

impl ProxyChecker {
    /// The checker of `[[cvm.nitro_proxy]]` number `index`.
    pub fn new(index: usize, proxy: NitroProxy, metrics: CvmMetrics) -> Self {
        Self {
            index,
            proxy,
            metrics,
        }
    }

    async fn systemd(unit: &str) -> Result<(), String> {
        let out = tokio::process::Command::new("systemctl")
            .args(["is-active", unit])
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("systemctl cannot run here ({e}): no systemd to ask"))?;
        let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if state == "active" {
            Ok(())
        } else {
            Err(format!("unit {unit} is {state:?}"))
        }
    }

    fn process(text: &str) -> Result<(), String> {
        let entries = std::fs::read_dir("/proc").map_err(|e| format!("cannot read /proc: {e}"))?;
        let own = std::process::id().to_string();
        let found = entries.filter_map(Result::ok).any(|e| {
            let name = e.file_name();
            let pid = name.to_string_lossy();
            pid.chars().all(|c| c.is_ascii_digit())
                && pid != own
                && std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|raw| cmdline_matches(&raw, text))
        });
        if found {
            Ok(())
        } else {
            Err(format!("no process whose command line contains {text:?}"))
        }
    }

    fn listening(port: u16) -> Result<(), String> {
        let listening = ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .any(|t| listening_in(&t, port));
        if listening {
            Ok(())
        } else {
            Err(format!("nothing listens on TCP port {port}"))
        }
    }

    async fn connect(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("connecting to {addr} failed: {e}")),
            Err(_) => Err(format!("connecting to {addr} took longer than {timeout:?}")),
        }
    }

    /// Runs every configured check: each one's outcome.
    pub async fn check(&self) -> Vec<(Check, Result<(), String>)> {
        let p = &self.proxy;
        let mut out = Vec::new();
        if let Some(unit) = &p.systemd_unit {
            out.push((Check::Systemd, Self::systemd(unit).await));
        }
        if let Some(text) = &p.process {
            out.push((Check::Process, Self::process(text)));
        }
        if let Some(port) = p.listening_port {
            out.push((Check::Listening, Self::listening(port)));
        }
        if let Some(addr) = p.connect {
            out.push((Check::Connect, Self::connect(addr, p.connect_timeout).await));
        }
        out
    }
}

impl Task for ProxyChecker {
    fn name(&self) -> &'static str {
        "cvm_nitro_proxy"
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut tick = crate::runtime::ticker(self.proxy.check_interval);
        let mut failing: Vec<(Check, String)> = Vec::new();
        while cancel.run_until_cancelled(tick.tick()).await.is_some() {
            let Some(results) = cancel.run_until_cancelled(self.check()).await else {
                break;
            };
            let now: Vec<(Check, String)> = results
                .iter()
                .filter_map(|(c, r)| r.as_ref().err().map(|e| (*c, e.clone())))
                .collect();
            if now != failing {
                for (check, reason) in &now {
                    tracing::warn!(proxy = self.index, check = check.label(), %reason, "cvm: a Nitro vsock proxy check fails");
                }
                if now.is_empty() {
                    tracing::info!(
                        proxy = self.index,
                        "cvm: the Nitro vsock proxy passes every check"
                    );
                }
                failing = now;
            }
            self.metrics.nitro_proxy(self.index, &passed(&results));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_port_is_read_from_the_kernel_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:0C38 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1\n";
        assert!(listening_in(table, 8000));
        // 3128 is only in an established connection.
        assert!(!listening_in(table, 3128));
        assert!(!listening_in("garbage", 8000));
    }

    #[test]
    fn a_command_line_matches_its_joined_arguments() {
        let raw = b"/usr/bin/vsock-proxy\x008000\x00kms.example.org\x00443\x00";
        assert!(cmdline_matches(raw, "vsock-proxy 8000"));
        assert!(!cmdline_matches(raw, "socat"));
        assert!(!cmdline_matches(b"", "x"));
    }
}
