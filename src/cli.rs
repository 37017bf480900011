//! Command line: parses arguments, loads configuration, and runs the chosen command.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 unusable input (bad flags or configuration), 3 a
//! critical finding (`governance verify`).
//! Every failure is printed as one line on stderr naming the problem and its fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
    /// The whole story on this machine: anvil, our contracts governed by a Safe through a
    /// timelock, keywarden with a TEST attestation PKI, simulated CVMs getting keys, the Safe's
    /// removal of their compose hash alerted before it executes, the next boot refused.
    Demo(crate::demo::DemoArgs),
    /// Inspect configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Verify attestation evidence.
    #[command(subcommand)]
    Attest(AttestCommand),
    /// Drive GetAppKey at a KMS with simulated guests (test PKI) and report throughput and latency.
    Loadgen(LoadgenArgs),
    /// KMS key material.
    #[command(subcommand)]
    Kms(KmsCommand),
    /// Development helpers (test contracts, test PKI).
    #[command(subcommand)]
    Dev(DevCommand),
    /// Inspect the on-chain mirror in the store (works whether or not the service runs).
    #[command(subcommand)]
    Chain(ChainCommand),
    /// What a Safe proposal would really do, before anyone signs it.
    #[command(subcommand)]
    Governance(GovernanceCommand),
    /// The CVMs: this KMS's boot records (whether or not the service runs), joined with the
    /// dstack-vmm hosts of [[cvm.vmm]] when configured.
    #[command(subcommand)]
    Cvm(CvmCommand),
    /// The replicas sharing this database.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

/// `keywarden cluster ...`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// The leader (epoch, since, last renewal) and the replicas that reported in the last minute,
    /// with their roles and the newest chain block each one's mirror has.
    Status(crate::chain::cli::StoreArgs),
}

/// `keywarden cvm ...`
#[derive(Debug, Subcommand)]
pub enum CvmCommand {
    /// Every instance that received keys (first and last boot, boots, measurements, the newest
    /// refusal since), and those only ever refused; with [[cvm.vmm]], every VM beside them
    /// (status, uptime, boot time, memory, containers), the stuck and the unmonitored.
    List(crate::cvm::cli::CvmArgs),
    /// A VM's serial console or output, from the dstack-vmm hosts of [[cvm.vmm]] (--follow until
    /// Ctrl-C).
    Logs(crate::cvm::logs::LogsArgs),
    /// One instance, by its id (hex; a unique prefix of at least 4 digits will do), or a VM by
    /// its id or name on the [[cvm.vmm]] hosts: its records and the VM as its VMM shows it.
    Show {
        /// The instance id, or the VM's id or name.
        id: String,
        /// Where the store is, the output form, and whether to ask the VMMs.
        #[command(flatten)]
        args: crate::cvm::cli::CvmArgs,
    },
}

/// `keywarden governance ...`
#[derive(Debug, Subcommand)]
pub enum GovernanceCommand {
    /// Everything a signer compares with the hardware wallet before signing: domain hash,
    /// message hash and safeTxHash, the calls decoded in plain words, and the findings. Exits 3
    /// on a critical finding.
    Verify(Box<crate::governance::cli::VerifyArgs>),
    /// Who governs DstackKms and its apps: owners and pending owners, what they are (Safe,
    /// timelock, EOA), a timelock's proposers, executors and cancellers, with findings; read
    /// from the store, whether or not the service runs.
    Topology(crate::chain::cli::StoreArgs),
    /// Every watched Safe's pending proposals, read from the Transaction Service and checked
    /// (hashes, signatures, decoding, simulation, instances affected).
    Proposals(crate::chain::cli::StoreArgs),
    /// What governance did: executed Safe transactions and finished timelock operations, newest
    /// first, from the store.
    History(crate::chain::cli::StoreArgs),
}

/// `keywarden chain ...`
#[derive(Debug, Subcommand)]
pub enum ChainCommand {
    /// Per chain: head, processed block, lag, and the configured endpoints' health.
    Status(crate::chain::cli::StoreArgs),
    /// The mirror's allow-lists, apps and owners, rebuilt from the stored events, with the code
    /// answering for the KMS contract and each app and whether it is evaluated locally or live.
    State(crate::chain::cli::StoreArgs),
    /// The identity of the code deployed at an address (hash with its self-address immutables
    /// masked, and their offsets), printed as a `[[chain.known_implementations]]` entry.
    CodeIdentity {
        /// The contract (for a proxy, pass its implementation's address).
        address: alloy::primitives::Address,
        /// JSON-RPC endpoint (overrides chain.rpc_urls).
        #[arg(long, value_name = "URL")]
        rpc_url: Option<String>,
        /// Print JSON instead of a TOML entry.
        #[arg(long)]
        json: bool,
    },
}

/// `keywarden kms ...`
#[derive(Debug, Subcommand)]
pub enum KmsCommand {
    /// Print what an operator registers on-chain: the root k256 public key, the root CA public
    /// key and the bootstrap report data. Reads the keys under the configured data directory.
    Info {
        /// Data directory (overrides the configuration).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Act as a dstack guest (test PKI): temp CA → own RA-TLS certificate → GetAppKey; prints
    /// the keys received.
    Client(ClientArgs),
    /// Fetch the root keys of a running KMS (keywarden or upstream dstack's) into this
    /// instance's empty data directory: this instance attests itself (the dstack guest agent
    /// with kms.self_attestation = "guest_agent", or --test-pki) and calls GetKmsKey. The source
    /// must have replication on and admit this boot through isKmsAllowed.
    Onboard {
        /// The source KMS's RPC URL, e.g. https://kms-0.example.org:8000.
        #[arg(long, value_name = "URL")]
        from: String,
        /// The source's root CA certificate (PEM): the only CA its TLS certificate may chain to.
        #[arg(long, value_name = "FILE")]
        ca: PathBuf,
        /// Attest as a simulated KMS guest of this test PKI instead of the guest agent.
        #[arg(long, value_name = "DIR")]
        test_pki: Option<PathBuf>,
        /// Data directory (overrides the configuration).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
}

/// Where a simulated guest connects and who it is.
#[derive(Debug, Args)]
pub struct GuestArgs {
    /// KMS URL, e.g. https://localhost:8000.
    #[arg(long, value_name = "URL")]
    pub url: String,
    /// Test attestation PKI directory (the KMS must trust it: `serve --insecure-test-pki DIR`).
    #[arg(long, value_name = "DIR")]
    pub test_pki: PathBuf,
    /// KMS root CA certificate (PEM). Without it, the CA the KMS names is trusted on first use.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// App id (40 hex digits).
    #[arg(
        long,
        value_name = "HEX",
        default_value = "1111111111111111111111111111111111111111"
    )]
    pub app_id: String,
    /// app-compose.json whose SHA-256 is the compose hash (default: an empty compose).
    #[arg(long, value_name = "FILE")]
    pub compose: Option<PathBuf>,
    /// Instance id (40 hex digits; default: random).
    #[arg(long, value_name = "HEX")]
    pub instance_id: Option<String>,
    /// The platform TCB level the quote claims: the verifier reports `UpToDate`, or `OutOfDate`
    /// with advisory INTEL-SA-00999 (accepted only where `attestation.tcb_statuses` allows it).
    #[arg(long, value_name = "LEVEL", value_parser = ["up-to-date", "out-of-date"], default_value = "up-to-date")]
    pub tcb: String,
    /// The platform's PPID (32 hex digits): the boot's device id is sha256 of it (default: the
    /// test PKI's own platform).
    #[arg(long, value_name = "HEX")]
    pub ppid: Option<String>,
}

/// `keywarden kms client`
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The guest.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// vm_config JSON the host would pass (default: the simulated OS image's hash).
    #[arg(long, value_name = "JSON")]
    pub vm_config: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `keywarden loadgen`
#[derive(Debug, Args)]
pub struct LoadgenArgs {
    /// The guest.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Concurrent workers; with `--rate`, the most requests outstanding at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Offer this many requests per second whatever the answers (open loop), instead of
    /// `--concurrency` clients each waiting for its answer.
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Open a new TLS connection (full mutual handshake) for every request.
    #[arg(long)]
    pub new_connection_per_request: bool,
    /// The KMS's /metrics URL, to report its resident memory during the run.
    #[arg(long, value_name = "URL")]
    pub metrics_url: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The sections the online governance commands read.
fn governance_sections(config: &Config) -> crate::governance::cli::Sections<'_> {
    crate::governance::cli::Sections {
        storage: &config.storage,
        chain: &config.chain,
        governance: &config.governance,
    }
}

/// The overrides of a command that reads the store.
fn store_overrides(args: &crate::chain::cli::StoreArgs) -> Overrides {
    Overrides {
        data_dir: args.data_dir.clone(),
        database_url: args.database_url.clone(),
        ..Overrides::default()
    }
}

fn failure(code: u8) -> impl Fn(&dyn std::fmt::Display) -> Failure {
    move |e| Failure {
        code,
        message: e.to_string(),
    }
}

/// Runs `kms onboard`.
async fn onboard(config: &Config, from: &str, ca: &Path, test_pki: Option<&Path>) -> ExitCode {
    let source = match crate::service::own_attestation(&config.kms, test_pki).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            eprintln!(
                "keywarden: error: onboarding attests this instance: run it in its dstack CVM with kms.self_attestation = \"guest_agent\", or give --test-pki DIR"
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("keywarden: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // A service running on this data directory would not see the new keys: refuse meanwhile.
    let _lock = match crate::store::lock_data_dir(&config.storage.data_dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            return ExitCode::from(2);
        }
    };
    let data_dir = &config.storage.data_dir;
    match crate::kms::onboard::onboard(from, ca, source.as_ref(), data_dir, &config.kms).await {
        Ok(installed) => {
            let keys = crate::kms::root::load_existing(data_dir, &config.kms);
            let k256 = keys
                .ok()
                .and_then(|k| crate::kms::keys::BootstrapInfo::of(&k.root).ok())
                .map(|b| hex::encode(b.k256_pubkey))
                .unwrap_or_default();
            let what = match installed {
                crate::kms::root::Installed::Created => "stored the root keys of",
                crate::kms::root::Installed::AlreadyPresent => "already holds the root keys of",
            };
            println!(
                "{} {what} {from} (k256 public key {k256})",
                crate::kms::root::key_dir(data_dir).display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Enrolls the simulated guest described by `args`.
async fn enroll(args: &GuestArgs, fresh: bool) -> Result<crate::sim::client::Guest, Failure> {
    let usage = failure(2);
    let app_id: [u8; 20] = hex::decode(args.app_id.trim_start_matches("0x"))
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| usage(&"--app-id must be 40 hex digits"))?;
    let compose = match &args.compose {
        Some(p) => {
            std::fs::read(p).map_err(|e| usage(&format!("--compose {}: {e}", p.display())))?
        }
        None => Vec::new(),
    };
    let instance_id = match &args.instance_id {
        Some(h) => hex::decode(h.trim_start_matches("0x"))
            .ok()
            .filter(|v| v.len() == 20)
            .ok_or_else(|| usage(&"--instance-id must be 40 hex digits"))?,
        None => {
            let mut id = vec![0u8; 20];
            getrandom::fill(&mut id).map_err(|e| failure(1)(&e))?;
            id
        }
    };
    let ca = match &args.ca {
        Some(p) => Some(
            std::fs::read_to_string(p).map_err(|e| usage(&format!("--ca {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let pki = crate::sim::testpki::TestPki::load(&args.test_pki)
        .map_err(|e| usage(&format!("--test-pki {}: {e}", args.test_pki.display())))?;
    let ppid = match &args.ppid {
        Some(h) => Some(
            hex::decode(h.trim_start_matches("0x"))
                .ok()
                .and_then(|v| <[u8; 16]>::try_from(v).ok())
                .ok_or_else(|| usage(&"--ppid must be 32 hex digits"))?,
        ),
        None => None,
    };
    let spec = crate::sim::testpki::GuestSpec {
        tcb: match args.tcb.as_str() {
            "out-of-date" => crate::sim::testpki::TestTcb::OutOfDate,
            _ => crate::sim::testpki::TestTcb::UpToDate,
        },
        ppid,
        ..crate::sim::client::guest_spec(app_id, &compose, instance_id)
    };
    crate::sim::client::Guest::enroll(&args.url, ca, &pki, &spec, fresh)
        .await
        .map_err(|e| failure(1)(&e))
}

/// `keywarden attest ...`
#[derive(Debug, Subcommand)]
pub enum AttestCommand {
    /// Verify a TDX quote (raw or hex), Nitro COSE document, dstack VersionedAttestation or
    /// RA-TLS certificate. Exit 0 when it verifies, 1 when rejected, 2 when the input is unusable.
    Verify(crate::attestation::cli::VerifyArgs),
}

/// `keywarden dev ...`
#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Deploy our DstackKms/DstackApp test contracts to a development node (e.g. anvil) and
    /// print their addresses and the deployment block.
    Deploy(crate::sim::cli::DeployArgs),
    /// Test attestation PKI (an Intel-like root trusted only with `insecure_test_pki`).
    #[command(name = "test-pki", subcommand)]
    TestPki(TestPkiCommand),
}

/// `keywarden dev test-pki ...`
#[derive(Debug, Subcommand)]
pub enum TestPkiCommand {
    /// Generate a test PKI (root, PCK chain, TCB info, QE identity, collateral) into a directory.
    Init(crate::sim::cli::TestPkiInitArgs),
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
    /// Trust the test attestation PKI in DIR (made by `dev test-pki init`). Tests and demos only.
    #[arg(long, value_name = "DIR")]
    pub insecure_test_pki: Option<PathBuf>,
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
    crate::tls::ensure_crypto_provider();
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
        Command::Kms(KmsCommand::Info { data_dir, json }) => {
            let overrides = Overrides {
                data_dir,
                ..Overrides::default()
            };
            let config = load(cli.config.as_deref(), &overrides)?;
            let keys = crate::kms::root::load_existing(&config.storage.data_dir, &config.kms)
                .map_err(|e| Failure {
                    code: 1,
                    message: e.to_string(),
                })?;
            let info = crate::kms::keys::BootstrapInfo::of(&keys.root).map_err(|e| Failure {
                code: 1,
                message: e.to_string(),
            })?;
            let (k256, ca, rd) = (
                hex::encode(&info.k256_pubkey),
                hex::encode(&info.ca_pubkey),
                hex::encode(info.report_data),
            );
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "k256_pubkey": k256, "ca_pubkey": ca, "bootstrap_report_data": rd })
                );
            } else {
                println!("k256_pubkey           {k256}");
                println!("ca_pubkey             {ca}");
                println!("bootstrap_report_data {rd}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Kms(KmsCommand::Onboard {
            from,
            ca,
            test_pki,
            data_dir,
        }) => {
            let overrides = Overrides {
                data_dir,
                ..Overrides::default()
            };
            let config = load(cli.config.as_deref(), &overrides)?;
            Ok(runtime()?.block_on(onboard(&config, &from, &ca, test_pki.as_deref())))
        }
        Command::Kms(KmsCommand::Client(args)) => runtime()?.block_on(async {
            let guest = enroll(&args.guest, false).await?;
            let keys = guest
                .get_app_key(
                    &args
                        .vm_config
                        .clone()
                        .unwrap_or_else(crate::sim::client::simulated_vm_config),
                )
                .await
                .map_err(|e| failure(1)(&e))?;
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&keys).map_err(|e| failure(1)(&e))?
                );
            } else {
                println!("disk_crypt_key  {}", hex::encode(&keys.disk_crypt_key));
                println!("env_crypt_key   {}", hex::encode(&keys.env_crypt_key));
                println!("k256_key        {}", hex::encode(&keys.k256_key));
                println!("k256_signature  {}", hex::encode(&keys.k256_signature));
                println!("gateway_app_id  {}", keys.gateway_app_id);
                println!("os_image_hash   {}", hex::encode(&keys.os_image_hash));
            }
            Ok(ExitCode::SUCCESS)
        }),
        Command::Demo(args) => runtime()?
            .block_on(crate::demo::run(args))
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| failure(1)(&format!("demo failed: {e:#}"))),
        Command::Loadgen(args) => runtime()?.block_on(async {
            let guest = enroll(&args.guest, args.new_connection_per_request).await?;
            let load = match args.rate {
                Some(rate) if !(rate.is_finite() && rate > 0.0) => {
                    return Err(failure(2)(&format!(
                        "--rate {rate}: must be a positive number of requests per second"
                    )));
                }
                Some(rate) => crate::sim::loadgen::Load::Open {
                    rate,
                    max_in_flight: args.concurrency,
                },
                None => crate::sim::loadgen::Load::Closed {
                    concurrency: args.concurrency,
                },
            };
            let report = crate::sim::loadgen::run(
                guest,
                load,
                std::time::Duration::from_secs(args.duration),
                args.metrics_url.clone(),
            )
            .await;
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&report).map_err(|e| failure(1)(&e))?
                );
            } else {
                print!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }),
        Command::Attest(AttestCommand::Verify(args)) => {
            Ok(crate::attestation::cli::run_verify(&args))
        }
        Command::Dev(DevCommand::TestPki(TestPkiCommand::Init(args))) => {
            Ok(crate::sim::cli::run_test_pki_init(&args))
        }
        Command::Dev(DevCommand::Deploy(args)) => {
            Ok(runtime()?.block_on(crate::sim::cli::run_deploy(args)))
        }
        Command::Governance(GovernanceCommand::Verify(args)) if args.offline => {
            Ok(crate::governance::cli::run_verify(*args))
        }
        Command::Governance(GovernanceCommand::Verify(args)) => {
            let overrides = Overrides {
                data_dir: args.data_dir.clone(),
                database_url: args.database_url.clone(),
                ..Overrides::default()
            };
            let config = load(cli.config.as_deref(), &overrides)?;
            Ok(
                runtime()?.block_on(crate::governance::cli::run_verify_online(
                    &governance_sections(&config),
                    &args,
                )),
            )
        }
        Command::Governance(GovernanceCommand::Proposals(args)) => {
            let config = load(cli.config.as_deref(), &store_overrides(&args))?;
            Ok(runtime()?.block_on(crate::governance::cli::run_proposals(
                &governance_sections(&config),
                args.json,
            )))
        }
        Command::Governance(GovernanceCommand::History(args)) => {
            let config = load(cli.config.as_deref(), &store_overrides(&args))?;
            Ok(runtime()?.block_on(crate::governance::cli::run_history(
                &config.storage,
                args.json,
            )))
        }
        Command::Governance(GovernanceCommand::Topology(args)) => {
            let config = load(cli.config.as_deref(), &store_overrides(&args))?;
            Ok(runtime()?.block_on(crate::governance::cli::run_topology(
                &config.storage,
                args.json,
            )))
        }
        Command::Cvm(CvmCommand::List(args)) => {
            let config = load(cli.config.as_deref(), &store_overrides(&args.store))?;
            Ok(runtime()?.block_on(crate::cvm::cli::run_list(
                &config.storage,
                &config.cvm,
                &args,
            )))
        }
        Command::Cluster(ClusterCommand::Status(args)) => {
            let config = load(cli.config.as_deref(), &store_overrides(&args))?;
            Ok(runtime()?.block_on(crate::cluster::cli::run_status(&config.storage, args.json)))
        }
        Command::Cvm(CvmCommand::Logs(args)) => {
            let config = load(cli.config.as_deref(), &Overrides::default())?;
            Ok(runtime()?.block_on(crate::cvm::logs::run(&config.cvm, &args)))
        }
        Command::Cvm(CvmCommand::Show { id, args }) => {
            let config = load(cli.config.as_deref(), &store_overrides(&args.store))?;
            Ok(runtime()?.block_on(crate::cvm::cli::run_show(
                &config.storage,
                &config.cvm,
                &id,
                &args,
            )))
        }
        Command::Chain(cmd) => {
            let (args, what) = match cmd {
                ChainCommand::Status(a) => (a, crate::chain::cli::Report::Status),
                ChainCommand::State(a) => (a, crate::chain::cli::Report::State),
                ChainCommand::CodeIdentity {
                    address,
                    rpc_url,
                    json,
                } => {
                    let overrides = Overrides {
                        rpc_urls: rpc_url.into_iter().collect(),
                        ..Overrides::default()
                    };
                    // Only the endpoints and the known code matter here: no KMS contract or
                    // database is needed.
                    let config = Config::load(cli.config.as_deref(), std::env::vars(), &overrides)
                        .map_err(usage)?;
                    crate::config::ConfigError::check(config.chain.endpoint_problems())
                        .map_err(usage)?;
                    return Ok(runtime()?.block_on(crate::chain::cli::run_code_identity(
                        &config.chain,
                        address,
                        json,
                    )));
                }
            };
            let config = load(cli.config.as_deref(), &store_overrides(&args))?;
            Ok(runtime()?.block_on(crate::chain::cli::run_report(
                &config.storage,
                &config.chain,
                what,
                args.json,
            )))
        }
        Command::Serve(args) => {
            let overrides = Overrides {
                api_listen: args.api_listen,
                metrics_listen: args.metrics_listen,
                admin_listen: args.admin_listen,
                data_dir: args.data_dir,
                database_url: args.database_url,
                insecure_test_pki: args.insecure_test_pki,
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
