//! The simulated KMS guest (`kms.insecure_self_attest_with_test_pki`): the KMS attests itself
//! with quotes of the test PKI, as a guest with app id zero, no instance id, running the
//! simulated OS image.

use futures::FutureExt as _;

use crate::kms::selfcheck::{AttestationSource, Attested, SelfCheckError};

use super::client::{SIMULATED_OS_IMAGE_HASH, guest_spec};
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
