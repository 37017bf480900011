//! The `[telemetry]` section: logs, the audit log file and trace export.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::problem::{Problem, http_url, one_line};

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

impl TelemetryConfig {
    /// Problems of the section, each with its fix.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log_level) {
            out.push(Problem::new(
                "telemetry.log_level",
                format!(
                    "{:?} is not a valid filter: {}",
                    self.log_level,
                    one_line(&e.to_string())
                ),
                "use a level (info, debug, ...) or EnvFilter directives such as \"info,keywarden=debug\"",
            ));
        }
        if self.otlp.enabled {
            out.extend(http_url(
                "telemetry.otlp.endpoint",
                "is",
                &self.otlp.endpoint,
                "use http://HOST:PORT or https://HOST:PORT",
            ));
            if self.otlp.service_name.trim().is_empty() {
                out.push(Problem::new(
                    "telemetry.otlp.service_name",
                    "is empty",
                    "set a service name such as \"keywarden\"",
                ));
            }
        }
        out
    }
}
