//! The KMS RPC methods and their pRPC transport (`/prpc/KMS.<Method>`, JSON or protobuf).
//!
//! Flow of `GetAppKey`: the client certificate of the TLS connection (an RA-TLS certificate),
//! parsed and checked for its validity window → its attestation verified against the report data
//! the certificate key requires ([`crate::attestation::Verifier::verify_attestation`], on the
//! crypto workers) with collateral for its quote → `BootInfo` → [`Authorizer`] →
//! [`AppKeys::derive`] → boot record in the [`Ledger`] → response; each step's refusal has a [`Refusal`]
//! reason used in the error body, the `dstack_kms_requests_total` label and the log line.
//!
//! `SignCert` ([`super::signcert`]) differs only in where the attestation comes from: the CSR
//! carries it, bound to the CSR key, and the boot-time identity is authorized. Both sources go
//! through the same gates (OS image binding, canary, authorizer).

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument as _;

use super::authz::{AuthDecision, Authorizer};
use super::keys::{AppKeys, BootstrapInfo, EnvEncryptPubKey};
use super::ledger::Ledger;
use super::metrics::{KmsMetrics, Method, Outcome, Refusal};
use super::proto;
use super::refusal::{Refused, Subject};
use super::root::KmsKeys;
use super::signcert::{self, SignCertError};
use super::workers::Workers;
use crate::attestation::collateral::CollateralSource;
use crate::attestation::ratls::report_data_for_spki;
use crate::attestation::{AttestationError, AttestationMetrics, Platform, Verifier};
use crate::store::BootObservation;

/// The peer's client certificate (DER), attached to each request of a TLS connection.
#[derive(Debug, Clone, Default)]
pub struct PeerCert(pub Option<Arc<Vec<u8>>>);

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

/// What `GetMeta` reports about the chain side.
#[derive(Debug, Clone, Default)]
pub struct ChainMeta {
    /// DstackKms address.
    pub kms_contract_address: Option<String>,
    /// Chain id.
    pub chain_id: Option<u64>,
    /// The mirror, whose `kmsInfo.k256Pubkey` (when registered) must be this KMS's root key.
    pub mirror: Option<Arc<crate::chain::Mirror>>,
}

/// The KMS RPC state. Cheap to clone.
#[derive(Clone)]
pub struct KmsRpc(Arc<Inner>);

struct Inner {
    os_images: super::osimage::OsImagePolicy,
    allow_kms_replication: bool,
    limiter: Limiter,
    canaries: Vec<Vec<u8>>,
    keys: KmsKeys,
    verifier: Verifier,
    collateral: CollateralSource,
    authorizer: Arc<dyn Authorizer>,
    metrics: KmsMetrics,
    attestation_metrics: AttestationMetrics,
    ledger: Ledger,
    workers: Workers,
    chain: ChainMeta,
    self_check: Option<super::selfcheck::SelfCheck>,
    /// Whether the registered k256 key differs from ours (one log line per change).
    key_mismatch: std::sync::atomic::AtomicBool,
}

/// Everything the KMS RPC needs.
pub struct KmsRpcParts {
    /// Root keys and certificates.
    pub keys: KmsKeys,
    /// Attestation verifier.
    pub verifier: Verifier,
    /// Collateral source.
    pub collateral: CollateralSource,
    /// Authorization backend.
    pub authorizer: Arc<dyn Authorizer>,
    /// KMS metrics.
    pub metrics: KmsMetrics,
    /// Attestation metrics.
    pub attestation_metrics: AttestationMetrics,
    /// Boot and audit records.
    pub ledger: Ledger,
    /// Where verification and derivation run.
    pub workers: Workers,
    /// Chain facts for GetMeta.
    pub chain: ChainMeta,
    /// Requests processed at once.
    pub max_concurrent: usize,
    /// Requests allowed to wait.
    pub max_queued: usize,
    /// App ids that must never receive keys (20 bytes each).
    pub canaries: Vec<Vec<u8>>,
    /// Whether GetKmsKey may hand out the root keys.
    pub allow_kms_replication: bool,
    /// Expected measurements of OS images.
    pub os_images: super::osimage::OsImagePolicy,
    /// The KMS's own admission, when it runs attested.
    pub self_check: Option<super::selfcheck::SelfCheck>,
}

/// Bounds the work in progress: `max_concurrent` requests run, up to `max_queued` wait, the rest
/// are refused at once (so an overload answers fast instead of piling up).
struct Limiter {
    slots: Arc<tokio::sync::Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
    max_queued: usize,
}

impl Limiter {
    async fn enter(
        &self,
        metrics: &KmsMetrics,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Refused> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        use std::sync::atomic::Ordering;
        let queued = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _leave = scopeguard_dec(&self.waiting);
        if queued >= self.max_queued {
            metrics.queue_rejected();
            return Err(Refused::new(
                Refusal::Overloaded,
                "KMS overloaded; retry later",
            ));
        }
        let _depth = metrics.queued();
        self.slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Refused::new(Refusal::Internal, "KMS is shutting down"))
    }
}

/// Decrements the counter when dropped.
fn scopeguard_dec(counter: &std::sync::atomic::AtomicUsize) -> impl Drop + '_ {
    struct Dec<'a>(&'a std::sync::atomic::AtomicUsize);
    impl Drop for Dec<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
    Dec(counter)
}

impl KmsRpc {
    /// Assembles the RPC state.
    pub fn new(p: KmsRpcParts) -> Self {
        p.metrics.set_concurrency_limit(p.max_concurrent);
        Self(Arc::new(Inner {
            limiter: Limiter {
                slots: Arc::new(tokio::sync::Semaphore::new(p.max_concurrent)),
                waiting: std::sync::atomic::AtomicUsize::new(0),
                max_queued: p.max_queued,
            },
            canaries: p.canaries,
            allow_kms_replication: p.allow_kms_replication,
            os_images: p.os_images,
            keys: p.keys,
            verifier: p.verifier,
            collateral: p.collateral,
            authorizer: p.authorizer,
            metrics: p.metrics,
            attestation_metrics: p.attestation_metrics,
            ledger: p.ledger,
            workers: p.workers,
            chain: p.chain,
            self_check: p.self_check,
            key_mismatch: std::sync::atomic::AtomicBool::new(false),
        }))
    }

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

    /// The root key material.
    pub fn keys(&self) -> &KmsKeys {
        &self.0.keys
    }

    /// The routes of the KMS listener: `/health` and `/prpc/{method}`. Anything else is
    /// answered in the pRPC error shape too.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/health", get(|| async { "OK" }))
            .route("/prpc/{method}", get(prpc).post(prpc))
            .fallback(|uri: axum::http::Uri| async move {
                prpc_error(
                    StatusCode::NOT_FOUND,
                    format!("Not found: {}", shown(uri.path())),
                )
            })
            .method_not_allowed_fallback(|method: axum::http::Method| async move {
                prpc_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("Method not allowed: {}", shown(method.as_str())),
                )
            })
            .with_state(self.clone())
    }

    fn temp_ca(&self) -> proto::GetTempCaCertResponse {
        proto::GetTempCaCertResponse {
            temp_ca_cert: self.0.keys.tmp_ca_pem.clone(),
            temp_ca_key: self.0.keys.tmp_ca_key_pem.to_string(),
            ca_cert: self.0.keys.root_ca_pem.clone(),
        }
    }

    fn meta(&self) -> Result<proto::GetMetaResponse, Refused> {
        let info = BootstrapInfo::of(&self.0.keys.root)
            .map_err(|e| Refused::new(Refusal::Internal, e.to_string()))?;
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
            gateway_app_id: None,
            kms_contract_address: self.0.chain.kms_contract_address.clone(),
            chain_id: self.0.chain.chain_id,
            app_auth_implementation: None,
        })
    }

    fn env_pubkey(&self, req: &proto::AppId) -> Result<proto::PublicKeyResponse, Refused> {
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

    /// The key methods' path: the attested client certificate of the connection, verified,
    /// then [`KmsRpc::gates`] on the identity its quote measures.
    async fn authorized_boot(
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
    async fn verified(
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
    async fn gates(
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

    async fn gate_steps(
        &self,
        evidence: &crate::attestation::Evidence,
        boot: &crate::attestation::BootInfo,
        is_kms: bool,
    ) -> Result<AuthDecision, Refused> {
        if let Err(e) = boot.check_sizes() {
            tracing::warn!(reason = "bad_request", error = %e, "malformed boot info");
            return Err(Refused::new(
                Refusal::BadRequest,
                format!("malformed boot info: {e}"),
            ));
        }
        if let Some(check) = &self.0.self_check {
            check.gate().await?;
        }
        self.ensure_registered_key()?;
        if let crate::attestation::Evidence::Tdx { td, .. } = evidence
            && let Err(e) = self
                .0
                .os_images
                .check_tdx(&boot.os_image_hash, &td.mr_td, &td.rtmr)
        {
            tracing::warn!(reason = "os_image_rejected", error = %e, "measurement not authorized");
            return Err(Refused::new(
                Refusal::OsImageRejected,
                format!("App not allowed: {e}"),
            ));
        }
        if self.0.canaries.contains(&boot.app_id) {
            self.0.metrics.canary();
            tracing::error!(
                app_id = %hex::encode(&boot.app_id),
                instance_id = %hex::encode(&boot.instance_id),
                "canary app id requested keys: security incident"
            );
            return Err(Refused::new(
                Refusal::Canary,
                "App not allowed: Boot denied",
            ));
        }
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
        if !decision.allowed {
            tracing::warn!(
                reason = %decision.reason,
                app_id = %hex::encode(&boot.app_id),
                compose_hash = %hex::encode(&boot.compose_hash),
                mr_aggregated = %hex::encode(&boot.mr_aggregated),
                "measurement not authorized"
            );
            return Err(Refused::new(
                Refusal::NotAuthorized,
                format!("App not allowed: Boot denied: {}", decision.reason),
            ));
        }
        Ok(decision)
    }

    async fn app_key(
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
        if record.boot_count == 1 {
            tracing::info!(
                app_id = %hex::encode(&boot.app_id),
                instance_id = %hex::encode(&boot.instance_id),
                "CVM deployed"
            );
        }
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

    /// Runs CPU-heavy work on the crypto workers, so the runtime's threads stay free for TLS
    /// handshakes and fast refusals meanwhile.
    async fn offload<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Refused> {
        self.0
            .workers
            .run(work)
            .await
            .map_err(|e| Refused::new(Refusal::Internal, e.to_string()))
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

    /// `GetAppBlsKey` (our addition): the app's BLS12-381 key (EIP-2333, EIP-2334 signing path)
    /// and the root k256 signature over its public key.
    async fn app_bls_key(
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
    async fn kms_key(
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
    async fn sign_cert(
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

    /// Records the release about `boot`; the key leaves only once it is committed.
    async fn audit_release(
        &self,
        method: Method,
        boot: &crate::attestation::BootInfo,
    ) -> Result<(), Refused> {
        let record = audit_record(method, boot, "ok", &serde_json::Value::Null);
        self.0.ledger.audit(record).await.map_err(not_recorded)
    }

    /// The one audit record of a refused key request that reached the attestation step.
    async fn audit_refusal(&self, method: Method, refused: &Refused) {
        let outcome = match refused.reason {
            Refusal::Canary => "security_incident",
            _ => "refused",
        };
        let why = serde_json::json!({
            "reason": refused.reason.as_str(),
            "message": refused.message,
        });
        let record = match &refused.subject {
            Subject::Unaudited => return,
            Subject::Unverified => {
                crate::store::AuditRecord::new(method.audit_kind(), outcome, &why)
            }
            Subject::Boot(boot) => audit_record(method, boot, outcome, &why),
        };
        // A failure is logged by the ledger, on the audit target too.
        let _ = self.0.ledger.audit(record).await;
    }
}

/// The refusal of a release whose record could not be committed (the ledger logged why).
fn not_recorded(e: super::ledger::LedgerError) -> Refused {
    tracing::error!(error = %e, "the key release could not be recorded; keys withheld");
    Refused::new(Refusal::Internal, "could not record the key release")
}

/// The audit record of a key request about `boot`; `why` (an object) adds the refusal's reason
/// and message.
fn audit_record(
    method: Method,
    boot: &crate::attestation::BootInfo,
    outcome: &str,
    why: &serde_json::Value,
) -> crate::store::AuditRecord {
    let mut detail = serde_json::json!({
        "app_id": hex::encode(&boot.app_id),
        "instance_id": hex::encode(&boot.instance_id),
        "compose_hash": hex::encode(&boot.compose_hash),
        "mr_aggregated": hex::encode(&boot.mr_aggregated),
        "os_image_hash": hex::encode(&boot.os_image_hash),
        "device_id": hex::encode(&boot.device_id),
    });
    if let (Some(detail), Some(why)) = (detail.as_object_mut(), why.as_object()) {
        detail.extend(why.clone());
    }
    crate::store::AuditRecord::new(method.audit_kind(), outcome, &detail)
}

/// Where a request's attestation comes from; the gates after it are the same.
enum AttestationSource<'a> {
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

fn attestation_refused(e: &AttestationError) -> Refused {
    Refused::new(
        Refusal::AttestationRejected,
        format!("attestation verification failed: {}", e.caller_message()),
    )
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

/// How the caller wants its body encoded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Json,
    Protobuf,
}

fn encoding(query: Option<&str>, headers: &HeaderMap, is_get: bool) -> Encoding {
    let json_query =
        query.is_some_and(|q| q.split('&').any(|p| p == "json" || p.starts_with("json=")));
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    if is_get || json_query || json_type {
        Encoding::Json
    } else {
        Encoding::Protobuf
    }
}

fn decode<T: Message + Default + DeserializeOwned>(
    enc: Encoding,
    body: &[u8],
) -> Result<T, Refused> {
    match enc {
        Encoding::Json if body.iter().all(u8::is_ascii_whitespace) => Ok(T::default()),
        Encoding::Json => serde_json::from_slice(body)
            .map_err(|e| Refused::new(Refusal::BadRequest, format!("invalid JSON request: {e}"))),
        Encoding::Protobuf => T::decode(body).map_err(|e| {
            Refused::new(
                Refusal::BadRequest,
                format!("invalid protobuf request: {e}"),
            )
        }),
    }
}

fn encode<T: Message + Serialize>(enc: Encoding, value: &T) -> Response {
    match enc {
        Encoding::Json => axum::Json(value).into_response(),
        Encoding::Protobuf => (
            [(header::CONTENT_TYPE, "application/protobuf")],
            value.encode_to_vec(),
        )
            .into_response(),
    }
}

/// At most the first 64 characters of a caller-supplied name, for error messages: a 60 KB path
/// is not echoed back.
fn shown(name: &str) -> String {
    const SHOWN: usize = 64;
    match name.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}… ({} bytes)", &name[..cut], name.len()),
        None => name.to_owned(),
    }
}

/// A JSON pRPC error outside a method (unknown path, wrong HTTP method).
fn prpc_error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

fn refusal_response(enc: Encoding, r: &Refused) -> Response {
    let status = match r.reason {
        Refusal::AuthUnavailable
        | Refusal::ChainStateStale
        | Refusal::Overloaded
        | Refusal::KmsNotAllowed => StatusCode::SERVICE_UNAVAILABLE,
        Refusal::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    match enc {
        Encoding::Json => (
            status,
            axum::Json(serde_json::json!({ "error": r.message })),
        )
            .into_response(),
        Encoding::Protobuf => (
            status,
            [(header::CONTENT_TYPE, "application/protobuf")],
            proto::ProtoError {
                message: r.message.clone(),
            }
            .encode_to_vec(),
        )
            .into_response(),
    }
}

async fn prpc(
    State(rpc): State<KmsRpc>,
    Path(method_name): Path<String>,
    RawQuery(query): RawQuery,
    peer: Option<axum::Extension<PeerCert>>,
    request_method: axum::http::Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let method = Method::parse(&method_name);
    let enc = encoding(
        query.as_deref(),
        &headers,
        request_method == axum::http::Method::GET,
    );
    let peer = peer.map(|axum::Extension(p)| p).unwrap_or_default();
    let span = tracing::info_span!("kms.rpc", method = method.as_str());
    let trace_id = trace_id_of(&span);
    let result: Result<Response, Refused> = async {
        let _slot = match method.takes_slot() {
            true => Some(rpc.0.limiter.enter(&rpc.0.metrics).await?),
            false => None,
        };
        match method {
            Method::GetTempCaCert => Ok(encode(enc, &rpc.temp_ca())),
            Method::GetMeta => Ok(encode(enc, &rpc.meta()?)),
            Method::GetAppEnvEncryptPubKey => {
                let req: proto::AppId = decode(enc, &body)?;
                Ok(encode(enc, &rpc.env_pubkey(&req)?))
            }
            Method::GetAppKey => {
                let req: proto::GetAppKeyRequest = decode(enc, &body)?;
                Ok(encode(enc, &rpc.app_key(&peer, req).await?))
            }
            Method::GetAppBlsKey => {
                let req: proto::GetAppKeyRequest = decode(enc, &body)?;
                Ok(encode(enc, &rpc.app_bls_key(&peer, req).await?))
            }
            Method::GetKmsKey => {
                let req: proto::GetKmsKeyRequest = decode(enc, &body)?;
                Ok(encode(enc, &rpc.kms_key(&peer, req).await?))
            }
            Method::SignCert => {
                let req: proto::SignCertRequest = decode(enc, &body)?;
                Ok(encode(enc, &rpc.sign_cert(req).await?))
            }
            Method::Unknown => Err(Refused::new(
                Refusal::Unsupported,
                format!("Method not found: {}", shown(&method_name)),
            )),
        }
    }
    .instrument(span)
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    match result {
        Ok(resp) => {
            rpc.0
                .metrics
                .request(method, Outcome::Ok, elapsed, trace_id);
            resp
        }
        Err(refused) => {
            rpc.0
                .metrics
                .request(method, Outcome::Refused(refused.reason), elapsed, trace_id);
            rpc.audit_refusal(method, &refused).await;
            refusal_response(enc, &refused)
        }
    }
}

/// The OpenTelemetry trace id of `span`, when tracing gives it one.
fn trace_id_of(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
