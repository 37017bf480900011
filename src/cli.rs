//! Command line: parses arguments, loads configuration, and runs the chosen command.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 unusable input (bad flags or configuration).
//! Every failure is printed as one line on stderr naming the problem and its fix.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Overrides};

/// keywarden: a dstack-compatible KMS with an on-chain governance mirror.
#[derive(Debug, Parser)]
#[command(name = "keywarden", version = crate::telemetry::VERSION_LONG, about, long_about = None)]
pub struct Cli {
    /// Configuration file (TOML). Environment variables KEYWARDEN_<SECTION>__<KEY> override it.
    #[arg(long, global = true, env = "KEYWARDEN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve(ServeArgs),
    /// Inspect configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Development helpers (test contracts, test PKI).
    #[command(subcommand)]
    Dev(DevCommand),
    /// Inspect the on-chain mirror in the store (works whether or not the service runs).
    #[command(subcommand)]
    Chain(ChainCommand),
}

/// `keywarden chain ...`
#[derive(Debug, Subcommand)]
pub enum ChainCommand {
    /// Per chain: head, processed block, lag, and the configured endpoints' health.
    Status(crate::chain::cli::StoreArgs),
    /// The mirror's allow-lists, apps and owners, rebuilt from the stored events.
    State(crate::chain::cli::StoreArgs),
}

/// `keywarden dev ...`
#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Deploy our DstackKms/DstackApp test contracts to a development node (e.g. anvil) and
    /// print their addresses and the deployment block.
    Deploy(crate::chain::cli::DeployArgs),
}

/// `keywarden serve` flags (they override file and environment).
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// API (KMS RPC) listen address.
    #[arg(long, value_name = "ADDR")]
    pub api_listen: Option<SocketAddr>,
    /// Metrics and health listen address.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Admin listen address (the admin API runs only with a token configured).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Data directory (embedded database, key material).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database URL: sqlite://PATH or postgres://USER@HOST:PORT/DB.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// JSON-RPC endpoint of the chain holding DstackKms (repeatable: primary first, then backups).
    #[arg(long = "rpc-url", value_name = "URL")]
    pub rpc_urls: Vec<String>,
    /// DstackKms proxy address to mirror.
    #[arg(long, value_name = "ADDRESS")]
    pub kms_contract: Option<String>,
    /// First block to sync (the KMS deployment block).
    #[arg(long, value_name = "N")]
    pub start_block: Option<u64>,
}

/// `keywarden config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file and print the effective configuration, secrets redacted.
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

/// Runs the command line; the binary's `main`.
pub fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    match run(cli, started) {
        Ok(code) => code,
        Err(Failure { code, message }) => {
            eprintln!("keywarden: error: {message}");
            ExitCode::from(code)
        }
    }
}

struct Failure {
    code: u8,
    message: String,
}

fn usage(e: impl std::fmt::Display) -> Failure {
    Failure {
        code: 2,
        message: e.to_string(),
    }
}

fn load(file: Option<&std::path::Path>, overrides: &Overrides) -> Result<Config, Failure> {
    let config = Config::load(file, std::env::vars(), overrides).map_err(usage)?;
    config.validate().map_err(usage)?;
    Ok(config)
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure {
            code: 1,
            message: format!("cannot start the async runtime: {e}"),
        })
}

fn run(cli: Cli, started: Instant) -> Result<ExitCode, Failure> {
    match cli.command {
        Command::Config(ConfigCommand::Check { file }) => {
            let config = load(Some(&file), &Overrides::default())?;
            print!("{}", config.to_redacted_toml());
            eprintln!("keywarden: {} is valid", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev(DevCommand::Deploy(args)) => {
            Ok(runtime()?.block_on(crate::chain::cli::run_deploy(args)))
        }
        Command::Chain(cmd) => {
            let (args, what) = match cmd {
                ChainCommand::Status(a) => (a, crate::chain::cli::Report::Status),
                ChainCommand::State(a) => (a, crate::chain::cli::Report::State),
            };
            let overrides = Overrides {
                data_dir: args.data_dir.clone(),
                database_url: args.database_url.clone(),
                ..Overrides::default()
            };
            let config = load(cli.config.as_deref(), &overrides)?;
            Ok(runtime()?.block_on(crate::chain::cli::run_report(config, what, args.json)))
        }
        Command::Serve(args) => {
            let overrides = Overrides {
                api_listen: args.api_listen,
                metrics_listen: args.metrics_listen,
                admin_listen: args.admin_listen,
                data_dir: args.data_dir,
                database_url: args.database_url,
                rpc_urls: args.rpc_urls,
                kms_contract: args.kms_contract,
                start_block: args.start_block,
            };
            let config = load(cli.config.as_deref(), &overrides)?;
            runtime()?
                .block_on(crate::service::serve(config, started))
                .map(ExitCode::from)
                .map_err(|e| Failure {
                    code: 1,
                    message: format!("{e:#}"),
                })
        }
    }
}
