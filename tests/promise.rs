//! The promise, under concurrency and consumer-group churn: for each coupon
//! the issued users are exactly the first `stock` distinct users in that
//! coupon's log order, nobody holds a coupon twice, the counters add up, and
//! every accepted request reaches a final status, once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use firstcome::IssueRequest;
use firstcome_suite::TestEnv;
use tokio::sync::Mutex;

const CLIENTS: usize = 64;
const REQUESTS: usize = 3_000;
const USERS_PER_COUPON: u64 = 400;

/// A small deterministic generator, so a failure can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

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
    let mut rng = XorShift(0x5eed_cafe_f00d);
    let work: Vec<(String, String)> = (0..REQUESTS)
        .map(|_| {
            let (id, _) = &coupons[(rng.next() % coupons.len() as u64) as usize];
            let user = format!("u{}", rng.next() % USERS_PER_COUPON);
            (id.clone(), user)
        })
        .collect();
    let work = Arc::new(work);
    let next = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));

    let worker_a = env.spawn_worker().await;
    worker_a
        .wait_assignment("every partition", |a| {
            a.len() == firstcome_suite::PARTITIONS as usize
        })
        .await;
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
    // a third of the load and takes over some partitions, then the first
    // leaves and the second takes all. (Each change waits for the group to
    // settle: nisshi 0.6 keeps a member that leaves in the middle of a join
    // as the group's leader for good, which no real broker does.)
    while next.load(Ordering::Relaxed) < REQUESTS / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b = env.spawn_worker().await;
    b.wait_assignment("a share", |a| !a.is_empty()).await;
    worker_a
        .wait_assignment("the rest", |a| {
            a.len() < firstcome_suite::PARTITIONS as usize
        })
        .await;
    worker_a.stop().await;
    b.wait_assignment("every partition", |a| {
        a.len() == firstcome_suite::PARTITIONS as usize
    })
    .await;
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

    // Every accepted request reaches a final status.
    let ids: Vec<&str> = coupons.iter().map(|(c, _)| c.as_str()).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let decided: i64 =
            sqlx::query_scalar("SELECT count(*) FROM request_ledger WHERE coupon_id = ANY($1)")
                .bind(&ids)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        if decided as usize == REQUESTS {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {decided} of {REQUESTS} decided"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let ledger: Vec<(uuid::Uuid, String, String, String, i32, i64)> = sqlx::query_as(
        "SELECT request_id, coupon_id, user_id, status, kafka_partition, kafka_offset
         FROM request_ledger WHERE coupon_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let decided: HashMap<String, String> = ledger
        .iter()
        .map(|(id, _, _, status, _, _)| (id.to_string(), status.clone()))
        .collect();
    assert_eq!(decided.keys().cloned().collect::<HashSet<_>>(), accepted);

    // Replay the log: the expected decision of every record, in log order.
    let log = env.read_request_log();
    assert_eq!(
        log.len(),
        REQUESTS,
        "the log holds each accepted request once"
    );
    let mut expected: HashMap<String, &'static str> = HashMap::new();
    let mut per_coupon: HashMap<String, (HashSet<i32>, Vec<String>)> = HashMap::new();
    for rec in &log {
        let r = IssueRequest::from_json(rec.payload.as_ref().unwrap()).unwrap();
        let entry = per_coupon.entry(r.coupon_id.to_string()).or_default();
        entry.0.insert(rec.partition);
        entry.1.push(r.user_id.to_string());
        expected.insert(r.request_id.to_string(), "");
    }
    for (coupon, stock) in &coupons {
        let (partitions, _) = &per_coupon[coupon];
        assert_eq!(partitions.len(), 1, "all of {coupon} sits in one partition");
        let mut holders: HashSet<String> = HashSet::new();
        let mut first_distinct: Vec<String> = Vec::new();
        for rec in log.iter() {
            let r = IssueRequest::from_json(rec.payload.as_ref().unwrap()).unwrap();
            if r.coupon_id.as_str() != coupon {
                continue;
            }
            let user = r.user_id.to_string();
            let want = if holders.contains(&user) {
                "duplicate"
            } else if (holders.len() as i64) < *stock {
                holders.insert(user.clone());
                first_distinct.push(user);
                "issued"
            } else {
                "sold_out"
            };
            expected.insert(r.request_id.to_string(), want);
        }
        assert_eq!(
            first_distinct.len() as i64,
            *stock,
            "demand exceeds the stock of {coupon}"
        );

        // The issued users in Postgres are exactly the first `stock` distinct users.
        let issued: Vec<String> =
            sqlx::query_scalar("SELECT user_id FROM user_coupon WHERE coupon_id = $1")
                .bind(coupon)
                .fetch_all(&env.pool)
                .await
                .unwrap();
        let issued_set: HashSet<String> = issued.iter().cloned().collect();
        assert_eq!(
            issued.len(),
            issued_set.len(),
            "nobody holds {coupon} twice"
        );
        assert_eq!(
            issued_set,
            first_distinct.iter().cloned().collect(),
            "winners of {coupon}"
        );

        let (code, view) = client.get(&format!("/v1/coupons/{coupon}")).await;
        assert_eq!(code, 200);
        let (remaining, count) = (
            view["remaining_stock"].as_i64().unwrap(),
            view["issued_count"].as_i64().unwrap(),
        );
        assert_eq!((remaining, count), (0, *stock), "{view}");
        assert_eq!(remaining + count, view["total_stock"].as_i64().unwrap());
    }
    // Every request got exactly the decision its place in the log implies.
    let mismatches: Vec<_> = expected
        .iter()
        .filter(|(id, want)| decided.get(*id).map(String::as_str) != Some(**want))
        .take(5)
        .collect();
    assert!(
        mismatches.is_empty(),
        "decisions differ from log order, e.g. {mismatches:?}"
    );
    // The ledger records where each request sat in the log.
    let positions: HashMap<String, (i32, i64)> = log
        .iter()
        .map(|rec| {
            let r = IssueRequest::from_json(rec.payload.as_ref().unwrap()).unwrap();
            (r.request_id.to_string(), (rec.partition, rec.offset))
        })
        .collect();
    for (id, _, _, _, partition, offset) in &ledger {
        assert_eq!(positions[&id.to_string()], (*partition, *offset));
    }

    // A sample through the API agrees with the ledger.
    for id in accepted.iter().take(20) {
        let (code, status) = client.get(&format!("/v1/issue-requests/{id}")).await;
        assert_eq!(code, 200);
        assert_eq!(status["status"], decided[id].as_str());
    }
    worker_b.unwrap().stop().await;
    ingress.stop().await;
}
