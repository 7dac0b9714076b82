//! Redis is a state that can be rebuilt: on demand (`redis rebuild`), and
//! by the worker itself when Redis lost its data or went back in time.

use std::time::Duration;

use firstcome_suite::TestEnv;
use firstcome_suite::services::{PrivatePostgres, PrivateRedis};
use serde_json::Value;

/// A copy of every coupon key of the test, as `DUMP` gives it.
async fn copy_state(env: &TestEnv) -> Vec<(String, Vec<u8>)> {
    let mut redis = env.redis().await;
    let keys = env
        .keys_matching(&format!("{}coupon:*", env.common.redis_prefix))
        .await;
    let mut copy = Vec::new();
    for k in keys {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(&k)
            .query_async(&mut redis)
            .await
            .unwrap();
        copy.push((k, dump.unwrap()));
    }
    copy
}

/// Puts a [`copy_state`] back, all at once, as a restarted Redis comes back.
async fn put_back(env: &TestEnv, copy: &[(String, Vec<u8>)]) {
    env.restore_keys(copy).await.unwrap();
}

async fn rebuild(env: &TestEnv, args: &[&str]) -> (i32, Value, String) {
    let out = env
        .worker_command()
        .args(["redis", "rebuild", "--json"])
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap(),
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_rebuild_under_load_restores_every_coupon_and_the_promise_holds() {
    // A Postgres of its own: "every coupon" must mean this test's only.
    let mut env = TestEnv::new().await;
    let pg = PrivatePostgres::start().await;
    env.use_postgres(pg.url()).await;
    let sale = env.open_sale(&[("a", 40), ("b", 70)], 9).await;
    let (client, coupons, ids) = (&sale.client, &sale.coupons, sale.ids());

    let load = firstcome_suite::spawn_load(client, coupons, 500, Duration::from_millis(8), |i| {
        format!("r{}", (i * 13) % 160)
    });
    // Every coupon, then one, while requests keep being decided.
    env.wait_decided(&ids, 80).await;
    let (code, report, err) = rebuild(&env, &[]).await;
    assert_eq!(code, 0, "{err}");
    let rebuilt: Vec<&str> = report
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["coupon_id"].as_str().unwrap())
        .collect();
    for id in &ids {
        assert!(rebuilt.contains(id), "{id} not in {report}");
    }
    env.wait_decided(&ids, 250).await;
    let (code, report, err) = rebuild(&env, &["--coupon", ids[0]]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(report.as_array().unwrap().len(), 1);
    assert_eq!(report[0]["coupon_id"], ids[0]);
    assert!(report[0]["epoch"].as_i64().unwrap() >= 3, "{report}");

    let accepted = load.await.unwrap();
    firstcome_suite::check_promise(&env, client, coupons, &accepted, Duration::from_secs(120))
        .await;
    let (code, table) = env.reconcile(&ids).await;
    assert_eq!(code, 0, "in sync once quiet:\n{table}");

    // An unknown coupon is a clear error that changes nothing.
    let (code, _, err) = rebuild(&env, &["--coupon", "no-such-coupon"]).await;
    assert_eq!(code, 2);
    assert!(
        err.contains("coupon no-such-coupon does not exist"),
        "{err}"
    );
    sale.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restored_from_an_older_copy_is_caught_by_the_fence_and_the_promise_holds() {
    let env = TestEnv::new().await;
    let sale = env.open_sale(&[("a", 60), ("b", 90)], 7).await;
    let (client, coupons, ids) = (&sale.client, &sale.coupons, sale.ids());
    let load = firstcome_suite::spawn_load(client, coupons, 600, Duration::from_millis(30), |i| {
        format!("o{}", (i * 17) % 200)
    });

    // A copy of the coupons' state early on, put back later: Redis went back
    // in time (an old snapshot, an AOF that lost its tail, a lagging replica
    // promoted), with stock it already gave away and holders it forgot.
    env.wait_decided(&ids, 60).await;
    let copy = copy_state(&env).await;
    env.wait_decided(&ids, 250).await;
    put_back(&env, &copy).await;
    let epochs_then = [env.epoch(ids[0]).await, env.epoch(ids[1]).await];

    let accepted = load.await.unwrap();
    firstcome_suite::check_promise(&env, client, coupons, &accepted, Duration::from_secs(120))
        .await;
    let mut caught = 0;
    for id in &ids {
        // Built once at the first request; built again when caught.
        if env.epoch(id).await > 1 {
            caught += 1;
        }
    }
    assert!(
        caught > 0,
        "the worker never noticed the rollback (epochs at the rollback {epochs_then:?})"
    );
    let (code, table) = env.reconcile(&ids).await;
    assert_eq!(code, 0, "in sync once quiet:\n{table}");
    sale.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restarted_empty_mid_stream_is_rebuilt_and_the_promise_holds() {
    let mut env = TestEnv::new().await;
    let mut redis = PrivateRedis::start().await;
    env.use_redis(redis.url());
    let sale = env.open_sale(&[("a", 50), ("b", 80)], 7).await;
    let (client, coupons, ids) = (&sale.client, &sale.coupons, sale.ids());
    let load = firstcome_suite::spawn_load(client, coupons, 500, Duration::from_millis(8), |i| {
        format!("e{}", (i * 7) % 170)
    });

    env.wait_decided(&ids, 100).await;
    redis.restart_wiped().await; // kill -9, data directory deleted, started again
    // The operator's rebuild, racing the worker's own.
    let (code, _, err) = rebuild(&env, &["--coupon", ids[0], "--coupon", ids[1]]).await;
    assert_eq!(code, 0, "{err}");

    let accepted = load.await.unwrap();
    firstcome_suite::check_promise(&env, client, coupons, &accepted, Duration::from_secs(120))
        .await;
    let (code, table) = env.reconcile(&ids).await;
    assert_eq!(code, 0, "in sync once quiet:\n{table}");
    sale.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coupon_key_lost_on_its_own_is_caught_and_the_promise_holds() {
    let env = TestEnv::new().await;
    let sale = env
        .open_sale(&[("stock", 40), ("users", 60), ("decided", 80)], 7)
        .await;
    let (client, coupons, ids) = (&sale.client, &sale.coupons, sale.ids());
    let load = firstcome_suite::spawn_load(client, coupons, 600, Duration::from_millis(25), |i| {
        format!("p{}", (i * 13) % 300)
    });
    // Mid-sale, each coupon loses one key of its state, and nothing else:
    // a forgotten stock would sell out, forgotten holders be issued again,
    // forgotten decisions answer redeliveries `duplicate`.
    env.wait_decided(&ids, 150).await;
    let epochs_then = [
        env.epoch(ids[0]).await,
        env.epoch(ids[1]).await,
        env.epoch(ids[2]).await,
    ];
    let keys = env.common.keys().unwrap();
    let mut redis = env.redis().await;
    for id in &ids {
        let k = keys.coupon(&firstcome::CouponId::parse(*id).unwrap());
        let key = match id.rsplit('-').next().unwrap() {
            "stock" => k.stock,
            "users" => k.users,
            _ => k.decided,
        };
        let deleted: i64 = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(deleted, 1, "{key} was there");
    }
    let accepted = load.await.unwrap();
    firstcome_suite::check_promise(&env, client, coupons, &accepted, Duration::from_secs(120))
        .await;
    for (id, then) in ids.iter().zip(epochs_then) {
        assert!(
            env.epoch(id).await > then,
            "{id}: the loss was never noticed"
        );
    }
    let (code, table) = env.reconcile(&ids).await;
    assert_eq!(code, 0, "in sync once quiet:\n{table}");
    sale.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_decided_again_after_a_refusal_keeps_its_place_before_a_later_batch() {
    let mut env = TestEnv::new().await;
    env.use_single_partition().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let (c1, c2) = (env.coupon_id("c1"), env.coupon_id("c2"));
    for c in [&c1, &c2] {
        assert_eq!(client.create_coupon(c, 3).await.0, 201);
    }
    let mut accepted = std::collections::HashSet::new();
    let mut issue = async |coupon: &str, user: &str| {
        let (code, body) = client.issue(coupon, user).await;
        assert_eq!(code, 202, "{body}");
        let id = body["request_id"].as_str().unwrap().to_owned();
        accepted.insert(id.clone());
        id
    };

    // One holder each, copied; one more each, so the copy is behind.
    let worker = env.spawn_worker().await;
    for (c, u) in [(&c1, "a1"), (&c2, "b1")] {
        let id = issue(c, u).await;
        client.wait_final(&id, Duration::from_secs(60)).await;
    }
    let copy = copy_state(&env).await;
    for (c, u) in [(&c1, "a2"), (&c2, "b2")] {
        let id = issue(c, u).await;
        client.wait_final(&id, Duration::from_secs(60)).await;
    }
    worker.stop().await;
    put_back(&env, &copy).await; // c1 has one unit left, Redis says two

    // X and Y wait in one batch; the fence refuses both, c1 is rebuilt
    // quickly and c2 slowly. Meanwhile Z, for c1's last unit, arrives.
    env.slow_rebuilds(&c2, 4.0).await;
    let x = issue(&c1, "x").await;
    let y = issue(&c2, "y").await;
    let epoch = env.epoch(&c1).await;
    let worker = env.spawn_worker().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while env.epoch(&c1).await == epoch {
        assert!(tokio::time::Instant::now() < deadline, "c1 never rebuilt");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let z = issue(&c1, "z").await;

    let mut status = Vec::new();
    for id in [&x, &y, &z] {
        let done = client.wait_final(id, Duration::from_secs(60)).await;
        status.push(done["status"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        status,
        ["issued", "issued", "sold_out"],
        "x came before z in the log, and c1 had one unit"
    );
    let stocks = [(c1.clone(), 3), (c2.clone(), 3)];
    firstcome_suite::check_promise(&env, &client, &stocks, &accepted, Duration::from_secs(60))
        .await;
    worker.stop().await;
    ingress.stop().await;
}

/// A request of `coupon` issued on epoch 1 with number `seq`.
fn decided(request: &firstcome::IssueRequest, seq: i64) -> firstcome::db::Decided<'_> {
    decided_as(request, seq, firstcome::Status::Issued)
}

/// A request of `coupon` decided `status` on epoch 1 with number `seq`.
fn decided_as(
    request: &firstcome::IssueRequest,
    seq: i64,
    status: firstcome::Status,
) -> firstcome::db::Decided<'_> {
    firstcome::db::Decided {
        request,
        decision: firstcome::state::Decision {
            status,
            decided_at: request.accepted_at,
        },
        partition: 0,
        offset: seq,
        taken_on: Some(firstcome::db::TakenOn { epoch: 1, seq }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_checks_a_store_against_what_a_concurrent_store_of_the_coupon_committed() {
    use chrono::SubsecRound;
    let env = TestEnv::new().await;
    let id = fenced_coupon(&env, "fence", 5).await;
    let coupon = id.to_string();
    let request = |user: &str| firstcome::IssueRequest {
        request_id: firstcome::RequestId::new(),
        coupon_id: id.clone(),
        user_id: firstcome::UserId::parse(user).unwrap(),
        accepted_at: chrono::Utc::now().trunc_subsecs(6),
    };
    let (a, b, late) = (request("a"), request("b"), request("late"));

    // One store holds the coupon row: decisions 1 and 2 (a and b).
    let mut first = env.pool.begin().await.unwrap();
    sqlx::query("UPDATE coupon SET decided_seq = 2 WHERE coupon_id = $1")
        .bind(&coupon)
        .execute(&mut *first)
        .await
        .unwrap();
    for (r, offset) in [(&a, 1), (&b, 2)] {
        sqlx::query("INSERT INTO request_ledger VALUES ($1, $2, $3, 'issued', 0, $4, $5, $5)")
            .bind(r.request_id.as_uuid())
            .bind(&coupon)
            .bind(r.user_id.as_str())
            .bind(offset)
            .bind(r.accepted_at)
            .execute(&mut *first)
            .await
            .unwrap();
        sqlx::query("INSERT INTO user_coupon VALUES ($1, $2, $3, $4)")
            .bind(&coupon)
            .bind(r.user_id.as_str())
            .bind(r.request_id.as_uuid())
            .bind(r.accepted_at)
            .execute(&mut *first)
            .await
            .unwrap();
    }
    // Meanwhile a Redis that lost those two decisions numbers `late` 1 and
    // stores it: it waits for the row, then must see the first store's 2.
    let pool = env.pool.clone();
    let second =
        tokio::spawn(async move { firstcome::db::persist(&pool, &[decided(&late, 1)]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "the second store waits for the row");
    first.commit().await.unwrap();
    let refused = second.await.unwrap().unwrap();
    assert_eq!(
        refused,
        std::slice::from_ref(&id),
        "a reused number is refused"
    );

    // Redelivered decisions under the stored numbers store nothing new and
    // are not refused; the next number is taken, a gap is not.
    let c = request("c");
    let d = request("d");
    let ok = firstcome::db::persist(&env.pool, &[decided(&a, 1), decided(&b, 2), decided(&c, 3)])
        .await
        .unwrap();
    assert!(ok.is_empty(), "{ok:?}");
    let gap = firstcome::db::persist(&env.pool, &[decided(&d, 5)])
        .await
        .unwrap();
    assert_eq!(gap, std::slice::from_ref(&id), "a gap is refused");
    let held: Vec<String> =
        sqlx::query_scalar("SELECT user_id FROM user_coupon WHERE coupon_id = $1 ORDER BY user_id")
            .bind(&coupon)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(held, ["a", "b", "c"], "late never got a unit");
}

/// One refusal under a backlog costs one rebuild. A batch decides while the
/// one before it is stored; when the fence refuses that one and it rebuilds
/// the coupon, the next was decided on the state the rebuild replaced.
/// Stored as it was, it was refused and rebuilt in turn, which left the
/// batch after it stale, and so on: every batch of a backlog paid a rebuild
/// (a load of every decision of the coupon), and two 30-minute soaks
/// crawled through their backlog at a few records a second after the heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_refusal_under_a_backlog_costs_one_rebuild_not_one_per_batch() {
    let mut env = TestEnv::new().await;
    env.use_single_partition().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("backlog");
    assert_eq!(client.create_coupon(&coupon, 300).await.0, 201);
    let mut accepted = std::collections::HashSet::new();

    // The coupon's state in Redis, on the epoch Postgres knows.
    let worker = env.spawn_worker().await;
    let (code, body) = client.issue(&coupon, "first").await;
    assert_eq!(code, 202, "{body}");
    let first = body["request_id"].as_str().unwrap().to_owned();
    client.wait_final(&first, Duration::from_secs(60)).await;
    accepted.insert(first);
    worker.stop().await;

    // Postgres moves on, as an admin change or another builder would: the
    // first batch decided on the state in Redis is refused. Thirty batches
    // wait behind it.
    sqlx::query("UPDATE coupon SET redis_epoch = redis_epoch + 1 WHERE coupon_id = $1")
        .bind(&coupon)
        .execute(&env.pool)
        .await
        .unwrap();
    let backlog: Vec<(String, String)> = (0..600)
        .map(|i| firstcome_suite::request_value(&coupon, &format!("u{i}")))
        .collect();
    let records: Vec<(&str, &str)> = backlog
        .iter()
        .map(|(_, value)| (coupon.as_str(), value.as_str()))
        .collect();
    env.produce_raw(&records).await;
    accepted.extend(backlog.into_iter().map(|(id, _)| id));

    let mut cfg = env.worker_config();
    cfg.max_batch = 20;
    let worker = env.spawn_worker_with(cfg).await;
    env.wait_decided(&[&coupon], 601).await;
    let rebuilds = firstcome_suite::Scrape::of(worker.metrics)
        .await
        .sum("firstcome_worker_state_rebuilds_total");
    // One for the refusal; a second only if the next batch's Lua call came
    // after that rebuild, which the fence then refuses once more.
    assert!(
        (1.0..=2.0).contains(&rebuilds),
        "{rebuilds} rebuilds for one refusal before a backlog of 30 batches"
    );
    let stocks = [(coupon.clone(), 300)];
    firstcome_suite::check_promise(&env, &client, &stocks, &accepted, Duration::from_secs(60))
        .await;
    worker.stop().await;
    ingress.stop().await;
}

/// Two owners of one partition at once (a worker thawed after its session
/// ended, still holding a batch, beside the partition's new owner): each
/// one's rebuild moves the epoch and so refuses the other's round. A batch
/// whose partition was revoked must stop there rather than rebuild again;
/// two 30-minute soaks (seed 561543) ended with two such batches refusing
/// each other for five minutes. Here the fence refuses the coupon for
/// good, as the other owner's rebuilds would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_batch_stops_rebuilding_while_the_fence_refuses_it() {
    use firstcome_worker::gate::Gate;
    use firstcome_worker::pipeline;
    use firstcome_worker::record::Rec;
    let env = TestEnv::new().await;
    let id = fenced_coupon(&env, "revoked", 5).await;
    env.fence_refuses(id.as_str()).await;
    let shared = env.pipeline_shared().await;
    let recs: Vec<Rec> = ["a", "b", "c"]
        .iter()
        .zip(0..)
        .map(|(user, offset)| Rec {
            partition: 0,
            offset,
            key: Some(id.as_str().as_bytes().to_vec()),
            payload: Some(
                firstcome_suite::request_value(id.as_str(), user)
                    .1
                    .into_bytes(),
            ),
            timestamp_ms: None,
            replay_count: 0,
            request_id_header: None,
        })
        .collect();
    let cancel = tokio_util::sync::CancellationToken::new();
    let (gate, _next) = Gate::after(None, 0);
    let batch = tokio::spawn({
        let (shared, cancel) = (shared.clone(), cancel.clone());
        async move { pipeline::process(&shared, recs, &cancel, gate).await }
    });
    // Decided, refused, rebuilt, decided again: it goes round.
    let rounds = tokio::time::timeout(Duration::from_secs(60), async {
        while shared.metrics.state_rebuilds.get() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        rounds.is_ok(),
        "the batch was not refused and rebuilt three times in 60 s ({} rebuilds; finished: {})",
        shared.metrics.state_rebuilds.get(),
        batch.is_finished()
    );
    cancel.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(30), batch)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "30 s after its partition was revoked the batch was still rebuilding \
                 ({} rebuilds)",
                shared.metrics.state_rebuilds.get()
            )
        })
        .unwrap();
    assert!(outcome.is_err(), "a revoked batch is given up, not stored");
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM request_ledger WHERE coupon_id = $1")
            .bind(id.as_str())
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(stored, 0, "nothing of a refused coupon is stored");
}

/// A coupon of `total_stock` in Postgres on epoch 1, as a rebuild leaves it.
async fn fenced_coupon(env: &TestEnv, name: &str, total_stock: i32) -> firstcome::CouponId {
    let coupon = env.coupon_id(name);
    let inserted = firstcome::db::insert_coupon(
        &env.pool,
        &firstcome::db::Coupon {
            coupon_id: firstcome::CouponId::parse(coupon.as_str()).unwrap(),
            name: coupon.clone(),
            total_stock,
            starts_at: None,
            ends_at: None,
        },
    )
    .await
    .unwrap();
    assert!(inserted);
    sqlx::query("UPDATE coupon SET redis_epoch = 1 WHERE coupon_id = $1")
        .bind(&coupon)
        .execute(&env.pool)
        .await
        .unwrap();
    firstcome::CouponId::parse(&coupon).unwrap()
}

/// Two faults at once (red team #2): Redis went back to before `a` took the
/// only unit, and a redelivered batch holds only `b`, stored `sold_out`
/// under number 2. The rolled-back Redis issues `b` as number 1, a number
/// the fence has stored; it must refuse it rather than add a second holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_refuses_a_stored_number_decided_differently_by_a_rolled_back_redis() {
    use chrono::SubsecRound;
    use firstcome::Status;
    let env = TestEnv::new().await;
    let id = fenced_coupon(&env, "rollback", 1).await;
    let request = |user: &str| firstcome::IssueRequest {
        request_id: firstcome::RequestId::new(),
        coupon_id: id.clone(),
        user_id: firstcome::UserId::parse(user).unwrap(),
        accepted_at: chrono::Utc::now().trunc_subsecs(6),
    };
    let (a, b) = (request("a"), request("b"));
    let stored = firstcome::db::persist(
        &env.pool,
        &[
            decided_as(&a, 1, Status::Issued),
            decided_as(&b, 2, Status::SoldOut),
        ],
    )
    .await
    .unwrap();
    assert!(stored.is_empty(), "{stored:?}");

    let refused = firstcome::db::persist(&env.pool, &[decided_as(&b, 1, Status::Issued)])
        .await
        .unwrap();
    assert_eq!(
        refused,
        std::slice::from_ref(&id),
        "a changed decision is refused"
    );
    // The same decision under its own number, or as a prior (0), is a
    // redelivery: accepted, and it stores nothing new.
    for seq in [2, 0] {
        let again = firstcome::db::persist(&env.pool, &[decided_as(&b, seq, Status::SoldOut)])
            .await
            .unwrap();
        assert!(again.is_empty(), "seq {seq}: {again:?}");
    }
    let held: Vec<String> =
        sqlx::query_scalar("SELECT user_id FROM user_coupon WHERE coupon_id = $1")
            .bind(id.as_str())
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(held, ["a"], "one unit, one holder");
    let b_status: String =
        sqlx::query_scalar("SELECT status FROM request_ledger WHERE request_id = $1")
            .bind(b.request_id.as_uuid())
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(b_status, "sold_out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rebuild_waits_for_a_redis_that_is_not_back_yet() {
    let mut env = TestEnv::new().await;
    let mut redis = PrivateRedis::start().await;
    env.use_redis(redis.url());
    let ingress = env.spawn_ingress().await;
    let coupon = env.coupon_id("late");
    assert_eq!(env.client(&ingress).create_coupon(&coupon, 5).await.0, 201);
    ingress.stop().await;

    // Redis is down when the operator rebuilds (or still loading its data,
    // which answers LOADING the same way): the tool waits for it.
    redis.stop();
    let started = {
        let env = &env;
        let coupon = coupon.clone();
        async move { rebuild(env, &["--coupon", &coupon, "--wait-secs", "60"]).await }
    };
    let restart = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        redis.start_again().await;
    };
    let ((code, report, err), ()) = tokio::join!(started, restart);
    assert_eq!(code, 0, "{err}");
    assert_eq!(report[0]["coupon_id"], coupon.as_str(), "{report}");
    assert_eq!(report[0]["remaining"], 5, "{report}");
}

/// Red team #3: Redis kept the `pending` written at the 202 and lost the
/// final status written later (a crash that lost its last second, a
/// failover to a lagging replica). Nothing writes that status again, so the
/// lookup must find the decision in the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_status_that_outlived_its_decision_answers_the_ledgers_decision() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("rolled");
    assert_eq!(client.create_coupon(&coupon, 1).await.0, 201);
    let (code, body) = client.issue(&coupon, "alice").await;
    assert_eq!(code, 202, "{body}");
    let id = body["request_id"].as_str().unwrap().to_owned();
    let key = firstcome::state::Keys::new(env.common.redis_prefix.clone())
        .unwrap()
        .request(firstcome::RequestId::parse(&id).unwrap());
    let mut redis = env.redis().await;
    let pending: Option<Vec<u8>> = redis::cmd("DUMP")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    let pending = pending.expect("the 202 wrote a pending status");

    let worker = env.spawn_worker().await;
    let decided = client.wait_final(&id, Duration::from_secs(60)).await;
    assert_eq!(decided["status"], "issued", "{decided}");
    worker.stop().await;
    let _: () = redis::cmd("RESTORE")
        .arg(&key)
        .arg(0)
        .arg(pending)
        .arg("REPLACE")
        .query_async(&mut redis)
        .await
        .unwrap();

    let again = client.wait_final(&id, Duration::from_secs(30)).await;
    assert_eq!(again["status"], "issued", "{again}");
    assert_eq!(again["decided_at"], decided["decided_at"]);
    let cached: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        cached.contains("\"issued\""),
        "the cache was put right: {cached}"
    );
    ingress.stop().await;
}
