//! The README's first command: the whole demo (anvil, contracts, keywarden with the test PKI,
//! simulated CVMs, a Safe and timelock governing the contracts, the signers' critical alert,
//! on-chain revocation) runs to its end and cleans up after itself, from a directory outside the
//! repository (its npm toolchain installed into keywarden's cache, kept under the build
//! directory between runs); without npm it says in one line what to install.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[test]
fn demo_serves_keys_then_refuses_after_on_chain_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-npm-cache");
    let (code, out, err) = common::run_in(
        dir.path(),
        &[
            "demo",
            "--duration",
            "0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[("XDG_CACHE_HOME", cache.to_str().unwrap())],
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(out.matches("got its keys over RA-TLS").count(), 3, "{out}");
    assert!(out.contains("Compose hash not allowed"), "{out}");
    assert!(
        out.contains("TEST attestation PKI"),
        "the test PKI is labelled: {out}"
    );
    // The signers are alerted, naming the three instances, before the timelock executes.
    let alerted = out
        .find("signers alerted before execution: [CRITICAL]")
        .unwrap_or_else(|| panic!("no critical alert printed: {out}"));
    let executed = out.find("the timelock executed the removal").unwrap();
    assert!(alerted < executed, "{out}");
    assert!(out.contains("(affected_instances=3)"), "{out}");
    assert!(out[alerted..executed].contains("3 instance(s)"), "{out}");
    assert!(out.contains("the signers' alert resolved"), "{out}");
    // The fleet from the KMS's records: CVM 1 (instance 0x0101…) restarted, CVMs 2 and 3 deployed.
    let list = &out[out.find("$ keywarden cvm list").unwrap()..];
    let state = |prefix: &str| {
        list.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {list}"))
            .to_owned()
    };
    assert!(state("010101010101").contains(" restarted "), "{list}");
    assert!(state("020202020202").contains(" deployed "), "{list}");
    assert!(state("030303030303").contains(" deployed "), "{list}");
    assert!(
        out.contains("stopped keywarden, anvil and the signers' webhook"),
        "{out}"
    );
    let log = std::fs::read_to_string(data.join("keywarden.log")).unwrap();
    for message in [
        "\"key dispatched\"",
        "\"measurement not authorized\"",
        "\"on-chain sync completed\"",
        "\"governance: suspicious transaction\"",
        "\"measurement registered\"",
        "\"CVM deployed\"",
        "\"CVM restarted\"",
    ] {
        assert!(
            log.contains(message),
            "{message} missing from the keywarden log"
        );
    }
}

#[test]
fn the_demo_outside_the_repository_without_npm_names_what_to_install() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().to_str().unwrap();
    let (code, out, err) = common::run_in(
        dir.path(),
        &["demo", "--duration", "0"],
        &[
            ("PATH", "/nonexistent"),
            ("HOME", home),
            ("XDG_CACHE_HOME", home),
        ],
    );
    assert_ne!(code, 0, "{out}");
    let line = err
        .lines()
        .find(|l| l.contains("error"))
        .unwrap_or_default();
    assert!(
        line.contains("install Node.js with npm") && line.contains("KEYWARDEN_NODE_MODULES"),
        "{err}"
    );
    assert!(!out.contains("Usage"), "no npm usage text: {out}");
}
