//! The KMS's own admission: when it runs attested, it releases keys only while it passes
//! `isKmsAllowed` itself, as upstream asks `bootAuth/kms` about its own boot before every trusted
//! RPC.
//!
//! Start-up ([`attest_self`]): an [`AttestationSource`] attests the RPC key, so the RPC server
//! certificate (usage `kms:rpc`) carries the attestation, and the bootstrap report data, which
//! `GetMeta` returns as `bootstrap_info.attestation`; our own verifier turns the RPC certificate
//! into our [`BootInfo`], exactly as a peer's would be. Requests ([`SelfCheck::gate`]): before any
//! key is released, the configured [`Authorizer`] is asked about that boot info as a KMS. On the
//! chain backend that is a lookup in the current mirror snapshot, evaluated on every request, so
//! a governance change applies to the next request once the mirror has it; a webhook answer is
//! reused for `auth.kms_self_check_cache_ttl` counted from when it was fetched, and requests
//! that find no answer share one question. Every failure refuses (fail closed); each change
//! between admitted and refused is logged once and shown by `dstack_kms_self_check_allowed`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};

use super::authz::{AuthDecision, Authorizer};
use super::metrics::{KmsMetrics, Refusal};
use super::refusal::Refused;
use super::root::{KmsKeys, RootKeyError};
use crate::attestation::collateral::CollateralSource;
use crate::attestation::{AttestationError, BootInfo, Platform, Verifier};

/// Why the KMS could not attest itself at start-up.
#[derive(Debug, thiserror::Error)]
pub enum SelfCheckError {
    /// The attestation source failed.
    #[error("cannot obtain the KMS's own attestation: {0}")]
    Source(AttestationError),
    /// Our own attestation does not verify with our own verifier.
    #[error("the KMS's own attestation does not verify: {0}")]
    Verify(AttestationError),
    /// The RPC certificate could not be re-issued.
    #[error(transparent)]
    Keys(#[from] RootKeyError),
    /// The bootstrap report data could not be computed.
    #[error("bootstrap report data: {0}")]
    Bootstrap(#[from] super::KmsError),
    /// The source (the dstack guest agent) gave no attestation; its own error, in words.
    #[error("{0}")]
    Unavailable(String),
}

/// An attestation being obtained.
pub type Attested<'a> = BoxFuture<'a, Result<Vec<u8>, SelfCheckError>>;

/// Where the KMS's own attestation comes from: the dstack guest agent of the CVM the KMS runs in
/// (`kms::guest_agent`), or a simulated KMS guest (`sim::kms`, behind
/// `kms.insecure_self_attest_with_test_pki`).
pub trait AttestationSource: Send + Sync {
    /// A dstack attestation over `report_data`.
    fn attest(&self, report_data: &[u8; 64]) -> Attested<'_>;
    /// The OS image hash our host claims for us (what a guest's vm_config carries).
    fn os_image_hash(&self) -> Vec<u8>;
    /// Our vm_config, as a guest sends it with a key request (onboarding's `GetKmsKey`).
    fn vm_config(&self) -> String;
}

/// What the KMS learnt about itself at start-up.
#[derive(Debug)]
pub struct OwnIdentity {
    /// Our boot info, as our verifier derived it from our RPC certificate.
    pub boot: BootInfo,
    /// The attestation over the bootstrap report data (`GetMeta`).
    pub bootstrap_attestation: Vec<u8>,
}

/// Attests the KMS at `now`: re-issues `keys`' RPC certificate with an attestation bound to its
/// key (in memory only: an attestation belongs to one boot), verifies it and attests the
/// bootstrap report data.
pub async fn attest_self(
    source: &dyn AttestationSource,
    keys: &mut KmsKeys,
    domains: &[String],
    verifier: &Verifier,
    collateral: &CollateralSource,
    now: u64,
) -> Result<OwnIdentity, SelfCheckError> {
    let report_data = crate::attestation::ratls::report_data_for_spki(&keys.rpc_spki()?);
    let attestation = source.attest(&report_data).await?;
    let cert_der = keys.reissue_rpc_cert(domains, &attestation)?;
    let collateral = match crate::attestation::versioned::parse(&attestation)
        .map_err(SelfCheckError::Verify)?
        .platform
    {
        Platform::Tdx { quote, .. } => Some(
            collateral
                .for_quote(&quote, now, async { verifier.preverify_quote(&quote, now) })
                .await
                .map_err(SelfCheckError::Verify)?,
        ),
        Platform::NitroEnclave { .. } => None,
    };
    let (_, verified) = verifier
        .verify_ratls_cert(
            &cert_der,
            now,
            collateral.as_ref(),
            Some(&source.os_image_hash()),
        )
        .map_err(SelfCheckError::Verify)?;
    let bootstrap = super::keys::BootstrapInfo::of(&keys.root)?;
    Ok(OwnIdentity {
        boot: verified.boot_info,
        bootstrap_attestation: source.attest(&bootstrap.report_data).await?,
    })
}

/// The per-request gate on the KMS's own admission.
pub struct SelfCheck {
    boot: BootInfo,
    bootstrap_attestation: Vec<u8>,
    authorizer: Arc<dyn Authorizer>,
    cache_ttl: Duration,
    /// The last answer and when it was fetched (never when it was last used).
    cached: Mutex<Option<(Instant, AuthDecision)>>,
    /// The question being asked, shared by every request that needs an answer meanwhile.
    asking: Mutex<Option<Question>>,
    last_allowed: Mutex<Option<bool>>,
    metrics: KmsMetrics,
}

/// An answer of the authorizer (or why there is none) and when it arrived.
type Answer = (Instant, Result<AuthDecision, (Refusal, String)>);

/// One question to the authorizer, awaited by every request that needs its answer.
type Question = Shared<BoxFuture<'static, Answer>>;

impl std::fmt::Debug for SelfCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfCheck")
            .field("boot", &self.boot)
            .field("cache_ttl", &self.cache_ttl)
            .finish_non_exhaustive()
    }
}

impl SelfCheck {
    /// Gates on `identity` as `authorizer` judges it; an answer is reused for `cache_ttl` after
    /// it was fetched (zero: asked for every request).
    pub fn new(
        identity: OwnIdentity,
        authorizer: Arc<dyn Authorizer>,
        cache_ttl: Duration,
        metrics: KmsMetrics,
    ) -> Self {
        Self {
            boot: identity.boot,
            bootstrap_attestation: identity.bootstrap_attestation,
            authorizer,
            cache_ttl,
            cached: Mutex::new(None),
            asking: Mutex::new(None),
            last_allowed: Mutex::new(None),
            metrics,
        }
    }

    /// The attestation over the bootstrap report data.
    pub fn bootstrap_attestation(&self) -> &[u8] {
        &self.bootstrap_attestation
    }

    /// `Ok` while the KMS itself is allowed; otherwise the refusal every key request gets
    /// (`kms_not_allowed`, or the backend's unavailability/staleness reason).
    pub async fn gate(&self) -> Result<(), Refused> {
        let decision = match self.fresh_cached() {
            Some(d) => Ok(d),
            None => self.ask().await,
        };
        match decision {
            Ok(d) => {
                self.observe(d.allowed, &d.reason);
                if d.allowed {
                    Ok(())
                } else {
                    Err(Refused::new(
                        Refusal::KmsNotAllowed,
                        format!("KMS is not allowed: {}", d.reason),
                    ))
                }
            }
            Err((reason, why)) => {
                self.observe(false, &why);
                Err(Refused::new(reason, format!("KMS is not allowed: {why}")))
            }
        }
    }

    /// Asks the authorizer, or joins the question already being asked, so concurrent misses
    /// cost one call; a decision is cached with the time it arrived.
    async fn ask(&self) -> Result<AuthDecision, (Refusal, String)> {
        let question = {
            let mut asking = self.asking.lock().unwrap_or_else(|e| e.into_inner());
            asking
                .get_or_insert_with(|| {
                    let (authorizer, boot) = (Arc::clone(&self.authorizer), self.boot.clone());
                    let question: BoxFuture<'static, Answer> = Box::pin(async move {
                        let answer = authorizer
                            .authorize(&boot, true)
                            .await
                            .map_err(|e| (e.refusal(), e.to_string()));
                        (Instant::now(), answer)
                    });
                    question.shared()
                })
                .clone()
        };
        let (at, answer) = question.clone().await;
        {
            let mut asking = self.asking.lock().unwrap_or_else(|e| e.into_inner());
            if asking.as_ref().is_some_and(|q| q.ptr_eq(&question)) {
                *asking = None;
            }
        }
        if let Ok(d) = &answer
            && !self.cache_ttl.is_zero()
        {
            let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
            // A slow waiter of an older question never replaces a newer answer.
            if cached.as_ref().is_none_or(|(newest, _)| *newest < at) {
                *cached = Some((at, d.clone()));
            }
        }
        answer
    }

    fn fresh_cached(&self) -> Option<AuthDecision> {
        self.cached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|(at, _)| at.elapsed() < self.cache_ttl)
            .map(|(_, d)| d.clone())
    }

    /// Sets the gauge; logs only when the answer changes.
    fn observe(&self, allowed: bool, reason: &str) {
        self.metrics.set_self_check(allowed);
        let previous = self
            .last_allowed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(allowed);
        if previous == Some(allowed) {
            return;
        }
        let mr_aggregated = hex::encode(&self.boot.mr_aggregated);
        if allowed {
            tracing::info!(%mr_aggregated, "KMS self-check: this KMS is allowed; keys are served");
        } else {
            tracing::warn!(
                %mr_aggregated,
                reason,
                "KMS self-check: this KMS is not allowed; every key request is refused"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

    use super::*;
    use crate::kms::authz::AuthError;

    /// An authorizer whose KMS answer the test flips; counts the KMS questions.
    #[derive(Default)]
    struct Flip {
        allowed: AtomicBool,
        unavailable: AtomicBool,
        kms_calls: AtomicUsize,
        /// How long an answer takes.
        delay_ms: AtomicU64,
    }

    impl Authorizer for Flip {
        fn authorize<'a>(
            &'a self,
            _boot: &'a BootInfo,
            is_kms: bool,
        ) -> BoxFuture<'a, Result<AuthDecision, AuthError>> {
            assert!(is_kms, "the self-check asks as a KMS");
            self.kms_calls.fetch_add(1, Ordering::SeqCst);
            let allowed = self.allowed.load(Ordering::SeqCst);
            let unavailable = self.unavailable.load(Ordering::SeqCst);
            let delay = Duration::from_millis(self.delay_ms.load(Ordering::SeqCst));
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                if unavailable {
                    return Err(AuthError::Unavailable("down".into()));
                }
                Ok(AuthDecision {
                    allowed,
                    reason: if allowed {
                        String::new()
                    } else {
                        "Aggregated MR not allowed".into()
                    },
                    gateway_app_id: String::new(),
                })
            })
        }
    }

    fn self_check(
        auth: Arc<Flip>,
        ttl: Duration,
    ) -> (SelfCheck, prometheus_client::registry::Registry) {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = KmsMetrics::new(&mut registry);
        let boot = BootInfo {
            tee_variant: crate::attestation::TeeVariant::DstackTdx,
            mr_aggregated: vec![1; 32],
            os_image_hash: vec![2; 32],
            mr_system: vec![3; 32],
            app_id: vec![0; 20],
            compose_hash: vec![4; 32],
            instance_id: Vec::new(),
            device_id: vec![5; 32],
            key_provider_info: Vec::new(),
            tcb_status: "UpToDate".into(),
            advisory_ids: Vec::new(),
        };
        let identity = OwnIdentity {
            boot,
            bootstrap_attestation: vec![9],
        };
        (SelfCheck::new(identity, auth, ttl, metrics), registry)
    }

    fn gauge(registry: &prometheus_client::registry::Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text.lines()
            .find(|l| l.starts_with("dstack_kms_self_check_allowed "))
            .unwrap()
            .to_owned()
    }

    #[tokio::test]
    async fn refusal_follows_every_change_of_the_answer_without_a_cache() {
        let auth = Arc::new(Flip::default());
        let (check, registry) = self_check(auth.clone(), Duration::ZERO);
        assert_eq!(gauge(&registry), "dstack_kms_self_check_allowed -1");
        let refused = check.gate().await.unwrap_err();
        assert_eq!(refused.reason, Refusal::KmsNotAllowed);
        assert_eq!(
            refused.message,
            "KMS is not allowed: Aggregated MR not allowed"
        );
        assert_eq!(gauge(&registry), "dstack_kms_self_check_allowed 0");
        auth.allowed.store(true, Ordering::SeqCst);
        check.gate().await.unwrap();
        assert_eq!(gauge(&registry), "dstack_kms_self_check_allowed 1");
        auth.allowed.store(false, Ordering::SeqCst);
        assert!(check.gate().await.is_err());
        assert_eq!(auth.kms_calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_answer_is_reused_within_the_cache_ttl() {
        let auth = Arc::new(Flip::default());
        auth.allowed.store(true, Ordering::SeqCst);
        let (check, _registry) = self_check(auth.clone(), Duration::from_secs(60));
        check.gate().await.unwrap();
        auth.allowed.store(false, Ordering::SeqCst);
        check.gate().await.unwrap();
        assert_eq!(auth.kms_calls.load(Ordering::SeqCst), 1);
    }

    /// Under steady use the cached answer still expires `ttl` after it was fetched, so a
    /// revocation refuses within the TTL plus one request.
    #[tokio::test]
    async fn a_revocation_refuses_within_the_ttl_under_steady_load() {
        let auth = Arc::new(Flip::default());
        auth.allowed.store(true, Ordering::SeqCst);
        let ttl = Duration::from_millis(300);
        let (check, _registry) = self_check(auth.clone(), ttl);
        check.gate().await.unwrap();
        auth.allowed.store(false, Ordering::SeqCst);
        let revoked = Instant::now();
        let refused_after = loop {
            if check.gate().await.is_err() {
                break revoked.elapsed();
            }
            assert!(revoked.elapsed() < Duration::from_secs(3), "never refused");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            refused_after <= ttl + Duration::from_millis(100),
            "{refused_after:?}"
        );
        assert_eq!(auth.kms_calls.load(Ordering::SeqCst), 2);
    }

    /// Concurrent requests that find no answer share one question.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_ask_once() {
        let auth = Arc::new(Flip::default());
        auth.allowed.store(true, Ordering::SeqCst);
        auth.delay_ms.store(100, Ordering::SeqCst);
        for ttl in [Duration::ZERO, Duration::from_secs(60)] {
            auth.kms_calls.store(0, Ordering::SeqCst);
            let (check, _registry) = self_check(auth.clone(), ttl);
            let check = Arc::new(check);
            let gates: Vec<_> = (0..20)
                .map(|_| {
                    let check = Arc::clone(&check);
                    tokio::spawn(async move { check.gate().await })
                })
                .collect();
            for gate in gates {
                gate.await.unwrap().unwrap();
            }
            assert_eq!(auth.kms_calls.load(Ordering::SeqCst), 1, "ttl {ttl:?}");
        }
    }

    #[tokio::test]
    async fn an_unavailable_backend_refuses_and_is_not_cached() {
        let auth = Arc::new(Flip::default());
        auth.unavailable.store(true, Ordering::SeqCst);
        let (check, registry) = self_check(auth.clone(), Duration::from_secs(60));
        let refused = check.gate().await.unwrap_err();
        assert_eq!(refused.reason, Refusal::AuthUnavailable);
        assert!(
            refused.message.starts_with("KMS is not allowed: "),
            "{}",
            refused.message
        );
        assert_eq!(gauge(&registry), "dstack_kms_self_check_allowed 0");
        auth.unavailable.store(false, Ordering::SeqCst);
        auth.allowed.store(true, Ordering::SeqCst);
        check.gate().await.unwrap();
        assert_eq!(auth.kms_calls.load(Ordering::SeqCst), 2);
    }
}
