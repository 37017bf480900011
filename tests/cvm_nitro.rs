//! Nitro Enclave vsock-proxy checks against real things on this host: a listening socket and a
//! process matched by its command line pass while they run and fail once they stop; a systemd
//! unit cannot be asked where there is no systemd, and says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use keywarden::cvm::config::NitroProxy;
use keywarden::cvm::metrics::CvmMetrics;
use keywarden::cvm::nitro::{Check, ProxyChecker};
use prometheus_client::registry::Registry;

fn proxy() -> NitroProxy {
    NitroProxy {
        systemd_unit: None,
        process: None,
        listening_port: None,
        connect: None,
        connect_timeout: Duration::from_secs(1),
        check_interval: Duration::from_secs(15),
    }
}

/// A child process killed when dropped, also when the test fails.
struct Child(std::process::Child);

impl Child {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stop();
    }
}

fn outcome(results: &[(Check, Result<(), String>)], check: Check) -> Result<(), String> {
    results.iter().find(|(c, _)| *c == check).unwrap().1.clone()
}

#[tokio::test]
async fn a_running_listener_and_process_pass_and_fail_once_stopped() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // A process with a command line no other process has.
    let marker = format!("{}.{}", 4000 + std::process::id() % 1000, addr.port());
    let mut child = Child(
        std::process::Command::new("sleep")
            .arg(&marker)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Spawned is not yet exec'd: wait (bounded) until its command line is the marker's.
    let cmdline = format!("/proc/{}/cmdline", child.0.id());
    for _ in 0..200 {
        if std::fs::read(&cmdline).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut registry = Registry::default();
    let metrics = CvmMetrics::new(&mut registry, 500);
    let checker = ProxyChecker::new(
        0,
        NitroProxy {
            process: Some(format!("sleep {marker}")),
            listening_port: Some(addr.port()),
            connect: Some(addr),
            ..proxy()
        },
        metrics.clone(),
    );
    let results = checker.check().await;
    for check in [Check::Process, Check::Listening, Check::Connect] {
        assert_eq!(outcome(&results, check), Ok(()), "{check:?}");
    }
    metrics.nitro_proxy(0, &keywarden::cvm::nitro::passed(&results));
    let text = keywarden::telemetry::encode(&registry).unwrap();
    assert!(
        text.contains("dstack_cvm_vsock_proxy_up{proxy=\"0\"} 1"),
        "{text}"
    );

    drop(listener);
    child.stop();
    let results = checker.check().await;
    assert!(
        outcome(&results, Check::Process)
            .unwrap_err()
            .contains("no process")
    );
    assert!(
        outcome(&results, Check::Listening)
            .unwrap_err()
            .contains("nothing listens")
    );
    assert!(
        outcome(&results, Check::Connect)
            .unwrap_err()
            .contains("failed")
    );
    metrics.nitro_proxy(0, &keywarden::cvm::nitro::passed(&results));
    let text = keywarden::telemetry::encode(&registry).unwrap();
    assert!(
        text.contains("dstack_cvm_vsock_proxy_up{proxy=\"0\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("dstack_cvm_vsock_proxy_check_up{proxy=\"0\",check=\"listening\"} 0"),
        "{text}"
    );
}

#[tokio::test]
async fn a_systemd_unit_is_asked_of_systemctl_or_named_as_unaskable() {
    let checker = ProxyChecker::new(
        0,
        NitroProxy {
            systemd_unit: Some("nitro-enclaves-vsock-proxy.service".into()),
            ..proxy()
        },
        CvmMetrics::new(&mut Registry::default(), 500),
    );
    let results = checker.check().await;
    // No such unit runs here, whether or not systemd does: the check fails with its reason.
    let reason = outcome(&results, Check::Systemd).unwrap_err();
    assert!(
        reason.contains("no systemd to ask")
            || reason.contains("nitro-enclaves-vsock-proxy.service is"),
        "{reason}"
    );
}
