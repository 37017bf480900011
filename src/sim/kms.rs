//! The simulated KMS guest (`kms.insecure_self_attest_with_test_pki`): the KMS attests itself
//! with quotes of the test PKI, as a guest with app id zero, no instance id, running the
//! simulated OS image.

use alloy::primitives::B256;
use futures::FutureExt as _;

use crate::attestation::{AttestationConfig, Verifier, VerifyRequest, versioned};
use crate::kms::selfcheck::{AttestationSource, Attested, SelfCheckError};

use super::client::{SIMULATED_OS_IMAGE_HASH, guest_spec};
use super::deploy::KmsMeasurements;
use super::testpki::{GuestSpec, TestPki};

/// The compose file of the simulated KMS guest (its compose hash is the sha256 of this).
const SIMULATED_KMS_COMPOSE: &[u8] = br#"{"name":"keywarden-kms"}"#;

/// A simulated KMS guest of a test PKI.
pub struct SimulatedKms {
    pki: TestPki,
    guest: GuestSpec,
}

impl SimulatedKms {
    /// The simulated KMS guest of `pki`.
    pub fn new(pki: TestPki) -> Self {
        Self {
            pki,
            guest: guest_spec([0; 20], SIMULATED_KMS_COMPOSE, Vec::new()),
        }
    }

    /// What `isKmsAllowed` is asked about it (OS image, aggregated MR, device), read from an
    /// attestation of its own as our verifier reads it, for registering it on chain.
    pub fn measurements(&self, now: u64) -> Result<KmsMeasurements, SelfCheckError> {
        let attestation = self
            .pki
            .dstack_attestation(&self.guest, &[0; 64])
            .map_err(SelfCheckError::Source)?;
        let parsed = versioned::parse(&attestation).map_err(SelfCheckError::Verify)?;
        let verifier = Verifier::with_test_root(
            AttestationConfig::default(),
            Some(self.pki.root_der().to_vec()),
        )
        .map_err(SelfCheckError::Verify)?;
        let request = VerifyRequest {
            now,
            expected_report_data: Some(&[0; 64]),
            collateral: Some(self.pki.collateral()),
            os_image_hash: Some(&SIMULATED_OS_IMAGE_HASH),
        };
        let boot = verifier
            .verify_attestation(&parsed, &request)
            .map_err(SelfCheckError::Verify)?
            .boot_info;
        let word = |what: &str, bytes: &[u8]| {
            B256::try_from(bytes).map_err(|_| {
                SelfCheckError::Unavailable(format!("its {what} is {} bytes, not 32", bytes.len()))
            })
        };
        Ok(KmsMeasurements {
            os_image: word("OS image hash", &boot.os_image_hash)?,
            mr_aggregated: word("aggregated MR", &boot.mr_aggregated)?,
            device: word("device id", &boot.device_id)?,
        })
    }
}

impl AttestationSource for SimulatedKms {
    fn attest(&self, report_data: &[u8; 64]) -> Attested<'_> {
        let attested = self
            .pki
            .dstack_attestation(&self.guest, report_data)
            .map_err(SelfCheckError::Source);
        async move { attested }.boxed()
    }

    fn os_image_hash(&self) -> Vec<u8> {
        SIMULATED_OS_IMAGE_HASH.to_vec()
    }

    fn vm_config(&self) -> String {
        super::client::simulated_vm_config()
    }
}
