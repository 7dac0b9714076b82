//! Three Apache Kafka brokers (KRaft, each also a controller), every topic
//! replicated to three with two in sync at least, as production runs: the
//! broker leading the hot coupon's partition is killed mid-sale and started
//! again, then every broker is restarted in turn, while many clients send to
//! two ingresses and two workers decide. The promise is checked against the
//! log afterwards, as in `tests/promise.rs`.

use std::collections::HashSet;
use std::time::Duration;

use firstcome_suite::services::PrivateKafka;
use firstcome_suite::{LoadOutcome, TestEnv};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The ingresses' produce timeout: a 503 comes at most this long after a
/// request that the brokers did not acknowledge.
const PRODUCE_TIMEOUT_MS: u64 = 5_000;

/// Samples how many requests are decided, every 100 ms, until `stop`; returns
/// the longest time the count stood still while requests kept arriving.
fn spawn_progress_watch(
    env: &TestEnv,
    coupons: Vec<String>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Duration> {
    let pool = env.pool.clone();
    tokio::spawn(async move {
        let (mut last, mut since, mut longest) = (-1i64, Instant::now(), Duration::ZERO);
        while !stop.is_cancelled() {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM request_ledger WHERE coupon_id = ANY($1)")
                    .bind(&coupons)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            if n != last {
                (last, since) = (n, Instant::now());
            }
            longest = longest.max(since.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        longest
    })
}

/// The longest time between two 202s within `window`.
fn longest_gap(accepted_at: &[Instant], window: (Instant, Instant)) -> Duration {
    let mut at: Vec<Instant> = accepted_at
        .iter()
        .copied()
        .filter(|t| *t >= window.0 && *t <= window.1)
        .collect();
    at.sort();
    let mut points = vec![window.0];
    points.extend(at);
    points.push(window.1);
    points
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_three_brokers_a_leader_killed_and_a_rolling_restart_keep_the_promise() {
    let mut env = TestEnv::new().await;
    let mut kafka = PrivateKafka::start_cluster(3).await;
    env.use_broker(&kafka).await;
    let mut icfg = env.ingress_config();
    icfg.produce_timeout = Duration::from_millis(PRODUCE_TIMEOUT_MS);
    let ingresses = [
        env.spawn_ingress_with(icfg.clone()).await,
        env.spawn_ingress_with(icfg).await,
    ];
    let clients: Vec<_> = ingresses.iter().map(|i| env.client(i)).collect();
    // The hot coupon takes most requests; stock runs out mid-test.
    let hot = env.coupon_id("hot");
    let coupons = vec![
        (hot.clone(), 900),
        (env.coupon_id("c1"), 60),
        (env.coupon_id("c2"), 300),
    ];
    for (id, stock) in &coupons {
        assert_eq!(clients[0].create_coupon(id, *stock).await.0, 201);
    }
    let ids: Vec<&str> = coupons.iter().map(|(c, _)| c.as_str()).collect();
    let workers = [env.spawn_worker().await, env.spawn_worker().await];

    // Sixteen clients, half on each ingress; the hot coupon twice in each
    // round of four.
    let stop = CancellationToken::new();
    let rounds = vec![
        coupons[0].clone(),
        coupons[1].clone(),
        coupons[0].clone(),
        coupons[2].clone(),
    ];
    let loads: Vec<_> = clients
        .iter()
        .map(|c| {
            firstcome_suite::spawn_open_load(
                c,
                &rounds,
                Duration::from_millis(25),
                |i| format!("u{}", (i * 7919) % 2_000),
                stop.clone(),
            )
        })
        .collect();
    let progress = spawn_progress_watch(
        &env,
        ids.iter().map(|s| s.to_string()).collect(),
        stop.clone(),
    );
    env.wait_decided(&ids, 200).await;

    // 1. The leader of the hot coupon's partition, killed.
    let partition = env
        .read_request_log()
        .iter()
        .find(|r| r.key.as_deref() == Some(hot.as_bytes()))
        .expect("the hot coupon is in the log")
        .partition;
    let topic = env.common.request_topic.clone();
    let leader = kafka
        .leader_of(&topic, partition)
        .expect("the partition has a leader");
    let killed_at = Instant::now();
    kafka.kill(leader);
    // The controller moves the leadership once the dead broker's session
    // with it expires (`broker.session.timeout.ms`, 9 s by default).
    loop {
        match kafka.leader_of(&topic, partition) {
            Some(l) if l != leader => break,
            _ => {}
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(90),
            "no new leader for partition {partition} 90 s after its leader was killed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "killed node {} (leader of partition {partition}); a new leader after {:?}",
        leader + 1,
        killed_at.elapsed()
    );
    // Down a little longer, then back on the data it had.
    tokio::time::sleep(Duration::from_secs(2)).await;
    kafka.restart(leader).await;
    kafka.wait_fully_replicated().await;
    let kill_window = (killed_at, Instant::now());
    let before = env.decided_count(&ids).await;
    env.wait_decided(&ids, before + 100).await;

    // 2. A rolling restart: each broker shut down cleanly and started again
    // once every partition is back in full sync.
    let rolling_from = Instant::now();
    for i in 0..kafka.len() {
        kafka.stop(i).await;
        kafka.restart(i).await;
        kafka.wait_fully_replicated().await;
    }
    let rolling_window = (rolling_from, Instant::now());
    let before = env.decided_count(&ids).await;
    env.wait_decided(&ids, before + 100).await;
    env.wait_sold_out(&coupons, Duration::from_secs(120)).await;
    stop.cancel();

    let mut seen = LoadOutcome::default();
    for load in loads {
        let s = load
            .await
            .expect("no client panicked: every answer was 202 or 503");
        seen.accepted.extend(s.accepted);
        seen.unconfirmed.extend(s.unconfirmed);
        seen.accepted_at.extend(s.accepted_at);
        seen.slowest_refusal = seen.slowest_refusal.max(s.slowest_refusal);
    }
    let worker_stall = progress.await.unwrap();
    eprintln!(
        "accepted {}, 503 {}; longest without a 202: {:?} around the kill, {:?} in the rolling \
         restart; longest without a decision: {worker_stall:?}; slowest 503 {:?}",
        seen.accepted.len(),
        seen.unconfirmed.len(),
        longest_gap(&seen.accepted_at, kill_window),
        longest_gap(&seen.accepted_at, rolling_window),
        seen.slowest_refusal,
    );
    assert!(
        seen.slowest_refusal < Duration::from_millis(PRODUCE_TIMEOUT_MS + 2_000),
        "a 503 took {:?}, past the produce timeout",
        seen.slowest_refusal
    );
    let accepted: HashSet<String> = seen.accepted;
    firstcome_suite::check_promise_with(
        &env,
        &clients[0],
        &coupons,
        &accepted,
        &seen.unconfirmed,
        Duration::from_secs(120),
    )
    .await;
    for w in workers {
        w.stop().await;
    }
    for i in ingresses {
        i.stop().await;
    }
}
