//! Who governs DstackKms and its apps, as a tree: each contract's owner (and pending owner), what
//! that owner is, and for a timelock who may propose, execute and cancel; with findings where no
//! multisig governs or one signer suffices.
//!
//! Flow: a [`GovernanceState`] → [`topology`] → JSON (`governance topology --json`,
//! `/admin/governance/topology`) or [`render_text`]. Pure.

use std::collections::BTreeSet;

use alloy::primitives::{Address, B256};
use serde_json::{Value, json};

use super::classify::Severity;
use super::decode::role_name;
use super::state::{GovernanceState, Role};

/// How deep owners of owners are followed (a timelock's proposer is a Safe: depth 2).
const MAX_DEPTH: usize = 4;

const PROPOSER: B256 =
    alloy::primitives::b256!("b09aa5aeb3702cfd50b6b62bc4532604938f21248a27a1d5ca736082b6819cc1");
const EXECUTOR: B256 =
    alloy::primitives::b256!("d8aa0f3194971a2a116679f7c2090f6939c8d4e01a2a8d7e41d55e5351469e63");
const CANCELLER: B256 =
    alloy::primitives::b256!("fd643c72710c63c0180259aba6b2d05451e3591a24e58b62239378085726f783");

fn role_label(r: Option<&Role>) -> &'static str {
    match r {
        Some(Role::Safe) => "safe",
        Some(Role::Timelock) => "timelock",
        Some(Role::Eoa) => "eoa",
        Some(Role::Contract) => "contract",
        None => "unknown",
    }
}

fn node(s: &GovernanceState, a: Address, depth: usize, seen: &mut BTreeSet<Address>) -> Value {
    let role = s.roles.get(&a);
    let mut v = json!({ "address": a.to_string(), "kind": role_label(role) });
    if depth >= MAX_DEPTH || !seen.insert(a) {
        return v;
    }
    match role {
        Some(Role::Safe) => {
            if let Some(safe) = s.safes.get(&a) {
                v["safe"] = json!({
                    "version": safe.version,
                    "owners": safe.owners.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "threshold": safe.threshold,
                    "nonce": safe.nonce,
                    "modules": safe.modules.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "guard": safe.guard.to_string(),
                    "fallback_handler": safe.fallback_handler.to_string(),
                });
            }
        }
        Some(Role::Timelock) => {
            if let Some(t) = s.timelocks.get(&a) {
                let holders = |role: B256, seen: &mut BTreeSet<Address>| -> Vec<Value> {
                    t.roles
                        .get(&role)
                        .map(|h| {
                            h.iter()
                                .map(|x| {
                                    if x.is_zero() {
                                        json!({ "address": x.to_string(), "kind": "anyone" })
                                    } else {
                                        node(s, *x, depth + 1, seen)
                                    }
                                })
                                .collect()
                        })
                        .unwrap_or_default()
                };
                let queue = t
                    .operations
                    .values()
                    .filter(|o| o.status == super::state::OperationStatus::Pending)
                    .count();
                v["timelock"] = json!({
                    "min_delay_seconds": t.min_delay,
                    "proposers": holders(PROPOSER, seen),
                    "executors": holders(EXECUTOR, seen),
                    "cancellers": holders(CANCELLER, seen),
                    "queue_depth": queue,
                });
            }
        }
        _ => {}
    }
    seen.remove(&a);
    v
}

fn finding(severity: Severity, detail: String) -> Value {
    json!({ "severity": severity.label(), "detail": detail })
}

fn governed(s: &GovernanceState, what: &str, a: Address, out: &mut Vec<Value>) -> Value {
    let o = s.owned.get(&a).cloned().unwrap_or_default();
    let mut seen = BTreeSet::new();
    let owner = o.owner.map(|x| node(s, x, 1, &mut seen));
    let pending = o.pending.map(|x| node(s, x, 1, &mut seen));
    match o.owner.map(|x| s.roles.get(&x)) {
        Some(Some(Role::Eoa)) => out.push(finding(
            Severity::Warning,
            format!("{what} {a} is owned by an externally owned account: no multisig governs it"),
        )),
        None => out.push(finding(
            Severity::Warning,
            format!("{what} {a} has no owner known to the watcher"),
        )),
        _ => {}
    }
    if let Some(p) = o.pending {
        out.push(finding(
            Severity::Info,
            format!(
                "{what} {a}: ownership transfer to {p} pending until it calls acceptOwnership()"
            ),
        ));
    }
    json!({ "address": a.to_string(), "owner": owner, "pending_owner": pending })
}

/// The governance tree of `s`, with its findings.
pub fn topology(s: &GovernanceState) -> Value {
    let mut findings = Vec::new();
    let kms = governed(s, "DstackKms", s.kms, &mut findings);
    let apps: Vec<Value> = s
        .apps
        .iter()
        .map(|a| governed(s, "app", *a, &mut findings))
        .collect();
    for (a, safe) in &s.safes {
        if s.roles.get(a) == Some(&Role::Safe) && safe.threshold == 1 && safe.owners.len() > 1 {
            findings.push(finding(
                Severity::Warning,
                format!(
                    "Safe {a}: one signature of {} owners suffices",
                    safe.owners.len()
                ),
            ));
        }
    }
    let safes: Vec<Value> = s
        .roles
        .iter()
        .filter(|(_, r)| **r == Role::Safe)
        .map(|(a, _)| node(s, *a, 0, &mut BTreeSet::new()))
        .collect();
    json!({
        "block": s.block,
        "kms": kms,
        "apps": apps,
        "safes": safes,
        "findings": findings,
    })
}

fn render_node(v: &Value, indent: usize, label: &str, out: &mut String) {
    let pad = "  ".repeat(indent);
    let address = v["address"].as_str().unwrap_or_default();
    let kind = v["kind"].as_str().unwrap_or_default();
    let mut line = format!("{pad}{label}{address} ({kind}");
    if let Some(safe) = v.get("safe") {
        line.push_str(&format!(
            " {}, {} of {} owners, nonce {}",
            safe["version"].as_str().unwrap_or("?"),
            safe["threshold"],
            safe["owners"].as_array().map_or(0, Vec::len),
            safe["nonce"]
        ));
    }
    if let Some(t) = v.get("timelock") {
        line.push_str(&format!(
            ", min delay {} s, {} pending",
            t["min_delay_seconds"], t["queue_depth"]
        ));
    }
    line.push_str(")\n");
    out.push_str(&line);
    if let Some(safe) = v.get("safe") {
        for o in safe["owners"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "{pad}  owner {}\n",
                o.as_str().unwrap_or_default()
            ));
        }
    }
    if let Some(t) = v.get("timelock") {
        for (key, role) in [
            ("proposers", PROPOSER),
            ("executors", EXECUTOR),
            ("cancellers", CANCELLER),
        ] {
            for h in t[key].as_array().into_iter().flatten() {
                render_node(
                    h,
                    indent + 1,
                    &format!("{} ", role_name(role).to_lowercase()),
                    out,
                );
            }
        }
    }
}

/// The tree as text.
pub fn render_text(v: &Value) -> String {
    let mut out = format!("Governance at block {}\n", v["block"]);
    let contract = |title: String, c: &Value, out: &mut String| {
        out.push_str(&format!("{title}\n"));
        match c.get("owner").filter(|o| !o.is_null()) {
            Some(o) => render_node(o, 1, "owner ", out),
            None => out.push_str("  owner unknown\n"),
        }
        if let Some(p) = c.get("pending_owner").filter(|p| !p.is_null()) {
            render_node(p, 1, "pending owner ", out);
        }
    };
    contract(
        format!(
            "DstackKms {}",
            v["kms"]["address"].as_str().unwrap_or_default()
        ),
        &v["kms"],
        &mut out,
    );
    for app in v["apps"].as_array().into_iter().flatten() {
        contract(
            format!("app {}", app["address"].as_str().unwrap_or_default()),
            app,
            &mut out,
        );
    }
    let findings = v["findings"].as_array().cloned().unwrap_or_default();
    out.push_str("\nFindings:\n");
    if findings.is_empty() {
        out.push_str("  none\n");
    }
    for f in findings {
        out.push_str(&format!(
            "  [{}] {}\n",
            f["severity"].as_str().unwrap_or_default(),
            f["detail"].as_str().unwrap_or_default()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governance::events::{ContractKind, GovEvent};

    #[test]
    fn a_safe_proposing_on_a_timelock_that_owns_the_kms_is_one_tree_and_an_eoa_owner_is_a_finding()
    {
        let kms = Address::repeat_byte(0x0a);
        let app = Address::repeat_byte(0x0b);
        let timelock = Address::repeat_byte(0x0c);
        let safe = Address::repeat_byte(0x5a);
        let eoa = Address::repeat_byte(0xe0);
        let mut s = GovernanceState::new(kms);
        let events = [
            GovEvent::OwnershipTransferred {
                contract: kms,
                owner: timelock,
            },
            GovEvent::AppRegistered { app, factory: true },
            GovEvent::OwnershipTransferred {
                contract: app,
                owner: eoa,
            },
            GovEvent::RoleGranted {
                timelock,
                role: PROPOSER,
                account: safe,
            },
            GovEvent::RoleGranted {
                timelock,
                role: EXECUTOR,
                account: Address::ZERO,
            },
            GovEvent::Observed {
                address: timelock,
                kind: ContractKind::Timelock { min_delay: 86400 },
            },
            GovEvent::Observed {
                address: eoa,
                kind: ContractKind::Eoa,
            },
            GovEvent::Observed {
                address: safe,
                kind: ContractKind::Safe {
                    version: "1.4.1".into(),
                    owners: vec![Address::repeat_byte(1), Address::repeat_byte(2)],
                    threshold: 1,
                    nonce: 0,
                    modules: vec![],
                    guard: Address::ZERO,
                    fallback_handler: Address::ZERO,
                },
            },
        ];
        for e in &events {
            s.apply(e, 1);
        }
        let t = topology(&s);
        assert_eq!(t["kms"]["owner"]["kind"], "timelock");
        let proposer = &t["kms"]["owner"]["timelock"]["proposers"][0];
        assert_eq!(proposer["kind"], "safe");
        assert_eq!(proposer["safe"]["threshold"], 1);
        assert_eq!(
            t["kms"]["owner"]["timelock"]["executors"][0]["kind"],
            "anyone"
        );
        assert_eq!(t["apps"][0]["owner"]["kind"], "eoa");
        let findings: Vec<String> = t["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["detail"].as_str().unwrap().to_owned())
            .collect();
        assert!(
            findings
                .iter()
                .any(|f| f.contains("no multisig governs it")),
            "{findings:?}"
        );
        assert!(
            findings
                .iter()
                .any(|f| f.contains("one signature of 2 owners")),
            "{findings:?}"
        );
        let text = render_text(&t);
        assert!(text.contains("proposer "), "{text}");
    }
}
