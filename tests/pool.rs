//! The Postgres pool every binary opens (`CommonConfig::connect_postgres`):
//! what a statement on it costs in round trips, and when a pooled
//! connection is checked before it is handed out.
//!
//! Postgres answers each `Sync` and each simple `Query` message once, so
//! those a client sends are its round trips: a proxy in front of Postgres
//! counts them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use firstcome::config::PING_AFTER_IDLE;
use firstcome_suite::{Proxy, TestEnv};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP proxy in front of Postgres that counts the round trips its clients
/// make (`Sync` and simple `Query` messages).
struct SyncCounter {
    addr: std::net::SocketAddr,
    syncs: Arc<AtomicUsize>,
}

impl SyncCounter {
    async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let syncs = Arc::new(AtomicUsize::new(0));
        let counted = syncs.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = tokio::net::TcpStream::connect(&target).await.unwrap();
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = upstream.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
                });
                let counted = counted.clone();
                tokio::spawn(async move {
                    // The startup message has a length and no type; every
                    // later one a type byte, then its length (itself
                    // included).
                    let mut pending: Vec<u8> = Vec::new();
                    let mut started = false;
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let Ok(n) = from_client.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 || to_server.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        pending.extend_from_slice(&buf[..n]);
                        loop {
                            let head = usize::from(started);
                            let Some(len) = pending.get(head..head + 4) else {
                                break;
                            };
                            let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
                            if pending.len() < head + len {
                                break;
                            }
                            if started && (pending[0] == b'S' || pending[0] == b'Q') {
                                counted.fetch_add(1, Ordering::SeqCst);
                            }
                            pending.drain(..head + len);
                            started = true;
                        }
                    }
                });
            }
        });
        Self { addr, syncs }
    }

    fn syncs(&self) -> usize {
        self.syncs.load(Ordering::SeqCst)
    }
}

/// Runs one statement and waits until its connection is back in the pool
/// (sqlx returns it, and checks it, in a task of its own).
async fn one_statement(pool: &PgPool) -> i32 {
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await
        .unwrap();
    while pool.num_idle() < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pid
}

/// A pool of one connection through `proxy`.
async fn pool_through(env: &TestEnv, proxy: std::net::SocketAddr) -> PgPool {
    let mut common = env.common.clone();
    common.pg_max_connections = 1;
    common.database_url = Proxy::rewrite_to(&env.common.database_url, proxy);
    common.connect_postgres().await.unwrap()
}

/// sqlx pings every pooled connection before it hands it out unless told
/// otherwise: a round trip more before every statement. A connection used
/// a moment ago is handed out as it is; sqlx's own check when it comes
/// back stays. Before, each statement cost three round trips.
#[tokio::test]
async fn a_statement_on_a_connection_used_a_moment_ago_costs_no_ping_before_it() {
    let env = TestEnv::new().await;
    let proxy = SyncCounter::start(Proxy::target_of(&env.common.database_url)).await;
    let pool = pool_through(&env, proxy.addr).await;
    let first = one_statement(&pool).await;
    let before = proxy.syncs();
    let runs = 20;
    for _ in 0..runs {
        assert_eq!(one_statement(&pool).await, first, "the one connection");
    }
    let per_statement = (proxy.syncs() - before) as f64 / runs as f64;
    assert_eq!(
        per_statement, 2.0,
        "round trips per statement: the statement and sqlx's check on its return"
    );
}

/// A connection idle for longer than `PING_AFTER_IDLE` is still checked
/// before it is handed out, so one Postgres closed meanwhile (a restart, a
/// `pg_terminate_backend`) is replaced and the statement does not see it.
#[tokio::test]
async fn a_connection_idle_past_the_limit_is_checked_and_a_dead_one_replaced() {
    let env = TestEnv::new().await;
    let proxy = SyncCounter::start(Proxy::target_of(&env.common.database_url)).await;
    let pool = pool_through(&env, proxy.addr).await;
    let first = one_statement(&pool).await;
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(terminated);
    tokio::time::sleep(PING_AFTER_IDLE + Duration::from_millis(200)).await;
    let second = one_statement(&pool).await;
    assert_ne!(second, first, "a new connection took the dead one's place");
}

/// A coupon's state built from Postgres (what each coupon costs on its
/// first sight in a worker) takes one transaction of two statements:
/// `BEGIN`, the epoch's `UPDATE`, one snapshot read, `COMMIT`, and sqlx's
/// check when the connection comes back. It was an `UPDATE` committed on its
/// own and a read-only transaction after it, more round trips (the test
/// fails on it).
#[tokio::test]
async fn building_a_coupons_state_takes_one_transaction() {
    let env = TestEnv::new().await;
    let proxy = SyncCounter::start(Proxy::target_of(&env.common.database_url)).await;
    let pool = pool_through(&env, proxy.addr).await;
    // Two coupons: the first build also prepares the statements, which a
    // worker does once.
    let ids: Vec<firstcome::CouponId> = ["first-sight-a", "first-sight-b"]
        .iter()
        .map(|n| firstcome::CouponId::parse(env.coupon_id(n)).unwrap())
        .collect();
    for id in &ids {
        sqlx::query("INSERT INTO coupon (coupon_id, name, total_stock) VALUES ($1, $1, 5)")
            .bind(id.as_str())
            .execute(&env.pool)
            .await
            .unwrap();
    }
    let build = |id| {
        let pool = pool.clone();
        async move {
            let snapshot = firstcome::db::rebuild_snapshot(&pool, id)
                .await
                .unwrap()
                .expect("the coupon exists");
            while pool.num_idle() < 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            snapshot
        }
    };
    build(&ids[0]).await;
    let before = proxy.syncs();
    let snapshot = build(&ids[1]).await;
    assert_eq!(snapshot.epoch, 1);
    assert_eq!(proxy.syncs() - before, 5, "round trips of one build");
}
