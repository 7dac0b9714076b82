//! Checking the promise: the oracle's replay of the log
//! ([`firstcome::oracle`]) against what Postgres and the API say.

use super::*;

/// Waits until every accepted request of `coupons` (id, stock) is decided,
/// then checks the promise against the request log: each coupon sits in one
/// partition; its issued users are exactly the first `stock` distinct users
/// in log order; every request got the decision its place in the log
/// implies, once; nobody holds a coupon twice; the counters add up; the
/// ledger knows where each request sat. Demand must exceed every stock.
pub async fn check_promise(
    env: &TestEnv,
    client: &Client,
    coupons: &[(String, i64)],
    accepted: &std::collections::HashSet<String>,
    limit: Duration,
) {
    check_promise_with(env, client, coupons, accepted, &Default::default(), limit).await;
}

/// What is known of requests answered `202` that the log read did not hold:
/// whether the worker decided them (then the read missed them), what the
/// status API says (a `pending` entry names the offset the broker gave), and
/// whether a second read finds them.
async fn explain_lost(env: &TestEnv, client: &Client, lost: &[&String]) -> String {
    let again: std::collections::HashSet<String> = model(env, &[]).logged;
    let mut out = String::new();
    for id in lost {
        let row: Option<(String, i32, i64)> = sqlx::query_as(
            "SELECT status, kafka_partition, kafka_offset FROM request_ledger
             WHERE request_id = $1::uuid",
        )
        .bind(id.as_str())
        .fetch_optional(&env.pool)
        .await
        .unwrap();
        let (code, status) = client.get(&format!("/v1/issue-requests/{id}")).await;
        out.push_str(&format!(
            "{id}: ledger {row:?}; status {code} {status}; in a second read: {}\n",
            again.contains(*id)
        ));
    }
    out
}

/// The decisions the request log implies: the oracle's replay
/// ([`firstcome::oracle`]).
pub type LogModel = firstcome::oracle::Replay;
/// An admin change as the oracle applies it (see `coupon_change`).
pub type RuleChange = firstcome::oracle::Change;
/// What decides a coupon's requests (see [`firstcome::oracle::Rules`]).
pub type CouponRules = firstcome::oracle::Rules;

/// Reads a coupon's changes from `coupon_change`, onto its creation stock
/// (its window is not read: tests that change windows pass their own).
pub async fn coupon_rules(env: &TestEnv, coupon: &str, stock: i64) -> CouponRules {
    let rows: Vec<(String, Value, Option<i64>)> = sqlx::query_as(
        "SELECT kind, detail, after_offset FROM coupon_change
         WHERE coupon_id = $1 ORDER BY applied_at, change_id",
    )
    .bind(coupon)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let time = |v: &Value| -> Option<chrono::DateTime<chrono::Utc>> {
        v.as_str().map(|t| t.parse().unwrap())
    };
    let changes = rows
        .into_iter()
        .map(|(kind, detail, after)| {
            let change = match kind.as_str() {
                "add_stock" => RuleChange::AddStock(detail["add"].as_i64().unwrap()),
                "close" => RuleChange::Close(time(&detail["at"]).unwrap()),
                "reopen" => RuleChange::Reopen(time(&detail["ends_at"])),
                other => panic!("unknown change {other}"),
            };
            (after, change)
        })
        .collect();
    CouponRules {
        changes,
        ..CouponRules::stock(stock)
    }
}

/// Replays the request log against the dead letters with the oracle; each
/// coupon has its stock and no window.
pub fn model(env: &TestEnv, coupons: &[(String, i64)]) -> LogModel {
    let rules: HashMap<String, CouponRules> = coupons
        .iter()
        .map(|(c, s)| (c.clone(), CouponRules::stock(*s)))
        .collect();
    model_with(env, &rules)
}

/// [`model`] with windows and admin changes.
pub fn model_with(env: &TestEnv, rules: &HashMap<String, CouponRules>) -> LogModel {
    use firstcome_worker::deadletter::Header;
    let topic = &env.common.request_topic;
    let dead: HashMap<(i32, i64), String> = env
        .read_dead_letters()
        .into_iter()
        .filter(|d| d.headers.get(Header::OriginalTopic.as_str()) == Some(topic))
        .map(|d| {
            let at = (
                d.headers[Header::OriginalPartition.as_str()]
                    .parse()
                    .unwrap(),
                d.headers[Header::OriginalOffset.as_str()].parse().unwrap(),
            );
            (at, d.headers[Header::ErrorKind.as_str()].clone())
        })
        .collect();
    let log = env
        .read_request_log()
        .into_iter()
        .map(|rec| firstcome::oracle::Logged {
            partition: rec.partition,
            offset: rec.offset,
            key: rec.key,
            payload: rec.payload,
        });
    firstcome::oracle::replay(log, &dead, rules)
}

/// A ledger row as the checks read it: request id, status, partition,
/// offset, coupon, user.
pub type LedgerEntry = (uuid::Uuid, String, i32, i64, String, String);

/// Every ledger row of `coupons`.
pub async fn ledger_rows(env: &TestEnv, coupons: &[&str]) -> Vec<LedgerEntry> {
    sqlx::query_as(
        "SELECT request_id, status, kafka_partition, kafka_offset, coupon_id, user_id
         FROM request_ledger WHERE coupon_id = ANY($1)",
    )
    .bind(coupons)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

/// `request id -> (status, partition, offset)` of ledger rows, as
/// [`assert_decisions_match`] takes them.
pub fn decisions(rows: &[LedgerEntry]) -> HashMap<String, (String, i32, i64)> {
    rows.iter()
        .map(|(id, s, p, o, _, _)| (id.to_string(), (s.clone(), *p, *o)))
        .collect()
}

/// The ledger (`request id -> (status, partition, offset)`) holds exactly
/// the decisions the oracle replayed, each at its place in the log; `rule`
/// names what the replay followed, for the message.
pub fn assert_decisions_match(
    m: &LogModel,
    ledger: &HashMap<String, (String, i32, i64)>,
    rule: &str,
) {
    let mismatches: Vec<_> = m
        .expected
        .iter()
        .filter(|(id, (want, p, o))| {
            ledger.get(*id).map(|(s, p, o)| (s.as_str(), *p, *o)) != Some((want.as_str(), *p, *o))
        })
        .take(5)
        .map(|(id, want)| (id, want, ledger.get(id)))
        .collect();
    assert!(
        mismatches.is_empty(),
        "decisions differ from {rule} (id, expected, ledger): {mismatches:?}"
    );
    assert_eq!(
        ledger.len(),
        m.expected.len(),
        "no ledger row without a log record"
    );
}

/// Checks that the holders of `coupon` in `user_coupon` are exactly
/// `winners` (the model's issued users), nobody twice; returns how many.
pub async fn assert_holders(env: &TestEnv, coupon: &str, winners: &[String]) -> usize {
    use std::collections::HashSet;
    let issued: Vec<String> =
        sqlx::query_scalar("SELECT user_id FROM user_coupon WHERE coupon_id = $1")
            .bind(coupon)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let issued_set: HashSet<&String> = issued.iter().collect();
    assert_eq!(
        issued.len(),
        issued_set.len(),
        "nobody holds {coupon} twice"
    );
    assert_eq!(
        issued_set,
        winners.iter().collect(),
        "the holders of {coupon} are its winners in log order"
    );
    issued.len()
}

/// [`check_promise`] after faults: `unconfirmed` requests (a 503 naming the
/// request, or records written around the ingress) may or may not be in the
/// log; those that are are decided like any other, those that are not are
/// unknown to the status endpoint. Dead-lettered records must all be
/// explained, and they decide nothing. Returns the model it checked against.
pub async fn check_promise_with(
    env: &TestEnv,
    client: &Client,
    coupons: &[(String, i64)],
    accepted: &std::collections::HashSet<String>,
    unconfirmed: &std::collections::HashSet<String>,
    limit: Duration,
) -> LogModel {
    use std::collections::HashSet;
    let ids: Vec<&str> = coupons.iter().map(|(c, _)| c.as_str()).collect();
    // Wait until the ledger holds what the log implies.
    let deadline = tokio::time::Instant::now() + limit;
    let m = loop {
        let m = model(env, coupons);
        let decided = env.decided_count(&ids).await;
        if decided as usize == m.expected.len() && m.unexplained.is_empty() {
            break m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{decided} of {} decided; undecided positions without a dead letter: {:?}",
            m.expected.len(),
            &m.unexplained[..m.unexplained.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let lost: Vec<&String> = accepted.difference(&m.logged).take(5).collect();
    if !lost.is_empty() {
        panic!(
            "accepted but not in the log: {lost:?}\n{}",
            explain_lost(env, client, &lost).await
        );
    }
    let strangers: Vec<&String> = m
        .logged
        .iter()
        .filter(|id| !accepted.contains(*id) && !unconfirmed.contains(*id))
        .take(5)
        .collect();
    assert!(
        strangers.is_empty(),
        "in the log, never sent: {strangers:?}"
    );
    let undecided: Vec<&String> = m
        .logged
        .iter()
        .filter(|id| !m.expected.contains_key(*id) && !m.dead_ids.contains(*id))
        .take(5)
        .collect();
    assert!(
        undecided.is_empty(),
        "in the log, but neither decided nor failed: {undecided:?}"
    );

    // Every request got exactly the decision its place in the log implies,
    // once, and the ledger says where that place was.
    let got = decisions(&ledger_rows(env, &ids).await);
    assert_decisions_match(&m, &got, "log order");

    for (coupon, stock) in coupons {
        assert_eq!(
            m.partitions.get(coupon).map(HashSet::len),
            Some(1),
            "all of {coupon} sits in one partition"
        );
        let winners = m.winners.get(coupon).cloned().unwrap_or_default();
        assert_eq!(
            winners.len() as i64,
            *stock,
            "demand exceeds the stock of {coupon}"
        );
        // The issued users in Postgres are exactly the first `stock` distinct users.
        assert_holders(env, coupon, &winners).await;
        let (code, view) = client.get(&format!("/v1/coupons/{coupon}")).await;
        assert_eq!(code, 200);
        let (remaining, count) = (
            view["remaining_stock"].as_i64().unwrap(),
            view["issued_count"].as_i64().unwrap(),
        );
        assert_eq!((remaining, count), (0, *stock), "{view}");
        assert_eq!(remaining + count, view["total_stock"].as_i64().unwrap());
    }

    let mut statuses: std::collections::BTreeMap<&str, usize> = Default::default();
    for (status, _, _) in m.expected.values() {
        *statuses.entry(status.as_str()).or_default() += 1;
    }
    eprintln!(
        "promise held: {} log records, {} requests accepted (202), {} unconfirmed (503), \
         statuses {statuses:?}, dead letters {:?}",
        m.records,
        accepted.len(),
        unconfirmed.len(),
        m.dead
    );

    // Through the API: a sample of the accepted, and the unconfirmed.
    for id in accepted.iter().take(20) {
        let (code, status) = client.get(&format!("/v1/issue-requests/{id}")).await;
        assert_eq!(code, 200);
        assert_eq!(status["status"], got[id].0.as_str());
    }
    for id in unconfirmed.iter().take(50) {
        let (code, status) = client.get(&format!("/v1/issue-requests/{id}")).await;
        match got.get(id) {
            Some((want, _, _)) => assert_eq!((code, &status["status"]), (200, &json!(want))),
            None => assert_eq!(code, 404, "never written, so unknown: {status}"),
        }
    }
    m
}
