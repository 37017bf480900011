//! The KMS RPC methods: `GetTempCaCert`, `GetMeta`, `GetAppEnvEncryptPubKey`, `GetAppKey`,
//! `GetAppBlsKey` (our addition), `GetKmsKey` and `SignCert`, over the [`KmsRpc`] state.
//!
//! Flow of a key method: [`super::gates`] (the attestation, then the `ensure_*` steps) gives the
//! authorized boot → the key is derived on the crypto workers → its record is committed by the
//! [`super::ledger::Ledger`] ([`super::audit`]) → the response. Framing, encodings and the error shape are
//! [`super::prpc`]'s; backpressure is [`super::limiter`]'s; every refusal is a
//! [`super::refusal::Refused`].
//!
//! `SignCert` ([`super::signcert`]) differs only in where the attestation comes from: the CSR
//! carries it, bound to the CSR key, and the boot-time identity is authorized. Both sources go
//! through the same gates.

use super::audit::{audit_record, not_recorded};
use super::gates::{AttestationSource, attestation_refused};
use super::keys::{AppKeys, BootstrapInfo, EnvEncryptPubKey};
use super::metrics::{Method, Refusal};
use super::proto;
use super::refusal::Refused;
use super::rpc::{KmsRpc, PeerCert};
use super::signcert::{self, SignCertError};
use crate::store::BootObservation;

impl KmsRpc {
    pub(super) fn temp_ca(&self) -> proto::GetTempCaCertResponse {
        proto::GetTempCaCertResponse {
            temp_ca_cert: self.0.keys.tmp_ca_pem.clone(),
            temp_ca_key: self.0.keys.tmp_ca_key_pem.to_string(),
            ca_cert: self.0.keys.root_ca_pem.clone(),
        }
    }

    pub(super) fn meta(&self) -> Result<proto::GetMetaResponse, Refused> {
        let info = BootstrapInfo::of(&self.0.keys.root)
            .map_err(|e| Refused::new(Refusal::Internal, e.to_string()))?;
        // With on-chain authorization upstream fills these from its auth API; ours is the mirror.
        let mirrored = self.0.chain.mirror.as_ref().map(|m| m.snapshot());
        Ok(proto::GetMetaResponse {
            ca_cert: self.0.keys.root_ca_pem.clone(),
            allow_any_upgrade: false,
            k256_pubkey: info.k256_pubkey.clone(),
            bootstrap_info: Some(proto::BootstrapResponse {
                ca_pubkey: info.ca_pubkey,
                k256_pubkey: info.k256_pubkey,
                attestation: self
                    .0
                    .self_check
                    .as_ref()
                    .map(|c| c.bootstrap_attestation().to_vec())
                    .unwrap_or_default(),
            }),
            is_dev: false,
            gateway_app_id: mirrored.as_ref().map(|m| m.kms.gateway_app_id.clone()),
            kms_contract_address: self.0.chain.kms_contract_address.clone(),
            // The configured chain id, else the one the follower found the endpoints on.
            chain_id: self.0.chain.chain_id.or_else(|| {
                let m = self.0.chain.mirror.as_ref()?;
                Some(m.status().progress().chain_id).filter(|id| *id != 0)
            }),
            app_auth_implementation: mirrored
                .and_then(|m| m.kms.app_implementation)
                .map(|a| a.to_checksum(None)),
        })
    }

    pub(super) fn env_pubkey(
        &self,
        req: &proto::AppId,
    ) -> Result<proto::PublicKeyResponse, Refused> {
        if req.app_id.len() != 20 {
            return Err(Refused::new(Refusal::BadRequest, "app_id must be 20 bytes"));
        }
        let k = EnvEncryptPubKey::derive(&self.0.keys.root, &req.app_id, crate::clock::unix_secs())
            .map_err(|e| Refused::new(Refusal::Internal, e.to_string()))?;
        Ok(proto::PublicKeyResponse {
            public_key: k.public_key.to_vec(),
            signature: k.signature.to_vec(),
            timestamp: k.timestamp,
            signature_v1: k.signature_v1.to_vec(),
        })
    }

    pub(super) async fn app_key(
        &self,
        peer: &PeerCert,
        req: proto::GetAppKeyRequest,
    ) -> Result<proto::AppKeyResponse, Refused> {
        if req.api_version > 1 {
            return Err(Refused::new(
                Refusal::Unsupported,
                format!("Unsupported API version: {}", req.api_version),
            ));
        }
        let (boot, decision) = self.authorized_boot(peer, &req.vm_config, false).await?;
        let now = crate::clock::unix_secs();
        let keys = self
            .derive(&boot, |root, boot| {
                AppKeys::derive(root, &boot.app_id, &boot.instance_id)
            })
            .await
            .map_err(|r| r.about(&boot))?;
        // No record, no keys: the boot record is what governance and CVM health rely on. It is
        // committed together with the request's audit record.
        let observation = BootObservation {
            app_id: hex::encode(&boot.app_id),
            instance_id: hex::encode(&boot.instance_id),
            at: i64::try_from(now).unwrap_or(i64::MAX),
            mr_aggregated: hex::encode(&boot.mr_aggregated),
            compose_hash: hex::encode(&boot.compose_hash),
            os_image_hash: hex::encode(&boot.os_image_hash),
            device_id: hex::encode(&boot.device_id),
        };
        let audit = audit_record(Method::GetAppKey, &boot, "ok", &serde_json::Value::Null);
        let record = self
            .0
            .ledger
            .release(observation, audit)
            .await
            .map_err(not_recorded)?;
        tracing::info!(
            boot_count = record.boot_count,
            app_id = %hex::encode(&boot.app_id),
            instance_id = %hex::encode(&boot.instance_id),
            compose_hash = %hex::encode(&boot.compose_hash),
            "key dispatched"
        );
        Ok(proto::AppKeyResponse {
            ca_cert: self.0.keys.root_ca_pem.clone(),
            disk_crypt_key: keys.disk_crypt_key.to_vec(),
            env_crypt_key: keys.env_crypt_key.to_vec(),
            k256_key: keys.k256_key.to_vec(),
            k256_signature: keys.k256_signature.to_vec(),
            tproxy_app_id: decision.gateway_app_id.clone(),
            gateway_app_id: decision.gateway_app_id,
            os_image_hash: boot.os_image_hash.clone(),
        })
    }

    /// Runs a key derivation for `boot` on the crypto workers.
    async fn derive<K: Send + 'static>(
        &self,
        boot: &crate::attestation::BootInfo,
        derivation: fn(
            &super::keys::RootKeys,
            &crate::attestation::BootInfo,
        ) -> Result<K, super::KmsError>,
    ) -> Result<K, Refused> {
        let (rpc, boot) = (self.clone(), boot.clone());
        self.offload(move || derivation(&rpc.0.keys.root, &boot))
            .await?
            .map_err(|e| Refused::new(Refusal::Internal, e.to_string()))
    }

    /// `GetAppBlsKey` (our addition): the app's BLS12-381 key (EIP-2333, EIP-2334 signing path)
    /// and the root k256 signature over its public key.
    pub(super) async fn app_bls_key(
        &self,
        peer: &PeerCert,
        req: proto::GetAppKeyRequest,
    ) -> Result<proto::AppBlsKeyResponse, Refused> {
        let (boot, _) = self.authorized_boot(peer, &req.vm_config, false).await?;
        let key = self
            .derive(&boot, |root, boot| {
                super::keys::AppBlsKey::derive(root, &boot.app_id)
            })
            .await
            .map_err(|r| r.about(&boot))?;
        self.audit_release(Method::GetAppBlsKey, &boot).await?;
        tracing::info!(app_id = %hex::encode(&boot.app_id), kind = "bls", "key dispatched");
        Ok(proto::AppBlsKeyResponse {
            secret_key: key.secret_key.to_vec(),
            public_key: key.public_key.to_vec(),
            k256_signature: key.k256_signature.to_vec(),
        })
    }

    /// `GetKmsKey`: the root keys, for a KMS replica. Off unless `kms.allow_kms_replication`;
    /// then only for an attested caller that the KMS policy (`isKmsAllowed`) admits.
    pub(super) async fn kms_key(
        &self,
        peer: &PeerCert,
        req: proto::GetKmsKeyRequest,
    ) -> Result<proto::KmsKeyResponse, Refused> {
        if !self.0.allow_kms_replication {
            return Err(Refused::new(
                Refusal::Unsupported,
                "KMS key replication is disabled (kms.allow_kms_replication)",
            ));
        }
        let (boot, _) = self.authorized_boot(peer, &req.vm_config, true).await?;
        self.audit_release(Method::GetKmsKey, &boot).await?;
        tracing::warn!(app_id = %hex::encode(&boot.app_id), "root keys released to a KMS replica");
        Ok(proto::KmsKeyResponse {
            temp_ca_key: self.0.keys.tmp_ca_key_pem.to_string(),
            keys: vec![proto::KmsKeys {
                ca_key: self.0.keys.root_ca_key.serialize_pem(),
                k256_key: self.0.keys.root.k256.to_bytes().to_vec(),
            }],
        })
    }

    /// `SignCert`: the CSR checked (encoding, signature by its key, confirm word), its
    /// attestation verified with report data bound to the CSR key, the boot-time identity
    /// through [`KmsRpc::gates`], then a leaf under the app CA: `[leaf, app CA, root CA]`.
    pub(super) async fn sign_cert(
        &self,
        req: proto::SignCertRequest,
    ) -> Result<proto::SignCertResponse, Refused> {
        let csr = signcert::check_request(req.api_version, &req.csr, &req.signature)
            .map_err(|e| csr_refused(&e))?;
        let attestation = csr.attestation();
        let verified = self
            .verified(
                AttestationSource::Bound {
                    attestation: &attestation,
                    spki: &csr.pubkey,
                },
                &req.vm_config,
            )
            .await
            .map_err(Refused::attested)?;
        // After boot the app may extend RTMR3: authorize what was measured at boot.
        let (boot, _) = self
            .gates(&verified.evidence, verified.boot_time.clone(), false)
            .await?;
        // Verification succeeded, so the attestation parsed.
        let attestation = attestation.map_err(|e| attestation_refused(&e).about(&boot))?;
        let issued = signcert::AppCa::derive(&self.0.keys, &boot.app_id).and_then(|ca| {
            let leaf = ca.sign_leaf(
                &csr,
                &attestation,
                &verified.boot_info,
                &boot.app_id,
                crate::clock::unix_secs(),
            )?;
            Ok((leaf, ca.cert_pem))
        });
        let (leaf, app_ca) = issued.map_err(|e| csr_refused(&e).about(&boot))?;
        self.audit_release(Method::SignCert, &boot).await?;
        tracing::info!(
            app_id = %hex::encode(&boot.app_id),
            instance_id = %hex::encode(&boot.instance_id),
            subject = %csr.config.subject,
            csr_version = csr.version().api(),
            "certificate signed"
        );
        Ok(proto::SignCertResponse {
            certificate_chain: vec![leaf, app_ca, self.0.keys.root_ca_pem.clone()],
        })
    }
}

/// The refusal of a CSR that cannot be served.
fn csr_refused(e: &SignCertError) -> Refused {
    let reason = match e {
        SignCertError::UnsupportedVersion(_) => Refusal::Unsupported,
        SignCertError::BadSignature => Refusal::CsrSignatureInvalid,
        SignCertError::AppCa(_) => Refusal::Internal,
        _ => Refusal::BadCsr,
    };
    Refused::new(reason, e.to_string())
}
