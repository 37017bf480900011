//! The governance watcher on a real anvil with the real Safe 1.4.1 (SafeL2 behind a SafeProxy, from
//! npm) and the real OpenZeppelin TimelockController, governing our DstackKms: the topology
//! Safe → timelock → DstackKms is discovered from the chain alone; the timelock queue follows
//! scheduling, readiness and execution, and a reorg that drops the execution puts the operation
//! back in the queue; the state survives a restart (rebuilt and checked against the chain) and
//! `governance topology` prints it from the store. SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod support;
#[macro_use]
#[path = "support/chain_engine.rs"]
mod chain_engine;
#[path = "support/governance.rs"]
mod governance;

use alloy::primitives::{Address, B256, U256};
use alloy::providers::Provider;
use alloy::providers::ext::AnvilApi;
use alloy::rpc::types::anvil::ReorgOptions;
use alloy::sol_types::SolCall;
use chain_engine::{Chain, chain, store_on};
use governance::{DELAY, Watched, exec, safe, safe_of, timelock, watch_with};
use keywarden::chain::contracts::SafeL2;
use keywarden::chain::contracts::{DstackKms, TimelockController};
use keywarden::governance::state::{OperationStatus, Role};
use keywarden::sim::governance::SafeRelease;
use keywarden::store::Store;

fn watch(c: &Chain, store: &Store) -> Watched {
    watch_with(c, store, Vec::new())
}

async fn safe_timelock_kms(db: Option<&common::PgDb>) {
    let c = chain().await;
    let accounts = c.provider.get_accounts().await.unwrap();
    let signers = [accounts[2], accounts[3]];
    let safe = safe(&c, &[accounts[2], accounts[3], accounts[4]], 2).await;
    let timelock = timelock(&c, safe).await;
    // Two-step ownership: the timelock is pending owner until it accepts.
    send!(c.kms().transferOwnership(timelock), c.owner);

    let dir = tempfile::tempdir().unwrap();
    let store = store_on(db, dir.path()).await;
    let w = watch(&c, &store);
    w.until("the timelock and the Safe are found", |s| {
        s.roles.get(&timelock) == Some(&Role::Timelock) && s.roles.get(&safe) == Some(&Role::Safe)
    })
    .await;
    let s = w.view.snapshot();
    assert_eq!(s.owned[&c.d.kms].pending, Some(timelock));
    assert_eq!(s.owned[&c.d.kms].owner, Some(c.owner));
    assert_eq!(s.roles.get(&c.owner), Some(&Role::Eoa));
    assert_eq!(s.timelocks[&timelock].min_delay, DELAY);
    let safe_state = &s.safes[&safe];
    assert_eq!(safe_state.threshold, 2);
    assert_eq!(
        safe_state.owners,
        vec![accounts[2], accounts[3], accounts[4]]
    );
    assert_eq!(safe_state.version.as_deref(), Some("1.4.1"));
    let topology = keywarden::governance::topology::topology(&s);
    assert_eq!(topology["kms"]["owner"]["kind"], "eoa");
    assert_eq!(topology["kms"]["pending_owner"]["kind"], "timelock");
    assert_eq!(
        topology["kms"]["pending_owner"]["timelock"]["proposers"][0]["safe"]["threshold"],
        2
    );
    assert_eq!(w.gauge("dstack_governance_ungoverned_contracts"), 2.0);

    // The Safe schedules the timelock's acceptOwnership.
    let accept = DstackKms::acceptOwnershipCall {}.abi_encode();
    let salt = B256::repeat_byte(0x5a);
    let schedule = TimelockController::scheduleCall {
        target: c.d.kms,
        value: U256::ZERO,
        data: accept.clone().into(),
        predecessor: B256::ZERO,
        salt,
        delay: U256::from(DELAY),
    }
    .abi_encode();
    exec(&c, safe, &signers, timelock, schedule).await;
    w.until("the operation is queued", |s| s.queue().len() == 1)
        .await;
    let queued = w.view.snapshot();
    let (_, id, op) = queued.queue()[0];
    let ready_at = op.ready_at.expect("ready time read from the timelock");
    let scheduled_at = c
        .provider
        .get_block_by_number(op.scheduled_block.into())
        .await
        .unwrap()
        .unwrap()
        .header
        .timestamp;
    assert_eq!(ready_at, scheduled_at + DELAY);
    assert_eq!(w.gauge("dstack_governance_timelock_queue_depth"), 1.0);
    assert_eq!(
        w.gauge("dstack_governance_timelock_next_ready_timestamp_seconds"),
        ready_at as f64
    );
    // By chain time: the delay from the processed block's timestamp.
    assert_eq!(
        w.gauge("dstack_governance_timelock_next_ready_in_seconds"),
        ready_at.saturating_sub(queued.time) as f64
    );
    assert!(ready_at.saturating_sub(queued.time) <= DELAY);
    // Two of the three owners signed (one approved the hash on-chain, one executed).
    let signed: Vec<Address> = queued.safes[&safe].owners_signed_since(0).collect();
    assert_eq!(signed.len(), 2, "{signed:?}");
    assert!(signed.iter().all(|a| signers.contains(a)));
    assert!(
        queued.safes[&safe]
            .owners_signed_since(queued.time + 1)
            .next()
            .is_none()
    );
    assert_eq!(queued.safes[&safe].nonce, 1);
    let execution = queued.safes[&safe].executions.last().unwrap();
    assert!(execution.success);
    let mut expected_signers = signers.to_vec();
    expected_signers.sort();
    assert_eq!(
        execution.details.as_ref().unwrap().signers,
        expected_signers
    );

    // Once ready, anyone executes it: the KMS is owned by the timelock, the queue is empty.
    c.provider.anvil_increase_time(DELAY + 1).await.unwrap();
    c.provider.anvil_mine(Some(1), None).await.unwrap();
    let t = TimelockController::new(timelock, c.provider.clone());
    send!(
        t.execute(c.d.kms, U256::ZERO, accept.into(), B256::ZERO, salt),
        c.other
    );
    w.until(
        "the operation executed and the KMS is the timelock's",
        |s| s.queue().is_empty() && s.owned[&c.d.kms].owner == Some(timelock),
    )
    .await;
    assert_eq!(
        w.view.snapshot().timelocks[&timelock].operations[&id].status,
        OperationStatus::Done
    );
    assert_eq!(w.gauge("dstack_governance_timelock_queue_depth"), 0.0);
    assert_eq!(w.gauge("dstack_governance_ungoverned_contracts"), 1.0);

    // A reorg drops the execution: the operation is pending again, the KMS pending-owned.
    c.provider
        .anvil_reorg(ReorgOptions {
            depth: 1,
            tx_block_pairs: vec![],
        })
        .await
        .unwrap();
    w.until("the dropped execution is undone", |s| {
        s.queue().len() == 1 && s.owned[&c.d.kms].pending == Some(timelock)
    })
    .await;
    let before = w.view.snapshot();
    w.engine.stop().await;

    // A restart rebuilds the same state (checked against the chain: nothing differs).
    let w = watch(&c, &store);
    w.engine.caught_up_to(c.head().await).await;
    let after = w.view.snapshot();
    assert_eq!(after.safes, before.safes);
    assert_eq!(after.timelocks, before.timelocks);
    assert_eq!(after.owned, before.owned);
    assert_eq!(w.engine.metric("dstack_chain_resyncs_total"), 0.0);
    w.engine.stop().await;

    // The same tree from the store, as the command prints it.
    let report = keywarden::governance::report::topology(&store)
        .await
        .unwrap();
    assert_eq!(
        report["chains"][0]["kms"]["pending_owner"]["kind"],
        "timelock"
    );
    if db.is_none() {
        let url = format!("sqlite://{}", dir.path().join("kw.db").display());
        let (code, out, err) =
            common::run_to_end(&["governance", "topology", "--database-url", &url], &[]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("pending owner"), "{out}");
        assert!(out.contains("proposer"), "{out}");
        assert!(out.contains("no multisig governs it"), "{out}");
    }
    store.close().await;
}

#[tokio::test]
async fn safe_timelock_kms_governance_is_followed_on_sqlite() {
    safe_timelock_kms(None).await;
}

#[tokio::test]
async fn safe_timelock_kms_governance_is_followed_on_postgres() {
    let db = common::PgDb::create().await;
    safe_timelock_kms(Some(&db)).await;
    db.drop_now().await;
}

/// Safe 1.3.0 (GnosisSafeL2 behind a GnosisSafeProxy, real bytecode from npm) emits the older
/// event layout (owner, txHash, module, guard and handler not indexed): a configured 1.3.0 Safe
/// adding an owner and raising its threshold through an approved-hash execution is followed as a
/// 1.4.1 Safe is: owners, threshold, nonce, the execution's decoded signers, and who signed when.
#[tokio::test]
async fn a_safe_1_3_0_is_followed_from_its_own_event_layout() {
    let c = chain().await;
    let accounts = c.provider.get_accounts().await.unwrap();
    let owners = [accounts[2], accounts[3], accounts[4]];
    let safe = safe_of(&c, SafeRelease::V1_3_0, &owners, 2).await;
    assert_eq!(
        SafeL2::new(safe, c.provider.clone())
            .VERSION()
            .call()
            .await
            .unwrap(),
        "1.3.0"
    );
    let dir = tempfile::tempdir().unwrap();
    let store = store_on(None, dir.path()).await;
    let w = watch_with(&c, &store, vec![safe]);
    w.until("the 1.3.0 Safe is found", |s| {
        s.safes
            .get(&safe)
            .is_some_and(|x| x.version.as_deref() == Some("1.3.0"))
    })
    .await;

    let add = SafeL2::addOwnerWithThresholdCall {
        owner: accounts[5],
        _threshold: U256::from(3),
    }
    .abi_encode();
    let signers = [accounts[3], accounts[2]];
    exec(&c, safe, &signers, safe, add).await;
    w.until("the new owner and threshold are followed", |s| {
        s.safes[&safe].owners.contains(&accounts[5]) && s.safes[&safe].threshold == 3
    })
    .await;
    let s = w.view.snapshot();
    let state = &s.safes[&safe];
    assert_eq!(state.nonce, 1);
    assert_eq!(state.owners.len(), 4);
    let execution = state.executions.last().unwrap();
    assert!(execution.success);
    let mut expected = signers.to_vec();
    expected.sort();
    assert_eq!(execution.details.as_ref().unwrap().signers, expected);
    let signed: Vec<Address> = state.owners_signed_since(0).collect();
    assert_eq!(signed.len(), 2, "{signed:?}");
    // Threshold 3 of 4 owners.
    assert_eq!(w.gauge("dstack_governance_safe_min_threshold_ratio"), 0.75);
    w.engine.stop().await;
    store.close().await;
}
