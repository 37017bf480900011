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
    /// Safe's current threshold, on-chain approvals and in-use counts are not checked). Without
    /// it, the proposal for `--nonce` is read from the Transaction Service and checked against the
    /// store and the chain, as the running watcher does.
    #[arg(long)]
    pub offline: bool,
    /// Chain id (`--offline`).
    #[arg(long, value_name = "ID")]
    pub chain_id: Option<u64>,
    /// The Safe's address.
    #[arg(long, value_name = "ADDRESS")]
    pub safe: Address,
    /// The Safe's version, as its `VERSION()` returns it (e.g. 1.4.1; `--offline`).
    #[arg(long, value_name = "VERSION")]
    pub safe_version: Option<SafeVersion>,
    /// The transaction's nonce.
    #[arg(long, value_parser = parse_u256)]
    pub nonce: U256,
    /// Target (`--offline`).
    #[arg(long, value_name = "ADDRESS")]
    pub to: Option<Address>,
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
    /// Data directory of the embedded database (online).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// Database URL (online).
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
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

/// Prints `v` and gives the exit code its findings call for.
fn report(v: &super::verify::Verification, json: bool) -> ExitCode {
    if json {
        match serde_json::to_string_pretty(v) {
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

/// Runs `governance verify --offline`.
pub fn run_verify(args: VerifyArgs) -> ExitCode {
    let (Some(chain_id), Some(safe_version), Some(to)) =
        (args.chain_id, args.safe_version, args.to)
    else {
        eprintln!(
            "keywarden: error: governance verify --offline needs --chain-id, --safe-version and --to (the transaction's fields)"
        );
        return ExitCode::from(2);
    };
    let operation = match Operation::try_from(args.operation) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("keywarden: error: --operation: {e}");
            return ExitCode::from(2);
        }
    };
    let tx = SafeTx {
        to,
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
    let mut v = super::verify::verify(chain_id, args.safe, safe_version, tx, &claims, &ctx);
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
    report(&v, args.json)
}

/// The configuration sections the online commands read.
pub struct Sections<'a> {
    /// `[storage]`.
    pub storage: &'a crate::store::config::StorageConfig,
    /// `[chain]`.
    pub chain: &'a crate::chain::ChainConfig,
    /// `[governance]`.
    pub governance: &'a super::config::GovernanceConfig,
}

/// The watched Safes' pending queues, read once and checked as the watcher does, against the
/// governance state in the store (and simulated through `[chain]`'s endpoints).
async fn queues_once(
    config: &Sections<'_>,
) -> Result<
    (
        super::state::GovernanceState,
        std::sync::Arc<std::collections::BTreeMap<Address, super::queue::SafeQueue>>,
    ),
    String,
> {
    if config.governance.transaction_service.is_none()
        && config
            .governance
            .safes
            .iter()
            .all(|s| s.transaction_service.is_none())
    {
        return Err("no Transaction Service is configured (governance.transaction_service), or use --offline".into());
    }
    let target = config
        .storage
        .database_target()
        .map_err(|e| e.to_string())?;
    let store = crate::store::Store::open(config.storage, &target)
        .await
        .map_err(|e| e.to_string())?;
    let state = super::report::stored_states(&store)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or("no governance state in the store yet: run keywarden serve with [chain] first")?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = super::metrics::GovernanceMetrics::new(&mut registry);
    let view = std::sync::Arc::new(super::watch::GovernanceView::default());
    view.publish(std::sync::Arc::new(state.clone()));
    let out = std::sync::Arc::new(super::queue::ProposalsView::default());
    let simulator = crate::chain::connect(config.chain, &mut registry)
        .reads()
        .map(|r| super::simulate::Simulator::new(r, state.kms));
    let mut watcher = super::queue::QueueWatcher::new(
        config.governance,
        view,
        out.clone(),
        store.clone(),
        simulator,
        metrics,
    );
    let polled = watcher.poll_once().await;
    store.close().await;
    polled.map_err(|e| e.to_string())?;
    Ok((state, out.snapshot()))
}

/// Runs `governance verify` against the Transaction Service (not `--offline`).
pub async fn run_verify_online(config: &Sections<'_>, args: &VerifyArgs) -> ExitCode {
    let (state, queues) = match queues_once(config).await {
        Ok(q) => q,
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(queue) = queues.get(&args.safe) else {
        eprintln!(
            "keywarden: error: Safe {} is not watched (not found from the contracts' owners nor configured)",
            args.safe
        );
        return ExitCode::from(2);
    };
    if let Some(e) = &queue.error {
        eprintln!("keywarden: error: {e}");
        return ExitCode::FAILURE;
    }
    let found: Vec<_> = queue
        .proposals
        .iter()
        .filter(|p| U256::from(p.nonce) == args.nonce)
        .collect();
    if found.is_empty() {
        eprintln!(
            "keywarden: error: no pending proposal of Safe {} has nonce {}",
            args.safe, args.nonce
        );
        return ExitCode::from(2);
    }
    let version = state
        .safes
        .get(&args.safe)
        .and_then(|s| s.version.as_deref())
        .and_then(|v| v.parse().ok());
    let mut code = ExitCode::SUCCESS;
    for p in found {
        let Some(version) = version else {
            eprintln!("keywarden: error: the Safe's version is not known yet");
            return ExitCode::FAILURE;
        };
        let v = super::verify::Verification {
            chain_id: state.chain_id,
            safe: p.safe,
            safe_version: version,
            transaction: p.transaction.clone(),
            hashes: super::safe_tx::hashes(state.chain_id, p.safe, version, &p.transaction),
            calls: super::decode::decode(
                p.transaction.to,
                p.transaction.value,
                &p.transaction.data,
                p.transaction.operation,
            )
            .map_err(|e| e.to_string()),
            words: p.words.clone(),
            signers: Vec::new(),
            findings: p.findings.clone(),
            skipped: Vec::new(),
        };
        if report(&v, args.json) != ExitCode::SUCCESS {
            code = ExitCode::from(EXIT_CRITICAL);
        }
    }
    code
}

/// Runs `governance proposals`: every watched Safe's pending queue, checked.
pub async fn run_proposals(config: &Sections<'_>, json: bool) -> ExitCode {
    let (_, queues) = match queues_once(config).await {
        Ok(q) => q,
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!("{}", serde_json::json!({ "safes": *queues }));
        return ExitCode::SUCCESS;
    }
    for (safe, q) in queues.iter() {
        println!("Safe {safe}");
        if let Some(e) = &q.error {
            println!("  queue not read: {e}");
        }
        if q.proposals.is_empty() {
            println!("  no pending proposal");
        }
        for p in &q.proposals {
            println!(
                "  nonce {} safeTxHash {} ({}/{} confirmations, {} instances affected)",
                p.nonce,
                p.safe_tx_hash,
                p.confirmed_by.len(),
                p.threshold,
                p.affected()
            );
            for w in &p.words {
                println!("    {w}");
            }
            for f in &p.findings {
                println!("    [{}] {}", f.severity.label(), f.detail);
            }
        }
    }
    ExitCode::SUCCESS
}

/// Runs `governance history`: executed Safe transactions and finished timelock operations.
pub async fn run_history(storage: &crate::store::config::StorageConfig, json: bool) -> ExitCode {
    let result = async {
        let target = storage.database_target().map_err(|e| e.to_string())?;
        let store = crate::store::Store::open(storage, &target)
            .await
            .map_err(|e| e.to_string())?;
        let states = super::report::stored_states(&store).await;
        store.close().await;
        states.map_err(|e| e.to_string())
    }
    .await;
    let states = match result {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let history: Vec<serde_json::Value> = states.iter().map(super::report::history).collect();
    if json {
        println!("{}", serde_json::json!({ "chains": history }));
        return ExitCode::SUCCESS;
    }
    for h in &history {
        for e in h["entries"].as_array().into_iter().flatten() {
            println!(
                "block {:>10}  {}",
                e["block"],
                e["summary"].as_str().unwrap_or_default()
            );
        }
    }
    ExitCode::SUCCESS
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
