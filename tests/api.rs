//! Every status code of the HTTP contract, through real HTTP against the
//! local stack. Bad input must answer the error shape and change nothing.

use std::time::Duration;

use firstcome_suite::{TestEnv, split};
use serde_json::{Value, json};

fn assert_error(code: u16, body: &Value, want_code: u16, want: &str) {
    assert_eq!(code, want_code, "{body}");
    assert_eq!(body["error"]["code"], want, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

async fn coupon_rows(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM coupon WHERE coupon_id LIKE $1")
        .bind(format!("{}%", env.tag))
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_a_coupon_answers_201_then_409_and_shows_it() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let id = env.coupon_id("new");
    let body = json!({
        "coupon_id": id, "name": "Summer sale", "total_stock": 100,
        "starts_at": "2026-01-01T00:00:00Z", "ends_at": "2030-01-01T00:00:00Z",
    });
    let (code, created) = client.create_coupon_with(body.clone()).await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(
        created,
        json!({
            "coupon_id": id, "name": "Summer sale", "total_stock": 100,
            "remaining_stock": 100, "issued_count": 0,
            "starts_at": "2026-01-01T00:00:00Z", "ends_at": "2030-01-01T00:00:00Z",
        })
    );
    let (code, shown) = client.get(&format!("/v1/coupons/{id}")).await;
    assert_eq!(code, 200);
    assert_eq!(shown, created);

    let (code, again) = client.create_coupon_with(body).await;
    assert_error(code, &again, 409, "coupon_exists");
    assert_eq!(coupon_rows(&env).await, 1);
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_without_the_right_token_are_401_and_change_nothing() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let body = json!({ "coupon_id": env.coupon_id("x"), "name": "x", "total_stock": 1 });
    let url = format!("{}/v1/coupons", client.base);
    for auth in [
        None,
        Some("Bearer wrong-token-wrong-token"),
        Some("Basic abc"),
    ] {
        let mut req = client.http.post(&url).json(&body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let (code, err) = split(req.send().await.unwrap()).await;
        assert_error(code, &err, 401, "unauthorized");
    }
    assert_eq!(coupon_rows(&env).await, 0);
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_coupon_definitions_are_422_and_change_nothing() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let id = env.coupon_id("bad");
    let cases = [
        json!({ "coupon_id": id, "name": "n", "total_stock": -1 }),
        json!({ "coupon_id": id, "name": "n", "total_stock": 1_000_000_001i64 }),
        json!({ "coupon_id": id, "name": "n", "total_stock": 1,
                "starts_at": "2026-02-01T00:00:00Z", "ends_at": "2026-01-01T00:00:00Z" }),
        json!({ "coupon_id": format!("{id} space"), "name": "n", "total_stock": 1 }),
        json!({ "coupon_id": "a".repeat(65), "name": "n", "total_stock": 1 }),
        json!({ "coupon_id": id, "name": "", "total_stock": 1 }),
        // Postgres text cannot hold NUL: refused here, never a 500 there.
        json!({ "coupon_id": id, "name": "Summer\u{0}sale", "total_stock": 1 }),
        json!({ "coupon_id": id, "name": "n" }),
        json!({ "coupon_id": id, "name": "n", "total_stock": 1, "colour": "red" }),
        json!({ "coupon_id": id, "name": "n", "total_stock": 1, "starts_at": "yesterday" }),
        json!({ "coupon_id": id, "name": "n", "total_stock": "ten" }),
        json!({ "coupon_id": id, "name": "n", "total_stock": 1.5 }),
    ];
    for body in cases {
        let (code, err) = client.create_coupon_with(body.clone()).await;
        assert_error(code, &err, 422, "invalid_request");
    }
    let not_json = client
        .http
        .post(format!("{}/v1/coupons", client.base))
        .bearer_auth(&env.admin_token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (code, err) = split(not_json).await;
    assert_error(code, &err, 422, "invalid_request");
    assert_eq!(coupon_rows(&env).await, 0);

    // An integer written with a zero fraction is an integer (JSON Schema
    // says so; schemathesis sent one).
    let (code, created) = client
        .create_coupon_with(json!({ "coupon_id": id, "name": "n", "total_stock": 100.0 }))
        .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["total_stock"], 100);
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_coupons_requests_and_routes_are_404_and_bad_ids_are_422() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let missing = env.coupon_id("missing");

    let (code, err) = client.get(&format!("/v1/coupons/{missing}")).await;
    assert_error(code, &err, 404, "coupon_not_found");
    let (code, err) = client.issue(&missing, "u1").await;
    assert_error(code, &err, 404, "coupon_not_found");
    let (code, err) = client
        .get(&format!("/v1/issue-requests/{}", uuid::Uuid::now_v7()))
        .await;
    assert_error(code, &err, 404, "request_not_found");
    let (code, err) = client.get("/v1/nothing-here").await;
    assert_error(code, &err, 404, "not_found");

    let (code, err) = client.get("/v1/coupons/has%20space").await;
    assert_error(code, &err, 422, "invalid_request");
    let (code, err) = client.get("/v1/issue-requests/not-a-uuid").await;
    assert_error(code, &err, 422, "invalid_request");
    let (code, err) = client.get("/v1/users/bad%3Auser/coupons").await;
    assert_error(code, &err, 422, "invalid_request");
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issue_request_is_202_pending_until_a_worker_decides_and_bad_users_are_422() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("pending");
    assert_eq!(client.create_coupon(&coupon, 10).await.0, 201);

    for bad in [
        json!({ "user_id": "" }),
        json!({ "user_id": "a b" }),
        json!({}),
        json!({ "user_id": "u", "x": 1 }),
    ] {
        let r = client
            .http
            .post(format!("{}/v1/coupons/{coupon}/issue", client.base))
            .json(&bad)
            .send()
            .await
            .unwrap();
        let (code, err) = split(r).await;
        assert_error(code, &err, 422, "invalid_request");
    }
    assert!(
        env.read_request_log().is_empty(),
        "bad input appended nothing"
    );

    let (code, accepted) = client.issue(&coupon, "erin").await;
    assert_eq!(code, 202, "{accepted}");
    let id = accepted["request_id"].as_str().unwrap();
    let (code, status) = client.get(&format!("/v1/issue-requests/{id}")).await;
    assert_eq!(code, 200);
    assert_eq!(status["status"], "pending");
    assert_eq!(status["decided_at"], Value::Null);
    assert_eq!(status["user_id"], "erin");

    // The record in the log is keyed by coupon and carries the request.
    let log = env.read_request_log();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].key.as_deref(), Some(coupon.as_bytes()));
    let value: Value = serde_json::from_slice(log[0].payload.as_ref().unwrap()).unwrap();
    assert_eq!(value["request_id"], id);
    assert_eq!(value["user_id"], "erin");
    assert_eq!(value["coupon_id"], coupon.as_str());

    let (code, held) = client.get("/v1/users/erin-has-nothing/coupons").await;
    assert_eq!((code, held), (200, json!([])));
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_200_and_ready_is_200_when_every_dependency_answers() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let (code, body) = client.get("/healthz").await;
    assert_eq!((code, body["status"].as_str()), (200, Some("ok")));
    let (code, body) = client.get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["checks"],
        json!({ "postgres": "ok", "redis": "ok", "kafka": "ok" })
    );
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_acknowledgement_an_issue_request_is_503_with_retry_after() {
    let env = TestEnv::new().await;
    // A healthy ingress creates the coupon; a second one points at a broker
    // address where nothing listens.
    let good = env.spawn_ingress().await;
    let coupon = env.coupon_id("nobroker");
    assert_eq!(env.client(&good).create_coupon(&coupon, 10).await.0, 201);
    good.stop().await;

    let mut cfg = env.ingress_config();
    cfg.common.kafka_brokers = "127.0.0.1:1".into();
    cfg.produce_timeout = Duration::from_millis(1_000);
    let app = firstcome_ingress::Application::build(cfg).await.unwrap();
    let addr = app.local_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(stop.clone()));
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();

    let r = http
        .post(format!("{base}/v1/coupons/{coupon}/issue"))
        .json(&json!({ "user_id": "frank" }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers().get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let (code, err) = split(r).await;
    assert_error(code, &err, 503, "unavailable");
    assert!(
        !err.to_string().contains("127.0.0.1"),
        "no internal detail leaks: {err}"
    );
    // It names the request, which was never written: its status says so.
    let id = err["request_id"].as_str().expect("a 503 names the request");
    assert_eq!(err["status_url"], format!("/v1/issue-requests/{id}"));
    let (code, _) = split(
        http.get(format!("{base}/v1/issue-requests/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 404);

    let (code, ready) = split(http.get(format!("{base}/readyz")).send().await.unwrap()).await;
    assert_eq!(code, 503, "{ready}");
    assert_eq!(ready["checks"]["kafka"], "failing");
    assert_eq!(ready["checks"]["postgres"], "ok");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(env.read_request_log().is_empty(), "nothing reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_are_not_json_or_too_large_are_refused_and_every_answer_carries_security_headers()
 {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("hard");
    assert_eq!(client.create_coupon(&coupon, 10).await.0, 201);
    let http = reqwest::Client::new();
    let addr = ingress.addr.expect("an ingress listens");
    let issue_url = format!("http://{addr}/v1/coupons/{coupon}/issue");

    // Not declared JSON: 415.
    let r = http
        .post(&issue_url)
        .header("content-type", "text/plain")
        .body(r#"{"user_id":"ann"}"#)
        .send()
        .await
        .unwrap();
    let (code, err) = split(r).await;
    assert_error(code, &err, 415, "unsupported_media_type");

    // Over the body limit (16 KiB by default): 413.
    let big = json!({ "user_id": "x".repeat(20_000) });
    let (code, err) = split(http.post(&issue_url).json(&big).send().await.unwrap()).await;
    assert_error(code, &err, 413, "payload_too_large");

    // Unknown fields: 422.
    let (code, err) = split(
        http.post(&issue_url)
            .json(&json!({ "user_id": "ann", "priority": 1 }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(code, &err, 422, "invalid_request");

    // A method the route does not have: 405 in the error shape.
    let (code, err) = split(http.delete(&issue_url).send().await.unwrap()).await;
    assert_error(code, &err, 405, "method_not_allowed");

    // Nothing above reached the log.
    assert!(env.read_request_log().is_empty(), "nothing reached the log");

    // Success, client errors and health all carry the headers.
    let ok = http
        .post(&issue_url)
        .json(&json!({ "user_id": "ann" }))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 202);
    let missing = http
        .get(format!("http://{addr}/v1/nowhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let health = http
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    for r in [&ok, &missing, &health] {
        let h = r.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{h:?}");
        assert_eq!(h["cache-control"], "no-store", "{h:?}");
        assert_eq!(h["x-frame-options"], "DENY", "{h:?}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{h:?}");
        assert!(h.contains_key("content-security-policy"), "{h:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_at_once_each_answer_pending_right_after_their_202_and_are_all_counted() {
    // The ingress writes the pending statuses of concurrent requests
    // together (issue::pending): each 202 still waits for its own entry, and
    // the accepted count grows by every request of the batch.
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("together");
    assert_eq!(client.create_coupon(&coupon, 10).await.0, 201);
    let requests: Vec<_> = (0..200)
        .map(|i| {
            let (client, coupon) = (client.clone(), coupon.clone());
            tokio::spawn(async move {
                let user = format!("u{i}");
                let (code, accepted) = client.issue(&coupon, &user).await;
                assert_eq!(code, 202, "{accepted}");
                let id = accepted["request_id"].as_str().unwrap().to_owned();
                let (code, status) = client.get(&format!("/v1/issue-requests/{id}")).await;
                (user, code, status)
            })
        })
        .collect();
    for request in requests {
        let (user, code, status) = request.await.unwrap();
        assert_eq!(code, 200, "{status}");
        assert_eq!(status["status"], "pending", "{status}");
        assert_eq!(status["user_id"], user.as_str(), "{status}");
    }
    let counters = client
        .http
        .get(format!(
            "{}/v1/admin/coupons/{coupon}/counters",
            client.base
        ))
        .bearer_auth(&env.admin_token)
        .send()
        .await
        .unwrap();
    let (code, counters) = split(counters).await;
    assert_eq!(code, 200, "{counters}");
    assert_eq!(counters["pending"], 200, "{counters}");
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_in_flight_limit_requests_are_503_overloaded_at_once_and_health_still_answers() {
    let env = TestEnv::new().await;
    let good = env.spawn_ingress().await;
    let coupon = env.coupon_id("shed");
    assert_eq!(env.client(&good).create_coupon(&coupon, 10).await.0, 201);
    good.stop().await;

    // One request at a time, and a broker that never answers: the first
    // request holds the only slot until its produce timeout.
    let shedding = env.spawn_ingress_without_broker(3_000, 1).await;
    let base = format!("http://{}", shedding.addr.expect("it listens"));
    let http = reqwest::Client::new();
    let issue = |user: &'static str| {
        let (http, url) = (http.clone(), format!("{base}/v1/coupons/{coupon}/issue"));
        async move {
            split(
                http.post(url)
                    .json(&json!({ "user_id": user }))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    let first = tokio::spawn(issue("first"));
    // Wait until the first request holds the slot: a second one is shed.
    let mut shed = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (code, body) = issue("second").await;
        if body["error"]["code"] == "overloaded" {
            shed = Some((code, body));
            break;
        }
    }
    let (code, body) = shed.expect("a second request in flight is shed");
    assert_error(code, &body, 503, "overloaded");
    assert!(
        body.get("request_id").is_none(),
        "nothing was written: {body}"
    );
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "health is not counted");

    // The first one ends as it would have (no acknowledgement), and frees
    // the slot.
    let (code, body) = first.await.unwrap();
    assert_error(code, &body, 503, "unavailable");
    let (code, body) = issue("third").await;
    assert_error(code, &body, 503, "unavailable");
    shedding.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_sold_out_or_outside_its_window_a_coupon_answers_409_and_appends_nothing() {
    let env = TestEnv::new().await;
    let mut cfg = env.ingress_config();
    cfg.sold_out_check = Duration::from_millis(100);
    let ingress = env.spawn_ingress_with(cfg).await;
    let worker = env.spawn_worker().await;
    let client = env.client(&ingress);

    // Closed windows: answered at once, never appended.
    let ended = env.coupon_id("ended");
    let later = env.coupon_id("later");
    for (id, starts, ends) in [
        (&ended, "2020-01-01T00:00:00Z", "2020-02-01T00:00:00Z"),
        (&later, "2099-01-01T00:00:00Z", "2099-02-01T00:00:00Z"),
    ] {
        let body = json!({ "coupon_id": id, "name": "window", "total_stock": 5,
                           "starts_at": starts, "ends_at": ends });
        assert_eq!(client.create_coupon_with(body).await.0, 201);
        let (code, err) = client.issue(id, "ann").await;
        assert_error(code, &err, 409, "not_open");
    }

    // Stock 2: the first two users win through the log. Until the worker
    // has decided them, requests still go to the log.
    let coupon = env.coupon_id("short");
    assert_eq!(client.create_coupon(&coupon, 2).await.0, 201);
    let mut ids = Vec::new();
    for user in ["ann", "bob", "cat"] {
        let (code, body) = client.issue(&coupon, user).await;
        assert_eq!(code, 202, "{body}");
        ids.push(body["request_id"].as_str().unwrap().to_owned());
    }
    for (id, want) in ids.iter().zip(["issued", "issued", "sold_out"]) {
        let status = client.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(status["status"], want, "{status}");
    }
    let appended = env.read_request_log().len();
    assert_eq!(appended, 3, "only the short coupon's three requests");

    // Now the stock is zero in Redis: once the ingress has looked again,
    // requests are answered 409 sold_out and the log does not grow.
    let mut answered = None;
    for _ in 0..100 {
        let (code, body) = client.issue(&coupon, "dan").await;
        if code == 409 {
            answered = Some((code, body));
            break;
        }
        assert_eq!(code, 202, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, err) = answered.expect("the sold-out coupon is short-circuited");
    assert_error(code, &err, 409, "sold_out");
    assert!(err.get("request_id").is_none(), "{err}");
    let before = env.read_request_log().len();
    for user in ["eve", "fay", "ann"] {
        let (code, err) = client.issue(&coupon, user).await;
        assert_error(code, &err, 409, "sold_out");
    }
    assert_eq!(
        env.read_request_log().len(),
        before,
        "nothing more appended"
    );

    // What was appended is decided as always, and the winners are the first
    // two users of the log.
    env.wait_decided(&[coupon.as_str()], before as i64).await;
    let (code, coupon_view) = client.get(&format!("/v1/coupons/{coupon}")).await;
    assert_eq!(code, 200);
    assert_eq!(coupon_view["issued_count"], 2, "{coupon_view}");
    assert_eq!(coupon_view["remaining_stock"], 0, "{coupon_view}");
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_gives_the_same_request_back_and_appends_it_once() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("idem");
    let other = env.coupon_id("idem2");
    assert_eq!(client.create_coupon(&coupon, 5).await.0, 201);
    assert_eq!(client.create_coupon(&other, 5).await.0, 201);
    let issue = |coupon: &str, user: &str, key: &str| {
        client
            .http
            .post(format!("{}/v1/coupons/{coupon}/issue", client.base))
            .header("idempotency-key", key)
            .json(&json!({ "user_id": user }))
            .send()
    };

    let (code, first) = split(issue(&coupon, "ann", "k-1").await.unwrap()).await;
    assert_eq!(code, 202, "{first}");
    let (code, again) = split(issue(&coupon, "ann", "k-1").await.unwrap()).await;
    assert_eq!(code, 202, "{again}");
    assert_eq!(again["request_id"], first["request_id"]);
    assert_eq!(
        env.read_request_log().len(),
        1,
        "the retry appended nothing"
    );

    // The same key for another user: refused, nothing appended.
    let (code, err) = split(issue(&coupon, "bob", "k-1").await.unwrap()).await;
    assert_error(code, &err, 422, "idempotency_key_reused");
    // Malformed keys.
    for bad in ["", &"k".repeat(129)] {
        let (code, err) = split(issue(&coupon, "ann", bad).await.unwrap()).await;
        assert_error(code, &err, 422, "invalid_request");
    }
    // A key belongs to one coupon.
    let (code, elsewhere) = split(issue(&other, "ann", "k-1").await.unwrap()).await;
    assert_eq!(code, 202, "{elsewhere}");
    assert_ne!(elsewhere["request_id"], first["request_id"]);
    assert_eq!(env.read_request_log().len(), 2);

    // An attempt the broker never acknowledged (503), retried with its key
    // through a healthy ingress: the same request, appended then.
    let unacknowledged = env.spawn_ingress_without_broker(1_000, 4_096).await;
    let dead = format!("http://{}", unacknowledged.addr.expect("it listens"));
    let (code, err) = split(
        client
            .http
            .post(format!("{dead}/v1/coupons/{coupon}/issue"))
            .header("idempotency-key", "k-2")
            .json(&json!({ "user_id": "cat" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(code, &err, 503, "unavailable");
    unacknowledged.stop().await;
    let (code, retried) = split(issue(&coupon, "cat", "k-2").await.unwrap()).await;
    assert_eq!(code, 202, "{retried}");
    assert_eq!(retried["request_id"], err["request_id"], "the same request");
    let (code, _) = split(issue(&coupon, "cat", "k-2").await.unwrap()).await;
    assert_eq!(code, 202);
    let log = env.read_request_log();
    let id = retried["request_id"].as_str().unwrap();
    let copies = log
        .iter()
        .filter(|r| {
            let v: Value = serde_json::from_slice(r.payload.as_ref().unwrap()).unwrap();
            v["request_id"] == id
        })
        .count();
    assert_eq!(copies, 1, "appended once");

    // Decided like any other request.
    let worker = env.spawn_worker().await;
    let status = client.wait_final(id, Duration::from_secs(60)).await;
    assert_eq!(status["status"], "issued", "{status}");
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_attempt_with_one_idempotency_key_gets_the_first_attempts_answer() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let issue = |coupon: String, user: &'static str, key: &'static str| {
        let client = client.clone();
        async move {
            split(
                client
                    .http
                    .post(format!("{}/v1/coupons/{coupon}/issue", client.base))
                    .header("idempotency-key", key)
                    .json(&json!({ "user_id": user }))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    let at = |ms: i64| chrono::Utc::now() + chrono::Duration::milliseconds(ms);

    // Refused before the window opens, and the refusal is not remembered
    // (red team #4): retried with the key once it is open, the request is
    // admitted, and the key then stands for it.
    let opens = at(1_500);
    let early = env.coupon_id("early");
    let (code, body) = client
        .create_coupon_with(
            json!({ "coupon_id": early, "name": "early", "total_stock": 5,
                                    "starts_at": opens }),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let (code, err) = issue(early.clone(), "ann", "k-early").await;
    assert_error(code, &err, 409, "not_open");
    tokio::time::sleep((opens - chrono::Utc::now()).to_std().unwrap()).await;
    let (code, admitted) = issue(early.clone(), "ann", "k-early").await;
    assert_eq!(
        code, 202,
        "the refusal did not outlive its truth: {admitted}"
    );
    let (code, again) = issue(early.clone(), "ann", "k-early").await;
    assert_eq!(code, 202, "{again}");
    assert_eq!(again["request_id"], admitted["request_id"]);
    assert_eq!(env.read_request_log().len(), 1);

    // Attempts with one key racing across the end of the window: whichever
    // claims the key first fixes the answer of all of them.
    let ends = at(1_000);
    let late = env.coupon_id("late");
    let (code, body) = client
        .create_coupon_with(json!({ "coupon_id": late, "name": "late", "total_stock": 5,
                                    "ends_at": ends }))
        .await;
    assert_eq!(code, 201, "{body}");
    let attempts: Vec<_> = (0..40i64)
        .map(|i| {
            let send = issue(late.clone(), "bob", "k-burst");
            tokio::spawn(async move {
                let start =
                    ends - chrono::Duration::milliseconds(20) + chrono::Duration::milliseconds(i);
                if let Ok(wait) = (start - chrono::Utc::now()).to_std() {
                    tokio::time::sleep(wait).await;
                }
                send.await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for a in attempts {
        let (code, body) = a.await.unwrap();
        answers.push((
            code,
            body["request_id"].clone(),
            body["error"]["code"].clone(),
        ));
    }
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "one key, different answers: {answers:?}"
    );
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_lookup_with_wait_ms_answers_once_the_request_is_decided() {
    let env = TestEnv::new().await;
    // Waits far longer than this test lets them run: only a wake-up can end
    // the long poll below in time.
    let mut cfg = env.ingress_config();
    cfg.request_timeout = Duration::from_millis(300_000);
    cfg.max_wait = Duration::from_millis(200_000);
    let ingress = env.spawn_ingress_with(cfg).await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("wait");
    assert_eq!(client.create_coupon(&coupon, 1).await.0, 201);
    let (code, first) = client.issue(&coupon, "ann").await;
    assert_eq!(code, 202, "{first}");
    let id = first["request_id"].as_str().unwrap().to_owned();

    // No worker yet: the wait runs out and the answer is the plain one.
    let (code, status) = client
        .get(&format!("/v1/issue-requests/{id}?wait_ms=300"))
        .await;
    assert_eq!(
        (code, &status["status"]),
        (200, &json!("pending")),
        "{status}"
    );

    // Bad waits are refused.
    for bad in ["wait_ms=200001", "wait_ms=soon", "wait_ms=-1", "wait=5"] {
        let (code, err) = client.get(&format!("/v1/issue-requests/{id}?{bad}")).await;
        assert_error(code, &err, 422, "invalid_request");
    }

    // A long poll in progress is woken by the worker's decision.
    let waiting = {
        let client = env.client(&ingress);
        let path = format!("/v1/issue-requests/{id}?wait_ms=200000");
        tokio::spawn(async move { client.get(&path).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let worker = env.spawn_worker().await;
    let (code, status) = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("the decision wakes the long poll")
        .unwrap();
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["status"], "issued", "{status}");
    assert!(status["decided_at"].is_string(), "{status}");

    // A final status answers at once, wait or not.
    let (code, again) = client
        .get(&format!("/v1/issue-requests/{id}?wait_ms=5000"))
        .await;
    assert_eq!((code, again), (200, status));
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_limit_is_429_with_retry_after_and_others_are_not() {
    let env = TestEnv::new().await;
    let mut cfg = env.ingress_config();
    cfg.rate_limit_per_sec = 1;
    cfg.rate_limit_burst = 2;
    // Behind a proxy (the test, at 127.0.0.1): the client is the rightmost
    // hop of the header that is not the proxy; the left is the client's own
    // writing and changes nothing.
    cfg.client_ip_header = Some("x-forwarded-for".into());
    cfg.trusted_proxies = vec!["127.0.0.1".into()];
    let ingress = env.spawn_ingress_with(cfg).await;
    let client = env.client(&ingress);
    let get = |from: &'static str| {
        client
            .http
            .get(format!("{}/v1/users/nobody/coupons", client.base))
            .header("x-forwarded-for", from)
            .send()
    };
    for claimed in ["6.6.6.1, 10.1.1.1", "6.6.6.2,10.1.1.1"] {
        assert_eq!(get(claimed).await.unwrap().status(), 200);
    }
    let limited = get("6.6.6.3, 10.1.1.1").await.unwrap();
    assert_eq!(
        limited
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let (code, err) = split(limited).await;
    assert_error(code, &err, 429, "rate_limited");
    // Another client, and the probes, are not limited.
    assert_eq!(get("10.2.2.2").await.unwrap().status(), 200);
    let health = client
        .http
        .get(format!("{}/healthz", client.base))
        .header("x-forwarded-for", "10.1.1.1")
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    ingress.stop().await;
}

/// Red team #4: a refusal claimed its Idempotency-Key for a day, so an
/// anonymous client with fresh keys wrote to Redis without bound. Now a
/// refusal holds its key for a second at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_with_fresh_idempotency_keys_leave_nothing_in_redis_for_long() {
    use futures::StreamExt;
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("later");
    let (code, body) = client
        .create_coupon_with(
            json!({ "coupon_id": coupon, "name": "later", "total_stock": 5,
                                    "starts_at": chrono::Utc::now() + chrono::Duration::hours(1) }),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let refused = futures::stream::iter(0..2_000)
        .map(|i| {
            let client = client.clone();
            let coupon = coupon.clone();
            async move {
                let r = client
                    .http
                    .post(format!("{}/v1/coupons/{coupon}/issue", client.base))
                    .header("idempotency-key", format!("fresh-{i}-{}", "k".repeat(100)))
                    .json(&json!({ "user_id": format!("u{i}") }))
                    .send()
                    .await
                    .unwrap();
                split(r).await.0
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<u16>>()
        .await;
    assert!(refused.iter().all(|c| *c == 409), "all refused");

    let mut redis = env.redis().await;
    let keys = env
        .keys_matching(&format!("{}idem:*", env.common.redis_prefix))
        .await;
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(
            (-2..=1_000).contains(&ttl),
            "{k} is held for {ttl} ms, not a second at most"
        );
    }
    assert!(env.read_request_log().is_empty(), "nothing appended");
    ingress.stop().await;
}

/// Red team #14: an unconfirmed key appended its stored record again, with
/// no admission, for a day. Past the re-append window, a request the log
/// never decided goes through admission again, and one it did is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_key_of_long_ago_goes_through_admission_again() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("ended");
    let (code, body) = client
        .create_coupon_with(
            json!({ "coupon_id": coupon, "name": "ended", "total_stock": 5,
                                    "ends_at": chrono::Utc::now() - chrono::Duration::seconds(1) }),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let mut redis = env.redis().await;
    let entry = |id: &uuid::Uuid, user: &str| {
        json!({ "request_id": id, "user_id": user,
                "accepted_at": chrono::Utc::now() - chrono::Duration::minutes(5),
                "confirmed": false })
        .to_string()
    };
    let key = |k: &str| format!("{}idem:{{{coupon}}}:{k}", env.common.redis_prefix);
    let send = |user: &'static str, k: &'static str| {
        let client = client.clone();
        let coupon = coupon.clone();
        async move {
            split(
                client
                    .http
                    .post(format!("{}/v1/coupons/{coupon}/issue", client.base))
                    .header("idempotency-key", k)
                    .json(&json!({ "user_id": user }))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };

    // Never reached the log: the sale has ended since, so it is refused.
    let lost = uuid::Uuid::new_v4();
    let _: () = redis::cmd("SET")
        .arg(key("k-lost"))
        .arg(entry(&lost, "ann"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let (code, err) = send("ann", "k-lost").await;
    assert_error(code, &err, 409, "not_open");
    assert!(env.read_request_log().is_empty(), "nothing appended");

    // Reached the log (its status is known): answered as it was.
    let known = uuid::Uuid::new_v4();
    let _: () = redis::cmd("SET")
        .arg(key("k-known"))
        .arg(entry(&known, "bob"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let status = json!({ "request_id": known, "coupon_id": coupon, "user_id": "bob",
                         "status": "pending", "accepted_at": "2026-01-01T00:00:00Z",
                         "decided_at": null });
    let _: () = redis::cmd("SET")
        .arg(
            firstcome::state::Keys::new(env.common.redis_prefix.clone())
                .unwrap()
                .request(firstcome::RequestId::parse(&known.to_string()).unwrap()),
        )
        .arg(status.to_string())
        .query_async(&mut redis)
        .await
        .unwrap();
    let (code, body) = send("bob", "k-known").await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["request_id"], known.to_string());
    assert!(env.read_request_log().is_empty(), "nothing appended");
    ingress.stop().await;
}

/// Red team #5: readiness followed Redis and Postgres, so a Redis blip took
/// every replica out of the Service at once, although the ingress accepts
/// requests without Redis. Readiness follows the broker; the others are
/// shown, and the probes answer on the operations port too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_shown_by_readyz_but_keeps_the_ingress_ready() {
    let mut env = TestEnv::new().await;
    let mut redis = firstcome_suite::services::PrivateRedis::start().await;
    env.use_redis(redis.url());
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("blip");
    assert_eq!(client.create_coupon(&coupon, 5).await.0, 201);
    let ops = format!("http://{}", ingress.metrics);
    for path in ["/readyz", "/healthz"] {
        let r = reqwest::get(format!("{ops}{path}")).await.unwrap();
        assert_eq!(r.status(), 200, "{path} on the operations port");
    }

    redis.stop();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let (code, ready) = client.get("/readyz").await;
        if ready["checks"]["redis"] == "failing" {
            assert_eq!(code, 200, "ready without Redis: {ready}");
            break ready;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outage never showed: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ready["checks"]["kafka"], "ok", "{ready}");
    let scrape = firstcome_suite::Scrape::of(ingress.metrics).await;
    assert_eq!(
        scrape.get(r#"firstcome_ingress_dependency_up{dependency="redis"}"#),
        0.0
    );
    // And it still accepts.
    let (code, body) = client.issue(&coupon, "ann").await;
    assert_eq!(code, 202, "{body}");
    redis.start_again().await;
    ingress.stop().await;
}
