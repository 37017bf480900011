//! The `governance` commands. `governance verify --offline`: everything a signer compares with
//! the hardware wallet's screen, from the transaction's fields alone (no node, no Transaction
//! Service), for air-gapped machines; exit codes 0 no critical finding, 3 a critical finding, 2
//! unusable input. `governance topology`: who governs the contracts, from the store.

use std::process::ExitCode;

use alloy::primitives::{Address, B256, Bytes, U256};

use super::classify::{Context, Severity, UsageUnknown};
use super::safe_tx::{Operation, SafeTx, SafeVersion};

/// Exit code when a critical finding was made.
pub const EXIT_CRITICAL: u8 = 3;

/// `keywarden governance verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// Work from the given fields alone: no node, no Transaction Service (simulation, the
    /// Safe's current threshold, on-chain approvals and in-use counts are not checked).
    #[arg(long, required = true)]
    pub offline: bool,
    /// Chain id.
    #[arg(long, value_name = "ID")]
    pub chain_id: u64,
    /// The Safe's address.
    #[arg(long, value_name = "ADDRESS")]
    pub safe: Address,
    /// The Safe's version, as its `VERSION()` returns it (e.g. 1.4.1).
    #[arg(long, value_name = "VERSION")]
    pub safe_version: SafeVersion,
    /// The transaction's nonce.
    #[arg(long, value_parser = parse_u256)]
    pub nonce: U256,
    /// Target.
    #[arg(long, value_name = "ADDRESS")]
    pub to: Address,
    /// Wei sent (decimal or 0x hex).
    #[arg(long, default_value = "0", value_parser = parse_u256)]
    pub value: U256,
    /// Calldata (0x hex).
    #[arg(long, default_value = "0x", value_name = "HEX")]
    pub data: Bytes,
    /// 0 call, 1 delegatecall.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub operation: u8,
    /// safeTxGas.
    #[arg(long, default_value = "0", value_parser = parse_u256)]
    pub safe_tx_gas: U256,
    /// baseGas (dataGas before 1.0.0).
    #[arg(long, default_value = "0", value_parser = parse_u256)]
    pub base_gas: U256,
    /// gasPrice of the refund.
    #[arg(long, default_value = "0", value_parser = parse_u256)]
    pub gas_price: U256,
    /// Refund token (0: ether).
    #[arg(long, default_value_t = Address::ZERO, value_name = "ADDRESS")]
    pub gas_token: Address,
    /// Refund receiver (0: the executor).
    #[arg(long, default_value_t = Address::ZERO, value_name = "ADDRESS")]
    pub refund_receiver: Address,
    /// The safeTxHash shown elsewhere (the wallet app, the Transaction Service): a difference
    /// is critical.
    #[arg(long, value_name = "HASH")]
    pub expected_safe_tx_hash: Option<B256>,
    /// Signatures collected so far (a Safe signature list, 0x hex): who signed is recovered.
    #[arg(long, value_name = "HEX")]
    pub signatures: Option<Bytes>,
    /// A current owner of the Safe (repeatable): a signature by anyone else is critical.
    #[arg(long = "owner", value_name = "ADDRESS")]
    pub owners: Vec<Address>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn parse_u256(s: &str) -> Result<U256, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => U256::from_str_radix(hex, 16),
        None => U256::from_str_radix(s, 10),
    };
    parsed.map_err(|e| format!("{s:?} is not a decimal or 0x-hex integer below 2^256: {e}"))
}

/// Runs `governance verify`.
pub fn run_verify(args: VerifyArgs) -> ExitCode {
    let operation = match Operation::try_from(args.operation) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("keywarden: error: --operation: {e}");
            return ExitCode::from(2);
        }
    };
    let tx = SafeTx {
        to: args.to,
        value: args.value,
        data: args.data,
        operation,
        safe_tx_gas: args.safe_tx_gas,
        base_gas: args.base_gas,
        gas_price: args.gas_price,
        gas_token: args.gas_token,
        refund_receiver: args.refund_receiver,
        nonce: args.nonce,
    };
    let no_delay = |_: Address| None;
    let ctx = Context {
        safe: args.safe,
        threshold: None,
        min_delay: &no_delay,
        usage: &UsageUnknown,
        window: "in-use window",
    };
    let claims = super::verify::Claims {
        safe_tx_hash: args.expected_safe_tx_hash,
        signatures: args.signatures.as_ref().map(|b| b.as_ref()),
        owners: (!args.owners.is_empty()).then_some(args.owners.as_slice()),
    };
    let mut v = super::verify::verify(
        args.chain_id,
        args.safe,
        args.safe_version,
        tx,
        &claims,
        &ctx,
    );
    v.skipped = vec![
        "simulation (offline: no node to run the transaction on)".into(),
        "the Safe's current threshold and timelock delays (offline)".into(),
        "instances using removed measurements (offline: no boot records)".into(),
    ];
    if args.signatures.is_some() {
        v.skipped.push(
            "approved hashes and contract signatures (offline: they hold only on-chain)".into(),
        );
        if args.owners.is_empty() {
            v.skipped
                .push("whether signers are owners (no --owner given)".into());
        }
    } else {
        v.skipped.push("signatures (none given)".into());
    }
    if args.json {
        match serde_json::to_string_pretty(&v) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("keywarden: error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", v.render_text());
    }
    if v.worst() == Some(Severity::Critical) {
        ExitCode::from(EXIT_CRITICAL)
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs `governance topology` against the configured store.
pub async fn run_topology(storage: &crate::store::config::StorageConfig, json: bool) -> ExitCode {
    let result = async {
        let target = storage.database_target().map_err(|e| e.to_string())?;
        let store = crate::store::Store::open(storage, &target)
            .await
            .map_err(|e| e.to_string())?;
        let out = super::report::topology(&store).await;
        store.close().await;
        out.map_err(|e| e.to_string())
    }
    .await;
    match result {
        Ok(v) if json => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            let chains = v["chains"].as_array().cloned().unwrap_or_default();
            if chains.is_empty() {
                println!(
                    "No governance state in the store yet (the watcher follows it once [chain] is set)."
                );
            }
            for c in chains {
                print!("{}", super::topology::render_text(&c));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            ExitCode::FAILURE
        }
    }
}
