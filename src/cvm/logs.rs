//! `keywarden cvm logs ID`: what `dstack-cloud logs` shows of a VM (spec/07 §4). The VM is found
//! by its id, name or instance id on the `[[cvm.vmm]]` hosts; its serial console or stdout /
//! stderr comes from the VMM's log stream. With `--container NAME`, that container's own logs
//! come from the VM's guest agent through the dstack gateway (`[cvm.guest]`), which serves them
//! only when the app's compose sets `public_logs`. Heartbeat lines are skipped; Ctrl-C ends a
//! follow cleanly.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use super::client::{SourceError, VmmClient};
use super::config::{CvmConfig, GuestAgent, VmmEntry};
use super::vmm::VmInfo;

/// The line the VMM sends every minute of silence while following.
const HEARTBEAT: &str = "[vmm heartbeat]";

/// A followed log is given up after this much silence (the VMM's heartbeat comes every 60 s).
const IDLE: Duration = Duration::from_secs(180);

/// Which of a VM's outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogChannel {
    /// The serial console (the VMM's default).
    Serial,
    /// The guest's stdout.
    Stdout,
    /// The guest's stderr.
    Stderr,
}

impl LogChannel {
    fn as_str(self) -> &'static str {
        match self {
            Self::Serial => "serial",
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// `keywarden cvm logs` options.
#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The VM: its id, its name, or its instance id (hex).
    pub id: String,
    /// Keep printing new lines until Ctrl-C.
    #[arg(long)]
    pub follow: bool,
    /// Print only the last N lines first (the VMM's default: 10,000).
    #[arg(long, value_name = "N")]
    pub lines: Option<u32>,
    /// Which output of the VM.
    #[arg(
        long,
        value_enum,
        default_value = "serial",
        conflicts_with = "container"
    )]
    pub channel: LogChannel,
    /// A container's own logs instead, from the guest agent through the gateway ([cvm.guest]).
    #[arg(long, value_name = "NAME")]
    pub container: Option<String>,
}

/// Splits a byte stream into lines, dropping the VMM's heartbeats (pure).
#[derive(Debug, Default)]
pub struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    /// The complete lines `chunk` finishes.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<String> {
        self.partial.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1])
                .trim_end_matches('\r')
                .to_owned();
            if text.trim() != HEARTBEAT {
                out.push(text);
            }
        }
        out
    }

    /// The last line, when the stream did not end with a newline.
    pub fn finish(self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.partial).into_owned();
        (!text.is_empty() && text.trim() != HEARTBEAT).then_some(text)
    }
}

/// Why `cvm logs` could not show anything.
#[derive(Debug, thiserror::Error)]
enum LogsError {
    #[error("no [[cvm.vmm]] is configured: give the dstack-vmm hosts to look on")]
    NoVmm,
    #[error("no VM {0:?} (by id, name or instance id) on the configured VMMs")]
    NotFound(String),
    #[error("{0} VMs match {1:?}: give its id")]
    Ambiguous(usize, String),
    #[error("{0}: {1}")]
    Source(String, SourceError),
    #[error("{0}")]
    Secret(#[from] crate::secret::SecretError),
    #[error(
        "no [cvm.guest] is configured: a container's logs come from its guest agent through the dstack gateway; set base_domain"
    )]
    NoGuest,
    #[error("VM {0:?} has no instance id yet (its guest has not reported one)")]
    NoInstance(String),
    #[error(
        "{0}: no container {1:?}, or the app does not publish its containers' logs (its compose sets no public_logs)"
    )]
    NoContainer(String, String),
    #[error("cvm.guest.ca_file: cannot use {0}: {1}")]
    GuestCa(String, String),
}

impl LogsError {
    /// 2 for what the operator gave, 1 for a source failing.
    fn code(&self) -> u8 {
        match self {
            Self::Source(..) | Self::GuestCa(..) => 1,
            _ => 2,
        }
    }
}

/// The VM `id` names, and the client of the VMM it runs on.
async fn find(cfg: &CvmConfig, id: &str) -> Result<(VmInfo, VmmClient, VmmEntry), LogsError> {
    if cfg.vmm.is_empty() {
        return Err(LogsError::NoVmm);
    }
    let wanted = id.trim_start_matches("0x").to_ascii_lowercase();
    let mut found = Vec::new();
    for entry in &cfg.vmm {
        let client = VmmClient::new(entry, cfg.request_timeout)?;
        let vms = super::poller::list_vms(&client)
            .await
            .map_err(|e| LogsError::Source(entry.url.clone(), e))?;
        for vm in vms {
            let instance = vm.instance_id.as_deref().map(str::to_ascii_lowercase);
            if vm.id == id || vm.name == id || instance.as_deref() == Some(wanted.as_str()) {
                found.push((vm, client.clone(), entry.clone()));
            }
        }
    }
    match found.len() {
        0 => Err(LogsError::NotFound(id.to_owned())),
        1 => Ok(found.remove(0)),
        n => Err(LogsError::Ambiguous(n, id.to_owned())),
    }
}

/// The instance id `id` is (40 hex digits, `0x` optional), or that of the VM it names.
async fn instance_id(cfg: &CvmConfig, id: &str) -> Result<String, LogsError> {
    let bare = id.trim_start_matches("0x").to_ascii_lowercase();
    if bare.len() == 40 && bare.chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(bare);
    }
    let (vm, _, _) = find(cfg, id).await?;
    vm.instance_id
        .map(|i| i.trim_start_matches("0x").to_ascii_lowercase())
        .filter(|i| !i.is_empty())
        .ok_or(LogsError::NoInstance(vm.name))
}

/// The client of `instance`'s guest agent, as `guest` says to reach it.
fn guest_client(
    guest: &GuestAgent,
    instance: &str,
    timeout: Duration,
) -> Result<VmmClient, LogsError> {
    crate::tls::ensure_crypto_provider();
    let base = guest.url(instance);
    let mut http = reqwest::Client::builder().connect_timeout(timeout);
    if let Some(addr) = guest.connect_to {
        http = http.resolve(&format!("{instance}-8090.{}", guest.base_domain), addr);
    }
    if let Some(path) = &guest.ca_file {
        let shown = path.display().to_string();
        let pem =
            std::fs::read(path).map_err(|e| LogsError::GuestCa(shown.clone(), e.to_string()))?;
        let ca = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| LogsError::GuestCa(shown.clone(), e.to_string()))?;
        http = http.tls_certs_only([ca]);
    }
    let http = http
        .build()
        .map_err(|e| LogsError::GuestCa(base.clone(), e.to_string()))?;
    Ok(VmmClient::over(crate::http::client::Client::over(
        base, http, timeout,
    )))
}

/// Prints what `stream` gives, line by line, heartbeats skipped.
async fn print_stream(client: &VmmClient, path: &str, source: &str) -> Result<(), LogsError> {
    let mut lines = Lines::default();
    let mut out = std::io::stdout().lock();
    let mut print = |chunk: &[u8]| {
        for l in lines.feed(chunk) {
            let _ = writeln!(out, "{l}");
        }
        let _ = out.flush();
    };
    let streamed = client
        .stream(path, IDLE, &mut print)
        .await
        .map_err(|e| LogsError::Source(source.to_owned(), e));
    if let Some(last) = lines.finish() {
        println!("{last}");
    }
    streamed
}

async fn show(cfg: &CvmConfig, args: &LogsArgs) -> Result<(), LogsError> {
    if let Some(container) = &args.container {
        let guest = cfg.guest.as_ref().ok_or(LogsError::NoGuest)?;
        let instance = instance_id(cfg, &args.id).await?;
        let client = guest_client(guest, &instance, cfg.request_timeout)?;
        let name: String = url::form_urlencoded::byte_serialize(container.as_bytes()).collect();
        let path = format!(
            "/logs/{name}?follow={}&text=true&timestamps=false&bare=true&ansi=false{}",
            args.follow,
            args.lines.map(|n| format!("&tail={n}")).unwrap_or_default()
        );
        let source = guest.url(&instance);
        return match print_stream(&client, &path, &source).await {
            Err(LogsError::Source(_, SourceError::Status { status: 404, .. })) => {
                Err(LogsError::NoContainer(source, container.clone()))
            }
            other => other,
        };
    }
    let (vm, client, entry) = find(cfg, &args.id).await?;
    let tail = args
        .lines
        .map(|n| format!("&lines={n}"))
        .unwrap_or_default();
    let path = format!(
        "/logs?id={}&follow={}&ansi=false&ch={}{tail}",
        vm.id,
        args.follow,
        args.channel.as_str()
    );
    print_stream(&client, &path, &entry.url).await
}

/// Runs `cvm logs`.
pub async fn run(cfg: &CvmConfig, args: &LogsArgs) -> ExitCode {
    let result = tokio::select! {
        r = show(cfg, args) => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            ExitCode::from(e.code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lines_are_split_across_chunks_and_heartbeats_dropped() {
        let mut l = Lines::default();
        assert_eq!(l.feed(b"boot: ok\r\nsecond li"), vec!["boot: ok"]);
        assert_eq!(l.feed(b"ne\n[vmm heartbeat]\n"), vec!["second line"]);
        assert!(l.feed(b"  [vmm heartbeat]  \nlast").is_empty());
        assert_eq!(l.finish(), Some("last".to_owned()));
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_lines(text in "[a-z \\n]{0,200}", cut in 0usize..200) {
            let bytes = text.as_bytes();
            let cut = cut.min(bytes.len());
            let mut whole = Lines::default();
            let mut expected = whole.feed(bytes);
            expected.extend(whole.finish());
            let mut parts = Lines::default();
            let mut got = parts.feed(&bytes[..cut]);
            got.extend(parts.feed(&bytes[cut..]));
            got.extend(parts.finish());
            prop_assert_eq!(got, expected);
        }
    }
}
