//! `docs/configuration.md` names every key the configuration has. The keys are found from the
//! configuration struct itself: every section rejects an unknown key with the list of the keys
//! it expects, so probing each section (and each nested table, and each entry of a list of
//! tables) enumerates them all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use keywarden::config::Config;

const PROBE: &str = "zz_not_a_key";

/// The keys a table at `header` (`""` for the top, `[a.b]` or `[[a.b]]`) expects, or `None`
/// when the probe is not refused as an unknown key (not a struct there).
fn expected(header: &str) -> Option<Vec<String>> {
    let text = format!("{header}\n{PROBE} = 1\n");
    let err = toml::from_str::<Config>(&text).err()?.to_string();
    if !err.contains(&format!("unknown field `{PROBE}`")) {
        return None;
    }
    let list = err.split("expected").nth(1)?;
    Some(
        list.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect(),
    )
}

/// Every key under `path` (a dotted table path; `in_list`: its entries are a list of tables).
fn keys(path: &str, in_list: bool, out: &mut BTreeSet<String>) {
    let header = match (path.is_empty(), in_list) {
        (true, _) => String::new(),
        (false, false) => format!("[{path}]"),
        (false, true) => format!("[[{path}]]"),
    };
    let Some(fields) = expected(&header) else {
        return;
    };
    for f in fields {
        let child = if path.is_empty() {
            f.clone()
        } else {
            format!("{path}.{f}")
        };
        let shown = if in_list {
            format!("{path}[].{f}")
        } else {
            child.clone()
        };
        if expected(&format!("[{child}]")).is_some() {
            keys(&child, false, out);
        } else if expected(&format!("[[{child}]]")).is_some() {
            keys(&child, true, out);
        } else if !path.is_empty() {
            out.insert(shown);
        }
    }
}

#[test]
fn the_configuration_page_names_every_key_of_the_configuration() {
    let mut all = BTreeSet::new();
    keys("", false, &mut all);
    assert!(all.len() > 80, "{all:?}");
    let page = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    let missing: Vec<&String> = all
        .iter()
        .filter(|k| !page.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "not in docs/configuration.md: {missing:#?}"
    );
    // And nothing documented that the configuration does not have.
    let documented: Vec<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .collect();
    let stale: Vec<&&str> = documented
        .iter()
        .filter(|k| {
            // A list or table documented as a whole is fine when its entries are keys.
            !all.contains(**k)
                && !all
                    .iter()
                    .any(|a| a.starts_with(&format!("{k}[].")) || a.starts_with(&format!("{k}.")))
        })
        .collect();
    assert!(
        stale.is_empty(),
        "documented but not configuration keys: {stale:#?}"
    );
}

#[test]
fn the_security_page_names_every_insecure_switch() {
    let page =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/security.md")).unwrap();
    for (key, on) in Config::default().insecure_switches() {
        assert!(!on, "{key} is on by default");
        assert!(
            page.contains(&format!("| `{key}` |")),
            "{key} not in docs/security.md"
        );
    }
}

/// Every backticked first cell of the table under `heading` in `page`.
fn table_keys<'a>(page: &'a str, heading: &str) -> Vec<&'a str> {
    let section = page.split(heading).nth(1).unwrap_or_default();
    let section = section.split("\n## ").next().unwrap_or_default();
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .collect()
}

/// The text of every source file of the crate.
fn sources() -> String {
    fn walk(dir: &std::path::Path, out: &mut String) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push_str(&std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut out = String::new();
    walk(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut out,
    );
    out
}

#[test]
fn the_observability_page_lists_log_messages_and_spans_the_code_emits() {
    let page = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/observability.md"
    ))
    .unwrap();
    let code = sources();
    let messages = table_keys(&page, "## Log patterns");
    assert!(messages.len() >= 20, "{messages:?}");
    for m in messages {
        assert!(
            code.contains(&format!("\"{m}\"")),
            "no log line {m:?} in src/"
        );
    }
    let spans = table_keys(&page, "## Trace spans");
    assert_eq!(spans.len(), 3, "{spans:?}");
    for s in spans {
        assert!(
            code.contains(&format!("info_span!(\"{s}\"")) || code.contains(&format!("\"{s}\",")),
            "no span {s:?} in src/"
        );
    }
}
