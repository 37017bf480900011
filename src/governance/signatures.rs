//! Safe signature blobs: split into per-owner items, and who each item says signed.
//!
//! Flow: the `signatures` of an executed transaction (from `SafeMultiSigTransaction` or the
//! `execTransaction` input), or one confirmation's signature from the Transaction Service →
//! [`split`] → per 65-byte item `r ‖ s ‖ v`: `v = 0` a contract signature (EIP-1271; `r` is the
//! owner, `s` the offset of its data), `v = 1` an approved hash (`r` is the owner), `v > 30`
//! eth_sign (ecrecover of the prefixed hash with `v − 4`), otherwise an EOA signature (ecrecover of
//! the safeTxHash). Pure: whether an approved hash or a contract signature holds, and whether the
//! signer is a current owner, is the chain's to say; the caller asks it.

use alloy::primitives::{Address, B256, Bytes, U256, keccak256};
use serde::Serialize;

/// How an owner signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SignatureKind {
    /// ECDSA over the safeTxHash.
    Eoa,
    /// ECDSA over `"\x19Ethereum Signed Message:\n32" ‖ safeTxHash`.
    EthSign,
    /// `approveHash` on-chain, or the executor itself.
    ApprovedHash,
    /// EIP-1271 `isValidSignature` of a contract owner.
    Contract,
}

/// One signer of a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignatureItem {
    /// The owner the item names (approved hash, contract) or recovers to (ECDSA).
    pub owner: Address,
    /// How.
    pub kind: SignatureKind,
    /// A contract signature's data, for `isValidSignature`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contract_data: Option<Bytes>,
}

/// A blob that is not a valid Safe signature list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No item at all.
    #[error("the signature list is empty")]
    Empty,
    /// The static part is not a whole number of 65-byte items.
    #[error("the signature list of {0} bytes is not a sequence of 65-byte items")]
    Truncated(usize),
    /// A contract signature's data lies outside the blob or inside the static part.
    #[error(
        "contract signature {index} points at offset {offset}, outside the list's dynamic part"
    )]
    ContractOffset {
        /// Item index.
        index: usize,
        /// The offset it names.
        offset: U256,
    },
    /// An ECDSA item does not recover.
    #[error("signature {index} does not recover to an address: {reason}")]
    Unrecoverable {
        /// Item index.
        index: usize,
        /// Why.
        reason: String,
    },
    /// Owners are not strictly ascending, which the Safe requires.
    #[error("signature {index} is out of order: the Safe requires owners in ascending order")]
    NotAscending {
        /// Item index.
        index: usize,
    },
}

/// `keccak256("\x19Ethereum Signed Message:\n32" ‖ hash)`.
fn eth_signed(hash: B256) -> B256 {
    let mut m = Vec::with_capacity(60);
    m.extend_from_slice(b"\x19Ethereum Signed Message:\n32");
    m.extend_from_slice(hash.as_slice());
    keccak256(&m)
}

fn ecrecover(prehash: B256, r: B256, s: B256, v: u8) -> Result<Address, String> {
    let parity = match v {
        27 => false,
        28 => true,
        other => return Err(format!("v = {other} is neither 27 nor 28")),
    };
    let sig = alloy::primitives::Signature::new(
        U256::from_be_bytes(r.0),
        U256::from_be_bytes(s.0),
        parity,
    );
    sig.recover_address_from_prehash(&prehash)
        .map_err(|e| e.to_string())
}

/// Splits `blob` into its items and names each one's signer for `safe_tx_hash`.
pub fn split(blob: &[u8], safe_tx_hash: B256) -> Result<Vec<SignatureItem>, SignatureError> {
    if blob.is_empty() {
        return Err(SignatureError::Empty);
    }
    // The static part ends where the first contract signature's data begins.
    let mut static_end = blob.len();
    let mut items = Vec::new();
    let mut index = 0usize;
    while (index + 1) * 65 <= static_end {
        let at = index * 65;
        let r = B256::from_slice(&blob[at..at + 32]);
        let s = B256::from_slice(&blob[at + 32..at + 64]);
        let v = blob[at + 64];
        let item = match v {
            0 => {
                let offset = U256::from_be_bytes(s.0);
                let bad = || SignatureError::ContractOffset { index, offset };
                let start = usize::try_from(offset).map_err(|_| bad())?;
                if start < (index + 1) * 65 || start.checked_add(32).is_none_or(|e| e > blob.len())
                {
                    return Err(bad());
                }
                let len = usize::try_from(U256::from_be_slice(&blob[start..start + 32]))
                    .map_err(|_| bad())?;
                let end = (start + 32).checked_add(len).ok_or_else(bad)?;
                if end > blob.len() {
                    return Err(bad());
                }
                static_end = static_end.min(start);
                SignatureItem {
                    owner: Address::from_word(r),
                    kind: SignatureKind::Contract,
                    contract_data: Some(Bytes::copy_from_slice(&blob[start + 32..end])),
                }
            }
            1 => SignatureItem {
                owner: Address::from_word(r),
                kind: SignatureKind::ApprovedHash,
                contract_data: None,
            },
            v if v > 30 => SignatureItem {
                owner: ecrecover(eth_signed(safe_tx_hash), r, s, v - 4)
                    .map_err(|reason| SignatureError::Unrecoverable { index, reason })?,
                kind: SignatureKind::EthSign,
                contract_data: None,
            },
            v => SignatureItem {
                owner: ecrecover(safe_tx_hash, r, s, v)
                    .map_err(|reason| SignatureError::Unrecoverable { index, reason })?,
                kind: SignatureKind::Eoa,
                contract_data: None,
            },
        };
        if items
            .last()
            .is_some_and(|last: &SignatureItem| last.owner >= item.owner)
        {
            return Err(SignatureError::NotAscending { index });
        }
        items.push(item);
        index += 1;
    }
    if index * 65 != static_end {
        return Err(SignatureError::Truncated(blob.len()));
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::signers::SignerSync;
    use alloy::signers::local::PrivateKeySigner;
    use proptest::prelude::*;

    fn rsv(sig: &alloy::primitives::Signature, v_offset: u8) -> Vec<u8> {
        let mut out = sig.r().to_be_bytes::<32>().to_vec();
        out.extend_from_slice(&sig.s().to_be_bytes::<32>());
        out.push(27 + u8::from(sig.v()) + v_offset);
        out
    }

    #[test]
    fn eoa_eth_sign_approved_and_contract_items_name_their_signers() {
        let hash = keccak256("a safe transaction");
        let mut signers: Vec<PrivateKeySigner> = (1..=2u8)
            .map(|i| PrivateKeySigner::from_bytes(&B256::repeat_byte(i)).unwrap())
            .collect();
        signers.sort_by_key(|s| s.address());
        let approved = Address::repeat_byte(0xee);
        let contract = Address::repeat_byte(0xff);
        let mut owners = vec![
            (signers[0].address(), 0u8),
            (signers[1].address(), 1),
            (approved, 2),
            (contract, 3),
        ];
        owners.sort();
        let mut blob = Vec::new();
        for (owner, what) in &owners {
            match what {
                0 => blob.extend(rsv(&signers[0].sign_hash_sync(&hash).unwrap(), 0)),
                1 => blob.extend(rsv(
                    &signers[1].sign_message_sync(hash.as_slice()).unwrap(),
                    4,
                )),
                2 => {
                    blob.extend_from_slice(B256::left_padding_from(owner.as_slice()).as_slice());
                    blob.extend_from_slice(&[0; 32]);
                    blob.push(1);
                }
                _ => {
                    blob.extend_from_slice(B256::left_padding_from(owner.as_slice()).as_slice());
                    blob.extend_from_slice(&U256::from(4 * 65).to_be_bytes::<32>());
                    blob.push(0);
                }
            }
        }
        blob.extend_from_slice(&U256::from(3).to_be_bytes::<32>());
        blob.extend_from_slice(&[9, 9, 9]);
        let items = split(&blob, hash).unwrap();
        let named: Vec<(Address, SignatureKind)> =
            items.iter().map(|i| (i.owner, i.kind)).collect();
        let expected: Vec<(Address, SignatureKind)> = owners
            .iter()
            .map(|(a, w)| {
                let kind = match w {
                    0 => SignatureKind::Eoa,
                    1 => SignatureKind::EthSign,
                    2 => SignatureKind::ApprovedHash,
                    _ => SignatureKind::Contract,
                };
                (*a, kind)
            })
            .collect();
        assert_eq!(named, expected);
        let c = items
            .iter()
            .find(|i| i.kind == SignatureKind::Contract)
            .unwrap();
        assert_eq!(
            c.contract_data.as_ref().map(|d| d.to_vec()),
            Some(vec![9u8, 9, 9])
        );
        // Another hash recovers to someone else.
        let other = split(&blob, keccak256("another")).unwrap();
        assert!(!other.iter().any(|i| i.owner == signers[0].address()));
    }

    #[test]
    fn malformed_lists_are_named() {
        let hash = B256::ZERO;
        assert_eq!(split(&[], hash), Err(SignatureError::Empty));
        assert_eq!(split(&[1; 64], hash), Err(SignatureError::Truncated(64)));
        let mut bad_offset = vec![0u8; 65];
        bad_offset[63] = 10; // s = 10: inside the static part
        assert!(matches!(
            split(&bad_offset, hash),
            Err(SignatureError::ContractOffset { index: 0, .. })
        ));
        let mut approved = Vec::new();
        for owner in [2u8, 1] {
            approved.extend_from_slice(&[0; 31]);
            approved.push(owner);
            approved.extend_from_slice(&[0; 32]);
            approved.push(1);
        }
        assert_eq!(
            split(&approved, hash),
            Err(SignatureError::NotAscending { index: 1 })
        );
        let mut bad_v = vec![0u8; 65];
        bad_v[64] = 29;
        assert!(matches!(
            split(&bad_v, hash),
            Err(SignatureError::Unrecoverable { index: 0, .. })
        ));
    }

    proptest! {
        #[test]
        fn split_never_panics(blob in proptest::collection::vec(any::<u8>(), 0..400), hash in any::<[u8; 32]>()) {
            let _ = split(&blob, B256::from(hash));
        }

        #[test]
        fn contract_offsets_never_escape_the_list(items in 1usize..4, offset in any::<u64>(), len in any::<u64>(), tail in 0usize..100) {
            let mut blob = Vec::new();
            for i in 0..items {
                blob.extend_from_slice(&[0; 31]);
                blob.push(i as u8 + 1);
                blob.extend_from_slice(&U256::from(offset).to_be_bytes::<32>());
                blob.push(0);
            }
            blob.extend_from_slice(&U256::from(len).to_be_bytes::<32>());
            blob.extend(std::iter::repeat_n(7u8, tail));
            if let Ok(found) = split(&blob, B256::ZERO) {
                for i in found {
                    prop_assert!(i.contract_data.map_or(0, |d| d.len()) <= tail);
                }
            }
        }
    }
}
