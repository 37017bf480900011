//! `keywarden serve` as a new user runs it: the real binary, real listeners, SQLite and
//! PostgreSQL, SIGTERM, and every bad input with its one-line error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Keywarden, PgDb, http, https, run_to_end};

/// Metric names (as queried: counters with `_total`) in the README table; `per_instance`: only
/// those whose series are per VM (labels `instance` and `app`), per probed KMS (`peer`) or per vsock proxy
/// (`proxy`), which exist only while one is polled, probed or checked.
fn readme_metrics(per_instance: bool) -> BTreeSet<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("<!-- metrics:begin -->")
        .expect("README metrics table start marker");
    let end = readme
        .find("<!-- metrics:end -->")
        .expect("README metrics table end marker");
    readme[start..end]
        .lines()
        .filter(|l| {
            !per_instance
                || [
                    "labels `instance`",
                    "label `peer`",
                    "label `proxy`",
                    "labels `proxy`",
                ]
                .iter()
                .any(|m| l.contains(m))
        })
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}

/// Metric names (as queried) in an OpenMetrics exposition.
fn exported_metrics(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let mut it = l.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            }
        })
        .collect()
}

#[tokio::test]
async fn serve_on_sqlite_answers_health_metrics_logs_json_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut kw = Keywarden::start(dir.path(), &[], &[]);
    kw.wait_ready().await;
    let ready_after = started.elapsed();
    let client = http();
    let tls = https(dir.path());

    let health = tls
        .get(format!("{}/health", kw.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.headers()["x-app-version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(health.text().await.unwrap(), "OK");

    let missing = tls
        .get(format!("{}/nope", kw.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.json::<serde_json::Value>().await.unwrap()["error"],
        "Not found: /nope"
    );

    assert_eq!(
        client
            .get(format!("http://{}/livez", kw.metrics))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let metrics = client
        .get(format!("http://{}/metrics", kw.metrics))
        .send()
        .await
        .unwrap();
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = metrics.text().await.unwrap();
    assert!(text.contains("keywarden_build_info{version=\""), "{text}");
    assert!(text.contains("keywarden_uptime_seconds "), "{text}");
    assert!(text.contains("keywarden_healthy 1"), "{text}");
    assert!(
        text.contains("keywarden_background_task_panics_total{task=\"api_listener\"} 0"),
        "{text}"
    );

    // The README documents exactly what the service exports (per-VM and per-peer families have
    // no series while nothing is polled).
    let exported = exported_metrics(&text);
    let documented: BTreeSet<String> = readme_metrics(false)
        .difference(&readme_metrics(true))
        .cloned()
        .chain(exported.intersection(&readme_metrics(true)).cloned())
        .collect();
    assert_eq!(documented, exported, "README metrics table is out of date");
    assert_eq!(
        readme_metrics(true),
        [
            "dstack_cvm_last_seen_timestamp_seconds",
            "dstack_cvm_memory_usage_ratio",
            "dstack_cvm_peer_kms_attestation_failures_total",
            "dstack_cvm_peer_kms_attestation_requests_total",
            "dstack_cvm_peer_kms_cert_expiry_seconds",
            "dstack_cvm_peer_kms_probe_duration_seconds",
            "dstack_cvm_peer_kms_up",
            "dstack_cvm_up",
            "dstack_cvm_vsock_proxy_check_up",
            "dstack_cvm_vsock_proxy_up",
        ]
        .map(String::from)
        .into(),
    );

    // Admin API is off without a token.
    assert!(
        client
            .get(format!("http://{}/admin/status", kw.admin))
            .send()
            .await
            .is_err()
    );

    let code = kw.terminate(Duration::from_secs(5));
    assert_eq!(code, 0);
    let lines = kw.lines();
    assert!(!lines.is_empty());
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string() && v["target"].is_string(),
            "{line}"
        );
    }
    let ready = lines
        .iter()
        .find(|l| l.contains("\"keywarden ready\""))
        .expect("ready line");
    let ready: serde_json::Value = serde_json::from_str(ready).unwrap();
    assert_eq!(ready["trace_id"].as_str().unwrap().len(), 32);
    assert!(lines.iter().any(|l| l.contains("\"keywarden stopped\"")));
    eprintln!("process start to /readyz 200 (debug build, incl. polling): {ready_after:?}");
}

#[tokio::test]
async fn serve_on_postgres_works_the_same_and_remembers_clean_shutdown() {
    let db = PgDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    for round in 0..2 {
        let mut kw = Keywarden::start(dir.path(), &["--database-url", &db.url], &[]);
        kw.wait_ready().await;
        let client = https(dir.path());
        assert_eq!(
            client
                .get(format!("{}/health", kw.api_url()))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "OK"
        );
        assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
        let lines = kw.lines();
        assert!(
            lines
                .iter()
                .any(|l| l.contains("\"database\":\"postgres\"")),
            "{lines:?}"
        );
        assert!(
            !lines
                .iter()
                .any(|l| l.contains("did not shut down cleanly")),
            "round {round}: clean shutdown must be remembered: {lines:?}"
        );
    }
    assert!(
        !dir.path().join("keywarden.db").exists(),
        "PostgreSQL mode must not create SQLite files"
    );
    db.drop_now().await;
}

#[tokio::test]
async fn admin_api_requires_the_token_and_audits_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "correct horse\n").unwrap();
    let token_ref = format!("file:{}", token_file.display());
    let audit_file = dir.path().join("audit.jsonl");
    let mut kw = Keywarden::start(
        &dir.path().join("data"),
        &[],
        &[
            ("KEYWARDEN_ADMIN__TOKEN", &token_ref),
            (
                "KEYWARDEN_TELEMETRY__AUDIT_FILE",
                audit_file.to_str().unwrap(),
            ),
            // RUST_LOG overrides the configured level: only warnings reach stdout.
            ("RUST_LOG", "warn"),
        ],
    );
    kw.wait_ready().await;
    let client = http();
    let url = |p: &str| format!("http://{}{p}", kw.admin);

    let no = client.get(url("/admin/status")).send().await.unwrap();
    assert_eq!(no.status(), 401);
    assert_eq!(no.headers()["www-authenticate"], "Bearer");
    let wrong = client
        .get(url("/admin/status"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    let ok = client
        .get(url("/admin/status"))
        .bearer_auth("correct horse")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let status: serde_json::Value = ok.json().await.unwrap();
    assert_eq!(status["database"]["backend"], "sqlite");
    assert_eq!(status["ready"], true);

    let cfg = client
        .get(url("/admin/config"))
        .bearer_auth("correct horse")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(cfg.contains(&token_ref), "{cfg}");
    assert!(
        !cfg.contains("correct horse"),
        "the secret must never be printed: {cfg}"
    );

    let audit: serde_json::Value = client
        .get(url("/admin/audit?limit=10"))
        .bearer_auth("correct horse")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let refusals = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "admin_auth" && r["outcome"] == "refused")
        .count();
    assert_eq!(refusals, 2, "{audit}");
    let bad_limit = client
        .get(url("/admin/audit?limit=0"))
        .bearer_auth("correct horse")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_limit.status(), 400);
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);

    // The audit target is routed to its own file as JSON lines.
    let audit_lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        audit_lines.iter().all(|v| v["target"] == "audit"),
        "{audit_lines:?}"
    );
    let kinds: Vec<&str> = audit_lines
        .iter()
        .filter_map(|v| v["fields"]["kind"].as_str())
        .collect();
    for kind in ["service_start", "service_stop", "kms_keys_created"] {
        assert!(kinds.contains(&kind), "{kind}: {kinds:?}");
    }
    assert_eq!(
        kinds.iter().filter(|k| **k == "admin_auth").count(),
        2,
        "{kinds:?}"
    );
    // With RUST_LOG=warn no info line reached stdout, but the refusals (warnings) did.
    let lines = kw.lines();
    assert!(
        !lines.iter().any(|l| l.contains("\"level\":\"INFO\"")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("admin request refused")),
        "{lines:?}"
    );
}

/// Asserts a one-line error on stderr with a fix and no panic/backtrace.
fn assert_one_line_error(code: i32, stderr: &str, expected_code: i32, needle: &str) {
    assert_eq!(code, expected_code, "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line expected: {stderr}");
    assert!(lines[0].starts_with("keywarden: error: "), "{stderr}");
    assert!(lines[0].contains(needle), "{needle:?} missing: {stderr}");
    assert!(lines[0].contains("fix"), "a fix must be named: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

#[test]
fn unknown_config_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(&cfg, "[storage]\ndata_dri = \"x\"\n").unwrap();
    let (code, _, err) = run_to_end(&["--config", cfg.to_str().unwrap(), "serve"], &[]);
    assert_one_line_error(code, &err, 2, "data_dri");
}

#[test]
fn malformed_database_url_is_refused() {
    let (code, _, err) = run_to_end(&["serve", "--database-url", "postgres//nohost"], &[]);
    assert_one_line_error(code, &err, 2, "storage.database_url");
}

#[test]
fn unreadable_secret_file_is_refused() {
    let (code, _, err) = run_to_end(
        &["serve"],
        &[("KEYWARDEN_ADMIN__TOKEN", "file:/nonexistent/kw/admin-token")],
    );
    assert_one_line_error(code, &err, 2, "/nonexistent/kw/admin-token");
}

#[test]
fn unreachable_database_is_refused_without_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{}/kw", common::free_port());
    let (code, _, err) = run_to_end(
        &[
            "serve",
            "--database-url",
            &url,
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--api-listen",
            &common::free_addr().to_string(),
            "--metrics-listen",
            &common::free_addr().to_string(),
        ],
        &[("KEYWARDEN_STORAGE__CONNECT_TIMEOUT", "300ms")],
    );
    assert_one_line_error(code, &err, 1, "cannot open database");
    assert!(!dir.path().join("data").exists(), "nothing may be written");
}

#[test]
fn unwritable_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let (code, _, err) = run_to_end(
        &[
            "serve",
            "--data-dir",
            file.join("sub").to_str().unwrap(),
            "--api-listen",
            &common::free_addr().to_string(),
            "--metrics-listen",
            &common::free_addr().to_string(),
        ],
        &[],
    );
    assert_one_line_error(code, &err, 1, "data directory");
}

#[test]
fn port_in_use_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = run_to_end(
        &[
            "serve",
            "--api-listen",
            &addr,
            "--metrics-listen",
            &common::free_addr().to_string(),
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
        ],
        &[],
    );
    assert_one_line_error(code, &err, 1, "api.listen");
    assert!(err.contains("in use"), "{err}");
    assert!(!dir.path().join("data").exists(), "nothing may be written");
}

#[test]
fn config_check_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        "[storage]\ndatabase_url = \"postgres://kw:hunter2@db:5432/kw\"\n[admin]\ntoken = \"env:KW_TEST_ADMIN_TOKEN\"\n",
    )
    .unwrap();
    let (code, out, err) = run_to_end(
        &["config", "check", cfg.to_str().unwrap()],
        &[("KW_TEST_ADMIN_TOKEN", "topsecret")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("[api]") && out.contains("listen = \"0.0.0.0:8000\""),
        "{out}"
    );
    assert!(out.contains("token = \"env:KW_TEST_ADMIN_TOKEN\""), "{out}");
    assert!(
        !out.contains("hunter2") && !out.contains("topsecret"),
        "{out}"
    );
    let (code, _, err) = run_to_end(&["config", "check", cfg.to_str().unwrap()], &[]);
    assert_one_line_error(code, &err, 2, "KW_TEST_ADMIN_TOKEN");
}

#[test]
fn version_names_the_git_revision() {
    let (code, out, _) = run_to_end(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with(&format!("keywarden {} (", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
}

#[test]
fn attest_verify_and_test_pki_init_are_wired() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let (code, _, err) = run_to_end(&["dev", "test-pki", "init", pki.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    // Unusable input: exit 2 with a JSON verdict naming the reason.
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"definitely not a quote").unwrap();
    let (code, out, _) = run_to_end(&["attest", "verify", junk.to_str().unwrap(), "--json"], &[]);
    assert_eq!(code, 2, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verdict"], "rejected");
    assert!(v["reason"].is_string(), "{v}");
}

#[tokio::test]
async fn first_start_creates_kms_keys_and_kms_info_prints_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (code, _, err) = run_to_end(&["kms", "info", "--data-dir", data.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "no keys before the first start: {err}");
    assert!(err.contains("no KMS keys yet"), "{err}");

    let mut kw = Keywarden::start(&data, &[], &[]);
    kw.wait_ready().await;
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
    assert!(kw.lines().iter().any(|l| l.contains("kms_keys_created")));

    let (code, out, err) = run_to_end(
        &[
            "kms",
            "info",
            "--data-dir",
            data.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["k256_pubkey"].as_str().unwrap().len(), 66);
    assert_eq!(v["bootstrap_report_data"].as_str().unwrap().len(), 128);

    // Keys survive restarts: a second start does not create new ones.
    let mut kw = Keywarden::start(&data, &[], &[]);
    kw.wait_ready().await;
    assert_eq!(kw.terminate(Duration::from_secs(5)), 0);
    assert!(!kw.lines().iter().any(|l| l.contains("kms_keys_created")));
    let (_, again, _) = run_to_end(
        &[
            "kms",
            "info",
            "--data-dir",
            data.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert_eq!(out, again);
}

/// A second service on a data directory that a running one holds is refused with one line
/// before it touches the database (no "previous run did not shut down cleanly" on either), and
/// the SQLite database is created 0600.
#[tokio::test]
async fn a_second_instance_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut kw = Keywarden::start(dir.path(), &[], &[]);
    kw.wait_ready().await;
    let (code, _, err) = common::run_serve(dir.path(), &[], &[]);
    assert_one_line_error(code, &err, 1, "in use by another running keywarden");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("keywarden.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "keywarden.db mode {mode:o}");
    }
    assert_eq!(kw.terminate(Duration::from_secs(10)), 0);
    // Stopped cleanly: the next start takes the directory and reports no unclean shutdown.
    let mut again = Keywarden::start(dir.path(), &[], &[]);
    again.wait_ready().await;
    assert!(
        !again
            .lines()
            .iter()
            .any(|l| l.contains("did not shut down cleanly")),
        "{:#?}",
        again.lines()
    );
    assert_eq!(again.terminate(Duration::from_secs(10)), 0);
}

/// A test PKI directory that holds none is a configuration error named by `config check` and by
/// `serve` alike (exit 2, one line, the command that makes one).
#[test]
fn a_missing_test_pki_directory_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-pki");
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        format!(
            "[attestation]\ninsecure_test_pki = \"{}\"\n",
            missing.display()
        ),
    )
    .unwrap();
    let (code, _, err) = run_to_end(&["config", "check", cfg.to_str().unwrap()], &[]);
    assert_one_line_error(code, &err, 2, "attestation.insecure_test_pki");
    assert!(err.contains("dev test-pki init"), "{err}");
    let (code, _, err) = common::run_serve(
        &dir.path().join("data"),
        &["--insecure-test-pki", missing.to_str().unwrap()],
        &[],
    );
    assert_one_line_error(code, &err, 2, "holds no test PKI");
}

/// A key file missing from an existing key set: one line naming the file, and restoring (not
/// regenerating, not a permission fix) as the remedy.
#[tokio::test]
async fn a_missing_key_file_names_the_file_and_says_restore() {
    let dir = tempfile::tempdir().unwrap();
    let mut kw = Keywarden::start(dir.path(), &[], &[]);
    kw.wait_ready().await;
    assert_eq!(kw.terminate(Duration::from_secs(10)), 0);
    let key = dir.path().join("kms/root-k256.key");
    std::fs::remove_file(&key).unwrap();
    let (code, _, err) = common::run_serve(dir.path(), &[], &[]);
    assert_one_line_error(code, &err, 1, "root-k256.key is missing");
    assert!(
        err.contains("restore") && !err.contains("writable"),
        "{err}"
    );
}

/// Key files that still decode but are wrong stop start-up with one line naming the file: a
/// flipped bit in the k256 root key (caught by the fingerprints recorded at creation), and two
/// certificates swapped in a key set created before fingerprints existed (caught by the
/// certificate checks, before the fingerprints are recorded).
#[tokio::test]
async fn key_files_that_decode_but_are_wrong_stop_start_up() {
    let serve = |dir: &std::path::Path| common::run_serve(dir, &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let mut kw = Keywarden::start(dir.path(), &[], &[]);
    kw.wait_ready().await;
    assert_eq!(kw.terminate(Duration::from_secs(10)), 0);
    let kms = dir.path().join("kms");
    assert!(kms.join("fingerprints.json").is_file());

    let key = kms.join("root-k256.key");
    let original = std::fs::read(&key).unwrap();
    let mut flipped = original.clone();
    flipped[5] ^= 0x01;
    std::fs::write(&key, &flipped).unwrap();
    let (code, _, err) = serve(dir.path());
    assert_one_line_error(code, &err, 1, "root-k256.key");
    assert!(err.contains("fingerprint"), "{err}");
    std::fs::write(&key, &original).unwrap();

    // A key set from before fingerprints, with the temp CA and RPC certificates swapped.
    std::fs::remove_file(kms.join("fingerprints.json")).unwrap();
    let (tmp, rpc) = (kms.join("tmp-ca.pem"), kms.join("rpc.pem"));
    let (tmp_pem, rpc_pem) = (std::fs::read(&tmp).unwrap(), std::fs::read(&rpc).unwrap());
    std::fs::write(&tmp, &rpc_pem).unwrap();
    std::fs::write(&rpc, &tmp_pem).unwrap();
    let (code, _, err) = serve(dir.path());
    assert_one_line_error(code, &err, 1, "tmp-ca.pem");
    assert!(err.contains("is not the one of tmp-ca.key"), "{err}");
    assert!(!kms.join("fingerprints.json").exists());
    std::fs::write(&tmp, &tmp_pem).unwrap();
    std::fs::write(&rpc, &rpc_pem).unwrap();

    // Restored: it starts, and records the fingerprints.
    let mut kw = Keywarden::start(dir.path(), &[], &[]);
    kw.wait_ready().await;
    assert_eq!(kw.terminate(Duration::from_secs(10)), 0);
    assert!(kms.join("fingerprints.json").is_file());
}
