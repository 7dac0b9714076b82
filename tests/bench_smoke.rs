//! A seconds-long run of every benchmark scenario, so the tool never rots.
//! It checks that each scenario ran and produced sane counts, never a speed.

use firstcome_suite::{bench_binary, ingress_binary, stack_env, worker_binary};
use serde_json::Value;

/// `firstcome-bench run --smoke` with `args`, on the stack (on the
/// Postgres at `database_url` if given): where it wrote, and results.json.
async fn smoke_run(args: &[&str], database_url: Option<String>) -> (std::path::PathBuf, Value) {
    let mut all = vec!["run", "--smoke"];
    all.extend_from_slice(args);
    bench(&all, database_url, "results.json", "").await
}

/// `firstcome-bench ARGS --out DIR` on the stack: DIR, and the JSON file
/// `results` it wrote there. `hint` follows a failure's output.
async fn bench(
    args: &[&str],
    database_url: Option<String>,
    results: &str,
    hint: &str,
) -> (std::path::PathBuf, Value) {
    // The tool runs the ingress and worker binaries built next to it.
    let (_, _) = (ingress_binary(), worker_binary());
    let out = std::env::temp_dir().join(firstcome_suite::unique("bench-smoke-"));
    let mut cmd = tokio::process::Command::new(bench_binary());
    cmd.args(args).arg("--out").arg(&out);
    for (k, v) in stack_env() {
        cmd.env(k, v);
    }
    // The stack's broker, measured as `scripts/bench` measures its own.
    let pid_file = firstcome_suite::stack_env_file().with_file_name("run/kafka.pid");
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{}: {e}; is the stack up?", pid_file.display()));
    cmd.env("FIRSTCOME_BENCH_BROKER_PID", pid.trim());
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    // Its progress ("[bench] drain …") goes straight to this test's output,
    // so a run that hangs shows where.
    cmd.stderr(std::process::Stdio::inherit());
    let run = cmd.output().await.unwrap();
    assert!(
        run.status.success(),
        "{}{hint}",
        String::from_utf8_lossy(&run.stdout)
    );
    let results: Value =
        serde_json::from_slice(&std::fs::read(out.join(results)).unwrap()).unwrap();
    (out, results)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_benchmark_scenario_runs_and_reports() {
    let (out, results) = smoke_run(&[], None).await;

    for curve in ["raw_http", "ingress"] {
        let steps = results[curve]["steps"].as_array().unwrap();
        assert!(!steps.is_empty(), "{curve}");
        assert!(
            steps[0]["ok"].as_u64().unwrap() > 0,
            "{curve}: {}",
            steps[0]
        );
    }
    for rate in ["raw_produce", "raw_redis", "raw_pg"] {
        assert!(results[rate]["count"].as_u64().unwrap() >= 600, "{rate}");
    }
    assert_eq!(results["drain"]["all"]["count"], 600);
    assert_eq!(results["drain_stream"]["all"]["count"], 600);
    let sale = &results["flash_sale"];
    assert_eq!(sale["violations"], 0, "{sale}");
    assert_eq!(sale["burst"]["ok"], 300);
    let decided: u64 = sale["statuses"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(decided, 300, "every request of the sale decided");
    let huge = &results["huge_sale"];
    assert_eq!(huge["violations"], 0, "{huge}");
    assert_eq!(huge["burst"]["ok"], 1_000, "{huge}");
    assert_eq!(
        huge["statuses"]["issued"], 100,
        "a thousandth of the stock: {huge}"
    );
    let seed = &results["seed_baseline"];
    assert_eq!(seed["burst"]["ok"], 300, "{seed}");
    assert_eq!(seed["rows_stored"], 300, "{seed}");
    assert_eq!(results["targets"].as_array().unwrap().len(), 5);
    let hostile = &results["hostile"];
    assert_eq!(hostile["calm"]["ok"], 300, "{hostile}");
    assert_eq!(hostile["attacked"]["sent"], 300, "{hostile}");
    assert!(hostile["attack_sent"].as_u64().unwrap() > 0, "{hostile}");

    let spread = results["spread"]["points"].as_array().unwrap();
    let coupons: Vec<u64> = spread
        .iter()
        .map(|p| p["coupons"].as_u64().unwrap())
        .collect();
    assert_eq!(coupons, [1, 10, 100]);
    for p in spread {
        assert_eq!(p["drain"]["count"], 600, "{p}");
        // Stock for half of each coupon's requests.
        assert_eq!(p["issued"], 300, "{p}");
        assert!(p["worker_cpu_us_per_record"].as_f64().unwrap() > 0.0, "{p}");
    }

    let sizing = &results["sizing"];
    let times: Vec<u64> = sizing["needs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["times"].as_u64().unwrap())
        .collect();
    assert_eq!(times, [1, 10, 100], "{sizing}");
    let workers = |i: usize| sizing["needs"][i]["workers"].as_u64().unwrap();
    assert!(workers(0) >= 1 && workers(0) <= workers(2), "{sizing}");

    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(table.contains("| spread over 100 coupons |"), "{table}");
    assert!(table.contains("One hot coupon: at most"), "{table}");
    assert!(table.contains("| flash-sale |"), "{table}");
    assert!(table.contains("| hostile |"), "{table}");
    let svg = std::fs::read_to_string(out.join("latency.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{svg}");
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instruction_counts_come_out_by_layer_and_each_layer_holds_the_ones_it_nests() {
    let (out, results) = bench(
        &[
            "count", "--smoke", "--target", "ingress", "--target", "worker",
        ],
        None,
        "count.json",
        " (callgrind comes with the Debian package valgrind, which scripts/stack up installs)",
    )
    .await;
    assert!(
        results["machine"]["cpu"].is_string(),
        "{}",
        results["machine"]
    );
    let counts = results["counts"].as_array().unwrap();
    assert_eq!(counts.len(), 2);
    // Its scenarios ran on the stack's broker and took their topics with
    // them (`count-…` is this test's alone: tags `bcoun…`).
    let left = firstcome_suite::topic::topics_starting_with(&stack_env()["KAFKA_BROKERS"], "bcoun");
    assert!(left.is_empty(), "the count left topics behind: {left:?}");
    // The steps of the path nest: (inner, outer) by their place in the
    // list, the outermost inside the whole process (`None`). In the
    // ingress: HTTP > middleware > handler > admission, append; the
    // pending writes and the coupon lookups run on tasks of their own,
    // inside the process only;
    // in the worker: partition loop > batch > decide, store, publish.
    let ingress: &[(usize, Option<usize>)] = &[
        (0, None),
        (1, Some(0)),
        (2, Some(1)),
        (3, Some(2)),
        (4, Some(2)),
        (5, None),
        (6, None),
    ];
    let worker: &[(usize, Option<usize>)] = &[
        (0, None),
        (1, Some(0)),
        (2, Some(1)),
        (3, Some(1)),
        (4, Some(1)),
    ];
    let table = std::fs::read_to_string(out.join("count.md")).unwrap();
    for (count, units, nesting) in [(&counts[0], 200, ingress), (&counts[1], 800, worker)] {
        assert_eq!(count["units"], units, "{count}");
        let layers = count["layers"].as_array().unwrap();
        let cost = |i: Option<usize>| match i {
            Some(i) => layers[i]["per_unit"].as_f64().unwrap(),
            None => count["per_unit"].as_f64().unwrap(),
        };
        for &(inner, outer) in nesting {
            assert!(
                cost(Some(inner)) > 0.0 && cost(Some(inner)) <= cost(outer),
                "{} counts {} instructions, more than the {} that hold it: {count}",
                layers[inner]["layer"],
                cost(Some(inner)),
                cost(outer)
            );
        }
        assert!(table.contains(count["target"].as_str().unwrap()), "{table}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topology_scenario_sells_on_one_node_and_on_three_brokers_and_redis_cluster() {
    let (out, results) = smoke_run(&["--scenario", "topology"], None).await;
    let topology = &results["topology"];
    for side in ["single", "production"] {
        let sale = &topology[side];
        assert_eq!(sale["violations"], 0, "{side}: {sale}");
        assert_eq!(sale["burst"]["ok"], 300, "{side}: {sale}");
        let issued = sale["statuses"]["issued"].as_u64().unwrap();
        assert_eq!(issued, 150, "{side}: half the users, stock for all: {sale}");
    }
    // The three brokers are the bench's own, so it measures them (the single
    // node's broker only when `scripts/bench` names it).
    let brokers = &topology["production"]["broker"];
    assert!(
        brokers["cpu_us_per_item"].as_f64().unwrap() > 0.0,
        "{brokers}"
    );
    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(table.contains("| topology: 3 brokers"), "{table}");
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lifecycle_scenario_sells_retires_and_prunes_and_plots_it() {
    // Its sweep and `prune` trim the whole database: a Postgres of its own.
    let pg = firstcome_suite::services::PrivatePostgres::start().await;
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    firstcome::db::migrate(&pool)
        .await
        .expect("migrations apply");
    let (out, results) = smoke_run(&["--scenario", "lifecycle"], Some(pg.url())).await;
    let life = &results["lifecycle"];
    assert_eq!(life["coupons"], 6, "{life}");
    assert_eq!(life["requests"], 1_200, "{life}");
    assert_eq!(life["errors"], 0, "{life}");
    // Six coupons of 100 units: 600 accepted at the least.
    assert!(life["accepted"].as_u64().unwrap() >= 600, "{life}");
    let pruned: Vec<u64> = life["pruned_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(
        pruned.len() == 2 && pruned.iter().all(|n| *n >= 300),
        "each round's ledger rows pruned: {pruned:?}"
    );
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM coupon WHERE retired_epoch IS DISTINCT FROM redis_epoch",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, 0, "every sold coupon's state left Redis");
    assert!(life["samples"].as_array().unwrap().len() >= 5, "{life}");
    let svg = std::fs::read_to_string(out.join("lifecycle.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{svg}");
    let _ = std::fs::remove_dir_all(&out);
}
