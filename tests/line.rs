//! A pending request's place in line (docs/api.md, "Follow a request"): how
//! many requests are at most ahead of it and how many units are left, from
//! the offset the broker gave it and the coupon's progress in Redis.

use std::collections::HashMap;
use std::time::Duration;

use firstcome_suite::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pending_request_knows_its_place_which_only_falls_and_never_promises_a_unit_it_will_not_get()
 {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("line");
    assert_eq!(client.create_coupon(&coupon, 4).await.0, 201);

    // The worker decides a first request, so the coupon's progress is known.
    let worker = env.spawn_worker().await;
    let (code, first) = client.issue(&coupon, "u0").await;
    assert_eq!(code, 202, "{first}");
    let first = first["request_id"].as_str().unwrap().to_owned();
    assert_eq!(
        client.wait_final(&first, Duration::from_secs(30)).await["status"],
        "issued"
    );
    worker.stop().await;

    // Twelve more while no worker runs: each behind the ones before it.
    let mut ids = Vec::new();
    for i in 1..=12 {
        let (code, body) = client.issue(&coupon, &format!("u{i}")).await;
        assert_eq!(code, 202, "{body}");
        ids.push(body["request_id"].as_str().unwrap().to_owned());
    }
    for (k, id) in ids.iter().enumerate() {
        let (code, s) = client.get(&format!("/v1/issue-requests/{id}")).await;
        assert_eq!(code, 200, "{s}");
        assert_eq!(s["status"], "pending", "{s}");
        assert!(
            s.get("log_offset").is_none(),
            "the cache's offset stays inside: {s}"
        );
        // The coupon has its partition to itself here: the bound is exact.
        assert_eq!(s["line"]["ahead_at_most"], k as i64, "{s}");
        assert_eq!(s["line"]["remaining_stock"], 3, "{s}");
    }

    // A worker with small batches drains them; every look on the way falls
    // or stays, and a look that said a unit was left was right.
    let mut wcfg = env.worker_config();
    wcfg.max_batch = 2;
    let worker = env.spawn_worker_with(wcfg).await;
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut promised: HashMap<&str, bool> = HashMap::new();
    let mut finals: HashMap<&str, String> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while finals.len() < ids.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "decided: {finals:?}"
        );
        for id in &ids {
            if finals.contains_key(id.as_str()) {
                continue;
            }
            let (_, s) = client.get(&format!("/v1/issue-requests/{id}")).await;
            if s["status"] != "pending" {
                assert!(s.get("line").is_none(), "a final status has no place: {s}");
                finals.insert(id, s["status"].as_str().unwrap().to_owned());
                continue;
            }
            let ahead = s["line"]["ahead_at_most"].as_i64().expect("a place");
            let left = s["line"]["remaining_stock"].as_i64().expect("a stock");
            if let Some(before) = last.insert(id, ahead) {
                assert!(
                    ahead <= before,
                    "{id}: the place rose from {before} to {ahead}"
                );
            }
            if left > ahead {
                promised.insert(id, true);
            }
        }
    }
    for (k, id) in ids.iter().enumerate() {
        let expected = if k < 3 { "issued" } else { "sold_out" };
        assert_eq!(finals[id.as_str()], expected, "request {k}");
        if promised.contains_key(id.as_str()) {
            assert_eq!(
                finals[id.as_str()],
                "issued",
                "request {k} was told a unit was left"
            );
        }
    }
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_poll_with_a_step_answers_when_the_place_has_fallen_that_far_before_the_decision() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("step");
    assert_eq!(client.create_coupon(&coupon, 1_000).await.0, 201);
    let worker = env.spawn_worker().await;
    let (_, first) = client.issue(&coupon, "u0").await;
    let first = first["request_id"].as_str().unwrap().to_owned();
    client.wait_final(&first, Duration::from_secs(30)).await;
    worker.stop().await;

    let mut ids = Vec::new();
    for i in 1..=300 {
        let (code, body) = client.issue(&coupon, &format!("u{i}")).await;
        assert_eq!(code, 202, "{body}");
        ids.push(body["request_id"].as_str().unwrap().to_owned());
    }
    let last = ids.last().unwrap().clone();
    let (_, before) = client.get(&format!("/v1/issue-requests/{last}")).await;
    assert_eq!(before["line"]["ahead_at_most"], 299, "{before}");

    // A step without a wait, or out of range: refused.
    for query in ["step=5", "wait_ms=1000&step=0", "wait_ms=1000&step=x"] {
        let (code, body) = client
            .get(&format!("/v1/issue-requests/{last}?{query}"))
            .await;
        assert_eq!(code, 422, "{query}: {body}");
    }

    // Batches of two: the place falls by 20 after ten batches, long before
    // the 150th batch decides this request.
    let poll = {
        let client = client.clone();
        let last = last.clone();
        tokio::spawn(async move {
            client
                .get(&format!("/v1/issue-requests/{last}?wait_ms=10000&step=20"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut wcfg = env.worker_config();
    wcfg.max_batch = 2;
    let worker = env.spawn_worker_with(wcfg).await;
    let (code, moved) = poll.await.unwrap();
    assert_eq!(code, 200, "{moved}");
    assert_eq!(
        moved["status"], "pending",
        "answered before the decision: {moved}"
    );
    let ahead = moved["line"]["ahead_at_most"].as_i64().unwrap();
    assert!(ahead <= 299 - 20, "fallen by the step at least: {moved}");
    assert_eq!(
        client.wait_final(&last, Duration::from_secs(60)).await["status"],
        "issued"
    );
    worker.stop().await;
    ingress.stop().await;
}
