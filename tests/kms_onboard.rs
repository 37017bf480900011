//! `keywarden kms onboard`: a new replica attests itself to a running keywarden and fetches its
//! root keys with `GetKmsKey`; both then give byte-identical app keys for the same boot. Keys
//! already there are never overwritten: the same ones are left as they are, others refuse. A
//! source that cannot be authenticated against `--ca` gives nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use keywarden::sim::client::{Guest, guest_spec, simulated_vm_config};
use keywarden::sim::testpki::TestPki;

const DEV_AUTH: [(&str, &str); 2] = [
    ("KEYWARDEN_AUTH__BACKEND", "dev"),
    ("KEYWARDEN_AUTH__INSECURE_DEV_AUTH", "true"),
];

fn onboard(from: &str, ca: &Path, pki: &Path, data: &Path) -> (i32, String, String) {
    common::run_to_end(
        &[
            "kms",
            "onboard",
            "--from",
            from,
            "--ca",
            ca.to_str().unwrap(),
            "--test-pki",
            pki.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[],
    )
}

async fn app_key(url: &str, ca: &Path, pki: &TestPki) -> keywarden::kms::proto::AppKeyResponse {
    let guest = Guest::enroll(
        url,
        Some(std::fs::read_to_string(ca).unwrap()),
        pki,
        &guest_spec([0xa1; 20], b"services: {}", vec![0x1d; 20]),
        false,
    )
    .await
    .unwrap();
    guest.get_app_key(&simulated_vm_config()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_onboarded_replica_gives_byte_identical_app_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = DEV_AUTH.to_vec();
    env.push(("KEYWARDEN_KMS__ALLOW_KMS_REPLICATION", "true"));
    let (mut source, pki) = common::start_with_test_pki(dir.path(), &env);
    source.wait_ready().await;
    let pki_dir = dir.path().join("pki");
    let source_ca = dir.path().join("data/kms/root-ca.pem");
    let replica = dir.path().join("replica");

    let (code, out, err) = onboard(&source.api_url(), &source_ca, &pki_dir, &replica);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("stored the root keys of"), "{out}");
    for file in ["root-ca.key", "root-k256.key", "tmp-ca.key", "rpc.key"] {
        let mode = std::fs::metadata(replica.join("kms").join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    assert_eq!(
        std::fs::read_to_string(replica.join("kms/root-ca.pem")).unwrap(),
        std::fs::read_to_string(&source_ca).unwrap()
    );
    assert!(
        source
            .lines()
            .iter()
            .any(|l| l.contains("root keys released to a KMS replica")),
        "the source logs the release"
    );

    // The replica serves the same keys for the same boot.
    let images =
        keywarden::kms::osimage::env_value(&[keywarden::sim::client::simulated_os_image()]);
    let mut replica_env = DEV_AUTH.to_vec();
    replica_env.push(("KEYWARDEN_KMS__OS_IMAGES", &images));
    let mut second = common::Keywarden::start(
        &replica,
        &["--insecure-test-pki", pki_dir.to_str().unwrap()],
        &replica_env,
    );
    second.wait_ready().await;
    let from_source = app_key(&source.api_url(), &source_ca, &pki).await;
    let from_replica = app_key(&second.api_url(), &replica.join("kms/root-ca.pem"), &pki).await;
    assert_eq!(from_source, from_replica);
    assert_eq!(from_source.disk_crypt_key.len(), 32);

    // Onboarding while the replica runs on that directory is refused; afterwards it is a no-op.
    let (code, _, err) = onboard(&source.api_url(), &source_ca, &pki_dir, &replica);
    assert_eq!(code, 2, "{err}");
    assert_eq!(second.terminate(Duration::from_secs(5)), 0);
    let (code, out, err) = onboard(&source.api_url(), &source_ca, &pki_dir, &replica);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("already holds the root keys of"), "{out}");

    // A directory with other keys is never overwritten.
    let other = dir.path().join("other");
    let own = keywarden::kms::root::load_or_create(&other, &Default::default()).unwrap();
    let before = std::fs::read(other.join("kms/root-k256.key")).unwrap();
    drop(own);
    let (code, _, err) = onboard(&source.api_url(), &source_ca, &pki_dir, &other);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("already holds other root keys than the source's; refusing to overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(other.join("kms/root-k256.key")).unwrap(),
        before
    );

    // A source whose certificate does not chain to --ca gives nothing.
    let stranger = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let wrong_ca = dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong_ca, stranger.cert.pem()).unwrap();
    let empty = dir.path().join("empty");
    let (code, _, err) = onboard(&source.api_url(), &wrong_ca, &pki_dir, &empty);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("GetMeta: the source did not answer"), "{err}");
    assert!(!empty.join("kms").exists());
    assert_eq!(source.terminate(Duration::from_secs(5)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_without_replication_or_an_unattested_replica_gives_no_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (mut source, _pki) = common::start_with_test_pki(dir.path(), &DEV_AUTH);
    source.wait_ready().await;
    let source_ca = dir.path().join("data/kms/root-ca.pem");
    let replica = dir.path().join("replica");
    let (code, _, err) = onboard(
        &source.api_url(),
        &source_ca,
        &dir.path().join("pki"),
        &replica,
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("GetKmsKey: the source refused (HTTP 400)")
            && err.contains("replication is disabled"),
        "{err}"
    );
    assert!(!replica.join("kms").exists());
    // Without --test-pki and outside a CVM, there is nothing to attest with.
    let (code, _, err) = common::run_to_end(
        &[
            "kms",
            "onboard",
            "--from",
            &source.api_url(),
            "--ca",
            source_ca.to_str().unwrap(),
            "--data-dir",
            replica.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("onboarding attests this instance"), "{err}");
    assert_eq!(source.terminate(Duration::from_secs(5)), 0);
}

/// `dev deploy --env-file F [--allow-test-kms DIR]` on anvil: the variables in F.
fn deploy(rpc: &str, env_file: &Path, allow: Option<&Path>) -> Vec<(String, String)> {
    let mut args = vec!["dev", "deploy", "--rpc", rpc, "--env-file"];
    args.push(env_file.to_str().unwrap());
    if let Some(dir) = allow {
        args.extend(["--allow-test-kms", dir.to_str().unwrap()]);
    }
    let (code, _, err) = common::run_to_end(&args, &[]);
    assert_eq!(code, 0, "{err}");
    std::fs::read_to_string(env_file)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_owned(), v.trim_matches('\'').to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_onboards_from_a_chain_governed_source_once_dev_deploy_allowed_its_test_kms() {
    let anvil = support::anvil::Anvil::spawn();
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    let (code, _, err) =
        common::run_to_end(&["dev", "test-pki", "init", pki_dir.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let rpc = anvil.url().to_string();
    for (n, allow) in [(0, None), (1, Some(pki_dir.as_path()))] {
        let vars = deploy(&rpc, &dir.path().join(format!("chain-{n}.env")), allow);
        let names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
        let mut expected = vec![
            "KEYWARDEN_CHAIN__RPC_URLS",
            "KEYWARDEN_CHAIN__KMS_CONTRACT",
            "KEYWARDEN_CHAIN__START_BLOCK",
        ];
        let images =
            keywarden::kms::osimage::env_value(&[keywarden::sim::client::simulated_os_image()]);
        let mut env: Vec<(&str, &str)> =
            vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        if allow.is_some() {
            expected.push("KEYWARDEN_KMS__OS_IMAGES");
        } else {
            env.push(("KEYWARDEN_KMS__OS_IMAGES", &images));
        }
        assert_eq!(names, expected);
        env.extend([
            ("KEYWARDEN_KMS__ALLOW_KMS_REPLICATION", "true"),
            ("KEYWARDEN_CHAIN__CONFIRMATIONS", "0"),
        ]);
        let data = dir.path().join(format!("source-{n}"));
        let mut source = common::Keywarden::start(
            &data,
            &["--insecure-test-pki", pki_dir.to_str().unwrap()],
            &env,
        );
        source.wait_ready().await;
        let replica = dir.path().join(format!("replica-{n}"));
        let (code, out, err) = onboard(
            &source.api_url(),
            &data.join("kms/root-ca.pem"),
            &pki_dir,
            &replica,
        );
        if allow.is_some() {
            assert_eq!(code, 0, "{err}");
            assert!(out.contains("stored the root keys of"), "{out}");
        } else {
            // The source asks the chain, which has not allowed this KMS.
            assert_eq!(code, 1, "{out}");
            assert!(err.contains("not allowed"), "{err}");
            assert!(!replica.join("kms").exists());
        }
        assert_eq!(source.terminate(Duration::from_secs(5)), 0);
    }
}

#[test]
fn dev_deploy_with_a_missing_test_pki_fails_before_sending_anything() {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("chain.env");
    let missing = dir.path().join("no-pki");
    // No node answers at this URL: the PKI is read first, so that is never reached.
    let (code, _, err) = common::run_to_end(
        &[
            "dev",
            "deploy",
            "--rpc",
            &format!("http://127.0.0.1:{}", common::free_port()),
            "--env-file",
            env_file.to_str().unwrap(),
            "--allow-test-kms",
            missing.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("test PKI {}", missing.display())),
        "{err}"
    );
    assert!(!env_file.exists());
}
