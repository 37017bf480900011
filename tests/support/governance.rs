//! A real Safe 1.4.1 (SafeL2 behind a SafeProxy, from npm) and a real OpenZeppelin
//! TimelockController on anvil, and a Safe transaction executed with on-chain approvals.

// Shared by several test crates, each using a part of it.
#![allow(dead_code)]

use std::path::PathBuf;

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, B256, Bytes, U256, address};
use alloy::providers::ext::AnvilApi;
use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::TransactionRequest;
use alloy::sol_types::SolValue;
use keywarden::chain::contracts::SafeL2;

use super::chain_engine::{Chain, WAIT};

pub const SAFE_L2: Address = address!("29fcB43b46531BcA003ddC8FCB67FFE91900C762");
pub const DELAY: u64 = 60;

pub fn npm(path: &str, field: &str) -> Bytes {
    let full = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("node_modules")
        .join(path);
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; run the suite with scripts/test, which installs it (npm ci)",
            full.display()
        )
    });
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json[field].as_str().unwrap().parse().unwrap()
}

pub async fn deploy_code(p: &DynProvider, from: Address, code: Vec<u8>) -> Address {
    let tx = TransactionRequest::default()
        .with_from(from)
        .with_deploy_code(code);
    let r = tokio::time::timeout(WAIT, p.send_transaction(tx).await.unwrap().get_receipt())
        .await
        .unwrap()
        .unwrap();
    assert!(r.status());
    r.contract_address.unwrap()
}

/// A Safe 1.4.1 (SafeL2 behind a SafeProxy) owned by `owners` with `threshold`.
pub async fn safe(c: &Chain, owners: &[Address], threshold: u64) -> Address {
    c.provider
        .anvil_set_code(
            SAFE_L2,
            npm(
                "@safe-global/safe-contracts/build/artifacts/contracts/SafeL2.sol/SafeL2.json",
                "deployedBytecode",
            ),
        )
        .await
        .unwrap();
    let mut code = npm(
        "@safe-global/safe-contracts/build/artifacts/contracts/proxies/SafeProxy.sol/SafeProxy.json",
        "bytecode",
    )
    .to_vec();
    code.extend_from_slice(&SAFE_L2.abi_encode());
    let proxy = deploy_code(&c.provider, c.owner, code).await;
    send!(
        SafeL2::new(proxy, c.provider.clone()).setup(
            owners.to_vec(),
            U256::from(threshold),
            Address::ZERO,
            Bytes::new(),
            Address::ZERO,
            Address::ZERO,
            U256::ZERO,
            Address::ZERO,
        ),
        c.owner
    );
    proxy
}

/// An OpenZeppelin TimelockController with `proposer`, open execution and no admin.
pub async fn timelock(c: &Chain, proposer: Address) -> Address {
    let mut code = npm(
        "@openzeppelin/contracts/build/contracts/TimelockController.json",
        "bytecode",
    )
    .to_vec();
    code.extend_from_slice(
        &(
            U256::from(DELAY),
            vec![proposer],
            vec![Address::ZERO],
            Address::ZERO,
        )
            .abi_encode_params(),
    );
    deploy_code(&c.provider, c.owner, code).await
}

/// The Safe's nonce.
pub async fn safe_nonce(c: &Chain, safe: Address) -> u64 {
    SafeL2::new(safe, c.provider.clone())
        .nonce()
        .call()
        .await
        .unwrap()
        .to::<u64>()
}

/// The safeTxHash of a plain call of `data` on `to` at `nonce`, as the Safe computes it.
pub async fn safe_tx_hash(c: &Chain, safe: Address, to: Address, data: &[u8], nonce: u64) -> B256 {
    SafeL2::new(safe, c.provider.clone())
        .getTransactionHash(
            to,
            U256::ZERO,
            data.to_vec().into(),
            0,
            U256::ZERO,
            U256::ZERO,
            U256::ZERO,
            Address::ZERO,
            Address::ZERO,
            U256::from(nonce),
        )
        .call()
        .await
        .unwrap()
}

/// Executes a plain call of `data` on `to` from `safe` with `signatures`, sent by `from`.
pub async fn exec_with(
    c: &Chain,
    safe: Address,
    to: Address,
    data: Vec<u8>,
    signatures: Bytes,
    from: Address,
) {
    send!(
        SafeL2::new(safe, c.provider.clone()).execTransaction(
            to,
            U256::ZERO,
            data.into(),
            0,
            U256::ZERO,
            U256::ZERO,
            U256::ZERO,
            Address::ZERO,
            Address::ZERO,
            signatures,
        ),
        from
    );
}

/// Executes `data` on `to` from `safe` (owners `signers`, all approving: the first executes, the
/// others approve its hash on-chain first).
pub async fn exec(c: &Chain, safe: Address, signers: &[Address], to: Address, data: Vec<u8>) {
    let nonce = safe_nonce(c, safe).await;
    let hash = safe_tx_hash(c, safe, to, &data, nonce).await;
    for a in &signers[1..] {
        send!(SafeL2::new(safe, c.provider.clone()).approveHash(hash), *a);
    }
    let mut sorted = signers.to_vec();
    sorted.sort();
    let mut signatures = Vec::new();
    for a in sorted {
        signatures.extend_from_slice(a.into_word().as_slice());
        signatures.extend_from_slice(&[0; 32]);
        signatures.push(1);
    }
    exec_with(c, safe, to, data, signatures.into(), signers[0]).await;
}
