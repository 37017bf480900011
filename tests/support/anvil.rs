//! A local anvil node for integration tests.
//!
//! The binary comes from the npm package `@foundry-rs/anvil` (`npm ci --ignore-scripts --no-audit
//! --no-fund` at the repository root); `KEYWARDEN_TEST_ANVIL` may point at another binary. The node
//! listens on 127.0.0.1 on a free port and is killed when the handle is dropped.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

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
            "anvil not found at {}: run the suite with scripts/test (it installs @foundry-rs/anvil \
             with npm ci), or set KEYWARDEN_TEST_ANVIL",
            path.display()
        );
        path
    }

    /// Starts anvil with its default dev accounts (and `extra_args`) and waits until it reports
    /// listening on its port. Two tests may be handed the same free port: the loser's anvil exits
    /// without that line, and it is retried on another port.
    pub fn spawn_with(extra_args: &[&str]) -> Self {
        let binary = Self::binary();
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&binary)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(extra_args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            let stdout = child.stdout.take().expect("piped stdout");
            let (tx, rx) = mpsc::channel();
            // Reads until anvil exits, so its stdout pipe never fills up.
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("Listening on") {
                        let _ = tx.send(line);
                    }
                }
            });
            let expected = format!("127.0.0.1:{port}");
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(line) if line.contains(&expected) => return Self { child, port },
                Ok(line) => last_error = format!("unexpected anvil output: {line}"),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    last_error = format!("anvil exited without listening on port {port}");
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    last_error = format!("anvil did not listen on port {port} within 10 s");
                }
            }
            let _ = child.kill();
            let _ = child.wait();
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

impl Anvil {
    /// Stops the node now (the chain is gone for whoever follows it).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}
