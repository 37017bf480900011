//! Our contracts on a node, with the simulated guest allowed: the simulated OS image on
//! DstackKms, a compose hash on the deployed app, any device. Shared by the KMS-on-chain tests and
//! the KMS benchmark.

use alloy::primitives::{Address, FixedBytes};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use keywarden::chain::contracts::{DstackApp, DstackKms};
use keywarden::sim::client;
use keywarden::sim::deploy::Deployment;
use sha2::{Digest as _, Sha256};

/// Sends a contract call and requires it to succeed.
#[macro_export]
macro_rules! send {
    ($call:expr) => {{
        let receipt = $call.send().await.unwrap().get_receipt().await.unwrap();
        assert!(receipt.status());
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
