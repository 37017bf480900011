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
    /// Also write the deployment as a shell-sourceable environment file for `keywarden serve`
    /// (`KEYWARDEN_CHAIN__RPC_URLS`, `KEYWARDEN_CHAIN__KMS_CONTRACT`,
    /// `KEYWARDEN_CHAIN__START_BLOCK`, and with --allow-test-kms `KEYWARDEN_KMS__OS_IMAGES`), for
    /// stacks whose services start after the deployment.
    #[arg(long, value_name = "FILE")]
    pub env_file: Option<PathBuf>,
    /// Allow on the deployed DstackKms the simulated KMS guest of the test PKI in DIR (its OS
    /// image, aggregated MR and device), so that replicas attesting with that PKI
    /// (`kms onboard --test-pki DIR`) pass `isKmsAllowed`. Test stacks only.
    #[arg(long, value_name = "DIR")]
    pub allow_test_kms: Option<PathBuf>,
}

/// The environment file `dev deploy --env-file` writes; with the simulated KMS allowed, also the
/// `kms.os_images` entry that admits its (and simulated guests') OS image.
fn env_file(rpc: &url::Url, deployment: &super::deploy::Deployment, test_kms: bool) -> String {
    let mut out = format!(
        "# Written by `keywarden dev deploy`: source it (set -a; . FILE) before `keywarden serve`.\n\
         KEYWARDEN_CHAIN__RPC_URLS='[\"{rpc}\"]'\n\
         KEYWARDEN_CHAIN__KMS_CONTRACT={}\n\
         KEYWARDEN_CHAIN__START_BLOCK={}\n",
        deployment.kms, deployment.block
    );
    if test_kms {
        let images = crate::kms::osimage::env_value(&[super::client::simulated_os_image()]);
        out.push_str(&format!("KEYWARDEN_KMS__OS_IMAGES='{images}'\n"));
    }
    out
}

/// Deploys, then does what `args` asks beyond it: the deployment or the error.
async fn deploy(args: &DeployArgs) -> Result<super::deploy::Deployment, String> {
    // The PKI is read before anything is sent, so that a wrong directory costs no transaction.
    let kms_guest = match &args.allow_test_kms {
        Some(dir) => Some(super::kms::SimulatedKms::new(
            TestPki::load(dir).map_err(|e| format!("test PKI {}: {e}", dir.display()))?,
        )),
        None => None,
    };
    let deployment = super::deploy::deploy(&args.rpc)
        .await
        .map_err(|e| format!("deployment via {} failed: {e}", args.rpc))?;
    let test_kms = kms_guest.is_some();
    if let Some(guest) = kms_guest {
        let measured = guest
            .measurements(crate::clock::unix_secs())
            .map_err(|e| format!("the test PKI's simulated KMS: {e}"))?;
        super::deploy::allow_kms(&args.rpc, deployment.kms, measured)
            .await
            .map_err(|e| format!("allowing the test PKI's simulated KMS failed: {e}"))?;
    }
    if let Some(file) = &args.env_file {
        std::fs::write(file, env_file(&args.rpc, &deployment, test_kms))
            .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    }
    Ok(deployment)
}

/// Runs `dev deploy`: prints the deployment on stdout, or the error on stderr and fails.
pub async fn run_deploy(args: DeployArgs) -> ExitCode {
    let deployment = match deploy(&args).await {
        Ok(deployment) => deployment,
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            return ExitCode::FAILURE;
        }
    };
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
