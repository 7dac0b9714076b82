//! The decision stream (docs/decision-stream.md): every stored decision
//! once, for a `read_committed` consumer, in each coupon's decision order,
//! while workers are killed and frozen past their session and the broker
//! restarts under them.

use std::time::Duration;

use std::net::SocketAddr;

use firstcome_suite::client::Scrape;
use firstcome_suite::services::{PrivateKafka, free_port};
use firstcome_suite::{LoadOutcome, TestEnv};
use tokio_util::sync::CancellationToken;

/// A worker binary with the decision stream on, and its operations port.
fn streaming_worker(env: &TestEnv) -> (tokio::process::Child, SocketAddr) {
    let ops: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let child = env
        .worker_command()
        .arg("run")
        .env("FIRSTCOME_METRICS_LISTEN", ops.to_string())
        .env("FIRSTCOME_DECISION_STREAM", "true")
        .env("FIRSTCOME_TRANSACTION_TIMEOUT", "5000ms")
        .env("FIRSTCOME_SESSION_TIMEOUT", "6000ms")
        .env("FIRSTCOME_COMMIT_INTERVAL", "200ms")
        // Small batches: a kill lands between a store and its commit.
        .env("FIRSTCOME_MAX_BATCH", "13")
        .env("FIRSTCOME_PARTITION_BUFFER", "52")
        .spawn()
        .expect("the worker binary starts");
    (child, ops)
}

fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_stored_decision_is_streamed_once_in_order_through_kills_freezes_and_a_broker_restart()
 {
    let mut env = TestEnv::new().await;
    let mut kafka = PrivateKafka::start().await;
    env.use_broker(&kafka).await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupons: Vec<(String, i64)> = vec![
        (env.coupon_id("s1"), 150),
        (env.coupon_id("s2"), 40),
        (env.coupon_id("s3"), 400),
    ];
    for (id, stock) in &coupons {
        assert_eq!(client.create_coupon(id, *stock).await.0, 201);
    }
    let ids: Vec<&str> = coupons.iter().map(|(c, _)| c.as_str()).collect();
    let stop = CancellationToken::new();
    let load = firstcome_suite::spawn_open_load(
        &client,
        &coupons,
        // 80 requests a second from the eight senders.
        Duration::from_millis(100),
        |i| format!("u{}", (i * 7919) % 700),
        stop.clone(),
    );
    let started = tokio::time::Instant::now();
    let phase = |what: &str| eprintln!("stream test: {what} at {:?}", started.elapsed());
    let (mut a, _) = streaming_worker(&env);
    let (mut b, b_ops) = streaming_worker(&env);
    env.wait_decided(&ids, 150).await;
    phase("150 decided");

    // 1. A worker killed: its open transaction is aborted by the broker,
    // and its records are decided and streamed again by the other.
    a.kill().await.unwrap();
    let before = env.decided_count(&ids).await;
    env.wait_decided(&ids, before + 150).await;
    phase("150 more after the kill");
    let (mut a, a_ops) = streaming_worker(&env);

    // 2. A worker frozen past its session: the group moves on without it;
    // once thawed, its transaction carries a stale generation and aborts.
    signal(&b, "STOP");
    tokio::time::sleep(Duration::from_secs(9)).await;
    signal(&b, "CONT");
    let before = env.decided_count(&ids).await;
    env.wait_decided(&ids, before + 150).await;
    phase("150 more after the freeze");

    // 3. The broker restarted under both: transactions in flight abort.
    // Kafka 4.4, stopped while a transaction commits, was seen to record
    // the commit without writing its markers: a transaction nobody will
    // end, which holds every reader of its decision partitions and, with
    // its group offsets pending, the workers' own start on those
    // partitions (docs/decision-stream.md, "Kafka's hanging
    // transactions"). The workers report it; an operator on call, as the
    // runbook says, aborts what Kafka's find-hanging lists.
    kafka.stop(0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    kafka.restart(0).await;
    let restarted = tokio::time::Instant::now();
    let on_call = CancellationToken::new();
    let operator = tokio::spawn(firstcome_suite::on_call_operator(
        kafka.operator(),
        vec![a_ops, b_ops],
        on_call.clone(),
    ));
    let before = env.decided_count(&ids).await;
    env.wait_decided_for(&ids, before + 150, Duration::from_secs(180))
        .await;
    phase("150 more after the broker restart");
    // Demand past every coupon's stock before the load stops (the check
    // below asks it).
    env.wait_sold_out(&coupons, Duration::from_secs(120)).await;
    phase("every coupon sold out");

    stop.cancel();
    let seen: LoadOutcome = load.await.unwrap();
    firstcome_suite::check_promise_with(
        &env,
        &client,
        &coupons,
        &seen.accepted,
        &seen.unconfirmed,
        Duration::from_secs(120),
    )
    .await;
    phase("every accepted request decided");
    // The workers report a stall within the transaction timeout, 30 s and
    // one 5-s look after it started: every hang the restart left is seen
    // by now.
    tokio::time::sleep_until(restarted + Duration::from_secs(5 + 30 + 10)).await;
    on_call.cancel();
    let on_call = operator.await.unwrap();
    phase(&format!("the operator aborted {:?}", on_call.aborted));
    assert!(
        on_call.false_alarms.is_empty(),
        "the workers reported stalls Kafka did not confirm: {:?}",
        on_call.false_alarms
    );
    // Stopped cleanly, each commits what it stored.
    for w in [&a, &b] {
        signal(w, "TERM");
    }
    for w in [&mut a, &mut b] {
        let status = tokio::time::timeout(Duration::from_secs(60), w.wait())
            .await
            .expect("a worker stops within a minute")
            .unwrap();
        assert!(status.success(), "the worker stopped cleanly: {status}");
    }
    phase("workers stopped");
    // Nothing is left open that the workers did not report: with both
    // stopped, every open transaction is one Kafka lost.
    firstcome_suite::assert_no_transaction_left(kafka.operator()).await;
    let n = firstcome_suite::check_decision_stream(&env, &ids, Duration::from_secs(60)).await;
    phase("stream checked");
    eprintln!("{n} decisions streamed, each once and in order");
    assert!(n >= 600, "the sale made {n} decisions");
    ingress.stop().await;
}

/// The stall watch (docs/operations.md, "Decision stream hanging"): a
/// transaction held open on a decision partition far past the workers'
/// transaction timeout is reported in
/// `firstcome_worker_stream_stalled_partitions`, and the report goes once
/// it ends. The transaction here is a producer's of the test's own, with a
/// timeout of its own far above the worker's, as a lost one looks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_left_open_on_the_decision_topic_is_reported_until_it_ends() {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

    let env = TestEnv::new().await;
    let ops: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut worker = env
        .worker_command()
        .arg("run")
        .env("FIRSTCOME_METRICS_LISTEN", ops.to_string())
        .env("FIRSTCOME_DECISION_STREAM", "true")
        .env("FIRSTCOME_TRANSACTION_TIMEOUT", "1000ms")
        .spawn()
        .expect("the worker binary starts");
    let stalled = |at| async move {
        let mut tries = 0;
        loop {
            // The operations port opens once the worker has started.
            match reqwest::get(format!("http://{at}/metrics")).await {
                Ok(_) => {
                    break Scrape::of(at)
                        .await
                        .get("firstcome_worker_stream_stalled_partitions");
                }
                Err(_) if tries < 600 => tries += 1,
                Err(e) => panic!("the worker's operations port: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let open: ThreadedProducer<DefaultProducerContext> =
        firstcome::kafka::client_config(&env.common)
            .unwrap()
            .set("transactional.id", firstcome_suite::unique("left-open"))
            .set("transaction.timeout.ms", "180000")
            .create()
            .unwrap();
    open.init_transactions(Duration::from_secs(60)).unwrap();
    open.begin_transaction().unwrap();
    open.send(
        BaseRecord::to(&env.common.decision_topic)
            .key("left-open")
            .payload("{}"),
    )
    .map_err(|(e, _)| e)
    .unwrap();
    open.flush(Duration::from_secs(30)).unwrap();
    let opened = tokio::time::Instant::now();
    assert_eq!(stalled(ops).await, 0.0, "nothing stands still yet");

    // Reported past the worker's transaction timeout and 30 s, once looked at.
    loop {
        if stalled(ops).await >= 1.0 {
            break;
        }
        assert!(
            opened.elapsed() < Duration::from_secs(90),
            "a transaction open for 90 s was not reported"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let reported = opened.elapsed();
    assert!(
        reported >= Duration::from_secs(31),
        "reported after {reported:?}: a live transaction may last the timeout and the broker's sweep"
    );

    open.commit_transaction(Duration::from_secs(30)).unwrap();
    let ended = tokio::time::Instant::now();
    while stalled(ops).await != 0.0 {
        assert!(
            ended.elapsed() < Duration::from_secs(30),
            "still reported 30 s after the transaction ended"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    signal(&worker, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(60), worker.wait())
        .await
        .expect("the worker stops within a minute")
        .unwrap();
    assert!(status.success(), "the worker stopped cleanly: {status}");
}
