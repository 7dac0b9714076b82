//! The promise on Redis Cluster (the stack's three masters): coupons whose
//! state lives on different nodes, one of them moved to another node in the
//! middle of the burst (the client follows `ASK` and `MOVED`; a Lua call
//! caught between the two nodes gets `TRYAGAIN` and the worker retries it),
//! long polls woken through the cluster's pub/sub, and the decisions checked
//! against the log as everywhere else.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use firstcome_suite::{TestEnv, stack_env};
use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;

const REQUESTS: usize = 1_500;
const CLIENTS: usize = 32;

/// A master of the cluster: its node id, address and slot ranges.
#[derive(Debug, Clone)]
struct Master {
    id: String,
    port: u16,
    slots: Vec<(u16, u16)>,
}

async fn node(port: u16) -> MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| {
            panic!("redis cluster node {port}: {e}; is the local stack up? Run `scripts/stack up`")
        })
}

/// The masters, from `CLUSTER SLOTS` of the first seed node.
async fn masters() -> Vec<Master> {
    let url = stack_env()["REDIS_CLUSTER_URL"].clone();
    let first: u16 = url
        .split(',')
        .next()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut node(first).await)
        .await
        .unwrap();
    let mut by_id: HashMap<String, Master> = HashMap::new();
    for range in ranges {
        // [start, end, [ip, port, id, …] of the master, replicas…]
        let start: u16 = redis::from_redis_value_ref(&range[0]).unwrap();
        let end: u16 = redis::from_redis_value_ref(&range[1]).unwrap();
        let master: Vec<redis::Value> = redis::from_redis_value_ref(&range[2]).unwrap();
        let port: u16 = redis::from_redis_value_ref(&master[1]).unwrap();
        let id: String = redis::from_redis_value_ref(&master[2]).unwrap();
        by_id
            .entry(id.clone())
            .or_insert(Master {
                id,
                port,
                slots: Vec::new(),
            })
            .slots
            .push((start, end));
    }
    let mut all: Vec<Master> = by_id.into_values().collect();
    all.sort_by_key(|m| m.port);
    all
}

async fn slot_of(conn: &mut MultiplexedConnection, key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

/// Moves one slot, with its keys, from `from` to `to`, as `redis-cli
/// --cluster reshard` does: mark it importing and migrating, `MIGRATE` its
/// keys in small steps (meanwhile the source answers `ASK` for keys already
/// gone), then give it to `to` on every master (then `MOVED`).
async fn move_slot(slot: u16, from: &Master, to: &Master, all: &[Master]) {
    let mut src = node(from.port).await;
    let mut dst = node(to.port).await;
    let setslot = |state: &str, id: &str| {
        let mut c = redis::cmd("CLUSTER");
        c.arg("SETSLOT").arg(slot).arg(state).arg(id);
        c
    };
    setslot("IMPORTING", &from.id)
        .exec_async(&mut dst)
        .await
        .unwrap();
    setslot("MIGRATING", &to.id)
        .exec_async(&mut src)
        .await
        .unwrap();
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(2)
            .query_async(&mut src)
            .await
            .unwrap();
        if keys.is_empty() {
            break;
        }
        redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(to.port)
            .arg("")
            .arg(0)
            .arg(5_000)
            .arg("KEYS")
            .arg(&keys)
            .exec_async(&mut src)
            .await
            .unwrap();
        // Slowly, so the burst runs into the half-moved slot.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for m in std::iter::once(to).chain(all.iter().filter(|m| m.id != to.id)) {
        setslot("NODE", &to.id)
            .exec_async(&mut node(m.port).await)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_redis_cluster_the_promise_holds_while_a_coupons_slot_moves_between_nodes() {
    let mut env = TestEnv::new().await;
    env.use_redis_cluster();
    let all = masters().await;
    assert_eq!(
        all.len(),
        3,
        "the stack's cluster has three masters: {all:?}"
    );
    let owner = |slot: u16| {
        all.iter()
            .find(|m| m.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .expect("every slot is served")
            .clone()
    };

    // Three coupons whose state sits on three different masters.
    let mut probe = node(all[0].port).await;
    let mut coupons: Vec<(String, i64, u16)> = Vec::new();
    let mut taken = HashSet::new();
    for i in 0.. {
        let id = env.coupon_id(&format!("k{i}"));
        let slot = slot_of(&mut probe, &format!("{{{id}}}")).await;
        if taken.insert(owner(slot).id) {
            coupons.push((id, [40, 90, 150][coupons.len()], slot));
        }
        if coupons.len() == 3 {
            break;
        }
    }

    let ingress = env.spawn_ingress().await;
    let workers = [env.spawn_worker().await, env.spawn_worker().await];
    let client = env.client(&ingress);
    for (id, stock, _) in &coupons {
        assert_eq!(client.create_coupon(id, *stock).await.0, 201);
    }
    let (code, ready) = client.get("/readyz").await;
    assert_eq!(code, 200, "the ingress is ready on the cluster: {ready}");
    for w in &workers {
        let ready = reqwest::get(format!("http://{}/readyz", w.metrics))
            .await
            .unwrap();
        assert_eq!(ready.status(), 200, "the worker is ready on the cluster");
    }

    // One long poll, woken through the cluster's pub/sub.
    let (code, first) = client.issue(&coupons[0].0, "early").await;
    assert_eq!(code, 202, "{first}");
    let first_id = first["request_id"].as_str().unwrap().to_owned();
    let waited = client
        .get(&format!("/v1/issue-requests/{first_id}?wait_ms=10000"))
        .await;
    assert_eq!(
        (waited.0, waited.1["status"].as_str()),
        (200, Some("issued")),
        "{waited:?}"
    );

    // The burst: users drawn from a small pool, so many ask twice.
    let work: Arc<Vec<(String, String)>> = Arc::new(
        (0..REQUESTS)
            .map(|i| {
                let (id, _, _) = &coupons[i % 3];
                (id.clone(), format!("u{}", (i * 7919) % 400))
            })
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(Mutex::new(vec![first_id]));
    let mut senders = Vec::new();
    for _ in 0..CLIENTS {
        let (client, work, next, accepted) =
            (client.clone(), work.clone(), next.clone(), accepted.clone());
        senders.push(tokio::spawn(async move {
            while let Some((coupon, user)) = work.get(next.fetch_add(1, Ordering::Relaxed)) {
                let (code, body) = client.issue(coupon, user).await;
                assert_eq!(code, 202, "{body}");
                let id = body["request_id"].as_str().unwrap().to_owned();
                accepted.lock().await.push(id);
            }
        }));
    }

    // Mid-burst, the busiest coupon's slot moves to another master.
    while next.load(Ordering::Relaxed) < REQUESTS / 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (_, _, slot) = coupons[2];
    let from = owner(slot);
    let to = all.iter().find(|m| m.id != from.id).unwrap().clone();
    move_slot(slot, &from, &to, &all).await;
    let sent_when_moved = next.load(Ordering::Relaxed);
    eprintln!(
        "slot {slot} moved from {} to {} while request {sent_when_moved} of {REQUESTS} was sent",
        from.port, to.port
    );
    assert!(
        sent_when_moved < REQUESTS,
        "the move ended after the burst; it tests nothing"
    );
    for s in senders {
        s.await.unwrap();
    }

    // The coupon's keys are on the new master now, and only there.
    let count = |port: u16| async move {
        redis::cmd("CLUSTER")
            .arg("COUNTKEYSINSLOT")
            .arg(slot)
            .query_async::<i64>(&mut node(port).await)
            .await
            .unwrap()
    };
    assert!(
        count(to.port).await > 0,
        "the slot's keys moved to {}",
        to.port
    );
    assert_eq!(
        count(from.port).await,
        0,
        "no key of the slot left on {}",
        from.port
    );

    let accepted: HashSet<String> = accepted.lock().await.iter().cloned().collect();
    assert_eq!(accepted.len(), REQUESTS + 1);
    let stocks: Vec<(String, i64)> = coupons.iter().map(|(id, s, _)| (id.clone(), *s)).collect();
    firstcome_suite::check_promise(&env, &client, &stocks, &accepted, Duration::from_secs(180))
        .await;

    for w in workers {
        w.stop().await;
    }
    ingress.stop().await;
}
