//! The `dev` commands that create simulation material: `dev test-pki init` (a test attestation
//! PKI) and `dev deploy` (our test contracts on a development node, printed where they are).

use std::path::PathBuf;
use std::process::ExitCode;

use super::testpki::TestPki;

/// `dev test-pki init`: generate a test attestation PKI into a directory.
#[derive(Debug, Clone, clap::Args)]
pub struct TestPkiInitArgs {
    /// Output directory (created if missing).
    pub dir: PathBuf,
    /// Overwrite an existing PKI in the directory.
    #[arg(long)]
    pub force: bool,
}

/// `dev test-pki init`: generates a test PKI into `args.dir`.
pub fn run_test_pki_init(args: &TestPkiInitArgs) -> ExitCode {
    if !args.force && args.dir.join(super::testpki::ROOT_CERT_DER).exists() {
        eprintln!(
            "{} already holds a test PKI (use --force to replace it)",
            args.dir.display()
        );
        return ExitCode::from(2);
    }
    match TestPki::generate(crate::clock::unix_secs()).and_then(|pki| pki.save(&args.dir)) {
        Ok(()) => {
            println!(
                "test attestation PKI written to {} (trust it only with attestation.insecure_test_pki)",
                args.dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("test PKI generation failed: {e}");
            ExitCode::from(1)
        }
    }
}

/// Arguments of `dev deploy`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeployArgs {
    /// JSON-RPC URL of a development node with an unlocked first account (e.g. anvil).
    #[arg(long, value_name = "URL")]
    pub rpc: url::Url,
    /// Print one JSON object `{"kms", "app_implementation", "app", "block"}` instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `dev deploy`: prints the deployment on stdout, or the error on stderr and fails.
pub async fn run_deploy(args: DeployArgs) -> ExitCode {
    match super::deploy::deploy(&args.rpc).await {
        Ok(deployment) => {
            if args.json {
                match serde_json::to_string(&deployment) {
                    Ok(line) => println!("{line}"),
                    Err(e) => {
                        eprintln!("keywarden: error: cannot encode the deployment as JSON: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                println!("{deployment}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keywarden: error: deployment via {} failed: {e}", args.rpc);
            ExitCode::FAILURE
        }
    }
}
