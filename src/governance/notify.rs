//! Tells signers and on-call what governance is about to do: each Safe proposal's transitions
//! (proposed → each verified confirmation → executable → executed, failed or replaced) and each
//! timelock operation's (scheduled → ready → executed or cancelled), with what its calls would
//! do, decoded and classified, and how many instances received keys lately with a measurement it
//! removes.
//!
//! Flow, per tick: the published [`GovernanceState`] → each operation's current transition →
//! one not recorded yet → its calls decoded ([`super::decode`]) → removed measurements counted in
//! the boot records over `governance.in_use_window` → findings ([`super::classify`]) → an
//! [`Alert`] recorded in the outbox ([`crate::alerts::outbox::Outbox::record`]: the transition and
//! its deliveries in one transaction, so a restart sends nothing twice and misses nothing).
//! An operation first seen already executed or cancelled is history, recorded without delivery,
//! unless it was scheduled after a state a notifier already looked at while following the chain
//! live (that block is kept in the store): a short-delay operation scheduled and executed between
//! two looks, or while no notifier ran, is announced.
//! Log lines: `new governance proposal` when one is scheduled, `governance: suspicious
//! transaction` (and an audit record) when its findings are critical.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256};
use tokio_util::sync::CancellationToken;

use super::classify::{self, Context, Finding, Severity};
use super::decode;
use super::metrics::GovernanceMetrics;
use super::proposals::Proposal;
use super::queue::ProposalsView;
use super::safe_tx::Operation;
use super::state::{GovernanceState, OperationStatus, TimelockOperation};
use super::watch::GovernanceView;
use crate::alerts::Alert;
use crate::alerts::outbox::Outbox;
use crate::runtime::Task;
use crate::store::Store;

/// How often the state is looked at besides when the chain or the proposals change.
const TICK: Duration = Duration::from_secs(1);

/// A state whose chain time is within this of the wall clock is the chain followed live, not a
/// backfill of its history.
const LIVE_LAG_SECS: u64 = 300;

/// Where the block of the last live look is kept, so that a restarted notifier (or the next
/// leader's) announces what finished while none looked.
const LIVE_FROM_KEY: &str = "governance_notifier_block";

/// How long a pending operation's assessment (decoding, and its in-use counts) is reused for the
/// metrics before it is made again. A transition is always assessed afresh.
const ASSESSMENT_TTL: Duration = Duration::from_secs(30);

/// Signer participation counts signatures this recent.
const PARTICIPATION_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// Subjects of this module's alerts start with this.
const KEY_PREFIX: &str = "governance:";

/// The alert name of a timelock operation.
pub const TIMELOCK_ALERT: &str = "GovernanceTimelockOperation";

/// The alert name of a Safe proposal.
pub const PROPOSAL_ALERT: &str = "GovernanceSafeProposal";

/// The governance notifier task.
pub struct Notifier {
    view: Arc<GovernanceView>,
    proposals: Arc<ProposalsView>,
    /// The last checked form of each proposal alerted on (for its terminal alert's words).
    last: std::sync::Mutex<HashMap<String, Proposal>>,
    outbox: Outbox,
    store: Store,
    window: Duration,
    metrics: GovernanceMetrics,
    /// Pending operations' assessments, by alert subject, with when they were made.
    assessed: std::sync::Mutex<HashMap<String, (std::time::Instant, Arc<Assessment>)>>,
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

impl Notifier {
    /// A notifier over `view`, recording into `outbox`, counting use in `store`'s boot records
    /// over `window`.
    pub fn new(
        view: Arc<GovernanceView>,
        proposals: Arc<ProposalsView>,
        outbox: Outbox,
        store: Store,
        window: Duration,
        metrics: GovernanceMetrics,
    ) -> Self {
        Self {
            view,
            proposals,
            last: std::sync::Mutex::new(HashMap::new()),
            outbox,
            store,
            window,
            metrics,
            assessed: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// `op`'s assessment: made afresh for a transition, else reused within [`ASSESSMENT_TTL`].
    async fn assessment(
        &self,
        state: &GovernanceState,
        timelock: Address,
        op: &TimelockOperation,
        key: &str,
        fresh: bool,
    ) -> anyhow::Result<Arc<Assessment>> {
        let cached = |m: &HashMap<String, (std::time::Instant, Arc<Assessment>)>| {
            m.get(key)
                .filter(|(at, _)| at.elapsed() < ASSESSMENT_TTL)
                .map(|(_, a)| a.clone())
        };
        if !fresh && let Some(a) = cached(&self.assessed.lock().unwrap_or_else(|e| e.into_inner()))
        {
            return Ok(a);
        }
        let a = Arc::new(self.assess(state, timelock, op).await?);
        self.assessed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned(), (std::time::Instant::now(), a.clone()));
        Ok(a)
    }

    /// Decodes and classifies the calls of `op`, as `timelock` will make them.
    async fn assess(
        &self,
        state: &GovernanceState,
        timelock: Address,
        op: &TimelockOperation,
    ) -> anyhow::Result<Assessment> {
        let window = super::usage::window_words(self.window);
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
            let usage = super::usage::counted(&self.store, self.window, &removed).await?;
            let ctx = Context {
                safe: timelock,
                threshold: None,
                min_delay: &min_delay,
                usage: &usage,
                window: &window,
            };
            let tx = super::safe_tx::SafeTx {
                value: call.value,
                ..super::safe_tx::SafeTx::call(call.target, call.data.clone(), 0)
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
        let when = match (transition, op.ready_at) {
            ("scheduled", Some(t)) => format!(
                "; executable from {}",
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t))
            ),
            ("ready", _) => "; executable now".into(),
            _ => String::new(),
        };
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
            summary: format!(
                "Timelock operation {transition}: {}{when}",
                headline(&a.findings, &a.words)
            ),
            description: describe(
                format!("Timelock {timelock}, operation {id} ({transition})."),
                &a.words,
                &a.findings,
            ),
            resolved: matches!(transition, "executed" | "cancelled"),
        }
    }

    /// One look at the state. `live_from` is the block of the previous look once the chain was
    /// followed live: operations scheduled after it happened while we watched.
    async fn step(
        &self,
        known: &mut HashMap<String, BTreeSet<String>>,
        live_from: &mut Option<u64>,
    ) -> anyhow::Result<()> {
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
                if !is_pending {
                    self.assessed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                    if !fresh {
                        continue;
                    }
                }
                let a = self.assessment(&state, *timelock, op, &key, fresh).await?;
                if is_pending {
                    for f in &a.findings {
                        *pending.0.entry(f.severity).or_default() += 1;
                    }
                    pending.1 = pending.1.max(a.affected());
                }
                if !fresh {
                    continue;
                }
                // History: an operation first seen already finished, from before we watched, is
                // recorded, not announced.
                let watched = live_from.is_some_and(|b| op.scheduled_block > b);
                let first = seen.is_none();
                let deliver = !first || is_pending || watched;
                let alert = Self::alert(*timelock, *id, op, transition, &a);
                let new = self.outbox.record(&alert, deliver).await?;
                known.entry(key).or_default().insert(transition.to_owned());
                if new && deliver {
                    self.log(&alert, first, a.affected(), &a.findings).await;
                }
            }
        }
        self.proposals_step(known, &state, &mut pending).await?;
        let live = live_from.is_some() || state.time + LIVE_LAG_SECS >= crate::clock::unix_secs();
        if live && *live_from != Some(state.block) {
            let now = crate::clock::unix_secs_i64();
            self.store
                .set_meta(LIVE_FROM_KEY, &state.block.to_string(), now)
                .await?;
            *live_from = Some(state.block);
        }
        self.metrics.pending_findings(&pending.0, pending.1);
        let queues = self.proposals.snapshot();
        let open: Vec<&Proposal> = queues.values().flat_map(|q| &q.proposals).collect();
        let window = i64::try_from(PARTICIPATION_WINDOW.as_secs()).unwrap_or(i64::MAX);
        let since = crate::clock::unix_secs_i64().saturating_sub(window);
        self.metrics
            .participation(super::proposals::participation(&state, &open, since));
        Ok(())
    }

    /// Safe proposals: new transitions of the pending ones, and the end of those that left the
    /// queue (executed, failed, or their nonce used by another transaction).
    async fn proposals_step(
        &self,
        known: &mut HashMap<String, BTreeSet<String>>,
        state: &GovernanceState,
        pending: &mut (BTreeMap<Severity, i64>, u64),
    ) -> anyhow::Result<()> {
        let queues = self.proposals.snapshot();
        for p in queues.values().flat_map(|q| &q.proposals) {
            let key = proposal_key(p.safe, p.nonce, p.safe_tx_hash);
            for f in &p.findings {
                *pending.0.entry(f.severity).or_default() += 1;
            }
            pending.1 = pending.1.max(p.affected());
            let confirmations = p.confirmed_by.len();
            let mut wanted = vec!["proposed".to_owned()];
            if confirmations > 0 {
                wanted.push(format!("confirmations-{confirmations}"));
            }
            if p.executable() {
                wanted.push("executable".to_owned());
            }
            self.last
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.clone(), p.clone());
            for t in wanted {
                if known.get(&key).is_some_and(|s| s.contains(&t)) {
                    continue;
                }
                let alert = proposal_alert(&key, p, &t);
                let new = self.outbox.record(&alert, true).await?;
                known.entry(key.clone()).or_default().insert(t.clone());
                if new {
                    self.log(&alert, t == "proposed", p.affected(), &p.findings)
                        .await;
                }
            }
        }
        let open: Vec<String> = known
            .iter()
            .filter(|(k, ts)| {
                k.starts_with(PROPOSAL_PREFIX)
                    && !ts
                        .iter()
                        .any(|t| matches!(t.as_str(), "executed" | "failed" | "replaced"))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in open {
            let Some((safe, nonce, hash)) = parse_proposal_key(&key) else {
                continue;
            };
            let Some(s) = state.safes.get(&safe) else {
                continue;
            };
            let t = match s.executions.iter().rev().find(|e| e.safe_tx_hash == hash) {
                Some(e) if e.success => "executed",
                Some(_) => "failed",
                None if s.nonce > nonce => "replaced",
                None => continue,
            };
            let last = self
                .last
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .cloned();
            let mut alert = match &last {
                Some(p) => proposal_alert(&key, p, t),
                None => Alert {
                    key: key.clone(),
                    transition: t.to_owned(),
                    name: PROPOSAL_ALERT.to_owned(),
                    severity: Severity::Info,
                    labels: proposal_labels(safe, nonce, hash),
                    summary: format!("Safe proposal {t}: Safe {safe} nonce {nonce}"),
                    description: format!("Safe {safe}, nonce {nonce}, safeTxHash {hash}: {t}."),
                    resolved: true,
                },
            };
            alert.resolved = true;
            self.outbox.record(&alert, true).await?;
            known.entry(key).or_default().insert(t.to_owned());
        }
        Ok(())
    }

    /// Logs (and counts) an alert delivered; `first` when it is the first one for its
    /// proposal or operation.
    async fn log(&self, alert: &Alert, first: bool, affected: u64, findings: &[Finding]) {
        if first {
            self.metrics
                .proposal(if alert.key.starts_with(PROPOSAL_PREFIX) {
                    "safe"
                } else {
                    "timelock"
                });
            tracing::info!(
                key = %alert.key,
                severity = alert.severity.label(),
                affected_instances = affected,
                summary = %alert.summary,
                "new governance proposal"
            );
        }
        if alert.severity == Severity::Critical && first {
            tracing::warn!(
                key = %alert.key,
                affected_instances = affected,
                summary = %alert.summary,
                "governance: suspicious transaction"
            );
            let record = crate::store::AuditRecord::new(
                "governance_finding",
                "critical",
                &serde_json::json!({
                    "key": alert.key,
                    "summary": alert.summary,
                    "findings": findings,
                }),
            );
            let error = self.store.append_audit(&record).await.err();
            record.log(error.as_ref().map(ToString::to_string).as_deref());
        }
    }
}

/// Subjects of Safe proposal alerts start with this.
const PROPOSAL_PREFIX: &str = "governance:safe:";

fn proposal_key(safe: Address, nonce: u64, hash: B256) -> String {
    format!("{PROPOSAL_PREFIX}{safe}:{nonce}:{hash}")
}

fn parse_proposal_key(key: &str) -> Option<(Address, u64, B256)> {
    let mut parts = key.strip_prefix(PROPOSAL_PREFIX)?.split(':');
    let safe = parts.next()?.parse().ok()?;
    let nonce = parts.next()?.parse().ok()?;
    let hash = parts.next()?.parse().ok()?;
    Some((safe, nonce, hash))
}

fn proposal_labels(safe: Address, nonce: u64, hash: B256) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("source".to_owned(), "governance".to_owned()),
        ("safe".to_owned(), safe.to_string()),
        ("nonce".to_owned(), nonce.to_string()),
        ("safe_tx_hash".to_owned(), hash.to_string()),
    ])
}

/// The headline of a set of findings: the worst, and among those the one cutting off most
/// instances.
fn headline(findings: &[Finding], words: &[String]) -> String {
    findings
        .iter()
        .rev()
        .max_by_key(|f| (f.severity, f.affected_instances.unwrap_or(0)))
        .map_or_else(|| words.join("; "), |f| f.detail.clone())
}

fn describe(intro: String, words: &[String], findings: &[Finding]) -> String {
    let mut d = intro;
    d.push_str("\nCalls:\n");
    for w in words {
        d.push_str(&format!("  {w}\n"));
    }
    d.push_str("Findings:\n");
    for f in findings {
        d.push_str(&format!("  [{}] {}\n", f.severity.label(), f.detail));
    }
    d
}

fn proposal_alert(key: &str, p: &Proposal, transition: &str) -> Alert {
    let mut labels = proposal_labels(p.safe, p.nonce, p.safe_tx_hash);
    labels.insert("affected_instances".to_owned(), p.affected().to_string());
    labels.insert(
        "confirmations".to_owned(),
        format!("{}/{}", p.confirmed_by.len(), p.threshold),
    );
    let proposer = p
        .proposer
        .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
    Alert {
        key: key.to_owned(),
        transition: transition.to_owned(),
        name: PROPOSAL_ALERT.to_owned(),
        severity: p.worst(),
        labels,
        summary: format!(
            "Safe proposal {transition} ({}/{}): {}",
            p.confirmed_by.len(),
            p.threshold,
            headline(&p.findings, &p.words)
        ),
        description: describe(
            format!(
                "Safe {}, nonce {}, safeTxHash {} (compare it on the signing device), proposed by {proposer}; confirmed by {} of {}.",
                p.safe,
                p.nonce,
                p.safe_tx_hash,
                p.confirmed_by.len(),
                p.threshold
            ),
            &p.words,
            &p.findings,
        ),
        resolved: matches!(transition, "executed" | "failed" | "replaced"),
    }
}

impl Task for Notifier {
    fn name(&self) -> &'static str {
        "governance_notifier"
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut known: HashMap<String, BTreeSet<String>> = HashMap::new();
        let mut live_from = None;
        let mut loaded = false;
        let mut tick = crate::runtime::ticker(TICK);
        // The views live as long as this task holds them, so their senders never close.
        let (mut chain, mut queues) = (self.view.changes(), self.proposals.changes());
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                _ = tick.tick() => {}
                _ = chain.changed() => {}
                _ = queues.changed() => {}
            }
            let step = async {
                if !loaded {
                    for (key, transition) in self.outbox.transitions(KEY_PREFIX).await? {
                        known.entry(key).or_default().insert(transition);
                    }
                    live_from = self
                        .store
                        .meta(LIVE_FROM_KEY)
                        .await?
                        .and_then(|b| b.parse::<u64>().ok());
                    loaded = true;
                }
                self.step(&mut known, &mut live_from).await
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
