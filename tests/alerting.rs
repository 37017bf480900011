//! The alerting surface as shipped: `alert-rules/` pass Prometheus's `promtool check rules` and
//! their unit tests (every rule fires in one case and stays quiet in another); every rule has a
//! severity, a static summary, a templated description and a `runbook_url` that is a heading of
//! `docs/runbook.md`, no `$value` in a label, an expression that parses with `rate`/`increase`
//! only over counters; the dashboards follow the linter's rules (stable uids, a datasource
//! variable and no `__inputs`, a unit and a query on every panel, `$__rate_interval` in rates,
//! every query parsing); every metric the rules and dashboards name is exported by a running
//! keywarden; and `alertmanager/` is a valid tree routing each severity to its receivers
//! (`amtool`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/vmm.rs"]
mod fake;
#[path = "support/fleet.rs"]
mod fleet;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use promql_parser::parser::{self, Expr};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no {suffix} under {dir}");
    out
}

/// Whether `tool` runs here; a loud skip otherwise (`scripts/test` installs it).
fn have(tool: &str) -> bool {
    let ok = Command::new(tool).arg("--version").output().is_ok();
    if !ok {
        eprintln!("SKIPPED: {tool} is not installed (scripts/test --prepare-only installs it)");
    }
    ok
}

fn run(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool)
        .current_dir(root())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Every rule of every rule file: (file, rule).
fn rules() -> Vec<(PathBuf, serde_yaml::Value)> {
    files("alert-rules", ".rules.yml")
        .into_iter()
        .flat_map(|f| {
            let doc: serde_yaml::Value =
                serde_yaml::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
            doc["groups"]
                .as_sequence()
                .unwrap()
                .iter()
                .flat_map(|g| g["rules"].as_sequence().unwrap().clone())
                .map(|r| (f.clone(), r))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every selector's metric name in `e`, and every (function, metric) of a range function.
fn walk(e: &Expr, names: &mut BTreeSet<String>, ranged: &mut Vec<(String, String)>) {
    match e {
        Expr::Aggregate(a) => {
            walk(&a.expr, names, ranged);
            if let Some(p) = &a.param {
                walk(p, names, ranged);
            }
        }
        Expr::Unary(u) => walk(&u.expr, names, ranged),
        Expr::Binary(b) => {
            walk(&b.lhs, names, ranged);
            walk(&b.rhs, names, ranged);
        }
        Expr::Paren(p) => walk(&p.expr, names, ranged),
        Expr::Subquery(s) => walk(&s.expr, names, ranged),
        Expr::VectorSelector(v) => names.extend(v.name.clone()),
        Expr::MatrixSelector(m) => names.extend(m.vs.name.clone()),
        Expr::Call(c) => {
            for arg in &c.args.args {
                if let Expr::MatrixSelector(m) = &**arg
                    && let Some(n) = &m.vs.name
                {
                    ranged.push((c.func.name.to_owned(), n.clone()));
                }
                walk(arg, names, ranged);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    if !have("promtool") {
        return;
    }
    let rule_files: Vec<String> = files("alert-rules", ".rules.yml")
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let mut args = vec!["check", "rules"];
    args.extend(rule_files.iter().map(String::as_str));
    let (ok, out) = run("promtool", &args);
    assert!(ok, "{out}");
    let tests: Vec<String> = std::fs::read_dir(root().join("alert-rules/tests"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    let mut args = vec!["test", "rules"];
    args.extend(tests.iter().map(String::as_str));
    let (ok, out) = run("promtool", &args);
    assert!(ok, "{out}");
    // Every alerting rule is tested, firing in one case and quiet in another.
    let tested: String = tests
        .iter()
        .map(|t| std::fs::read_to_string(t).unwrap())
        .collect();
    for (_, r) in rules() {
        if let Some(name) = r["alert"].as_str() {
            let cases = tested.matches(&format!("alertname: {name}\n")).count();
            assert!(cases >= 2, "{name} has {cases} promtool case(s)");
        }
    }
}

#[test]
fn every_rule_is_labelled_annotated_linked_to_its_runbook_and_parses() {
    let runbook = std::fs::read_to_string(root().join("docs/runbook.md")).unwrap();
    let headings: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    let mut alerts = 0;
    for (file, r) in rules() {
        let expr = r["expr"].as_str().unwrap();
        let parsed =
            parser::parse(expr).unwrap_or_else(|e| panic!("{}: {expr}: {e}", file.display()));
        let (mut names, mut ranged) = (BTreeSet::new(), Vec::new());
        walk(&parsed, &mut names, &mut ranged);
        for (func, metric) in &ranged {
            if matches!(func.as_str(), "rate" | "irate" | "increase") {
                assert!(
                    metric.ends_with("_total") || metric.ends_with("_bucket"),
                    "{func} over {metric}, which is not a counter"
                );
            }
        }
        let Some(name) = r["alert"].as_str() else {
            continue;
        };
        alerts += 1;
        let labels = r["labels"].as_mapping().unwrap();
        assert!(
            matches!(
                r["labels"]["severity"].as_str(),
                Some("critical" | "warning" | "info")
            ),
            "{name}"
        );
        for (k, v) in labels {
            assert!(
                !v.as_str().unwrap_or_default().contains("$value"),
                "{name}: label {k:?} carries $value"
            );
        }
        let summary = r["annotations"]["summary"].as_str().unwrap();
        assert!(!summary.contains("{{"), "{name}: the summary is static");
        let description = r["annotations"]["description"].as_str().unwrap();
        assert!(
            description.contains("{{"),
            "{name}: the description is templated"
        );
        let url = r["annotations"]["runbook_url"].as_str().unwrap();
        assert_eq!(url, format!("docs/runbook.md#{}", name.to_lowercase()));
        assert!(
            headings.contains(&name.to_lowercase()),
            "{name}: no heading in docs/runbook.md"
        );
    }
    assert!(alerts >= 28, "{alerts} alerting rules");
}

/// Every dashboard file: (path, JSON).
fn dashboards() -> Vec<(PathBuf, serde_json::Value)> {
    ["dashboards", "dashboards/kubernetes"]
        .iter()
        .flat_map(|d| files(d, ".json"))
        .map(|p| {
            let json = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            (p, json)
        })
        .collect()
}

/// A dashboard query as Prometheus receives it (Grafana's variables substituted).
fn substituted(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$namespace", "keywarden")
        .replace("$pod", ".*")
}

/// Every query of a dashboard's panels: (panel title, expression).
fn queries(d: &serde_json::Value) -> Vec<(String, String)> {
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            p["targets"].as_array().into_iter().flatten().map(move |t| {
                (
                    title.clone(),
                    t["expr"].as_str().unwrap_or_default().to_owned(),
                )
            })
        })
        .collect()
}

#[test]
fn the_dashboards_follow_the_linter_rules() {
    let mut uids = BTreeSet::new();
    let all = dashboards();
    assert_eq!(all.len(), 6, "three dashboards, standalone and Kubernetes");
    for (path, d) in &all {
        let name = path.display();
        assert!(d.get("__inputs").is_none(), "{name}: no __inputs");
        let uid = d["uid"].as_str().unwrap();
        assert!(
            uid.starts_with("keywarden-") && uids.insert(uid.to_owned()),
            "{name}: uid"
        );
        let vars = d["templating"]["list"].as_array().unwrap();
        assert!(
            vars.iter()
                .any(|v| v["type"] == "datasource" && v["name"] == "datasource"),
            "{name}: a datasource variable"
        );
        if path.to_string_lossy().contains("kubernetes") {
            for var in ["namespace", "pod"] {
                assert!(vars.iter().any(|v| v["name"] == var), "{name}: ${var}");
            }
        }
        for p in d["panels"].as_array().unwrap() {
            let title = p["title"].as_str().unwrap();
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{name}: {title}");
            let unit = p["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .unwrap_or_default();
            assert!(!unit.is_empty(), "{name}: {title} has no unit");
            assert!(
                !p["targets"].as_array().unwrap().is_empty(),
                "{name}: {title} is empty"
            );
        }
        for (title, expr) in queries(d) {
            assert!(!expr.is_empty(), "{name}: {title}");
            let parsed = parser::parse(&substituted(&expr))
                .unwrap_or_else(|e| panic!("{name}: {title}: {expr}: {e}"));
            let (mut names, mut ranged) = (BTreeSet::new(), Vec::new());
            walk(&parsed, &mut names, &mut ranged);
            for (func, metric) in &ranged {
                if matches!(func.as_str(), "rate" | "irate") {
                    assert!(
                        expr.contains("[$__rate_interval]"),
                        "{name}: {title}: {func} without $__rate_interval"
                    );
                }
                if matches!(func.as_str(), "rate" | "irate" | "increase") {
                    assert!(
                        metric.ends_with("_total") || metric.ends_with("_bucket"),
                        "{name}: {title}: {func} over {metric}"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn every_metric_a_rule_or_dashboard_names_is_exported_by_a_running_keywarden() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet::Fleet::start(dir.path()).await;
    let text = &fleet.metrics;
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .flat_map(|l| {
            let mut it = l.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_count", "_sum"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                _ => vec![name.to_owned()],
            }
        })
        .collect();
    let recorded: BTreeSet<String> = rules()
        .iter()
        .filter_map(|(_, r)| r["record"].as_str().map(str::to_owned))
        .collect();
    let exprs = rules()
        .into_iter()
        .map(|(f, r)| (f, r["expr"].as_str().unwrap().to_owned()))
        .chain(dashboards().into_iter().flat_map(|(f, d)| {
            queries(&d)
                .into_iter()
                .map(move |(_, e)| (f.clone(), substituted(&e)))
        }));
    for (file, expr) in exprs {
        let (mut names, mut ranged) = (BTreeSet::new(), Vec::new());
        walk(&parser::parse(&expr).unwrap(), &mut names, &mut ranged);
        for n in names {
            // `up` is Prometheus's own; recording rules are the rules' own series.
            if n == "up" || recorded.contains(&n) {
                continue;
            }
            assert!(
                exported.contains(&n),
                "{}: {n} is not exported by keywarden",
                file.display()
            );
        }
    }
    fleet.stop();
}

#[test]
fn the_escalation_tree_is_valid_and_routes_each_severity_to_its_receivers() {
    if !have("amtool") {
        return;
    }
    let config = "alertmanager/alertmanager.yml";
    let (ok, out) = run("amtool", &["check-config", config]);
    assert!(ok, "{out}");
    for (severity, receivers) in [
        ("critical", "pager,security"),
        ("warning", "team-chat"),
        ("info", "log"),
    ] {
        let (ok, out) = run(
            "amtool",
            &[
                "config",
                "routes",
                "test",
                &format!("--config.file={config}"),
                &format!("--verify.receivers={receivers}"),
                &format!("severity={severity}"),
                "alertname=KeywardenTest",
            ],
        );
        assert!(ok, "{severity} → {receivers}: {out}");
    }
}
