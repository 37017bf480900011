//! Configuration: what the operator can set, where it comes from, and whether it is safe.
//!
//! Flow: built-in defaults ← TOML file (`--config`) ← environment (`KEYWARDEN_<SECTION>__<KEY>`)
//! ← command-line flags. The merged tree is deserialized with unknown keys refused, then
//! [`Config::validate`] collects every problem (with its fix) into one message. Risky switches are
//! all named `insecure_*`, default off, and listed by [`Config::insecure_switches`] so start-up can
//! warn about each one that is on.

pub mod problem;
mod secret;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use problem::Problem;
pub use secret::{SecretError, SecretRef, SecretValue};

/// Prefix of environment variables that override config keys.
pub const ENV_PREFIX: &str = "KEYWARDEN_";

/// The whole service configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The API listener (dstack KMS RPC port).
    pub api: ApiConfig,
    /// The metrics and health listener.
    pub metrics: MetricsConfig,
    /// The operator (admin) listener.
    pub admin: AdminConfig,
    /// Where state is persisted.
    pub storage: StorageConfig,
    /// Logs, audit log and traces.
    pub telemetry: TelemetryConfig,
    /// Process-level behaviour.
    pub runtime: RuntimeConfig,
    /// Attestation verification: TCB policy, collateral, Nitro PCRs.
    pub attestation: crate::attestation::AttestationConfig,
    /// KMS root keys and RPC certificate.
    pub kms: crate::kms::root::KmsConfig,
    /// Who authorizes boots.
    pub auth: crate::kms::authz::AuthConfig,
    /// The on-chain mirror of DstackKms and its apps.
    pub chain: crate::chain::ChainConfig,
}

/// The API listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Time a request may take before it is answered with 503.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Time a client has to complete the TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time a connection may take to send a request's headers, and may stay idle between
    /// requests; then it is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Connections open at once; beyond it the oldest connection with no request in flight is
    /// closed (or the new one refused when all are busy). Keep it well under the open-file limit.
    pub max_connections: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// The metrics listener (`/metrics`, `/livez`, `/readyz`), never the key-dispatch port.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// The admin listener: disabled unless a bearer token is configured.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The bearer token, as a secret reference (`env:VAR` or `file:PATH`).
    pub token: Option<SecretRef>,
    /// Alternatively, the SHA-256 of the token (64 hex digits), so the token itself is stored nowhere.
    pub token_sha256: Option<String>,
    /// Allow the admin listener on a non-loopback address.
    pub insecure_listen_public: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8001)),
            token: None,
            token_sha256: None,
            insecure_listen_public: false,
        }
    }
}

/// Persistence.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory for the embedded database and key material (created with mode 0700).
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://...`; defaults to SQLite at `<data_dir>/keywarden.db`.
    pub database_url: Option<String>,
    /// Largest number of pooled database connections.
    pub max_connections: u32,
    /// How long to wait for the database when connecting or acquiring a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            database_url: None,
            max_connections: 8,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text with colour on a TTY, JSON lines otherwise.
    Auto,
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

/// OTLP transport.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// gRPC (default port 4317).
    Grpc,
    /// HTTP with protobuf bodies (default port 4318).
    Http,
}

/// Logs, audit log and trace export.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Log filter in EnvFilter syntax; `RUST_LOG` overrides it.
    pub log_level: String,
    /// `auto`, `text` or `json`.
    pub log_format: LogFormat,
    /// Force colours on or off in text logs; unset means "on when stdout is a TTY".
    pub log_color: Option<bool>,
    /// Also append audit records (target `audit`) to this file as JSON lines.
    pub audit_file: Option<PathBuf>,
    /// OpenTelemetry trace export.
    pub otlp: OtlpConfig,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            log_format: LogFormat::Auto,
            log_color: None,
            audit_file: None,
            otlp: OtlpConfig::default(),
        }
    }
}

/// OTLP trace export.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// Export spans.
    pub enabled: bool,
    /// Collector endpoint (`http://host:4317` for gRPC, `http://host:4318` for HTTP).
    pub endpoint: String,
    /// `grpc` or `http`.
    pub protocol: OtlpProtocol,
    /// `service.name` resource attribute.
    pub service_name: String,
    /// Export timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: "http://localhost:4317".into(),
            protocol: OtlpProtocol::Grpc,
            service_name: "keywarden".into(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Process-level behaviour.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// How long shutdown may take to drain in-flight work before the process gives up.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// Flags given on the `serve` command line; they win over file and environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--api-listen`
    pub api_listen: Option<SocketAddr>,
    /// `--metrics-listen`
    pub metrics_listen: Option<SocketAddr>,
    /// `--admin-listen`
    pub admin_listen: Option<SocketAddr>,
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
    /// `--database-url`
    pub database_url: Option<String>,
    /// `--insecure-test-pki`
    pub insecure_test_pki: Option<PathBuf>,
    /// `--rpc-url` (repeatable; replaces `chain.rpc_urls` when given)
    pub rpc_urls: Vec<String>,
    /// `--kms-contract`
    pub kms_contract: Option<String>,
    /// `--start-block`
    pub start_block: Option<u64>,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One or more problems, all named in one line.
    #[error("invalid configuration: {}", render_problems(.0))]
    Invalid(Vec<Problem>),
}

fn render_problems(problems: &[Problem]) -> String {
    let joined: Vec<String> = problems.iter().map(ToString::to_string).collect();
    if problems.len() == 1 {
        joined.join("")
    } else {
        format!("{} problems: {}", problems.len(), joined.join("; "))
    }
}

impl ConfigError {
    /// `problems` as an error, or `Ok` when there are none.
    pub fn check(problems: Vec<Problem>) -> Result<(), Self> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Self::Invalid(problems))
        }
    }

    fn one(key: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::Invalid(vec![Problem {
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
        }])
    }

    /// The individual problems.
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Invalid(p) => p,
        }
    }
}

/// The database the storage section selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseTarget {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL server (the URL as given).
    Postgres(String),
}

impl Config {
    /// Loads the configuration: defaults, then `file`, then `env` overrides, then `overrides`.
    /// Does not validate; call [`Config::validate`].
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut tree = match file {
            Some(path) => read_toml_file(path)?,
            None => toml::Table::new(),
        };
        let env_keys = apply_env(&mut tree, env)?;
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(tree))
            .map_err(|e| {
                let path = e.path().to_string();
                let inner = flatten(&e.inner().to_string());
                let source = env_keys
                    .iter()
                    .find(|(p, _)| path.starts_with(p.as_str()) || p.starts_with(path.as_str()))
                    .map(|(_, var)| format!(" (set by environment variable {var})"))
                    .unwrap_or_default();
                ConfigError::one(
                    if path == "." { "config".into() } else { path },
                    format!("{inner}{source}"),
                    "correct or remove the key; every key is documented in examples/keywarden.toml",
                )
            })?;
        config.apply(overrides);
        Ok(config)
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(a) = o.api_listen {
            self.api.listen = a;
        }
        if let Some(a) = o.metrics_listen {
            self.metrics.listen = a;
        }
        if let Some(a) = o.admin_listen {
            self.admin.listen = a;
        }
        if let Some(d) = &o.data_dir {
            self.storage.data_dir.clone_from(d);
        }
        if let Some(u) = &o.database_url {
            self.storage.database_url = Some(u.clone());
        }
        if let Some(d) = &o.insecure_test_pki {
            self.attestation.insecure_test_pki = Some(d.clone());
        }
        if !o.rpc_urls.is_empty() {
            self.chain.rpc_urls.clone_from(&o.rpc_urls);
        }
        if let Some(k) = &o.kms_contract {
            self.chain.kms_contract = Some(k.clone());
        }
        if let Some(b) = o.start_block {
            self.chain.start_block = b;
        }
    }

    /// Every `insecure_*` switch with its current value, by full key name.
    pub fn insecure_switches(&self) -> Vec<(&'static str, bool)> {
        let mut all = vec![(
            "admin.insecure_listen_public",
            self.admin.insecure_listen_public,
        )];
        all.extend(self.attestation.insecure_switches());
        all.push(("auth.insecure_dev_auth", self.auth.insecure_dev_auth));
        all.push((
            "kms.insecure_self_attest_with_test_pki",
            self.kms.insecure_self_attest_with_test_pki,
        ));
        all.push((
            "kms.insecure_skip_os_image_check",
            self.kms.insecure_skip_os_image_check,
        ));
        all
    }

    /// The database selected by `storage`.
    pub fn database_target(&self) -> Result<DatabaseTarget, ConfigError> {
        let Some(raw) = &self.storage.database_url else {
            return Ok(DatabaseTarget::Sqlite(
                self.storage.data_dir.join("keywarden.db"),
            ));
        };
        let fix = "use sqlite://PATH or postgres://USER@HOST:PORT/DATABASE";
        let url = url::Url::parse(raw).map_err(|e| {
            ConfigError::one(
                "storage.database_url",
                format!("malformed URL {:?}: {e}", redact_url(raw)),
                fix,
            )
        })?;
        match url.scheme() {
            "sqlite" => {
                let path = raw
                    .trim_start_matches("sqlite://")
                    .trim_start_matches("sqlite:");
                let path = path.split('?').next().unwrap_or_default();
                if path.is_empty() {
                    return Err(ConfigError::one(
                        "storage.database_url",
                        "sqlite URL names no file",
                        fix,
                    ));
                }
                Ok(DatabaseTarget::Sqlite(PathBuf::from(path)))
            }
            "postgres" | "postgresql" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(ConfigError::one(
                        "storage.database_url",
                        "postgres URL names no host",
                        fix,
                    ));
                }
                Ok(DatabaseTarget::Postgres(raw.clone()))
            }
            other => Err(ConfigError::one(
                "storage.database_url",
                format!("unsupported database scheme {other:?}"),
                fix,
            )),
        }
    }

    /// Checks everything that can be checked without touching the network or the database,
    /// including that secrets resolve. Returns every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut push = |key: &str, problem: String, fix: &str| {
            problems.push(Problem {
                key: key.into(),
                problem,
                fix: fix.into(),
            })
        };

        if let Err(e) = self.database_target() {
            for p in e.problems() {
                push(&p.key, p.problem.clone(), &p.fix);
            }
        }
        if self.storage.max_connections == 0 {
            push(
                "storage.max_connections",
                "must be at least 1".into(),
                "set it to 1 or more (8 is the default)",
            );
        }
        if self.storage.connect_timeout.is_zero() {
            push(
                "storage.connect_timeout",
                "must be positive".into(),
                "use a duration such as \"5s\"",
            );
        }

        let listeners = [
            ("api.listen", self.api.listen),
            ("metrics.listen", self.metrics.listen),
            ("admin.listen", self.admin.listen),
        ];
        for (i, (ka, a)) in listeners.iter().enumerate() {
            for (kb, b) in &listeners[i + 1..] {
                let admin_off = *kb == "admin.listen" && !self.admin_enabled();
                if a.port() == b.port() && a.port() != 0 && !admin_off {
                    push(
                        kb,
                        format!("uses port {} already taken by {ka}", b.port()),
                        "give each listener its own port",
                    );
                }
            }
        }
        if self.api.max_body_bytes == 0 {
            push(
                "api.max_body_bytes",
                "must be positive".into(),
                "set a limit such as 1048576",
            );
        }
        if self.api.request_timeout.is_zero() {
            push(
                "api.request_timeout",
                "must be positive".into(),
                "use a duration such as \"30s\"",
            );
        }

        match (&self.admin.token, &self.admin.token_sha256) {
            (Some(_), Some(_)) => push(
                "admin.token_sha256",
                "both admin.token and admin.token_sha256 are set".into(),
                "keep only one of them",
            ),
            (Some(r), None) => {
                if let Err(e) = r.resolve() {
                    push(
                        "admin.token",
                        format!("{r}: {e}"),
                        "point it at a readable file or a set environment variable",
                    );
                }
            }
            (None, Some(h)) => {
                if h.len() != 64 || hex::decode(h).is_err() {
                    push(
                        "admin.token_sha256",
                        "is not 64 hex digits".into(),
                        "use the output of `printf %s TOKEN | sha256sum`",
                    );
                }
            }
            (None, None) => {}
        }
        if self.admin_enabled()
            && !self.admin.listen.ip().is_loopback()
            && !self.admin.insecure_listen_public
        {
            push(
                "admin.listen",
                format!(
                    "{} is not a loopback address; the admin API would be reachable from the network",
                    self.admin.listen
                ),
                "bind it to 127.0.0.1, or set admin.insecure_listen_public = true if that is intended",
            );
        }

        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.telemetry.log_level) {
            push(
                "telemetry.log_level",
                format!(
                    "{:?} is not a valid filter: {}",
                    self.telemetry.log_level,
                    flatten(&e.to_string())
                ),
                "use a level (info, debug, ...) or EnvFilter directives such as \"info,keywarden=debug\"",
            );
        }
        if self.telemetry.otlp.enabled {
            match url::Url::parse(&self.telemetry.otlp.endpoint) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                Ok(u) => push(
                    "telemetry.otlp.endpoint",
                    format!("unsupported scheme {:?}", u.scheme()),
                    "use http://HOST:PORT or https://HOST:PORT",
                ),
                Err(e) => push(
                    "telemetry.otlp.endpoint",
                    format!("malformed URL {:?}: {e}", self.telemetry.otlp.endpoint),
                    "use http://HOST:PORT",
                ),
            }
            if self.telemetry.otlp.service_name.trim().is_empty() {
                push(
                    "telemetry.otlp.service_name",
                    "is empty".into(),
                    "set a service name such as \"keywarden\"",
                );
            }
        }
        if self.kms.insecure_self_attest_with_test_pki
            && self.attestation.insecure_test_pki.is_none()
        {
            push(
                "kms.insecure_self_attest_with_test_pki",
                "needs a test PKI to attest with, and none is configured".into(),
                "set attestation.insecure_test_pki (serve --insecure-test-pki DIR), or turn this off",
            );
        }
        match self.auth.backend {
            crate::kms::authz::AuthBackendKind::Dev if !self.auth.insecure_dev_auth => push(
                "auth.backend",
                "\"dev\" authorizes every attested boot and needs auth.insecure_dev_auth = true"
                    .into(),
                "use backend = \"chain\" or \"webhook\", or set auth.insecure_dev_auth = true for development",
            ),
            crate::kms::authz::AuthBackendKind::Webhook => {
                match self.auth.webhook_url.as_deref().map(url::Url::parse) {
                    Some(Ok(u)) if matches!(u.scheme(), "http" | "https") => {}
                    Some(_) => push(
                        "auth.webhook_url",
                        "is not an http(s) URL".into(),
                        "set the auth server's base URL, e.g. \"http://127.0.0.1:8090\"",
                    ),
                    None => push(
                        "auth.webhook_url",
                        "is required with auth.backend = \"webhook\"".into(),
                        "set the auth server's base URL",
                    ),
                }
            }
            _ => {}
        }
        if self.api.max_connections == 0 {
            push(
                "api.max_connections",
                "must be at least 1".into(),
                "use 1024 (the default), well under the open-file limit",
            );
        }
        if self.api.header_read_timeout.is_zero() {
            push(
                "api.header_read_timeout",
                "must be positive".into(),
                "use a duration such as \"10s\"",
            );
        }
        if self.api.handshake_timeout.is_zero() {
            push(
                "api.handshake_timeout",
                "must be positive".into(),
                "use a duration such as \"10s\"",
            );
        }
        if self.kms.domains.is_empty() || self.kms.domains.iter().any(|d| d.trim().is_empty()) {
            push(
                "kms.domains",
                "must name at least one non-empty DNS name".into(),
                "list the names clients use to reach the KMS, e.g. [\"kms.example.com\"]",
            );
        }
        if let Err(e) = crate::kms::osimage::OsImagePolicy::new(&self.kms.os_images, false) {
            push(
                "kms.os_images",
                e.to_string(),
                "give hash as 64 hex digits and mrtd, rtmr0, rtmr1, rtmr2 as 96 hex digits each",
            );
        }
        if self.kms.max_concurrent_requests == 0 {
            push(
                "kms.max_concurrent_requests",
                "must be at least 1".into(),
                "set it to the number of requests to process at once (32 is the default)",
            );
        }
        if let Err(id) = self.kms.canary_ids() {
            push(
                "kms.canary_app_ids",
                format!("{id:?} is not a 20-byte hex app id"),
                "list app ids as 40 hex digits (0x optional)",
            );
        }
        if let Some(r) = &self.kms.key_encryption_key
            && let Err(e) = r.resolve()
        {
            push(
                "kms.key_encryption_key",
                format!("{r}: {e}"),
                "point it at a readable file or a set environment variable",
            );
        }
        if self.runtime.shutdown_timeout.is_zero()
            || self.runtime.shutdown_timeout > Duration::from_secs(600)
        {
            push(
                "runtime.shutdown_timeout",
                format!(
                    "{} is outside 1ms..10m",
                    humantime::format_duration(self.runtime.shutdown_timeout)
                ),
                "use a duration such as \"10s\"",
            );
        }

        problems.extend(self.chain.problems());
        problems.extend(self.attestation.problems());

        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Whether the admin listener runs (it needs a token).
    pub fn admin_enabled(&self) -> bool {
        self.admin.token.is_some() || self.admin.token_sha256.is_some()
    }

    /// The SHA-256 of the admin token, resolving the secret if needed. The plaintext is dropped
    /// (and zeroized) before this returns.
    pub fn admin_token_hash(&self) -> Result<Option<[u8; 32]>, ConfigError> {
        if let Some(r) = &self.admin.token {
            let value = r.resolve().map_err(|e| {
                ConfigError::one(
                    "admin.token",
                    format!("{r}: {e}"),
                    "point it at a readable file or a set environment variable",
                )
            })?;
            return Ok(Some(Sha256::digest(value.expose().as_bytes()).into()));
        }
        if let Some(h) = &self.admin.token_sha256 {
            let mut out = [0u8; 32];
            hex::decode_to_slice(h, &mut out).map_err(|_| {
                ConfigError::one(
                    "admin.token_sha256",
                    "is not 64 hex digits",
                    "use the output of `printf %s TOKEN | sha256sum`",
                )
            })?;
            return Ok(Some(out));
        }
        Ok(None)
    }

    /// The effective configuration as TOML, with credentials in URLs redacted (secret references
    /// name where a secret lives, never its value).
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.storage.database_url = shown.storage.database_url.as_deref().map(redact_url);
        // RPC URLs may carry credentials in their user-info.
        shown.chain.rpc_urls = shown.chain.rpc_urls.iter().map(|u| redact_url(u)).collect();
        toml::to_string_pretty(&shown)
            .unwrap_or_else(|e| format!("# configuration could not be rendered: {e}\n"))
    }
}

/// Replaces the password in a URL's user-info with `***`.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(_) => raw.to_owned(),
        Err(_) => match raw.find('@') {
            Some(at) => format!("***{}", &raw[at..]),
            None => raw.to_owned(),
        },
    }
}

/// Collapses a multi-line library error into one line.
fn flatten(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn read_toml_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::one(
            "config",
            format!("cannot read {}: {}", path.display(), e.kind()),
            "pass an existing, readable file with --config (see examples/keywarden.toml)",
        )
    })?;
    text.parse::<toml::Table>().map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
            .unwrap_or(0);
        ConfigError::one(
            format!("{}:{line}", path.display()),
            format!("not valid TOML: {}", flatten(e.message())),
            "correct the syntax at that line",
        )
    })
}

/// Applies `KEYWARDEN_<SECTION>__<KEY>` variables to the tree. Returns (key path, variable) for
/// each applied variable so errors can name the variable. Variables without `__` after the
/// prefix (such as the targets of `env:` secret references) are not overrides.
fn apply_env(
    tree: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let defaults =
        toml::Value::try_from(Config::default()).unwrap_or(toml::Value::Table(toml::Table::new()));
    let mut applied = Vec::new();
    let mut seen = BTreeSet::new();
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k[ENV_PREFIX.len()..].contains("__"))
        .collect();
    vars.sort();
    for (var, raw) in vars {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) || !seen.insert(path.clone()) {
            return Err(ConfigError::one(
                var,
                "is not of the form KEYWARDEN_<SECTION>__<KEY>",
                "rename or unset the variable",
            ));
        }
        let value = typed_env_value(&defaults, &path, &raw);
        let (last, parents) = path.split_last().unwrap_or((&path[0], &[]));
        let mut table = &mut *tree;
        for part in parents {
            let entry = table
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::one(
                        var,
                        format!("{part} is a value, not a section"),
                        "rename or unset the variable",
                    ));
                }
            };
        }
        table.insert(last.clone(), value);
        applied.push((path.join("."), var));
    }
    Ok(applied)
}

/// Environment values are text; give them the type the default config has at that key (or a
/// TOML literal's type where there is no default, e.g. optional keys), falling back to a string.
fn typed_env_value(defaults: &toml::Value, path: &[String], raw: &str) -> toml::Value {
    let mut node = Some(defaults);
    for part in path {
        node = node.and_then(|n| n.get(part));
    }
    let as_literal = || {
        format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
    };
    match node {
        Some(toml::Value::String(_)) => toml::Value::String(raw.to_owned()),
        Some(toml::Value::Boolean(_))
        | Some(toml::Value::Integer(_))
        | Some(toml::Value::Float(_))
        | Some(toml::Value::Array(_)) => {
            as_literal().unwrap_or_else(|| toml::Value::String(raw.to_owned()))
        }
        _ => match as_literal() {
            Some(
                v @ (toml::Value::Boolean(_) | toml::Value::Integer(_) | toml::Value::Float(_)),
            ) => v,
            _ => toml::Value::String(raw.to_owned()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            &Overrides::default(),
        )
    }

    #[test]
    fn shipped_defaults_are_secure() {
        let c = Config::default();
        for (key, on) in c.insecure_switches() {
            assert!(!on, "{key} must default to off");
            assert!(key.rsplit('.').next().unwrap().starts_with("insecure_"));
        }
        assert!(!c.admin_enabled(), "admin API must be off without a token");
        assert!(c.admin.listen.ip().is_loopback());
        assert!(c.metrics.listen.ip().is_loopback());
        assert!(!c.telemetry.otlp.enabled);
        assert!(!c.kms.insecure_self_attest_with_test_pki);
        c.validate().unwrap();
    }

    #[test]
    fn self_attestation_needs_a_test_pki() {
        let mut c = Config::default();
        c.kms.insecure_self_attest_with_test_pki = true;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("kms.insecure_self_attest_with_test_pki"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        c.attestation.insecure_test_pki = Some(pki.clone());
        // A directory that holds no test PKI is named, with the command that makes one.
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("attestation.insecure_test_pki") && err.contains("dev test-pki init"),
            "{err}"
        );
        crate::attestation::testpki::TestPki::generate(1_700_000_000)
            .unwrap()
            .save(&pki)
            .unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn example_config_loads_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/keywarden.toml");
        let c = Config::load(Some(&path), [], &Overrides::default()).unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = load_str("[api]\nlisen = \"127.0.0.1:1\"\n", &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("lisen"), "{msg}");
        assert!(msg.contains("fix:"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let c = load_str(
            "[api]\nlisten = \"127.0.0.1:1000\"\n",
            &[
                ("KEYWARDEN_API__LISTEN", "127.0.0.1:2000"),
                ("KEYWARDEN_TELEMETRY__OTLP__ENABLED", "true"),
                ("KEYWARDEN_STORAGE__MAX_CONNECTIONS", "3"),
                ("KEYWARDEN_ADMIN_TOKEN", "not-an-override"),
            ],
        )
        .unwrap();
        assert_eq!(c.api.listen.port(), 2000);
        assert!(c.telemetry.otlp.enabled);
        assert_eq!(c.storage.max_connections, 3);

        let mut c2 = c.clone();
        c2.apply(&Overrides {
            api_listen: Some("127.0.0.1:3000".parse().unwrap()),
            ..Default::default()
        });
        assert_eq!(c2.api.listen.port(), 3000);
    }

    #[test]
    fn unknown_env_key_names_the_variable() {
        let err = load_str("", &[("KEYWARDEN_API__LISTN", "1")]).unwrap_err();
        assert!(err.to_string().contains("KEYWARDEN_API__LISTN"), "{err}");
    }

    #[test]
    fn validation_reports_every_problem_with_a_fix() {
        let c = load_str(
            "[storage]\ndatabase_url = \"mysql://x/y\"\nmax_connections = 0\n[telemetry]\nlog_level = \"info,[\"\n",
            &[],
        )
        .unwrap();
        let err = c.validate().unwrap_err();
        assert_eq!(err.problems().len(), 3, "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with("invalid configuration: 3 problems:"),
            "{msg}"
        );
        assert!(msg.contains("storage.database_url"));
        assert!(msg.contains("telemetry.log_level"));
    }

    #[test]
    fn malformed_toml_names_the_line() {
        let err = load_str("[api]\nlisten = \n", &[]).unwrap_err().to_string();
        assert!(err.contains(":2"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn admin_on_public_address_needs_the_insecure_switch() {
        let mut c = Config::default();
        c.admin.token_sha256 = Some("ab".repeat(32));
        c.admin.listen = "0.0.0.0:8001".parse().unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("admin.listen")
        );
        c.admin.insecure_listen_public = true;
        c.validate().unwrap();
    }

    #[test]
    fn unreadable_secret_file_fails_validation() {
        let c = load_str("[admin]\ntoken = \"file:/nonexistent/kw-token\"\n", &[]).unwrap();
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("/nonexistent/kw-token"), "{msg}");
    }

    #[test]
    fn literal_admin_token_is_refused() {
        let err = load_str("[admin]\ntoken = \"hunter2\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin.token"), "{err}");
        assert!(
            !err.contains("hunter2"),
            "the literal must not be echoed: {err}"
        );
    }

    #[test]
    fn token_hash_matches_sha256_of_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "tok\n").unwrap();
        let mut c = Config::default();
        c.admin.token = Some(SecretRef::File(p));
        let h = c.admin_token_hash().unwrap().unwrap();
        assert_eq!(h, <[u8; 32]>::from(Sha256::digest(b"tok")));
    }

    #[test]
    fn database_url_password_is_redacted() {
        let mut c = Config::default();
        c.storage.database_url = Some("postgres://kw:pa55@db:5432/kw".into());
        let shown = c.to_redacted_toml();
        assert!(!shown.contains("pa55"), "{shown}");
        assert!(shown.contains("***"));
    }

    #[test]
    fn database_target_defaults_to_sqlite_under_data_dir() {
        let c = Config::default();
        assert_eq!(
            c.database_target().unwrap(),
            DatabaseTarget::Sqlite(PathBuf::from("data/keywarden.db"))
        );
    }
}
