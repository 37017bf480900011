//! The deployment files as shipped. `docker-compose.yml` passes `docker-compose config` and the
//! compose specification's schema, and everything it names exists: the services it depends on,
//! the repository files it bind-mounts, its named volumes, the rule files, Alertmanager and
//! scrape targets of its Prometheus, the collector's pipeline, Grafana's provisioning, and the
//! hosts keywarden's configuration points at. Its and `deploy/k8s/`'s configurations pass
//! `keywarden config check`. `deploy/k8s/` renders offline with `kubectl kustomize`, its core
//! objects pass `kubernetes-validate`, its objects refer to each other consistently, and its
//! PrometheusRule carries exactly the groups of `alert-rules/`. The image builds `--locked`, runs
//! unprivileged, carries the demo's npm packages and is sent only its inputs. The systemd unit has
//! its hardening directives and passes `systemd-analyze verify`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize as _;
use serde_yaml::{Mapping, Value};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A YAML file with its merge keys (`<<: *anchor`) applied.
fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut v: Value =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    v.apply_merge().unwrap();
    v
}

fn toml_file(path: &Path) -> toml::Table {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A tool run in the repository: from `.tools/venv/bin` when there (scripts/test installs the
/// PyPI ones there), else from `PATH`.
fn tool(name: &str) -> Command {
    let venv = root().join(".tools/venv/bin").join(name);
    let mut cmd = Command::new(if venv.exists() {
        venv
    } else {
        PathBuf::from(name)
    });
    cmd.current_dir(root());
    cmd
}

/// Runs `cmd` with `input` on its stdin: (success, stdout, stderr), or `None` with a loud skip
/// when the program is not installed.
fn run(cmd: &mut Command, input: Option<&str>) -> Option<(bool, String, String)> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let stdin = if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    let mut child = match cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("SKIPPED: {name} is not installed (scripts/test --prepare-only installs it)");
            return None;
        }
        Err(e) => panic!("{name}: {e}"),
    };
    let writer = input.map(|text| {
        let mut pipe = child.stdin.take().unwrap();
        let text = text.to_owned();
        // A tool that stops reading fails on its own; its answer says why.
        std::thread::spawn(move || {
            let _ = pipe.write_all(text.as_bytes());
        })
    });
    let out = child.wait_with_output().unwrap();
    if let Some(w) = writer {
        w.join().unwrap();
    }
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `alert-rules/*.rules.yml`, in file-name order.
fn rule_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("alert-rules"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".rules.yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

/// The files in `pattern`'s directory whose names match its last component (one `*` at most).
fn glob(pattern: &Path) -> Vec<PathBuf> {
    let name = pattern.file_name().unwrap().to_str().unwrap();
    let matches = |n: &str| match name.split_once('*') {
        Some((pre, post)) => {
            n.len() >= pre.len() + post.len() && n.starts_with(pre) && n.ends_with(post)
        }
        None => n == name,
    };
    let mut found: Vec<PathBuf> = std::fs::read_dir(pattern.parent().unwrap())
        .map(|entries| entries.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    found.retain(|p| matches(p.file_name().unwrap().to_str().unwrap()));
    found.sort();
    found
}

/// A compose volume entry: a repository path bind-mounted at a target, or a named volume.
enum Mount {
    Bind { target: String, host: PathBuf },
    Named { volume: String, target: String },
}

fn mounts(service: &Value) -> Vec<Mount> {
    let mut out = Vec::new();
    for v in service["volumes"].as_sequence().into_iter().flatten() {
        let (source, target) = match v.as_str() {
            Some(short) => {
                let mut parts = short.split(':');
                let source = parts.next().unwrap().to_owned();
                (source, parts.next().expect("source:target").to_owned())
            }
            None => (
                v["source"].as_str().unwrap().to_owned(),
                v["target"].as_str().unwrap().to_owned(),
            ),
        };
        out.push(if source.starts_with('.') || source.starts_with('/') {
            Mount::Bind {
                target,
                host: root().join(source),
            }
        } else {
            Mount::Named {
                volume: source,
                target,
            }
        });
    }
    out
}

/// Where `path` inside `service`'s container comes from in the repository.
fn host_path(service: &Value, path: &str) -> Option<PathBuf> {
    mounts(service)
        .into_iter()
        .filter_map(|m| match m {
            Mount::Bind { target, host }
                if path == target || path.starts_with(&format!("{target}/")) =>
            {
                Some((target, host))
            }
            _ => None,
        })
        .max_by_key(|(target, _)| target.len())
        .map(
            |(target, host)| match path[target.len()..].trim_start_matches('/') {
                "" => host,
                rest => host.join(rest),
            },
        )
}

fn named_volume_at(service: &Value, path: &str) -> Option<String> {
    mounts(service).into_iter().find_map(|m| match m {
        Mount::Named { volume, target } if target == path => Some(volume),
        _ => None,
    })
}

/// The targets of a Prometheus `scrape_configs` / `alertmanagers` list.
fn static_targets(configs: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for c in configs.as_sequence().unwrap() {
        for sc in c["static_configs"].as_sequence().unwrap() {
            for t in sc["targets"].as_sequence().unwrap() {
                out.push(t.as_str().unwrap().to_owned());
            }
        }
    }
    out
}

fn host_port(text: &str) -> (String, u16) {
    let u = url::Url::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    (
        u.host_str().unwrap().to_owned(),
        u.port_or_known_default().unwrap(),
    )
}

fn port(listen: &toml::Value) -> u16 {
    listen
        .as_str()
        .unwrap()
        .parse::<std::net::SocketAddr>()
        .unwrap()
        .port()
}

#[test]
fn the_compose_file_passes_docker_compose_config_and_the_compose_schema() {
    if let Some((ok, out, err)) = run(
        tool("docker-compose").args(["-f", "docker-compose.yml", "config", "-q"]),
        None,
    ) {
        assert!(ok, "{out}{err}");
    }
    if let Some((ok, out, err)) = run(
        tool("check-jsonschema").args([
            "--builtin-schema",
            "vendor.compose-spec",
            "docker-compose.yml",
        ]),
        None,
    ) {
        assert!(ok, "{out}{err}");
    }
    if let Some((ok, out, err)) = run(tool("sh").args(["-n", "deploy/compose/stack.sh"]), None) {
        assert!(ok, "{out}{err}");
    }
}

#[test]
fn everything_the_compose_file_names_exists() {
    let compose = yaml(&root().join("docker-compose.yml"));
    let services = compose["services"].as_mapping().unwrap();
    let volumes = compose["volumes"].as_mapping().unwrap();
    let service = |name: &str| {
        services
            .get(name)
            .unwrap_or_else(|| panic!("no service {name}"))
    };
    let is_service = |host: &str| services.contains_key(host);
    for (name, s) in services {
        let name = name.as_str().unwrap();
        assert!(
            s["image"].is_string() || !s["build"].is_null(),
            "{name}: no image"
        );
        let deps: Vec<&Value> = match &s["depends_on"] {
            Value::Sequence(list) => list.iter().collect(),
            Value::Mapping(map) => map.keys().collect(),
            _ => Vec::new(),
        };
        for d in deps {
            assert!(
                services.contains_key(d),
                "{name} depends on {d:?}: no such service"
            );
        }
        for m in mounts(s) {
            match m {
                Mount::Bind { target, host } => {
                    assert!(
                        host.exists(),
                        "{name} mounts {} at {target}: missing",
                        host.display()
                    )
                }
                Mount::Named { volume, .. } => assert!(
                    volumes.contains_key(volume.as_str()),
                    "{name}: volume {volume} is not declared"
                ),
            }
        }
    }

    // The replicas: their configuration, entry point and data; the hosts the configuration names.
    let replicas: Vec<&str> = services
        .keys()
        .filter_map(Value::as_str)
        .filter(|n| n.starts_with("keywarden-"))
        .collect();
    assert_eq!(replicas.len(), 3, "{replicas:?}");
    let config_path = service("keywarden-0")["environment"]["KEYWARDEN_CONFIG"]
        .as_str()
        .unwrap();
    let config = toml_file(&host_path(service("keywarden-0"), config_path).unwrap());
    let data_dir = config["storage"]["data_dir"].as_str().unwrap();
    for &r in &replicas {
        let s = service(r);
        assert_eq!(
            s["environment"]["KEYWARDEN_CONFIG"].as_str(),
            Some(config_path)
        );
        assert_eq!(
            host_path(s, config_path),
            host_path(service("keywarden-0"), config_path),
            "{r}"
        );
        let entry: Vec<&str> = s["entrypoint"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            host_path(s, entry[1]).is_some(),
            "{r}: {entry:?} is not mounted"
        );
        assert!(
            named_volume_at(s, data_dir).is_some(),
            "{r}: no volume at {data_dir}"
        );
        if let Some(from) = s["environment"]["ONBOARD_FROM"].as_str() {
            let (source, _) = host_port(from);
            assert!(is_service(source.as_str()), "{r} onboards from {source}");
            let domains = config["kms"]["domains"].as_array().unwrap();
            assert!(
                domains.iter().any(|d| d.as_str() == Some(source.as_str())),
                "{source} is not in kms.domains"
            );
            // The source's root CA: its data volume, read only.
            let ca = s["environment"]["ONBOARD_CA"].as_str().unwrap();
            let (mount, file) = ca.rsplit_once("/kms/").unwrap();
            assert_eq!(file, "root-ca.pem");
            assert_eq!(
                named_volume_at(s, mount),
                named_volume_at(service(source.as_str()), data_dir),
                "{r}: {ca} is not {source}'s root CA"
            );
        }
    }
    for (key, u) in [
        (
            "storage.database_url",
            config["storage"]["database_url"].as_str(),
        ),
        (
            "alerts.alertmanager_url",
            config["alerts"]["alertmanager_url"].as_str(),
        ),
        (
            "telemetry.otlp.endpoint",
            config["telemetry"]["otlp"]["endpoint"].as_str(),
        ),
        (
            "the setup's ANVIL_RPC",
            service("setup")["environment"]["ANVIL_RPC"].as_str(),
        ),
    ] {
        let (host, _) = host_port(u.unwrap());
        assert!(
            is_service(host.as_str()),
            "{key} names {host}, which is no service"
        );
    }

    // Prometheus: its rule files are alert-rules/, its Alertmanager and targets are services,
    // and job "keywarden" (the job the rules select) scrapes every replica's metrics listener.
    let prometheus = service("prometheus");
    let prom = yaml(&host_path(prometheus, "/etc/prometheus/prometheus.yml").unwrap());
    for pattern in prom["rule_files"].as_sequence().unwrap() {
        let host = host_path(prometheus, pattern.as_str().unwrap()).expect("rules are mounted");
        let names = |files: Vec<PathBuf>| -> Vec<String> {
            files
                .iter()
                .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(glob(&host)), names(rule_files()), "{pattern:?}");
    }
    let targets = static_targets(&prom["alerting"]["alertmanagers"])
        .into_iter()
        .chain(static_targets(&prom["scrape_configs"]));
    for t in targets {
        let host = t.rsplit_once(':').unwrap().0;
        assert!(
            host == "localhost" || is_service(host),
            "target {t}: no such service"
        );
    }
    let job = prom["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["job_name"].as_str() == Some("keywarden"))
        .expect("a scrape job named keywarden");
    let metrics = port(&config["metrics"]["listen"]);
    let mut scraped = static_targets(&Value::Sequence(vec![job.clone()]));
    scraped.sort();
    let mut expected: Vec<String> = replicas.iter().map(|r| format!("{r}:{metrics}")).collect();
    expected.sort();
    assert_eq!(scraped, expected);
    // promtool checks the configuration and the rules it loads, read from the repository.
    let dir = tempfile::tempdir().unwrap();
    let mut local = prom.clone();
    local["rule_files"] = Value::Sequence(vec![Value::String(
        root().join("alert-rules/*.rules.yml").display().to_string(),
    )]);
    let file = dir.path().join("prometheus.yml");
    std::fs::write(&file, serde_yaml::to_string(&local).unwrap()).unwrap();
    if let Some((ok, out, err)) = run(
        tool("promtool").args(["check", "config", file.to_str().unwrap()]),
        None,
    ) {
        assert!(ok, "{out}{err}");
    }

    // The OpenTelemetry collector: keywarden's endpoint is its OTLP gRPC receiver, and each
    // pipeline uses only components it defines.
    let (collector, otlp_port) =
        host_port(config["telemetry"]["otlp"]["endpoint"].as_str().unwrap());
    let collector = service(collector.as_str());
    let config_arg = collector["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix("--config="))
        .unwrap();
    let otel = yaml(&host_path(collector, config_arg).unwrap());
    let grpc = otel["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
        .as_str()
        .unwrap();
    assert!(grpc.ends_with(&format!(":{otlp_port}")), "{grpc}");
    for (pipeline, p) in otel["service"]["pipelines"].as_mapping().unwrap() {
        for kind in ["receivers", "processors", "exporters"] {
            for c in p[kind].as_sequence().into_iter().flatten() {
                assert!(
                    otel[kind].get(c).is_some(),
                    "pipeline {pipeline:?} uses {c:?}, not among {kind}"
                );
            }
        }
    }

    // Alertmanager loads the repository's tree.
    assert_eq!(
        host_path(
            service("alertmanager"),
            "/etc/alertmanager/alertmanager.yml"
        ),
        Some(root().join("./alertmanager/alertmanager.yml"))
    );

    // Grafana: the datasource is this Prometheus, and the dashboards provider's directory holds
    // every dashboard of dashboards/.
    let grafana = service("grafana");
    let provisioned = |kind: &str| -> Vec<PathBuf> {
        mounts(grafana)
            .into_iter()
            .filter_map(|m| match m {
                Mount::Bind { target, host }
                    if target.starts_with(&format!("/etc/grafana/provisioning/{kind}/")) =>
                {
                    Some(host)
                }
                _ => None,
            })
            .collect()
    };
    let datasources = provisioned("datasources");
    assert!(!datasources.is_empty());
    for file in datasources {
        for ds in yaml(&file)["datasources"].as_sequence().unwrap() {
            let (host, ds_port) = host_port(ds["url"].as_str().unwrap());
            assert!(
                is_service(host.as_str()),
                "{}: {host} is no service",
                file.display()
            );
            assert_eq!(ds_port, 9090);
        }
    }
    let providers = provisioned("dashboards");
    assert!(!providers.is_empty());
    let mut dashboards: Vec<String> = glob(&root().join("dashboards/*.json"))
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    dashboards.sort();
    for file in providers {
        for p in yaml(&file)["providers"].as_sequence().unwrap() {
            let dir = p["options"]["path"].as_str().unwrap();
            let mut mounted: Vec<String> = mounts(grafana)
                .into_iter()
                .filter_map(|m| match m {
                    Mount::Bind { target, host } if target.starts_with(&format!("{dir}/")) => {
                        assert!(host.is_file(), "{}", host.display());
                        Some(host.file_name().unwrap().to_string_lossy().into_owned())
                    }
                    _ => None,
                })
                .collect();
            mounted.sort();
            assert_eq!(mounted, dashboards, "dashboards mounted under {dir}");
        }
    }
}

#[test]
fn the_shipped_configurations_pass_config_check() {
    // The compose stack's test PKI and chain settings (/shared/chain.env) exist only once its
    // setup has run.
    let pki_dir = tempfile::tempdir().unwrap();
    std::fs::write(pki_dir.path().join("root_ca.der"), b"").unwrap();
    let pki = pki_dir.path().to_str().unwrap().to_owned();
    let cases: [(&str, Vec<(&str, &str)>); 2] = [
        (
            "deploy/compose/keywarden.toml",
            vec![
                ("KEYWARDEN_ATTESTATION__INSECURE_TEST_PKI", pki.as_str()),
                ("KEYWARDEN_CHAIN__RPC_URLS", r#"["http://anvil:8545/"]"#),
                (
                    "KEYWARDEN_CHAIN__KMS_CONTRACT",
                    "0x5FbDB2315678afecb367f032d93F642f64180aa3",
                ),
                ("KEYWARDEN_CHAIN__START_BLOCK", "1"),
            ],
        ),
        (
            "deploy/k8s/keywarden.toml",
            vec![(
                "KEYWARDEN_STORAGE__DATABASE_URL",
                "postgres://keywarden@db.internal:5432/keywarden",
            )],
        ),
    ];
    for (file, env) in cases {
        let (ok, out, err) = run(
            Command::new(env!("CARGO_BIN_EXE_keywarden"))
                .current_dir(root())
                .env_clear()
                .envs(env)
                .args(["config", "check", file]),
            None,
        )
        .unwrap();
        assert!(ok, "{file}: {out}{err}");
    }
}

#[test]
fn the_kubernetes_manifests_render_offline_and_their_core_objects_validate() {
    let Some((ok, rendered, err)) = run(tool("kubectl").args(["kustomize", "deploy/k8s"]), None)
    else {
        return;
    };
    assert!(ok, "{err}");
    if let Some((ok, out, err)) = run(
        tool("kubernetes-validate").args(["--strict", "-"]),
        Some(&rendered),
    ) {
        // Custom resources (ServiceMonitor, PrometheusRule) have no schema there: warned, skipped.
        assert!(ok, "{out}{err}");
        for kind in [
            "namespace",
            "configmap",
            "service",
            "deployment",
            "poddisruptionbudget",
        ] {
            let line = format!("passed for resource {kind}/");
            assert!(
                out.contains(&line) || err.contains(&line),
                "{kind}: {out}{err}"
            );
        }
    }

    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|d| !d.is_null())
        .collect();
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("no {kind} rendered"))
    };
    let (deployment, service, monitor) =
        (find("Deployment"), find("Service"), find("ServiceMonitor"));
    find("PrometheusRule");
    let pod = &deployment["spec"]["template"];
    let spec = &pod["spec"];
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(3));
    let within = |selector: &Value, labels: &Value| {
        let labels: &Mapping = labels.as_mapping().unwrap();
        selector
            .as_mapping()
            .unwrap()
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    };
    let pod_labels = &pod["metadata"]["labels"];
    assert!(within(
        &deployment["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    assert!(within(&service["spec"]["selector"], pod_labels));
    assert!(within(
        &find("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    assert!(within(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    // Prometheus labels the series job="<Service name>": the rules and dashboards select "keywarden".
    assert_eq!(service["metadata"]["name"].as_str(), Some("keywarden"));

    let container = &spec["containers"][0];
    let container_ports: Vec<(&str, u64)> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    let port_named = |name: &str| {
        container_ports
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no container port {name}"))
            .1
    };
    let service_ports: Vec<&str> = service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            port_named(p["targetPort"].as_str().unwrap());
            p["name"].as_str().unwrap()
        })
        .collect();
    for e in monitor["spec"]["endpoints"].as_sequence().unwrap() {
        assert!(service_ports.contains(&e["port"].as_str().unwrap()));
        assert_eq!(e["path"].as_str(), Some("/metrics"));
    }
    for (probe, path) in [
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/livez"),
        ("startupProbe", "/livez"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(get["port"].as_str(), Some("metrics"), "{probe}");
    }
    let config = toml_file(&root().join("deploy/k8s/keywarden.toml"));
    assert_eq!(
        u64::from(port(&config["metrics"]["listen"])),
        port_named("metrics")
    );
    assert_eq!(u64::from(port(&config["api"]["listen"])), port_named("api"));
    assert_eq!(config["cluster"]["enabled"].as_bool(), Some(true));

    // Hardening, every container: unprivileged, read-only, no capabilities, default seccomp.
    assert_eq!(
        spec["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true)
    );
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    assert_eq!(spec["automountServiceAccountToken"].as_bool(), Some(false));
    let volumes: Vec<&str> = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    let all = spec["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .chain(spec["initContainers"].as_sequence().unwrap());
    for c in all {
        let name = c["name"].as_str().unwrap();
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{name}");
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{name}"
        );
        assert_eq!(
            sc["capabilities"]["drop"],
            Value::Sequence(vec!["ALL".into()]),
            "{name}"
        );
        for m in c["volumeMounts"].as_sequence().unwrap() {
            assert!(
                volumes.contains(&m["name"].as_str().unwrap()),
                "{name}: {m:?}"
            );
        }
    }

    // The ConfigMap is the generated one; the Secrets are the ones README.md tells how to make.
    let config_map = find("ConfigMap")["metadata"]["name"].as_str().unwrap();
    let readme = read("deploy/k8s/README.md");
    let mut secrets = Vec::new();
    for v in spec["volumes"].as_sequence().unwrap() {
        if let Some(name) = v["configMap"]["name"].as_str() {
            assert_eq!(name, config_map);
        }
        secrets.extend(v["secret"]["secretName"].as_str());
    }
    for e in container["env"].as_sequence().unwrap() {
        secrets.extend(e["valueFrom"]["secretKeyRef"]["name"].as_str());
    }
    assert_eq!(secrets.len(), 2, "{secrets:?}");
    for s in secrets {
        assert!(
            readme.contains(&format!("create secret generic {s}")),
            "README.md: how to make {s}"
        );
    }
}

#[test]
fn the_prometheus_rule_carries_exactly_the_alert_rule_groups() {
    let rule = yaml(&root().join("deploy/k8s/prometheusrule.yaml"));
    assert_eq!(rule["kind"].as_str(), Some("PrometheusRule"));
    let groups: Vec<Value> = rule_files()
        .iter()
        .flat_map(|f| yaml(f)["groups"].as_sequence().unwrap().clone())
        .collect();
    assert_eq!(
        rule["spec"]["groups"],
        Value::Sequence(groups),
        "deploy/k8s/prometheusrule.yaml differs from alert-rules/: run deploy/k8s/generate-prometheusrule.sh"
    );
}

#[test]
fn the_image_builds_locked_runs_unprivileged_and_is_sent_only_its_inputs() {
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("cargo build --release --locked"));
    assert!(dockerfile.contains("npm ci --ignore-scripts"));
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    let user = runtime
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    assert!(!["root", "0", "0:0"].contains(&user.trim()), "USER {user}");
    assert!(
        !runtime
            .lines()
            .any(|l| l.contains("npm ") && !l.trim_start().starts_with('#')),
        "the runtime stage needs no npm"
    );
    // The demo finds its npm packages (anvil among them) through KEYWARDEN_NODE_MODULES.
    assert!(runtime.contains("KEYWARDEN_NODE_MODULES=/opt/keywarden/node_modules"));
    for (package, _) in keywarden::sim::toolchain::pinned().unwrap() {
        assert!(
            dockerfile.contains(&format!("node_modules/{package} ")),
            "the image lacks {package}"
        );
    }
    // Everything copied from the build context exists and is let through .dockerignore.
    let ignore = read(".dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "*"),
        "the context is an allow list"
    );
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .map(|p| p.trim_end_matches('/'))
        .collect();
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        for source in &words[1..words.len() - 1] {
            let source = source.trim_end_matches('/');
            assert!(root().join(source).exists(), "COPY {source}: missing");
            assert!(
                allowed
                    .iter()
                    .any(|a| source == *a || source.starts_with(&format!("{a}/"))),
                "COPY {source}: excluded by .dockerignore"
            );
        }
    }
}

#[test]
fn the_systemd_unit_is_hardened_and_verifies() {
    let unit = read("deploy/systemd/keywarden.service");
    let service = unit
        .split("[Service]")
        .nth(1)
        .expect("a [Service] section")
        .split("\n[")
        .next()
        .unwrap();
    let values = |key: &str| {
        service
            .lines()
            .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
            .collect::<Vec<_>>()
    };
    for (key, value) in [
        ("User", "keywarden"),
        ("StateDirectory", "keywarden"),
        ("StateDirectoryMode", "0700"),
        ("UMask", "0077"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("SystemCallArchitectures", "native"),
        ("SystemCallFilter", "@system-service"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
    ] {
        assert!(values(key).contains(&value), "{key}={value} is missing");
    }
    // systemd checks the unit with its ExecStart pointing at this build's binary.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("keywarden.service");
    let exec = values("ExecStart");
    assert_eq!(exec.len(), 1);
    let binary = exec[0].split_whitespace().next().unwrap();
    std::fs::write(
        &local,
        unit.replace(binary, env!("CARGO_BIN_EXE_keywarden")),
    )
    .unwrap();
    if let Some((ok, out, err)) = run(
        tool("systemd-analyze").args(["verify", local.to_str().unwrap()]),
        None,
    ) {
        // Unknown or misspelt directives are only warned about, naming the file.
        assert!(ok && !err.contains("keywarden.service"), "{out}{err}");
    }
}
