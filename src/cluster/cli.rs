//! `keywarden cluster status [--json]`: the leadership and the replicas seen in the last minute,
//! read from the shared database whether or not this replica runs.

use std::process::ExitCode;

/// Replicas that reported within this long are listed.
const RECENT_SECONDS: i64 = 60;

/// Runs `cluster status`.
pub async fn run_status(storage: &crate::store::config::StorageConfig, json: bool) -> ExitCode {
    let loaded = async {
        let target = storage.database_target().map_err(|e| e.to_string())?;
        let store = crate::store::Store::open(storage, &target)
            .await
            .map_err(|e| e.to_string())?;
        let now = crate::clock::unix_secs_i64();
        let read = async {
            Ok::<_, crate::store::StoreError>((
                store.cluster_leader().await?,
                store.cluster_nodes(now - RECENT_SECONDS).await?,
            ))
        }
        .await;
        store.close().await;
        read.map(|r| (now, r)).map_err(|e| e.to_string())
    };
    let (now, (leader, nodes)) = match loaded.await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"leader": leader, "replicas": nodes})
        );
        return ExitCode::SUCCESS;
    }
    match &leader {
        Some(l) => println!(
            "leader {} (epoch {}), since {}s ago, renewed {}s ago",
            l.node_id,
            l.epoch,
            now - l.since,
            now - l.beat
        ),
        None => println!("no leader was ever elected (a single node, or no replica has started)"),
    }
    println!(
        "\n{:<18} {:<9} {:<24} {:>10} {:>16}",
        "REPLICA", "ROLE", "API", "SEEN", "PROCESSED BLOCK"
    );
    for n in &nodes {
        println!(
            "{:<18} {:<9} {:<24} {:>9}s {:>16}",
            n.node_id,
            n.role,
            n.api,
            now - n.beat,
            n.processed_block
        );
    }
    println!(
        "\n{} replica(s) reported in the last {RECENT_SECONDS}s",
        nodes.len()
    );
    ExitCode::SUCCESS
}
