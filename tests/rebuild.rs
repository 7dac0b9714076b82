//! Redis is a state that can be rebuilt: on demand (`redis rebuild`), and
//! by the worker itself when Redis lost its data or went back in time.

use std::time::Duration;

use firstcome_suite::TestEnv;
use firstcome_suite::services::{PrivatePostgres, PrivateRedis};
use serde_json::Value;

async fn rebuild(env: &TestEnv, args: &[&str]) -> (i32, Value, String) {
    let out = env
        .worker_command()
        .args(["redis", "rebuild", "--json"])
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap(),
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_rebuild_under_load_restores_every_coupon_and_the_promise_holds() {
    // A Postgres of its own: "every coupon" must mean this test's only.
    let mut env = TestEnv::new().await;
    let pg = PrivatePostgres::start().await;
    env.use_postgres(pg.url()).await;
    let sale = env.open_sale(&[("a", 40), ("b", 70)], 9).await;
    let (client, coupons, ids) = (&sale.client, &sale.coupons, sale.ids());

    let load = firstcome_suite::spawn_load(client, coupons, 500, Duration::from_millis(8), |i| {
        format!("r{}", (i * 13) % 160)
    });
    // Every coupon, then one, while requests keep being decided.
    env.wait_decided(&ids, 80).await;
    let (code, report, err) = rebuild(&env, &[]).await;
    assert_eq!(code, 0, "{err}");
    let rebuilt: Vec<&str> = report
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["coupon_id"].as_str().unwrap())
        .collect();
    for id in &ids {
        assert!(rebuilt.contains(id), "{id} not in {report}");
    }
    env.wait_decided(&ids, 250).await;
    let (code, report, err) = rebuild(&env, &["--coupon", ids[0]]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(report.as_array().unwrap().len(), 1);
    assert_eq!(report[0]["coupon_id"], ids[0]);
    assert!(report[0]["epoch"].as_i64().unwrap() >= 3, "{report}");

    let accepted = load.await.unwrap();
    firstcome_suite::check_promise(&env, client, coupons, &accepted, Duration::from_secs(120))
        .await;
    let (code, table) = env.reconcile(&ids).await;
    assert_eq!(code, 0, "in sync once quiet:\n{table}");

    // An unknown coupon is a clear error that changes nothing.
    let (code, _, err) = rebuild(&env, &["--coupon", "no-such-coupon"]).await;
    assert_eq!(code, 2);
    assert!(
        err.contains("coupon no-such-coupon does not exist"),
        "{err}"
    );
    sale.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restored_from_an_older_copy_is_caught_by_the_fence_and_the_promise_holds() {
    let env = TestEnv::new().await;
    let sale = env.open_sale(&[("a", 60), ("b", 90)], 7).await;
    let (client, coupons, ids) = (&sale.client, &sale.coupons, sale.ids());
    let load = firstcome_suite::spawn_load(client, coupons, 600, Duration::from_millis(30), |i| {
        format!("o{}", (i * 17) % 200)
    });

    // A copy of the coupons' state early on, put back later: Redis went back
    // in time (an old snapshot, an AOF that lost its tail, a lagging replica
    // promoted), with stock it already gave away and holders it forgot.
    env.wait_decided(&ids, 60).await;
    let mut redis = env.redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}coupon:*", env.common.redis_prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut copy: Vec<(String, Vec<u8>)> = Vec::new();
    for k in keys {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(&k)
            .query_async(&mut redis)
            .await
            .unwrap();
        copy.push((k, dump.unwrap()));
    }
    env.wait_decided(&ids, 250).await;
    // All at once, as a restarted Redis comes back.
    let mut restore = redis::pipe();
    restore.atomic();
    for (k, dump) in &copy {
        restore
            .cmd("RESTORE")
            .arg(k)
            .arg(0)
            .arg(dump.as_slice())
            .arg("REPLACE")
            .ignore();
    }
    let _: () = restore.query_async(&mut redis).await.unwrap();
    let epochs_then = [env.epoch(ids[0]).await, env.epoch(ids[1]).await];

    let accepted = load.await.unwrap();
    firstcome_suite::check_promise(&env, client, coupons, &accepted, Duration::from_secs(120))
        .await;
    let mut caught = 0;
    for id in &ids {
        // Built once at the first request; built again when caught.
        if env.epoch(id).await > 1 {
            caught += 1;
        }
    }
    assert!(
        caught > 0,
        "the worker never noticed the rollback (epochs at the rollback {epochs_then:?})"
    );
    let (code, table) = env.reconcile(&ids).await;
    assert_eq!(code, 0, "in sync once quiet:\n{table}");
    sale.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restarted_empty_mid_stream_is_rebuilt_and_the_promise_holds() {
    let mut env = TestEnv::new().await;
    let mut redis = PrivateRedis::start().await;
    env.use_redis(redis.url());
    let sale = env.open_sale(&[("a", 50), ("b", 80)], 7).await;
    let (client, coupons, ids) = (&sale.client, &sale.coupons, sale.ids());
    let load = firstcome_suite::spawn_load(client, coupons, 500, Duration::from_millis(8), |i| {
        format!("e{}", (i * 7) % 170)
    });

    env.wait_decided(&ids, 100).await;
    redis.restart_wiped().await; // kill -9, data directory deleted, started again
    // The operator's rebuild, racing the worker's own.
    let (code, _, err) = rebuild(&env, &["--coupon", ids[0], "--coupon", ids[1]]).await;
    assert_eq!(code, 0, "{err}");

    let accepted = load.await.unwrap();
    firstcome_suite::check_promise(&env, client, coupons, &accepted, Duration::from_secs(120))
        .await;
    let (code, table) = env.reconcile(&ids).await;
    assert_eq!(code, 0, "in sync once quiet:\n{table}");
    sale.close().await;
}
