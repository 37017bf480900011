//! What a signer compares with the hardware wallet before signing one Safe transaction: the
//! domain hash, message hash and safeTxHash, the calls in plain words, and the findings.
//!
//! Flow: the transaction's fields, the Safe, its version and chain → [`verify`] → a
//! [`Verification`] (hashes from [`super::safe_tx`], calls from [`super::decode`], findings from
//! [`super::classify`], and what was not checked) → [`Verification::render_text`] or JSON. Pure.

use alloy::primitives::{Address, B256};
use serde::Serialize;

use super::classify::{self, Context, Finding, Rule, Severity};
use super::decode::{self, Decoded};
use super::safe_tx::{self, SafeTx, SafeVersion, TxHashes};
use super::signatures::{self, SignatureItem, SignatureKind};

/// One verified transaction.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    /// Chain id the hashes are for.
    pub chain_id: u64,
    /// The Safe.
    pub safe: Address,
    /// Its version (as given or read).
    pub safe_version: SafeVersion,
    /// The transaction.
    pub transaction: SafeTx,
    /// Its hashes.
    pub hashes: TxHashes,
    /// The calls, decoded (or why they cannot be).
    pub calls: Result<Decoded, String>,
    /// The calls in plain words.
    pub words: Vec<String>,
    /// Who signed, from the signatures given.
    pub signers: Vec<SignatureItem>,
    /// Findings, worst first.
    pub findings: Vec<Finding>,
    /// Checks that were not made, and why.
    pub skipped: Vec<String>,
}

impl Verification {
    /// The worst severity found.
    pub fn worst(&self) -> Option<Severity> {
        self.findings.iter().map(|f| f.severity).max()
    }

    /// The text a signer reads.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let t = &self.transaction;
        out.push_str(&format!(
            "Safe {} (version {}) on chain {}, nonce {}\n\n",
            self.safe, self.safe_version, self.chain_id, t.nonce
        ));
        out.push_str("Compare with the hardware wallet:\n");
        out.push_str(&format!("  domain hash   {}\n", self.hashes.domain_hash));
        out.push_str(&format!("  message hash  {}\n", self.hashes.message_hash));
        out.push_str(&format!("  safeTxHash    {}\n\n", self.hashes.safe_tx_hash));
        out.push_str("Calls:\n");
        match &self.calls {
            Ok(_) => {
                for w in &self.words {
                    out.push_str(&format!("  {w}\n"));
                }
            }
            Err(e) => out.push_str(&format!("  cannot be decoded: {e}\n")),
        }
        if !self.signers.is_empty() {
            out.push_str("\nSigned by:\n");
            for s in &self.signers {
                let how = match s.kind {
                    SignatureKind::Eoa => "signature",
                    SignatureKind::EthSign => "eth_sign signature",
                    SignatureKind::ApprovedHash => {
                        "approved hash (holds only if approveHash was called on-chain)"
                    }
                    SignatureKind::Contract => {
                        "contract signature (EIP-1271, holds only if the contract accepts it)"
                    }
                };
                out.push_str(&format!("  {} ({how})\n", s.owner));
            }
        }
        out.push_str("\nFindings:\n");
        if self.findings.is_empty() {
            out.push_str("  none\n");
        }
        for f in &self.findings {
            out.push_str(&format!(
                "  [{}] {}: {}\n",
                f.severity.label(),
                f.rule.label(),
                f.detail
            ));
        }
        if !self.skipped.is_empty() {
            out.push_str("\nNot checked:\n");
            for s in &self.skipped {
                out.push_str(&format!("  {s}\n"));
            }
        }
        out
    }
}

/// What is known of a transaction beyond its fields.
#[derive(Debug, Clone, Default)]
pub struct Claims<'a> {
    /// The safeTxHash shown elsewhere (the Transaction Service, the wallet app): a difference is
    /// critical.
    pub safe_tx_hash: Option<B256>,
    /// Signatures collected so far (a Safe signature list).
    pub signatures: Option<&'a [u8]>,
    /// The Safe's current owners: a signer outside them is critical.
    pub owners: Option<&'a [Address]>,
}

/// Who signed `blob` for `hash`, and what is wrong with it.
fn check_signatures(
    blob: &[u8],
    hash: B256,
    owners: Option<&[Address]>,
) -> (Vec<SignatureItem>, Vec<Finding>) {
    let critical = |rule, detail| Finding {
        rule,
        severity: Severity::Critical,
        detail,
        affected_instances: None,
    };
    match signatures::split(blob, hash) {
        Err(e) => (
            Vec::new(),
            vec![critical(
                Rule::InvalidSignature,
                format!(
                    "the signatures are not a valid Safe signature list for this transaction: {e}"
                ),
            )],
        ),
        Ok(items) => {
            let strangers = items
                .iter()
                .filter(|i| owners.is_some_and(|o| !o.contains(&i.owner)))
                .map(|i| {
                    critical(
                        Rule::NonOwnerSignature,
                        format!(
                            "a signature is by {}, who is not an owner: forged, or signed for another transaction",
                            i.owner
                        ),
                    )
                })
                .collect();
            (items, strangers)
        }
    }
}

/// Verifies `tx` for `safe` on `chain_id` against what is `claimed` of it.
pub fn verify(
    chain_id: u64,
    safe: Address,
    safe_version: SafeVersion,
    tx: SafeTx,
    claimed: &Claims<'_>,
    ctx: &Context<'_>,
) -> Verification {
    let hashes = safe_tx::hashes(chain_id, safe, safe_version, &tx);
    let decoded = decode::decode(tx.to, tx.value, &tx.data, tx.operation);
    let mut findings = classify::classify(&tx, &decoded, ctx);
    let (signers, signature_findings) = claimed
        .signatures
        .map(|blob| check_signatures(blob, hashes.safe_tx_hash, claimed.owners))
        .unwrap_or_default();
    findings.splice(0..0, signature_findings);
    if let Some(expected) = claimed.safe_tx_hash.filter(|e| *e != hashes.safe_tx_hash) {
        findings.insert(
            0,
            Finding {
                rule: Rule::SafeTxHashMismatch,
                severity: Severity::Critical,
                detail: format!(
                    "the safeTxHash given ({expected}) is not this transaction's ({}): what would be signed is not what is shown",
                    hashes.safe_tx_hash
                ),
                affected_instances: None,
            },
        );
    }
    let words = decoded.as_ref().map(Decoded::words).unwrap_or_default();
    Verification {
        chain_id,
        safe,
        safe_version,
        transaction: tx,
        hashes,
        calls: decoded.map_err(|e| e.to_string()),
        words,
        signers,
        findings,
        skipped: Vec::new(),
    }
}
