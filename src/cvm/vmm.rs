//! dstack-vmm's answers (spec/07 §2), read tolerantly, and what two polls of one VM tell (pure):
//! its status (with the "error" the VMM does not report), uptime from its human text, whether
//! it restarted (an uptime reset), when its boot finished, its memory use, and its containers'
//! restarts; and [`VmView`], a VM as last polled. Unknown fields are ignored; a malformed answer
//! is a typed error, never a zero.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What is wrong with an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmmError {
    /// Not the JSON shape documented for the method.
    #[error("the {method} answer does not parse: {detail}")]
    Malformed {
        /// `Status`, `GetInfo`, `SysInfo`, `ListContainers`.
        method: &'static str,
        /// The parser's words.
        detail: String,
    },
    /// An uptime that is neither `never` nor a duration such as `1h 2m 3s`.
    #[error("uptime {0:?} is neither \"never\" nor a duration such as \"1h 2m 3s\"")]
    Uptime(String),
}

impl From<VmmError> for crate::http::client::ClientError {
    fn from(e: VmmError) -> Self {
        Self::Malformed(e.to_string())
    }
}

/// One `VmInfo` (only what is read; the rest is ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct VmInfo {
    /// The VM's id (a UUID).
    pub id: String,
    /// Its name.
    #[serde(default)]
    pub name: String,
    /// `running`, `exited`, `stopping`, `stopped` or `removing`.
    #[serde(default)]
    pub status: String,
    /// Human text (`"1h 2m 3s"`, `"never"`).
    #[serde(default)]
    pub uptime: String,
    /// The app id (hex).
    #[serde(default)]
    pub app_id: String,
    /// The instance id (hex), once the guest reported it.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Absent in brief answers.
    #[serde(default)]
    pub configuration: Option<VmConfiguration>,
    /// The last `boot.progress` step (`done` when ready).
    #[serde(default)]
    pub boot_progress: Option<String>,
    /// Why the boot failed, when it did.
    #[serde(default)]
    pub boot_error: Option<String>,
    /// The VMM's recent events (a ring buffer of about 20).
    #[serde(default)]
    pub events: Vec<VmEvent>,
}

/// Part of a VM's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct VmConfiguration {
    /// Memory, MB.
    #[serde(default)]
    pub memory: Option<u64>,
    /// Virtual CPUs.
    #[serde(default)]
    pub vcpu: Option<u64>,
    /// The app's `app-compose.json`, as text.
    #[serde(default)]
    pub compose_file: Option<String>,
}

/// One VMM event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct VmEvent {
    /// `boot.progress`, `boot.error`, `vmm.auto_restart.exhausted`, ...
    #[serde(default)]
    pub event: String,
    /// Its text (the progress step, the error).
    #[serde(default)]
    pub body: String,
    /// Milliseconds since the epoch.
    #[serde(default)]
    pub timestamp: u64,
}

/// `Status`'s answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct StatusAnswer {
    /// This page's VMs.
    #[serde(default)]
    pub vms: Vec<VmInfo>,
    /// VMs in all.
    #[serde(default)]
    pub total: Option<u64>,
}

/// `GetInfo`'s answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct InfoAnswer {
    /// Whether the VMM knows the id.
    #[serde(default)]
    pub found: bool,
    /// The VM.
    #[serde(default)]
    pub info: Option<VmInfo>,
}

/// The guest's `SysInfo` (memory in bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct SysInfo {
    /// Total memory.
    #[serde(default)]
    pub total_memory: u64,
    /// Available memory.
    #[serde(default)]
    pub available_memory: u64,
    /// Guest uptime, seconds.
    #[serde(default)]
    pub uptime: u64,
}

/// One container of `ListContainers`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Container {
    /// Container id.
    #[serde(default)]
    pub id: String,
    /// Names (docker's, with a leading `/`).
    #[serde(default)]
    pub names: Vec<String>,
    /// Created, Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// `running`, `restarting`, `exited`, ...
    #[serde(default)]
    pub state: String,
    /// `"Up 2 hours (healthy)"`, `"Restarting (1) 3 seconds ago"`, ...
    #[serde(default)]
    pub status: String,
}

impl Container {
    /// Its name, without docker's leading `/` (its id when it has none).
    pub fn name(&self) -> &str {
        self.names
            .first()
            .map_or(self.id.as_str(), |n| n.trim_start_matches('/'))
    }
}

/// `ListContainers`'s answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ContainersAnswer {
    /// The containers.
    #[serde(default)]
    pub containers: Vec<Container>,
}

/// One container as last seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerView {
    /// Its name.
    pub name: String,
    /// `running`, `restarting`, ...
    pub state: String,
    /// docker's words.
    pub status: String,
}

/// One VM as last polled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmView {
    /// The VMM's address, as configured.
    pub vmm: String,
    /// The VM's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its app's name (from the compose file), once a full answer told it.
    pub app: Option<String>,
    /// App id (hex).
    pub app_id: String,
    /// Instance id (hex), once known.
    pub instance_id: Option<String>,
    /// Status, with `error` derived.
    pub status: &'static str,
    /// Uptime, seconds.
    pub uptime_seconds: Option<u64>,
    /// How long its boot took (to `done`), once seen.
    pub boot_seconds: Option<f64>,
    /// Its last boot step (`done` when ready).
    pub boot_progress: Option<String>,
    /// When the gateway last saw its instance (WireGuard handshake, Unix seconds).
    pub last_seen: Option<u64>,
    /// Why its boot failed.
    pub boot_error: Option<String>,
    /// Restarts seen (uptime resets) since this process watches it.
    pub restarts: u64,
    /// Container restarts seen since this process watches it.
    pub container_restarts: u64,
    /// Memory in use / total.
    pub memory_ratio: Option<f64>,
    /// Its containers.
    pub containers: Vec<ContainerView>,
}

/// Parses `body` as `method`'s answer of type `T`.
pub fn parse<T: for<'de> Deserialize<'de>>(
    method: &'static str,
    body: &[u8],
) -> Result<T, VmmError> {
    serde_json::from_slice(body).map_err(|e| VmmError::Malformed {
        method,
        detail: e.to_string(),
    })
}

/// A VM's status, with the "error" dstack-vmm leaves to be derived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VmStatus {
    /// Running.
    Running,
    /// Stopping.
    Stopping,
    /// Stopped on purpose.
    Stopped,
    /// Being removed.
    Removing,
    /// Exited, failed to boot, or out of automatic restarts.
    Error,
    /// A status this version does not know.
    Unknown,
}

impl VmStatus {
    /// Every status, in label order.
    pub const ALL: [Self; 6] = [
        Self::Running,
        Self::Stopping,
        Self::Stopped,
        Self::Removing,
        Self::Error,
        Self::Unknown,
    ];

    /// Metric label and text.
    pub fn label(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Removing => "removing",
            Self::Error => "error",
            Self::Unknown => "unknown",
        }
    }
}

/// The status of `vm`: `error` when it exited, its boot failed, or the VMM gave up restarting it.
pub fn status(vm: &VmInfo) -> VmStatus {
    let exhausted = vm
        .events
        .iter()
        .any(|e| e.event == "vmm.auto_restart.exhausted");
    let boot_failed = vm
        .boot_error
        .as_deref()
        .is_some_and(|e| !e.trim().is_empty());
    match vm.status.as_str() {
        "exited" => VmStatus::Error,
        _ if boot_failed || exhausted => VmStatus::Error,
        "running" => VmStatus::Running,
        "stopping" => VmStatus::Stopping,
        "stopped" => VmStatus::Stopped,
        "removing" => VmStatus::Removing,
        _ => VmStatus::Unknown,
    }
}

/// An uptime in the VMM's human form: `None` for `never`.
pub fn parse_uptime(text: &str) -> Result<Option<Duration>, VmmError> {
    let t = text.trim();
    if t.is_empty() || t == "never" {
        return Ok(None);
    }
    humantime::parse_duration(t)
        .map(Some)
        .map_err(|_| VmmError::Uptime(text.to_owned()))
}

/// The app's name, from the `name` of the compose file in `vm`'s configuration (only full
/// answers carry it). An unreadable compose file gives no name rather than an error: the VM is
/// still watched.
pub fn app_name(vm: &VmInfo) -> Option<String> {
    let compose = vm.configuration.as_ref()?.compose_file.as_deref()?;
    let value: serde_json::Value = serde_json::from_str(compose).ok()?;
    value["name"]
        .as_str()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
}

/// When `vm`'s boot reached `done` (Unix milliseconds), from its events.
pub fn boot_done_at(vm: &VmInfo) -> Option<u64> {
    vm.events
        .iter()
        .filter(|e| e.event == "boot.progress" && e.body.trim() == "done")
        .map(|e| e.timestamp)
        .max()
}

/// How long `vm` took to boot: from its process start (`polled_at` − uptime) to the `done`
/// event. `None` while it has not finished, or when the event was lost.
pub fn boot_duration(vm: &VmInfo, uptime: Option<Duration>, polled_at_ms: u64) -> Option<Duration> {
    let done = boot_done_at(vm)?;
    let started = polled_at_ms.checked_sub(u64::try_from(uptime?.as_millis()).ok()?)?;
    done.checked_sub(started).map(Duration::from_millis)
}

/// Whether the VM restarted between two polls `elapsed` apart: its uptime is short of what it
/// would be without a restart (before + elapsed) by more than the text's one-second resolution
/// and the polls' timing allow.
pub fn restarted(before: Option<Duration>, now: Option<Duration>, elapsed: Duration) -> bool {
    match (before, now) {
        (Some(b), Some(n)) => n + Duration::from_secs(2) + elapsed / 20 < b + elapsed,
        _ => false,
    }
}

/// The share of the guest's memory in use ((total − available) / total); `None` when the guest
/// reports no total.
pub fn memory_ratio(sys: &SysInfo) -> Option<f64> {
    (sys.total_memory > 0).then(|| {
        sys.total_memory.saturating_sub(sys.available_memory) as f64 / sys.total_memory as f64
    })
}

/// How long a container has been up, from docker's status text (`"Up 2 hours (healthy)"`).
fn up_for(status: &str) -> Option<Duration> {
    let rest = status.trim().strip_prefix("Up ")?;
    let words: String = rest.split(" (").next()?.trim().to_owned();
    let text = match words.as_str() {
        "Less than a second" => return Some(Duration::ZERO),
        "About a minute" => "1 minute".to_owned(),
        "About an hour" => "1 hour".to_owned(),
        other => other.replace(" ago", ""),
    };
    let mut n: Option<u64> = None;
    let mut total = Duration::ZERO;
    for word in text.split_whitespace() {
        match (n, word.parse::<u64>()) {
            (None, Ok(v)) => n = Some(v),
            (Some(v), Err(_)) => {
                let unit = match word.trim_end_matches('s') {
                    "second" => 1,
                    "minute" => 60,
                    "hour" => 3600,
                    "day" => 86_400,
                    "week" => 604_800,
                    "month" => 2_592_000,
                    "year" => 31_536_000,
                    _ => return None,
                };
                total += Duration::from_secs(v.saturating_mul(unit));
                n = None;
            }
            _ => return None,
        }
    }
    Some(total)
}

/// Container restarts between two polls, by name: a transition into `restarting`, a new id or
/// creation time under the same name, or an "Up" time that went back.
pub fn container_restarts(before: &[Container], now: &[Container]) -> u64 {
    now.iter()
        .filter(|c| {
            let Some(b) = before.iter().find(|b| b.name() == c.name()) else {
                return false;
            };
            let into_restarting = c.state == "restarting" && b.state != "restarting";
            let replaced = c.id != b.id || c.created != b.created;
            // docker's "Up" text never goes back while a container runs.
            let up_went_back = matches!(
                (up_for(&b.status), up_for(&c.status)),
                (Some(was), Some(is)) if is < was
            );
            into_restarting || replaced || up_went_back
        })
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vm(status: &str) -> VmInfo {
        VmInfo {
            id: "7e1e6f2c-0000-0000-0000-000000000001".into(),
            status: status.into(),
            ..VmInfo::default()
        }
    }

    #[test]
    fn the_app_name_comes_from_the_compose_file_of_a_full_answer() {
        let with = |compose: Option<&str>| VmInfo {
            configuration: Some(VmConfiguration {
                compose_file: compose.map(str::to_owned),
                ..VmConfiguration::default()
            }),
            ..vm("running")
        };
        let named = with(Some(
            r#"{"manifest_version":2,"name":" billing ","runner":"docker-compose"}"#,
        ));
        assert_eq!(app_name(&named).as_deref(), Some("billing"));
        assert_eq!(app_name(&with(Some(r#"{"name":""}"#))), None);
        assert_eq!(app_name(&with(Some("not json"))), None);
        assert_eq!(app_name(&with(None)), None);
        assert_eq!(
            app_name(&vm("running")),
            None,
            "a brief answer has no configuration"
        );
    }

    #[test]
    fn documented_answers_parse_and_unknown_fields_are_ignored() {
        let body = br#"{"vms":[{"id":"a","name":"web","status":"running","uptime":"1h 2m 3s","app_url":"x",
            "app_id":"ab","instance_id":"cd","configuration":{"memory":2048,"vcpu":2,"image":"dstack-0.5"},
            "boot_progress":"done","boot_error":"","events":[{"event":"boot.progress","body":"done","timestamp":1700000000000}],
            "image_version":"0.5.3","new_field":{"x":1}}],"port_mapping_enabled":false,"total":1}"#;
        let s: StatusAnswer = parse("Status", body).unwrap();
        assert_eq!(s.total, Some(1));
        let v = &s.vms[0];
        assert_eq!(status(v), VmStatus::Running);
        assert_eq!(v.configuration.as_ref().unwrap().memory, Some(2048));
        assert_eq!(
            parse_uptime(&v.uptime).unwrap(),
            Some(Duration::from_secs(3723))
        );
        assert_eq!(boot_done_at(v), Some(1_700_000_000_000));
        let err = parse::<StatusAnswer>("Status", br#"{"vms":{"id":1}}"#).unwrap_err();
        assert!(matches!(
            err,
            VmmError::Malformed {
                method: "Status",
                ..
            }
        ));
    }

    #[test]
    fn exited_failed_and_exhausted_vms_are_in_error() {
        assert_eq!(status(&vm("exited")), VmStatus::Error);
        assert_eq!(
            status(&VmInfo {
                boot_error: Some("disk full".into()),
                ..vm("running")
            }),
            VmStatus::Error
        );
        assert_eq!(
            status(&VmInfo {
                events: vec![VmEvent {
                    event: "vmm.auto_restart.exhausted".into(),
                    ..VmEvent::default()
                }],
                ..vm("stopped")
            }),
            VmStatus::Error
        );
        assert_eq!(status(&vm("stopped")), VmStatus::Stopped);
        assert_eq!(status(&vm("hibernating")), VmStatus::Unknown);
    }

    #[test]
    fn uptimes_in_the_vmm_s_words() {
        assert_eq!(parse_uptime("never").unwrap(), None);
        assert_eq!(parse_uptime("45s").unwrap(), Some(Duration::from_secs(45)));
        assert_eq!(
            parse_uptime("2d 3h").unwrap(),
            Some(Duration::from_secs(2 * 86_400 + 3 * 3600))
        );
        assert_eq!(parse_uptime("soon"), Err(VmmError::Uptime("soon".into())));
    }

    #[test]
    fn boot_duration_runs_from_process_start_to_done() {
        let v = VmInfo {
            events: vec![VmEvent {
                event: "boot.progress".into(),
                body: "done".into(),
                timestamp: 100_000,
            }],
            ..vm("running")
        };
        // Polled at 130 s with 70 s of uptime: started at 60 s, done at 100 s.
        assert_eq!(
            boot_duration(&v, Some(Duration::from_secs(70)), 130_000),
            Some(Duration::from_secs(40))
        );
        assert_eq!(
            boot_duration(&vm("running"), Some(Duration::from_secs(70)), 130_000),
            None
        );
    }

    #[test]
    fn an_uptime_reset_is_a_restart() {
        let s = Duration::from_secs;
        assert!(restarted(Some(s(3600)), Some(s(5)), s(30)));
        // Restarted 20 s ago, having run 5 s at the last poll 30 s ago.
        assert!(restarted(Some(s(5)), Some(s(20)), s(30)));
        assert!(!restarted(Some(s(3600)), Some(s(3630)), s(30)));
        // One-second resolution: not a restart.
        assert!(!restarted(Some(s(3600)), Some(s(3599)), s(0)));
        assert!(!restarted(None, Some(s(5)), s(30)));
    }

    #[test]
    fn memory_ratio_is_used_over_total() {
        let sys = SysInfo {
            total_memory: 1000,
            available_memory: 50,
            uptime: 1,
        };
        assert_eq!(memory_ratio(&sys), Some(0.95));
        assert_eq!(memory_ratio(&SysInfo::default()), None);
    }

    fn container(id: &str, state: &str, status: &str) -> Container {
        Container {
            id: id.into(),
            names: vec!["/app".into()],
            created: 1,
            state: state.into(),
            status: status.into(),
        }
    }

    fn restarts(before: &Container, now: &Container) -> u64 {
        container_restarts(std::slice::from_ref(before), std::slice::from_ref(now))
    }

    #[test]
    fn container_restarts_from_state_id_and_up_time() {
        let s = Duration::from_secs;
        let up = container("a", "running", "Up 2 hours (healthy)");
        assert_eq!(restarts(&up, &container("a", "running", "Up 3 hours")), 0);
        assert_eq!(restarts(&up, &up), 0);
        let restarting = container("a", "restarting", "Restarting (1) 3 seconds ago");
        assert_eq!(restarts(&up, &restarting), 1);
        // Still restarting: the same restart.
        assert_eq!(restarts(&restarting, &restarting), 0);
        let replaced = container("b", "running", "Up 5 seconds");
        assert_eq!(restarts(&up, &replaced), 1);
        let went_back = container("a", "running", "Up 10 seconds");
        assert_eq!(restarts(&up, &went_back), 1);
        assert_eq!(up_for("Up About an hour"), Some(s(3600)));
        assert_eq!(up_for("Up Less than a second"), Some(s(0)));
        assert_eq!(up_for("Exited (0) 2 minutes ago"), None);
        // A container that appeared is not a restart.
        assert_eq!(container_restarts(&[], &[up]), 0);
    }

    proptest! {
        #[test]
        fn answers_and_texts_never_panic(body in proptest::collection::vec(any::<u8>(), 0..400), text in ".{0,40}") {
            let _ = parse::<StatusAnswer>("Status", &body);
            let _ = parse::<InfoAnswer>("GetInfo", &body);
            let _ = parse::<ContainersAnswer>("ListContainers", &body);
            let _ = parse_uptime(&text);
            let _ = up_for(&text);
        }

        #[test]
        fn status_bodies_with_any_field_values_never_panic(state in ".{0,12}", uptime in ".{0,12}", ts in any::<u64>()) {
            let v = serde_json::json!({"vms": [{"id": "x", "status": state, "uptime": uptime,
                "events": [{"event": "boot.progress", "body": "done", "timestamp": ts}]}]});
            let s: StatusAnswer = parse("Status", v.to_string().as_bytes()).unwrap();
            let vm = &s.vms[0];
            let _ = status(vm);
            let up = parse_uptime(&vm.uptime).ok().flatten();
            let _ = boot_duration(vm, up, ts);
        }
    }
}
