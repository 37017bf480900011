//! End to end, on a real anvil with the real Safe 1.4.1 and OpenZeppelin TimelockController, a
//! real Alertmanager 0.25 and in-test webhook and Slack receivers: a Safe schedules, through the
//! timelock, the removal of a compose hash twelve instances received keys with. The critical
//! alert, naming the twelve, is delivered once to each channel, also when the notifier is killed
//! between detection and delivery; then "ready" and "executed" follow, Alertmanager sees the alert
//! resolved, and the mirror refuses the removed compose hash. SQLite and PostgreSQL. An operation
//! scheduled and executed between two of the notifier's looks, or while none ran, is announced;
//! one executed before the first look is history.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/prometheus.rs"]
mod prometheus;
mod support;
#[macro_use]
#[path = "support/chain_engine.rs"]
mod chain_engine;
#[path = "support/governance.rs"]
mod governance;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::{B256, U256};
use alloy::providers::Provider;
use alloy::providers::ext::AnvilApi;
use alloy::sol_types::SolCall;
use axum::http::{HeaderMap, StatusCode};
use chain_engine::{Chain, WAIT, chain, engine_with, h, store_on};
use governance::{DELAY, exec, safe, timelock};
use keywarden::alerts::channel::signature;
use keywarden::alerts::config::AlertsConfig;
use keywarden::alerts::delivery::Deliverer;
use keywarden::alerts::metrics::AlertMetrics;
use keywarden::alerts::outbox::Outbox;
use keywarden::chain::authz::{AuthQuery, Reason};
use keywarden::chain::contracts::{DstackApp, TCB_UP_TO_DATE, TimelockController};
use keywarden::governance::metrics::GovernanceMetrics;
use keywarden::governance::notify::Notifier;
use keywarden::governance::queue::ProposalsView;
use keywarden::governance::state::{
    GovernanceState, OperationStatus, ScheduledCall, TimelockOperation, TimelockState,
};
use keywarden::governance::watch::{GovernanceProjection, GovernanceView};
use keywarden::runtime::Task;
use keywarden::store::Store;
use prometheus::Alertmanager;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "webhook-signing-secret";
const INSTANCES: u64 = 12;

/// What the webhook and Slack receivers got.
#[derive(Default)]
struct Received {
    webhook: Vec<Value>,
    slack: Vec<Value>,
    bad_signatures: usize,
}

async fn receivers() -> (String, Arc<Mutex<Received>>) {
    use axum::routing::post;
    let got = Arc::new(Mutex::new(Received::default()));
    let (hook, slack) = (got.clone(), got.clone());
    let router = axum::Router::new()
        .route(
            "/hook",
            post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let got = hook.clone();
                async move {
                    let header = |k: &str| {
                        headers
                            .get(k)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    let ts: i64 = header("x-keywarden-timestamp").parse().unwrap_or(0);
                    let fresh = (keywarden::clock::unix_secs_i64() - ts).abs() < 300;
                    if !fresh
                        || header("x-keywarden-signature")
                            != signature(SECRET.as_bytes(), ts, &body)
                    {
                        got.lock().unwrap().bad_signatures += 1;
                        return StatusCode::UNAUTHORIZED;
                    }
                    got.lock()
                        .unwrap()
                        .webhook
                        .push(serde_json::from_slice(&body).unwrap());
                    StatusCode::OK
                }
            }),
        )
        .route(
            "/slack",
            post(move |body: axum::body::Bytes| {
                let got = slack.clone();
                async move {
                    got.lock()
                        .unwrap()
                        .slack
                        .push(serde_json::from_slice(&body).unwrap());
                    StatusCode::OK
                }
            }),
        );
    let addr = common::serve_router(router).await;
    (format!("http://{addr}"), got)
}

struct Tasks {
    cancel: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Tasks {
    async fn stop(self) {
        self.cancel.cancel();
        for h in self.handles {
            h.await.unwrap().unwrap();
        }
    }
}

fn start_notifier(
    view: &Arc<GovernanceView>,
    outbox: &Outbox,
    store: &Store,
    deliver: Option<&AlertsConfig>,
) -> Tasks {
    let cancel = CancellationToken::new();
    let mut registry = Registry::default();
    let notifier = Notifier::new(
        view.clone(),
        Arc::new(ProposalsView::default()),
        outbox.clone(),
        store.clone(),
        Duration::from_secs(7 * 86400),
        GovernanceMetrics::new(&mut registry),
    );
    let mut handles = vec![tokio::spawn(notifier.run(cancel.clone()))];
    if let Some(cfg) = deliver {
        let channels = cfg.channels().unwrap();
        let metrics = AlertMetrics::new(&mut registry, &channels);
        let deliverer = Deliverer::new(store.clone(), channels, cfg, metrics);
        handles.push(tokio::spawn(deliverer.run(cancel.clone())));
    }
    Tasks { cancel, handles }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn transitions(got: &Arc<Mutex<Received>>) -> Vec<String> {
    got.lock()
        .unwrap()
        .webhook
        .iter()
        .map(|v| v["transition"].as_str().unwrap().to_owned())
        .collect()
}

async fn removal_in_use_is_alerted_once_per_channel(db: Option<&common::PgDb>) {
    let c: Chain = chain().await;
    let accounts = c.provider.get_accounts().await.unwrap();
    let signers = [accounts[2], accounts[3]];
    let safe = safe(&c, &[accounts[2], accounts[3], accounts[4]], 2).await;
    let timelock = timelock(&c, safe).await;
    let app = c.app(c.d.app);
    send!(app.addComposeHash(h(4)), c.owner);
    send!(app.transferOwnership(timelock), c.owner);

    let dir = tempfile::tempdir().unwrap();
    let store = store_on(db, dir.path()).await;
    // Twelve instances received keys with h(4) a day ago.
    let day_ago = keywarden::clock::unix_secs_i64() - 86400;
    governance::booted_with_h4(&store, &[c.d.app], INSTANCES, day_ago).await;
    let am = Alertmanager::start().await;
    let (base, got) = receivers().await;
    let secret_file = dir.path().join("hook.secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let cfg = AlertsConfig {
        alertmanager_url: Some(am.url.clone()),
        webhook_url: Some(format!("{base}/hook")),
        webhook_secret: Some(keywarden::secret::SecretRef::File(secret_file)),
        slack_webhook_url: Some(format!("{base}/slack")),
        repost_interval: Duration::from_secs(1),
        ..AlertsConfig::default()
    };
    assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
    let outbox = Outbox::new(store.clone(), &cfg.channels().unwrap());

    let view = Arc::new(GovernanceView::default());
    let mut registry = Registry::default();
    let projection = GovernanceProjection::new(
        c.d.kms,
        Vec::new(),
        view.clone(),
        GovernanceMetrics::new(&mut registry),
    );
    let e = engine_with(
        &[c.anvil.url()],
        &c.d,
        &store,
        vec![Box::new(projection)],
        |_| {},
    );

    // The Safe schedules, in one operation, the timelock taking the app over and removing h(4).
    let salt = B256::repeat_byte(0x77);
    let payloads = vec![
        DstackApp::acceptOwnershipCall {}.abi_encode().into(),
        DstackApp::removeComposeHashCall { composeHash: h(4) }
            .abi_encode()
            .into(),
    ];
    let schedule = TimelockController::scheduleBatchCall {
        targets: vec![c.d.app, c.d.app],
        values: vec![U256::ZERO, U256::ZERO],
        payloads: payloads.clone(),
        predecessor: B256::ZERO,
        salt,
        delay: U256::from(DELAY),
    }
    .abi_encode();

    // Detected while nothing delivers, then the notifier is killed: the alert waits in the store.
    let tasks = start_notifier(&view, &outbox, &store, None);
    exec(&c, safe, &signers, timelock, schedule).await;
    let deadline = Instant::now() + WAIT;
    while store
        .alerts_pending()
        .await
        .unwrap()
        .iter()
        .map(|(_, n)| n)
        .sum::<i64>()
        < 3
    {
        assert!(Instant::now() < deadline, "the alert was never recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tasks.stop().await;
    assert!(got.lock().unwrap().webhook.is_empty());

    // Restarted with delivery: exactly one alert per channel, critical, naming the twelve.
    let tasks = start_notifier(&view, &outbox, &store, Some(&cfg));
    until("the webhook and Slack got the alert", || {
        let g = got.lock().unwrap();
        !g.webhook.is_empty() && !g.slack.is_empty()
    })
    .await;
    let deadline = Instant::now() + WAIT;
    let firing = loop {
        let alerts = am.alerts().await;
        if let Some(a) = alerts
            .into_iter()
            .find(|a| a["labels"]["alertname"] == "GovernanceTimelockOperation")
        {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "Alertmanager never got the alert"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(firing["labels"]["severity"], "critical");
    assert_eq!(firing["labels"]["affected_instances"], "12");
    assert_eq!(firing["labels"]["timelock"], timelock.to_string());
    assert!(
        firing["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("12 instance(s)"),
        "{firing}"
    );
    {
        let g = got.lock().unwrap();
        assert_eq!(g.webhook.len(), 1);
        assert_eq!(g.slack.len(), 1);
        assert_eq!(g.bad_signatures, 0);
        let hook = &g.webhook[0];
        assert_eq!(hook["severity"], "critical");
        assert_eq!(hook["transition"], "scheduled");
        assert!(
            hook["description"]
                .as_str()
                .unwrap()
                .contains("REMOVE compose hash"),
            "{hook}"
        );
        assert!(
            g.slack[0]["text"]
                .as_str()
                .unwrap()
                .starts_with("*[CRITICAL]")
        );
    }

    // Ready after the delay; then executed: the alert resolves and the mirror refuses h(4).
    c.provider.anvil_increase_time(DELAY + 1).await.unwrap();
    c.provider.anvil_mine(Some(1), None).await.unwrap();
    until("the ready transition was delivered", || {
        transitions(&got).contains(&"ready".to_owned())
    })
    .await;
    send!(
        TimelockController::new(timelock, c.provider.clone()).executeBatch(
            vec![c.d.app, c.d.app],
            vec![U256::ZERO, U256::ZERO],
            payloads,
            B256::ZERO,
            salt
        ),
        c.other
    );
    until("the executed transition was delivered", || {
        transitions(&got).contains(&"executed".to_owned())
    })
    .await;
    e.until("h(4) removed from the mirror", |m| {
        !m.apps[&c.d.app].compose_hashes.contains(&h(4))
    })
    .await;
    e.caught_up_to(c.head().await).await;
    let boot = AuthQuery {
        app_id: c.d.app.into(),
        compose_hash: h(4).into(),
        instance_id: [0x11; 20],
        device_id: h(3).into(),
        mr_aggregated: h(2).into(),
        os_image_hash: h(1).into(),
        tcb_status: TCB_UP_TO_DATE.into(),
        ..AuthQuery::default()
    };
    let d = e.mirror.authorize_app(&boot).await;
    assert!(!d.allowed);
    assert_ne!(d.reason, Reason::ChainStateStale);
    let deadline = Instant::now() + WAIT;
    loop {
        let alerts = am.alerts().await;
        let active = alerts.iter().any(|a| {
            a["labels"]["alertname"] == "GovernanceTimelockOperation"
                && a["status"]["state"] == "active"
        });
        if !active {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Alertmanager never saw the alert resolved"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tasks.stop().await;
    e.stop().await;
    // Each transition exactly once per channel.
    assert_eq!(transitions(&got), vec!["scheduled", "ready", "executed"]);
    assert_eq!(got.lock().unwrap().slack.len(), 3);
    assert!(
        store
            .alerts_pending()
            .await
            .unwrap()
            .iter()
            .all(|(_, n)| *n == 0)
    );
    store.close().await;
}

#[tokio::test]
async fn removing_a_compose_hash_in_use_is_alerted_once_per_channel_on_sqlite() {
    removal_in_use_is_alerted_once_per_channel(None).await;
}

#[tokio::test]
async fn removing_a_compose_hash_in_use_is_alerted_once_per_channel_on_postgres() {
    let db = common::PgDb::create().await;
    removal_in_use_is_alerted_once_per_channel(Some(&db)).await;
    db.drop_now().await;
}

/// The governance state at `block`, chain time now, with `ops` on one timelock.
fn timelock_state(
    block: u64,
    timelock: alloy::primitives::Address,
    ops: &[(B256, TimelockOperation)],
) -> Arc<GovernanceState> {
    let mut timelocks = std::collections::BTreeMap::new();
    timelocks.insert(
        timelock,
        TimelockState {
            operations: ops.iter().cloned().collect(),
            ..TimelockState::default()
        },
    );
    Arc::new(GovernanceState {
        block,
        time: keywarden::clock::unix_secs(),
        timelocks,
        ..GovernanceState::default()
    })
}

/// A zero-delay operation removing h(4) from `app`, scheduled at `block` and already executed.
fn executed_at(block: u64, app: alloy::primitives::Address) -> TimelockOperation {
    let data = DstackApp::removeComposeHashCall { composeHash: h(4) }.abi_encode();
    TimelockOperation {
        calls: std::collections::BTreeMap::from([(
            0,
            ScheduledCall {
                target: app,
                value: U256::ZERO,
                data: data.into(),
            },
        )]),
        delay: 0,
        scheduled_block: block,
        ready_at: None,
        executed: std::collections::BTreeSet::from([0]),
        status: OperationStatus::Done,
    }
}

#[tokio::test]
async fn operations_finished_between_looks_or_while_none_ran_are_announced_but_history_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_on(None, dir.path()).await;
    let cfg = AlertsConfig {
        slack_webhook_url: Some("http://127.0.0.1:9/slack".into()),
        ..AlertsConfig::default()
    };
    let outbox = Outbox::new(store.clone(), &cfg.channels().unwrap());
    let view = Arc::new(GovernanceView::default());
    let (timelock, app) = (
        alloy::primitives::Address::repeat_byte(0x71),
        alloy::primitives::Address::repeat_byte(0xa9),
    );
    let (old, new) = (B256::repeat_byte(1), B256::repeat_byte(2));
    let pending = || async {
        let p = store.alerts_pending().await.unwrap();
        p.iter().map(|(_, n)| n).sum::<i64>()
    };
    let recorded = || async {
        outbox
            .transitions("governance:")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, t)| format!("{k}/{t}"))
            .collect::<Vec<_>>()
    };

    // Executed before the notifier's first look: history, recorded and not delivered.
    view.publish(timelock_state(10, timelock, &[(old, executed_at(5, app))]));
    let tasks = start_notifier(&view, &outbox, &store, None);
    let deadline = Instant::now() + WAIT;
    while recorded().await.is_empty() {
        assert!(Instant::now() < deadline, "history never recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pending().await, 0, "history was announced");

    // Scheduled after that look and executed before the next: announced.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    view.publish(timelock_state(
        12,
        timelock,
        &[(old, executed_at(5, app)), (new, executed_at(11, app))],
    ));
    let deadline = Instant::now() + WAIT;
    while pending().await == 0 {
        assert!(
            Instant::now() < deadline,
            "the live operation was never announced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = recorded().await;
    assert!(
        all.iter()
            .any(|r| r.contains(&new.to_string()) && r.ends_with("/executed")),
        "{all:?}"
    );
    assert_eq!(pending().await, 1);
    tasks.stop().await;

    // One more scheduled and executed while no notifier runs: the next one (after a restart, or
    // the next leader) announces it too.
    let (third, ops) = (
        B256::repeat_byte(3),
        [
            (old, executed_at(5, app)),
            (new, executed_at(11, app)),
            (B256::repeat_byte(3), executed_at(13, app)),
        ],
    );
    view.publish(timelock_state(14, timelock, &ops));
    let tasks = start_notifier(&view, &outbox, &store, None);
    let deadline = Instant::now() + WAIT;
    while pending().await < 2 {
        assert!(
            Instant::now() < deadline,
            "the operation finished while none looked was never announced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        recorded()
            .await
            .iter()
            .any(|r| r.contains(&third.to_string()))
    );
    assert_eq!(pending().await, 2);
    tasks.stop().await;
    store.close().await;
}
