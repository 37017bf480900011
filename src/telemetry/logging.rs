//! Log and trace output.
//!
//! One subscriber: an EnvFilter (`RUST_LOG` over `telemetry.log_level`), text with colour on a
//! TTY or JSON lines otherwise, an optional JSON audit file receiving the `audit` target, and
//! the OpenTelemetry layer. The OpenTelemetry layer is always installed so every span has a
//! trace id that JSON lines carry as `trace_id`; spans are exported only when OTLP is enabled.

use std::fmt;
use std::io::IsTerminal;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::{Map, Value};
use tracing::dispatcher::WeakDispatch;
use tracing::field::{Field, Visit};
use tracing::{Dispatch, Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use super::config::{LogFormat, OtlpProtocol, TelemetryConfig};

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// `RUST_LOG` or `telemetry.log_level` does not parse.
    #[error(
        "log filter {filter:?} is invalid: {reason} (fix: use EnvFilter syntax such as \"info,keywarden=debug\")"
    )]
    Filter {
        /// The filter text.
        filter: String,
        /// Why.
        reason: String,
    },
    /// The audit file cannot be opened for appending.
    #[error(
        "cannot open audit file {path}: {reason} (fix: point telemetry.audit_file at a writable location)"
    )]
    AuditFile {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The OTLP exporter could not be built.
    #[error(
        "cannot set up OTLP export to {endpoint}: {reason} (fix: check telemetry.otlp.endpoint and protocol)"
    )]
    Otlp {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// A subscriber was already installed (only in tests that init twice).
    #[error("logging is already initialised")]
    AlreadyInitialised,
}

/// Keeps log writers and the tracer provider alive; [`LogGuard::shutdown`] flushes pending spans.
pub struct LogGuard {
    provider: SdkTracerProvider,
    _audit: Option<tracing_appender::non_blocking::WorkerGuard>,
}

impl LogGuard {
    /// Exports spans still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "trace exporter did not shut down cleanly");
        }
    }
}

/// Installs the global subscriber. Call once, inside the tokio runtime (the gRPC exporter needs it).
pub fn init(cfg: &TelemetryConfig) -> Result<LogGuard, LoggingError> {
    let filter_text = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| cfg.log_level.clone());
    let filter = || {
        EnvFilter::builder()
            .parse(&filter_text)
            .map_err(|e| LoggingError::Filter {
                filter: filter_text.clone(),
                reason: e.to_string(),
            })
    };

    let dispatch = DispatchHandle::default();
    let stdout_is_tty = std::io::stdout().is_terminal();
    let json = match cfg.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !stdout_is_tty,
    };
    let stdout_layer = if json {
        tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines::new(dispatch.clone()))
            .with_writer(std::io::stdout)
            .with_filter(filter()?)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(cfg.log_color.unwrap_or(stdout_is_tty))
            .with_target(true)
            .with_writer(std::io::stdout)
            .with_filter(filter()?)
            .boxed()
    };

    let (audit_layer, audit_guard) = match &cfg.audit_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| LoggingError::AuditFile {
                    path: path.display().to_string(),
                    reason: e.kind().to_string(),
                })?;
            let (writer, guard) = tracing_appender::non_blocking(file);
            let layer = tracing_subscriber::fmt::layer()
                .fmt_fields(JsonFields::new())
                .event_format(JsonLines::new(dispatch.clone()))
                .with_writer(writer)
                .with_filter(
                    Targets::new().with_target(super::AUDIT_TARGET, tracing::Level::TRACE),
                );
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };

    let provider = tracer_provider(cfg)?;
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("keywarden"))
        .with_filter(filter()?);

    tracing_subscriber::registry()
        .with(dispatch)
        .with(stdout_layer)
        .with(audit_layer)
        .with(otel_layer)
        .try_init()
        .map_err(|_| LoggingError::AlreadyInitialised)?;
    Ok(LogGuard {
        provider,
        _audit: audit_guard,
    })
}

fn tracer_provider(cfg: &TelemetryConfig) -> Result<SdkTracerProvider, LoggingError> {
    let resource = Resource::builder()
        .with_service_name(cfg.otlp.service_name.clone())
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    if !cfg.otlp.enabled {
        return Ok(builder.build());
    }
    let otlp = &cfg.otlp;
    let err = |e: &dyn fmt::Display| LoggingError::Otlp {
        endpoint: otlp.endpoint.clone(),
        reason: e.to_string(),
    };
    let exporter = match otlp.protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(otlp.endpoint.clone())
            .with_timeout(otlp.timeout)
            .build()
            .map_err(|e| err(&e))?,
        OtlpProtocol::Http => {
            // A programmatic endpoint is used as-is, so name the traces path ourselves.
            let base = otlp.endpoint.trim_end_matches('/');
            let url = if base.ends_with("/v1/traces") {
                base.to_owned()
            } else {
                format!("{base}/v1/traces")
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(url)
                .with_timeout(otlp.timeout)
                .with_headers(Default::default())
                .build()
                .map_err(|e| err(&e))?
        }
    };
    Ok(builder.with_batch_exporter(exporter).build())
}

/// The subscriber's own dispatch, captured when it is registered. The formatter needs it to ask
/// the OpenTelemetry layer for a span's ids: asking `dispatcher::get_default` from inside an event
/// yields the no-op dispatcher while a scoped one is active.
#[derive(Clone, Default)]
pub struct DispatchHandle(Arc<OnceLock<WeakDispatch>>);

impl<S: Subscriber> Layer<S> for DispatchHandle {
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        let _ = self.0.set(subscriber.downgrade());
    }
}

/// JSON lines: `timestamp`, `level`, `target`, `message`, `fields`, `spans` (root first, each with
/// its fields), and `trace_id`/`span_id` of the innermost span.
pub struct JsonLines {
    dispatch: DispatchHandle,
}

impl JsonLines {
    /// A formatter resolving trace ids through `dispatch` (add the handle to the subscriber too).
    pub fn new(dispatch: DispatchHandle) -> Self {
        Self { dispatch }
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = FieldMap(Map::new());
        event.record(&mut fields);
        let message = fields.0.remove("message").unwrap_or(Value::Null);

        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            humantime::format_rfc3339_millis(SystemTime::now())
                .to_string()
                .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        line.insert("message".into(), message);
        if !fields.0.is_empty() {
            line.insert("fields".into(), Value::Object(fields.0));
        }
        if let Some(scope) = ctx.event_scope() {
            let mut spans = Vec::new();
            let mut leaf = None;
            for span in scope.from_root() {
                let ext = span.extensions();
                let mut entry = ext
                    .get::<FormattedFields<N>>()
                    .and_then(|f| serde_json::from_str::<Map<String, Value>>(f).ok())
                    .unwrap_or_default();
                entry.insert("name".into(), span.name().into());
                spans.push(Value::Object(entry));
                leaf = Some(span.id());
            }
            line.insert("spans".into(), Value::Array(spans));
            // No extension lock may be held here: the OpenTelemetry layer takes it to build the context.
            let dispatch = self.dispatch.0.get().and_then(WeakDispatch::upgrade);
            let cx = leaf
                .zip(dispatch)
                .and_then(|(id, d)| tracing_opentelemetry::get_otel_context(&id, &d));
            if let Some(cx) = cx {
                let sc = cx.span().span_context().clone();
                if sc.is_valid() {
                    line.insert("trace_id".into(), sc.trace_id().to_string().into());
                    line.insert("span_id".into(), sc.span_id().to_string().into());
                }
            }
        }
        let text = serde_json::to_string(&Value::Object(line)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

struct FieldMap(Map<String, Value>);

impl Visit for FieldMap {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_line_carries_message_fields_spans_and_trace_id() {
        let buf = Buf::default();
        let w = buf.clone();
        let provider = SdkTracerProvider::builder().build();
        let dispatch = DispatchHandle::default();
        let subscriber = tracing_subscriber::registry()
            .with(dispatch.clone())
            .with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(JsonFields::new())
                    .event_format(JsonLines::new(dispatch))
                    .with_writer(move || w.clone()),
            )
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", method = "GetAppKey");
            let _g = span.enter();
            tracing::info!(reason = "debug_td", "attestation verification failed");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert_eq!(v["message"], "attestation verification failed");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["fields"]["reason"], "debug_td");
        assert_eq!(v["spans"][0]["name"], "request");
        assert_eq!(v["spans"][0]["method"], "GetAppKey");
        let trace_id = v["trace_id"].as_str().unwrap();
        assert_eq!(trace_id.len(), 32);
        assert_ne!(trace_id, "0".repeat(32));
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
