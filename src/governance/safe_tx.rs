//! Safe transactions and their hashes, as each Safe version computes them: the EIP-712 domain
//! hash and the message (struct) hash a hardware wallet shows, and the safeTxHash that owners sign.
//!
//! Flow: a [`SafeTx`] (from the Transaction Service, an event, or a signer's command line) and the
//! Safe's [`SafeVersion`] (read from `VERSION()` or the service, never assumed) → [`hashes`]. Pure.

use alloy::primitives::{Address, B256, Bytes, U256, keccak256};
use serde::Serialize;

/// `keccak256("EIP712Domain(uint256 chainId,address verifyingContract)")`, Safe 1.3.0 and later.
pub const DOMAIN_TYPEHASH: B256 =
    alloy::primitives::b256!("47e79534a245952e8b16893a336b85a3d9ea9fa8c573f3d803afb92a79469218");

/// `keccak256("EIP712Domain(address verifyingContract)")`, Safe up to 1.2.0.
pub const LEGACY_DOMAIN_TYPEHASH: B256 =
    alloy::primitives::b256!("035aff83d86937d35b32e04f0ddc6ff469290eef2f1b692d8a815c89404d4749");

/// `keccak256("SafeTx(address to,uint256 value,bytes data,uint8 operation,uint256 safeTxGas,uint256 baseGas,uint256 gasPrice,address gasToken,address refundReceiver,uint256 nonce)")`.
pub const SAFE_TX_TYPEHASH: B256 =
    alloy::primitives::b256!("bb8310d486368db6bd6f849402fdd73ad53d316b5a4b2644ad6efe0f941286d8");

/// The SafeTx typehash before 1.0.0, which names `dataGas` instead of `baseGas`.
pub const DATA_GAS_TYPEHASH: B256 =
    alloy::primitives::b256!("14d461bc7412367e924637b363c7bf29b8f47e2f84869f4426e5633d8af47b20");

/// How a Safe (or a MultiSend item) makes its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// `CALL` (0).
    Call,
    /// `DELEGATECALL` (1): the target's code runs with the Safe's storage.
    DelegateCall,
}

impl Operation {
    /// The encoded value.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Call => 0,
            Self::DelegateCall => 1,
        }
    }
}

impl TryFrom<u8> for Operation {
    type Error = SafeTxError;

    fn try_from(v: u8) -> Result<Self, Self::Error> {
        match v {
            0 => Ok(Self::Call),
            1 => Ok(Self::DelegateCall),
            other => Err(SafeTxError::Operation(other)),
        }
    }
}

/// A Safe version as `VERSION()` reports it (`1.4.1`, `1.3.0`; a `+L2` suffix is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct SafeVersion {
    /// Major.
    pub major: u16,
    /// Minor.
    pub minor: u16,
    /// Patch.
    pub patch: u16,
}

impl std::str::FromStr for SafeVersion {
    type Err = SafeTxError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let core = s.split('+').next().unwrap_or_default();
        let parts: Vec<&str> = core.split('.').collect();
        let num = |p: &str| p.parse::<u16>().ok();
        match parts.as_slice() {
            [a, b, c] => match (num(a), num(b), num(c)) {
                (Some(major), Some(minor), Some(patch)) => Ok(Self {
                    major,
                    minor,
                    patch,
                }),
                _ => Err(SafeTxError::Version(s.to_owned())),
            },
            _ => Err(SafeTxError::Version(s.to_owned())),
        }
    }
}

impl std::fmt::Display for SafeVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl SafeVersion {
    const fn new(major: u16, minor: u16, patch: u16) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }
}

/// One Safe transaction, as its owners sign it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SafeTx {
    /// Target.
    pub to: Address,
    /// Wei sent.
    pub value: U256,
    /// Calldata.
    pub data: Bytes,
    /// Call or delegatecall.
    pub operation: Operation,
    /// Gas for the inner call.
    pub safe_tx_gas: U256,
    /// Gas paid besides the inner call (`dataGas` before 1.0.0).
    pub base_gas: U256,
    /// Refund price per gas (0: no refund).
    pub gas_price: U256,
    /// Refund token (0: ether).
    pub gas_token: Address,
    /// Refund receiver (0: the executor).
    pub refund_receiver: Address,
    /// Safe nonce.
    pub nonce: U256,
}

impl SafeTx {
    /// A plain call of `data` on `to` at `nonce`: no value, no gas refund.
    pub fn call(to: Address, data: Bytes, nonce: u64) -> Self {
        Self {
            to,
            value: U256::ZERO,
            data,
            operation: Operation::Call,
            safe_tx_gas: U256::ZERO,
            base_gas: U256::ZERO,
            gas_price: U256::ZERO,
            gas_token: Address::ZERO,
            refund_receiver: Address::ZERO,
            nonce: U256::from(nonce),
        }
    }
}

/// What a signer compares with the hardware wallet's screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TxHashes {
    /// EIP-712 domain separator.
    pub domain_hash: B256,
    /// EIP-712 struct hash of the SafeTx ("message hash").
    pub message_hash: B256,
    /// `keccak256(0x19 ‖ 0x01 ‖ domain ‖ message)`: what owners sign.
    pub safe_tx_hash: B256,
}

/// Bad transaction fields.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SafeTxError {
    /// Not 0 (call) or 1 (delegatecall).
    #[error("operation must be 0 (call) or 1 (delegatecall), not {0}")]
    Operation(u8),
    /// Not `MAJOR.MINOR.PATCH`.
    #[error("Safe version {0:?} is not MAJOR.MINOR.PATCH (as VERSION() returns it, e.g. 1.4.1)")]
    Version(String),
}

fn word_address(a: Address) -> [u8; 32] {
    B256::left_padding_from(a.as_slice()).0
}

/// The domain, message and safeTxHash of `tx` for the Safe at `safe` on `chain_id`, as `version`
/// computes them.
pub fn hashes(chain_id: u64, safe: Address, version: SafeVersion, tx: &SafeTx) -> TxHashes {
    let mut domain = Vec::with_capacity(96);
    if version >= SafeVersion::new(1, 3, 0) {
        domain.extend_from_slice(DOMAIN_TYPEHASH.as_slice());
        domain.extend_from_slice(&U256::from(chain_id).to_be_bytes::<32>());
    } else {
        domain.extend_from_slice(LEGACY_DOMAIN_TYPEHASH.as_slice());
    }
    domain.extend_from_slice(&word_address(safe));
    let domain_hash = keccak256(&domain);

    let typehash = if version < SafeVersion::new(1, 0, 0) {
        DATA_GAS_TYPEHASH
    } else {
        SAFE_TX_TYPEHASH
    };
    let mut message = Vec::with_capacity(11 * 32);
    message.extend_from_slice(typehash.as_slice());
    message.extend_from_slice(&word_address(tx.to));
    message.extend_from_slice(&tx.value.to_be_bytes::<32>());
    message.extend_from_slice(keccak256(&tx.data).as_slice());
    message.extend_from_slice(&U256::from(tx.operation.as_u8()).to_be_bytes::<32>());
    message.extend_from_slice(&tx.safe_tx_gas.to_be_bytes::<32>());
    message.extend_from_slice(&tx.base_gas.to_be_bytes::<32>());
    message.extend_from_slice(&tx.gas_price.to_be_bytes::<32>());
    message.extend_from_slice(&word_address(tx.gas_token));
    message.extend_from_slice(&word_address(tx.refund_receiver));
    message.extend_from_slice(&tx.nonce.to_be_bytes::<32>());
    let message_hash = keccak256(&message);

    TxHashes {
        domain_hash,
        message_hash,
        safe_tx_hash: keccak256(preimage(domain_hash, message_hash)),
    }
}

/// `0x19 ‖ 0x01 ‖ domain ‖ message`: what the safeTxHash hashes, and what a Safe hands a contract
/// owner's `isValidSignature(bytes, bytes)` (EIP-1271, as Safe 1.3.0 / 1.4.1 call it).
pub fn preimage(domain_hash: B256, message_hash: B256) -> Vec<u8> {
    let mut outer = Vec::with_capacity(66);
    outer.extend_from_slice(&[0x19, 0x01]);
    outer.extend_from_slice(domain_hash.as_slice());
    outer.extend_from_slice(message_hash.as_slice());
    outer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typehashes_are_the_keccak_of_their_type_strings() {
        assert_eq!(
            keccak256("EIP712Domain(uint256 chainId,address verifyingContract)"),
            DOMAIN_TYPEHASH
        );
        assert_eq!(
            keccak256("EIP712Domain(address verifyingContract)"),
            LEGACY_DOMAIN_TYPEHASH
        );
        assert_eq!(
            keccak256(
                "SafeTx(address to,uint256 value,bytes data,uint8 operation,uint256 safeTxGas,uint256 baseGas,uint256 gasPrice,address gasToken,address refundReceiver,uint256 nonce)"
            ),
            SAFE_TX_TYPEHASH
        );
        assert_eq!(
            keccak256(
                "SafeTx(address to,uint256 value,bytes data,uint8 operation,uint256 safeTxGas,uint256 dataGas,uint256 gasPrice,address gasToken,address refundReceiver,uint256 nonce)"
            ),
            DATA_GAS_TYPEHASH
        );
    }

    #[test]
    fn versions_parse_and_order_and_bad_ones_are_named() {
        let v: SafeVersion = "1.4.1".parse().unwrap();
        assert_eq!(v, SafeVersion::new(1, 4, 1));
        assert_eq!(
            "1.3.0+L2".parse::<SafeVersion>().unwrap(),
            SafeVersion::new(1, 3, 0)
        );
        assert!(SafeVersion::new(1, 2, 0) < SafeVersion::new(1, 3, 0));
        assert_eq!(
            "1.4".parse::<SafeVersion>(),
            Err(SafeTxError::Version("1.4".into()))
        );
        assert!("one.two.three".parse::<SafeVersion>().is_err());
        assert_eq!(Operation::try_from(2), Err(SafeTxError::Operation(2)));
    }

    fn tx() -> SafeTx {
        SafeTx {
            value: U256::from(5),
            ..SafeTx::call(
                Address::repeat_byte(0x11),
                Bytes::from_static(&[1, 2, 3]),
                7,
            )
        }
    }

    #[test]
    fn the_domain_drops_the_chain_id_before_1_3_and_the_message_typehash_changes_before_1_0() {
        let safe = Address::repeat_byte(0x22);
        let new = hashes(1, safe, SafeVersion::new(1, 4, 1), &tx());
        let same = hashes(1, safe, SafeVersion::new(1, 3, 0), &tx());
        assert_eq!(new, same);
        // The chain id is part of the 1.3+ domain only.
        assert_ne!(
            new.domain_hash,
            hashes(5, safe, SafeVersion::new(1, 4, 1), &tx()).domain_hash
        );
        let legacy = hashes(1, safe, SafeVersion::new(1, 2, 0), &tx());
        assert_eq!(legacy, hashes(5, safe, SafeVersion::new(1, 2, 0), &tx()));
        assert_eq!(legacy.message_hash, new.message_hash);
        let ancient = hashes(1, safe, SafeVersion::new(0, 1, 0), &tx());
        assert_ne!(ancient.message_hash, legacy.message_hash);
        // Every field is covered.
        let mut other = tx();
        other.nonce = U256::from(8);
        assert_ne!(
            hashes(1, safe, SafeVersion::new(1, 4, 1), &other).safe_tx_hash,
            new.safe_tx_hash
        );
        let mut other = tx();
        other.operation = Operation::DelegateCall;
        assert_ne!(
            hashes(1, safe, SafeVersion::new(1, 4, 1), &other).safe_tx_hash,
            new.safe_tx_hash
        );
    }
}
