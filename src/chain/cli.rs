//! The `chain` commands: `chain status`, `chain state` and `chain code-identity`.

use std::process::ExitCode;

/// Where `chain status` / `chain state` read from, and how they print.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Data directory of the embedded database.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// Database URL: sqlite://PATH or postgres://USER@HOST:PORT/DB.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Which report to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// `chain status`.
    Status,
    /// `chain state`.
    State,
}

/// Runs `chain status` or `chain state` against the configured store.
pub async fn run_report(
    storage: &crate::store::config::StorageConfig,
    chain: &super::ChainConfig,
    what: Report,
    json: bool,
) -> ExitCode {
    let result = async {
        let target = storage.database_target().map_err(|e| e.to_string())?;
        let store = crate::store::Store::open(storage, &target)
            .await
            .map_err(|e| e.to_string())?;
        let out = match what {
            Report::Status => super::report::status(&store, chain).await,
            Report::State => super::report::state(&store, chain).await,
        };
        store.close().await;
        out.map_err(|e| e.to_string())
    }
    .await;
    match result {
        Ok(value) => {
            if json {
                println!("{value}");
            } else {
                print!("{}", super::report::render_text(&value));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `chain code-identity ADDRESS`: prints the identity of the code deployed there, as an
/// entry for `[[chain.known_implementations]]` (text) or JSON.
pub async fn run_code_identity(
    chain: &super::ChainConfig,
    address: alloy::primitives::Address,
    json: bool,
) -> ExitCode {
    if chain.rpc_urls.is_empty() {
        eprintln!(
            "keywarden: error: no RPC endpoint configured (fix: set chain.rpc_urls or pass --rpc-url)"
        );
        return ExitCode::from(2);
    }
    match super::report::code_identity(chain, address).await {
        Ok(v) if json => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            println!(
                "# {} ({} bytes of code); known as: {}",
                v["address"].as_str().unwrap_or_default(),
                v["code_bytes"],
                v["known_as"].as_str().unwrap_or("nothing yet")
            );
            println!("# Check that this is the code you mean to trust, then add:");
            println!("[[chain.known_implementations]]");
            println!("name = \"NAME ME\"");
            println!("kind = \"dstack_app\"  # or dstack_kms, proxy: what the code does");
            println!(
                "code_hash = \"{}\"",
                v["code_hash"].as_str().unwrap_or_default()
            );
            println!("immutable_offsets = {}", v["immutable_offsets"]);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            ExitCode::FAILURE
        }
    }
}
