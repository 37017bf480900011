//! The one bridge from production code to a test attestation PKI: what the verifier reads from
//! the directory `attestation.insecure_test_pki` names (its root certificate, trusted as an
//! additional Intel root, and the collateral it signed for the test platform). Issuing quotes
//! and certificates under that PKI is simulation (`sim::testpki`), which production never
//! imports.

use std::path::Path;

use dcap_qvl::QuoteCollateralV3;

use super::reason::{Result, reject};

/// File name of the root certificate (DER) in a saved test PKI.
pub const ROOT_CERT_DER: &str = "root_ca.der";
/// File name of the test platform's collateral (JSON) in a saved test PKI.
pub const COLLATERAL: &str = "collateral.json";
/// FMSPC of the test platform (`KWT` ‖ 00 00 01): recognisable, and no Intel FMSPC.
pub const TEST_FMSPC: [u8; 6] = [0x4b, 0x57, 0x54, 0x00, 0x00, 0x01];

fn read(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(|e| reject!(ConfigInvalid, "{}: {e}", path.display()))
}

/// The root certificate of the test PKI saved in `dir` (what the verifier trusts).
pub fn load_root_der(dir: &Path) -> Result<Vec<u8>> {
    read(dir, ROOT_CERT_DER)
}

/// The collateral the test PKI in `dir` signed for [`TEST_FMSPC`].
pub fn load_collateral(dir: &Path) -> Result<QuoteCollateralV3> {
    serde_json::from_slice(&read(dir, COLLATERAL)?)
        .map_err(|e| reject!(ConfigInvalid, "{COLLATERAL}: {e}"))
}
