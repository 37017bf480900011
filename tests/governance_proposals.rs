//! Pending Safe proposals, end to end on a real anvil with the real Safe 1.4.1 governing a
//! DstackApp directly, and an in-test Transaction Service serving the documented JSON (v2 string
//! numbers, paged with `next`), fed from the real on-chain Safe (the real service cannot run
//! here): a proposal removing a compose hash twelve instances use is alerted (critical, naming
//! the twelve) once per transition (proposed, each verified confirmation, executable, executed);
//! a tampered safeTxHash and a forged confirmation are critical findings; a 429 storm and a 5xx
//! service lose no proposal; after execution the mirror refuses the hash, and a reorg dropping
//! the execution brings the proposal back to pending.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod support;
#[macro_use]
#[path = "support/chain_engine.rs"]
mod chain_engine;
#[path = "support/governance.rs"]
mod governance;
#[path = "support/txservice.rs"]
mod txservice;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::ext::AnvilApi;
use alloy::rpc::types::anvil::ReorgOptions;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use axum::http::StatusCode;
use chain_engine::{Chain, WAIT, chain, engine_with, h, sqlite_store};
use governance::{exec_with, safe_nonce, safe_tx_hash, signing_safe};
use keywarden::alerts::config::AlertsConfig;
use keywarden::alerts::delivery::Deliverer;
use keywarden::alerts::metrics::AlertMetrics;
use keywarden::alerts::outbox::Outbox;
use keywarden::chain::contracts::{DstackApp, SafeL2};
use keywarden::chain::projection::ChainReads;
use keywarden::governance::config::GovernanceConfig;
use keywarden::governance::metrics::GovernanceMetrics;
use keywarden::governance::notify::Notifier;
use keywarden::governance::queue::{ProposalsView, QueueWatcher};
use keywarden::governance::simulate::Simulator;
use keywarden::governance::watch::{GovernanceProjection, GovernanceView};
use keywarden::runtime::Task;
use keywarden::store::Store;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use txservice::{Service, confirmation, row, service};

fn signer(i: u8) -> PrivateKeySigner {
    PrivateKeySigner::from_bytes(&B256::repeat_byte(i)).unwrap()
}

/// EOA signatures of `signers` over `hash`, sorted by owner as the Safe requires.
fn signatures(signers: &[&PrivateKeySigner], hash: B256) -> Bytes {
    let mut s: Vec<&&PrivateKeySigner> = signers.iter().collect();
    s.sort_by_key(|k| k.address());
    s.iter()
        .flat_map(|k| k.sign_hash_sync(&hash).unwrap().as_bytes().to_vec())
        .collect::<Vec<u8>>()
        .into()
}

async fn exec_signed(
    c: &Chain,
    safe: Address,
    signers: &[&PrivateKeySigner],
    to: Address,
    data: Vec<u8>,
) {
    let nonce = safe_nonce(c, safe).await;
    let hash = safe_tx_hash(c, safe, to, &data, nonce).await;
    exec_with(c, safe, to, data, signatures(signers, hash), c.other).await;
}

/// The service's own decoding of a removal of h(4).
fn removal_decoded() -> Value {
    json!({"method": "removeComposeHash", "parameters": [{"name": "composeHash", "type": "bytes32", "value": h(4).to_string()}]})
}

#[derive(Default)]
struct Hook(Vec<Value>);

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Fixture {
    c: Chain,
    owners: [PrivateKeySigner; 3],
    safe: Address,
    dir: tempfile::TempDir,
    ts: Service,
    hook: Arc<Mutex<Hook>>,
    proposals: Arc<ProposalsView>,
    registry: Registry,
    e: chain_engine::Engine,
    cancel: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Fixture {
    /// A 2-of-3 Safe owning the default app, which allows h(4); twelve instances received keys
    /// with it an hour ago; the watcher, notifier and a webhook receiver running.
    async fn start() -> Self {
        let c = chain().await;
        let owners = [signer(1), signer(2), signer(3)];
        let safe = governance::safe(
            &c,
            &owners.iter().map(|o| o.address()).collect::<Vec<_>>(),
            2,
        )
        .await;
        let app = c.app(c.d.app);
        send!(app.addComposeHash(h(4)), c.owner);
        send!(app.transferOwnership(safe), c.owner);
        exec_signed(
            &c,
            safe,
            &[&owners[0], &owners[1]],
            c.d.app,
            DstackApp::acceptOwnershipCall {}.abi_encode(),
        )
        .await;

        let dir = tempfile::tempdir().unwrap();
        let store: Store = sqlite_store(dir.path()).await;
        let hour_ago = keywarden::clock::unix_secs_i64() - 3600;
        governance::booted_with_h4(&store, &[c.d.app], 12, hour_ago).await;

        let (base, ts) = service(c.provider.clone(), 1).await;
        governance::command_config(dir.path(), &c, &base);
        let hook = Arc::new(Mutex::new(Hook::default()));
        let got = hook.clone();
        let receiver = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let got = got.clone();
                async move {
                    got.lock()
                        .unwrap()
                        .0
                        .push(serde_json::from_slice(&body).unwrap());
                    StatusCode::OK
                }
            }),
        );
        let hook_url = format!("http://{}/hook", common::serve_router(receiver).await);
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s").unwrap();
        let alerts = AlertsConfig {
            webhook_url: Some(hook_url),
            webhook_secret: Some(keywarden::secret::SecretRef::File(secret)),
            ..AlertsConfig::default()
        };
        let gov = GovernanceConfig {
            transaction_service: Some(base),
            poll_interval: Duration::from_millis(200),
            transaction_service_rate: 50.0,
            safes: vec![keywarden::governance::config::SafeEntry {
                address: safe.to_string(),
                transaction_service: None,
                api_key: None,
            }],
            ..GovernanceConfig::default()
        };
        assert!(gov.problems().is_empty(), "{:?}", gov.problems());

        let mut registry = Registry::default();
        let metrics = GovernanceMetrics::new(&mut registry);
        let view = Arc::new(GovernanceView::default());
        let proposals = Arc::new(ProposalsView::default());
        let projection =
            GovernanceProjection::new(c.d.kms, gov.safe_addresses(), view.clone(), metrics.clone());
        let e = engine_with(
            &[c.anvil.url()],
            &c.d,
            &store,
            vec![Box::new(projection)],
            |_| {},
        );
        let channels = alerts.channels().unwrap();
        let outbox = Outbox::new(store.clone(), &channels);
        let cancel = CancellationToken::new();
        let rpc = keywarden::chain::rpc::RpcPool::new(
            &[c.anvil.url()],
            &keywarden::chain::ChainConfig::default(),
            keywarden::chain::metrics::ChainMetrics::new(&mut Registry::default(), 1),
        );
        let simulator = Simulator::new(ChainReads::new(Arc::new(rpc)), c.d.kms);
        let watcher = QueueWatcher::new(
            &gov,
            view.clone(),
            proposals.clone(),
            store.clone(),
            Some(simulator),
            metrics.clone(),
        );
        let notifier = Notifier::new(
            view.clone(),
            proposals.clone(),
            outbox,
            store.clone(),
            gov.in_use_window,
            metrics.clone(),
        );
        let deliverer = Deliverer::new(
            store.clone(),
            channels.clone(),
            &alerts,
            AlertMetrics::new(&mut registry, &channels),
        );
        let handles = vec![
            tokio::spawn(watcher.run(cancel.clone())),
            tokio::spawn(notifier.run(cancel.clone())),
            tokio::spawn(deliverer.run(cancel.clone())),
        ];
        Fixture {
            c,
            owners,
            safe,
            dir,
            ts,
            hook,
            proposals,
            registry,
            e,
            cancel,
            handles,
        }
    }

    /// Runs a `keywarden` command with this fixture's configuration (off the async runtime,
    /// which serves the in-test Transaction Service).
    async fn command(&self, args: &[&str]) -> (i32, String, String) {
        let mut args: Vec<String> = args.iter().map(ToString::to_string).collect();
        args.push("--config".into());
        args.push(self.dir.path().join("keywarden.toml").display().to_string());
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            common::run_to_end(&args, &[])
        })
        .await
        .unwrap()
    }

    fn transitions(&self) -> Vec<String> {
        self.hook
            .lock()
            .unwrap()
            .0
            .iter()
            .map(|v| v["transition"].as_str().unwrap().to_owned())
            .collect()
    }

    async fn stop(self) {
        self.cancel.cancel();
        for h in self.handles {
            h.await.unwrap().unwrap();
        }
        self.e.stop().await;
    }
}

#[tokio::test]
async fn pending_safe_proposals_are_checked_and_alerted_once_per_transition() {
    let fx = Fixture::start().await;
    let (c, owners, safe, ts, hook, proposals) =
        (&fx.c, &fx.owners, fx.safe, &fx.ts, &fx.hook, &fx.proposals);
    let transitions = || fx.transitions();
    // Proposed by an owner, confirmed by one: critical, naming the twelve instances.
    let remove = DstackApp::removeComposeHashCall { composeHash: h(4) }.abi_encode();
    let nonce = safe_nonce(c, safe).await;
    let hash = safe_tx_hash(c, safe, c.d.app, &remove, nonce).await;
    ts.rows.lock().unwrap().push(row(
        safe,
        c.d.app,
        &remove,
        nonce,
        hash,
        owners[0].address(),
        vec![confirmation(owners[0].address(), &owners[0], hash)],
        removal_decoded(),
    ));
    until("proposed and one confirmation delivered", || {
        let t = transitions();
        t.contains(&"proposed".into()) && t.contains(&"confirmations-1".into())
    })
    .await;
    {
        let h = hook.lock().unwrap();
        let proposed = h.0.iter().find(|v| v["transition"] == "proposed").unwrap();
        assert_eq!(proposed["severity"], "critical");
        assert_eq!(proposed["labels"]["affected_instances"], "12");
        assert_eq!(proposed["labels"]["safe_tx_hash"], hash.to_string());
        assert!(
            proposed["summary"]
                .as_str()
                .unwrap()
                .contains("12 instance(s)"),
            "{proposed}"
        );
    }

    // A second proposal for the next nonce lies about its hash; a third confirmation is forged.
    let other = DstackApp::addComposeHashCall { composeHash: h(5) }.abi_encode();
    let other_hash = safe_tx_hash(c, safe, c.d.app, &other, nonce + 1).await;
    let lying = row(
        safe,
        c.d.app,
        &other,
        nonce + 1,
        B256::repeat_byte(0xee),
        owners[0].address(),
        vec![confirmation(owners[2].address(), &signer(9), other_hash)],
        json!({"method": "addComposeHash", "parameters": []}),
    );
    ts.rows.lock().unwrap().push(lying);
    // The service storms and fails meanwhile: nothing is lost.
    ts.too_many.store(3, Ordering::SeqCst);
    ts.failing.store(2, Ordering::SeqCst);
    until("the second proposal is checked", || {
        proposals
            .snapshot()
            .get(&safe)
            .is_some_and(|q| q.proposals.len() == 2)
    })
    .await;
    let q = proposals.snapshot()[&safe].clone();
    let rules = |i: usize| -> Vec<String> {
        q.proposals[i]
            .findings
            .iter()
            .map(|f| f.rule.label())
            .collect()
    };
    assert!(
        rules(1).contains(&"safe_tx_hash_mismatch".to_owned()),
        "{:?}",
        rules(1)
    );
    assert!(
        rules(1).contains(&"invalid_signature".to_owned()),
        "{:?}",
        rules(1)
    );
    assert_eq!(q.proposals[0].confirmed_by, vec![owners[0].address()]);
    let text = keywarden::telemetry::encode(&fx.registry).unwrap();
    assert!(
        text.contains("dstack_governance_service_requests_total{outcome=\"rate_limited\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("dstack_governance_proposals_pending 2"),
        "{text}"
    );
    assert!(
        text.contains("dstack_governance_service_indexing_lag_blocks 3"),
        "{text}"
    );

    // The second owner confirms: executable.
    {
        let mut rows = ts.rows.lock().unwrap();
        rows[0]["confirmations"]
            .as_array_mut()
            .unwrap()
            .push(confirmation(owners[1].address(), &owners[1], hash));
    }
    until("executable delivered", || {
        transitions().contains(&"executable".into())
    })
    .await;

    // What a signer runs before signing, and what an operator reads: the same checks.
    let (code, out, err) = fx
        .command(&[
            "governance",
            "verify",
            "--safe",
            &safe.to_string(),
            "--nonce",
            &nonce.to_string(),
        ])
        .await;
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.contains(&hash.to_string()), "{out}");
    assert!(out.contains("12 instance(s)"), "{out}");
    let (code, out, err) = fx.command(&["governance", "proposals", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let queue = v["safes"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(&safe.to_string()))
        .map(|(_, q)| q.clone())
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        queue["proposals"][0]["confirmed_by"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "{queue}"
    );

    // Executed on-chain with those signatures: the mirror refuses h(4), the alert resolves.
    exec_signed(c, safe, &[&owners[0], &owners[1]], c.d.app, remove.clone()).await;
    until("executed delivered", || {
        transitions().contains(&"executed".into())
    })
    .await;
    fx.e.until("h(4) removed", |m| {
        !m.apps[&c.d.app].compose_hashes.contains(&h(4))
    })
    .await;
    let executed: Vec<String> = transitions()
        .into_iter()
        .filter(|t| t == "executed")
        .collect();
    assert_eq!(executed.len(), 1);
    let proposal_alerts: Vec<String> = hook
        .lock()
        .unwrap()
        .0
        .iter()
        .filter(|v| v["labels"]["safe_tx_hash"] == hash.to_string())
        .map(|v| v["transition"].as_str().unwrap().to_owned())
        .collect();
    let (code, out, err) = fx.command(&["governance", "history"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("executed {hash}")), "{out}");
    assert!(out.contains("REMOVE compose hash"), "{out}");
    assert_eq!(
        proposal_alerts,
        vec![
            "proposed",
            "confirmations-1",
            "confirmations-2",
            "executable",
            "executed"
        ]
    );

    // A reorg drops the execution: the proposal is pending again.
    c.provider
        .anvil_reorg(ReorgOptions {
            depth: 1,
            tx_block_pairs: vec![],
        })
        .await
        .unwrap();
    until("the proposal is pending again", || {
        proposals
            .snapshot()
            .get(&safe)
            .is_some_and(|q| q.proposals.iter().any(|p| p.safe_tx_hash == hash))
    })
    .await;
    fx.e.until("h(4) back", |m| {
        m.apps[&c.d.app].compose_hashes.contains(&h(4))
    })
    .await;
    assert!(ts.requests.load(Ordering::SeqCst) > 5);
    fx.stop().await;
}

/// Runtime code that calls `app.removeComposeHash(h(4))`, whatever it is called with: run by
/// a Safe's delegatecall, the call comes from the Safe.
fn remover(app: Address) -> Bytes {
    let call = DstackApp::removeComposeHashCall { composeHash: h(4) }.abi_encode();
    let mut code = vec![0x7f];
    code.extend_from_slice(&call[..32]);
    code.extend_from_slice(&[0x60, 0x00, 0x52, 0x7f]);
    let mut tail = call[32..].to_vec();
    tail.resize(32, 0);
    code.extend_from_slice(&tail);
    code.extend_from_slice(&[0x60, 0x20, 0x52]);
    // CALL(gas, app, 0, 0, 36, 0, 0)
    code.extend_from_slice(&[
        0x60, 0x00, 0x60, 0x00, 0x60, 0x24, 0x60, 0x00, 0x60, 0x00, 0x73,
    ]);
    code.extend_from_slice(app.as_slice());
    code.extend_from_slice(&[0x5a, 0xf1, 0x50, 0x00]);
    code.into()
}

#[tokio::test]
async fn an_obfuscated_removal_is_caught_by_simulation_not_by_decoding() {
    let fx = Fixture::start().await;
    let (c, safe) = (&fx.c, fx.safe);
    let evil = Address::repeat_byte(0xe5);
    c.provider
        .anvil_set_code(evil, remover(c.d.app))
        .await
        .unwrap();
    let nonce = safe_nonce(c, safe).await;
    let data = [0x12u8, 0x34, 0x56, 0x78].to_vec();
    let hash = SafeL2::new(safe, c.provider.clone())
        .getTransactionHash(
            evil,
            U256::ZERO,
            data.clone().into(),
            1,
            U256::ZERO,
            U256::ZERO,
            U256::ZERO,
            Address::ZERO,
            Address::ZERO,
            U256::from(nonce),
        )
        .call()
        .await
        .unwrap();
    let mut r = row(
        safe,
        evil,
        &data,
        nonce,
        hash,
        fx.owners[0].address(),
        vec![],
        Value::Null,
    );
    r["operation"] = json!(1);
    fx.ts.rows.lock().unwrap().push(r);
    until("the proposal is checked", || {
        fx.proposals
            .snapshot()
            .get(&safe)
            .is_some_and(|q| !q.proposals.is_empty())
    })
    .await;
    let p = fx.proposals.snapshot()[&safe].proposals[0].clone();
    // Decoding sees an unknown function; simulation sees the removal and its twelve instances.
    assert!(
        p.words.iter().all(|w| !w.contains("REMOVE")),
        "{:?}",
        p.words
    );
    let found = p
        .findings
        .iter()
        .find(|f| f.rule.label() == "simulation_disagrees")
        .unwrap_or_else(|| panic!("{:?}", p.findings));
    assert_eq!(found.affected_instances, Some(12));
    assert!(
        found
            .detail
            .contains(&format!("removes compose hash {}", h(4))),
        "{}",
        found.detail
    );
    until("the critical alert names the twelve", || {
        fx.hook.lock().unwrap().0.iter().any(|v| {
            v["transition"] == "proposed"
                && v["severity"] == "critical"
                && v["labels"]["affected_instances"] == "12"
        })
    })
    .await;
    // Nothing changed on-chain.
    assert!(
        fx.e.mirror.snapshot().apps[&c.d.app]
            .compose_hashes
            .contains(&h(4))
    );
    fx.stop().await;
}

alloy::sol! {
    /// What the Safe 1.4.1 CompatibilityFallbackHandler answers through a Safe.
    #[sol(rpc)]
    interface CompatibilityFallbackHandler {
        function getMessageHash(bytes message) external view returns (bytes32);
    }
}

/// A contract confirmation as the service holds it: r = the owner, s = the offset of its data
/// (65), v = 0, then the data's length and the data.
fn contract_confirmation(owner: Address, data: &[u8]) -> Value {
    let mut blob = owner.into_word().to_vec();
    blob.extend_from_slice(&U256::from(65).to_be_bytes::<32>());
    blob.push(0);
    blob.extend_from_slice(&U256::from(data.len()).to_be_bytes::<32>());
    blob.extend_from_slice(data);
    json!({
        "owner": owner.to_string(), "submissionDate": "2026-11-30T00:00:00Z", "transactionHash": null,
        "signature": format!("0x{}", hex::encode(blob)),
        "signatureType": "CONTRACT_SIGNATURE"
    })
}

/// A Safe owned by another Safe: that owner's confirmation (EIP-1271) is asked of the chain as
/// the Safe asks it. Signed by its own owner, it counts; signed by a stranger, the chain refuses
/// it and the finding is critical.
#[tokio::test]
async fn a_contract_owners_confirmation_is_checked_by_the_chain() {
    let fx = Fixture::start().await;
    let (c, safe, owners) = (&fx.c, fx.safe, &fx.owners);
    let inner_owner = signer(7);
    let inner = signing_safe(c, &[inner_owner.address()], 1).await;
    exec_signed(
        c,
        safe,
        &[&owners[0], &owners[1]],
        safe,
        SafeL2::addOwnerWithThresholdCall {
            owner: inner,
            _threshold: U256::from(2),
        }
        .abi_encode(),
    )
    .await;
    let nonce = safe_nonce(c, safe).await;
    let handler = CompatibilityFallbackHandler::new(inner, c.provider.clone());
    let mut rows = Vec::new();
    for (offset, by) in [(0, &inner_owner), (1, &signer(9))] {
        let data = DstackApp::addComposeHashCall {
            composeHash: h(6 + offset as u8),
        }
        .abi_encode();
        let hash = safe_tx_hash(c, safe, c.d.app, &data, nonce + offset).await;
        // What the Safe hands its contract owner: the transaction's EIP-712 preimage.
        let preimage = SafeL2::new(safe, c.provider.clone())
            .encodeTransactionData(
                c.d.app,
                U256::ZERO,
                data.clone().into(),
                0,
                U256::ZERO,
                U256::ZERO,
                U256::ZERO,
                Address::ZERO,
                Address::ZERO,
                U256::from(nonce + offset),
            )
            .call()
            .await
            .unwrap();
        let message = handler.getMessageHash(preimage).call().await.unwrap();
        let signature = by.sign_hash_sync(&message).unwrap().as_bytes();
        rows.push(row(
            safe,
            c.d.app,
            &data,
            nonce + offset,
            hash,
            owners[0].address(),
            vec![contract_confirmation(inner, &signature)],
            json!({"method": "addComposeHash", "parameters": []}),
        ));
    }
    fx.ts.rows.lock().unwrap().extend(rows);
    until("both proposals are checked", || {
        fx.proposals
            .snapshot()
            .get(&safe)
            .is_some_and(|q| q.proposals.len() == 2)
    })
    .await;
    let q = fx.proposals.snapshot()[&safe].clone();
    let (signed, forged) = (&q.proposals[0], &q.proposals[1]);
    assert_eq!(signed.confirmed_by, vec![inner], "{:?}", signed.findings);
    assert!(
        signed
            .findings
            .iter()
            .all(|f| f.rule.label() != "invalid_signature"),
        "{:?}",
        signed.findings
    );
    assert!(forged.confirmed_by.is_empty());
    let refused = forged
        .findings
        .iter()
        .find(|f| f.rule.label() == "invalid_signature")
        .unwrap_or_else(|| panic!("{:?}", forged.findings));
    assert_eq!(refused.severity.label(), "critical");
    assert!(
        refused.detail.contains("refused by that contract"),
        "{}",
        refused.detail
    );
    fx.stop().await;
}
