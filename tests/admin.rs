//! Admin operations through real HTTP: tokens with ids, paging, counters,
//! more stock going to the next requests in log order, close and reopen,
//! and the audit table.

use std::time::Duration;

use firstcome_suite::services::PrivatePostgres;
use firstcome_suite::{Proxy, TestEnv, split};
use serde_json::{Value, json};

const OPS_TOKEN: &str = "ops-token-long-enough";

async fn admin_call(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    method: reqwest::Method,
    path: String,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = http
        .request(method.clone(), format!("{base}{path}"))
        .bearer_auth(token);
    if method == reqwest::Method::POST {
        // Every admin change names itself.
        r = r.header("idempotency-key", uuid::Uuid::new_v4().to_string());
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    split(r.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_stock_goes_to_the_first_undecided_requests_in_log_order_and_every_action_is_audited()
{
    let env = TestEnv::new().await;
    let mut cfg = env.ingress_config();
    cfg.admin_tokens = vec![format!("ops={OPS_TOKEN}")];
    let ingress = env.spawn_ingress_with(cfg).await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("more");
    assert_eq!(client.create_coupon(&coupon, 1).await.0, 201);

    // Four requests in the log, none decided yet (no worker).
    let mut ids = Vec::new();
    for user in ["ann", "bob", "cat", "dan"] {
        let (code, body) = client.issue(&coupon, user).await;
        assert_eq!(code, 202, "{body}");
        ids.push(body["request_id"].as_str().unwrap().to_owned());
    }
    let (code, counters) = admin_call(
        &client.http,
        &client.base,
        OPS_TOKEN,
        reqwest::Method::POST,
        format!("/v1/admin/coupons/{coupon}/stock"),
        Some(json!({ "add": 2 })),
    )
    .await;
    assert_eq!(code, 200, "{counters}");
    assert_eq!(counters["total_stock"], 3, "{counters}");
    assert_eq!(counters["pending"], 4, "{counters}");

    // The three units go to the first three users of the log.
    let worker = env.spawn_worker().await;
    for (id, want) in ids.iter().zip(["issued", "issued", "issued", "sold_out"]) {
        let status = client.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(status["status"], want, "{status}");
    }
    let (code, counters) = admin_call(
        &client.http,
        &client.base,
        &env.admin_token,
        reqwest::Method::GET,
        format!("/v1/admin/coupons/{coupon}/counters"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{counters}");
    assert_eq!(
        (
            &counters["issued"],
            &counters["remaining"],
            &counters["pending"]
        ),
        (&json!(3), &json!(0), &json!(0)),
        "{counters}"
    );
    assert_eq!(counters["decided"], json!({ "issued": 3, "sold_out": 1 }));

    // Bad input changes nothing.
    for (body, code) in [
        (json!({ "add": 0 }), 422),
        (json!({ "add": 1, "x": 1 }), 422),
    ] {
        let (got, err) = admin_call(
            &client.http,
            &client.base,
            OPS_TOKEN,
            reqwest::Method::POST,
            format!("/v1/admin/coupons/{coupon}/stock"),
            Some(body),
        )
        .await;
        assert_eq!(got, code, "{err}");
    }
    let (code, _) = admin_call(
        &client.http,
        &client.base,
        "not-a-token-at-all",
        reqwest::Method::POST,
        format!("/v1/admin/coupons/{coupon}/stock"),
        Some(json!({ "add": 1 })),
    )
    .await;
    assert_eq!(code, 401);

    let audit: Vec<(String, String)> = sqlx::query_as(
        "SELECT token_id, action FROM admin_audit WHERE coupon_id = $1 ORDER BY audit_id",
    )
    .bind(&coupon)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        audit,
        [("admin", "create_coupon"), ("ops", "add_stock")]
            .map(|(t, a)| (t.to_owned(), a.to_owned()))
    );
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_coupon_answers_not_open_until_reopened_and_coupons_are_listed_by_pages() {
    let mut env = TestEnv::new().await;
    // Listing sees every coupon of the database: a database of its own.
    let pg = PrivatePostgres::start().await;
    env.use_postgres(pg.url()).await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let ids: Vec<String> = ["a", "b", "c"].iter().map(|n| env.coupon_id(n)).collect();
    for id in &ids {
        assert_eq!(client.create_coupon(id, 10).await.0, 201);
    }
    let list = |query: &str| {
        admin_call(
            &client.http,
            &client.base,
            &env.admin_token,
            reqwest::Method::GET,
            format!("/v1/admin/coupons?{query}"),
            None,
        )
    };
    let (code, first) = list("limit=2").await;
    assert_eq!(code, 200, "{first}");
    let page: Vec<&str> = first["coupons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["coupon_id"].as_str().unwrap())
        .collect();
    assert_eq!(page, [ids[0].as_str(), ids[1].as_str()]);
    let after = first["next_after"].as_str().unwrap();
    let (_, second) = list(&format!("limit=2&after={after}")).await;
    assert_eq!(second["coupons"].as_array().unwrap().len(), 1);
    assert_eq!(second["coupons"][0]["coupon_id"], ids[2].as_str());
    assert_eq!(second["next_after"], Value::Null);
    let (code, err) = list("limit=0").await;
    assert_eq!(code, 422, "{err}");

    // Close: answered not_open at once; reopen: accepted again.
    let coupon = &ids[0];
    let (code, closed) = admin_call(
        &client.http,
        &client.base,
        &env.admin_token,
        reqwest::Method::POST,
        format!("/v1/admin/coupons/{coupon}/close"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{closed}");
    assert!(closed["ends_at"].is_string(), "{closed}");
    let (code, err) = client.issue(coupon, "ann").await;
    assert_eq!(
        (code, &err["error"]["code"]),
        (409, &json!("not_open")),
        "{err}"
    );
    let (code, past) = admin_call(
        &client.http,
        &client.base,
        &env.admin_token,
        reqwest::Method::POST,
        format!("/v1/admin/coupons/{coupon}/reopen"),
        Some(json!({ "ends_at": "2020-01-01T00:00:00Z" })),
    )
    .await;
    assert_eq!(code, 422, "{past}");
    let (code, reopened) = admin_call(
        &client.http,
        &client.base,
        &env.admin_token,
        reqwest::Method::POST,
        format!("/v1/admin/coupons/{coupon}/reopen"),
        Some(json!({})),
    )
    .await;
    assert_eq!(code, 200, "{reopened}");
    assert_eq!(reopened["ends_at"], Value::Null);
    let (code, body) = client.issue(coupon, "ann").await;
    assert_eq!(code, 202, "{body}");

    let actions: Vec<String> =
        sqlx::query_scalar("SELECT action FROM admin_audit WHERE coupon_id = $1 ORDER BY audit_id")
            .bind(coupon)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(actions, ["create_coupon", "close", "reopen"]);
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admin_change_takes_effect_once_when_redis_fails_it_and_the_client_retries() {
    let env = TestEnv::new().await;
    let proxy = Proxy::start(&Proxy::target_of(&env.common.redis_url)).await;
    let mut cfg = env.ingress_config();
    cfg.common.redis_url = proxy.rewrite(&env.common.redis_url);
    let ingress = env.spawn_ingress_with(cfg).await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("once");
    assert_eq!(client.create_coupon(&coupon, 1).await.0, 201);
    let worker = env.spawn_worker().await;
    let (_, first) = client.issue(&coupon, "ann").await;
    let first = client
        .wait_final(
            first["request_id"].as_str().unwrap(),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(first["status"], "issued");

    // The ingress cannot reach Redis while it adds stock; the client, not
    // sure it worked, sends the same change again.
    proxy.cut();
    let add = || {
        client
            .http
            .post(format!("{}/v1/admin/coupons/{coupon}/stock", client.base))
            .bearer_auth(&env.admin_token)
            .header("idempotency-key", "add-two")
            .json(&json!({ "add": 2 }))
            .send()
    };
    for attempt in ["first", "retry"] {
        let (code, body) = split(add().await.unwrap()).await;
        assert_eq!(code, 200, "{attempt}: {body}");
        assert_eq!(body["total_stock"], 3, "{attempt}: {body}");
    }
    proxy.restore();

    // The two units are sold, to the next two users of the log.
    let mut got = Vec::new();
    for user in ["bob", "cat", "dan"] {
        let (code, body) = client.issue(&coupon, user).await;
        if code == 409 {
            got.push(body["error"]["code"].as_str().unwrap().to_owned());
            continue;
        }
        assert_eq!(code, 202, "{body}");
        let done = client
            .wait_final(
                body["request_id"].as_str().unwrap(),
                Duration::from_secs(60),
            )
            .await;
        got.push(done["status"].as_str().unwrap().to_owned());
    }
    assert_eq!(got, ["issued", "issued", "sold_out"]);
    let changes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM coupon_change WHERE coupon_id = $1")
            .bind(&coupon)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(changes, 1, "applied once");
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_coupon_before_its_window_opens_ends_the_window_there_and_it_never_opens() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("early");
    let starts_at = chrono::Utc::now() + chrono::Duration::seconds(2);
    let (code, body) = client
        .create_coupon_with(json!({
            "coupon_id": coupon, "name": "not yet open", "total_stock": 5,
            "starts_at": starts_at.to_rfc3339(), "ends_at": null,
        }))
        .await;
    assert_eq!(code, 201, "{body}");
    let (code, closed) = admin_call(
        &client.http,
        &client.base,
        &env.admin_token,
        reqwest::Method::POST,
        format!("/v1/admin/coupons/{coupon}/close"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{closed}");
    assert_eq!(closed["starts_at"], closed["ends_at"], "{closed}");
    let ends: chrono::DateTime<chrono::Utc> = closed["ends_at"].as_str().unwrap().parse().unwrap();
    assert!(ends < starts_at, "{closed}");
    // Past the window it was created with, the sale is still over.
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_millis(2_100)).await;
    let (code, err) = client.issue(&coupon, "ann").await;
    assert_eq!(
        (code, &err["error"]["code"]),
        (409, &json!("not_open")),
        "{err}"
    );
}

/// Red team #9: a close before the start moved the start to the close, and
/// a reopen then opened the sale at that time, an hour early. A reopen
/// gives the start back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coupon_closed_before_its_start_and_reopened_opens_at_its_start() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("reopened");
    let starts_at = chrono::Utc::now() + chrono::Duration::hours(1);
    let ends_at = starts_at + chrono::Duration::hours(1);
    let (code, body) = client
        .create_coupon_with(json!({
            "coupon_id": coupon, "name": "later", "total_stock": 5,
            "starts_at": starts_at.to_rfc3339(), "ends_at": ends_at.to_rfc3339(),
        }))
        .await;
    assert_eq!(code, 201, "{body}");
    let call = |path: String, body: Option<Value>| {
        admin_call(
            &client.http,
            &client.base,
            &env.admin_token,
            reqwest::Method::POST,
            path,
            body,
        )
    };
    let (code, closed) = call(format!("/v1/admin/coupons/{coupon}/close"), None).await;
    assert_eq!(code, 200, "{closed}");
    let (code, reopened) = call(
        format!("/v1/admin/coupons/{coupon}/reopen"),
        Some(json!({ "ends_at": ends_at.to_rfc3339() })),
    )
    .await;
    assert_eq!(code, 200, "{reopened}");
    let back: chrono::DateTime<chrono::Utc> =
        reopened["starts_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        back.timestamp_micros(),
        starts_at.timestamp_micros(),
        "{reopened}"
    );
    let (code, err) = client.issue(&coupon, "ann").await;
    assert_eq!(
        (code, &err["error"]["code"]),
        (409, &json!("not_open")),
        "{err}"
    );
    assert!(env.read_request_log().is_empty());
}

/// Red team #10: an admin change without a key was a new change on every
/// retry (stock added twice when the answer was lost), and the same key with
/// another body answered as if it were the first change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_change_needs_its_key_and_a_key_names_one_body() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("keyed");
    assert_eq!(client.create_coupon(&coupon, 5).await.0, 201);
    let add = |units: i64, key: Option<&'static str>| {
        let mut r = client
            .http
            .post(format!("{}/v1/admin/coupons/{coupon}/stock", client.base))
            .bearer_auth(&env.admin_token)
            .json(&json!({ "add": units }));
        if let Some(k) = key {
            r = r.header("idempotency-key", k);
        }
        async move { split(r.send().await.unwrap()).await }
    };
    let (code, err) = add(2, None).await;
    assert_eq!(
        (code, &err["error"]["code"]),
        (422, &json!("invalid_request")),
        "{err}"
    );
    let (code, body) = add(2, Some("restock-1")).await;
    assert_eq!((code, &body["total_stock"]), (200, &json!(7)), "{body}");
    let (code, body) = add(2, Some("restock-1")).await;
    assert_eq!(
        (code, &body["total_stock"]),
        (200, &json!(7)),
        "a retry: {body}"
    );
    let (code, err) = add(50, Some("restock-1")).await;
    assert_eq!(
        (code, &err["error"]["code"]),
        (422, &json!("idempotency_key_reused")),
        "{err}"
    );
    let (code, counters) = client
        .get_with_token(
            &format!("/v1/admin/coupons/{coupon}/counters"),
            &env.admin_token,
        )
        .await;
    assert_eq!(
        (code, &counters["total_stock"]),
        (200, &json!(7)),
        "{counters}"
    );
}
