//! The whole path: HTTP → Kafka → worker → Redis → Postgres, and back
//! through the status and user endpoints.

use firstcome_worker::deadletter::Header;
use std::time::Duration;

use firstcome_suite::{TestEnv, request_value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issued_coupon_reaches_postgres_and_the_users_coupon_list() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let worker = env.spawn_worker().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("e2e");
    let user = format!("{}-alice", env.tag);

    let (code, body) = client.create_coupon(&coupon, 1).await;
    assert_eq!(code, 201, "{body}");

    let (code, accepted) = client.issue(&coupon, &user).await;
    assert_eq!(code, 202, "{accepted}");
    assert_eq!(accepted["status"], "pending");
    let request_id = accepted["request_id"].as_str().unwrap().to_owned();
    assert_eq!(
        accepted["status_url"],
        format!("/v1/issue-requests/{request_id}")
    );

    let done = client
        .wait_final(&request_id, Duration::from_secs(60))
        .await;
    assert_eq!(done["status"], "issued", "{done}");
    assert_eq!(done["coupon_id"], coupon.as_str());
    assert_eq!(done["user_id"], user.as_str());
    assert!(done["decided_at"].is_string() && done["accepted_at"].is_string());

    // Final in the status cache means durable in Postgres.
    let (db_user, db_request): (String, uuid::Uuid) =
        sqlx::query_as("SELECT user_id, request_id FROM user_coupon WHERE coupon_id = $1")
            .bind(&coupon)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        (db_user.as_str(), db_request.to_string()),
        (user.as_str(), request_id.clone())
    );
    let status: String =
        sqlx::query_scalar("SELECT status FROM request_ledger WHERE request_id = $1")
            .bind(db_request)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(status, "issued");

    let (code, held) = client.get(&format!("/v1/users/{user}/coupons")).await;
    assert_eq!(code, 200);
    let held = held.as_array().unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0]["coupon_id"], coupon.as_str());
    assert_eq!(held[0]["request_id"], request_id.as_str());

    // The stock is gone: the next user is told sold_out, and the counters add up.
    let (_, second) = client.issue(&coupon, &format!("{}-bob", env.tag)).await;
    let second = client
        .wait_final(
            second["request_id"].as_str().unwrap(),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(second["status"], "sold_out");
    let (_, view) = client.get(&format!("/v1/coupons/{coupon}")).await;
    assert_eq!(
        (
            view["remaining_stock"].as_i64(),
            view["issued_count"].as_i64()
        ),
        (Some(0), Some(1))
    );

    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_lookup_falls_back_to_the_ledger_when_the_cache_entry_is_gone() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let worker = env.spawn_worker().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("fallback");
    assert_eq!(client.create_coupon(&coupon, 5).await.0, 201);
    let (_, accepted) = client.issue(&coupon, "carol").await;
    let id = accepted["request_id"].as_str().unwrap().to_owned();
    let cached = client.wait_final(&id, Duration::from_secs(60)).await;

    let mut redis = env.redis().await;
    let key = env
        .common
        .keys()
        .unwrap()
        .request(firstcome::RequestId::parse(&id).unwrap());
    let removed: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    let (code, from_ledger) = client.get(&format!("/v1/issue-requests/{id}")).await;
    assert_eq!(code, 200);
    assert_eq!(from_ledger, cached);

    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_builds_a_coupons_redis_state_from_postgres_when_it_is_missing() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("lazy");
    assert_eq!(client.create_coupon(&coupon, 3).await.0, 201);
    // Lose the coupon's Redis state, as if the admin call's Redis write had failed.
    let keys = env
        .common
        .keys()
        .unwrap()
        .coupon(&firstcome::CouponId::parse(&coupon).unwrap());
    let mut redis = env.redis().await;
    let _: i64 = redis::cmd("DEL")
        .arg(&keys.meta)
        .arg(&keys.stock)
        .query_async(&mut redis)
        .await
        .unwrap();
    let (_, accepted) = client.issue(&coupon, "dave").await;
    let worker = env.spawn_worker().await;
    let done = client
        .wait_final(
            accepted["request_id"].as_str().unwrap(),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(done["status"], "issued");
    let (_, view) = client.get(&format!("/v1/coupons/{coupon}")).await;
    assert_eq!(view["remaining_stock"], 2);
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_cannot_be_issue_requests_are_dead_lettered_and_block_nothing() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("poison");
    assert_eq!(client.create_coupon(&coupon, 5).await.0, 201);

    // Another writer puts bad records in the coupon's partition, ahead of a good one.
    let ghost = env.coupon_id("ghost");
    let valid = |coupon: &str| request_value(coupon, "mallory").1;
    let bad: [(&str, String, &str); 4] = [
        (coupon.as_str(), "{not json".to_owned(), "invalid_record"),
        (
            coupon.as_str(),
            r#"{"request_id":"x","coupon_id":"c","user_id":"u"}"#.to_owned(),
            "invalid_record",
        ),
        ("some-other-key", valid(&coupon), "key_mismatch"),
        (ghost.as_str(), valid(&ghost), "unknown_coupon"),
    ];
    let raw: Vec<(&str, &str)> = bad.iter().map(|(k, v, _)| (*k, v.as_str())).collect();
    env.produce_raw(&raw).await;
    let (_, accepted) = client.issue(&coupon, "grace").await;
    let worker = env.spawn_worker().await;
    let done = client
        .wait_final(
            accepted["request_id"].as_str().unwrap(),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(done["status"], "issued");

    let letters = env.read_dead_letters();
    assert_eq!(letters.len(), bad.len(), "{letters:?}");
    let mut kinds: Vec<&str> = letters
        .iter()
        .map(|l| l.headers[Header::ErrorKind.as_str()].as_str())
        .collect();
    let mut want: Vec<&str> = bad.iter().map(|(_, _, kind)| *kind).collect();
    kinds.sort();
    want.sort();
    assert_eq!(kinds, want);
    for letter in &letters {
        // Key and value untouched, and the headers say where it came from.
        let source = bad
            .iter()
            .find(|(_, v, _)| Some(v.as_bytes()) == letter.payload.as_deref())
            .expect("the value is the original");
        assert_eq!(letter.key.as_deref(), Some(source.0.as_bytes()));
        assert_eq!(
            letter.headers[Header::OriginalTopic.as_str()],
            env.common.request_topic
        );
        assert_eq!(letter.headers[Header::ConsumerGroup.as_str()], env.group_id);
        assert!(
            letter.headers[Header::OriginalOffset.as_str()]
                .parse::<i64>()
                .is_ok()
        );
        assert!(!letter.headers[Header::ErrorMessage.as_str()].is_empty());
    }
    // Nothing of the bad records reached the ledger.
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM request_ledger WHERE user_id = 'mallory'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(rows, 0);
    worker.stop().await;
    ingress.stop().await;
}
