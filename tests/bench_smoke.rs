//! A seconds-long run of every benchmark scenario, so the tool never rots.
//! It checks that each scenario ran and produced sane counts, never a speed.

use firstcome_suite::{bench_binary, ingress_binary, stack_env, worker_binary};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_benchmark_scenario_runs_and_reports() {
    // The tool runs the ingress and worker binaries built next to it.
    let (_, _) = (ingress_binary(), worker_binary());
    let out = std::env::temp_dir().join(firstcome_suite::unique("bench-smoke-"));
    let mut cmd = tokio::process::Command::new(bench_binary());
    cmd.args(["run", "--smoke", "--out"]).arg(&out);
    for (k, v) in stack_env() {
        cmd.env(k, v);
    }
    // Its progress ("[bench] drain …") goes straight to this test's output,
    // so a run that hangs shows where.
    cmd.stderr(std::process::Stdio::inherit());
    let run = cmd.output().await.unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stdout)
    );
    let results: Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();

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
    let seed = &results["seed_baseline"];
    assert_eq!(seed["burst"]["ok"], 300, "{seed}");
    assert_eq!(seed["rows_stored"], 300, "{seed}");
    assert_eq!(results["targets"].as_array().unwrap().len(), 5);

    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(table.contains("| flash-sale |"), "{table}");
    let svg = std::fs::read_to_string(out.join("latency.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{svg}");
    let _ = std::fs::remove_dir_all(&out);
}
