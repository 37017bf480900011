//! Our test-only contracts (`contracts/out/`): a custom IAppAuth app allowing instance ids, a
//! deny-all implementation, a DstackApp V2 with an extra check and a DstackKms V2. Deployed from
//! their compiled artifacts; the mirror does not know their code.

// Shared by several test crates, each using a part of it.
#![allow(dead_code, unused_imports)]

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, Bytes};
use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::TransactionRequest;
use alloy::sol_types::SolValue;

#[allow(missing_docs)]
mod bindings {
    alloy::sol! {
        #[sol(rpc)]
        interface AllowListAppAuth {
            function setInstance(address instanceId, bool allowed) external;
        }
        #[sol(rpc)]
        interface DstackAppV2 {
            function initializeV2() external;
            function forgetComposeHash(bytes32 composeHash) external;
        }
        #[sol(rpc)]
        interface DstackKmsV2 {
            function forgetOsImage(bytes32 osImageHash) external;
        }
    }
}
pub use bindings::{AllowListAppAuth, DstackAppV2, DstackKmsV2};

/// The reason DenyAllApp gives.
pub const DENY_ALL_REASON: &str = "denied by upgraded implementation";
/// The reason AllowListAppAuth gives for an instance that is not listed.
pub const NOT_LISTED_REASON: &str = "Instance not on the allow-list";
/// The extra reason of DstackAppV2.
pub const NO_INSTANCE_REASON: &str = "Instance ID required";

/// Creation bytecode of `contracts/out/<name>.json`.
pub fn bytecode(name: &str) -> Bytes {
    let path = format!("{}/contracts/out/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["bytecode"].as_str().unwrap().parse().unwrap()
}

/// Deploys `name` from `from` with ABI-encoded constructor `args`; returns its address.
pub async fn deploy(p: &DynProvider, from: Address, name: &str, args: Vec<u8>) -> Address {
    let mut code = bytecode(name).to_vec();
    code.extend(args);
    let tx = TransactionRequest::default()
        .with_from(from)
        .with_deploy_code(code);
    let receipt = p
        .send_transaction(tx)
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(receipt.status(), "deploying {name} reverted");
    receipt.contract_address.unwrap()
}

/// An AllowListAppAuth owned by `owner`, with `allowed` instance ids on its list.
pub async fn allow_list_app(p: &DynProvider, owner: Address, allowed: &[Address]) -> Address {
    let at = deploy(p, owner, "AllowListAppAuth", owner.abi_encode()).await;
    let c = AllowListAppAuth::new(at, p);
    for i in allowed {
        let r = c
            .setInstance(*i, true)
            .from(owner)
            .send()
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap();
        assert!(r.status());
    }
    at
}
