//! Poison and permanently failing records in the middle of a burst: they go
//! to the dead-letter topic with what happened, block nothing, and once the
//! cause is fixed a replay decides them at their new place in the log;
//! replaying them again changes nothing.

use firstcome_worker::deadletter::Header;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use firstcome_suite::{PARTITIONS, TestEnv, request_value};

async fn replay(env: &TestEnv, group: &str) -> serde_json::Value {
    let out = env
        .worker_command()
        .args([
            "dlq",
            "replay",
            "--group",
            group,
            "--kind",
            "permanent_failure",
            "--json",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

async fn ledger(env: &TestEnv, coupons: &[&str]) -> HashMap<String, (String, i64)> {
    let rows: Vec<(uuid::Uuid, String, i64)> = sqlx::query_as(
        "SELECT request_id, status, kafka_offset FROM request_ledger WHERE coupon_id = ANY($1)",
    )
    .bind(coupons)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, s, o)| (id.to_string(), (s, o)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_and_failing_records_are_dead_lettered_then_replayed_once_the_cause_is_fixed() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupons = vec![(env.coupon_id("p1"), 30), (env.coupon_id("p2"), 50)];
    for (id, stock) in &coupons {
        assert_eq!(client.create_coupon(id, *stock).await.0, 201);
    }
    let ids: Vec<&str> = coupons.iter().map(|(c, _)| c.as_str()).collect();
    // Postgres refuses two users of the first coupon for good.
    let refused = ["zed", "zoe"];
    for user in refused {
        env.refuse(ids[0], user).await;
    }
    let worker = env.spawn_worker().await;
    worker
        .wait_assignment("every partition", |a| a.len() == PARTITIONS as usize)
        .await;

    let mut accepted = HashSet::new();
    // First in line, so they win a unit that cannot be stored.
    for user in refused {
        let (code, body) = client.issue(ids[0], user).await;
        assert_eq!(code, 202);
        accepted.insert(body["request_id"].as_str().unwrap().to_owned());
    }
    let load = firstcome_suite::spawn_load(&client, &coupons, 400, Duration::from_millis(5), |i| {
        format!("u{}", (i * 7) % 130)
    });
    // Poison in the middle of the burst: junk, a key that is not the
    // record's coupon, and a coupon nobody created.
    env.wait_decided(&ids, 60).await;
    let (ghost_id, ghost) = request_value(&env.coupon_id("ghost"), "gus");
    let (_, misfiled) = request_value(ids[1], "mia");
    let ghost_coupon = env.coupon_id("ghost");
    env.produce_raw(&[
        (ids[0], "{not json"),
        (ids[0], &misfiled),
        (&ghost_coupon, &ghost),
    ])
    .await;
    accepted.extend(load.await.unwrap());

    let unconfirmed = HashSet::from([ghost_id]);
    let check = || {
        firstcome_suite::check_promise_with(
            &env,
            &client,
            &coupons,
            &accepted,
            &unconfirmed,
            Duration::from_secs(120),
        )
    };
    let m = check().await;
    eprintln!("before the replay: dead letters by kind {:?}", m.dead);
    for (kind, n) in [
        ("invalid_record", 1),
        ("key_mismatch", 1),
        ("unknown_coupon", 1),
        ("permanent_failure", 2),
    ] {
        assert_eq!(m.dead.get(kind), Some(&n), "{kind}: {:?}", m.dead);
    }
    let letters = env.read_dead_letters();
    for l in &letters {
        // Spelled out, as operators' tools know them: a renamed header
        // fails here.
        for h in [
            "firstcome.error.kind",
            "firstcome.error.message",
            "firstcome.error.attempts",
            "firstcome.original.topic",
            "firstcome.original.partition",
            "firstcome.original.offset",
            "firstcome.original.timestamp",
            "firstcome.consumer.group",
            "firstcome.failed_at.first",
            "firstcome.failed_at.last",
        ] {
            assert!(l.headers.contains_key(h), "{h} missing: {:?}", l.headers);
        }
        assert_eq!(l.headers[Header::ConsumerGroup.as_str()], env.group_id);
    }
    let failed = letters
        .iter()
        .filter(|l| l.headers[Header::ErrorKind.as_str()] == "permanent_failure")
        .collect::<Vec<_>>();
    assert!(
        failed
            .iter()
            .all(|l| l.key.as_deref() == Some(ids[0].as_bytes()))
    );
    assert!(
        failed
            .iter()
            .all(|l| l.headers[Header::ErrorMessage.as_str()]
                .contains("refused by the test trigger"))
    );
    // The request id header of the ingress's record stays on its dead letter.
    for l in &failed {
        let value: serde_json::Value =
            serde_json::from_slice(l.payload.as_deref().unwrap()).unwrap();
        assert_eq!(
            l.headers
                .get(firstcome::record::REQUEST_ID_HEADER)
                .map(String::as_str),
            value["request_id"].as_str(),
            "{:?}",
            l.headers
        );
    }
    let statuses: Vec<String> = ledger(&env, &ids)
        .await
        .into_values()
        .filter(|(s, _)| s == "failed")
        .map(|(s, _)| s)
        .collect();
    assert_eq!(statuses.len(), 2, "both refused requests end failed first");

    // The cause is fixed; the failures are replayed and decided at their new
    // place in the log, behind the whole burst: sold out by then.
    env.stop_refusing(ids[0]).await;
    let summary = replay(&env, "fix-1").await;
    assert_eq!(summary["replayed"], 2, "{summary}");
    // …and on the replayed records.
    let failed_ids: Vec<&str> = failed
        .iter()
        .map(|l| l.headers[firstcome::record::REQUEST_ID_HEADER].as_str())
        .collect();
    let replayed = env
        .read_request_log()
        .into_iter()
        .filter(|r| r.headers.contains_key(Header::ReplayCount.as_str()))
        .map(|r| r.headers.get(firstcome::record::REQUEST_ID_HEADER).cloned())
        .collect::<Vec<_>>();
    assert_eq!(replayed.len(), 2);
    assert!(
        replayed
            .iter()
            .all(|id| id.as_deref().is_some_and(|id| failed_ids.contains(&id))),
        "{replayed:?}"
    );
    let m = check().await;
    let after_first = ledger(&env, &ids).await;
    assert!(
        after_first.values().all(|(s, _)| s != "failed"),
        "no request stays failed once replayed"
    );
    eprintln!(
        "after the replay: {} requests decided, dead letters by kind {:?}",
        m.expected.len(),
        m.dead
    );

    // Replaying the same letters again changes nothing.
    let summary = replay(&env, "fix-2").await;
    assert_eq!(summary["replayed"], 2, "{summary}");
    check().await;
    // The second replay's records are read and answered from the decisions.
    let log_len = env.read_request_log().len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let committed = worker_done(&env, log_len).await;
        if committed {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker never read the second replay"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ledger(&env, &ids).await, after_first);
    worker.stop().await;
    ingress.stop().await;
}

/// Whether the worker's group has committed past `records` records in total.
async fn worker_done(env: &TestEnv, records: usize) -> bool {
    let (common, group) = (env.common.clone(), env.group_id.clone());
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = firstcome::kafka::client_config(&common)
            .unwrap()
            .set("group.id", &group)
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition(&common.request_topic, p);
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap();
        let total: i64 = committed
            .elements()
            .iter()
            .filter_map(|e| e.offset().to_raw().filter(|o| *o >= 0))
            .sum();
        total as usize >= records
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_whose_failure_the_ledger_refuses_too_still_answers_failed_never_404() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("nowhere");
    assert_eq!(client.create_coupon(&coupon, 5).await.0, 201);
    env.refuse(&coupon, "zed").await;
    env.refuse_failures(&coupon).await;
    let worker = env.spawn_worker().await;
    let (code, body) = client.issue(&coupon, "zed").await;
    assert_eq!(code, 202, "{body}");
    let id = body["request_id"].as_str().unwrap().to_owned();
    let done = client.wait_final(&id, Duration::from_secs(90)).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        ledger(&env, &[&coupon]).await.is_empty(),
        "the ledger took no row of it"
    );

    // Long after, once its status has left the cache.
    let key = env
        .common
        .keys()
        .unwrap()
        .request(firstcome::RequestId::parse(&id).unwrap());
    let removed: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut env.redis().await)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    let (code, later) = client.get(&format!("/v1/issue-requests/{id}")).await;
    assert_eq!(
        code, 200,
        "a request that got a 202 is never unknown: {later}"
    );
    assert_eq!(later["status"], "failed", "{later}");
    assert_eq!(later["user_id"], "zed");
    assert_eq!(later["coupon_id"], coupon.as_str());
    worker.stop().await;
    ingress.stop().await;
}

/// Red team #13: a coupon whose state is in Redis but whose row is gone
/// from Postgres (a restore to before it existed) made the worker rebuild
/// it for ever, and its whole partition stopped. Its requests are dead
/// letters, as any unknown coupon's, and the partition moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coupon_known_to_redis_but_gone_from_postgres_is_dead_lettered_and_its_partition_goes_on()
{
    let mut env = TestEnv::new().await;
    // One partition: the later request waits behind the vanished coupon's.
    env.use_single_partition().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let (gone, kept) = (env.coupon_id("gone"), env.coupon_id("kept"));
    for c in [&gone, &kept] {
        assert_eq!(client.create_coupon(c, 5).await.0, 201);
    }
    let worker = env.spawn_worker().await;
    let (code, first) = client.issue(&gone, "ann").await;
    assert_eq!(code, 202, "{first}");
    let first = client
        .wait_final(
            first["request_id"].as_str().unwrap(),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(first["status"], "issued");

    // Postgres goes back to before the coupon; Redis keeps its state.
    for sql in [
        "DELETE FROM user_coupon WHERE coupon_id = $1",
        "DELETE FROM request_ledger WHERE coupon_id = $1",
        "DELETE FROM coupon_change WHERE coupon_id = $1",
        "DELETE FROM coupon WHERE coupon_id = $1",
    ] {
        sqlx::query(sql)
            .bind(&gone)
            .execute(&env.pool)
            .await
            .unwrap();
    }
    let (late_id, late) = request_value(&gone, "bob");
    env.produce_raw(&[(gone.as_str(), late.as_str())]).await;
    // A later request of another coupon is still decided.
    let (code, next) = client.issue(&kept, "cat").await;
    assert_eq!(code, 202, "{next}");
    let next = client
        .wait_final(
            next["request_id"].as_str().unwrap(),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(next["status"], "issued", "{next}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let letters = env.read_dead_letters();
        let found = letters.iter().any(|l| {
            l.payload
                .as_deref()
                .is_some_and(|p| String::from_utf8_lossy(p).contains(&late_id))
        });
        if found {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request of the vanished coupon was never dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.stop().await;
    ingress.stop().await;
}

/// Red team #11: `dlq replay` committed the group's position only at the
/// end, so a run stopped half-way (a crash, a send that gave up, the old
/// 600 s limit under `--rate`) replayed everything again next time. It
/// commits as it goes: a run killed half-way is taken up where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_stopped_half_way_is_taken_up_where_it_stopped() {
    let env = TestEnv::new().await;
    let coupon = env.coupon_id("letters");
    let letters: Vec<(String, String)> = (0..250)
        .map(|i| request_value(&coupon, &format!("u{i}")))
        .collect();
    let records: Vec<(&str, &str)> = letters
        .iter()
        .map(|(_, v)| (coupon.as_str(), v.as_str()))
        .collect();
    env.produce_raw_to(&env.common.dlq_topic, &records).await;

    let mut first = env
        .worker_command()
        .args([
            "dlq", "replay", "--group", "resume", "--rate", "40", "--json",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while env.read_request_log().len() < 130 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replay never got going"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.kill().await.unwrap();
    let replayed_first = env.read_request_log().len();
    assert!(
        replayed_first < 250,
        "killed before the end ({replayed_first})"
    );

    let out = env
        .worker_command()
        .args(["dlq", "replay", "--group", "resume", "--json"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    let examined = summary["examined"].as_u64().unwrap();
    assert!(
        examined <= 150,
        "the second run started over: it examined {examined} of 250 ({replayed_first} replayed before the kill)"
    );
    // Every letter was replayed at least once, none lost.
    let log = env.read_request_log();
    let seen: HashSet<String> = log
        .iter()
        .filter_map(|r| r.payload.as_deref())
        .map(|p| serde_json::from_slice::<serde_json::Value>(p).unwrap()["request_id"].to_string())
        .collect();
    assert_eq!(seen.len(), 250, "every letter replayed");
}
