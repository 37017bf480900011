//! The ABIs extracted into `contracts-abi/` drive the real Safe 1.4.1 and OpenZeppelin
//! TimelockController bytecode from the npm packages, and `dev deploy` works end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::ExitCode;

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, Bytes, U256};
use alloy::providers::ext::AnvilApi;
use alloy::providers::{Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::sol_types::SolValue;
use clap::Parser;
use keywarden::chain::contracts::{SafeL2, TimelockController};
use keywarden::sim::cli::{DeployArgs, run_deploy};
use support::anvil::Anvil;

const SAFE_L2: Address = keywarden::sim::governance::SAFE_L2_141;

fn npm_artifact(path: &str, field: &str) -> Bytes {
    keywarden::sim::governance::npm_artifact(path, field)
        .unwrap_or_else(|e| panic!("{e}; run the suite with scripts/test, which installs it"))
}

fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[tokio::test]
async fn safe_and_timelock_bindings_drive_npm_bytecode() {
    install_crypto_provider();
    let anvil = Anvil::spawn();
    let provider = ProviderBuilder::new().connect_http(anvil.url());
    let accounts = provider.get_accounts().await.unwrap();

    // SafeL2 runtime code at its canonical address.
    let code = npm_artifact(
        "@safe-global/safe-contracts/build/artifacts/contracts/SafeL2.sol/SafeL2.json",
        "deployedBytecode",
    );
    provider.anvil_set_code(SAFE_L2, code).await.unwrap();
    let safe = SafeL2::new(SAFE_L2, &provider);
    assert_eq!(safe.VERSION().call().await.unwrap(), "1.4.1");
    // Code only: no constructor ran, so the storage is empty.
    assert_eq!(safe.getThreshold().call().await.unwrap(), U256::ZERO);
    assert_eq!(safe.nonce().call().await.unwrap(), U256::ZERO);

    // TimelockController deployed from its creation code.
    let mut code = npm_artifact(
        "@openzeppelin/contracts/build/contracts/TimelockController.json",
        "bytecode",
    )
    .to_vec();
    let proposers = vec![accounts[0]];
    let executors = vec![Address::ZERO];
    code.extend_from_slice(
        &(U256::from(3600), proposers, executors, Address::ZERO).abi_encode_params(),
    );
    let tx = TransactionRequest::default()
        .with_from(accounts[0])
        .with_deploy_code(code);
    let receipt = provider
        .send_transaction(tx)
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(receipt.status());
    let timelock = TimelockController::new(receipt.contract_address.unwrap(), &provider);
    assert_eq!(
        timelock.getMinDelay().call().await.unwrap(),
        U256::from(3600)
    );
    let proposer_role = timelock.PROPOSER_ROLE().call().await.unwrap();
    assert!(
        timelock
            .hasRole(proposer_role, accounts[0])
            .call()
            .await
            .unwrap()
    );
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    deploy: DeployArgs,
}

#[tokio::test]
async fn dev_deploy_command_succeeds_and_fails_cleanly() {
    let anvil = Anvil::spawn();
    let url = anvil.url().to_string();
    let args = Cli::try_parse_from(["deploy", "--rpc", &url, "--json"])
        .unwrap()
        .deploy;
    assert!(args.json);
    assert_eq!(run_deploy(args).await, ExitCode::SUCCESS);

    let args = Cli::try_parse_from(["deploy", "--rpc", &url])
        .unwrap()
        .deploy;
    assert!(!args.json);
    assert_eq!(run_deploy(args).await, ExitCode::SUCCESS);

    // Nothing listens on the node's port once it is gone.
    drop(anvil);
    let args = Cli::try_parse_from(["deploy", "--rpc", &url])
        .unwrap()
        .deploy;
    assert_eq!(run_deploy(args).await, ExitCode::FAILURE);

    assert!(Cli::try_parse_from(["deploy", "--rpc", "not a url"]).is_err());
    assert!(Cli::try_parse_from(["deploy"]).is_err());
}

#[tokio::test]
async fn deploy_fails_instead_of_hanging_when_nothing_is_mined() {
    let anvil = Anvil::spawn_with(&["--no-mining"]);
    let started = std::time::Instant::now();
    let err = keywarden::sim::deploy::deploy_with_timeout(
        &anvil.url(),
        std::time::Duration::from_secs(1),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, keywarden::chain::ChainError::PendingTransaction(_)),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}
