//! The promise, under concurrency and consumer-group churn: for each coupon
//! the issued users are exactly the first `stock` distinct users in that
//! coupon's log order, nobody holds a coupon twice, the counters add up, and
//! every accepted request reaches a final status, once.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use firstcome_suite::TestEnv;
use rand::{RngExt, SeedableRng};
use tokio::sync::Mutex;

const CLIENTS: usize = 64;
const REQUESTS: usize = 3_000;
const USERS_PER_COUPON: u64 = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issued_users_are_exactly_the_first_stock_distinct_users_in_log_order() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let stocks = [("a", 50i64), ("b", 120), ("c", 200)];
    let coupons: Vec<(String, i64)> = stocks.iter().map(|(n, s)| (env.coupon_id(n), *s)).collect();
    for (id, stock) in &coupons {
        assert_eq!(client.create_coupon(id, *stock).await.0, 201);
    }

    // The work: 3,000 (coupon, user) pairs, users drawn from a small pool per
    // coupon so most users ask several times.
    // Seeded, so a failure can be replayed.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_cafe_f00d);
    let work: Vec<(String, String)> = (0..REQUESTS)
        .map(|_| {
            let (id, _) = &coupons[rng.random_range(0..coupons.len())];
            let user = format!("u{}", rng.random_range(0..USERS_PER_COUPON));
            (id.clone(), user)
        })
        .collect();
    let work = Arc::new(work);
    let next = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));

    let started = tokio::time::Instant::now();
    let worker_a = env.spawn_worker().await;
    worker_a
        .wait_assignment("every partition", |a| {
            a.len() == firstcome_suite::PARTITIONS as usize
        })
        .await;
    eprintln!(
        "the first worker joined a new group and owned every partition after {:?}",
        started.elapsed()
    );
    let mut worker_b = None;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (client, work, next, accepted) =
            (client.clone(), work.clone(), next.clone(), accepted.clone());
        clients.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((coupon, user)) = work.get(i) else {
                    break;
                };
                let (code, body) = client.issue(coupon, user).await;
                assert_eq!(code, 202, "request {i}: {body}");
                accepted
                    .lock()
                    .await
                    .push(body["request_id"].as_str().unwrap().to_owned());
            }
        }));
    }
    // Churn the consumer group while requests flow: a second worker joins at
    // a third of the load, and the first leaves at half of it, whether or
    // not the join has finished by then (a member leaving mid-join); the
    // second must end up with every partition.
    while next.load(Ordering::Relaxed) < REQUESTS / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let joining = tokio::time::Instant::now();
    let b = env.spawn_worker().await;
    // How long the join takes, watched aside so the churn does not wait.
    let mut share = b.assignment.clone().expect("a worker");
    let joined = tokio::spawn(async move {
        let _ = share.wait_for(|a| !a.is_empty()).await;
        joining.elapsed()
    });
    while next.load(Ordering::Relaxed) < REQUESTS / 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    worker_a.stop().await;
    let left = tokio::time::Instant::now();
    b.wait_assignment("every partition", |a| {
        a.len() == firstcome_suite::PARTITIONS as usize
    })
    .await;
    eprintln!(
        "the second worker got a share {:?} after it started, and owned every partition {:?} \
         after the first left",
        joined.await.unwrap(),
        left.elapsed()
    );
    worker_b.replace(b);
    for c in clients {
        c.await.unwrap();
    }
    let accepted: HashSet<String> = accepted.lock().await.iter().cloned().collect();
    assert_eq!(
        accepted.len(),
        REQUESTS,
        "every request was accepted once, with its own id"
    );

    firstcome_suite::check_promise(&env, &client, &coupons, &accepted, Duration::from_secs(180))
        .await;
    worker_b.unwrap().stop().await;
    ingress.stop().await;
}
