//! Authorization follows the code that answers, on a real anvil: an app upgraded to code the
//! mirror does not know is asked of the chain from the batch that applies the upgrade and comes
//! back to the mirror when upgraded back; the KMS contract upgraded to unknown code sends both
//! checks to the chain; a live app fails closed when the RPC is gone while known apps are served
//! until `max_staleness`; a store written before code identities existed is classified on start-up
//! and continues without a resync. SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod support;
#[path = "support/test_contracts.rs"]
mod test_contracts;
#[macro_use]
#[path = "support/chain_engine.rs"]
mod chain_engine;

use std::time::{Duration, Instant};

use alloy::eips::BlockId;
use alloy::primitives::{Address, B256, Bytes};
use alloy::providers::Provider;
use alloy::providers::ext::AnvilApi;
use chain_engine::{Chain, Engine, WAIT, chain, deployed_app, engine, h, sqlite_store, store_on};
use keywarden::chain::authz::{AuthQuery, Decision, Reason, Source};
use keywarden::chain::contracts::{DstackKms, TCB_UP_TO_DATE};
use keywarden::chain::live::boot_info;
use keywarden::chain::mirror::Evaluation;
use keywarden::store::Store;

/// A boot of `app` that the default deployment allows once `allowed` ran.
fn boot(app: Address) -> AuthQuery {
    AuthQuery {
        app_id: app.into(),
        compose_hash: h(4).into(),
        instance_id: [0x11; 20],
        device_id: h(3).into(),
        mr_aggregated: h(2).into(),
        os_image_hash: h(1).into(),
        tcb_status: TCB_UP_TO_DATE.into(),
        ..AuthQuery::default()
    }
}

/// OS image, KMS MR and device on the KMS; compose hash and device on the default app.
async fn allowed(c: &Chain) {
    let (kms, app, o) = (c.kms(), c.app(c.d.app), c.owner);
    send!(kms.addOsImageHash(h(1)), o);
    send!(kms.addKmsAggregatedMr(h(2)), o);
    send!(kms.addKmsDevice(h(3)), o);
    send!(app.addComposeHash(h(4)), o);
    send!(app.addDevice(h(3)), o);
}

/// A chain with [`allowed`] run, and an engine on SQLite following it (tweaked by `tweak`).
async fn allowed_chain(
    tweak: impl FnOnce(&mut keywarden::chain::ChainConfig),
) -> (Chain, tempfile::TempDir, Store, Engine) {
    let c = chain().await;
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let e = engine(&[c.anvil.url()], &c.d, &store, tweak);
    allowed(&c).await;
    (c, dir, store, e)
}

/// The chain's `(allowed, reason)` for `q` at `block`.
async fn on_chain(c: &Chain, q: &AuthQuery, kms_check: bool, block: u64) -> (bool, String) {
    let kms = c.kms();
    let at = BlockId::number(block);
    if kms_check {
        let r = kms
            .isKmsAllowed(boot_info(q))
            .block(at)
            .call()
            .await
            .unwrap();
        (r.isAllowed, r.reason)
    } else {
        let r = kms
            .isAppAllowed(boot_info(q))
            .block(at)
            .call()
            .await
            .unwrap();
        (r.isAllowed, r.reason)
    }
}

fn answer(d: &Decision) -> (bool, String) {
    (d.allowed, d.reason_str().to_owned())
}

/// Upgrades the proxy at `proxy` to `to`; returns the upgrade's block.
async fn upgrade(c: &Chain, proxy: Address, to: Address) -> u64 {
    let r = send!(
        DstackKms::new(proxy, c.provider.clone()).upgradeToAndCall(to, Bytes::new()),
        c.owner
    );
    r.block_number.unwrap()
}

async fn upgrade_and_back(db: Option<&common::PgDb>) {
    let c = chain().await;
    let dir = tempfile::tempdir().unwrap();
    let store = store_on(db, dir.path()).await;
    let e = engine(&[c.anvil.url()], &c.d, &store, |_| {});
    allowed(&c).await;
    e.caught_up_to(c.head().await).await;
    let q = boot(c.d.app);
    let d = e.mirror.authorize_app(&q).await;
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.source, Source::Mirror);

    // The owner upgrades the app's proxy to an implementation that refuses everything, and emits
    // nothing the mirror could read.
    let deny = test_contracts::deploy(&c.provider, c.owner, "DenyAllApp", Vec::new()).await;
    let block = upgrade(&c, c.d.app, deny).await;
    // No snapshot that includes the upgrade block answers from the mirror.
    let deadline = Instant::now() + WAIT;
    loop {
        let m = e.mirror.snapshot();
        if m.block >= block {
            assert_eq!(m.app_evaluation(c.d.app), Evaluation::Live);
            break;
        }
        assert_eq!(m.app_evaluation(c.d.app), Evaluation::Local);
        assert!(Instant::now() < deadline, "upgrade block never mirrored");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // `chain state` names the code that answers and the mode.
    let state = keywarden::chain::report::state_json(&e.mirror.snapshot());
    let app = state["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["address"] == c.d.app.to_string())
        .unwrap();
    let deny_code = c.provider.get_code_at(deny).await.unwrap();
    let deny_id = keywarden::chain::code::identify(&deny_code, deny).unwrap();
    assert_eq!(app["implementation"], deny.to_string());
    assert_eq!(app["code"]["code_hash"], deny_id.hash.to_string());
    assert_eq!(app["code"]["known_as"], serde_json::Value::Null);
    assert_eq!(app["code"]["evaluation"], "live");
    assert_eq!(state["kms"]["code"]["evaluation"], "local");
    assert_eq!(state["kms"]["code"]["known_as"], "keywarden DstackKms");
    let d = e.mirror.authorize_app(&q).await;
    assert_eq!(
        answer(&d),
        (false, test_contracts::DENY_ALL_REASON.to_owned())
    );
    assert_eq!((d.reason, d.source), (Reason::AppDefined, Source::EthCall));
    assert_eq!(answer(&d), on_chain(&c, &q, false, block).await);
    assert_eq!(
        e.metric("dstack_chain_live_evaluation_contracts{contract=\"app\"}"),
        1.0
    );
    // The same question within the block is answered from the per-block cache.
    let calls = e.metric("dstack_chain_live_calls_total{check=\"app\",outcome=\"answered\"}");
    let _ = e.mirror.authorize_app(&q).await;
    assert_eq!(
        e.metric("dstack_chain_live_calls_total{check=\"app\",outcome=\"answered\"}"),
        calls
    );
    assert!(e.metric("dstack_chain_live_calls_total{check=\"app\",outcome=\"cached\"}") >= 1.0);

    // Back to the known implementation: local again, and served.
    let block = upgrade(&c, c.d.app, c.d.app_implementation).await;
    e.caught_up_to(block).await;
    assert_eq!(
        e.mirror.snapshot().app_evaluation(c.d.app),
        Evaluation::Local
    );
    let d = e.mirror.authorize_app(&q).await;
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.source, Source::Mirror);
    assert_eq!(
        e.metric("dstack_chain_live_evaluation_contracts{contract=\"app\"}"),
        0.0
    );
    e.stop().await;
    store.close().await;
}

#[tokio::test]
async fn app_upgraded_to_unknown_code_is_refused_from_the_upgrade_block_and_served_again_after_upgrading_back_on_sqlite()
 {
    upgrade_and_back(None).await;
}

#[tokio::test]
async fn app_upgraded_to_unknown_code_is_refused_from_the_upgrade_block_and_served_again_after_upgrading_back_on_postgres()
 {
    let db = common::PgDb::create().await;
    upgrade_and_back(Some(&db)).await;
    db.drop_now().await;
}

#[tokio::test]
async fn kms_upgraded_to_unknown_code_sends_both_checks_to_the_chain() {
    let (c, _dir, _store, e) = allowed_chain(|_| {}).await;
    let v2 = test_contracts::deploy(&c.provider, c.owner, "DstackKmsV2", Vec::new()).await;
    let block = upgrade(&c, c.d.kms, v2).await;
    // A removal after the upgrade: the live answers follow it.
    send!(c.app(c.d.app).removeDevice(h(3)), c.owner);
    let head = c.head().await;
    e.caught_up_to(head).await;
    let m = e.mirror.snapshot();
    assert!(m.block >= block);
    assert_eq!(m.kms_evaluation(), Evaluation::Live);
    assert_eq!(m.app_evaluation(c.d.app), Evaluation::Live);
    assert_eq!(m.live_counts(), (1, 1));
    let mut q = boot(c.d.app);
    for (tcb, kms_check) in [
        (TCB_UP_TO_DATE, true),
        (TCB_UP_TO_DATE, false),
        ("OutOfDate", true),
    ] {
        q.tcb_status = tcb.into();
        let d = if kms_check {
            e.mirror.authorize_kms(&q).await
        } else {
            e.mirror.authorize_app(&q).await
        };
        assert_eq!(d.source, Source::EthCall);
        assert_eq!(answer(&d), on_chain(&c, &q, kms_check, head).await);
    }
    q.tcb_status = TCB_UP_TO_DATE.into();
    assert_eq!(
        answer(&e.mirror.authorize_app(&q).await),
        (false, "Device not allowed".to_owned())
    );
    assert!(e.mirror.authorize_kms(&q).await.allowed);
    e.stop().await;
}

/// Unknown code may write storage without events. A contract that comes back to known code has
/// the entries the mirror held checked against its storage at the upgrade block: what is gone
/// is gone from the mirror too.
#[tokio::test]
async fn entries_removed_silently_by_unknown_code_are_not_trusted_after_upgrading_back() {
    let (c, _dir, store, e) = allowed_chain(|_| {}).await;
    let q = boot(c.d.app);
    let o = c.owner;

    // The app: to a V2, which forgets the compose hash silently, and back.
    let v2 = test_contracts::deploy(&c.provider, o, "DstackAppV2", Vec::new()).await;
    upgrade(&c, c.d.app, v2).await;
    send!(
        test_contracts::DstackAppV2::new(c.d.app, c.provider.clone()).forgetComposeHash(h(4)),
        o
    );
    let back = upgrade(&c, c.d.app, c.d.app_implementation).await;
    // The KMS: likewise with an OS image.
    send!(c.kms().addOsImageHash(h(9)), o);
    let kms_v2 = test_contracts::deploy(&c.provider, o, "DstackKmsV2", Vec::new()).await;
    let kms_impl = DstackKms::new(c.d.kms, c.provider.clone())
        .appImplementation()
        .call()
        .await
        .unwrap();
    assert_ne!(kms_impl, Address::ZERO);
    let original_kms_impl = c
        .provider
        .get_storage_at(
            c.d.kms,
            keywarden::chain::contracts::IMPLEMENTATION_SLOT.into(),
        )
        .await
        .unwrap();
    upgrade(&c, c.d.kms, kms_v2).await;
    send!(
        test_contracts::DstackKmsV2::new(c.d.kms, c.provider.clone()).forgetOsImage(h(9)),
        o
    );
    upgrade(
        &c,
        c.d.kms,
        Address::from_word(B256::from(original_kms_impl)),
    )
    .await;
    let head = c.head().await;
    e.caught_up_to(head).await;

    let m = e.mirror.snapshot();
    assert!(m.block >= back);
    assert_eq!(m.kms_evaluation(), Evaluation::Local);
    assert_eq!(m.app_evaluation(c.d.app), Evaluation::Local);
    assert!(!m.apps[&c.d.app].compose_hashes.contains(&h(4)));
    assert!(!m.kms.os_images.contains(&h(9)));
    assert!(m.kms.os_images.contains(&h(1)), "entries still held stay");
    let d = e.mirror.authorize_app(&q).await;
    assert_eq!(d.source, Source::Mirror);
    assert_eq!(answer(&d), on_chain(&c, &q, false, head).await);
    assert_eq!(d.reason, Reason::ComposeHashNotAllowed);
    let mut q9 = q.clone();
    q9.os_image_hash = h(9).into();
    assert_eq!(
        answer(&e.mirror.authorize_kms(&q9).await),
        on_chain(&c, &q9, true, head).await
    );
    // A restart rebuilds the same state from the store.
    let chain_id = c.provider.get_chain_id().await.unwrap();
    let rebuilt = keywarden::chain::kms_projection::rebuild(
        c.d.kms,
        &store.chain_events(chain_id, "kms").await.unwrap(),
    );
    assert_eq!(rebuilt.apps[&c.d.app], m.apps[&c.d.app]);
    assert_eq!(rebuilt.kms.os_images, m.kms.os_images);
    e.stop().await;
}

#[tokio::test]
async fn live_app_fails_closed_without_the_rpc_while_known_apps_are_served_until_max_staleness() {
    let (mut c, _dir, _store, e) = allowed_chain(|cfg| {
        cfg.max_staleness = Duration::from_secs(3);
        cfg.request_timeout = Duration::from_millis(500);
    })
    .await;
    let listed = Address::repeat_byte(0x11);
    let custom = test_contracts::allow_list_app(&c.provider, c.owner, &[listed]).await;
    send!(c.kms().registerApp(custom), c.owner);
    e.caught_up_to(c.head().await).await;
    let live = boot(custom);
    assert!(e.mirror.authorize_app(&live).await.allowed);

    // The node goes away.
    c.anvil.kill();
    let gone = Instant::now();
    let mut other_instance = boot(custom);
    other_instance.instance_id = [0x12; 20];
    let d = e.mirror.authorize_app(&other_instance).await;
    assert_eq!(
        (d.allowed, d.reason),
        (false, Reason::AuthUnavailable),
        "{d:?}"
    );
    assert!(
        gone.elapsed() < Duration::from_secs(3),
        "failed closed at once"
    );
    // The known app is still served from the mirror, until max_staleness.
    let known = e.mirror.authorize_app(&boot(c.d.app)).await;
    assert!(known.allowed && known.source == Source::Mirror, "{known:?}");
    let deadline = Instant::now() + WAIT;
    while e.mirror.authorize_app(&boot(c.d.app)).await.reason != Reason::ChainStateStale {
        assert!(Instant::now() < deadline, "never went stale");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(e.metric("dstack_chain_live_calls_total{check=\"app\",outcome=\"failed\"}") >= 1.0);
    e.handle.abort();
}

/// The rows this release adds to a store, which a store of the previous release lacks.
const NEW_ROWS: &str = "DELETE FROM chain_events WHERE kind IN ('CodeIdentity', 'ImplementationObserved', 'FlagsObserved', 'Initialized')";

async fn previous_release_store(db: Option<&common::PgDb>) {
    let c = chain().await;
    let dir = tempfile::tempdir().unwrap();
    let store = store_on(db, dir.path()).await;
    let e = engine(&[c.anvil.url()], &c.d, &store, |_| {});
    allowed(&c).await;
    // Created with the TCB requirement on: an initialiser flag no event carries.
    let strict = deployed_app(&send!(
        c.kms()
            .deployAndRegisterApp_1(c.owner, false, true, true, B256::ZERO, h(4)),
        c.owner
    ));
    // Empty blocks after the last event: the processed block holds no stored row.
    c.provider.anvil_mine(Some(3), None).await.unwrap();
    let head = c.head().await;
    e.caught_up_to(head).await;
    let chain_id = c.provider.get_chain_id().await.unwrap();
    let logs_before: Vec<_> = store
        .chain_events(chain_id, "kms")
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.kind != "Initialized" && !r.topics.is_empty())
        .collect();
    e.stop().await;
    store.close().await;

    // What the previous release left: raw logs it used, no code identities, no flags.
    match db {
        None => {
            use sqlx::Connection;
            let mut conn = sqlx::SqliteConnection::connect(&format!(
                "sqlite://{}",
                dir.path().join("kw.db").display()
            ))
            .await
            .unwrap();
            sqlx::query(NEW_ROWS).execute(&mut conn).await.unwrap();
        }
        Some(db) => {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query(NEW_ROWS).execute(&mut conn).await.unwrap();
        }
    }
    let store = store_on(db, dir.path()).await;
    let old = keywarden::chain::kms_projection::rebuild(
        c.d.kms,
        &store.chain_events(chain_id, "kms").await.unwrap(),
    );
    assert!(
        !old.apps[&strict].require_tcb_up_to_date,
        "the old mirror had the flag wrong"
    );

    let e = engine(&[c.anvil.url()], &c.d, &store, |_| {});
    e.caught_up_to(head).await;
    let m = e.mirror.snapshot();
    // Live calls would be made at the processed block, not at the last stored event's.
    assert_eq!(m.block, head);
    assert_eq!(m.kms_evaluation(), Evaluation::Local);
    assert_eq!(m.app_evaluation(c.d.app), Evaluation::Local);
    assert_eq!(m.app_evaluation(strict), Evaluation::Local);
    assert!(m.apps[&strict].require_tcb_up_to_date);
    let mut q = boot(strict);
    q.tcb_status = "OutOfDate".into();
    let d = e.mirror.authorize_app(&q).await;
    assert_eq!(answer(&d), on_chain(&c, &q, false, head).await);
    assert_eq!(d.reason, Reason::TcbNotUpToDate);
    assert_eq!(e.metric("dstack_chain_resyncs_total"), 0.0);
    // Every log kept once; the classification only added synthetic rows.
    let logs_after: Vec<_> = store
        .chain_events(chain_id, "kms")
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.kind != "Initialized" && !r.topics.is_empty())
        .collect();
    assert_eq!(logs_after, logs_before);
    // And it continues: a new change is followed.
    send!(c.app(strict).removeComposeHash(h(4)), c.owner);
    e.until("compose hash removed", |m| {
        m.apps[&strict].compose_hashes.is_empty()
    })
    .await;
    e.stop().await;
    store.close().await;
}

#[tokio::test]
async fn store_of_the_previous_release_is_classified_and_continues_without_resync_on_sqlite() {
    previous_release_store(None).await;
}

#[tokio::test]
async fn store_of_the_previous_release_is_classified_and_continues_without_resync_on_postgres() {
    let db = common::PgDb::create().await;
    previous_release_store(Some(&db)).await;
    db.drop_now().await;
}

#[tokio::test]
async fn code_identity_names_known_code_and_prints_an_entry_for_other_code() {
    let c = chain().await;
    let url = c.anvil.url().to_string();
    let identity = |address: Address, json: bool| {
        let address = address.to_string();
        let mut args = vec!["chain", "code-identity", &address, "--rpc-url", &url];
        if json {
            args.push("--json");
        }
        common::run_to_end(&args, &[])
    };
    let (code, out, err) = identity(c.d.app_implementation, true);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["known_as"], "keywarden DstackApp");
    assert_eq!(v["immutable_offsets"].as_array().unwrap().len(), 3);

    let deny = test_contracts::deploy(&c.provider, c.owner, "DenyAllApp", Vec::new()).await;
    let (code, out, err) = identity(deny, false);
    assert_eq!(code, 0, "{err}");
    let id = keywarden::chain::code::identify(&c.provider.get_code_at(deny).await.unwrap(), deny)
        .unwrap();
    assert!(out.contains("[[chain.known_implementations]]"), "{out}");
    assert!(
        out.contains(&format!("code_hash = \"{}\"", id.hash)),
        "{out}"
    );
    assert!(out.contains("known as: nothing yet"), "{out}");

    let (code, _, err) = identity(Address::repeat_byte(0x99), true);
    assert_eq!(code, 1);
    assert!(err.contains("holds no code"), "{err}");
    let (code, _, err) = common::run_to_end(&["chain", "code-identity", &deny.to_string()], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("no RPC endpoint configured"), "{err}");
}
