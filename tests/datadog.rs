//! The Datadog mapping as shipped: `deploy/datadog/conf.d/openmetrics.d/conf.yaml` maps every
//! documented metric family onto `dstack.cloud.kms.*`, `dstack.cloud.cvm.*` or
//! `dstack.cloud.governance.*` (the chain mirror and the service's own metrics under `kms`),
//! with no stale entry and no name that is also the prefix of another; and the Datadog Agent's
//! own OpenMetrics check (`OpenMetricsBaseCheckV2` from PyPI's datadog-checks-base, with its
//! aggregator stub), run on that file against a running keywarden with CVM sources configured,
//! collects every family keywarden exports under its five prefixes, submits each under its mapped
//! name with the type the check derives from keywarden's (counter: monotonic `.count`; gauge:
//! gauge; histogram: monotonic `.bucket`, `.sum` and `.count`), and nothing outside the three
//! groups. A metric added to keywarden without a mapping fails here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/vmm.rs"]
mod fake;
#[path = "support/fleet.rs"]
mod fleet;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const CONF: &str = "deploy/datadog/conf.d/openmetrics.d/conf.yaml";

/// keywarden's metric prefixes and the Datadog group each one's families go to.
const GROUPS: [(&str, &str); 5] = [
    ("dstack_kms_", "kms."),
    ("dstack_chain_", "kms."),
    ("keywarden_", "kms."),
    ("dstack_cvm_", "cvm."),
    ("dstack_governance_", "governance."),
];

const NAMESPACE: &str = "dstack.cloud";

/// Runs the Agent's OpenMetrics V2 check on the configuration file (argument 1) against the
/// endpoint (argument 2, replacing the file's), as the Agent would every interval, and prints as
/// JSON every metric the aggregator received: its types, tag keys, tag keys a series carries
/// twice, and whether the Agent would submit its first value; and the service checks' statuses.
const CHECK: &str = r"
import json, sys
from collections import Counter

import yaml
from datadog_checks.base import OpenMetricsBaseCheckV2
from datadog_checks.base.stubs import aggregator

conf_path, endpoint = sys.argv[1], sys.argv[2]
with open(conf_path) as f:
    conf = yaml.safe_load(f)
instance = dict(conf['instances'][0], openmetrics_endpoint=endpoint)
check = OpenMetricsBaseCheckV2('openmetrics', conf.get('init_config') or {}, [instance])
# The first run only gives the Agent its counters' baselines (it submits monotonic counts from
# the second run on): report the second run, what a running Agent sends every interval.
for _ in range(2):
    aggregator.reset()
    error = check.run()
    if error:
        sys.exit('the check failed: ' + error)
metrics = {}
for name in aggregator.metric_names:
    stubs = aggregator.metrics(name)
    keys = [[t.split(':', 1)[0] for t in s.tags or []] for s in stubs]
    metrics[name] = {
        'types': sorted({aggregator.METRIC_ENUM_MAP_REV[s.type] for s in stubs}),
        'tags': sorted({k for ks in keys for k in ks}),
        'repeated_tags': sorted({k for ks in keys for k, n in Counter(ks).items() if n > 1}),
        'flush_first_value': all(s.flush_first_value for s in stubs),
    }
service_checks = {
    name: sorted({s.status for s in aggregator.service_checks(name)})
    for name in aggregator.service_check_names
}
print(json.dumps({'metrics': metrics, 'service_checks': service_checks}))
";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The configuration file's instance.
fn instance() -> serde_yaml::Value {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(root().join(CONF)).unwrap()).unwrap();
    let instances = doc["instances"].as_sequence().unwrap();
    assert_eq!(instances.len(), 1, "{CONF}: one instance");
    instances[0].clone()
}

/// The `metrics` mapping: keywarden family → Datadog name (without the namespace).
fn mapping() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for entry in instance()["metrics"].as_sequence().unwrap() {
        for (family, name) in entry.as_mapping().unwrap() {
            let (family, name) = (family.as_str().unwrap(), name.as_str().unwrap());
            let previous = out.insert(family.to_owned(), name.to_owned());
            assert!(previous.is_none(), "{CONF}: {family} is mapped twice");
        }
    }
    out
}

/// The families of the README's metrics table, by their exposition name (counters without
/// `_total`), with their type.
fn documented() -> BTreeMap<String, String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let table = readme
        .split("<!-- metrics:begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- metrics:end -->").next())
        .unwrap();
    table
        .lines()
        .filter_map(|l| {
            let mut cells = l.split('|').map(str::trim).skip(1);
            let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
            let kind = cells.next()?;
            let family = match kind {
                "counter" => name.strip_suffix("_total").unwrap(),
                _ => name,
            };
            Some((family.to_owned(), kind.to_owned()))
        })
        .collect()
}

/// What the check submits for a family of `kind` mapped to `name`: (Datadog name, type).
fn submitted_as(name: &str, kind: &str) -> Vec<(String, &'static str)> {
    let name = format!("{NAMESPACE}.{name}");
    match kind {
        "counter" => vec![(format!("{name}.count"), "monotonic_count")],
        "gauge" => vec![(name, "gauge")],
        "histogram" => [".bucket", ".sum", ".count"]
            .iter()
            .map(|s| (format!("{name}{s}"), "monotonic_count"))
            .collect(),
        other => panic!("{name}: no rule for how the check submits a {other}"),
    }
}

/// A sample line's metric name and value (exemplars and timestamps after it ignored).
fn sample(line: &str) -> Option<(&str, f64)> {
    let end = line.find(['{', ' '])?;
    let (name, mut rest) = line.split_at(end);
    if rest.starts_with('{') {
        let (mut quoted, mut escaped, mut close) = (false, false, None);
        for (i, c) in rest.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
        }
        rest = &rest[close? + 1..];
    }
    Some((name, rest.split_whitespace().next()?.parse().ok()?))
}

/// An exposed family: its type and whether one of its samples has a finite value (the check
/// drops the others, e.g. a gauge at `+Inf` meaning "none").
struct Family {
    kind: String,
    finite: bool,
}

/// keywarden's families under its five prefixes in an exposition.
fn families(text: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (name, kind) = (it.next()?, it.next()?);
            GROUPS.iter().any(|(p, _)| name.starts_with(p)).then(|| {
                let kind = kind.to_owned();
                (
                    name.to_owned(),
                    Family {
                        kind,
                        finite: false,
                    },
                )
            })
        })
        .collect();
    for (name, value) in text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(sample)
    {
        let family = std::iter::once(name)
            .chain(
                ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|s| name.strip_suffix(s)),
            )
            .find(|f| out.contains_key(*f));
        if let Some(f) = family {
            out.get_mut(f).unwrap().finite |= value.is_finite();
        }
    }
    out
}

#[test]
fn the_datadog_mapping_covers_every_documented_metric_under_the_three_groups() {
    let instance = instance();
    assert_eq!(instance["namespace"].as_str(), Some(NAMESPACE));
    assert_eq!(
        instance["openmetrics_endpoint"].as_str(),
        Some("http://127.0.0.1:9464/metrics"),
        "the metrics listener's default address"
    );
    let mapping = mapping();
    let documented = documented();
    assert!(
        documented.len() >= 100,
        "{} documented families",
        documented.len()
    );
    for family in documented.keys() {
        assert!(
            mapping.contains_key(family),
            "{family} is documented but has no Datadog name in {CONF}"
        );
    }
    let mut names = BTreeSet::new();
    for (family, name) in &mapping {
        let kind = documented.get(family).unwrap_or_else(|| {
            panic!("{CONF}: {family} is not a metric keywarden exports (README's table)")
        });
        let (_, group) = GROUPS
            .iter()
            .find(|(p, _)| family.starts_with(p))
            .unwrap_or_else(|| panic!("{CONF}: {family} has none of keywarden's prefixes"));
        assert!(
            name.starts_with(group),
            "{family} → {name}: not under {group}"
        );
        assert!(
            name.split('.').all(|part| !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')),
            "{family} → {name}: dotted lower-case words"
        );
        for (submitted, _) in submitted_as(name, kind) {
            assert!(names.insert(submitted.clone()), "{submitted} twice");
        }
    }
    // No name is also the dotted prefix of another (`a.b` and `a.b.c` read as one tree).
    for a in &names {
        let under = format!("{a}.");
        assert!(
            !names.iter().any(|b| b.starts_with(&under)),
            "{a} is both a metric and the prefix of another"
        );
    }
}

#[tokio::test]
async fn the_datadog_openmetrics_check_submits_every_exported_family_under_its_mapped_name_and_type()
 {
    let python = root().join(".tools/venv/bin/python");
    if !python.exists() {
        eprintln!(
            "SKIPPED: {} is missing (scripts/test --prepare-only installs the Datadog check library)",
            python.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet::Fleet::start(dir.path()).await;
    let (kw, before) = (&fleet.kw, fleet.metrics.clone());

    // The check, in its own process; the in-test VMM and gateway keep answering meanwhile.
    let endpoint = format!("http://{}/metrics", kw.metrics);
    let out = tokio::process::Command::new(&python)
        .current_dir(root())
        .args(["-c", CHECK, CONF, &endpoint])
        .output()
        .await
        .unwrap();
    let after = kw.metrics_text().await;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let submitted = report["metrics"].as_object().unwrap();

    // Every family exported, before or after the check ran, has a Datadog name; what the check
    // may submit follows from its type, and what it must submit from a finite sample both times.
    let (before, after) = (families(&before), families(&after));
    let mapping = mapping();
    let mut allowed: BTreeMap<String, &str> = BTreeMap::new();
    let mut required = BTreeSet::new();
    for (family, f) in before.iter().chain(&after) {
        let name = mapping
            .get(family)
            .unwrap_or_else(|| panic!("{family} is exported but has no Datadog name in {CONF}"));
        for (dd, kind) in submitted_as(name, &f.kind) {
            allowed.insert(dd.clone(), kind);
            if before.get(family).is_some_and(|f| f.finite)
                && after.get(family).is_some_and(|f| f.finite)
            {
                required.insert(dd);
            }
        }
    }
    assert!(before.len() >= 100, "{} families exported", before.len());
    for dd in &required {
        assert!(submitted.contains_key(dd), "{dd} was not submitted");
    }
    for (dd, m) in submitted {
        assert!(
            ["kms.", "cvm.", "governance."]
                .iter()
                .any(|g| dd.starts_with(&format!("{NAMESPACE}.{g}"))),
            "{dd} is outside dstack.cloud.kms/cvm/governance"
        );
        let kind = allowed
            .get(dd)
            .unwrap_or_else(|| panic!("{dd} comes from no exported family: {m}"));
        assert_eq!(m["types"], serde_json::json!([kind]), "{dd}");
        if *kind == "monotonic_count" {
            assert_eq!(
                m["flush_first_value"], true,
                "{dd}: the Agent would hold it back"
            );
        }
        let tags: Vec<&str> = m["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        for tag in ["dstack_component", "endpoint"] {
            assert!(tags.contains(&tag), "{dd}: no {tag} tag ({tags:?})");
        }
        for reserved in ["version", "env", "service", "host"] {
            assert!(
                !tags.contains(&reserved),
                "{dd}: a {reserved} label became a tag"
            );
        }
        assert_eq!(
            m["repeated_tags"],
            serde_json::json!([]),
            "{dd}: a tag twice"
        );
    }

    // Not vacuous: names from each group, with the types and tags they must have.
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "kms.requests.count",
            "monotonic_count",
            &["method", "outcome", "reason"],
        ),
        (
            "kms.dispatch_duration_seconds.bucket",
            "monotonic_count",
            &["method", "upper_bound"],
        ),
        (
            "kms.dispatch_duration_seconds.sum",
            "monotonic_count",
            &["method"],
        ),
        ("kms.uptime_seconds", "gauge", &[]),
        ("kms.build_info", "gauge", &["keywarden_version", "git_sha"]),
        ("kms.chain.lag_seconds", "gauge", &[]),
        ("kms.chain.staleness_seconds", "gauge", &[]),
        ("cvm.up", "gauge", &["instance", "app"]),
        ("cvm.memory_usage_ratio", "gauge", &["instance", "app"]),
        (
            "cvm.last_seen_timestamp_seconds",
            "gauge",
            &["instance", "app"],
        ),
        ("cvm.peer_kms.cert_expiry_seconds", "gauge", &["peer"]),
        (
            "cvm.peer_kms.attestation_requests.count",
            "monotonic_count",
            &["peer"],
        ),
        ("cvm.vsock_proxy.up", "gauge", &["proxy"]),
        (
            "cvm.source.polls.count",
            "monotonic_count",
            &["source", "outcome"],
        ),
        ("governance.ungoverned_contracts", "gauge", &[]),
        ("governance.findings", "gauge", &["severity"]),
        (
            "governance.proposals.announced.count",
            "monotonic_count",
            &["kind"],
        ),
        (
            "governance.tx_service.request_duration_seconds.count",
            "monotonic_count",
            &[],
        ),
    ];
    for (dd, kind, tags) in cases {
        let dd = format!("{NAMESPACE}.{dd}");
        let m = submitted
            .get(&dd)
            .unwrap_or_else(|| panic!("{dd} was not submitted"));
        assert_eq!(m["types"], serde_json::json!([kind]), "{dd}");
        for tag in tags.iter() {
            assert!(
                m["tags"].as_array().unwrap().iter().any(|t| t == tag),
                "{dd}: no {tag} tag: {m}"
            );
        }
    }
    // The scrape itself succeeded (0 is OK).
    assert_eq!(
        report["service_checks"][format!("{NAMESPACE}.openmetrics.health")],
        serde_json::json!([0])
    );
    fleet.stop();
}
