//! `dstack_kms_*` metrics of the key-dispatch path.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// KMS RPC methods (closed set; unknown names are `unknown`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Method {
    /// GetAppKey
    GetAppKey,
    /// GetAppBlsKey (our addition)
    GetAppBlsKey,
    /// GetAppEnvEncryptPubKey
    GetAppEnvEncryptPubKey,
    /// GetMeta
    GetMeta,
    /// GetTempCaCert
    GetTempCaCert,
    /// SignCert
    SignCert,
    /// GetKmsKey
    GetKmsKey,
    /// Anything else.
    Unknown,
}

impl Method {
    /// Whether the method does key work (attestation, collateral, authorization, derivation,
    /// signing) and so takes a slot of the concurrency limit. The others answer from memory and
    /// never wait behind key work.
    pub fn takes_slot(self) -> bool {
        matches!(
            self,
            Self::GetAppKey | Self::GetAppBlsKey | Self::GetKmsKey | Self::SignCert
        )
    }

    /// The `kind` of a key method's audit records.
    pub fn audit_kind(self) -> &'static str {
        match self {
            Self::GetAppKey => "key_request",
            Self::GetAppBlsKey => "bls_key_request",
            Self::GetKmsKey => "kms_key_request",
            Self::SignCert => "cert_request",
            Self::GetAppEnvEncryptPubKey | Self::GetMeta | Self::GetTempCaCert | Self::Unknown => {
                "request"
            }
        }
    }

    /// Every method.
    pub const ALL: [Method; 8] = [
        Self::GetAppKey,
        Self::GetAppBlsKey,
        Self::GetAppEnvEncryptPubKey,
        Self::GetMeta,
        Self::GetTempCaCert,
        Self::SignCert,
        Self::GetKmsKey,
        Self::Unknown,
    ];

    /// From a pRPC path segment (`KMS.GetAppKey` or `GetAppKey`).
    pub fn parse(name: &str) -> Self {
        match name.strip_prefix("KMS.").unwrap_or(name) {
            "GetAppKey" => Self::GetAppKey,
            "GetAppBlsKey" => Self::GetAppBlsKey,
            "GetAppEnvEncryptPubKey" => Self::GetAppEnvEncryptPubKey,
            "GetMeta" => Self::GetMeta,
            "GetTempCaCert" => Self::GetTempCaCert,
            "SignCert" => Self::SignCert,
            "GetKmsKey" => Self::GetKmsKey,
            _ => Self::Unknown,
        }
    }

    /// Snake-case label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GetAppKey => "get_app_key",
            Self::GetAppBlsKey => "get_app_bls_key",
            Self::GetAppEnvEncryptPubKey => "get_app_env_encrypt_pub_key",
            Self::GetMeta => "get_meta",
            Self::GetTempCaCert => "get_temp_ca_cert",
            Self::SignCert => "sign_cert",
            Self::GetKmsKey => "get_kms_key",
            Self::Unknown => "unknown",
        }
    }
}

/// Why a request was refused (closed set; feeds the error body, the metric label and the log).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Refusal {
    /// No RA-TLS client certificate on a method that needs one.
    NoAttestation,
    /// The attestation did not verify.
    AttestationRejected,
    /// The measurements are not authorized.
    NotAuthorized,
    /// The authorization backend could not answer.
    AuthUnavailable,
    /// The KMS itself is not allowed (`isKmsAllowed` on its own boot): no key is released.
    KmsNotAllowed,
    /// The on-chain state is too old to answer.
    ChainStateStale,
    /// The app id is a canary: it must never receive keys.
    Canary,
    /// The claimed OS image is unknown or does not match the measured boot.
    OsImageRejected,
    /// Too many requests waiting.
    Overloaded,
    /// Malformed request.
    BadRequest,
    /// A SignCert CSR that does not decode, lacks the confirm word or asks for an impossible
    /// certificate.
    BadCsr,
    /// A SignCert CSR whose signature is not by its own key.
    CsrSignatureInvalid,
    /// The method is not offered.
    Unsupported,
    /// The database could not record the key release (no record, no keys): retry later.
    StoreUnavailable,
    /// Something failed on our side.
    Internal,
}

impl Refusal {
    /// Snake-case label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoAttestation => "no_attestation",
            Self::AttestationRejected => "attestation_rejected",
            Self::NotAuthorized => "not_authorized",
            Self::AuthUnavailable => "auth_unavailable",
            Self::KmsNotAllowed => "kms_not_allowed",
            Self::ChainStateStale => "chain_state_stale",
            Self::Canary => "canary",
            Self::OsImageRejected => "os_image_rejected",
            Self::Overloaded => "overloaded",
            Self::BadRequest => "bad_request",
            Self::BadCsr => "bad_csr",
            Self::CsrSignatureInvalid => "csr_signature_invalid",
            Self::Unsupported => "unsupported",
            Self::StoreUnavailable => "store_unavailable",
            Self::Internal => "internal",
        }
    }
}

macro_rules! label_str {
    ($t:ty) => {
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}
label_str!(Method);
label_str!(Refusal);

/// `ok` or the refusal.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Answered.
    Ok,
    /// Refused for this reason.
    Refused(Refusal),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: Method,
    outcome: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: Method,
}

/// Exemplar labels: the trace of a request, so a slow bucket links to its trace.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TraceLabels {
    trace_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    outcome: &'static str,
}

/// Metrics of the KMS RPC listener. Cheap to clone.
#[derive(Clone, Debug)]
pub struct KmsMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<MethodLabels, HistogramWithExemplars<TraceLabels>>,
    handshakes: Family<HandshakeLabels, Counter>,
    active_connections: Gauge,
    connections_shed: Counter,
    connections_refused: Counter,
    accept_errors: Counter,
    queue_rejected: Counter,
    queue_depth: Gauge,
    concurrency_limit: Gauge,
    canary_requests: Counter,
    ledger_batch: Histogram,
    ledger_commit: Histogram,
    ledger_failures: Counter,
    self_check_allowed: Gauge,
}

impl KmsMetrics {
    /// Registers the KMS metrics.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                // 100 µs .. ~13 s
                HistogramWithExemplars::new(exponential_buckets(0.0001, 2.0, 18))
            }),
            handshakes: Family::default(),
            active_connections: Gauge::default(),
            connections_shed: Counter::default(),
            connections_refused: Counter::default(),
            accept_errors: Counter::default(),
            queue_rejected: Counter::default(),
            queue_depth: Gauge::default(),
            concurrency_limit: Gauge::default(),
            canary_requests: Counter::default(),
            // 1 .. 256 entries
            ledger_batch: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            // 100 µs .. ~1.6 s
            ledger_commit: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            ledger_failures: Counter::default(),
            self_check_allowed: Gauge::default(),
        };
        // -1 until a self-check has answered (and for good when the KMS is not attested)
        m.self_check_allowed.set(-1);
        registry.register(
            "dstack_kms_self_check_allowed",
            "The KMS's own isKmsAllowed at its last key request: 1 allowed, 0 refused, -1 not evaluated",
            m.self_check_allowed.clone(),
        );
        registry.register(
            "dstack_kms_ledger_batch_size",
            "Ledger entries (boot and audit records) written per transaction",
            m.ledger_batch.clone(),
        );
        registry.register(
            "dstack_kms_ledger_commit_duration_seconds",
            "Time to write and commit one ledger batch",
            m.ledger_commit.clone(),
        );
        registry.register(
            "dstack_kms_ledger_commit_failures",
            "Ledger batches whose transaction failed (their keys were withheld)",
            m.ledger_failures.clone(),
        );
        registry.register(
            "dstack_kms_queue_rejected",
            "KMS requests answered 503 at once because the wait queue was full",
            m.queue_rejected.clone(),
        );
        registry.register(
            "dstack_kms_queue_depth",
            "KMS requests waiting for a processing slot",
            m.queue_depth.clone(),
        );
        registry.register(
            "dstack_kms_concurrency_limit",
            "KMS requests processed at once (configured)",
            m.concurrency_limit.clone(),
        );
        registry.register(
            "dstack_kms_canary_requests",
            "Requests from canary app ids (each one is a security incident)",
            m.canary_requests.clone(),
        );
        registry.register(
            "dstack_kms_requests",
            "KMS RPC requests by method, outcome (ok|refused) and refusal reason",
            m.requests.clone(),
        );
        registry.register(
            "dstack_kms_dispatch_duration_seconds",
            "Time from request to response on the KMS RPC, by method",
            m.duration.clone(),
        );
        registry.register(
            "dstack_kms_ratls_handshakes",
            "TLS handshakes on the KMS RPC listener, by outcome (ok|failed)",
            m.handshakes.clone(),
        );
        registry.register(
            "dstack_kms_active_connections",
            "Open connections on the KMS RPC listener",
            m.active_connections.clone(),
        );
        registry.register(
            "dstack_kms_connections_shed",
            "Connections closed with no request in flight to make room under api.max_connections (the oldest first)",
            m.connections_shed.clone(),
        );
        registry.register(
            "dstack_kms_connections_refused",
            "Connections refused because api.max_connections were open and every one had a request in flight",
            m.connections_refused.clone(),
        );
        registry.register(
            "dstack_kms_accept_errors",
            "Failed accepts on the KMS RPC listener (e.g. out of file descriptors); each pauses accepting briefly",
            m.accept_errors.clone(),
        );
        for method in Method::ALL {
            let _ = m.requests.get_or_create(&RequestLabels {
                method,
                outcome: "ok",
                reason: "none",
            });
            let _ = m.duration.get_or_create(&MethodLabels { method });
        }
        for outcome in ["ok", "failed"] {
            let _ = m.handshakes.get_or_create(&HandshakeLabels { outcome });
        }
        m
    }

    /// Counts one request and its duration; `trace_id` becomes the bucket's exemplar.
    pub fn request(
        &self,
        method: Method,
        outcome: Outcome,
        seconds: f64,
        trace_id: Option<String>,
    ) {
        let (outcome, reason) = match outcome {
            Outcome::Ok => ("ok", "none"),
            Outcome::Refused(r) => ("refused", r.as_str()),
        };
        self.requests
            .get_or_create(&RequestLabels {
                method,
                outcome,
                reason,
            })
            .inc();
        self.duration
            .get_or_create(&MethodLabels { method })
            .observe(
                seconds,
                trace_id.map(|trace_id| TraceLabels { trace_id }),
                None,
            );
    }

    /// Counts a handshake.
    pub fn handshake(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.handshakes
            .get_or_create(&HandshakeLabels { outcome })
            .inc();
    }

    /// Counts a request refused because the queue was full.
    pub fn queue_rejected(&self) {
        self.queue_rejected.inc();
    }

    /// Tracks a waiting request until the guard drops.
    pub fn queued(&self) -> ConnectionGuard {
        self.queue_depth.inc();
        ConnectionGuard(self.queue_depth.clone())
    }

    /// Records the configured concurrency limit.
    pub fn set_concurrency_limit(&self, n: usize) {
        self.concurrency_limit
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Records one ledger commit of `entries` entries.
    pub fn ledger_commit(&self, entries: usize, seconds: f64, ok: bool) {
        self.ledger_batch.observe(entries as f64);
        self.ledger_commit.observe(seconds);
        if !ok {
            self.ledger_failures.inc();
        }
    }

    /// Records the answer of the KMS's own self-check.
    pub fn set_self_check(&self, allowed: bool) {
        self.self_check_allowed.set(i64::from(allowed));
    }

    /// Counts a canary request.
    pub fn canary(&self) {
        self.canary_requests.inc();
    }
}

impl crate::http::conn::ConnectionMetrics for KmsMetrics {
    fn open(&self, opened: bool) {
        match opened {
            true => self.active_connections.inc(),
            false => self.active_connections.dec(),
        };
    }

    fn shed(&self) {
        self.connections_shed.inc();
    }

    fn refused(&self) {
        self.connections_refused.inc();
    }

    fn accept_failed(&self) {
        self.accept_errors.inc();
    }
}

/// Decrements a gauge (open connections, queue depth) on drop.
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
