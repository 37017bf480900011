//! Deploys keywarden's test contracts to a development node.
//!
//! Transactions are sent with `eth_sendTransaction` from the node's first unlocked account
//! (anvil's first dev account), so no key is handled here. Steps, each waited for:
//!
//! 1. DstackKms implementation;
//! 2. ERC-1967 proxy pointing at it, initialised with `initialize(owner, address(0))`;
//! 3. DstackApp implementation;
//! 4. `setAppImplementation(appImplementation)` on the KMS proxy;
//! 5. `deployAndRegisterApp(owner, false, false, false, 0, 0)` (6-argument overload): one app proxy
//!    owned by the same account, with no compose hash or device allowed yet.
//!
//! Each step waits at most [`RECEIPT_TIMEOUT`] for its receipt (a node that does not mine fails
//! instead of hanging).

use std::fmt;
use std::time::Duration;

use alloy::network::{Ethereum, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes};
use alloy::providers::{PendingTransactionBuilder, Provider, ProviderBuilder};
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use alloy::sol_types::{SolCall, SolValue};
use serde::{Deserialize, Serialize};

use crate::chain::ChainError;
use crate::chain::contracts::{Artifact, DstackKms};

/// How long each step of [`deploy`] waits for its transaction to be mined.
pub const RECEIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Addresses of a fresh test deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// DstackKms proxy (the address to configure and watch).
    pub kms: Address,
    /// DstackApp implementation set on the KMS (`appImplementation()`).
    pub app_implementation: Address,
    /// The registered app (a DstackApp proxy); its address is the app id.
    pub app: Address,
    /// Block in which the KMS proxy was created: the first block holding its events.
    pub block: u64,
}

impl fmt::Display for Deployment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "DstackKms (proxy)          {}", self.kms)?;
        writeln!(f, "DstackApp implementation   {}", self.app_implementation)?;
        writeln!(f, "registered app             {}", self.app)?;
        write!(f, "deployment block           {}", self.block)
    }
}

/// Deploys the test contracts through the node at `rpc_url`, from its first unlocked account,
/// which becomes the owner of the KMS and of the app.
pub async fn deploy(rpc_url: &url::Url) -> Result<Deployment, ChainError> {
    deploy_with_timeout(rpc_url, RECEIPT_TIMEOUT).await
}

/// As [`deploy`], waiting at most `receipt_timeout` for each transaction to be mined.
pub async fn deploy_with_timeout(
    rpc_url: &url::Url,
    receipt_timeout: Duration,
) -> Result<Deployment, ChainError> {
    crate::tls::ensure_crypto_provider();
    let (provider, owner) = node(rpc_url).await?;

    let kms_implementation = create(
        &provider,
        receipt_timeout,
        owner,
        "DstackKms implementation",
        Artifact::DstackKms.bytecode()?,
    )
    .await?
    .0;

    let init = DstackKms::initializeCall {
        initialOwner: owner,
        initialAppImplementation: Address::ZERO,
    }
    .abi_encode();
    let (kms, proxy_receipt) = create(
        &provider,
        receipt_timeout,
        owner,
        "DstackKms proxy",
        proxy_creation_code(kms_implementation, init.into())?,
    )
    .await?;
    let block = proxy_receipt
        .block_number
        .ok_or(ChainError::IncompleteReceipt {
            step: "DstackKms proxy",
            missing: "block number",
            tx: proxy_receipt.transaction_hash,
        })?;

    let app_implementation = create(
        &provider,
        receipt_timeout,
        owner,
        "DstackApp implementation",
        Artifact::DstackApp.bytecode()?,
    )
    .await?
    .0;

    let kms_contract = DstackKms::new(kms, &provider);
    let pending = kms_contract
        .setAppImplementation(app_implementation)
        .from(owner)
        .send()
        .await?;
    confirmed("setAppImplementation", pending, receipt_timeout).await?;

    let pending = kms_contract
        .deployAndRegisterApp_1(owner, false, false, false, B256::ZERO, B256::ZERO)
        .from(owner)
        .send()
        .await?;
    let receipt = confirmed("deployAndRegisterApp", pending, receipt_timeout).await?;
    let app = receipt
        .inner
        .logs()
        .iter()
        .filter(|log| log.address() == kms)
        .find_map(|log| log.log_decode::<DstackKms::AppDeployedViaFactory>().ok())
        .map(|log| log.inner.data.appId)
        .ok_or(ChainError::IncompleteReceipt {
            step: "deployAndRegisterApp",
            missing: "the AppDeployedViaFactory event",
            tx: receipt.transaction_hash,
        })?;

    Ok(Deployment {
        kms,
        app_implementation,
        app,
        block,
    })
}

/// The three measurements `isKmsAllowed` looks up for a KMS.
#[derive(Debug, Clone, Copy)]
pub struct KmsMeasurements {
    /// OS image hash.
    pub os_image: B256,
    /// Aggregated MR.
    pub mr_aggregated: B256,
    /// Device id.
    pub device: B256,
}

/// Allows the KMS measured `m` on `kms`, so that it passes `isKmsAllowed`: what a replica needs
/// before its peers hand it the root keys.
pub async fn allow_kms(
    rpc_url: &url::Url,
    kms: Address,
    m: KmsMeasurements,
) -> Result<(), ChainError> {
    let (provider, owner) = node(rpc_url).await?;
    let contract = DstackKms::new(kms, &provider);
    let pending = contract
        .addOsImageHash(m.os_image)
        .from(owner)
        .send()
        .await?;
    confirmed("addOsImageHash", pending, RECEIPT_TIMEOUT).await?;
    let pending = contract
        .addKmsAggregatedMr(m.mr_aggregated)
        .from(owner)
        .send()
        .await?;
    confirmed("addKmsAggregatedMr", pending, RECEIPT_TIMEOUT).await?;
    let pending = contract.addKmsDevice(m.device).from(owner).send().await?;
    confirmed("addKmsDevice", pending, RECEIPT_TIMEOUT).await?;
    Ok(())
}

/// A provider for the node at `rpc_url` and its first unlocked account, which sends (and owns).
async fn node(rpc_url: &url::Url) -> Result<(impl Provider + use<>, Address), ChainError> {
    let provider = ProviderBuilder::new().connect_http(rpc_url.clone());
    let owner = *provider
        .get_accounts()
        .await?
        .first()
        .ok_or_else(|| ChainError::NoAccounts(rpc_url.to_string()))?;
    Ok((provider, owner))
}

/// Creation code of our ERC-1967 proxy pointing at `implementation` and delegate-calling `init`.
pub fn proxy_creation_code(implementation: Address, init: Bytes) -> Result<Bytes, ChainError> {
    let mut code = Artifact::Erc1967Proxy.bytecode()?.to_vec();
    code.extend_from_slice(&(implementation, init).abi_encode_params());
    Ok(code.into())
}

/// Sends a contract creation from `from` and returns the new address with the receipt.
pub(super) async fn create<P: Provider>(
    provider: &P,
    receipt_timeout: Duration,
    from: Address,
    step: &'static str,
    code: Bytes,
) -> Result<(Address, TransactionReceipt), ChainError> {
    let tx = TransactionRequest::default()
        .with_from(from)
        .with_deploy_code(code);
    let receipt = confirmed(step, provider.send_transaction(tx).await?, receipt_timeout).await?;
    let address = receipt
        .contract_address
        .ok_or(ChainError::IncompleteReceipt {
            step,
            missing: "the created contract address",
            tx: receipt.transaction_hash,
        })?;
    Ok((address, receipt))
}

/// The receipt of the sent transaction `step`, waited for at most `timeout`; a revert is an error.
pub(super) async fn confirmed(
    step: &'static str,
    pending: PendingTransactionBuilder<Ethereum>,
    timeout: Duration,
) -> Result<TransactionReceipt, ChainError> {
    let receipt = pending.with_timeout(Some(timeout)).get_receipt().await?;
    if receipt.status() {
        Ok(receipt)
    } else {
        Err(ChainError::Reverted {
            step,
            tx: receipt.transaction_hash,
        })
    }
}
