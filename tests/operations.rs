//! The operator's commands of `firstcome-worker`, run as the real binary.

use firstcome_worker::deadletter::Header;
use std::time::Duration;

use firstcome::CouponId;
use firstcome_suite::{TestEnv, request_value};
use serde_json::Value;

async fn reconcile(env: &TestEnv, coupon: &str) -> (i32, Value) {
    let out = env
        .worker_command()
        .args(["reconcile", "--json", "--coupon", coupon])
        .output()
        .await
        .unwrap();
    let code = out.status.code().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (code, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_sync_then_each_kind_of_drift_with_its_exit_code() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let worker = env.spawn_worker().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("rec");
    assert_eq!(client.create_coupon(&coupon, 5).await.0, 201);
    let mut last = String::new();
    for user in ["ann", "ben", "cat"] {
        let (_, body) = client.issue(&coupon, user).await;
        last = body["request_id"].as_str().unwrap().to_owned();
    }
    client.wait_final(&last, Duration::from_secs(60)).await;
    worker.stop().await;

    let (code, report) = reconcile(&env, &coupon).await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(report[0]["pg_issued"], 3);
    assert_eq!(report[0]["redis_issued"], 3);
    assert_eq!(report[0]["redis_remaining"], 2);
    assert_eq!(report[0]["drift"], serde_json::json!([]));

    // Redis forgets a holder and miscounts the stock.
    let keys = env
        .common
        .keys()
        .unwrap()
        .coupon(&CouponId::parse(&coupon).unwrap());
    let mut redis = env.redis().await;
    let _: i64 = redis::cmd("SREM")
        .arg(&keys.users)
        .arg("ben")
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&keys.stock)
        .arg(4)
        .query_async(&mut redis)
        .await
        .unwrap();
    let (code, report) = reconcile(&env, &coupon).await;
    assert_eq!(code, 1, "{report}");
    let drift: Vec<String> = serde_json::from_value(report[0]["drift"].clone()).unwrap();
    assert!(
        drift
            .iter()
            .any(|d| d.contains("remaining stock: redis 4 postgres 2")),
        "{drift:?}"
    );
    assert!(
        drift.iter().any(|d| d.contains("Postgres only: ben")),
        "{drift:?}"
    );

    // Redis lost the coupon entirely.
    let _: i64 = redis::cmd("DEL")
        .arg(&keys.meta)
        .query_async(&mut redis)
        .await
        .unwrap();
    let (code, report) = reconcile(&env, &coupon).await;
    assert_eq!(code, 1);
    assert_eq!(report[0]["drift"], serde_json::json!(["no state in Redis"]));

    // A coupon that does not exist cannot be checked.
    let (code, _) = reconcile(&env, &env.coupon_id("nope")).await;
    assert_eq!(code, 2);
    ingress.stop().await;
}

async fn worker_cli(env: &TestEnv, args: &[&str]) -> (i32, String) {
    let out = env.worker_command().args(args).output().await.unwrap();
    let code = out.status.code().unwrap();
    // A failed command says why on stderr: shown, so a failing assertion on
    // its exit code is never silent about the cause.
    if code != 0 {
        eprintln!(
            "firstcome-worker {} exited {code}; stderr:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (code, String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_show_print_dead_letters_with_their_headers_and_filter_them() {
    let env = TestEnv::new().await;
    let ghost = env.coupon_id("ghost");
    let (ghost_request, ghost_value) = request_value(&ghost, "u");
    env.produce_raw(&[("junk", "{not json"), (&ghost, &ghost_value)])
        .await;
    let worker = env.spawn_worker().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while env.read_dead_letters().len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "records were not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.stop().await;

    let (code, out) = worker_cli(&env, &["dlq", "list", "--json"]).await;
    assert_eq!(code, 0, "{out}");
    let all: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(all.len(), 2);
    let (code, out) =
        worker_cli(&env, &["dlq", "list", "--json", "--kind", "unknown_coupon"]).await;
    assert_eq!(code, 0);
    let ghosts: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(ghosts.len(), 1);
    assert_eq!(ghosts[0]["key"], ghost.as_str());
    assert_eq!(ghosts[0]["request_id"], ghost_request.as_str());
    assert_eq!(ghosts[0]["attempts"], 1);
    let (_, out) = worker_cli(&env, &["dlq", "list", "--json", "--coupon", "junk"]).await;
    let junk: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(junk.len(), 1);
    assert_eq!(junk[0]["kind"], "invalid_record");
    let (_, out) = worker_cli(
        &env,
        &["dlq", "list", "--json", "--since", "2999-01-01T00:00:00Z"],
    )
    .await;
    assert_eq!(serde_json::from_str::<Vec<Value>>(&out).unwrap().len(), 0);

    // The table names both, and `show` prints one in full.
    let (code, table) = worker_cli(&env, &["dlq", "list"]).await;
    assert_eq!(code, 0);
    assert!(
        table.contains("unknown_coupon") && table.contains("invalid_record"),
        "{table}"
    );
    assert!(table.contains("2 dead letter(s)"), "{table}");
    let (p, o) = (
        ghosts[0]["partition"].to_string(),
        ghosts[0]["offset"].to_string(),
    );
    let (code, shown) = worker_cli(&env, &["dlq", "show", "--partition", &p, "--offset", &o]).await;
    assert_eq!(code, 0);
    assert!(
        shown.contains("firstcome.original.topic") && shown.contains(&ghost_request),
        "{shown}"
    );
    let (code, _) = worker_cli(&env, &["dlq", "show", "--partition", &p, "--offset", "999"]).await;
    assert_ne!(code, 0, "a missing dead letter is an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_puts_letters_back_resumes_changes_nothing_twice_and_refuses_past_the_maximum() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    // A request for a coupon that does not exist yet, and a record that is junk.
    let late = env.coupon_id("late");
    let (request_id, value) = request_value(&late, "zoe");
    env.produce_raw(&[(&late, &value), ("junk", "{not json")])
        .await;
    let worker = env.spawn_worker().await;
    let wait_letters = |n: usize| {
        let env = &env;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while env.read_dead_letters().len() < n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "fewer than {n} dead letters"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    wait_letters(2).await;
    let requests_before = env.read_request_log().len();

    // A dry run changes nothing.
    let (code, out) = worker_cli(&env, &["dlq", "replay", "--dry-run", "--group", "g1"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("would replay").count(), 2, "{out}");
    assert_eq!(env.read_request_log().len(), requests_before);

    // The coupon exists now: replay its letter, and only that one.
    assert_eq!(client.create_coupon(&late, 1).await.0, 201);
    let (code, out) = worker_cli(
        &env,
        &[
            "dlq",
            "replay",
            "--group",
            "g1",
            "--kind",
            "unknown_coupon",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let summary: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        (summary["replayed"].as_u64(), summary["skipped"].as_u64()),
        (Some(1), Some(1)),
        "{out}"
    );
    // It never went through the ingress, so it is unknown until decided.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let done = loop {
        let (code, body) = client
            .get(&format!("/v1/issue-requests/{request_id}"))
            .await;
        if code == 200 && body["status"] != "pending" {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replayed request not decided: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        done["status"], "issued",
        "the original request id is decided"
    );
    let log = env.read_request_log();
    let replayed = log
        .iter()
        .find(|r| r.headers.contains_key(Header::ReplayCount.as_str()))
        .expect("the replayed record is in the request topic");
    assert_eq!(replayed.key.as_deref(), Some(late.as_bytes()));
    assert_eq!(
        replayed
            .headers
            .get(Header::ReplayCount.as_str())
            .map(String::as_str),
        Some("1")
    );
    assert!(
        !replayed
            .headers
            .keys()
            .any(|k| k.starts_with("firstcome.error."))
    );

    // The same group resumes past what it has seen; another group replays it
    // again, which changes nothing.
    let (_, out) = worker_cli(&env, &["dlq", "replay", "--group", "g1", "--json"]).await;
    let summary: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(summary["examined"], 0, "{out}");
    let (_, out) = worker_cli(
        &env,
        &["dlq", "replay", "--group", "g2", "--kind", "unknown_coupon"],
    )
    .await;
    assert!(out.contains("1 replayed"), "{out}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while env.read_request_log().len() < log.len() + 1 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let holders: i64 = sqlx::query_scalar("SELECT count(*) FROM user_coupon WHERE coupon_id = $1")
        .bind(&late)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(holders, 1);
    let status: String =
        sqlx::query_scalar("SELECT status FROM request_ledger WHERE request_id = $1::uuid")
            .bind(&request_id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(status, "issued", "replaying twice changes nothing");

    // Junk that still fails comes back with its replay count raised, once
    // (fresh error headers, not piled up), and past the maximum it is refused.
    let replay_junk = [
        "dlq",
        "replay",
        "--group",
        "g3",
        "--kind",
        "invalid_record",
        "--max-replays",
        "1",
    ];
    let (_, out) = worker_cli(&env, &replay_junk).await;
    assert!(out.contains("1 replayed"), "{out}");
    wait_letters(3).await;
    let again = env.read_dead_letters().into_iter().last().unwrap();
    assert_eq!(again.headers[Header::ReplayCount.as_str()], "1");
    assert_eq!(again.headers[Header::ErrorKind.as_str()], "invalid_record");
    let (_, out) = worker_cli(&env, &replay_junk).await;
    assert!(
        out.contains("refused") && out.contains("1 refused"),
        "{out}"
    );
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_only_rows_past_the_retention_of_both_topics_and_refuses_a_shorter_cutoff() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let worker = env.spawn_worker().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("prune");
    assert_eq!(client.create_coupon(&coupon, 3).await.0, 201);
    for user in ["u0", "u1", "u2", "u3", "u4", "u5"] {
        assert_eq!(client.issue(&coupon, user).await.0, 202);
    }
    env.wait_decided(&[coupon.as_str()], 6).await;
    worker.stop().await;
    ingress.stop().await;

    // Four decisions 40 days old, two from now; a failure record and an
    // audit row of each age.
    let pool = &env.pool;
    sqlx::query(
        "UPDATE request_ledger SET decided_at = now() - interval '40 days' \
         WHERE coupon_id = $1 AND user_id IN ('u0', 'u1', 'u2', 'u3')",
    )
    .bind(&coupon)
    .execute(pool)
    .await
    .unwrap();
    let (old_failure, new_failure) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    for (id, age) in [(old_failure, "40 days"), (new_failure, "1 day")] {
        sqlx::query(
            "INSERT INTO request_failure (request_id, failed_at, record, reason) \
             VALUES ($1, now() - $2::interval, '\\x00', 'test')",
        )
        .bind(id)
        .bind(age)
        .execute(pool)
        .await
        .unwrap();
    }
    for age in ["500 days", "10 days"] {
        sqlx::query(
            "INSERT INTO admin_audit (token_id, action, coupon_id, at) \
             VALUES ('test', 'prune-test', $1, now() - $2::interval)",
        )
        .bind(&coupon)
        .bind(age)
        .execute(pool)
        .await
        .unwrap();
    }
    let count = |sql: &'static str| {
        let coupon = coupon.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(coupon)
                .fetch_one(pool)
                .await
                .unwrap()
        }
    };
    let ledger = "SELECT count(*) FROM request_ledger WHERE coupon_id = $1";
    let holders = "SELECT count(*) FROM user_coupon WHERE coupon_id = $1";
    let audit = "SELECT count(*) FROM admin_audit WHERE coupon_id = $1 AND action = 'prune-test'";
    let failures = |ids: [uuid::Uuid; 2]| async move {
        sqlx::query_scalar::<_, uuid::Uuid>(
            "SELECT request_id FROM request_failure WHERE request_id = ANY($1)",
        )
        .bind(ids.to_vec())
        .fetch_all(pool)
        .await
        .unwrap()
    };

    // The test topics keep records 7 days each (the broker's default): a
    // cutoff under 14 days is refused and deletes nothing.
    let out = env
        .worker_command()
        .args(["prune", "--older-than", "10d"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("retention of the topics together (14days)"),
        "{stderr}"
    );
    assert_eq!((count(ledger).await, count(audit).await), (6, 2));
    let out = env
        .worker_command()
        .args(["prune", "--older-than", "soon"])
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad duration is a usage error"
    );
    assert_eq!(count(ledger).await, 6);

    let (code, printed) = worker_cli(&env, &["prune", "--older-than", "20d", "--json"]).await;
    assert_eq!(code, 0, "{printed}");
    let pruned: Value = serde_json::from_str(printed.trim()).expect("one JSON line");
    assert!(pruned["ledger_rows"].as_u64().unwrap() >= 4, "{pruned}");
    assert_eq!(pruned["audit_rows"], 0, "audit rows stay unless asked");
    assert_eq!(count(ledger).await, 2, "only the 40-day-old rows went");
    assert_eq!(
        count(holders).await,
        3,
        "who holds the coupon is the record"
    );
    assert_eq!(
        failures([old_failure, new_failure]).await,
        vec![new_failure]
    );
    assert_eq!(count(audit).await, 2);

    let (code, printed) = worker_cli(
        &env,
        &["prune", "--older-than", "20d", "--audit-older-than", "400d"],
    )
    .await;
    assert_eq!(code, 0, "{printed}");
    assert_eq!(count(audit).await, 1, "the 500-day-old audit row went");
    assert_eq!(count(ledger).await, 2, "a second run finds nothing more");
}
