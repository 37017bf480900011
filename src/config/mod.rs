//! Configuration: what the operator can set, where it comes from, and whether it is safe. The
//! tree has one section per subsystem, each defined, defaulted and checked in that subsystem's
//! `config.rs`; this module merges the sources and collects the sections' problems.
//!
//! Flow: built-in defaults ← TOML file (`--config`) ← environment (`KEYWARDEN_<SECTION>__<KEY>`)
//! ← command-line flags. The merged tree is deserialized with unknown keys refused, then
//! [`Config::validate`] collects every problem (with its fix) into one message. Risky switches are
//! all named `insecure_*`, default off, and listed by [`Config::insecure_switches`] so start-up can
//! warn about each one that is on.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::attestation::config::AttestationConfig;
use crate::chain::config::ChainConfig;
use crate::http::config::{AdminConfig, ApiConfig, MetricsConfig, port_conflicts};
use crate::kms::config::{AuthConfig, KmsConfig};
pub use crate::problem::Problem;
use crate::runtime::config::RuntimeConfig;
pub use crate::secret::{SecretError, SecretRef, SecretValue, redact_url};
pub use crate::store::config::{DatabaseTarget, StorageConfig};
use crate::telemetry::config::TelemetryConfig;

/// Prefix of environment variables that override config keys.
pub const ENV_PREFIX: &str = "KEYWARDEN_";

/// The whole service configuration: one section per subsystem, each defined, defaulted and
/// checked in its subsystem's `config.rs`.
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
    pub attestation: AttestationConfig,
    /// KMS root keys and RPC certificate.
    pub kms: KmsConfig,
    /// Who authorizes boots.
    pub auth: AuthConfig,
    /// The on-chain mirror of DstackKms and its apps.
    pub chain: ChainConfig,
    /// Governance watching.
    pub governance: crate::governance::config::GovernanceConfig,
    /// Where alerts go.
    pub alerts: crate::alerts::config::AlertsConfig,
    /// CVM health sources.
    pub cvm: crate::cvm::config::CvmConfig,
    /// Several replicas on one PostgreSQL.
    pub cluster: crate::cluster::config::ClusterConfig,
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
                let inner = crate::problem::one_line(&e.inner().to_string());
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
        all.extend(self.auth.insecure_switches());
        all.extend(self.kms.insecure_switches());
        all
    }

    /// The database selected by `storage`.
    pub fn database_target(&self) -> Result<DatabaseTarget, ConfigError> {
        self.storage
            .database_target()
            .map_err(|p| ConfigError::Invalid(vec![p]))
    }

    /// Checks everything that can be checked without touching the network or the database,
    /// including that secrets resolve: every section's problems, at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = [
            self.storage.problems(),
            port_conflicts(&self.api, &self.metrics, &self.admin),
            self.api.problems(),
            self.admin.problems(),
            self.telemetry.problems(),
            self.kms
                .problems(self.attestation.insecure_test_pki.is_some()),
            self.auth.problems(),
            self.runtime.problems(),
            self.chain.problems(),
            self.governance.problems(),
            self.alerts.problems(),
            self.cvm.problems(),
            self.cluster.problems(matches!(
                self.storage.database_target(),
                Ok(DatabaseTarget::Postgres(_))
            )),
            self.attestation.problems(),
        ]
        .concat();
        ConfigError::check(problems)
    }

    /// Whether the admin listener runs (it needs a token).
    pub fn admin_enabled(&self) -> bool {
        self.admin.enabled()
    }

    /// The SHA-256 of the admin token, resolving the secret if needed.
    pub fn admin_token_hash(&self) -> Result<Option<[u8; 32]>, ConfigError> {
        self.admin
            .token_hash()
            .map_err(|p| ConfigError::Invalid(vec![p]))
    }

    /// The effective configuration as TOML, with credentials in URLs redacted (secret references
    /// name where a secret lives, never its value).
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.storage = shown.storage.redacted();
        // RPC URLs may carry credentials in their user-info.
        shown.chain.rpc_urls = shown.chain.rpc_urls.iter().map(|u| redact_url(u)).collect();
        toml::to_string_pretty(&shown)
            .unwrap_or_else(|e| format!("# configuration could not be rendered: {e}\n"))
    }
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
            format!("not valid TOML: {}", crate::problem::one_line(e.message())),
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

    #[test]
    fn kms_os_images_from_the_environment_round_trip_through_the_loader() {
        use crate::kms::osimage::{OsImage, env_value};
        let images = vec![
            OsImage::new(&[5; 32], &[0x11; 48], &[[0x22; 48], [0x33; 48], [0x44; 48]]),
            OsImage::new(&[7; 32], &[1; 48], &[[2; 48], [3; 48], [4; 48]]),
        ];
        let cfg = Config::load(
            None,
            [("KEYWARDEN_KMS__OS_IMAGES".to_owned(), env_value(&images))],
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(cfg.kms.os_images, images);
    }

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
        // Start-up reads the root certificate from it (the content is checked then).
        std::fs::create_dir_all(&pki).unwrap();
        std::fs::write(
            pki.join(crate::attestation::testroot::ROOT_CERT_DER),
            b"root",
        )
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
        assert_eq!(
            h,
            <[u8; 32]>::from(<sha2::Sha256 as sha2::Digest>::digest(b"tok"))
        );
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
