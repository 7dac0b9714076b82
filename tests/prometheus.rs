//! A real Prometheus (Debian's 2.42) over a real sale: it scrapes an ingress
//! and a worker every second and evaluates `deploy/prometheus/alerts.yml`
//! every second, while a flash sale runs, a record goes to the dead-letter
//! topic and the worker is stopped and started again. Then every query of
//! the Grafana dashboard, every recording rule and every alert expression
//! is asked of it over its HTTP API: each must answer a vector whose
//! samples carry exactly the labels the query groups by, and the queries
//! the sale fed must have data. The alerts the run earns, and only those,
//! must have been pending or firing (two load-dependent ones may have been
//! pending, never firing: see the end of the test).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use firstcome_suite::TestEnv;
use firstcome_suite::services::{PrivatePrometheus, free_port};
use tokio_util::sync::CancellationToken;

/// Alerts whose condition may truly hold for a moment of this run, and
/// whose `for:` (5 and 10 minutes) keeps them from firing in it: pending is
/// right for them, firing would not be.
/// - The restarted worker owns no partition until it has joined.
/// - The broker, shared with the rest of the suite, acknowledges slower
///   than 100 ms at p99 while other tests load it (seen in a full run).
const LOAD_DEPENDENT: [&str; 2] = ["FirstcomeNoWorkerOwnsPartitions", "FirstcomeProduceSlow"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The labels an expression's result carries: those of its outermost
/// `by (…)` (`le` is used up by `histogram_quantile`), none for an
/// aggregation without one; a recorded series carries those of its rule's
/// expression and its own name.
fn labels_of(expr: &str) -> BTreeSet<String> {
    if let Some((_, rule, _)) = rules().into_iter().find(|(name, _, _)| name == expr) {
        let mut labels = labels_of(&rule);
        labels.insert("__name__".to_owned());
        return labels;
    }
    let mut labels: BTreeSet<String> = match expr.find(" by (") {
        Some(at) => {
            let list = &expr[at + " by (".len()..];
            list[..list.find(')').unwrap()]
                .split(',')
                .map(|l| l.trim().to_owned())
                .collect()
        }
        None => BTreeSet::new(),
    };
    if expr.starts_with("histogram_quantile(") {
        labels.remove("le");
    }
    labels
}

/// (what, expression) of every dashboard query, with Grafana's rate
/// interval as Grafana would fill it in for a 1-s scrape.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/dashboards/firstcome.json")).unwrap(),
    )
    .unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "30s");
            queries.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    queries
}

/// (name, expression, is an alert) of every rule in alerts.yml.
fn rules() -> Vec<(String, String, bool)> {
    let rules: serde_norway::Value = serde_norway::from_str(
        &std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let expr = rule["expr"].as_str().unwrap().trim().to_owned();
            match (rule["alert"].as_str(), rule["record"].as_str()) {
                (Some(alert), _) => out.push((alert.to_owned(), expr, true)),
                (None, Some(record)) => out.push((record.to_owned(), expr, false)),
                _ => panic!("a rule that neither alerts nor records: {rule:?}"),
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_prometheus_answers_every_query_and_fires_only_the_alerts_the_sale_earns() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    // The worker keeps its operations port across its restart, as a pod
    // keeps its address in the scrape configuration.
    let worker_ops = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cfg = env.worker_config();
    cfg.metrics_listen = worker_ops;
    // The stream's series too (a broker of the stack's own: no faults).
    cfg.decision_stream = true;
    let worker = env.spawn_worker_with(cfg.clone()).await;
    let prometheus = PrivatePrometheus::start(
        &root().join("deploy/prometheus/alerts.yml"),
        &[
            ("firstcome-ingress", ingress.metrics),
            ("firstcome-worker", worker_ops),
        ],
    )
    .await;

    // Scraped once before the sale: what happens before a target's first
    // scrape no counter's increase can show (a dead letter in that second
    // was seen first as a counter already at 1, and no alert fired).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while prometheus.query("up == 1").await.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus never scraped both targets"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every alert seen pending or firing, from the start on.
    let seen: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> = Arc::default();
    let stop = CancellationToken::new();
    let watch = {
        let (seen, stop) = (seen.clone(), stop.clone());
        let port = prometheus.port;
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                for (name, state) in PrivatePrometheus::alerts_at(port).await {
                    seen.lock().unwrap().entry(name).or_default().insert(state);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    // A small flash sale: 60 users for 20 units, some of them twice.
    let client = env.client(&ingress);
    let coupon = env.coupon_id("prom");
    assert_eq!(client.create_coupon(&coupon, 20).await.0, 201);
    for i in 0..80 {
        let (code, body) = client.issue(&coupon, &format!("u{}", i % 60)).await;
        assert!(code == 202 || code == 409, "{code} {body}");
    }
    // A record no worker can read goes to the dead-letter topic.
    env.produce_raw(&[(coupon.as_str(), "{not json")]).await;
    env.wait_decided(&[coupon.as_str()], 60).await;
    let dead = || async {
        prometheus
            .query("sum(firstcome_worker_dead_letters_total)")
            .await
            .first()
            .map(|s| s["value"][1].as_str().unwrap().parse::<f64>().unwrap())
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while dead().await != Some(1.0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus never saw the dead letter"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The worker stopped: its target goes down and FirstcomeTargetDown is
    // pending (its `for:` is 2 minutes); started again on the same port,
    // the target comes back and the alert goes.
    worker.stop().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let down = prometheus
            .alerts()
            .await
            .iter()
            .any(|(name, state)| name == "FirstcomeTargetDown" && state == "pending");
        if down {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "FirstcomeTargetDown never pending while the worker was down"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let worker = env.spawn_worker_with(cfg).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while prometheus
        .alerts()
        .await
        .iter()
        .any(|(name, _)| name == "FirstcomeTargetDown")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "FirstcomeTargetDown stayed after the worker came back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A few more requests, decided by the new worker, and two scrapes of it.
    for i in 60..70 {
        client.issue(&coupon, &format!("u{i}")).await;
    }
    env.wait_decided(&[coupon.as_str()], 70).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Every dashboard query and recorded series: a vector of the shape its
    // grouping says, with data unless the sale fed it nothing.
    let quiet_in_this_sale = [
        // No broker error, no retry, no Redis rebuild, nothing aborted, no
        // dependency down: series that only exist once something fails.
        "firstcome_ingress_broker_errors_total",
        "firstcome:worker_retries:rate5m",
        "firstcome_ingress_dependency_up == 0",
    ];
    let mut empty = Vec::new();
    let queries: Vec<(String, String)> = dashboard_queries()
        .into_iter()
        .chain(
            rules()
                .into_iter()
                .filter(|(_, _, alert)| !alert)
                .map(|(name, _, _)| (format!("recorded {name}"), name)),
        )
        .collect();
    for (what, expr) in &queries {
        let samples = prometheus.query(expr).await;
        let want = labels_of(expr);
        for s in &samples {
            let got: BTreeSet<String> = s["metric"].as_object().unwrap().keys().cloned().collect();
            assert_eq!(got, want, "{what}: {expr}: {s}");
        }
        if samples.is_empty() && !quiet_in_this_sale.iter().any(|q| expr.contains(q)) {
            empty.push(format!("{what}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "queries the sale fed that answer nothing: {empty:#?}"
    );

    // What the dead-letter alert read, for its failure message.
    let dead_letters = prometheus
        .api(
            "query",
            &[("query", "firstcome_worker_dead_letters_total[15m]")],
        )
        .await;
    // Every alert expression evaluates; only those of the alerts this run
    // earned have samples now (the dead letter's, within its 15 minutes),
    // and those load can make true for a moment may.
    for (name, expr, _) in rules()
        .into_iter()
        .filter(|r| r.2 && !LOAD_DEPENDENT.contains(&r.0.as_str()))
    {
        let samples = prometheus.query(&expr).await;
        assert_eq!(
            !samples.is_empty(),
            name == "FirstcomeDeadLetters",
            "{name}: {expr}: {samples:?}; the dead-letter counter's samples: {dead_letters}"
        );
    }
    stop.cancel();
    watch.await.unwrap();
    let mut seen = seen.lock().unwrap().clone();
    // What load can make true for a moment is pending, never firing.
    for load_dependent in LOAD_DEPENDENT {
        if seen.get(load_dependent) == Some(&BTreeSet::from(["pending".to_owned()])) {
            seen.remove(load_dependent);
        }
    }
    let want: BTreeMap<String, BTreeSet<String>> = [
        ("FirstcomeDeadLetters", "firing"),
        ("FirstcomeTargetDown", "pending"),
    ]
    .into_iter()
    .map(|(a, s)| (a.to_owned(), BTreeSet::from([s.to_owned()])))
    .collect();
    assert_eq!(seen, want, "the alerts pending or firing during the run");
    worker.stop().await;
    ingress.stop().await;
}
