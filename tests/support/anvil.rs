//! A local anvil node for integration tests.
//!
//! The binary comes from the npm package `@foundry-rs/anvil` (`npm ci --ignore-scripts --no-audit
//! --no-fund` at the repository root); `KEYWARDEN_TEST_ANVIL` may point at another binary. The node
//! listens on 127.0.0.1 on a free port and is killed when the handle is dropped.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `npm ci` puts the anvil binary, relative to the repository root.
pub const NPM_ANVIL: &str = "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil";

/// A running anvil, killed on drop.
pub struct Anvil {
    child: Child,
    port: u16,
}

impl Anvil {
    /// Path of the anvil binary; panics with set-up instructions if it is missing.
    pub fn binary() -> PathBuf {
        let path = std::env::var_os("KEYWARDEN_TEST_ANVIL")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(NPM_ANVIL));
        assert!(
            path.is_file(),
            "anvil not found at {}: run `npm ci --ignore-scripts --no-audit --no-fund` at the \
             repository root (it installs @foundry-rs/anvil), or set KEYWARDEN_TEST_ANVIL",
            path.display()
        );
        path
    }

    /// Starts anvil with its default dev accounts (and `extra_args`) and waits until it accepts
    /// connections. Retries on another port if the chosen one was taken in between.
    pub fn spawn_with(extra_args: &[&str]) -> Self {
        let binary = Self::binary();
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut child = Command::new(&binary)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(extra_args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(status) = child.try_wait().expect("poll anvil") {
                    last_error = format!("anvil exited early with {status} (port {port})");
                    break;
                }
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                    return Self { child, port };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = format!("anvil did not listen on port {port} within 10 s");
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("could not start anvil: {last_error}");
    }

    /// Starts anvil with default settings.
    pub fn spawn() -> Self {
        Self::spawn_with(&[])
    }

    /// HTTP JSON-RPC endpoint.
    pub fn url(&self) -> url::Url {
        format!("http://127.0.0.1:{}", self.port)
            .parse()
            .expect("valid URL")
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}
