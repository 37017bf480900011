//! A real Safe (1.4.1 or 1.3.0) and a real OpenZeppelin TimelockController on a development node,
//! from the pinned npm artifacts (`npm ci` puts them under `node_modules/`), and Safe transactions
//! executed with on-chain approvals. Used by the demo and the tests.
//!
//! Transactions are sent with `eth_sendTransaction` from the node's unlocked accounts, so no key
//! is handled here. The SafeL2 1.4.1 singleton is placed at its canonical address with
//! `anvil_setCode`, which reproduces mainnet code at the mainnet address; the GnosisSafeL2 1.3.0
//! singleton is deployed from its creation code (keywarden recognises a Safe by what it answers,
//! not by where its singleton is).

use std::path::Path;
use std::time::Duration;

use alloy::primitives::{Address, B256, Bytes, U256, address};
use alloy::providers::Provider;
use alloy::rpc::types::TransactionReceipt;
use alloy::sol_types::SolValue;

use super::deploy::{RECEIPT_TIMEOUT, confirmed, create};
use crate::chain::ChainError;
use crate::chain::contracts::SafeL2;

/// The canonical address of the SafeL2 1.4.1 singleton.
pub const SAFE_L2_141: Address = address!("29fcB43b46531BcA003ddC8FCB67FFE91900C762");

/// A Safe release whose L2 singleton and proxy come from npm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SafeRelease {
    /// `@safe-global/safe-contracts` 1.4.1: SafeL2 and SafeProxy.
    V1_4_1,
    /// `@gnosis.pm/safe-contracts` 1.3.0: GnosisSafeL2 and GnosisSafeProxy (the older event
    /// layout, with fewer indexed fields).
    V1_3_0,
}

impl SafeRelease {
    fn singleton_artifact(self) -> &'static str {
        match self {
            Self::V1_4_1 => {
                "@safe-global/safe-contracts/build/artifacts/contracts/SafeL2.sol/SafeL2.json"
            }
            Self::V1_3_0 => {
                "@gnosis.pm/safe-contracts/build/artifacts/contracts/GnosisSafeL2.sol/GnosisSafeL2.json"
            }
        }
    }

    fn proxy_artifact(self) -> &'static str {
        match self {
            Self::V1_4_1 => {
                "@safe-global/safe-contracts/build/artifacts/contracts/proxies/SafeProxy.sol/SafeProxy.json"
            }
            Self::V1_3_0 => {
                "@gnosis.pm/safe-contracts/build/artifacts/contracts/proxies/GnosisSafeProxy.sol/GnosisSafeProxy.json"
            }
        }
    }
}
const FALLBACK_HANDLER_ARTIFACT: &str = "@safe-global/safe-contracts/build/artifacts/contracts/handler/CompatibilityFallbackHandler.sol/CompatibilityFallbackHandler.json";
const TIMELOCK_ARTIFACT: &str = "@openzeppelin/contracts/build/contracts/TimelockController.json";

/// `field` (`bytecode` or `deployedBytecode`) of the npm artifact at `{node_modules}/{path}`,
/// in the toolchain's directory ([`super::toolchain::node_modules`]).
pub fn npm_artifact(path: &str, field: &str) -> Result<Bytes, ChainError> {
    let full = super::toolchain::node_modules()
        .unwrap_or_else(|| Path::new("node_modules").to_path_buf())
        .join(path);
    let bad = |detail: String| ChainError::Artifact {
        contract: "npm artifact",
        detail: format!("{}: {detail}", full.display()),
    };
    let text = std::fs::read_to_string(&full).map_err(|e| {
        bad(format!(
            "{e} (run `npm ci` in the repository, or `keywarden demo`, which installs the pinned packages into its cache)"
        ))
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    json[field]
        .as_str()
        .ok_or_else(|| bad(format!("no {field}")))?
        .parse()
        .map_err(|e| bad(format!("{field}: {e}")))
}

/// The Safe 1.4.1 CompatibilityFallbackHandler (which answers EIP-1271 for a Safe that owns
/// another), created by `from`.
pub async fn deploy_fallback_handler<P: Provider>(
    provider: &P,
    from: Address,
) -> Result<Address, ChainError> {
    let code = npm_artifact(FALLBACK_HANDLER_ARTIFACT, "bytecode")?;
    Ok(create(
        provider,
        RECEIPT_TIMEOUT,
        from,
        "CompatibilityFallbackHandler",
        code,
    )
    .await?
    .0)
}

/// A Safe of `release` (its L2 singleton behind a proxy) owned by `owners` with `threshold` and
/// `fallback_handler` (zero: none), created and set up by `from`.
pub async fn deploy_safe<P: Provider>(
    provider: &P,
    from: Address,
    release: SafeRelease,
    owners: &[Address],
    threshold: u64,
    fallback_handler: Address,
) -> Result<Address, ChainError> {
    let artifact = release.singleton_artifact();
    let singleton = match release {
        SafeRelease::V1_4_1 => {
            let code = npm_artifact(artifact, "deployedBytecode")?;
            provider
                .raw_request::<_, ()>("anvil_setCode".into(), (SAFE_L2_141, code))
                .await?;
            SAFE_L2_141
        }
        SafeRelease::V1_3_0 => {
            let code = npm_artifact(artifact, "bytecode")?;
            create(
                provider,
                RECEIPT_TIMEOUT,
                from,
                "GnosisSafeL2 singleton",
                code,
            )
            .await?
            .0
        }
    };
    let mut code = npm_artifact(release.proxy_artifact(), "bytecode")?.to_vec();
    code.extend_from_slice(&singleton.abi_encode());
    let (safe, _) = create(provider, RECEIPT_TIMEOUT, from, "SafeProxy", code.into()).await?;
    let pending = SafeL2::new(safe, provider)
        .setup(
            owners.to_vec(),
            U256::from(threshold),
            Address::ZERO,
            Bytes::new(),
            fallback_handler,
            Address::ZERO,
            U256::ZERO,
            Address::ZERO,
        )
        .from(from)
        .send()
        .await?;
    confirmed("Safe setup", pending, RECEIPT_TIMEOUT).await?;
    Ok(safe)
}

/// An OpenZeppelin TimelockController with `min_delay`, `proposers` (who are also its
/// cancellers), execution open to anyone and no admin, created by `from`.
pub async fn deploy_timelock<P: Provider>(
    provider: &P,
    from: Address,
    min_delay: Duration,
    proposers: &[Address],
) -> Result<Address, ChainError> {
    let mut code = npm_artifact(TIMELOCK_ARTIFACT, "bytecode")?.to_vec();
    code.extend_from_slice(
        &(
            U256::from(min_delay.as_secs()),
            proposers.to_vec(),
            vec![Address::ZERO],
            Address::ZERO,
        )
            .abi_encode_params(),
    );
    Ok(create(
        provider,
        RECEIPT_TIMEOUT,
        from,
        "TimelockController",
        code.into(),
    )
    .await?
    .0)
}

/// The Safe's nonce.
pub async fn safe_nonce<P: Provider>(provider: &P, safe: Address) -> Result<u64, ChainError> {
    Ok(SafeL2::new(safe, provider)
        .nonce()
        .call()
        .await?
        .saturating_to::<u64>())
}

/// The safeTxHash of a plain call of `data` on `to` at `nonce`, as the Safe computes it.
pub async fn safe_tx_hash<P: Provider>(
    provider: &P,
    safe: Address,
    to: Address,
    data: &[u8],
    nonce: u64,
) -> Result<B256, ChainError> {
    Ok(SafeL2::new(safe, provider)
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
        .await?)
}

/// Executes a plain call of `data` on `to` from `safe` with `signatures`, sent by `from`.
pub async fn exec_with<P: Provider>(
    provider: &P,
    safe: Address,
    to: Address,
    data: Vec<u8>,
    signatures: Bytes,
    from: Address,
) -> Result<TransactionReceipt, ChainError> {
    let pending = SafeL2::new(safe, provider)
        .execTransaction(
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
        )
        .from(from)
        .send()
        .await?;
    confirmed("Safe execTransaction", pending, RECEIPT_TIMEOUT).await
}

/// Approved-hash signatures (v = 1) of `signers`, sorted by owner address as the Safe requires.
pub fn approved_hash_signatures(signers: &[Address]) -> Bytes {
    let mut sorted = signers.to_vec();
    sorted.sort();
    let mut signatures = Vec::with_capacity(65 * sorted.len());
    for a in sorted {
        signatures.extend_from_slice(a.into_word().as_slice());
        signatures.extend_from_slice(&[0; 32]);
        signatures.push(1);
    }
    signatures.into()
}

/// Executes `data` on `to` from `safe`, approved by the owners `executor` and `approvers`: the
/// approvers approve its hash on-chain first, then `executor` executes.
pub async fn exec_approved<P: Provider>(
    provider: &P,
    safe: Address,
    executor: Address,
    approvers: &[Address],
    to: Address,
    data: Vec<u8>,
) -> Result<TransactionReceipt, ChainError> {
    let nonce = safe_nonce(provider, safe).await?;
    let hash = safe_tx_hash(provider, safe, to, &data, nonce).await?;
    for a in approvers {
        let pending = SafeL2::new(safe, provider)
            .approveHash(hash)
            .from(*a)
            .send()
            .await?;
        confirmed("Safe approveHash", pending, RECEIPT_TIMEOUT).await?;
    }
    let mut signers = approvers.to_vec();
    signers.push(executor);
    let signatures = approved_hash_signatures(&signers);
    exec_with(provider, safe, to, data, signatures, executor).await
}
