//! Code identity: which code answers for the KMS contract and for each app, and whether the mirror
//! knows its semantics.
//!
//! Flow: the follower reads a contract's runtime code (`eth_getCode`) and [`identify`]s it: the
//! keccak256 of the code with every 32-byte word holding the contract's own address zeroed (UUPS
//! implementations embed their own address as an immutable, so the same source deployed at two
//! addresses differs only there), plus the offsets that were zeroed. The resulting [`CodeId`] is
//! stored as a synthetic row and matched against the [`KnownCode`] set: our own compiled DstackKms,
//! DstackApp and ERC-1967 proxy (identities computed at build time from `contracts/out/`, where
//! immutables are zero), plus the operator's `chain.known_implementations`. A match needs the same
//! hash and the same immutable offsets, so the zeroed words are exactly the known code's
//! immutables. Pure: no I/O.

use std::collections::HashMap;

use alloy::primitives::{Address, B256, keccak256};
use serde::{Deserialize, Serialize};

/// What a known piece of code does, as far as authorization is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeKind {
    /// DstackKms semantics (`isKmsAllowed`, `isAppAllowed` delegating to the app).
    DstackKms,
    /// DstackApp semantics (TCB requirement, compose hashes, devices).
    DstackApp,
    /// An ERC-1967 proxy that only forwards to the implementation in its slot.
    Proxy,
}

impl CodeKind {
    /// The config / JSON name.
    pub fn label(self) -> &'static str {
        match self {
            Self::DstackKms => "dstack_kms",
            Self::DstackApp => "dstack_app",
            Self::Proxy => "proxy",
        }
    }
}

/// A contract's code identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct CodeId {
    /// keccak256 of the runtime code with the self-address words zeroed.
    pub hash: B256,
    /// Offsets of the zeroed 32-byte words, ascending.
    pub immutables: Vec<u32>,
}

impl CodeId {
    /// Stored form: hash ‖ each offset as 4 big-endian bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.hash.to_vec();
        for o in &self.immutables {
            out.extend_from_slice(&o.to_be_bytes());
        }
        out
    }

    /// Reads [`CodeId::encode`]'s form; `None` if malformed.
    pub fn decode(raw: &[u8]) -> Option<Self> {
        let (hash, rest) = raw.split_at_checked(32)?;
        if rest.len() % 4 != 0 {
            return None;
        }
        let immutables = rest
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Some(Self {
            hash: B256::from_slice(hash),
            immutables,
        })
    }
}

/// Identifies `code` deployed at `at`; `None` for an address without code.
pub fn identify(code: &[u8], at: Address) -> Option<CodeId> {
    if code.is_empty() {
        return None;
    }
    let word = at.into_word();
    let mut masked = code.to_vec();
    let mut immutables = Vec::new();
    let mut i = 0;
    while i + 32 <= masked.len() {
        if masked[i..i + 32] == word[..] {
            masked[i..i + 32].fill(0);
            immutables.push(u32::try_from(i).unwrap_or(u32::MAX));
            i += 32;
        } else {
            i += 1;
        }
    }
    Some(CodeId {
        hash: keccak256(&masked),
        immutables,
    })
}

/// One known piece of code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Known {
    /// Operator-facing name ("keywarden DstackApp", "dstack DstackApp v0.5.3" ...).
    pub name: String,
    /// Its semantics.
    pub kind: CodeKind,
}

/// The code whose semantics the mirror reproduces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownCode {
    by_hash: HashMap<B256, Vec<(Vec<u32>, Known)>>,
}

/// Our own compiled contracts: (name, kind, hash of the runtime code as compiled, immutables).
const BUILTIN: &[(&str, CodeKind, B256, &[u32])] =
    include!(concat!(env!("OUT_DIR"), "/known_code.rs"));

impl KnownCode {
    /// Our own compiled DstackKms, DstackApp and proxy.
    pub fn builtin() -> Self {
        let mut k = Self::default();
        for &(name, kind, hash, immutables) in BUILTIN {
            k.add(
                name.to_owned(),
                kind,
                CodeId {
                    hash,
                    immutables: immutables.to_vec(),
                },
            );
        }
        k
    }

    /// Adds one entry.
    pub fn add(&mut self, name: String, kind: CodeKind, id: CodeId) {
        self.by_hash
            .entry(id.hash)
            .or_default()
            .push((id.immutables, Known { name, kind }));
    }

    /// What `id` is, if known.
    pub fn classify(&self, id: &CodeId) -> Option<&Known> {
        self.by_hash
            .get(&id.hash)?
            .iter()
            .find(|(offsets, _)| *offsets == id.immutables)
            .map(|(_, k)| k)
    }

    /// Every entry, for operators.
    pub fn entries(&self) -> Vec<(&Known, B256, &[u32])> {
        let mut out: Vec<_> = self
            .by_hash
            .iter()
            .flat_map(|(h, v)| v.iter().map(move |(o, k)| (k, *h, o.as_slice())))
            .collect();
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        out
    }
}

#[cfg(test)]
mod tests {
    use alloy::primitives::address;
    use proptest::prelude::*;

    use super::*;
    use crate::chain::contracts::Artifact;

    const AT: Address = address!("5fbdb2315678afecb367f032d93f642f64180aa3");

    /// The artifact's runtime code as deployed at `at`: immutables filled with the address.
    fn deployed_at(artifact: Artifact, offsets: &[u32], at: Address) -> Vec<u8> {
        let mut code = artifact.deployed_bytecode().expect("artifact").to_vec();
        for &o in offsets {
            let o = o as usize;
            code[o..o + 32].copy_from_slice(at.into_word().as_slice());
        }
        code
    }

    #[test]
    fn our_implementations_are_known_wherever_deployed() {
        let known = KnownCode::builtin();
        for (artifact, kind) in [
            (Artifact::DstackApp, CodeKind::DstackApp),
            (Artifact::DstackKms, CodeKind::DstackKms),
            (Artifact::Erc1967Proxy, CodeKind::Proxy),
        ] {
            let (_, _, _, offsets) = BUILTIN
                .iter()
                .find(|(_, k, ..)| *k == kind)
                .expect("builtin entry");
            for at in [AT, Address::repeat_byte(0x42)] {
                let id = identify(&deployed_at(artifact, offsets, at), at).expect("code");
                assert_eq!(id.immutables, offsets.to_vec(), "{}", artifact.name());
                assert_eq!(known.classify(&id).map(|k| k.kind), Some(kind));
            }
        }
    }

    #[test]
    fn same_code_with_other_immutable_positions_is_unknown() {
        let known = KnownCode::builtin();
        let (_, _, _, offsets) = BUILTIN
            .iter()
            .find(|(_, k, ..)| *k == CodeKind::DstackApp)
            .expect("builtin entry");
        // The address only at the first immutable: the hash differs (the others stay zero in
        // the code but the offsets list is shorter), so it is not the known code.
        let id = identify(&deployed_at(Artifact::DstackApp, &offsets[..1], AT), AT).expect("code");
        assert!(known.classify(&id).is_none());
        // A one-byte change anywhere else makes it unknown.
        let mut code = deployed_at(Artifact::DstackApp, offsets, AT);
        code[10] ^= 1;
        assert!(
            known
                .classify(&identify(&code, AT).expect("code"))
                .is_none()
        );
        assert!(identify(&[], AT).is_none());
    }

    #[test]
    fn operator_entries_are_matched_by_hash_and_offsets() {
        let mut known = KnownCode::default();
        let code = [0x60, 0x01, 0x60, 0x02];
        let id = identify(&code, AT).expect("code");
        assert!(id.immutables.is_empty());
        known.add("upstream app".into(), CodeKind::DstackApp, id.clone());
        assert_eq!(
            known.classify(&id).map(|k| k.name.as_str()),
            Some("upstream app")
        );
    }

    proptest! {
        #[test]
        fn code_id_round_trips(hash in any::<[u8; 32]>(), offsets in proptest::collection::vec(any::<u32>(), 0..8)) {
            let id = CodeId { hash: B256::from(hash), immutables: offsets };
            prop_assert_eq!(CodeId::decode(&id.encode()), Some(id));
        }

        #[test]
        fn decode_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = CodeId::decode(&raw);
        }
    }
}
