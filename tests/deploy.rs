//! The deployment material, checked offline with the tools `scripts/test`
//! installs into `.state/venv`: the Dockerfile with hadolint, the compose
//! file against the Compose specification, every kustomize overlay rendered
//! by kubectl and validated against the Kubernetes schemas (the KEDA
//! ScaledObject against `deploy/kubernetes/schemas/`), the alert rules and
//! the dashboard parsed as PromQL over the metrics the binaries export, the
//! alerts unit-tested by promtool, and
//! every setting they pass checked against the binaries' own `--help`.
//! None of this runs a container or a cluster; see deploy/README.md.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use firstcome::metrics::names;
use firstcome_suite::{ingress_binary, unique, worker_binary};
use serde_norway::Value;

/// The Kubernetes version the manifests are validated against.
const KUBERNETES: &str = "1.33.0";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A validator from `.state/venv`, or a failure that says how to get it.
fn tool(name: &str) -> PathBuf {
    let bin = root().join(".state/venv/bin").join(name);
    assert!(
        bin.exists(),
        "{} is missing; `scripts/test` installs it (pinned) into .state/venv",
        bin.display()
    );
    bin
}

/// Runs a command; its success and everything it printed.
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn temp_file(name: &str, content: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique("firstcome-deploy"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

fn hadolint(dockerfile: &Path) -> (bool, String) {
    run(Command::new(tool("hadolint"))
        .arg("--config")
        .arg(root().join(".hadolint.yaml"))
        .arg("--no-color")
        .arg(dockerfile))
}

fn compose_check(file: &Path) -> (bool, String) {
    run(Command::new(tool("check-jsonschema"))
        .args(["--builtin-schema", "vendor.compose-spec"])
        .arg(file))
}

fn kubernetes_validate(file: &Path) -> (bool, String) {
    run(Command::new(tool("kubernetes-validate"))
        .args(["--strict", "-k", KUBERNETES])
        .arg(file))
}

/// `kubectl kustomize` of a directory under deploy/kubernetes.
fn render(dir: &str) -> String {
    let (ok, out) = run(Command::new(tool("kubectl"))
        .arg("kustomize")
        .arg(root().join("deploy/kubernetes").join(dir)));
    assert!(ok, "kubectl kustomize {dir}:\n{out}");
    out
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| {
            let mut v = Value::deserialize(d).expect("rendered YAML parses");
            v.apply_merge().expect("merge keys resolve");
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

fn kind_name(doc: &Value) -> (String, String) {
    (
        doc["kind"].as_str().unwrap_or_default().to_owned(),
        doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let (ok, out) = hadolint(&root().join("Dockerfile"));
    assert!(ok, "hadolint Dockerfile:\n{out}");
}

#[test]
fn the_compose_file_follows_the_compose_specification() {
    let (ok, out) = compose_check(&root().join("docker-compose.yml"));
    assert!(ok, "docker-compose.yml:\n{out}");

    let compose = documents(&std::fs::read_to_string(root().join("docker-compose.yml")).unwrap());
    let services = compose[0]["services"].as_mapping().unwrap();
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    for wanted in [
        "kafka",
        "topics",
        "redis",
        "postgres",
        "migrate",
        "ingress",
        "worker",
        "prometheus",
        "grafana",
    ] {
        assert!(names.contains(wanted), "no {wanted} service in {names:?}");
    }
    assert_eq!(compose[0]["services"]["worker"]["deploy"]["replicas"], 2);
    let redis = format!("{:?}", compose[0]["services"]["redis"]["command"]);
    assert!(redis.contains("appendonly"), "redis runs with AOF: {redis}");
    assert!(
        compose[0]["services"]["kafka"]["image"]
            .as_str()
            .unwrap()
            .starts_with("apache/kafka:"),
        "the official Apache Kafka image"
    );
}

/// `deploy/kafka/server.properties` as (key, value) pairs, `@NAME@` fields
/// left as they are.
fn broker_settings() -> Vec<(String, String)> {
    std::fs::read_to_string(root().join("deploy/kafka/server.properties"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("key=value");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[test]
fn the_compose_broker_runs_the_kafka_version_and_settings_the_tests_run() {
    let pom = std::fs::read_to_string(root().join("deploy/kafka/pom.xml")).unwrap();
    let version = pom
        .split("<kafka.version>")
        .nth(1)
        .and_then(|v| v.split('<').next())
        .expect("deploy/kafka/pom.xml names kafka.version");
    let compose = documents(&std::fs::read_to_string(root().join("docker-compose.yml")).unwrap());
    let kafka = &compose[0]["services"]["kafka"];
    assert_eq!(
        kafka["image"].as_str().unwrap(),
        format!("apache/kafka:{version}"),
        "compose runs the Kafka that deploy/kafka/pom.xml pins"
    );
    let env = kafka["environment"].as_mapping().unwrap();
    let value_of = |key: &str| {
        // The image's rule: KAFKA_ + the key upper-cased, dots as `_`.
        let var = format!("KAFKA_{}", key.to_uppercase().replace('.', "_"));
        let v = env
            .get(var.as_str())
            .unwrap_or_else(|| panic!("compose's kafka does not set {var} ({key})"));
        match v {
            Value::String(s) => s.clone(),
            other => serde_norway::to_string(other).unwrap().trim().to_owned(),
        }
    };
    for (key, value) in broker_settings() {
        let set = value_of(&key);
        match value.as_str() {
            // One node: replication 1.
            "@REPLICATION@" | "@MIN_ISR@" => assert_eq!(set, "1", "{key}"),
            // Addresses and ids differ by where it runs.
            v if v.contains('@') => {}
            v => assert_eq!(
                set, v,
                "{key}: compose and deploy/kafka/server.properties differ"
            ),
        }
    }
}

#[test]
fn every_kustomize_overlay_renders_and_validates_against_the_kubernetes_schemas() {
    for dir in ["base", "overlays/staging", "overlays/production"] {
        let rendered = render(dir);
        let file = temp_file("rendered.yaml", &rendered);
        let (ok, out) = kubernetes_validate(&file);
        assert!(ok, "{dir}:\n{out}");
        assert!(
            !out.contains("ERROR"),
            "{dir}: kubernetes-validate reported errors:\n{out}"
        );

        let docs = documents(&rendered);
        let kinds: BTreeSet<(String, String)> = docs.iter().map(kind_name).collect();
        for (kind, name) in [
            ("Deployment", "firstcome-ingress"),
            ("Service", "firstcome-ingress"),
            ("HorizontalPodAutoscaler", "firstcome-ingress"),
            ("PodDisruptionBudget", "firstcome-ingress"),
            ("StatefulSet", "firstcome-worker"),
            ("PodDisruptionBudget", "firstcome-worker"),
            ("ScaledObject", "firstcome-worker"),
            ("Job", "firstcome-migrate"),
            ("CronJob", "firstcome-prune"),
        ] {
            assert!(
                kinds.contains(&(kind.to_owned(), name.to_owned())),
                "{dir}: no {kind} {name}"
            );
        }

        // KEDA's kind is not in the Kubernetes schemas: its own schema.
        for so in docs.iter().filter(|d| d["kind"] == "ScaledObject") {
            let json = temp_file("scaledobject.json", &serde_json::to_string(so).unwrap());
            let (ok, out) = run(Command::new(tool("check-jsonschema"))
                .arg("--schemafile")
                .arg(root().join("deploy/kubernetes/schemas/keda-scaledobject.json"))
                .arg(&json));
            assert!(ok, "{dir}: ScaledObject:\n{out}");
        }

        // The wiring the issue asks for: probes on /readyz and /healthz,
        // the pod name as group.instance.id, secrets by reference.
        for doc in docs
            .iter()
            .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
        {
            let container = &doc["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
            assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
            assert!(container["resources"]["requests"]["memory"].is_string());
            let env = container["env"].as_sequence().unwrap();
            let database = env.iter().find(|e| e["name"] == "DATABASE_URL").unwrap();
            assert!(
                database["valueFrom"]["secretKeyRef"]["name"].is_string(),
                "DATABASE_URL comes from a secret"
            );
            if doc["kind"] == "StatefulSet" {
                let instance = env
                    .iter()
                    .find(|e| e["name"] == "FIRSTCOME_GROUP_INSTANCE_ID")
                    .expect("static membership");
                assert_eq!(
                    instance["valueFrom"]["fieldRef"]["fieldPath"],
                    "metadata.name"
                );
            }
        }
    }
}

#[test]
fn the_validators_refuse_broken_material() {
    // Each check above can fail: a Dockerfile running as root from an
    // unpinned image, a compose service with an unknown key, a Deployment
    // with a misspelt field, a ScaledObject without a target.
    let dockerfile = temp_file("Dockerfile", "FROM debian\nRUN cd /tmp && apt-get update\n");
    assert!(
        !hadolint(&dockerfile).0,
        "hadolint accepts a bad Dockerfile"
    );

    let compose = temp_file(
        "compose.yml",
        "services:\n  app:\n    image: x\n    enviroment:\n      A: b\n",
    );
    assert!(!compose_check(&compose).0, "a misspelt compose key passes");

    let deployment = temp_file(
        "deployment.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\nspec:\n  replica: 2\n  selector:\n    matchLabels: {a: b}\n  template:\n    metadata:\n      labels: {a: b}\n    spec:\n      containers: [{name: c, image: i}]\n",
    );
    assert!(
        !kubernetes_validate(&deployment).0,
        "a misspelt Deployment field passes"
    );

    let scaled = temp_file(
        "so.json",
        r#"{"apiVersion":"keda.sh/v1alpha1","kind":"ScaledObject","metadata":{"name":"x"},"spec":{"triggers":[{"type":"kafka","metadata":{"topic":"t"}}]}}"#,
    );
    let (ok, _) = run(Command::new(tool("check-jsonschema"))
        .arg("--schemafile")
        .arg(root().join("deploy/kubernetes/schemas/keda-scaledobject.json"))
        .arg(&scaled));
    assert!(!ok, "a ScaledObject without a target passes");
}

/// Every `firstcome_…` metric and `firstcome:…` recorded series named in a
/// PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("firstcome") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        if matches!(tail.as_bytes().get("firstcome".len()), Some(b'_' | b':')) {
            found.push(tail[..end].to_owned());
        }
        rest = &tail[end.max(1)..];
    }
    found
}

fn check_promql(what: &str, expr: &str, exported: &BTreeSet<String>) {
    promql_parser::parser::parse(expr)
        .unwrap_or_else(|e| panic!("{what}: not PromQL: {e}\n{expr}"));
    for name in metric_names(expr) {
        assert!(
            exported.contains(&name),
            "{what}: {name} is not a metric the binaries export"
        );
    }
}

/// Debian's `promtool`, or a failure that says how to get it.
fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("promtool"))
        .find(|p| p.exists());
    found.expect("promtool is missing; `scripts/stack up` installs Debian's prometheus package")
}

/// The alert rules as Prometheus reads them (`promtool check rules`), and
/// promtool's unit tests of them (deploy/prometheus/alerts.test.yml): every
/// alert has series that fire it, with its labels and annotations after its
/// `for:`, and series that must leave it quiet.
#[test]
fn promtool_fires_each_alert_on_its_series_and_on_nothing_else() {
    let dir = root().join("deploy/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let (ok, out) = run(Command::new(promtool()).current_dir(&dir).args(args));
        assert!(ok, "promtool {}:\n{out}", args.join(" "));
    }
    let read = |f: &str| -> Value {
        serde_norway::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
    };
    let (rules, tests) = (read("alerts.yml"), read("alerts.test.yml"));
    let cases: Vec<&Value> = tests["tests"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().into_iter().flatten())
        .collect();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let Some(name) = rule["alert"].as_str() else {
                continue;
            };
            let mine = || {
                cases
                    .iter()
                    .filter(|c| c["alertname"].as_str() == Some(name))
            };
            let fires = |c: &&&Value| !c["exp_alerts"].as_sequence().unwrap().is_empty();
            assert!(mine().any(|c| fires(&c)), "no test fires {name}");
            assert!(mine().any(|c| !fires(&c)), "no test keeps {name} quiet");
        }
    }
}

#[test]
fn the_alert_rules_and_the_dashboard_are_promql_over_exported_metrics() {
    let mut exported: BTreeSet<String> = names::exposed().into_iter().collect();

    let rules: Value = serde_norway::from_str(
        &std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    // Recorded series stand for the metrics their rule reads.
    let mut recorded: HashMap<String, Vec<String>> = HashMap::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            if let Some(name) = rule["record"].as_str() {
                let expr = rule["expr"].as_str().unwrap();
                check_promql(name, expr, &exported);
                assert!(
                    name.starts_with("firstcome:"),
                    "{name}: level:metric:operations"
                );
                recorded.insert(name.to_owned(), metric_names(expr));
            }
        }
    }
    exported.extend(recorded.keys().cloned());
    let mut alerts = BTreeSet::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let Some(name) = rule["alert"].as_str() else {
                continue;
            };
            let expr = rule["expr"].as_str().unwrap();
            check_promql(name, expr, &exported);
            assert!(
                rule["annotations"]["runbook"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("docs/operations.md#")),
                "{name} links its runbook"
            );
            alerts.insert(name.to_owned());
        }
    }
    for wanted in [
        "FirstcomeConsumerLagGrowing",
        "FirstcomeDeadLetters",
        "FirstcomeReconcileDrift",
        "FirstcomeRetriesClimbing",
    ] {
        assert!(alerts.contains(wanted), "no {wanted} alert");
    }
    // Every runbook anchor exists in the operations guide.
    let guide = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let Some(runbook) = rule["annotations"]["runbook"].as_str() else {
                continue;
            };
            let anchor = runbook.split('#').nth(1).unwrap();
            let heading = guide.lines().any(|l| {
                l.starts_with('#')
                    && l.trim_start_matches('#')
                        .trim()
                        .to_lowercase()
                        .replace(' ', "-")
                        .replace(|c: char| !(c.is_alphanumeric() || c == '-'), "")
                        == anchor
            });
            assert!(heading, "docs/operations.md has no heading for #{anchor}");
        }
    }

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/dashboards/firstcome.json")).unwrap(),
    )
    .unwrap();
    let mut seen = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            // Grafana's interval variable, as Grafana would fill it in.
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m");
            check_promql(panel["title"].as_str().unwrap(), &expr, &exported);
            for name in metric_names(&expr) {
                match recorded.get(&name) {
                    Some(sources) => seen.extend(sources.iter().cloned()),
                    None => {
                        seen.insert(name);
                    }
                }
            }
        }
    }
    // The dashboard shows every metric there is.
    let shown: BTreeSet<String> = seen
        .iter()
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .fold(n.clone(), |n, s| {
                    n.strip_suffix(s).map(str::to_owned).unwrap_or(n)
                })
        })
        .collect();
    for name in exported.iter().filter(|n| !recorded.contains_key(*n)) {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name.clone(), |n, s| {
                n.strip_suffix(s).map(str::to_owned).unwrap_or(n)
            });
        assert!(shown.contains(&base), "the dashboard does not show {base}");
    }
}

/// The environment variables a binary reads, from its `--help`.
fn settings(binary: &Path, args: &[&str]) -> BTreeSet<String> {
    let (ok, help) = run(Command::new(binary).args(args).arg("--help"));
    assert!(ok, "{} --help:\n{help}", binary.display());
    help.split("[env: ")
        .skip(1)
        .map(|s| s.split(['=', ']']).next().unwrap().to_owned())
        .collect()
}

#[test]
fn every_setting_compose_and_kubernetes_pass_is_one_the_binaries_read() {
    let worker = worker_binary();
    let mut known = settings(&ingress_binary(), &[]);
    for sub in [&["run"][..], &["migrate"], &["topics"]] {
        known.extend(settings(&worker, sub));
    }
    // Read by the logging set-up, not by clap.
    known.insert("RUST_LOG".into());
    assert!(known.contains("FIRSTCOME_METRICS_LISTEN"), "{known:?}");

    let mut passed: Vec<(String, String)> = Vec::new();
    let compose = documents(&std::fs::read_to_string(root().join("docker-compose.yml")).unwrap());
    for (service, spec) in compose[0]["services"].as_mapping().unwrap() {
        if !spec["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("firstcome"))
        {
            continue;
        }
        for key in spec["environment"]
            .as_mapping()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
        {
            passed.push((
                format!("compose {}", service.as_str().unwrap()),
                key.as_str().unwrap().to_owned(),
            ));
        }
    }
    for dir in ["overlays/staging", "overlays/production"] {
        for doc in documents(&render(dir)) {
            if doc["kind"] == "ConfigMap" && doc["metadata"]["name"] == "firstcome" {
                for key in doc["data"].as_mapping().unwrap().keys() {
                    passed.push((format!("{dir} configmap"), key.as_str().unwrap().to_owned()));
                }
            }
            let pod = if doc["kind"] == "Job"
                || doc["kind"] == "Deployment"
                || doc["kind"] == "StatefulSet"
            {
                &doc["spec"]["template"]["spec"]
            } else if doc["kind"] == "CronJob" {
                &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            } else {
                continue;
            };
            for c in pod["containers"].as_sequence().unwrap() {
                for e in c["env"].as_sequence().into_iter().flatten() {
                    passed.push((
                        format!("{dir} {}", doc["metadata"]["name"].as_str().unwrap()),
                        e["name"].as_str().unwrap().to_owned(),
                    ));
                }
            }
        }
    }
    assert!(passed.len() > 20, "{passed:?}");
    for (place, key) in &passed {
        assert!(
            known.contains(key),
            "{place} sets {key}, which no binary reads"
        );
    }
}

#[test]
fn kafka_cluster_ids_never_start_with_a_dash_which_the_format_tool_would_read_as_a_flag() {
    // One id in 64 would, at random: a node then fails to format its
    // storage and exits at start.
    let script = root().join("scripts/kafka-node");
    for _ in 0..500 {
        let out = Command::new(&script).arg("cluster-id").output().unwrap();
        assert!(out.status.success());
        let id = String::from_utf8(out.stdout).unwrap();
        let id = id.trim();
        assert_eq!(id.len(), 22, "{id:?} is not 16 bytes in base64");
        assert!(
            id.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{id:?}"
        );
        assert!(!id.starts_with('-'), "{id:?}");
    }
}
