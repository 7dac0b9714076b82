//! The seeded random-fault soak, in the manner of Jepsen's nemesis: load
//! through HTTP from many clients to two ingresses and three workers, while
//! a nemesis driven by a seed kills, freezes and restarts every part of the
//! system, deletes coupon keys, rebuilds Redis and makes admin changes.
//! Then it heals everything, waits until every record is final, and checks
//! the promise against the log, admin changes included.
//!
//! `scripts/soak --minutes N --seed S` runs it longer; CI runs it for
//! `FIRSTCOME_SOAK_SECONDS` (90) with seed 1. A failing run prints its seed;
//! the same seed gives the same schedule of faults (kinds, targets, pauses).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use firstcome_suite::services::{PrivateKafka, PrivatePostgres, PrivateRedis, signal};
use firstcome_suite::{TestEnv, split};
use serde_json::{Value, json};
use tokio::process::Child;
use tokio::time::Instant;

/// splitmix64: small, and the same sequence for a seed everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

/// What the nemesis does, one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// `SIGKILL` to a worker, restarted a moment later.
    KillWorker,
    /// `SIGSTOP` to a worker past its session timeout: the group moves on
    /// and the thawed worker is a zombie for a while.
    FreezeWorker,
    /// `SIGKILL` to an ingress, restarted.
    KillIngress,
    /// The broker frozen, then thawed.
    FreezeBroker,
    /// The broker `kill -9`, restarted on its log.
    KillBroker,
    /// Redis `kill -9`, restarted on its AOF (losing up to its last second).
    KillRedis,
    /// One key of a coupon's state deleted, or all of them.
    DeleteCouponKeys,
    /// Postgres stopped in immediate mode, started again.
    RestartPostgres,
    /// `firstcome-worker redis rebuild` of a coupon.
    RedisRebuild,
    /// More stock, sent twice with one idempotency key.
    AddStock,
    /// The coupon closed.
    Close,
    /// The coupon reopened without an end.
    Reopen,
    /// Two faults at once: Redis goes back to an older copy of a coupon's
    /// state and of the request statuses (DUMP, then RESTORE), and a worker
    /// is killed before it commits what it decided meanwhile.
    RollbackRedisAndKillWorker,
    /// Redis goes back to an older copy while the workers are behind (they
    /// were frozen, a backlog built up, and they were thawed).
    RollbackRedisDuringBacklog,
}

const FAULTS: [Fault; 14] = [
    Fault::KillWorker,
    Fault::FreezeWorker,
    Fault::KillIngress,
    Fault::FreezeBroker,
    Fault::KillBroker,
    Fault::KillRedis,
    Fault::DeleteCouponKeys,
    Fault::RestartPostgres,
    Fault::RedisRebuild,
    Fault::AddStock,
    Fault::Close,
    Fault::Reopen,
    Fault::RollbackRedisAndKillWorker,
    Fault::RollbackRedisDuringBacklog,
];

/// The workers' session timeout; a frozen worker stays frozen past it.
const SESSION_TIMEOUT_MS: u64 = 6_000;
const COUPONS: [(&str, i64); 4] = [("a", 40), ("b", 90), ("c", 150), ("d", 300)];
const CLIENTS: usize = 8;

/// What the clients saw.
#[derive(Default)]
struct Seen {
    /// `202`: must be in the log and decided.
    accepted: HashSet<String>,
    /// `503` naming a request: may or may not be in the log.
    unconfirmed: HashSet<String>,
    /// (coupon, user) of requests whose answer was lost (the ingress died):
    /// may be in the log under an id the client never learnt.
    unanswered: HashSet<(String, String)>,
    /// Answers by status code.
    codes: BTreeMap<u16, usize>,
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
        .unwrap_or(default)
}

fn free_addr() -> SocketAddr {
    let port = firstcome_suite::services::free_port();
    SocketAddr::from(([127, 0, 0, 1], port))
}

struct System {
    env: TestEnv,
    ingresses: Vec<(SocketAddr, Child)>,
    workers: Vec<Child>,
    /// Each worker's operations port (its slot keeps it across restarts).
    ops: Vec<SocketAddr>,
}

impl System {
    fn start_ingress(env: &TestEnv, addr: SocketAddr) -> Child {
        env.ingress_command(addr)
            .env("FIRSTCOME_PRODUCE_TIMEOUT", "5000ms")
            .env("FIRSTCOME_SHUTDOWN_TIMEOUT", "2000ms")
            .spawn()
            .expect("the ingress binary starts")
    }

    fn start_worker(env: &TestEnv, ops: SocketAddr) -> Child {
        env.worker_command()
            .arg("run")
            .env("FIRSTCOME_METRICS_LISTEN", ops.to_string())
            .env("FIRSTCOME_DECISION_STREAM", "true")
            .env("FIRSTCOME_TRANSACTION_TIMEOUT", "5000ms")
            .env(
                "FIRSTCOME_SESSION_TIMEOUT",
                format!("{SESSION_TIMEOUT_MS}ms"),
            )
            .env("FIRSTCOME_COMMIT_INTERVAL", "200ms")
            .env("FIRSTCOME_MAX_BATCH", "16")
            .env("FIRSTCOME_PARTITION_BUFFER", "64")
            .env("FIRSTCOME_SHUTDOWN_TIMEOUT", "2000ms")
            // A closed coupon's state leaves Redis 3 s later, while the
            // nemesis may reopen it and late records still arrive (the
            // soak's Postgres is its own, so the sweep sees only its
            // coupons).
            .env("FIRSTCOME_RETIRE_AFTER", "3s")
            .env("FIRSTCOME_RETIRE_INTERVAL", "1000ms")
            .spawn()
            .expect("the worker binary starts")
    }

    async fn restart_ingress(&mut self, i: usize) {
        let addr = self.ingresses[i].0;
        self.ingresses[i].1 = Self::start_ingress(&self.env, addr);
        firstcome_suite::wait_listening(addr).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seeded_nemesis_never_breaks_the_promise() {
    let seed = env_or("FIRSTCOME_SOAK_SEED", 1);
    let seconds = env_or("FIRSTCOME_SOAK_SECONDS", 90);
    eprintln!(
        "soak: seed {seed}, {seconds} s of faults; the same run: \
         scripts/soak --seed {seed} --minutes {:.1}",
        seconds as f64 / 60.0
    );
    let mut rng = Rng(seed);

    let mut env = TestEnv::new().await;
    let mut kafka = PrivateKafka::start().await;
    env.use_broker(&kafka).await;
    let mut redis = PrivateRedis::start().await;
    env.use_redis(redis.url());
    let pg = PrivatePostgres::start().await;
    env.use_postgres(pg.url()).await;

    let ingresses: Vec<(SocketAddr, Child)> = (0..2)
        .map(|_| {
            let addr = free_addr();
            (addr, System::start_ingress(&env, addr))
        })
        .collect();
    for (addr, _) in &ingresses {
        firstcome_suite::wait_listening(*addr).await;
    }
    let ops: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let workers = ops.iter().map(|o| System::start_worker(&env, *o)).collect();
    let mut sys = System {
        env,
        ingresses,
        workers,
        ops,
    };
    // Kafka, stopped while a transaction commits, can leave it open for
    // good and hold the decision stream (docs/decision-stream.md, "Kafka's
    // hanging transactions"); the workers report it and an operator on call
    // aborts it, as the runbook says.
    let on_call = tokio_util::sync::CancellationToken::new();
    let operator = tokio::spawn(firstcome_suite::on_call_operator(
        kafka.operator(),
        sys.ops.clone(),
        on_call.clone(),
    ));
    let addrs: Vec<SocketAddr> = sys.ingresses.iter().map(|(a, _)| *a).collect();
    let client = sys.env.client_at(addrs[0]);
    let coupons: Vec<(String, i64)> = COUPONS
        .iter()
        .map(|(name, stock)| (sys.env.coupon_id(name), *stock))
        .collect();
    for (id, stock) in &coupons {
        assert_eq!(client.create_coupon(id, *stock).await.0, 201);
    }

    // The load: clients round the ingresses, users from a pool so many ask
    // twice, until told to stop.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (http, seen, stop, coupons, addrs) = (
            http.clone(),
            seen.clone(),
            stop.clone(),
            coupons.clone(),
            addrs.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut i = c;
            while !stop.is_cancelled() {
                let (coupon, _) = &coupons[i % coupons.len()];
                let user = format!("u{}", (i * 7919) % 900);
                let addr = addrs[i % addrs.len()];
                i += CLIENTS;
                let sent = http
                    .post(format!("http://{addr}/v1/coupons/{coupon}/issue"))
                    .json(&json!({ "user_id": user }))
                    .send()
                    .await;
                let answer = match sent {
                    Ok(r) => Some(split(r).await),
                    Err(_) => None,
                };
                {
                    let mut seen = seen.lock().unwrap();
                    match answer {
                        Some((code, body)) => {
                            *seen.codes.entry(code).or_default() += 1;
                            let id = body["request_id"].as_str().map(str::to_owned);
                            match (code, id) {
                                (202, Some(id)) => {
                                    seen.accepted.insert(id);
                                }
                                (503, Some(id)) => {
                                    seen.unconfirmed.insert(id);
                                }
                                (202, None) => panic!("202 without a request id: {body}"),
                                // Refused before the log, or an unreachable
                                // dependency before anything was written.
                                (409 | 503, None) => {}
                                _ => panic!("unexpected answer {code}: {body}"),
                            }
                        }
                        None => {
                            seen.unanswered.insert((coupon.clone(), user));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }

    // The nemesis.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut injected: BTreeMap<Fault, usize> = BTreeMap::new();
    while Instant::now() < deadline {
        tokio::time::sleep(rng.ms(300, 2_500)).await;
        let fault = FAULTS[rng.below(FAULTS.len())];
        let detail = inject(
            &mut sys, &mut kafka, &mut redis, &pg, &mut rng, fault, &coupons,
        )
        .await;
        *injected.entry(fault).or_default() += 1;
        eprintln!(
            "soak {:>6.1}s: {fault:?} {detail}",
            started.elapsed().as_secs_f64()
        );
    }

    // Heal: every part runs, and the load stops.
    for i in 0..sys.workers.len() {
        let id = sys.workers[i].id();
        if let Some(pid) = id {
            signal(pid, "CONT");
        }
    }
    stop.cancel();
    for c in clients {
        c.await.unwrap();
    }
    eprintln!("soak: faults injected {injected:?}");
    let seen = Arc::try_unwrap(seen).ok().unwrap().into_inner().unwrap();
    eprintln!(
        "soak: answers {:?}; {} accepted, {} unconfirmed, {} unanswered",
        seen.codes,
        seen.accepted.len(),
        seen.unconfirmed.len(),
        seen.unanswered.len()
    );
    check(&sys.env, &client, &coupons, &seen).await;
    // The decision stream: every stored decision once, in its coupon's
    // order, and nothing the ledger does not hold. A transaction Kafka left
    // hanging holds its readers until the operator has aborted it: the
    // workers report it within 45 s.
    let ids: Vec<&str> = coupons.iter().map(|(c, _)| c.as_str()).collect();
    let streamed =
        firstcome_suite::check_decision_stream(&sys.env, &ids, Duration::from_secs(180)).await;
    on_call.cancel();
    let done = operator.await.unwrap();
    eprintln!(
        "soak: {streamed} decisions streamed, each once and in order; \
         the operator aborted {} hanging transactions",
        done.aborted.len()
    );
    assert!(
        done.false_alarms.is_empty(),
        "the workers reported stalls Kafka did not confirm: {:?}",
        done.false_alarms
    );
    // Stopped cleanly, each worker commits what it stored; then every open
    // transaction is one Kafka lost that no worker reported.
    for w in &sys.workers {
        signal(w.id().expect("running"), "TERM");
    }
    for w in &mut sys.workers {
        let status = tokio::time::timeout(Duration::from_secs(60), w.wait())
            .await
            .expect("a worker stops within a minute")
            .unwrap();
        assert!(status.success(), "the worker stopped cleanly: {status}");
    }
    firstcome_suite::assert_no_transaction_left(kafka.operator()).await;
    eprintln!("soak: seed {seed}: the promise held");

    for (_, mut c) in sys.ingresses {
        let _ = c.kill().await;
    }
    drop(kafka);
}

/// Injects one fault and heals it before returning; says what it did.
async fn inject(
    sys: &mut System,
    kafka: &mut PrivateKafka,
    redis: &mut PrivateRedis,
    pg: &PrivatePostgres,
    rng: &mut Rng,
    fault: Fault,
    coupons: &[(String, i64)],
) -> String {
    let coupon = coupons[rng.below(coupons.len())].0.clone();
    let ingress = rng.below(sys.ingresses.len());
    let at = sys.ingresses[ingress].0;
    match fault {
        Fault::KillWorker => {
            let w = rng.below(sys.workers.len());
            let down = rng.ms(200, 3_000);
            sys.workers[w].kill().await.unwrap();
            tokio::time::sleep(down).await;
            sys.workers[w] = System::start_worker(&sys.env, sys.ops[w]);
            format!("worker {w}, down {down:?}")
        }
        Fault::FreezeWorker => {
            let w = rng.below(sys.workers.len());
            let frozen = rng.ms(SESSION_TIMEOUT_MS + 500, SESSION_TIMEOUT_MS + 4_000);
            let pid = sys.workers[w].id().unwrap();
            signal(pid, "STOP");
            tokio::time::sleep(frozen).await;
            signal(pid, "CONT");
            format!("worker {w}, frozen {frozen:?}")
        }
        Fault::KillIngress => {
            sys.ingresses[ingress].1.kill().await.unwrap();
            let down = rng.ms(100, 2_000);
            tokio::time::sleep(down).await;
            sys.restart_ingress(ingress).await;
            format!("ingress {ingress}, down {down:?}")
        }
        Fault::FreezeBroker => {
            let frozen = rng.ms(500, 6_000);
            kafka.freeze(0);
            tokio::time::sleep(frozen).await;
            kafka.thaw(0);
            format!("frozen {frozen:?}")
        }
        Fault::KillBroker => {
            let down = rng.ms(100, 3_000);
            kafka.kill(0);
            tokio::time::sleep(down).await;
            kafka.restart(0).await;
            format!("down {down:?}")
        }
        Fault::KillRedis => {
            redis.restart_killed().await;
            String::new()
        }
        Fault::DeleteCouponKeys => {
            let keys = sys
                .env
                .common
                .keys()
                .unwrap()
                .coupon(&firstcome::CouponId::parse(&coupon).unwrap());
            let all = [keys.meta, keys.stock, keys.users, keys.decided];
            let which = rng.below(all.len() + 1);
            let gone: Vec<&String> = match all.get(which) {
                Some(k) => vec![k],
                None => all.iter().collect(),
            };
            let mut del = redis::cmd("DEL");
            for k in &gone {
                del.arg(*k);
            }
            let n: i64 = del.query_async(&mut sys.env.redis().await).await.unwrap();
            format!("{coupon}: {n} of {gone:?}")
        }
        Fault::RestartPostgres => {
            let down = rng.ms(100, 3_000);
            pg.stop();
            tokio::time::sleep(down).await;
            pg.start_server().await;
            format!("down {down:?}")
        }
        Fault::RedisRebuild => {
            let out = tokio::time::timeout(
                Duration::from_secs(60),
                sys.env
                    .worker_command()
                    .args(["redis", "rebuild", "--coupon", &coupon])
                    .output(),
            )
            .await
            .expect("redis rebuild finishes")
            .unwrap();
            assert!(
                out.status.success(),
                "redis rebuild of {coupon}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            coupon
        }
        Fault::RollbackRedisAndKillWorker => {
            let copy = dump_state(sys, &coupon).await;
            tokio::time::sleep(rng.ms(300, 2_000)).await;
            let w = rng.below(sys.workers.len());
            sys.workers[w].kill().await.unwrap();
            restore_state(sys, &copy).await;
            tokio::time::sleep(rng.ms(100, 1_000)).await;
            sys.workers[w] = System::start_worker(&sys.env, sys.ops[w]);
            format!("{coupon}: {} keys back, worker {w} killed", copy.len())
        }
        Fault::RollbackRedisDuringBacklog => {
            let pids: Vec<u32> = sys.workers.iter().filter_map(Child::id).collect();
            for &pid in &pids {
                signal(pid, "STOP");
            }
            tokio::time::sleep(rng.ms(500, 2_000)).await;
            let copy = dump_state(sys, &coupon).await;
            for &pid in &pids {
                signal(pid, "CONT");
            }
            tokio::time::sleep(rng.ms(200, 1_500)).await;
            restore_state(sys, &copy).await;
            format!("{coupon}: {} keys back during a backlog", copy.len())
        }
        Fault::AddStock => {
            let units = 1 + rng.below(10) as i64;
            let key = format!("add-{}", rng.next());
            let path = format!("/v1/admin/coupons/{coupon}/stock");
            for attempt in ["first", "retry"] {
                let (code, body) =
                    admin_done(&sys.env, at, &path, json!({ "add": units }), &key).await;
                assert_eq!(code, 200, "add stock ({attempt}): {body}");
            }
            format!("{coupon} +{units}, sent twice")
        }
        Fault::Close => {
            let path = format!("/v1/admin/coupons/{coupon}/close");
            let key = format!("close-{}", rng.next());
            let (code, body) = admin_done(&sys.env, at, &path, json!({}), &key).await;
            assert_eq!(code, 200, "close: {body}");
            coupon
        }
        Fault::Reopen => {
            let path = format!("/v1/admin/coupons/{coupon}/reopen");
            let key = format!("reopen-{}", rng.next());
            let (code, body) = admin_done(&sys.env, at, &path, json!({}), &key).await;
            assert_eq!(code, 200, "reopen: {body}");
            coupon
        }
    }
}

/// A copy of a coupon's state and of (at most 2,000) request statuses, as
/// `DUMP` gives them.
async fn dump_state(sys: &System, coupon: &str) -> Vec<(String, Vec<u8>)> {
    let mut redis = sys.env.redis().await;
    let keys = sys
        .env
        .common
        .keys()
        .unwrap()
        .coupon(&firstcome::CouponId::parse(coupon).unwrap());
    let mut names = vec![keys.meta, keys.stock, keys.users, keys.decided];
    let mut cursor = 0u64;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}req:*", sys.env.common.redis_prefix))
            .arg("COUNT")
            .arg(1_000)
            .query_async(&mut redis)
            .await
            .unwrap();
        names.extend(found);
        cursor = next;
        if cursor == 0 || names.len() > 2_000 {
            break;
        }
    }
    let mut copy = Vec::with_capacity(names.len());
    for k in names {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(&k)
            .query_async(&mut redis)
            .await
            .unwrap_or(None);
        if let Some(d) = dump {
            copy.push((k, d));
        }
    }
    copy
}

/// Puts a [`dump_state`] copy back at once, as a Redis that went back in
/// time (a lost AOF tail, a lagging replica promoted) comes back. Redis may
/// be down at this moment (another fault): a rollback that did not happen
/// is no fault to check.
async fn restore_state(sys: &System, copy: &[(String, Vec<u8>)]) {
    let _ = sys.env.restore_keys(copy).await;
}

/// An admin call through the ingress at `at`.
async fn admin(
    env: &TestEnv,
    at: SocketAddr,
    path: &str,
    body: Value,
    key: Option<&str>,
) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .post(format!("http://{at}{path}"))
        .bearer_auth(&env.admin_token)
        .json(&body);
    if let Some(k) = key {
        r = r.header("idempotency-key", k);
    }
    split(r.send().await.unwrap()).await
}

/// An admin change as an operator makes it while faults run: a `503` (a
/// dependency down, or the request's time limit passed while one was
/// frozen) is not an answer, so the same change is sent again under the
/// same idempotency key until it is (for at most two minutes). Seen on two
/// cores: a reopen past the ingress's request timeout, `503` with no body.
async fn admin_done(
    env: &TestEnv,
    at: SocketAddr,
    path: &str,
    body: Value,
    key: &str,
) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (code, answer) = admin(env, at, path, body.clone(), Some(key)).await;
        if code != 503 || Instant::now() >= deadline {
            return (code, answer);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the ledger holds what the log implies, then checks every
/// part of the promise.
async fn check(
    env: &TestEnv,
    client: &firstcome_suite::Client,
    coupons: &[(String, i64)],
    seen: &Seen,
) {
    let ids: Vec<&str> = coupons.iter().map(|(c, _)| c.as_str()).collect();
    let mut rules = HashMap::new();
    for (c, stock) in coupons {
        rules.insert(
            c.clone(),
            firstcome_suite::coupon_rules(env, c, *stock).await,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let m = loop {
        let m = firstcome_suite::model_with(env, &rules);
        let decided = env.decided_count(&ids).await;
        if decided as usize == m.expected.len() && m.unexplained.is_empty() {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "{decided} of {} decided after the heal; undecided positions: {:?}",
            m.expected.len(),
            &m.unexplained[..m.unexplained.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let lost: Vec<&String> = seen.accepted.difference(&m.logged).take(5).collect();
    assert!(lost.is_empty(), "202 but not in the log: {lost:?}");
    let undecided: Vec<&String> = seen
        .accepted
        .iter()
        .filter(|id| !m.expected.contains_key(*id))
        .take(5)
        .collect();
    assert!(undecided.is_empty(), "202 but never final: {undecided:?}");

    let ledger = firstcome_suite::ledger_rows(env, &ids).await;
    let got = firstcome_suite::decisions(&ledger);
    // Every logged request the client did not learn the id of was one it
    // sent without an answer.
    for (id, _, _, _, coupon, user) in &ledger {
        let id = id.to_string();
        assert!(
            seen.accepted.contains(&id)
                || seen.unconfirmed.contains(&id)
                || seen.unanswered.contains(&(coupon.clone(), user.clone())),
            "in the ledger, never sent: {id} ({coupon}, {user})"
        );
    }
    firstcome_suite::assert_decisions_match(&m, &got, "log order and the admin changes");

    for (coupon, _) in coupons {
        let winners = m.winners.get(coupon).cloned().unwrap_or_default();
        let held = firstcome_suite::assert_holders(env, coupon, &winners).await;
        let (total, rule) = (
            sqlx::query_scalar::<_, i32>("SELECT total_stock FROM coupon WHERE coupon_id = $1")
                .bind(coupon)
                .fetch_one(&env.pool)
                .await
                .unwrap(),
            &rules[coupon],
        );
        let added: i64 = rule
            .changes
            .iter()
            .map(|(_, c)| match c {
                firstcome_suite::RuleChange::AddStock(n) => *n,
                _ => 0,
            })
            .sum();
        assert_eq!(
            i64::from(total),
            rule.stock + added,
            "{coupon}: every change applied once"
        );
        assert!(held as i64 <= i64::from(total), "{coupon} oversold");
    }

    // Through the API, every accepted request: final, and what the ledger
    // holds (a Redis rolled back to a `pending` must not hide a decision).
    for id in &seen.accepted {
        let (code, status) = client.get(&format!("/v1/issue-requests/{id}")).await;
        assert_eq!(code, 200, "{status}");
        assert_eq!(status["status"], got[id].0.as_str(), "{status}");
    }
    let mut statuses: BTreeMap<&str, usize> = BTreeMap::new();
    for (status, _, _) in m.expected.values() {
        *statuses.entry(status.as_str()).or_default() += 1;
    }
    eprintln!(
        "soak: {} log records, statuses {statuses:?}, dead letters {:?}",
        m.records, m.dead
    );
}
