//! `keywarden cvm list` and `cvm show ID`: the fleet from the store, whether or not the service
//! runs, joined with one look at the `[[cvm.vmm]]` hosts and `[cvm.gateway]` when they are
//! configured ([`super::look`]; `--records-only` skips it): each VM's status, uptime, boot time,
//! containers, memory and last-seen time beside its boots, measurements and refusals.

use std::process::ExitCode;

use super::config::CvmConfig;
use super::look::{Failed, look};
use super::report::{FleetReport, Instance, Overview, Refusal};
use super::vmm::VmView;
use crate::store::config::StorageConfig;

/// `keywarden cvm list` / `cvm show` options.
#[derive(Debug, clap::Args)]
pub struct CvmArgs {
    /// Where the store is, and the output form.
    #[command(flatten)]
    pub store: crate::chain::cli::StoreArgs,
    /// Only the KMS's records: do not ask the dstack-vmm hosts or the gateway.
    #[arg(long)]
    pub records_only: bool,
}

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

/// A duration in whole seconds as `1h 2m 3s`.
fn span(secs: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

fn dash<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| "-".into(), f)
}

/// The instance id of `vm`, as the boot records write it.
fn instance_of(vm: &VmView) -> Option<String> {
    vm.instance_id
        .as_deref()
        .map(|i| i.trim_start_matches("0x").to_ascii_lowercase())
}

/// The fleet: the records, and (unless `records_only`) one look at the live sources.
async fn load(
    storage: &StorageConfig,
    cvm: &CvmConfig,
    records_only: bool,
) -> Result<(Overview, Vec<Failed>), String> {
    let target = storage.database_target().map_err(|e| e.to_string())?;
    let store = crate::store::Store::open(storage, &target)
        .await
        .map_err(|e| e.to_string())?;
    let report = super::report::fleet(&store).await;
    store.close().await;
    let report = report.map_err(|e| e.to_string())?;
    let (vms, complete, failed) = if records_only || cvm.vmm.is_empty() {
        (Vec::new(), false, Vec::new())
    } else {
        let seen = look(cvm).await.map_err(|e| e.to_string())?;
        (seen.view.all(), seen.view.complete(), seen.failed)
    };
    let now = crate::clock::unix_secs_i64();
    Ok((
        super::report::overview(report, vms, complete, cvm, now),
        failed,
    ))
}

fn refusal_words(r: &Refusal) -> String {
    format!("{} at {}: {}", r.reason, when(r.at), r.message)
}

fn print_failed(failed: &[Failed]) {
    for f in failed {
        eprintln!(
            "keywarden: warning: {} gave no usable answer: {}; its VMs are not shown",
            f.source, f.error
        );
    }
}

/// What the KMS says of `vm`'s instance: its boots, or its refusal, or nothing.
fn keys_words(records: &FleetReport, vm: &VmView) -> String {
    let Some(id) = instance_of(vm) else {
        return "no instance id yet".into();
    };
    if let Some(i) = records.instances.iter().find(|i| i.row.instance_id == id) {
        return format!(
            "{} boot(s), last {}",
            i.row.record.boot_count,
            when(i.row.record.last_boot)
        );
    }
    records
        .refused_only
        .iter()
        .find(|r| r.instance_id == id)
        .map_or_else(
            || "never requested".into(),
            |r| format!("refused: {}", r.reason),
        )
}

fn containers_words(vm: &VmView) -> String {
    if vm.containers.is_empty() {
        return "-".into();
    }
    let running = vm
        .containers
        .iter()
        .filter(|c| c.state == "running")
        .count();
    format!("{running}/{} running", vm.containers.len())
}

/// Runs `cvm list`.
pub async fn run_list(storage: &StorageConfig, cvm: &CvmConfig, args: &CvmArgs) -> ExitCode {
    let (overview, failed) = match load(storage, cvm, args.records_only).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    print_failed(&failed);
    if args.store.json {
        // `/admin/cvm`'s shape, and the sources that did not answer.
        let mut v = serde_json::json!(overview);
        v["failed_sources"] = serde_json::json!(failed);
        println!("{v}");
        return ExitCode::SUCCESS;
    }
    let report = &overview.records;
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
            dash(i.last_refusal.as_ref(), refusal_words)
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
    if !overview.vms.is_empty() {
        println!(
            "\non the dstack-vmm hosts:\n{:<16} {:<14} {:<8} {:<12} {:>6} {:>6} {:<13} {:<15} KEYS",
            "VM", "APP", "STATUS", "UPTIME", "BOOT", "MEMORY", "CONTAINERS", "INSTANCE"
        );
        for vm in &overview.vms {
            println!(
                "{:<16} {:<14} {:<8} {:<12} {:>6} {:>6} {:<13} {:<15} {}",
                vm.name,
                vm.app.as_deref().unwrap_or("-"),
                vm.status,
                dash(vm.uptime_seconds, span),
                dash(vm.boot_seconds, |b| format!("{b:.0}s")),
                dash(vm.memory_ratio, |r| format!("{:.0}%", r * 100.0)),
                containers_words(vm),
                dash(instance_of(vm), |i| short(&i)),
                keys_words(report, vm)
            );
        }
    }
    for s in &overview.joined.stuck {
        println!(
            "\nstuck at key request: VM {} ({}) has run {} without finishing its boot (at {:?}){}",
            s.vm.name,
            s.vm.id,
            dash(s.vm.uptime_seconds, span),
            s.vm.boot_progress.as_deref().unwrap_or("?"),
            dash(s.refusal.as_ref(), |r| format!(
                "; the KMS refused it: {}",
                refusal_words(r)
            ))
        );
    }
    for r in overview.joined.unmonitored.iter().flatten() {
        println!(
            "\nwarning: unmonitored host: instance {} received keys at {} but runs on no configured VMM",
            r.instance_id,
            when(r.record.last_boot)
        );
    }
    ExitCode::SUCCESS
}

/// The one instance whose id (hex, `0x` optional) is or starts with `id` (at least 4 digits);
/// `None` when none does.
fn find<'a>(report: &'a FleetReport, id: &str) -> Result<Option<&'a Instance>, String> {
    let id = id.trim_start_matches("0x").to_ascii_lowercase();
    if id.len() < 4 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let found: Vec<&Instance> = report
        .instances
        .iter()
        .filter(|i| i.row.instance_id.starts_with(&id))
        .collect();
    match found.as_slice() {
        [one] => Ok(Some(one)),
        [] => Ok(None),
        many => Err(format!(
            "{} instances start with {id}: give more digits",
            many.len()
        )),
    }
}

/// The VM that is `id` (its id or name), or runs `instance`.
fn find_vm<'a>(vms: &'a [VmView], id: &str, instance: Option<&str>) -> Option<&'a VmView> {
    vms.iter().find(|v| {
        v.id == id || v.name == id || (instance.is_some() && instance_of(v).as_deref() == instance)
    })
}

fn print_instance(i: &Instance) {
    let r = &i.row;
    println!("instance        {}", r.instance_id);
    println!("app             {}", r.app_id);
    println!(
        "state           {} ({} boot(s), {} restart(s))",
        i.state,
        r.record.boot_count,
        r.record.boot_count.saturating_sub(1)
    );
    println!("first boot      {}", when(r.record.first_boot));
    println!("last key request {}", when(r.record.last_boot));
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
}

fn print_vm(vm: &VmView) {
    println!("vm              {} ({})", vm.name, vm.id);
    println!("vmm             {}", vm.vmm);
    println!("app name        {}", vm.app.as_deref().unwrap_or("-"));
    println!("status          {}", vm.status);
    println!("uptime          {}", dash(vm.uptime_seconds, span));
    println!(
        "boot            {}{}",
        vm.boot_progress.as_deref().unwrap_or("-"),
        dash(vm.boot_seconds, |b| format!(", took {b:.1}s"))
    );
    if let Some(e) = &vm.boot_error {
        println!("boot error      {e}");
    }
    println!(
        "memory          {}",
        dash(vm.memory_ratio, |r| format!("{:.1}% in use", r * 100.0))
    );
    println!(
        "last seen       {}",
        dash(vm.last_seen, |t| when(i64::try_from(t).unwrap_or(i64::MAX)))
    );
    println!("containers      {}", containers_words(vm));
    for c in &vm.containers {
        println!("  {:<20} {:<11} {}", c.name, c.state, c.status);
    }
}

/// Runs `cvm show ID`: ID is an instance id (or a unique prefix of at least 4 hex digits), or
/// a VM's id or name on the configured VMMs.
pub async fn run_show(
    storage: &StorageConfig,
    cvm: &CvmConfig,
    id: &str,
    args: &CvmArgs,
) -> ExitCode {
    let (overview, failed) = match load(storage, cvm, args.records_only).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    print_failed(&failed);
    let instance = match find(&overview.records, id) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("keywarden: error: {e}");
            return ExitCode::from(2);
        }
    };
    let wanted = instance.map(|i| i.row.instance_id.as_str());
    let vm = find_vm(&overview.vms, id, wanted);
    // A VM found by id or name leads to its instance's records.
    let instance = instance.or_else(|| {
        let of_vm = vm.and_then(instance_of)?;
        overview
            .records
            .instances
            .iter()
            .find(|i| i.row.instance_id == of_vm)
    });
    if instance.is_none() && vm.is_none() {
        eprintln!(
            "keywarden: error: no instance {id:?} received keys from this KMS{}",
            if overview.vms.is_empty() {
                ""
            } else {
                ", and no VM on the configured VMMs has that id, name or instance id"
            }
        );
        return ExitCode::from(2);
    }
    if args.store.json {
        println!(
            "{}",
            serde_json::json!({"instance": instance, "vm": vm, "failed_sources": failed})
        );
        return ExitCode::SUCCESS;
    }
    match instance {
        Some(i) => print_instance(i),
        None => println!("instance        never received keys from this KMS"),
    }
    if let Some(vm) = vm {
        println!();
        print_vm(vm);
    }
    ExitCode::SUCCESS
}
