//! The decision script against the real Redis of the local stack.

use chrono::{DateTime, Duration, SubsecRound, Utc};
use firstcome::state::{self, CouponKeys, CouponSnapshot, Decision, Decisions, Keys, Verdict};
use firstcome::status;
use firstcome::{CouponId, IssueRequest, RequestId, Status, UserId};
use firstcome_suite::{TestEnv, stack_env, unique};

struct Fixture {
    conn: redis::aio::MultiplexedConnection,
    keys: CouponKeys,
    coupon: CouponId,
}

async fn fixture(snapshot: CouponSnapshot) -> Fixture {
    let env = stack_env();
    let url = env
        .get("REDIS_URL")
        .expect("REDIS_URL in the stack env; run `scripts/stack up`");
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis of the local stack answers; run `scripts/stack up`");
    let keys = Keys::new(format!("{}:", unique("lua"))).unwrap();
    let coupon = CouponId::parse("c").unwrap();
    let keys = keys.coupon(&coupon);
    assert!(state::install(&mut conn, &keys, &snapshot).await.unwrap());
    Fixture { conn, keys, coupon }
}

fn open_coupon(stock: i64) -> CouponSnapshot {
    CouponSnapshot {
        epoch: 1,
        seq: 0,
        total_stock: stock,
        starts_at: None,
        ends_at: None,
        issued_users: vec![],
        decisions: vec![],
    }
}

fn request(f: &Fixture, user: &str, accepted_at: DateTime<Utc>) -> IssueRequest {
    IssueRequest {
        request_id: RequestId::new(),
        coupon_id: f.coupon.clone(),
        user_id: UserId::parse(user).unwrap(),
        accepted_at: accepted_at.trunc_subsecs(6),
    }
}

/// The decisions of a call that found the state in place.
fn decisions(v: Verdict) -> Decisions {
    match v {
        Verdict::Decided(d) => d,
        other => panic!("expected decisions, got {other:?}"),
    }
}

async fn decide_at(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &CouponKeys,
    reqs: &[&IssueRequest],
    now: DateTime<Utc>,
) -> Decisions {
    decisions(
        state::decide(conn, keys, reqs, now.trunc_subsecs(6))
            .await
            .unwrap(),
    )
}

async fn decide(f: &mut Fixture, reqs: &[&IssueRequest]) -> Vec<Status> {
    decide_at(&mut f.conn, &f.keys, reqs, Utc::now())
        .await
        .decisions
        .into_iter()
        .map(|(d, _)| d.status)
        .collect()
}

#[tokio::test]
async fn requests_are_issued_in_order_until_the_stock_is_gone_then_sold_out() {
    let mut f = fixture(open_coupon(2)).await;
    let now = Utc::now();
    let rs: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|u| request(&f, u, now))
        .collect();
    let refs: Vec<_> = rs.iter().collect();
    assert_eq!(
        decide(&mut f, &refs).await,
        [
            Status::Issued,
            Status::Issued,
            Status::SoldOut,
            Status::SoldOut
        ]
    );
    let c = state::counters(&mut f.conn, &f.keys)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((c.remaining, c.issued), (0, 2));
}

#[tokio::test]
async fn a_user_who_holds_the_coupon_gets_duplicate_also_within_one_batch() {
    let mut f = fixture(open_coupon(5)).await;
    let now = Utc::now();
    let (a1, a2, b) = (
        request(&f, "a", now),
        request(&f, "a", now),
        request(&f, "b", now),
    );
    assert_eq!(
        decide(&mut f, &[&a1, &a2, &b]).await,
        [Status::Issued, Status::Duplicate, Status::Issued]
    );
    let a3 = request(&f, "a", now);
    assert_eq!(decide(&mut f, &[&a3]).await, [Status::Duplicate]);
    let c = state::counters(&mut f.conn, &f.keys)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((c.remaining, c.issued), (3, 2));
}

#[tokio::test]
async fn requests_accepted_outside_the_window_are_not_open_and_take_no_stock() {
    let start = Utc::now();
    let end = start + Duration::minutes(10);
    let mut f = fixture(CouponSnapshot {
        starts_at: Some(start.trunc_subsecs(6)),
        ends_at: Some(end.trunc_subsecs(6)),
        ..open_coupon(5)
    })
    .await;
    let early = request(&f, "early", start - Duration::seconds(1));
    let inside = request(&f, "inside", start + Duration::seconds(1));
    let late = request(&f, "late", end + Duration::seconds(1));
    let at_end = request(&f, "at-end", end);
    assert_eq!(
        decide(&mut f, &[&early, &inside, &late, &at_end]).await,
        [
            Status::NotOpen,
            Status::Issued,
            Status::NotOpen,
            Status::Issued
        ]
    );
    let c = state::counters(&mut f.conn, &f.keys)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.remaining, 3);
}

#[tokio::test]
async fn a_redelivered_request_gets_its_first_decision_back_with_its_first_time() {
    let mut f = fixture(open_coupon(1)).await;
    let now = Utc::now();
    let (a, b) = (request(&f, "a", now), request(&f, "b", now));
    let first = decide_at(&mut f.conn, &f.keys, &[&a, &b], now).await;
    assert_eq!(first.epoch, 1);
    let first: Vec<(Decision, i64)> = first.decisions;
    assert_eq!(first[0].0.status, Status::Issued);
    assert_eq!(first[1].0.status, Status::SoldOut);
    assert_eq!((first[0].1, first[1].1), (1, 2), "numbered in log order");
    // Redelivered later, in a batch with a new request: the issued one is
    // not `duplicate` against itself, the sold-out one stays sold out, and
    // both keep their original decision time.
    let c = request(&f, "c", now);
    let later = now + Duration::seconds(5);
    let again = decide_at(&mut f.conn, &f.keys, &[&a, &b, &c], later)
        .await
        .decisions;
    assert_eq!(
        again[..2],
        [first[0], first[1]],
        "given back with their first numbers, not numbered again"
    );
    assert_eq!(again[2].0.status, Status::SoldOut);
    assert_eq!(again[2].0.decided_at, later.trunc_subsecs(6));
    assert_eq!(again[2].1, 3);
    let counters = state::counters(&mut f.conn, &f.keys)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((counters.remaining, counters.issued), (0, 1));
}

#[tokio::test]
async fn a_coupon_without_state_is_reported_uninitialized_and_only_a_newer_epoch_replaces_a_state()
{
    let env = TestEnv::new().await;
    let mut conn = env.redis().await;
    let keys = env
        .common
        .keys()
        .unwrap()
        .coupon(&CouponId::parse("nothing-here").unwrap());
    let r = IssueRequest {
        request_id: RequestId::new(),
        coupon_id: CouponId::parse("nothing-here").unwrap(),
        user_id: UserId::parse("u").unwrap(),
        accepted_at: Utc::now().trunc_subsecs(6),
    };
    assert_eq!(
        state::decide(&mut conn, &keys, &[&r], Utc::now())
            .await
            .unwrap(),
        Verdict::Uninitialized
    );

    // Rebuilt from a snapshot holding one issued user and one decision.
    let earlier = RequestId::new();
    let decided_at = Utc::now().trunc_subsecs(6);
    let snapshot = CouponSnapshot {
        epoch: 4,
        seq: 9,
        total_stock: 2,
        starts_at: None,
        ends_at: None,
        issued_users: vec![UserId::parse("u").unwrap()],
        decisions: vec![(
            earlier,
            Decision {
                status: Status::Issued,
                decided_at,
            },
        )],
    };
    assert!(state::install(&mut conn, &keys, &snapshot).await.unwrap());
    let older = CouponSnapshot {
        epoch: 3,
        issued_users: vec![],
        ..snapshot.clone()
    };
    for stale in [&snapshot, &older] {
        assert!(
            !state::install(&mut conn, &keys, stale).await.unwrap(),
            "epoch {} must not replace epoch 4",
            stale.epoch
        );
    }
    let c = state::counters(&mut conn, &keys).await.unwrap().unwrap();
    assert_eq!((c.remaining, c.issued), (1, 1));
    let d = decide_at(&mut conn, &keys, &[&r], Utc::now()).await;
    assert_eq!(d.epoch, 4);
    assert_eq!(
        (d.decisions[0].0.status, d.decisions[0].1),
        (Status::Duplicate, 10),
        "numbering resumes after the stored sequence"
    );
    let replay = IssueRequest {
        request_id: earlier,
        ..r.clone()
    };
    let d = decide_at(&mut conn, &keys, &[&replay], Utc::now()).await;
    assert_eq!(
        d.decisions[0],
        (
            Decision {
                status: Status::Issued,
                decided_at
            },
            0
        ),
        "a decision loaded from postgres has no number"
    );

    // A newer epoch replaces everything, the decisions and holders too.
    let newer = CouponSnapshot {
        epoch: 5,
        seq: 0,
        issued_users: vec![],
        decisions: vec![],
        ..snapshot
    };
    assert!(state::install(&mut conn, &keys, &newer).await.unwrap());
    let c = state::counters(&mut conn, &keys).await.unwrap().unwrap();
    assert_eq!((c.remaining, c.issued), (2, 0));
    let d = decide_at(&mut conn, &keys, &[&replay], Utc::now()).await;
    assert_eq!(
        (d.epoch, d.decisions[0].0.status, d.decisions[0].1),
        (5, Status::Issued, 1)
    );
}

#[tokio::test]
async fn a_paused_coupon_decides_nothing_until_it_is_resumed() {
    let mut f = fixture(open_coupon(1)).await;
    state::pause(&mut f.conn, &f.keys, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    let a = request(&f, "a", Utc::now());
    assert_eq!(
        state::decide(&mut f.conn, &f.keys, &[&a], Utc::now())
            .await
            .unwrap(),
        Verdict::Paused
    );
    let c = state::counters(&mut f.conn, &f.keys)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (c.remaining, c.issued),
        (1, 0),
        "nothing taken while paused"
    );
    state::resume(&mut f.conn, &f.keys).await.unwrap();
    assert_eq!(decide(&mut f, &[&a]).await, [Status::Issued]);
}

#[tokio::test]
async fn a_pending_entry_never_overwrites_a_final_status_written_first() {
    let env = TestEnv::new().await;
    let mut conn = env.redis().await;
    let keys = env.common.keys().unwrap();
    let r = IssueRequest {
        request_id: RequestId::new(),
        coupon_id: CouponId::parse("c").unwrap(),
        user_id: UserId::parse("u").unwrap(),
        accepted_at: Utc::now().trunc_subsecs(6),
    };
    let ttl = std::time::Duration::from_secs(60);
    // The worker was faster than the ingress.
    let decision = Decision {
        status: Status::Issued,
        decided_at: Utc::now().trunc_subsecs(6),
    };
    let final_status = status::RequestStatus::decided(&r, decision);
    status::put_statuses(&mut conn, &keys, std::slice::from_ref(&final_status), ttl)
        .await
        .unwrap();
    let pending = status::RequestStatus::pending(&r);
    let wrote = status::put_pending(&mut conn, &keys, std::slice::from_ref(&pending), ttl)
        .await
        .unwrap();
    assert_eq!(wrote, 0);
    let seen = status::get_status(&mut conn, &keys, r.request_id)
        .await
        .unwrap();
    assert_eq!(seen, Some(final_status));

    // The usual order: pending first, then the final status replaces it.
    let r2 = IssueRequest {
        request_id: RequestId::new(),
        ..r
    };
    let pending2 = status::RequestStatus::pending(&r2);
    assert_eq!(
        status::put_pending(&mut conn, &keys, std::slice::from_ref(&pending2), ttl)
            .await
            .unwrap(),
        1
    );
    let final2 = status::RequestStatus::decided(&r2, decision);
    status::put_statuses(&mut conn, &keys, std::slice::from_ref(&final2), ttl)
        .await
        .unwrap();
    assert_eq!(
        status::get_status(&mut conn, &keys, r2.request_id)
            .await
            .unwrap(),
        Some(final2)
    );
}

#[tokio::test]
async fn pending_entries_written_together_each_keep_a_final_status_and_count_per_coupon() {
    // The ingress writes the pending entries of many requests in one round
    // trip: each entry is still written only where no status is, and each
    // coupon's accepted count grows by its own requests.
    let env = TestEnv::new().await;
    let mut conn = env.redis().await;
    let keys = env.common.keys().unwrap();
    let ttl = std::time::Duration::from_secs(60);
    let request = |coupon: &str, user: &str| IssueRequest {
        request_id: RequestId::new(),
        coupon_id: CouponId::parse(coupon).unwrap(),
        user_id: UserId::parse(user).unwrap(),
        accepted_at: Utc::now().trunc_subsecs(6),
    };
    let (a, b) = (env.coupon_id("a"), env.coupon_id("b"));
    let requests = [
        request(&a, "u1"),
        request(&b, "u1"),
        request(&a, "u2"),
        request(&a, "u3"),
    ];
    // The worker already decided the second request of coupon a.
    let decision = Decision {
        status: Status::SoldOut,
        decided_at: Utc::now().trunc_subsecs(6),
    };
    let decided = status::RequestStatus::decided(&requests[2], decision);
    status::put_statuses(&mut conn, &keys, std::slice::from_ref(&decided), ttl)
        .await
        .unwrap();
    let pending: Vec<_> = requests
        .iter()
        .map(status::RequestStatus::pending)
        .collect();
    let wrote = status::put_pending(&mut conn, &keys, &pending, ttl)
        .await
        .unwrap();
    assert_eq!(wrote, 3);
    for (r, want) in requests
        .iter()
        .zip([&pending[0], &pending[1], &decided, &pending[3]])
    {
        let seen = status::get_status(&mut conn, &keys, r.request_id)
            .await
            .unwrap();
        assert_eq!(seen.as_ref(), Some(want));
    }
    let mut counts = Vec::new();
    for coupon in [&a, &b] {
        let key = keys.accepted(&CouponId::parse(coupon).unwrap());
        let n: Option<i64> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        counts.push(n);
    }
    assert_eq!(counts, [Some(3), Some(1)]);
}

#[tokio::test]
async fn publishing_no_statuses_is_a_no_op_not_an_error() {
    // A batch of dead letters only has no status to publish; an error here
    // would retry for ever and stall the partition.
    let env = TestEnv::new().await;
    let mut conn = env.redis().await;
    let keys = env.common.keys().unwrap();
    status::put_statuses(&mut conn, &keys, &[], std::time::Duration::from_secs(1))
        .await
        .expect("an empty batch of statuses is fine");
}

#[tokio::test]
async fn a_state_missing_a_key_or_an_entry_is_not_decided_on_but_reported_uninitialized() {
    // Each loss alone, on a coupon with one holder and one decision.
    type Lose = fn(&state::CouponKeys) -> redis::Cmd;
    let losses: [(&str, Lose); 7] = [
        ("meta", |k| redis::cmd("DEL").arg(&k.meta).clone()),
        ("stock", |k| redis::cmd("DEL").arg(&k.stock).clone()),
        ("users", |k| redis::cmd("DEL").arg(&k.users).clone()),
        ("decided", |k| redis::cmd("DEL").arg(&k.decided).clone()),
        ("a holder", |k| {
            redis::cmd("SREM").arg(&k.users).arg("a").clone()
        }),
        ("a decision", |k| {
            redis::cmd("HDEL").arg(&k.decided).arg(FIRST).clone()
        }),
        ("units", |k| redis::cmd("SET").arg(&k.stock).arg(7).clone()),
    ];
    const FIRST: &str = "00000000-0000-4000-8000-000000000001";
    for (what, lose) in losses {
        let mut f = fixture(open_coupon(3)).await;
        let now = Utc::now();
        let a = IssueRequest {
            request_id: RequestId::parse(FIRST).unwrap(),
            ..request(&f, "a", now)
        };
        assert_eq!(decide(&mut f, &[&a]).await, [Status::Issued]);
        let _: () = lose(&f.keys).query_async(&mut f.conn).await.unwrap();
        let b = request(&f, "b", now);
        assert_eq!(
            state::decide(&mut f.conn, &f.keys, &[&a, &b], now)
                .await
                .unwrap(),
            Verdict::Uninitialized,
            "decided on a state that lost {what}"
        );
    }
}

#[tokio::test]
async fn an_installed_state_has_every_key_even_before_anything_is_decided() {
    // A cluster moving the coupon's slot answers TRYAGAIN to a script whose
    // keys are partly absent, for as long as the move lasts.
    let mut f = fixture(open_coupon(3)).await;
    for key in [&f.keys.meta, &f.keys.stock, &f.keys.users, &f.keys.decided] {
        let exists: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut f.conn)
            .await
            .unwrap();
        assert!(exists, "{key} is absent from a fresh state");
    }
}

#[tokio::test]
async fn retire_deletes_a_state_of_its_epoch_or_older_and_keeps_a_newer_one() {
    use firstcome::state::Retired;
    let mut f = fixture(CouponSnapshot {
        epoch: 5,
        ..open_coupon(3)
    })
    .await;
    let exists = |keys: &CouponKeys| {
        let mut cmd = redis::cmd("EXISTS");
        for k in [&keys.meta, &keys.stock, &keys.users, &keys.decided] {
            cmd.arg(k);
        }
        cmd
    };
    // A sweep that read epoch 4 is behind a rebuild: the state stays.
    let found = state::retire(&mut f.conn, &f.keys, 4).await.unwrap();
    assert_eq!(found, Retired::Kept);
    let n: i64 = exists(&f.keys).query_async(&mut f.conn).await.unwrap();
    assert_eq!(n, 4);
    // The epoch it read, or a later one (the state is stale): all four go.
    let found = state::retire(&mut f.conn, &f.keys, 6).await.unwrap();
    assert_eq!(found, Retired::Deleted);
    let n: i64 = exists(&f.keys).query_async(&mut f.conn).await.unwrap();
    assert_eq!(n, 0);
    assert_eq!(
        state::retire(&mut f.conn, &f.keys, 6).await.unwrap(),
        Retired::Absent
    );
    // What is left of a partial state (no meta) goes too.
    let _: () = redis::cmd("SET")
        .arg(&f.keys.stock)
        .arg(1)
        .query_async(&mut f.conn)
        .await
        .unwrap();
    assert_eq!(
        state::retire(&mut f.conn, &f.keys, 6).await.unwrap(),
        Retired::Absent
    );
    let n: i64 = exists(&f.keys).query_async(&mut f.conn).await.unwrap();
    assert_eq!(n, 0);
    // The next request finds no state, as after any loss.
    let r = request(&f, "u1", Utc::now());
    let verdict = state::decide(&mut f.conn, &f.keys, &[&r], Utc::now().trunc_subsecs(6))
        .await
        .unwrap();
    assert!(matches!(verdict, Verdict::Uninitialized), "{verdict:?}");
}

/// The objects Redis handed to its lazy-free thread so far (`INFO memory`):
/// those still pending and those freed, so the count moves as soon as an
/// object is handed over, whenever the thread gets to it.
async fn lazyfreed(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .unwrap();
    ["lazyfree_pending_objects:", "lazyfreed_objects:"]
        .iter()
        .map(|field| {
            info.lines()
                .find_map(|l| l.strip_prefix(field))
                .expect("Redis 6.2 or newer counts lazily freed objects")
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

/// Red team #8: retiring a coupon deleted its `decided` hash synchronously
/// inside the script; a big sale's hash blocked Redis for about a second.
/// The keys go with UNLINK, so Redis frees a big one off its main thread.
#[tokio::test]
async fn a_retired_big_state_is_freed_off_the_main_thread() {
    let mut redis = firstcome_suite::services::PrivateRedis::start().await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let coupon = CouponId::parse("big").unwrap();
    let keys = Keys::new("lazy:").unwrap().coupon(&coupon);
    assert!(
        state::install(&mut conn, &keys, &open_coupon(10))
            .await
            .unwrap()
    );
    let mut fill = redis::pipe();
    for i in 0..1_000 {
        fill.hset(&keys.decided, format!("r{i}"), "sold_out:0:1")
            .ignore();
    }
    let _: () = fill.query_async(&mut conn).await.unwrap();
    let before = lazyfreed(&mut conn).await;
    state::retire(&mut conn, &keys, 1).await.unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&keys.decided)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "retired");
    assert!(
        lazyfreed(&mut conn).await > before,
        "the big hash was freed synchronously"
    );
    redis.stop();
}
