//! Faults injected for real: a service cut off through a TCP proxy, a
//! private Postgres stopped, the worker killed.

use firstcome_worker::deadletter::Header;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use firstcome_suite::services::PrivatePostgres;
use firstcome_suite::{PARTITIONS, Proxy, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_postgres_is_unreachable_the_partition_waits_paused_and_the_worker_keeps_its_partitions()
 {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("pg-down");
    assert_eq!(client.create_coupon(&coupon, 30).await.0, 201);

    // The worker reaches Postgres through a proxy we can cut; its buffers are
    // tiny and it must poll at least every 6 s or leave the group.
    let proxy = Proxy::start(&Proxy::target_of(&env.common.database_url)).await;
    let mut cfg = env.worker_config();
    cfg.common.database_url = proxy.rewrite(&env.common.database_url);
    cfg.max_batch = 5;
    cfg.partition_buffer = 5;
    cfg.max_poll_interval = Duration::from_millis(6_000);
    let worker = env.spawn_worker_with(cfg).await;
    let all = PARTITIONS as usize;
    worker
        .wait_assignment("every partition", |a| a.len() == all)
        .await;
    let mut assignment = worker.assignment.clone().unwrap();
    let smallest = Arc::new(AtomicUsize::new(all));
    let watch = smallest.clone();
    let watcher = tokio::spawn(async move {
        while assignment.changed().await.is_ok() {
            let now: BTreeSet<i32> = assignment.borrow().clone();
            watch.fetch_min(now.len(), Ordering::SeqCst);
        }
    });

    proxy.cut();
    let mut ids = Vec::new();
    for i in 0..100 {
        let (code, body) = client.issue(&coupon, &format!("user-{i:03}")).await;
        assert_eq!(code, 202, "{body}");
        ids.push(body["request_id"].as_str().unwrap().to_owned());
    }
    // Twice the poll interval with Postgres gone: nothing can be persisted,
    // and the worker must neither lose its partitions nor skip ahead.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let persisted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM request_ledger WHERE coupon_id = $1")
            .bind(&coupon)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(persisted, 0);
    let (_, pending) = client.get(&format!("/v1/issue-requests/{}", ids[99])).await;
    assert_eq!(
        pending["status"], "pending",
        "not final before it is durable"
    );

    proxy.restore();
    let mut statuses = Vec::new();
    for id in &ids {
        statuses.push(client.wait_final(id, Duration::from_secs(90)).await["status"].clone());
    }
    // In log order (one partition, one client in sequence): the first 30 win.
    let issued: Vec<usize> = statuses
        .iter()
        .enumerate()
        .filter(|(_, s)| *s == "issued")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(issued, (0..30).collect::<Vec<_>>());
    assert!(statuses[30..].iter().all(|s| s == "sold_out"));

    assert_eq!(
        smallest.load(Ordering::SeqCst),
        all,
        "the worker never lost a partition"
    );
    watcher.abort();
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_twice_mid_stream_loses_nothing_and_decides_nothing_twice() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupons: Vec<(String, i64)> = vec![(env.coupon_id("k1"), 40), (env.coupon_id("k2"), 60)];
    for (id, stock) in &coupons {
        assert_eq!(client.create_coupon(id, *stock).await.0, 201);
    }
    let ids: Vec<&str> = coupons.iter().map(|(c, _)| c.as_str()).collect();

    // Requests keep arriving while the worker is killed and restarted.
    let load =
        firstcome_suite::spawn_load(&client, &coupons, 600, Duration::from_millis(10), |i| {
            format!("u{}", (i * 7919) % 150)
        });

    // Small batches, so a kill often lands between a decision and its row.
    for kill_at in [100, 300] {
        let mut worker = env.spawn_worker_process(7);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        while env.decided_count(&ids).await < kill_at {
            assert!(
                tokio::time::Instant::now() < deadline,
                "worker made no progress to {kill_at}"
            );
            assert!(
                worker.try_wait().unwrap().is_none(),
                "the worker exited by itself"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        worker.kill().await.unwrap(); // SIGKILL: no commit, no goodbye to the group
    }
    let mut last = env.spawn_worker_process(7);
    let accepted = load.await.unwrap();
    firstcome_suite::check_promise(&env, &client, &coupons, &accepted, Duration::from_secs(120))
        .await;
    last.kill().await.unwrap();
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_redis_is_unreachable_requests_are_still_accepted_and_decided_in_order_once_it_is_back()
 {
    let env = TestEnv::new().await;
    let proxy = Proxy::start(&Proxy::target_of(&env.common.redis_url)).await;
    let via_proxy = proxy.rewrite(&env.common.redis_url);
    let mut icfg = env.ingress_config();
    icfg.common.redis_url = via_proxy.clone();
    let app = firstcome_ingress::Application::build(icfg).await.unwrap();
    let base = format!("http://{}", app.local_addr());
    let stop = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn(app.run_until_stopped(stop.clone()));
    let http = reqwest::Client::new();
    let coupon = env.coupon_id("redis-down");
    let created = http
        .post(format!("{base}/v1/coupons"))
        .bearer_auth(&env.admin_token)
        .json(&serde_json::json!({ "coupon_id": coupon, "name": "r", "total_stock": 11 }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let mut wcfg = env.worker_config();
    wcfg.common.redis_url = via_proxy;
    let worker = env.spawn_worker_with(wcfg).await;
    worker
        .wait_assignment("every partition", |a| a.len() == PARTITIONS as usize)
        .await;

    // One request decided before Redis goes away.
    let r = http
        .post(format!("{base}/v1/coupons/{coupon}/issue"))
        .json(&serde_json::json!({ "user_id": "early" }))
        .send()
        .await
        .unwrap();
    let early: serde_json::Value = r.json().await.unwrap();
    let early = early["request_id"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while env.decided_count(&[&coupon]).await < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "early request never decided"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    proxy.cut();
    // Its status still answers, from the Postgres ledger.
    let looked = http
        .get(format!("{base}/v1/issue-requests/{early}"))
        .send()
        .await
        .unwrap();
    assert_eq!(looked.status(), 200);
    let looked: serde_json::Value = looked.json().await.unwrap();
    assert_eq!(looked["status"], "issued", "{looked}");
    let mut ids = Vec::new();
    for i in 0..30 {
        let r = http
            .post(format!("{base}/v1/coupons/{coupon}/issue"))
            .json(&serde_json::json!({ "user_id": format!("r{i:02}") }))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            202,
            "the log, not Redis, decides whether a request is accepted"
        );
        let body: serde_json::Value = r.json().await.unwrap();
        ids.push(body["request_id"].as_str().unwrap().to_owned());
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        env.decided_count(&[&coupon]).await,
        1,
        "nothing is decided without Redis"
    );

    proxy.restore();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while env.decided_count(&[&coupon]).await < 31 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all decided after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let issued: Vec<String> =
        sqlx::query_scalar("SELECT user_id FROM user_coupon WHERE coupon_id = $1 ORDER BY user_id")
            .bind(&coupon)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let winners: Vec<String> = std::iter::once("early".to_owned())
        .chain((0..10).map(|i| format!("r{i:02}")))
        .collect();
    assert_eq!(
        issued, winners,
        "the first ten in line, sent one after another"
    );
    for id in &ids {
        let r = http
            .get(format!("{base}/v1/issue-requests/{id}"))
            .send()
            .await
            .unwrap();
        let body: serde_json::Value = r.json().await.unwrap();
        assert_ne!(body["status"], "pending", "{body}");
    }
    worker.stop().await;
    stop.cancel();
    served.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_wiped_mid_stream_is_rebuilt_from_postgres_and_the_promise_holds() {
    let env = TestEnv::new().await;
    let sale = env.open_sale(&[("w1", 30), ("w2", 50)], 7).await;
    let (client, coupons, ids) = (&sale.client, &sale.coupons, sale.ids());

    let load = firstcome_suite::spawn_load(client, coupons, 400, Duration::from_millis(5), |i| {
        format!("w{}", (i * 31) % 120)
    });
    // Once some requests are decided, everything of this test in Redis goes
    // at once, as with FLUSHALL or a new, empty Redis.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while env.decided_count(&ids).await < 60 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress before the wipe"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut redis = env.redis().await;
    let keys = env
        .keys_matching(&format!("{}*", env.common.redis_prefix))
        .await;
    assert!(!keys.is_empty());
    let _: i64 = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut redis)
        .await
        .unwrap();

    let accepted = load.await.unwrap();
    firstcome_suite::check_promise(&env, client, coupons, &accepted, Duration::from_secs(120))
        .await;
    sale.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_postgres_refuses_for_good_is_undone_dead_lettered_and_failed_and_the_rest_goes_on()
 {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("refuse");
    assert_eq!(client.create_coupon(&coupon, 2).await.0, 201);
    // A real Postgres error for one user: a trigger refuses their coupon row
    // with a constraint violation, which waiting will not fix.
    let refused = "rex";
    env.refuse(&coupon, refused).await;
    let mut ids = Vec::new();
    for user in ["amy", refused, "bob", "cal"] {
        let (code, body) = client.issue(&coupon, user).await;
        assert_eq!(code, 202);
        ids.push(body["request_id"].as_str().unwrap().to_owned());
    }
    // One batch decides all four, the refused user taking the second unit;
    // once Postgres refuses it for good, it is given up and the requests
    // behind it are decided again as if it had never taken a unit: bob, the
    // next in line, gets it.
    let worker = env.spawn_worker().await;
    let mut statuses = Vec::new();
    for id in &ids {
        statuses.push(client.wait_final(id, Duration::from_secs(60)).await["status"].clone());
    }
    assert_eq!(statuses, ["issued", "failed", "issued", "sold_out"]);
    let (_, view) = client.get(&format!("/v1/coupons/{coupon}")).await;
    assert_eq!(
        (
            view["remaining_stock"].as_i64(),
            view["issued_count"].as_i64()
        ),
        (Some(0), Some(2)),
        "{view}"
    );

    let letters = env.read_dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(
        letters[0].headers[Header::ErrorKind.as_str()],
        "permanent_failure"
    );
    assert_eq!(letters[0].headers[Header::Attempts.as_str()], "3");
    assert!(
        letters[0].headers[Header::ErrorMessage.as_str()].contains("refused by the test trigger")
    );
    let value: serde_json::Value =
        serde_json::from_slice(letters[0].payload.as_ref().unwrap()).unwrap();
    assert_eq!(value["request_id"], ids[1].as_str());

    let ledger: String =
        sqlx::query_scalar("SELECT status FROM request_ledger WHERE request_id = $1::uuid")
            .bind(&ids[1])
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(ledger, "failed");
    let holders: Vec<String> =
        sqlx::query_scalar("SELECT user_id FROM user_coupon WHERE coupon_id = $1 ORDER BY user_id")
            .bind(&coupon)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(holders, ["amy", "bob"]);
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_for_15_s_mid_burst_costs_no_request_and_the_promise_holds() {
    let mut env = TestEnv::new().await;
    let pg = PrivatePostgres::start().await;
    env.use_postgres(pg.url()).await;
    let sale = env.open_sale(&[("s1", 40), ("s2", 60)], 9).await;
    let (client, coupons, ids) = (&sale.client, &sale.coupons, sale.ids());

    // Every request must be accepted, Postgres or not (spawn_load insists on 202).
    let load =
        firstcome_suite::spawn_load(client, coupons, 1_200, Duration::from_millis(80), |i| {
            format!("s{}", (i * 13) % 200)
        });
    env.wait_decided(&ids, 100).await;
    pg.stop(); // immediate: every connection cut, as in a crash
    tokio::time::sleep(Duration::from_secs(15)).await;
    pg.start_server().await;

    let accepted = load.await.unwrap();
    firstcome_suite::check_promise(&env, client, coupons, &accepted, Duration::from_secs(120))
        .await;
    sale.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_herd_of_first_requests_while_postgres_stalls_is_answered_202_not_503() {
    // A database of its own: the stall locks the coupon table.
    let mut env = TestEnv::new().await;
    let pg = PrivatePostgres::start().await;
    env.use_postgres(pg.url()).await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("herd");
    assert_eq!(client.create_coupon(&coupon, 1_000).await.0, 201);

    // Postgres stalls past the pool's acquire timeout (3 s): every read of
    // the coupon table waits on a lock, while 64 clients ask for the coupon
    // this ingress has not looked up yet.
    let mut stall = env.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE coupon IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *stall)
        .await
        .unwrap();
    let herd: Vec<_> = (0..64)
        .map(|i| {
            let (client, coupon) = (client.clone(), coupon.clone());
            tokio::spawn(async move { client.issue(&coupon, &format!("u{i}")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    stall.commit().await.unwrap();
    for (i, h) in herd.into_iter().enumerate() {
        let (code, body) = h.await.unwrap();
        assert_eq!(code, 202, "request {i}: {body}");
    }
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coupon_seen_before_postgres_went_down_is_still_accepted() {
    // No worker: the coupon has no Redis state to fall back on, so only the
    // ingress's last copy of it can answer.
    let mut env = TestEnv::new().await;
    let pg = PrivatePostgres::start().await;
    env.use_postgres(pg.url()).await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("seen");
    assert_eq!(client.create_coupon(&coupon, 10).await.0, 201);
    assert_eq!(client.issue(&coupon, "u1").await.0, 202);
    pg.stop();
    // Past the ingress's one-second trust in its copy: it asks Postgres again.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (code, body) = client.issue(&coupon, "u2").await;
    assert_eq!(code, 202, "{body}");
    ingress.stop().await;
}
