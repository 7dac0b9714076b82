//! Nothing grows for good: what the ingress holds for a client's request is
//! gone once the request is answered, and a coupon's Redis state leaves
//! Redis after its sale.

use std::time::Duration;

use firstcome::metrics::names;
use firstcome_suite::services::PrivatePostgres;
use firstcome_suite::{Scrape, TestEnv, assert_holders};
use futures::StreamExt;

/// Long polls waiting now, as the ingress's `/metrics` counts its entries.
async fn long_polls(ingress: &firstcome_suite::Running) -> f64 {
    Scrape::of(ingress.metrics)
        .await
        .get(names::INGRESS_LONG_POLLS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_long_polls_leave_nothing_registered_once_answered() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let poll = |wait_ms: u64| {
        let client = client.clone();
        async move {
            let id = uuid::Uuid::new_v4();
            let (code, _) = client
                .get(&format!("/v1/issue-requests/{id}?wait_ms={wait_ms}"))
                .await;
            assert_eq!(code, 404, "nobody sent request {id}");
        }
    };

    // Twenty long waits are counted while they wait...
    let waiting: Vec<_> = (0..20).map(|_| tokio::spawn(poll(4_000))).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while long_polls(&ingress).await < 20.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the twenty polls never showed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and thousands of short ones, for ids nobody sent, come and go.
    futures::stream::iter(0..3_000)
        .for_each_concurrent(32, |_| poll(1))
        .await;
    for w in waiting {
        w.await.expect("a poll answered");
    }
    assert_eq!(
        long_polls(&ingress).await,
        0.0,
        "every answered poll took its entry with it"
    );
    ingress.stop().await;
}

/// Whether any key of the coupon's decision state is in Redis.
async fn state_in_redis(env: &TestEnv, coupon: &str) -> bool {
    let keys = firstcome::state::Keys::new(env.common.redis_prefix.clone())
        .unwrap()
        .coupon(&firstcome::CouponId::parse(coupon).unwrap());
    let n: i64 = redis::cmd("EXISTS")
        .arg(&keys.meta)
        .arg(&keys.stock)
        .arg(&keys.users)
        .arg(&keys.decided)
        .query_async(&mut env.redis().await)
        .await
        .unwrap();
    n > 0
}

/// Waits up to 60 s for the coupon's state to be in Redis (`true`) or not.
async fn wait_state(env: &TestEnv, coupon: &str, present: bool, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while state_in_redis(env, coupon).await != present {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coupons_state_leaves_redis_after_its_sale_and_a_late_record_keeps_its_first_answer() {
    let mut env = TestEnv::new().await;
    // A sweep looks at every coupon of its database: a database of its own.
    let pg = PrivatePostgres::start().await;
    env.use_postgres(pg.url()).await;
    let ingress = env.spawn_ingress().await;
    let mut cfg = env.worker_config();
    cfg.retire_after = Duration::from_secs(0);
    cfg.retire_interval = Duration::from_millis(200);
    let worker = env.spawn_worker_with(cfg).await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("sale");
    let ends_at = chrono::Utc::now() + chrono::Duration::seconds(5);
    let (code, body) = client
        .create_coupon_with(serde_json::json!({
            "coupon_id": coupon, "name": "a short sale", "total_stock": 2,
            "starts_at": null, "ends_at": ends_at.to_rfc3339(),
        }))
        .await;
    assert_eq!(code, 201, "{body}");
    let mut first = None;
    for user in ["u0", "u1", "u2", "u3"] {
        let (code, body) = client.issue(&coupon, user).await;
        assert_eq!(code, 202, "{body}");
        first.get_or_insert(body["request_id"].as_str().unwrap().to_owned());
    }
    let first = first.unwrap();
    env.wait_decided(&[coupon.as_str()], 4).await;
    assert!(
        state_in_redis(&env, &coupon).await,
        "on sale, the state stays"
    );
    assert!(
        chrono::Utc::now() < ends_at,
        "the machine was too slow to see the sale open"
    );

    wait_state(
        &env,
        &coupon,
        false,
        "the state never left Redis after the sale",
    )
    .await;
    // The sweep deletes the state, then marks it retired in Postgres (the
    // other order could mark a state retired that a failed delete left in
    // Redis): the mark follows the delete, not with it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (retired, epoch): (Option<i64>, i64) =
            sqlx::query_as("SELECT retired_epoch, redis_epoch FROM coupon WHERE coupon_id = $1")
                .bind(&coupon)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        if retired == Some(epoch) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the state left Redis but Postgres never marked it retired: {retired:?} at epoch {epoch}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // u0's record delivered again, and a record that came too late: the
    // state is rebuilt from Postgres for them; u0 keeps its first answer.
    let log = env.read_request_log();
    let again = log
        .iter()
        .find(|r| String::from_utf8_lossy(r.payload.as_deref().unwrap()).contains(&first))
        .expect("u0's record is in the log");
    // Accepted (by an ingress with a stale copy of the coupon) after the end.
    let late_id = uuid::Uuid::now_v7().to_string();
    let late = serde_json::json!({
        "request_id": late_id, "coupon_id": coupon, "user_id": "u9",
        "accepted_at": chrono::Utc::now().to_rfc3339(),
    })
    .to_string();
    env.produce_raw(&[
        (
            std::str::from_utf8(again.key.as_deref().unwrap()).unwrap(),
            std::str::from_utf8(again.payload.as_deref().unwrap()).unwrap(),
        ),
        (&coupon, &late),
    ])
    .await;
    env.wait_decided(&[coupon.as_str()], 5).await;
    let (code, status) = client.get(&format!("/v1/issue-requests/{first}")).await;
    assert_eq!(
        (code, &status["status"]),
        (200, &serde_json::json!("issued"))
    );
    let (code, status) = client.get(&format!("/v1/issue-requests/{late_id}")).await;
    assert_eq!(
        (code, &status["status"]),
        (200, &serde_json::json!("not_open"))
    );
    assert_holders(&env, &coupon, &["u0".to_owned(), "u1".to_owned()]).await;
    // The state rebuilt for them leaves again.
    wait_state(&env, &coupon, false, "the rebuilt state never left").await;

    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_connection_bound_the_ingress_takes_no_more_until_one_closes() {
    let env = TestEnv::new().await;
    let mut cfg = env.ingress_config();
    cfg.max_connections = 4;
    let ingress = env.spawn_ingress_with(cfg).await;
    let addr = ingress.addr.unwrap();
    let open = || async {
        Scrape::of(ingress.metrics)
            .await
            .get(names::INGRESS_CONNECTIONS)
    };

    // Four idle connections take every place.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while open().await < 4.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "four connections never showed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A fifth waits in the kernel's queue: connected, never read.
    let client = env.client(&ingress);
    let fifth = tokio::spawn(async move { client.get("/healthz").await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!fifth.is_finished(), "a fifth connection was served");
    assert_eq!(open().await, 4.0);
    // One closes: the fifth takes its place and is answered.
    drop(idle.pop());
    let (code, body) = tokio::time::timeout(Duration::from_secs(10), fifth)
        .await
        .expect("served once a place was free")
        .unwrap();
    assert_eq!(code, 200, "{body}");
    drop(idle);
    ingress.stop().await;
}

/// Red team #1: lookups of coupons nobody created, whose clients all hang
/// up while the lookup waits for the pool, used to keep their pool slot for
/// good; two such slots were the whole pool, and the replica answered 503
/// to everything that needed Postgres from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_whose_clients_hang_up_never_keep_a_pool_slot() {
    let env = TestEnv::new().await;
    let mut cfg = env.ingress_config();
    cfg.common.pg_max_connections = 2;
    let ingress = env.spawn_ingress_with(cfg).await;
    let client = env.client(&ingress);
    let addr = ingress.addr.unwrap();
    let coupon = env.coupon_id("kept");
    assert_eq!(client.create_coupon(&coupon, 5).await.0, 201);

    for round in 0..3 {
        let tag = format!("{}-nx{round}", env.tag);
        firstcome_suite::hostile::hang_up_flood(addr, 1_000, Duration::from_millis(20), |i| {
            format!("/v1/coupons/{tag}-{i}")
        })
        .await;
    }
    // Every Postgres path of the replica still answers: a coupon it has not
    // cached (the new one), a status lookup that misses Redis, a holder list.
    let fresh = env.coupon_id("fresh");
    assert_eq!(client.create_coupon(&fresh, 5).await.0, 201);
    let (code, body) = client.get(&format!("/v1/coupons/{fresh}")).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = client
        .get(&format!("/v1/issue-requests/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = client.get("/v1/users/nobody/coupons").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = client.get(&format!("/v1/coupons/{coupon}")).await;
    assert_eq!(code, 200, "{body}");
    ingress.stop().await;
}

/// Red team #6: idle connections, and connections that never finish their
/// header block, kept their place for good; a client that sends a little
/// and stops must lose it within the header-read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_give_their_place_back() {
    use firstcome_suite::hostile::{closed_within, half_sent};
    let env = TestEnv::new().await;
    let mut cfg = env.ingress_config();
    cfg.max_connections = 64;
    cfg.header_read_timeout = Duration::from_millis(1_000);
    let ingress = env.spawn_ingress_with(cfg).await;
    let addr = ingress.addr.unwrap();
    let mut held = Vec::new();
    for i in 0..64 {
        let head: &[u8] = match i % 3 {
            0 => b"",
            1 => b"GET /healthz HT",
            _ => b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: a",
        };
        held.push(half_sent(addr, head).await.expect("connects"));
    }
    // Every place is taken; each must be given back.
    for (i, s) in held.iter_mut().enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(30)).await.is_some(),
            "connection {i} kept its place"
        );
    }
    let (code, _) = env.client(&ingress).get("/healthz").await;
    assert_eq!(code, 200, "served once the places were back");
    ingress.stop().await;
}

/// Red team #6: a connection could buffer 408 KiB of an unfinished header
/// block (2,048 of them passed the pod's memory limit). Past
/// `FIRSTCOME_MAX_HEADER_BYTES` the ingress refuses and closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fat_header_block_is_refused_before_it_is_all_buffered() {
    use firstcome_suite::hostile::closed_within;
    use tokio::io::AsyncWriteExt;
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let addr = ingress.addr.unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-fat: ")
        .await
        .unwrap();
    // 128 KiB of one header, never ended; the server may stop reading.
    let fat = vec![b'a'; 128 * 1024];
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.write_all(&fat)).await;
    let answer = closed_within(&mut stream, Duration::from_secs(30))
        .await
        .expect("the connection was closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    ingress.stop().await;
}

/// With `FIRSTCOME_MAX_CONNECTIONS_PER_PEER`, one address cannot take every
/// place: its connections past the share are closed at once, and another
/// peer is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_holds_at_most_its_share_of_the_connections() {
    use firstcome_suite::hostile::{closed_within, half_sent};
    let env = TestEnv::new().await;
    let mut cfg = env.ingress_config();
    cfg.max_connections = 64;
    cfg.max_connections_per_peer = 8;
    cfg.listen = "0.0.0.0:0".parse().unwrap();
    let ingress = env.spawn_ingress_with(cfg).await;
    let port = ingress.addr.unwrap().port();
    let local: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(half_sent(local, b"").await.expect("connects"));
    }
    let mut extra = half_sent(local, b"").await.expect("connects");
    assert!(
        closed_within(&mut extra, Duration::from_secs(10))
            .await
            .is_some(),
        "the ninth connection of one peer is closed"
    );
    // Another address of this machine is another peer.
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let r = other
        .get(format!("http://{local}/healthz"))
        .send()
        .await
        .expect("another peer is served");
    assert_eq!(r.status(), 200);
    drop(held);
    ingress.stop().await;
}
