//! `attest verify` and `dev test-pki init` through their library entry points.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use keywarden::attestation::cli::{VerifyArgs, VerifyOutput, evaluate, run_verify};
use keywarden::sim::cli::{TestPkiInitArgs, run_test_pki_init};
use keywarden::sim::testpki::{GuestSpec, TestPki, TestTcb};

fn fixtures() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if dir.join("tdx").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: attestation fixtures not found at {}",
            dir.display()
        );
        None
    }
}

fn args(file: &Path) -> VerifyArgs {
    VerifyArgs {
        file: file.to_path_buf(),
        collateral: None,
        event_log: None,
        at: None,
        json: true,
        insecure_allow_debug: false,
        insecure_test_pki: None,
    }
}

fn code(c: ExitCode) -> String {
    format!("{c:?}")
}

fn run(a: &VerifyArgs) -> (String, VerifyOutput) {
    let (exit, out) = evaluate(a);
    // the printing entry point agrees with the evaluation
    assert_eq!(code(run_verify(a)), code(ExitCode::from(exit)));
    (code(ExitCode::from(exit)), out)
}

#[test]
fn verifies_fixtures() {
    let Some(f) = fixtures() else { return };
    let ok = code(ExitCode::SUCCESS);
    let rejected = code(ExitCode::from(1));
    let unusable = code(ExitCode::from(2));

    let mut a = args(&f.join("tdx/tdx_quote"));
    a.collateral = Some(f.join("tdx/tdx_quote_collateral.json"));
    a.at = Some(1752919234);
    let (c, out) = run(&a);
    assert_eq!(c, ok);
    assert_eq!(out.tcb_status.as_deref(), Some("UpToDate"));
    assert_eq!(out.tee, Some("tdx"));
    assert!(out.mr_td.unwrap().starts_with("91eb2b44"));
    let json = serde_json::to_value(VerifyOutput {
        verdict: "ok",
        ..Default::default()
    })
    .unwrap();
    assert_eq!(json, serde_json::json!({"verdict": "ok"}));

    // after the window: rejected with a typed reason
    a.at = Some(1752919236);
    let (c, out) = run(&a);
    assert_eq!(c, rejected);
    assert_eq!(out.reason.as_deref(), Some("collateral_expired"));

    // a hex quote without collateral is unusable
    let (c, out) = run(&args(&f.join("tdx/tdx-quote.hex")));
    assert_eq!(c, unusable);
    assert_eq!(out.reason.as_deref(), Some("collateral_missing"));
    assert!(out.mr_td.unwrap().starts_with("7ba9e262"));

    // a dstack quote with its event log replays and derives identity
    let mut a = args(&f.join("ra-tls/near_mpc_dstack_tdx_quote.bin"));
    a.collateral = Some(f.join("ra-tls/near_mpc_dstack_tdx_collateral.json"));
    a.event_log = Some(f.join("ra-tls/near_mpc_dstack_tcb_info.json"));
    a.at = Some(1786622400);
    let (c, out) = run(&a);
    assert_eq!(c, ok);
    assert_eq!(
        out.compose_hash.as_deref(),
        Some("2911e1f733466216dedb862d6d669e11256ee7a34ce4dbc66c4b807ba7a9c895")
    );
    assert_eq!(
        out.app_id.as_deref(),
        Some("2911e1f733466216dedb862d6d669e11256ee7a3")
    );

    // Nitro: production verifies, debug is rejected unless allowed
    let mut a = args(&f.join("nitro/dstack_nsm_qvl_prod.cose"));
    a.at = Some(1766668537);
    let (c, out) = run(&a);
    assert_eq!(c, ok);
    assert_eq!(out.tee, Some("nitro"));
    assert!(out.pcr0.unwrap().starts_with("5cb70295"));
    assert_eq!(
        out.module_id.as_deref(),
        Some("i-0827e799ec9232d44-enc019b55a68bd2ed4b")
    );
    let mut a = args(&f.join("nitro/evervault_ga_debug.cose"));
    a.at = Some(1695049410);
    let (c, out) = run(&a);
    assert_eq!(c, rejected);
    assert_eq!(out.reason.as_deref(), Some("debug_enclave"));
    a.insecure_allow_debug = true;
    assert_eq!(run(&a).0, ok);

    // dstack VersionedAttestation (Nitro variant)
    let mut a = args(&f.join("nitro/dstack_attest_prod.versioned_attestation.bin"));
    a.at = Some(1766678659);
    let (c, out) = run(&a);
    assert_eq!(c, ok);
    assert_eq!(
        out.app_id.as_deref(),
        Some("e3b0c44298fc1c149afbf4c8996fb92427ae41e4")
    );
    assert_eq!(
        out.mr_system.as_deref(),
        Some("1894b0b29e94a9db16e88a2914f0923e52bb16c08bf3bb484df786a147e2eb79")
    );
}

#[test]
fn unusable_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let unusable = code(ExitCode::from(2));
    for (name, data) in [
        ("empty", Vec::new()),
        ("garbage", b"hello world".to_vec()),
        ("huge", vec![0u8; 2 * 1024 * 1024]),
        ("truncated-quote", vec![4, 0, 2, 0, 0x81, 0, 0, 0, 1, 2]),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        assert_eq!(run(&args(&p)).0, unusable, "{name}");
    }
    assert_eq!(run(&args(&dir.path().join("missing"))).0, unusable);
}

#[test]
fn test_pki_init_then_verify_a_guest_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    let init = TestPkiInitArgs {
        dir: pki_dir.clone(),
        force: false,
    };
    assert_eq!(code(run_test_pki_init(&init)), code(ExitCode::SUCCESS));
    // refuses to overwrite without --force
    assert_eq!(code(run_test_pki_init(&init)), code(ExitCode::from(2)));

    let pki = TestPki::load(&pki_dir).unwrap();
    let guest = GuestSpec {
        app_id: [0xab; 20],
        compose_hash: [0xcd; 32],
        instance_id: Vec::new(),
        key_provider: Vec::new(),
        mr_td: [1; 48],
        rtmr0_2: [[2; 48], [3; 48], [4; 48]],
        debug: false,
        tcb: TestTcb::UpToDate,
        ppid: None,
        fmspc: None,
    };
    let cert = pki.guest_cert(&guest, None).unwrap();
    let pem_path = dir.path().join("guest.pem");
    std::fs::write(&pem_path, &cert.cert_pem).unwrap();

    let mut a = args(&pem_path);
    a.collateral = Some(pki_dir.join("collateral.json"));
    // the PKI was generated now: verify now
    let (c, out) = run(&a);
    assert_eq!(c, code(ExitCode::from(1)), "{out:?}");
    assert_eq!(out.reason.as_deref(), Some("untrusted_root"));
    a.insecure_test_pki = Some(pki_dir.clone());
    let (c, out) = run(&a);
    assert_eq!(c, code(ExitCode::SUCCESS), "{out:?}");
    assert_eq!(out.app_id.as_deref(), Some(&*hex::encode([0xab; 20])));
    assert_eq!(out.compose_hash.as_deref(), Some(&*hex::encode([0xcd; 32])));

    // DER input is detected too
    let der_path = dir.path().join("guest.der");
    std::fs::write(&der_path, &cert.cert_der).unwrap();
    a.file = der_path;
    assert_eq!(run(&a).0, code(ExitCode::SUCCESS));
}

/// `/dev/zero` and a FIFO are refused at once instead of being read forever or waited on; the
/// real binary reads `-` (standard input) up to the same cap.
#[test]
fn devices_and_fifos_are_refused_and_stdin_is_capped() {
    let unusable = code(ExitCode::from(2));
    let (exit, out) = run(&args(Path::new("/dev/zero")));
    assert_eq!(exit, unusable);
    assert!(
        out.detail
            .as_deref()
            .is_some_and(|d| d.contains("not a regular file")),
        "{out:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let started = std::time::Instant::now();
    assert_eq!(run(&args(&fifo)).0, unusable);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));

    // Standard input: more than the cap is refused with exit 2 after reading at most the cap.
    use std::io::Write as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keywarden"))
        .args(["attest", "verify", "-", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Writes until the reader stops reading (it closes stdin after the cap), bounded.
    let writer = std::thread::spawn(move || {
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..64 {
            if stdin.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["reason"], "input_too_large");
}
