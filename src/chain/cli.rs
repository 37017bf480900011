//! `keywarden dev deploy`: deploys the test contracts to a development node and prints where.

use std::process::ExitCode;

use url::Url;

/// Arguments of `dev deploy`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeployArgs {
    /// JSON-RPC URL of a development node with an unlocked first account (e.g. anvil).
    #[arg(long, value_name = "URL")]
    pub rpc: Url,
    /// Print one JSON object `{"kms", "app_implementation", "app", "block"}` instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `dev deploy`: prints the deployment on stdout, or the error on stderr and fails.
pub async fn run_deploy(args: DeployArgs) -> ExitCode {
    match super::deploy(&args.rpc).await {
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
