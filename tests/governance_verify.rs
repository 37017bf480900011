//! Safe transaction hashes agree with the real Safe 1.4.1 bytecode (from npm, on anvil), and
//! `keywarden governance verify --offline` prints what a signer compares with the hardware wallet
//! and exits 3 on a critical finding.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod support;

use std::path::PathBuf;

use alloy::primitives::{Address, B256, Bytes, U256, address};
use alloy::providers::ext::AnvilApi;
use alloy::providers::{Provider, ProviderBuilder};
use alloy::sol_types::SolCall;
use keywarden::chain::contracts::{DstackApp, SafeL2};
use keywarden::governance::safe_tx::{Operation, SafeTx, hashes};
use support::anvil::Anvil;

/// Canonical SafeL2 1.4.1 singleton address.
const SAFE_L2: Address = address!("29fcB43b46531BcA003ddC8FCB67FFE91900C762");

fn safe_l2_code() -> Bytes {
    let full = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(
        "node_modules/@safe-global/safe-contracts/build/artifacts/contracts/SafeL2.sol/SafeL2.json",
    );
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; run the suite with scripts/test, which installs it (npm ci)",
            full.display()
        )
    });
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["deployedBytecode"].as_str().unwrap().parse().unwrap()
}

/// A deterministic spread of transactions: every field varies.
fn transactions() -> Vec<SafeTx> {
    (0u64..24)
        .map(|i| SafeTx {
            to: Address::with_last_byte(i as u8 + 1),
            value: U256::from(i * 1_000_000_007),
            data: Bytes::from((0..(i * 7) as u8).collect::<Vec<u8>>()),
            operation: if i % 3 == 0 {
                Operation::DelegateCall
            } else {
                Operation::Call
            },
            safe_tx_gas: U256::from(i * 3),
            base_gas: U256::from(i * 5),
            gas_price: U256::from(i % 2),
            gas_token: Address::with_last_byte((i % 4) as u8),
            refund_receiver: Address::with_last_byte((i % 5) as u8),
            nonce: U256::from(i) << (i as usize * 8),
        })
        .collect()
}

#[tokio::test]
async fn safe_tx_hashes_match_the_real_safe_1_4_1() {
    keywarden::tls::ensure_crypto_provider();
    let anvil = Anvil::spawn();
    let provider = ProviderBuilder::new().connect_http(anvil.url());
    provider
        .anvil_set_code(SAFE_L2, safe_l2_code())
        .await
        .unwrap();
    let chain_id = provider.get_chain_id().await.unwrap();
    let safe = SafeL2::new(SAFE_L2, &provider);
    let version = safe.VERSION().call().await.unwrap().parse().unwrap();
    let domain = safe.domainSeparator().call().await.unwrap();
    for tx in transactions() {
        let ours = hashes(chain_id, SAFE_L2, version, &tx);
        let theirs = safe
            .getTransactionHash(
                tx.to,
                tx.value,
                tx.data.clone(),
                tx.operation.as_u8(),
                tx.safe_tx_gas,
                tx.base_gas,
                tx.gas_price,
                tx.gas_token,
                tx.refund_receiver,
                tx.nonce,
            )
            .call()
            .await
            .unwrap();
        assert_eq!(ours.domain_hash, domain);
        assert_eq!(ours.safe_tx_hash, theirs, "{tx:?}");
    }
}

const SAFE: &str = "0x5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
const APP: &str = "0x0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b";

fn verify(extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "governance",
        "verify",
        "--offline",
        "--chain-id",
        "1",
        "--safe",
        SAFE,
    ];
    for (flag, default) in [("--safe-version", "1.4.1"), ("--nonce", "7")] {
        if !extra.contains(&flag) {
            args.extend_from_slice(&[flag, default]);
        }
    }
    args.extend_from_slice(extra);
    common::run_to_end(&args, &[])
}

fn remove_compose() -> String {
    let data = DstackApp::removeComposeHashCall {
        composeHash: B256::repeat_byte(0x29),
    }
    .abi_encode();
    format!("0x{}", hex::encode(data))
}

#[test]
fn offline_verify_prints_the_hashes_and_the_decoded_removal() {
    let data = remove_compose();
    let (code, out, err) = verify(&["--to", APP, "--data", &data]);
    assert_eq!(code, 0, "{out}{err}");
    let tx = SafeTx::call(APP.parse().unwrap(), data.parse().unwrap(), 7);
    let h = hashes(1, SAFE.parse().unwrap(), "1.4.1".parse().unwrap(), &tx);
    for hash in [h.domain_hash, h.message_hash, h.safe_tx_hash] {
        assert!(out.contains(&hash.to_string()), "{out}");
    }
    assert!(
        out.contains(&format!("REMOVE compose hash {}", B256::repeat_byte(0x29))),
        "{out}"
    );
    assert!(out.contains("[warning] removal_usage_unknown"), "{out}");
    assert!(out.contains("simulation (offline"), "{out}");

    // The same as JSON, with the matching hash given: still no critical finding.
    let expected = h.safe_tx_hash.to_string();
    let (code, out, _) = verify(&[
        "--to",
        APP,
        "--data",
        &data,
        "--expected-safe-tx-hash",
        &expected,
        "--json",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["hashes"]["safeTxHash"], expected);
    assert_eq!(v["calls"]["Ok"]["action"]["function"], "removeComposeHash");
}

#[test]
fn offline_verify_exits_3_on_a_critical_finding() {
    let data = remove_compose();
    // A hash shown elsewhere that is not this transaction's.
    let (code, out, _) = verify(&[
        "--to",
        APP,
        "--data",
        &data,
        "--expected-safe-tx-hash",
        &B256::repeat_byte(1).to_string(),
    ]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("[critical] safe_tx_hash_mismatch"), "{out}");
    // A delegatecall to an unknown contract.
    let (code, out, _) = verify(&["--to", APP, "--data", &data, "--operation", "1"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("[critical] untrusted_delegatecall"), "{out}");
    // A gas refund to someone.
    let (code, out, _) = verify(&[
        "--to",
        APP,
        "--gas-price",
        "1",
        "--refund-receiver",
        "0x6666666666666666666666666666666666666666",
    ]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("[critical] gas_refund"), "{out}");
}

#[test]
fn offline_verify_recovers_signers_and_a_non_owner_signature_is_critical() {
    use alloy::signers::SignerSync;
    use alloy::signers::local::PrivateKeySigner;
    let data = remove_compose();
    let tx = SafeTx::call(APP.parse().unwrap(), data.parse().unwrap(), 7);
    let hash = hashes(1, SAFE.parse().unwrap(), "1.4.1".parse().unwrap(), &tx).safe_tx_hash;
    let owner = PrivateKeySigner::from_bytes(&B256::repeat_byte(7)).unwrap();
    let sig = owner.sign_hash_sync(&hash).unwrap();
    let blob = format!("0x{}", hex::encode(sig.as_bytes()));
    let me = owner.address().to_string();
    let (code, out, _) = verify(&[
        "--to",
        APP,
        "--data",
        &data,
        "--signatures",
        &blob,
        "--owner",
        &me,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("{me} (signature)")), "{out}");
    // The same signature presented for another nonce recovers to a stranger.
    let (code, out, _) = verify(&[
        "--to",
        APP,
        "--data",
        &data,
        "--signatures",
        &blob,
        "--owner",
        &me,
        "--nonce",
        "8",
    ]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("[critical] non_owner_signature"), "{out}");
    // Garbage is named.
    let (code, out, _) = verify(&["--to", APP, "--signatures", "0x0102"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("[critical] invalid_signature"), "{out}");
}

#[test]
fn offline_verify_names_unusable_input_and_exits_2() {
    let (code, _, err) = verify(&["--to", APP, "--safe-version", "1.4"]);
    assert_eq!(code, 2);
    assert!(err.contains("MAJOR.MINOR.PATCH"), "{err}");
    let (code, _, err) = verify(&["--to", APP, "--operation", "2"]);
    assert_eq!(code, 2);
    assert!(err.contains("--operation"), "{err}");
    let (code, _, err) = verify(&["--to", "0x12"]);
    assert_eq!(code, 2);
    assert!(err.contains("--to"), "{err}");
    // Without --offline (the only mode so far) the command says what it needs.
    let (code, _, err) = common::run_to_end(
        &[
            "governance",
            "verify",
            "--chain-id",
            "1",
            "--safe",
            SAFE,
            "--safe-version",
            "1.4.1",
            "--nonce",
            "1",
            "--to",
            APP,
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("--offline"), "{err}");
}
