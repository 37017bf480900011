//! Our contracts on a node, with the simulated guest allowed: the simulated OS image on
//! DstackKms, a compose hash on the deployed app, any device. Shared by the KMS-on-chain tests and
//! the KMS benchmark.

// Shared by several test crates, each using a part of it.
#![allow(dead_code)]

use alloy::primitives::{Address, B256, Bytes, FixedBytes, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::sol_types::SolCall as _;
use keywarden::chain::contracts::{DstackApp, DstackKms, TimelockController};
use keywarden::sim::client;
use keywarden::sim::deploy::Deployment;
use sha2::{Digest as _, Sha256};

/// Sends a contract call and requires it to succeed; its receipt.
#[macro_export]
macro_rules! send {
    ($call:expr) => {{
        let receipt = $call.send().await.unwrap().get_receipt().await.unwrap();
        assert!(receipt.status());
        receipt
    }};
}

/// The deployment, a provider for the node and the owner account.
pub struct GuestChain {
    /// Where our contracts are.
    pub deployment: Deployment,
    /// Connected to the node.
    pub provider: DynProvider,
    /// The node's first account, owner of the contracts.
    pub owner: Address,
}

/// Deploys our contracts at `url` and allows the simulated guest running `compose`.
pub async fn allow_simulated_guest(url: &url::Url, compose: &[u8]) -> GuestChain {
    let deployment = keywarden::sim::deploy::deploy(url).await.unwrap();
    let provider = ProviderBuilder::new().connect_http(url.clone()).erased();
    let owner = provider.get_accounts().await.unwrap()[0];
    let kms = DstackKms::new(deployment.kms, &provider);
    let app = DstackApp::new(deployment.app, &provider);
    send!(
        kms.addOsImageHash(FixedBytes(client::SIMULATED_OS_IMAGE_HASH))
            .from(owner)
    );
    send!(
        app.addComposeHash(FixedBytes(Sha256::digest(compose).into()))
            .from(owner)
    );
    send!(app.setAllowAnyDevice(true).from(owner));
    GuestChain {
        deployment,
        provider,
        owner,
    }
}

/// Schedules `target.call(data)` on `timelock` with `delay` seconds (`proposer` proposes) and,
/// with `execute`, executes it at once (a zero delay). Its operation id.
pub async fn through_timelock(
    provider: &DynProvider,
    (timelock, proposer): (Address, Address),
    target: Address,
    data: Vec<u8>,
    (salt, delay, execute): (u8, u64, bool),
) -> B256 {
    let tl = TimelockController::new(timelock, provider);
    let (data, salt) = (Bytes::from(data), B256::repeat_byte(salt));
    send!(
        tl.schedule(
            target,
            U256::ZERO,
            data.clone(),
            B256::ZERO,
            salt,
            U256::from(delay),
        )
        .from(proposer)
    );
    if execute {
        send!(
            tl.execute(target, U256::ZERO, data.clone(), B256::ZERO, salt)
                .from(proposer)
        );
    }
    tl.hashOperation(target, U256::ZERO, data, B256::ZERO, salt)
        .call()
        .await
        .unwrap()
}

impl GuestChain {
    /// The `keywarden serve` arguments that follow this deployment through `rpc`.
    pub fn serve_args(&self, rpc: &url::Url) -> Vec<String> {
        vec![
            "--rpc-url".to_owned(),
            rpc.to_string(),
            "--kms-contract".to_owned(),
            self.deployment.kms.to_string(),
            "--start-block".to_owned(),
            self.deployment.block.to_string(),
        ]
    }

    /// Hands the app to a TimelockController (delay 0) that the owner account proposes to and
    /// executes on, as a governed deployment has it; `(timelock, proposer)` for `through_timelock`.
    pub async fn govern_app_by_timelock(&self) -> (Address, Address) {
        let (provider, owner, app) = (&self.provider, self.owner, self.deployment.app);
        let timelock = keywarden::sim::governance::deploy_timelock(
            provider,
            owner,
            std::time::Duration::ZERO,
            &[owner],
        )
        .await
        .unwrap();
        send!(
            DstackApp::new(app, provider)
                .transferOwnership(timelock)
                .from(owner)
        );
        let accept = DstackApp::acceptOwnershipCall {}.abi_encode();
        through_timelock(provider, (timelock, owner), app, accept, (1, 0, true)).await;
        (timelock, owner)
    }
}
