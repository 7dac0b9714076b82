//! The broker fails under the ingress and the worker: killed and restarted,
//! and frozen (`SIGSTOP`) past the delivery timeout. Each test runs its own
//! broker, so nobody else's tests see the fault.

use std::collections::HashSet;
use std::time::Duration;

use firstcome_suite::services::PrivateKafka;
use firstcome_suite::{PARTITIONS, TestEnv};
use tokio_util::sync::CancellationToken;

/// The ingress's produce timeout in these tests.
const PRODUCE_TIMEOUT_MS: u64 = 2_000;

/// Sends requests until one gets a 202 again; returns how long that took.
/// Every request sent lands in `accepted` or `unconfirmed`.
async fn until_accepting(
    client: &firstcome_suite::Client,
    coupon: &str,
    accepted: &mut HashSet<String>,
    unconfirmed: &mut HashSet<String>,
) -> Duration {
    let since = tokio::time::Instant::now();
    for i in 0.. {
        let (code, body) = client.issue(coupon, &format!("probe{i}")).await;
        let id = body["request_id"].as_str().unwrap_or_default().to_owned();
        if code == 202 {
            accepted.insert(id);
            return since.elapsed();
        }
        assert_eq!(code, 503, "{body}");
        unconfirmed.insert(id);
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "still refusing a minute after the broker came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_killed_then_frozen_mid_burst_costs_503s_for_that_time_and_loses_nothing() {
    let mut env = TestEnv::new().await;
    let mut broker = PrivateKafka::start().await;
    env.use_broker(&broker).await;
    let mut icfg = env.ingress_config();
    icfg.produce_timeout = Duration::from_millis(PRODUCE_TIMEOUT_MS);
    let ingress = env.spawn_ingress_with(icfg).await;
    let client = env.client(&ingress);
    let coupons = vec![(env.coupon_id("k1"), 40), (env.coupon_id("k2"), 70)];
    for (id, stock) in &coupons {
        assert_eq!(client.create_coupon(id, *stock).await.0, 201);
    }
    let ids: Vec<&str> = coupons.iter().map(|(c, _)| c.as_str()).collect();
    let worker = env.spawn_worker().await;
    worker
        .wait_assignment("every partition", |a| a.len() == PARTITIONS as usize)
        .await;

    let stop = CancellationToken::new();
    let load = firstcome_suite::spawn_open_load(
        &client,
        &coupons,
        Duration::from_millis(20),
        |i| format!("b{}", (i * 11) % 150),
        stop.clone(),
    );
    env.wait_decided(&ids, 50).await;

    // kill -9, down for 4 s, started again on its data.
    broker.kill(0);
    tokio::time::sleep(Duration::from_secs(4)).await;
    broker.restart(0).await;
    let (mut probed, mut probe_refused) = (HashSet::new(), HashSet::new());
    let back = until_accepting(&client, ids[0], &mut probed, &mut probe_refused).await;
    eprintln!("accepting again {back:?} after the restart");

    // Frozen past the delivery timeout: records time out in the producers,
    // which must not stay broken once it thaws.
    env.wait_decided(&ids, 150).await;
    broker.freeze(0);
    tokio::time::sleep(Duration::from_millis(PRODUCE_TIMEOUT_MS * 2 + 1_000)).await;
    broker.thaw(0);
    let back = until_accepting(&client, ids[0], &mut probed, &mut probe_refused).await;
    eprintln!("accepting again {back:?} after the thaw");
    // The load goes on until every coupon is sold out, so the check below
    // has demand past the stock.
    env.wait_sold_out(&coupons, Duration::from_secs(120)).await;
    stop.cancel();
    let seen = load.await.unwrap();
    eprintln!(
        "accepted {}, unconfirmed {}, slowest 503 {:?}",
        seen.accepted.len(),
        seen.unconfirmed.len(),
        seen.slowest_refusal
    );
    assert!(!seen.unconfirmed.is_empty(), "the outages were never seen");
    assert!(
        seen.slowest_refusal < Duration::from_millis(PRODUCE_TIMEOUT_MS + 2_000),
        "a 503 took {:?}, past the produce timeout",
        seen.slowest_refusal
    );
    let mut accepted = seen.accepted;
    accepted.extend(probed);
    let mut unconfirmed = seen.unconfirmed;
    unconfirmed.extend(probe_refused);
    firstcome_suite::check_promise_with(
        &env,
        &client,
        &coupons,
        &accepted,
        &unconfirmed,
        Duration::from_secs(120),
    )
    .await;
    worker.stop().await;
    ingress.stop().await;
}
