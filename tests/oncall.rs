//! On-call end to end: Debian's real Prometheus 2.42 scrapes a keywarden (test PKI, following
//! anvil, its app governed by a timelock) and evaluates the shipped `alert-rules/`; Debian's real
//! Alertmanager 0.25 routes with the shipped `alertmanager/` tree to in-test receivers. Only the
//! waits are shortened (every `for:` and group wait or interval to one second, evaluation every
//! second); expressions, thresholds, labels, annotations, routes and inhibitions are the shipped
//! ones. Each scenario's time from cause to page is printed.
//!
//! - A governance critical proposal (removing a compose hash in use) pages pager and security,
//!   naming the affected count.
//! - 11 bad certificates (quotes of an untrusted PKI) page pager and security.
//! - a CVM at 95% memory (on an in-test dstack-vmm): the warning reaches the team chat naming
//!   the VM, which Prometheus keeps as `exported_instance`.
//! - anvil stopped: the sync-lag warning reaches the team chat, and not the pager.
//! - keywarden killed: "KMS down" pages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/vmm.rs"]
mod fake;
#[path = "support/guest_chain.rs"]
mod guest_chain;
#[path = "support/prometheus.rs"]
mod prometheus;
mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::FixedBytes;
use alloy::sol_types::SolCall as _;
use keywarden::chain::contracts::DstackApp;
use keywarden::sim::client::{self, Guest};
use keywarden::sim::testpki::TestPki;
use serde_yaml::Value;
use sha2::{Digest as _, Sha256};

const COMPOSE: &[u8] = b"{\"name\":\"oncall-test\"}";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &Path) -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn set(v: &mut Value, key: &str, to: &str) {
    v.as_mapping_mut()
        .unwrap()
        .insert(key.into(), Value::String(to.to_owned()));
}

/// The shipped rule files, each group evaluated every second and every `for:` one second.
fn quick_rules() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("alert-rules")).unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().ends_with(".rules.yml") {
            continue;
        }
        let mut doc = yaml(&path);
        for group in doc["groups"].as_sequence_mut().unwrap() {
            set(group, "interval", "1s");
            for rule in group["rules"].as_sequence_mut().unwrap() {
                if rule.get("for").is_some() {
                    set(rule, "for", "1s");
                }
            }
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        out.push((name, serde_yaml::to_string(&doc).unwrap()));
    }
    out.sort();
    assert!(!out.is_empty());
    out
}

/// The shipped tree with its receivers pointed at `hooks` (`{hooks}/{receiver}`; the Slack
/// webhook URL through `slack_file`) and every group wait and interval one second.
fn quick_tree(hooks: &str, slack_file: &Path) -> String {
    fn shorten(route: &mut Value) {
        for key in ["group_wait", "group_interval"] {
            set(route, key, "1s");
        }
        if let Some(routes) = route.get_mut("routes").and_then(Value::as_sequence_mut) {
            routes.iter_mut().for_each(shorten);
        }
    }
    let mut tree = yaml(&root().join("alertmanager/alertmanager.yml"));
    shorten(&mut tree["route"]);
    for receiver in tree["receivers"].as_sequence_mut().unwrap() {
        let name = receiver["name"].as_str().unwrap().to_owned();
        if let Some(hooks_) = receiver
            .get_mut("webhook_configs")
            .and_then(Value::as_sequence_mut)
        {
            for h in hooks_ {
                set(h, "url", &format!("{hooks}/{name}"));
            }
        }
        if let Some(slack) = receiver
            .get_mut("slack_configs")
            .and_then(Value::as_sequence_mut)
        {
            std::fs::write(slack_file, format!("{hooks}/{name}")).unwrap();
            for s in slack {
                set(s, "api_url_file", slack_file.to_str().unwrap());
            }
        }
    }
    serde_yaml::to_string(&tree).unwrap()
}

/// What the in-test receivers got: (receiver, when, body).
#[derive(Clone, Default)]
struct Inbox(Arc<Mutex<Vec<(String, Instant, String)>>>);

impl Inbox {
    async fn serve(&self) -> String {
        let inbox = self.clone();
        let app = axum::Router::new().route(
            "/{receiver}",
            axum::routing::post(
                move |axum::extract::Path(receiver): axum::extract::Path<String>, body: String| {
                    inbox
                        .0
                        .lock()
                        .unwrap()
                        .push((receiver, Instant::now(), body));
                    async { "ok" }
                },
            ),
        );
        format!("http://{}", common::serve_router(app).await)
    }

    /// A firing notification of `alert` that `receiver` got after `since`.
    fn find(&self, receiver: &str, alert: &str, since: Instant) -> Option<(Duration, String)> {
        self.0.lock().unwrap().iter().find_map(|(r, at, body)| {
            let firing = body.contains("\"status\":\"firing\"") || body.contains("[FIRING]");
            (r == receiver && *at >= since && firing && body.contains(alert))
                .then(|| (*at - since, body.clone()))
        })
    }

    /// Waits (at most `limit`) until `receiver` got a firing `alert` after `since`: how long after
    /// `since`, and the notification.
    async fn wait(
        &self,
        receiver: &str,
        alert: &str,
        since: Instant,
        limit: Duration,
    ) -> (Duration, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = self.find(receiver, alert, since) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "{receiver} never got {alert} within {limit:?}; it got: {:#?}",
                self.0
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(r, _, b)| format!("{r}: {b}"))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A guest of `pki` running the test compose file asks `kw` for its app key.
async fn boot(
    kw: &common::Keywarden,
    ca: &str,
    pki: &TestPki,
    app: [u8; 20],
) -> Result<(), client::ClientError> {
    let guest = Guest::enroll(
        &kw.api_url(),
        Some(ca.to_owned()),
        pki,
        &client::guest_spec(app, COMPOSE, vec![0x1d; 20]),
        true,
    )
    .await?;
    guest
        .get_app_key(&client::simulated_vm_config())
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cause_reaches_its_receivers_through_the_shipped_rules_and_tree() {
    let mut anvil = support::anvil::Anvil::spawn();
    let chain = guest_chain::allow_simulated_guest(&anvil.url(), COMPOSE).await;
    let gov = chain.govern_app_by_timelock().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(keywarden::clock::unix_secs() - 60).unwrap();
    let pki_dir = dir.path().join("pki");
    pki.save(&pki_dir).unwrap();
    let images = keywarden::kms::osimage::env_value(&[client::simulated_os_image()]);
    // A dstack-vmm whose one VM runs at 95% memory.
    let (vmms, _vmm) = fake::configured(vec![fake::web("1h")], dir.path(), "1s").await;
    let data = dir.path().join("data");
    let polled = Instant::now();
    let mut args = vec![
        "--insecure-test-pki".to_owned(),
        pki_dir.display().to_string(),
    ];
    args.extend(chain.serve_args(&anvil.url()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut kw = common::Keywarden::start(
        &data,
        &args,
        &[
            ("KEYWARDEN_KMS__OS_IMAGES", images.as_str()),
            ("KEYWARDEN_CHAIN__CONFIRMATIONS", "0"),
            ("KEYWARDEN_CHAIN__POLL_INTERVAL", "100ms"),
            ("KEYWARDEN_CVM__VMM", vmms.as_str()),
        ],
    );
    kw.wait_ready().await;
    let ca = std::fs::read_to_string(data.join("kms/root-ca.pem")).unwrap();

    let inbox = Inbox::default();
    let hooks = inbox.serve().await;
    let alertmanager =
        prometheus::Alertmanager::start_with(&quick_tree(&hooks, &dir.path().join("slack-url")))
            .await;
    let rules = quick_rules();
    let rule_files: Vec<String> = rules.iter().map(|(n, _)| format!("  - {n}\n")).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n{}\
         alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{}']\n\
         scrape_configs:\n  - job_name: keywarden\n    static_configs:\n      - targets: ['{}']\n",
        rule_files.concat(),
        alertmanager.url.trim_start_matches("http://"),
        kw.metrics,
    );
    let prometheus = prometheus::Prometheus::start(&config, &rules).await;
    let app = chain.deployment.app;

    // A guest boots: its compose hash is in use.
    boot(&kw, &ca, &pki, app.into_array()).await.unwrap();

    // 1. A proposal to remove that compose hash, pending in the timelock for an hour.
    let hash = FixedBytes(Sha256::digest(COMPOSE).into());
    let remove = DstackApp::removeComposeHashCall { composeHash: hash }.abi_encode();
    guest_chain::through_timelock(&chain.provider, gov, app, remove, (2, 3600, false)).await;
    let proposed = Instant::now();
    let limit = Duration::from_secs(60);
    let alert = "KeywardenGovernanceSuspiciousTransaction";
    let (governance, page) = inbox.wait("pager", alert, proposed, limit).await;
    assert!(
        page.contains("1 instance(s) in use would be cut off"),
        "the page does not name the affected count: {page}"
    );
    inbox.wait("security", alert, proposed, limit).await;

    // 2. The RPC endpoint goes away; meanwhile 11 quotes of an untrusted PKI are refused.
    anvil.kill();
    let stopped = Instant::now();
    let rogue = TestPki::generate(keywarden::clock::unix_secs() - 60).unwrap();
    for _ in 0..11 {
        assert!(boot(&kw, &ca, &rogue, app.into_array()).await.is_err());
    }
    let refused = Instant::now();
    let alert = "KeywardenAttestationFailureSpike";
    let (spike, _) = inbox.wait("pager", alert, refused, limit).await;
    inbox.wait("security", alert, refused, limit).await;

    let alert = "KeywardenChainSyncLag";
    let (lag, _) = inbox
        .wait("team-chat", alert, stopped, Duration::from_secs(120))
        .await;
    assert!(
        inbox.find("pager", alert, stopped).is_none(),
        "a warning paged"
    );

    let alert = "KeywardenCvmMemoryHigh";
    let (memory, chat) = inbox.wait("team-chat", alert, polled, limit).await;
    assert!(chat.contains("CVM web (app web-app) uses 95%"), "{chat}");

    // 3. keywarden dies.
    kw.kill9();
    let killed = Instant::now();
    let alert = "KeywardenKmsDown";
    let (down, _) = inbox.wait("pager", alert, killed, limit).await;
    inbox.wait("security", alert, killed, limit).await;

    eprintln!(
        "cause to page: governance critical {governance:?}, attestation spike {spike:?}, \
         chain sync lag (to chat) {lag:?}, CVM memory (to chat, from keywarden's start) \
         {memory:?}, KMS down {down:?}; Prometheus alerts at the end: {}",
        prometheus.alerts().await
    );
}
