//! `keywarden cvm list` and `cvm show ID`: the fleet from the store, whether or not the service
//! runs.

use std::process::ExitCode;

use super::report::{FleetReport, Instance, Refusal};

fn when(t: i64) -> String {
    u64::try_from(t).map_or_else(
        |_| t.to_string(),
        |s| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
            )
            .to_string()
        },
    )
}

fn short(hex: &str) -> String {
    if hex.len() > 12 {
        format!("{}…", &hex[..12])
    } else {
        hex.to_owned()
    }
}

async fn load(storage: &crate::store::config::StorageConfig) -> Result<FleetReport, String> {
    let target = storage.database_target().map_err(|e| e.to_string())?;
    let store = crate::store::Store::open(storage, &target)
        .await
        .map_err(|e| e.to_string())?;
    let report = super::report::fleet(&store).await;
    store.close().await;
    report.map_err(|e| e.to_string())
}

fn refusal_words(r: &Refusal) -> String {
    format!("{} at {}: {}", r.reason, when(r.at), r.message)
}

/// Runs `cvm list`.
pub async fn run_list(storage: &crate::store::config::StorageConfig, json: bool) -> ExitCode {
    let report = match load(storage).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{}", serde_json::json!(report));
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<15} {:<15} {:<9} {:>5}  {:<20}  {:<20}  {:<15} LAST REFUSAL",
        "INSTANCE", "APP", "STATE", "BOOTS", "FIRST BOOT", "LAST BOOT", "COMPOSE HASH"
    );
    for i in &report.instances {
        println!(
            "{:<15} {:<15} {:<9} {:>5}  {:<20}  {:<20}  {:<15} {}",
            short(&i.row.instance_id),
            short(&i.row.app_id),
            i.state,
            i.row.record.boot_count,
            when(i.row.record.first_boot),
            when(i.row.record.last_boot),
            short(&i.row.compose_hash),
            i.last_refusal
                .as_ref()
                .map_or_else(|| "-".into(), refusal_words)
        );
    }
    if !report.refused_only.is_empty() {
        println!("\nrefused at the key step, never received keys:");
        for r in &report.refused_only {
            println!(
                "{:<15} {:<15} {}",
                short(&r.instance_id),
                short(&r.app_id),
                refusal_words(r)
            );
        }
    }
    println!(
        "\n{} instance(s) received keys; {} more only refused",
        report.instances.len(),
        report.refused_only.len()
    );
    ExitCode::SUCCESS
}

/// The one instance whose id (hex, `0x` optional) is or starts with `id` (at least 4 digits).
fn find<'a>(report: &'a FleetReport, id: &str) -> Result<&'a Instance, String> {
    let id = id.trim_start_matches("0x").to_ascii_lowercase();
    if id.len() < 4 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "{id:?} is not an instance id: give its hex digits (at least 4, 0x optional)"
        ));
    }
    let found: Vec<&Instance> = report
        .instances
        .iter()
        .filter(|i| i.row.instance_id.starts_with(&id))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(format!("no instance {id} received keys from this KMS")),
        many => Err(format!(
            "{} instances start with {id}: give more digits",
            many.len()
        )),
    }
}

/// Runs `cvm show ID`.
pub async fn run_show(
    storage: &crate::store::config::StorageConfig,
    id: &str,
    json: bool,
) -> ExitCode {
    let report = match load(storage).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let i = match find(&report, id) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!("{}", serde_json::json!(i));
        return ExitCode::SUCCESS;
    }
    let r = &i.row;
    println!("instance        {}", r.instance_id);
    println!("app             {}", r.app_id);
    println!(
        "state           {} ({} boot(s))",
        i.state, r.record.boot_count
    );
    println!("first boot      {}", when(r.record.first_boot));
    println!("last boot       {}", when(r.record.last_boot));
    println!("mr_aggregated   {}", r.mr_aggregated);
    println!("compose hash    {}", r.compose_hash);
    println!("os image hash   {}", r.os_image_hash);
    println!("device id       {}", r.device_id);
    println!(
        "last refusal    {}",
        i.last_refusal
            .as_ref()
            .map_or_else(|| "none since its last boot".into(), refusal_words)
    );
    ExitCode::SUCCESS
}
