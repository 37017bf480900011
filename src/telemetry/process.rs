//! `keywarden_*` process metrics: build info, uptime, start-up time, health, panics, memory, fds.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// Which listener a request arrived on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Listener {
    /// The KMS API.
    Api,
    /// Metrics and health.
    Metrics,
    /// Operator API.
    Admin,
}

impl Listener {
    /// Lowercase name, as used in metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Metrics => "metrics",
            Self::Admin => "admin",
        }
    }
}

impl EncodeLabelValue for Listener {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    git_sha: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: Listener,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: &'static str,
}

/// Process-level metrics. Cheap to clone; all clones update the same series.
#[derive(Clone, Debug)]
pub struct ProcessMetrics {
    healthy: Gauge,
    heartbeat: Gauge,
    startup_duration: Gauge<f64, AtomicU64>,
    handler_panics: Family<ListenerLabels, Counter>,
    task_panics: Family<TaskLabels, Counter>,
    open_connections: Family<ListenerLabels, Gauge>,
    connections_shed: Family<ListenerLabels, Counter>,
    connections_refused: Family<ListenerLabels, Counter>,
    accept_errors: Family<ListenerLabels, Counter>,
}

/// What happened to a connection of the metrics or admin listener (the KMS listener counts its
/// own as `dstack_kms_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// Admitted.
    Opened,
    /// Closed.
    Closed,
    /// Closed while idle to make room for a new one.
    Shed,
    /// Refused: every open connection had a request in flight.
    Refused,
    /// `accept` failed.
    AcceptFailed,
}

impl ProcessMetrics {
    /// Registers the process metrics.
    pub fn new(registry: &mut Registry) -> Self {
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                git_sha: super::GIT_SHA,
            })
            .set(1);
        registry.register(
            "keywarden_build_info",
            "Build information (always 1), by version and git revision",
            build,
        );
        let m = Self {
            healthy: Gauge::default(),
            heartbeat: Gauge::default(),
            startup_duration: Gauge::default(),
            handler_panics: Family::default(),
            task_panics: Family::default(),
            open_connections: Family::default(),
            connections_shed: Family::default(),
            connections_refused: Family::default(),
            accept_errors: Family::default(),
        };
        registry.register(
            "keywarden_http_open_connections",
            "Open connections on the metrics and admin listeners, by listener",
            m.open_connections.clone(),
        );
        registry.register(
            "keywarden_http_connections_shed",
            "Idle connections closed to make room on the metrics and admin listeners, by listener",
            m.connections_shed.clone(),
        );
        registry.register(
            "keywarden_http_connections_refused",
            "Connections refused at the cap on the metrics and admin listeners (every one busy), by listener",
            m.connections_refused.clone(),
        );
        registry.register(
            "keywarden_http_accept_errors",
            "Failed accepts on the metrics and admin listeners (e.g. out of file descriptors), by listener",
            m.accept_errors.clone(),
        );
        registry.register(
            "keywarden_heartbeat_timestamp_seconds",
            "When the health monitor last ran its check (Unix seconds): absent or old, nothing watches",
            m.heartbeat.clone(),
        );
        registry.register(
            "keywarden_healthy",
            "1 when the database answers and every component is ready, else 0",
            m.healthy.clone(),
        );
        registry.register(
            "keywarden_startup_duration_seconds",
            "Time from process start until every listener was serving",
            m.startup_duration.clone(),
        );
        registry.register(
            "keywarden_handler_panics",
            "Request handler panics caught and answered with 500, by listener",
            m.handler_panics.clone(),
        );
        registry.register(
            "keywarden_background_task_panics",
            "Panics in long-running background tasks, by task",
            m.task_panics.clone(),
        );
        // Every closed-enum series starts at 0 so rates and alerts see it before the first event.
        for listener in [Listener::Api, Listener::Metrics, Listener::Admin] {
            let _ = m.handler_panics.get_or_create(&ListenerLabels { listener });
        }
        for listener in [Listener::Metrics, Listener::Admin] {
            let labels = ListenerLabels { listener };
            let _ = m.open_connections.get_or_create(&labels);
            let _ = m.connections_shed.get_or_create(&labels);
            let _ = m.connections_refused.get_or_create(&labels);
            let _ = m.accept_errors.get_or_create(&labels);
        }
        registry.register_collector(Box::new(ProcessCollector {
            started: Arc::new(Instant::now()),
        }));
        m
    }

    /// Sets `keywarden_healthy`.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.set(i64::from(healthy));
    }

    /// Sets `keywarden_heartbeat_timestamp_seconds` to `now` (Unix seconds).
    pub fn beat(&self, now: i64) {
        self.heartbeat.set(now);
    }

    /// Records the start-up duration.
    pub fn set_startup_duration(&self, seconds: f64) {
        self.startup_duration.set(seconds);
    }

    /// Records a connection event of `listener`.
    pub fn connection(&self, listener: Listener, event: ConnectionEvent) {
        let labels = ListenerLabels { listener };
        match event {
            ConnectionEvent::Opened => {
                self.open_connections.get_or_create(&labels).inc();
            }
            ConnectionEvent::Closed => {
                self.open_connections.get_or_create(&labels).dec();
            }
            ConnectionEvent::Shed => {
                self.connections_shed.get_or_create(&labels).inc();
            }
            ConnectionEvent::Refused => {
                self.connections_refused.get_or_create(&labels).inc();
            }
            ConnectionEvent::AcceptFailed => {
                self.accept_errors.get_or_create(&labels).inc();
            }
        }
    }

    /// Counts a handler panic on `listener`.
    pub fn handler_panicked(&self, listener: Listener) {
        self.handler_panics
            .get_or_create(&ListenerLabels { listener })
            .inc();
    }

    /// Shows a supervised task's panic counter (at 0) from the moment it starts.
    pub fn task_started(&self, task: &'static str) {
        let _ = self.task_panics.get_or_create(&TaskLabels { task });
    }

    /// Counts a background task panic.
    pub fn task_panicked(&self, task: &'static str) {
        self.task_panics.get_or_create(&TaskLabels { task }).inc();
    }
}

/// Values read from the operating system on each scrape.
#[derive(Debug)]
struct ProcessCollector {
    started: Arc<Instant>,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let uptime = ConstGauge::new(self.started.elapsed().as_secs_f64());
        let e = encoder.encode_descriptor(
            "keywarden_uptime_seconds",
            "Seconds since the process started",
            None,
            uptime.metric_type(),
        )?;
        uptime.encode(e)?;
        if let Some(rss) = resident_memory_bytes() {
            let g = ConstGauge::new(rss);
            let e = encoder.encode_descriptor(
                "keywarden_process_resident_memory_bytes",
                "Resident memory of the process (Linux only)",
                None,
                g.metric_type(),
            )?;
            g.encode(e)?;
        }
        if let Some(fds) = open_fds() {
            let g = ConstGauge::new(fds);
            let e = encoder.encode_descriptor(
                "keywarden_process_open_fds",
                "Open file descriptors of the process (Linux only)",
                None,
                g.metric_type(),
            )?;
            g.encode(e)?;
        }
        Ok(())
    }
}

/// Resident set size from `/proc/self/status` (no unsafe `sysconf` needed for the page size).
pub fn resident_memory_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn open_fds() -> Option<i64> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count();
    i64::try_from(n).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_metrics_are_exported() {
        let mut r = Registry::default();
        let m = ProcessMetrics::new(&mut r);
        m.task_panicked("health_monitor");
        m.set_healthy(true);
        let text = crate::telemetry::encode(&r).unwrap();
        assert!(text.contains("keywarden_build_info{version=\""), "{text}");
        assert!(text.contains("keywarden_uptime_seconds "));
        assert!(text.contains("keywarden_healthy 1"));
        assert!(text.contains("keywarden_background_task_panics_total{task=\"health_monitor\"} 1"));
        if cfg!(target_os = "linux") {
            assert!(text.contains("keywarden_process_resident_memory_bytes "));
            assert!(text.contains("keywarden_process_open_fds "));
        }
    }
}
