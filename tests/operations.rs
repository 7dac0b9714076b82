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
