//! The gates of the key path, in order: the attestation (parsed, verified on the crypto workers
//! with collateral, bound to the certificate or CSR key, TCB policy applied), then small
//! `ensure_*` steps on the verified boot: field sizes, the KMS's own admission (self-check), the
//! registered root key, the OS image binding, not a canary, and the authorizer. Each step returns
//! a typed [`Refused`] naming the boot for its audit record.

use super::authz::AuthDecision;
use super::metrics::Refusal;
use super::refusal::Refused;
use super::rpc::{KmsRpc, PeerCert};
use crate::attestation::ratls::report_data_for_spki;
use crate::attestation::{AttestationError, Platform};

impl KmsRpc {
    /// When the chain registers a KMS root key (`KmsInfoSet`), it must be ours: a key set that
    /// decodes but is not the registered one would hand every app other keys than the rest of
    /// the KMS fleet does.
    fn ensure_registered_key(&self) -> Result<(), Refused> {
        let Some(mirror) = &self.0.chain.mirror else {
            return Ok(());
        };
        let registered = mirror.snapshot().kms.k256_pubkey.clone();
        if registered.is_empty() {
            return Ok(());
        }
        let ours = self.0.keys.root.k256.verifying_key();
        let same =
            k256::ecdsa::VerifyingKey::from_sec1_bytes(&registered).is_ok_and(|k| k == *ours);
        let flag = &self.0.key_mismatch;
        if same {
            if flag.swap(false, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!("this KMS's root k256 key is the one registered on-chain again");
            }
            return Ok(());
        }
        if !flag.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::error!(
                registered = %hex::encode(&registered),
                ours = %hex::encode(ours.to_sec1_bytes()),
                "this KMS's root k256 key is not the one registered on-chain: no keys are released"
            );
        }
        Err(Refused::new(
            Refusal::KmsNotAllowed,
            "KMS is not allowed: its root k256 key is not the one registered on-chain (kmsInfo.k256Pubkey); onboard it from the registered KMS or register its key",
        ))
    }

    /// The key methods' path: the attested client certificate of the connection, verified,
    /// then [`KmsRpc::gates`] on the identity its quote measures.
    pub(super) async fn authorized_boot(
        &self,
        peer: &PeerCert,
        vm_config: &str,
        is_kms: bool,
    ) -> Result<(crate::attestation::BootInfo, AuthDecision), Refused> {
        let Some(der) = &peer.0 else {
            return Err(Refused::new(Refusal::NoAttestation, "No attestation provided").attested());
        };
        let verified = self
            .verified(AttestationSource::ClientCert(der), vm_config)
            .await
            .map_err(Refused::attested)?;
        self.gates(&verified.evidence, verified.boot_info, is_kms)
            .await
    }

    /// Verifies the attestation from `source` against the OS image `vm_config` claims.
    pub(super) async fn verified(
        &self,
        source: AttestationSource<'_>,
        vm_config: &str,
    ) -> Result<crate::attestation::Verified, Refused> {
        let os_image_hash = crate::attestation::identity::os_image_hash_from_config(vm_config)
            .map_err(|e| Refused::new(Refusal::BadRequest, format!("malformed vm_config: {e}")))?
            .map(|h| h.to_vec());
        self.verify(source, crate::clock::unix_secs(), os_image_hash)
            .await
    }

    /// The gates every key-releasing method shares, whatever carried the attestation: the OS
    /// image binding, not a canary, authorized by the backend. Refusals are logged and counted,
    /// and name the boot for their audit record.
    pub(super) async fn gates(
        &self,
        evidence: &crate::attestation::Evidence,
        boot: crate::attestation::BootInfo,
        is_kms: bool,
    ) -> Result<(crate::attestation::BootInfo, AuthDecision), Refused> {
        match self.gate_steps(evidence, &boot, is_kms).await {
            Ok(decision) => Ok((boot, decision)),
            Err(refused) => Err(refused.about(&boot)),
        }
    }

    /// The steps after the attestation, in order; the first refusal ends the request.
    async fn gate_steps(
        &self,
        evidence: &crate::attestation::Evidence,
        boot: &crate::attestation::BootInfo,
        is_kms: bool,
    ) -> Result<AuthDecision, Refused> {
        ensure_field_sizes(boot)?;
        self.ensure_self_admitted().await?;
        self.ensure_registered_key()?;
        self.ensure_os_image(evidence, boot)?;
        self.ensure_not_canary(boot)?;
        self.ensure_authorized(boot, is_kms).await
    }

    /// The KMS itself passes `isKmsAllowed` (when it runs attested).
    async fn ensure_self_admitted(&self) -> Result<(), Refused> {
        match &self.0.self_check {
            Some(check) => check.gate().await,
            None => Ok(()),
        }
    }

    /// The OS image the host claims is the one the TDX quote measured.
    fn ensure_os_image(
        &self,
        evidence: &crate::attestation::Evidence,
        boot: &crate::attestation::BootInfo,
    ) -> Result<(), Refused> {
        let crate::attestation::Evidence::Tdx { td, .. } = evidence else {
            return Ok(());
        };
        self.0
            .os_images
            .check_tdx(&boot.os_image_hash, &td.mr_td, &td.rtmr)
            .map_err(|e| {
                tracing::warn!(reason = "os_image_rejected", error = %e, "measurement not authorized");
                Refused::new(Refusal::OsImageRejected, format!("App not allowed: {e}"))
            })
    }

    /// The app is not a canary (a request from one is a security incident).
    fn ensure_not_canary(&self, boot: &crate::attestation::BootInfo) -> Result<(), Refused> {
        if !self.0.canaries.contains(&boot.app_id) {
            return Ok(());
        }
        self.0.metrics.canary();
        tracing::error!(
            app_id = %hex::encode(&boot.app_id),
            instance_id = %hex::encode(&boot.instance_id),
            "canary app id requested keys: security incident"
        );
        Err(Refused::new(
            Refusal::Canary,
            "App not allowed: Boot denied",
        ))
    }

    /// The authorizer allows the boot (as an app, or as a KMS for `GetKmsKey`).
    async fn ensure_authorized(
        &self,
        boot: &crate::attestation::BootInfo,
        is_kms: bool,
    ) -> Result<AuthDecision, Refused> {
        let decision = self
            .0
            .authorizer
            .authorize(boot, is_kms)
            .await
            .map_err(|e| {
                let reason = e.refusal();
                tracing::warn!(reason = reason.as_str(), error = %e, "measurement not authorized");
                Refused::new(reason, format!("App not allowed: {e}"))
            })?;
        if decision.allowed {
            return Ok(decision);
        }
        tracing::warn!(
            reason = %decision.reason,
            app_id = %hex::encode(&boot.app_id),
            compose_hash = %hex::encode(&boot.compose_hash),
            mr_aggregated = %hex::encode(&boot.mr_aggregated),
            "measurement not authorized"
        );
        Err(Refused::new(
            Refusal::NotAuthorized,
            format!("App not allowed: Boot denied: {}", decision.reason),
        ))
    }

    /// Verifies an attestation from `source`, recording the attestation metrics and the
    /// `attestation verification failed` line on refusal. The signature checks run on the
    /// crypto workers ([`Workers`]).
    async fn verify(
        &self,
        source: AttestationSource<'_>,
        now: u64,
        os_image_hash: Option<Vec<u8>>,
    ) -> Result<crate::attestation::Verified, Refused> {
        // Parsed once here; the worker only verifies. A certificate's attestation must bind the
        // certificate's key, a carried one the key it names.
        let parsed = match &source {
            AttestationSource::ClientCert(der) => crate::attestation::ratls::parse_cert(der)
                .and_then(|cert| {
                    Ok((cert.attestation()?, cert.expected_report_data(), Some(cert)))
                }),
            AttestationSource::Bound { attestation, spki } => (*attestation)
                .clone()
                .map(|att| (att, report_data_for_spki(spki), None)),
        };
        let tee = parsed
            .as_ref()
            .map_or(crate::attestation::TeeLabel::tdx, |(att, ..)| {
                crate::attestation::tee_of(att)
            });
        let (att, report_data, cert) = parsed.map_err(|e| self.attestation_failed(tee, e))?;
        if let Some(cert) = cert {
            cert.check_valid_at(now)
                .map_err(|e| self.attestation_failed(tee, e))?;
        }
        let collateral = match &att.platform {
            Platform::Tdx { quote, .. } => {
                // Only what the quote proves on its own earns an outbound PCCS request.
                let check = async {
                    let (rpc, quote) = (self.clone(), quote.clone());
                    self.offload(move || rpc.0.verifier.preverify_quote(&quote, now))
                        .await
                        .map_err(Before::Service)?
                        .map_err(Before::Attestation)
                };
                match self.0.collateral.for_quote(quote, now, check).await {
                    Ok(c) => Some(c),
                    Err(Before::Attestation(e)) => return Err(self.attestation_failed(tee, e)),
                    Err(Before::Service(refused)) => return Err(refused),
                }
            }
            Platform::NitroEnclave { .. } => None,
        };
        let rpc = self.clone();
        let result = self
            .offload(move || {
                rpc.0.verifier.verify_attestation(
                    &att,
                    &crate::attestation::VerifyRequest {
                        now,
                        expected_report_data: Some(&report_data),
                        collateral: collateral.as_ref(),
                        os_image_hash: os_image_hash.as_deref(),
                    },
                )
            })
            .await?;
        match result {
            Ok(v) => {
                self.0.attestation_metrics.record_verification(tee, Ok(()));
                Ok(v)
            }
            Err(e) => Err(self.attestation_failed(tee, e)),
        }
    }

    /// Counts a failed verification and turns it into the caller's refusal.
    fn attestation_failed(
        &self,
        tee: crate::attestation::TeeLabel,
        e: AttestationError,
    ) -> Refused {
        self.0
            .attestation_metrics
            .record_verification(tee, Err(e.reason));
        attestation_refused(&e)
    }
}

/// Every fixed-size field of the boot info has its size.
fn ensure_field_sizes(boot: &crate::attestation::BootInfo) -> Result<(), Refused> {
    boot.check_sizes().map_err(|e| {
        tracing::warn!(reason = "bad_request", error = %e, "malformed boot info");
        Refused::new(Refusal::BadRequest, format!("malformed boot info: {e}"))
    })
}

/// Where a request's attestation comes from; the gates after it are the same.
pub(super) enum AttestationSource<'a> {
    /// The connection's RA-TLS client certificate (DER): its attestation must bind its key.
    ClientCert(&'a [u8]),
    /// An attestation carried in the request (SignCert's CSR), which must bind `spki`.
    Bound {
        /// The attestation, or why it does not parse.
        attestation: &'a Result<crate::attestation::Attestation, AttestationError>,
        /// SubjectPublicKeyInfo DER of the key it must bind.
        spki: &'a [u8],
    },
}

pub(super) fn attestation_refused(e: &AttestationError) -> Refused {
    Refused::new(
        Refusal::AttestationRejected,
        format!("attestation verification failed: {}", e.caller_message()),
    )
}

/// Why a quote got no collateral: the attestation's fault (a counted verification failure), or
/// the service's.
enum Before {
    Attestation(AttestationError),
    Service(Refused),
}

impl From<AttestationError> for Before {
    fn from(e: AttestationError) -> Self {
        Self::Attestation(e)
    }
}
