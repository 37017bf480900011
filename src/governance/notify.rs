//! Tells signers and on-call what governance is about to do: each timelock operation's
//! transitions (scheduled → ready → executed or cancelled), with what its calls would do,
//! decoded and classified, and how many instances received keys lately with a measurement it
//! removes.
//!
//! Flow, per tick: the published [`GovernanceState`] → each operation's current transition →
//! one not recorded yet → its calls decoded ([`super::decode`]) → removed measurements counted in
//! the boot records over `governance.in_use_window` → findings ([`super::classify`]) → an
//! [`Alert`] recorded in the outbox ([`crate::alerts::outbox::Outbox::record`]: the transition and
//! its deliveries in one transaction, so a restart sends nothing twice and misses nothing).
//! An operation first seen already executed or cancelled (history) is recorded without delivery.
//! Log lines: `new governance proposal` when one is scheduled, `governance: suspicious
//! transaction` (and an audit record) when its findings are critical.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256};
use tokio_util::sync::CancellationToken;

use super::classify::{self, Context, Counted, Finding, Measurement, Severity};
use super::decode;
use super::metrics::GovernanceMetrics;
use super::safe_tx::Operation;
use super::state::{GovernanceState, OperationStatus, TimelockOperation};
use super::watch::GovernanceView;
use crate::alerts::Alert;
use crate::alerts::outbox::Outbox;
use crate::runtime::Task;
use crate::store::{ServedColumn, Store};

/// How often the state is looked at.
const TICK: Duration = Duration::from_secs(1);

/// Subjects of this module's alerts start with this.
const KEY_PREFIX: &str = "governance:";

/// The alert name of a timelock operation.
pub const TIMELOCK_ALERT: &str = "GovernanceTimelockOperation";

/// The governance notifier task.
pub struct Notifier {
    view: Arc<GovernanceView>,
    outbox: Outbox,
    store: Store,
    window: Duration,
    metrics: GovernanceMetrics,
}

/// What an operation's calls would do.
struct Assessment {
    words: Vec<String>,
    findings: Vec<Finding>,
}

impl Assessment {
    fn worst(&self) -> Severity {
        self.findings
            .iter()
            .map(|f| f.severity)
            .max()
            .unwrap_or(Severity::Info)
    }

    fn affected(&self) -> u64 {
        self.findings
            .iter()
            .filter_map(|f| f.affected_instances)
            .max()
            .unwrap_or(0)
    }
}

fn transition(op: &TimelockOperation, now: u64) -> &'static str {
    match op.status {
        OperationStatus::Done => "executed",
        OperationStatus::Cancelled => "cancelled",
        OperationStatus::Pending if op.ready_at.is_some_and(|t| t <= now) => "ready",
        OperationStatus::Pending => "scheduled",
    }
}

fn window_words(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl Notifier {
    /// A notifier over `view`, recording into `outbox`, counting use in `store`'s boot records
    /// over `window`.
    pub fn new(
        view: Arc<GovernanceView>,
        outbox: Outbox,
        store: Store,
        window: Duration,
        metrics: GovernanceMetrics,
    ) -> Self {
        Self {
            view,
            outbox,
            store,
            window,
            metrics,
        }
    }

    /// Instances that received keys with each removed measurement within the window.
    async fn usage(&self, removed: &[Measurement]) -> anyhow::Result<Counted> {
        let since = crate::clock::unix_secs_i64()
            .saturating_sub(i64::try_from(self.window.as_secs()).unwrap_or(i64::MAX));
        let hex = |b: &B256| hex::encode(b);
        let mut counts = HashMap::new();
        for m in removed {
            let (column, value, app) = match m {
                Measurement::KmsAggregatedMr { mr } => (ServedColumn::MrAggregated, hex(mr), None),
                Measurement::KmsDevice { device } => (ServedColumn::DeviceId, hex(device), None),
                Measurement::OsImage { image } => (ServedColumn::OsImageHash, hex(image), None),
                Measurement::ComposeHash { app, hash } => {
                    (ServedColumn::ComposeHash, hex(hash), Some(hex::encode(app)))
                }
                Measurement::Device { app, device } => {
                    (ServedColumn::DeviceId, hex(device), Some(hex::encode(app)))
                }
            };
            let n = self
                .store
                .served_instances(column, &value, app.as_deref(), since)
                .await?;
            counts.insert(*m, n);
        }
        Ok(Counted(counts))
    }

    /// Decodes and classifies the calls of `op`, as `timelock` will make them.
    async fn assess(
        &self,
        state: &GovernanceState,
        timelock: Address,
        op: &TimelockOperation,
    ) -> anyhow::Result<Assessment> {
        let window = window_words(self.window);
        let min_delay = |t: Address| {
            state
                .timelocks
                .get(&t)
                .map(|s| alloy::primitives::U256::from(s.min_delay))
        };
        let mut words = Vec::new();
        let mut findings = Vec::new();
        for call in op.calls.values() {
            let decoded = decode::decode(call.target, call.value, &call.data, Operation::Call);
            let removed = decoded.as_ref().map(classify::removals).unwrap_or_default();
            let usage = self.usage(&removed).await?;
            let ctx = Context {
                safe: timelock,
                threshold: None,
                min_delay: &min_delay,
                usage: &usage,
                window: &window,
            };
            let tx = super::safe_tx::SafeTx {
                to: call.target,
                value: call.value,
                data: call.data.clone(),
                operation: Operation::Call,
                safe_tx_gas: Default::default(),
                base_gas: Default::default(),
                gas_price: Default::default(),
                gas_token: Address::ZERO,
                refund_receiver: Address::ZERO,
                nonce: Default::default(),
            };
            findings.extend(classify::classify(&tx, &decoded, &ctx));
            match &decoded {
                Ok(d) => words.extend(d.words()),
                Err(e) => words.push(format!("{}: cannot be decoded: {e}", call.target)),
            }
        }
        findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
        Ok(Assessment { words, findings })
    }

    fn alert(
        timelock: Address,
        id: B256,
        op: &TimelockOperation,
        transition: &str,
        a: &Assessment,
    ) -> Alert {
        // The headline: the worst finding, and among those the one cutting off most instances.
        let what = a
            .findings
            .iter()
            .rev()
            .max_by_key(|f| (f.severity, f.affected_instances.unwrap_or(0)))
            .map_or_else(|| a.words.join("; "), |f| f.detail.clone());
        let when = match (transition, op.ready_at) {
            ("scheduled", Some(t)) => format!(
                "; executable from {}",
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t))
            ),
            ("ready", _) => "; executable now".into(),
            _ => String::new(),
        };
        let mut description =
            format!("Timelock {timelock}, operation {id} ({transition}).\nCalls:\n");
        for w in &a.words {
            description.push_str(&format!("  {w}\n"));
        }
        description.push_str("Findings:\n");
        for f in &a.findings {
            description.push_str(&format!("  [{}] {}\n", f.severity.label(), f.detail));
        }
        Alert {
            key: format!("{KEY_PREFIX}timelock:{timelock}:{id}"),
            transition: transition.to_owned(),
            name: TIMELOCK_ALERT.to_owned(),
            severity: a.worst(),
            labels: BTreeMap::from([
                ("source".to_owned(), "governance".to_owned()),
                ("timelock".to_owned(), timelock.to_string()),
                ("operation".to_owned(), id.to_string()),
                ("affected_instances".to_owned(), a.affected().to_string()),
            ]),
            summary: format!("Timelock operation {transition}: {what}{when}"),
            description,
            resolved: matches!(transition, "executed" | "cancelled"),
        }
    }

    async fn step(&self, known: &mut HashMap<String, BTreeSet<String>>) -> anyhow::Result<()> {
        let state = self.view.snapshot();
        // Readiness is the chain's to decide: its time, as of the processed block.
        let now = state.time;
        let mut pending = (BTreeMap::<Severity, i64>::new(), 0u64);
        for (timelock, t) in &state.timelocks {
            for (id, op) in &t.operations {
                let transition = transition(op, now);
                let key = format!("{KEY_PREFIX}timelock:{timelock}:{id}");
                let seen = known.get(&key);
                let fresh = !seen.is_some_and(|s| s.contains(transition));
                let is_pending = op.status == OperationStatus::Pending;
                if !fresh && !is_pending {
                    continue;
                }
                let a = self.assess(&state, *timelock, op).await?;
                if is_pending {
                    for f in &a.findings {
                        *pending.0.entry(f.severity).or_default() += 1;
                    }
                    pending.1 = pending.1.max(a.affected());
                }
                if !fresh {
                    continue;
                }
                // History: an operation first seen already finished is recorded, not announced.
                let deliver = seen.is_some() || is_pending;
                let alert = Self::alert(*timelock, *id, op, transition, &a);
                let new = self.outbox.record(&alert, deliver).await?;
                known.entry(key).or_default().insert(transition.to_owned());
                if new && deliver {
                    self.log(&alert, &a).await;
                }
            }
        }
        self.metrics.pending_findings(&pending.0, pending.1);
        Ok(())
    }

    async fn log(&self, alert: &Alert, a: &Assessment) {
        if alert.transition == "scheduled" {
            tracing::info!(
                key = %alert.key,
                severity = alert.severity.label(),
                affected_instances = a.affected(),
                summary = %alert.summary,
                "new governance proposal"
            );
        }
        if alert.severity == Severity::Critical && alert.transition == "scheduled" {
            tracing::warn!(
                key = %alert.key,
                affected_instances = a.affected(),
                summary = %alert.summary,
                "governance: suspicious transaction"
            );
            let record = crate::store::AuditRecord::new(
                "governance_finding",
                "critical",
                &serde_json::json!({
                    "key": alert.key,
                    "summary": alert.summary,
                    "findings": a.findings,
                }),
            );
            let error = self.store.append_audit(&record).await.err();
            record.log(error.as_ref().map(ToString::to_string).as_deref());
        }
    }
}

impl Task for Notifier {
    fn name(&self) -> &'static str {
        "governance_notifier"
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut known: HashMap<String, BTreeSet<String>> = HashMap::new();
        let mut loaded = false;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let step = async {
                if !loaded {
                    for (key, transition) in self.outbox.transitions(KEY_PREFIX).await? {
                        known.entry(key).or_default().insert(transition);
                    }
                    loaded = true;
                }
                self.step(&mut known).await
            };
            // A step cut short by shutdown leaves its transitions unrecorded: the next run
            // records them.
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                r = step => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "governance notifier step failed; retrying");
                    }
                }
            }
        }
    }
}
