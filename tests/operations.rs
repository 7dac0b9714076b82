//! The operator's commands of `firstcome-worker`, run as the real binary.

use std::time::Duration;

use firstcome::CouponId;
use firstcome_suite::TestEnv;
use serde_json::Value;

async fn reconcile(env: &TestEnv, coupon: &str) -> (i32, Value) {
    let out = env
        .worker_command()
        .args(["reconcile", "--json", "--coupon", coupon])
        .output()
        .await
        .unwrap();
    let code = out.status.code().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (code, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_sync_then_each_kind_of_drift_with_its_exit_code() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let worker = env.spawn_worker().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("rec");
    assert_eq!(client.create_coupon(&coupon, 5).await.0, 201);
    let mut last = String::new();
    for user in ["ann", "ben", "cat"] {
        let (_, body) = client.issue(&coupon, user).await;
        last = body["request_id"].as_str().unwrap().to_owned();
    }
    client.wait_final(&last, Duration::from_secs(60)).await;
    worker.stop().await;

    let (code, report) = reconcile(&env, &coupon).await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(report[0]["pg_issued"], 3);
    assert_eq!(report[0]["redis_issued"], 3);
    assert_eq!(report[0]["redis_remaining"], 2);
    assert_eq!(report[0]["drift"], serde_json::json!([]));

    // Redis forgets a holder and miscounts the stock.
    let keys = env
        .common
        .keys()
        .unwrap()
        .coupon(&CouponId::parse(&coupon).unwrap());
    let mut redis = env.redis().await;
    let _: i64 = redis::cmd("SREM")
        .arg(&keys.users)
        .arg("ben")
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&keys.stock)
        .arg(4)
        .query_async(&mut redis)
        .await
        .unwrap();
    let (code, report) = reconcile(&env, &coupon).await;
    assert_eq!(code, 1, "{report}");
    let drift: Vec<String> = serde_json::from_value(report[0]["drift"].clone()).unwrap();
    assert!(
        drift
            .iter()
            .any(|d| d.contains("remaining stock: redis 4 postgres 2")),
        "{drift:?}"
    );
    assert!(
        drift.iter().any(|d| d.contains("Postgres only: ben")),
        "{drift:?}"
    );

    // Redis lost the coupon entirely.
    let _: i64 = redis::cmd("DEL")
        .arg(&keys.meta)
        .query_async(&mut redis)
        .await
        .unwrap();
    let (code, report) = reconcile(&env, &coupon).await;
    assert_eq!(code, 1);
    assert_eq!(report[0]["drift"], serde_json::json!(["no state in Redis"]));

    // A coupon that does not exist cannot be checked.
    let (code, _) = reconcile(&env, &env.coupon_id("nope")).await;
    assert_eq!(code, 2);
    ingress.stop().await;
}

async fn worker_cli(env: &TestEnv, args: &[&str]) -> (i32, String) {
    let out = env.worker_command().args(args).output().await.unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_show_print_dead_letters_with_their_headers_and_filter_them() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let env = TestEnv::new().await;
    let producer: FutureProducer =
        firstcome::kafka::producer_config(&env.common, Duration::from_secs(10), Duration::ZERO)
            .unwrap()
            .create()
            .unwrap();
    let ghost = env.coupon_id("ghost");
    let ghost_request = uuid::Uuid::now_v7().to_string();
    let ghost_value = serde_json::json!({
        "request_id": ghost_request, "coupon_id": ghost, "user_id": "u",
        "accepted_at": "2026-11-24T00:00:00Z",
    })
    .to_string();
    for (key, value) in [
        ("junk", "{not json".to_owned()),
        (ghost.as_str(), ghost_value),
    ] {
        producer
            .send(
                FutureRecord::to(&env.common.request_topic)
                    .key(key)
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let worker = env.spawn_worker().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while env.read_dead_letters().len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "records were not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.stop().await;

    let (code, out) = worker_cli(&env, &["dlq", "list", "--json"]).await;
    assert_eq!(code, 0, "{out}");
    let all: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(all.len(), 2);
    let (code, out) =
        worker_cli(&env, &["dlq", "list", "--json", "--kind", "unknown_coupon"]).await;
    assert_eq!(code, 0);
    let ghosts: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(ghosts.len(), 1);
    assert_eq!(ghosts[0]["key"], ghost.as_str());
    assert_eq!(ghosts[0]["request_id"], ghost_request.as_str());
    assert_eq!(ghosts[0]["attempts"], 1);
    let (_, out) = worker_cli(&env, &["dlq", "list", "--json", "--coupon", "junk"]).await;
    let junk: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(junk.len(), 1);
    assert_eq!(junk[0]["kind"], "invalid_record");
    let (_, out) = worker_cli(
        &env,
        &["dlq", "list", "--json", "--since", "2999-01-01T00:00:00Z"],
    )
    .await;
    assert_eq!(serde_json::from_str::<Vec<Value>>(&out).unwrap().len(), 0);

    // The table names both, and `show` prints one in full.
    let (code, table) = worker_cli(&env, &["dlq", "list"]).await;
    assert_eq!(code, 0);
    assert!(
        table.contains("unknown_coupon") && table.contains("invalid_record"),
        "{table}"
    );
    assert!(table.contains("2 dead letter(s)"), "{table}");
    let (p, o) = (
        ghosts[0]["partition"].to_string(),
        ghosts[0]["offset"].to_string(),
    );
    let (code, shown) = worker_cli(&env, &["dlq", "show", "--partition", &p, "--offset", &o]).await;
    assert_eq!(code, 0);
    assert!(
        shown.contains("firstcome.original.topic") && shown.contains(&ghost_request),
        "{shown}"
    );
    let (code, _) = worker_cli(&env, &["dlq", "show", "--partition", &p, "--offset", "999"]).await;
    assert_ne!(code, 0, "a missing dead letter is an error");
}
