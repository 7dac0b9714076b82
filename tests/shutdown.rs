//! SIGTERM to both binaries under load: the ingress stops accepting, answers
//! what it took in and flushes; the worker finishes or gives back its
//! batches and commits. Nothing that got a 202 is lost, nothing is decided
//! half-way.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use firstcome_suite::services::signal;
use firstcome_suite::{Client, TestEnv};
use serde_json::json;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

/// Longest either binary may take to exit after SIGTERM in this test.
const SHUTDOWN_TIMEOUT_MS: u64 = 5_000;

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn start_ingress(env: &TestEnv, addr: SocketAddr) -> Child {
    let child = env
        .ingress_command(addr)
        .env(
            "FIRSTCOME_SHUTDOWN_TIMEOUT",
            format!("{SHUTDOWN_TIMEOUT_MS}ms"),
        )
        .spawn()
        .expect("the ingress binary starts");
    firstcome_suite::wait_listening(addr).await;
    child
}

fn start_worker(env: &TestEnv) -> Child {
    env.worker_command()
        .arg("run")
        .env("FIRSTCOME_SESSION_TIMEOUT", "6000ms")
        .env("FIRSTCOME_MAX_BATCH", "11")
        .env(
            "FIRSTCOME_SHUTDOWN_TIMEOUT",
            format!("{SHUTDOWN_TIMEOUT_MS}ms"),
        )
        .spawn()
        .expect("the worker binary starts")
}

/// SIGTERM, then the process must exit cleanly within the shutdown timeout
/// (plus a margin for the process itself).
async fn terminate(child: &mut Child, what: &str) -> Duration {
    let since = tokio::time::Instant::now();
    signal(child.id().unwrap(), "TERM");
    let limit = Duration::from_millis(SHUTDOWN_TIMEOUT_MS + 3_000);
    let status = tokio::time::timeout(limit, child.wait())
        .await
        .unwrap_or_else(|_| panic!("{what} still running {limit:?} after SIGTERM"))
        .unwrap();
    assert!(status.success(), "{what} exited with {status}");
    since.elapsed()
}

#[derive(Default)]
struct Seen {
    accepted: HashSet<String>,
    unconfirmed: HashSet<String>,
    /// Requests the ingress did not take (refused or closed connections).
    unreachable: usize,
}

/// Clients that keep issuing while the ingress comes and goes: a request the
/// ingress did not take is counted and the next one sent later, anything
/// answered is recorded.
fn spawn_load(
    client: &Client,
    coupons: &[(String, i64)],
    stop: CancellationToken,
) -> (Arc<Mutex<Seen>>, Vec<tokio::task::JoinHandle<()>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks = (0..8)
        .map(|_| {
            let (client, coupons, seen, next, stop) = (
                client.clone(),
                coupons.to_vec(),
                seen.clone(),
                next.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let coupon = &coupons[i % coupons.len()].0;
                    let sent = client
                        .http
                        .post(format!("{}/v1/coupons/{coupon}/issue", client.base))
                        .json(&json!({ "user_id": format!("t{}", (i * 17) % 220) }))
                        .send()
                        .await;
                    match sent {
                        // Refused, or an idle connection closed by the
                        // stopping server as the request went out: not read,
                        // so not written (a request written without an answer
                        // would show up in the log as a stranger).
                        Err(e) if e.is_connect() || e.is_request() => {
                            seen.lock().unwrap().unreachable += 1;
                        }
                        Err(e) => panic!("request {i}: {e}"),
                        Ok(r) => {
                            let (code, body) = firstcome_suite::split(r).await;
                            let id = body["request_id"].as_str().map(str::to_owned);
                            let mut seen = seen.lock().unwrap();
                            match code {
                                202 => seen.accepted.insert(id.unwrap()),
                                503 => seen.unconfirmed.insert(id.unwrap()),
                                _ => panic!("request {i}: {code} {body}"),
                            };
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            })
        })
        .collect();
    (seen, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_to_both_binaries_under_load_loses_no_202_and_leaves_no_decision_half_made() {
    let env = TestEnv::new().await;
    let addr = free_addr();
    let mut ingress = start_ingress(&env, addr).await;
    let client = env.client_at(addr);
    let coupons: Vec<(String, i64)> = vec![(env.coupon_id("t1"), 50), (env.coupon_id("t2"), 80)];
    for (id, stock) in &coupons {
        assert_eq!(client.create_coupon(id, *stock).await.0, 201);
    }
    let ids: Vec<&str> = coupons.iter().map(|(c, _)| c.as_str()).collect();
    let mut worker = start_worker(&env);
    let stop = CancellationToken::new();
    let (seen, tasks) = spawn_load(&client, &coupons, stop.clone());

    env.wait_decided(&ids, 80).await;
    let took = terminate(&mut worker, "the worker").await;
    eprintln!("worker stopped {took:?} after SIGTERM");
    worker = start_worker(&env);
    env.wait_decided(&ids, 200).await;
    let took = terminate(&mut ingress, "the ingress").await;
    eprintln!("ingress stopped {took:?} after SIGTERM");
    tokio::time::sleep(Duration::from_secs(1)).await;
    ingress = start_ingress(&env, addr).await;
    env.wait_decided(&ids, 350).await;
    stop.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!(
        "accepted {}, unconfirmed {}, refused connections {}",
        seen.accepted.len(),
        seen.unconfirmed.len(),
        seen.unreachable
    );
    assert!(seen.unreachable > 0, "the load never saw the ingress gone");

    firstcome_suite::check_promise_with(
        &env,
        &client,
        &coupons,
        &seen.accepted,
        &seen.unconfirmed,
        Duration::from_secs(120),
    )
    .await;
    // Redis and Postgres agree on every coupon: nothing decided half-way.
    let (code, table) = env.reconcile(&ids).await;
    assert_eq!(code, 0, "{table}");
    terminate(&mut worker, "the worker").await;
    terminate(&mut ingress, "the ingress").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_worker_finish_the_batch_in_hand_before_it_exits() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("in-hand");
    assert_eq!(client.create_coupon(&coupon, 3).await.0, 201);
    // Storing the coupon's decisions takes two seconds.
    env.slow_ledger_writes(&coupon, 2.0).await;
    let mut worker = start_worker(&env);
    let (code, body) = client.issue(&coupon, "ann").await;
    assert_eq!(code, 202, "{body}");
    let id: uuid::Uuid = body["request_id"].as_str().unwrap().parse().unwrap();

    // Decided in Redis: the batch is in hand, being stored.
    let keys = env
        .common
        .keys()
        .unwrap()
        .coupon(&firstcome::CouponId::parse(&coupon).unwrap());
    let mut redis = env.redis().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while firstcome::state::counters(&mut redis, &keys)
        .await
        .unwrap()
        .map(|c| c.issued)
        != Some(1)
    {
        assert!(tokio::time::Instant::now() < deadline, "never decided");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    terminate(&mut worker, "worker").await;

    // No other worker ran: the row is there because the stopping one
    // finished its batch.
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM request_ledger WHERE request_id = $1")
            .bind(id)
            .fetch_optional(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        status.as_deref(),
        Some("issued"),
        "the batch in hand was dropped at SIGTERM"
    );
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_while_it_joins_leaves_the_group_cleanly_every_time() {
    // librdkafka aborts, or hangs, when a consumer is closed while an
    // assignment is still in progress (its issues 4527 and 4792): a worker
    // stopped while it joined its group tripped it now and then. Each round
    // stops one at another moment of its first join, the first rounds
    // before it is assigned anything.
    for round in 0..24u64 {
        // A new topic and group each round: a first join, as in production.
        let env = TestEnv::new().await;
        let worker = env.spawn_worker().await;
        tokio::time::sleep(Duration::from_millis(round * 20)).await;
        worker.stop().await;
    }
}
