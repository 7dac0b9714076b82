//! Every SQL statement the binaries run, read from their source, against
//! the rules a Postgres sharded by coupon id needs (Citus distributing
//! `coupon`, `request_ledger`, `user_coupon`, `coupon_change` and
//! `admin_audit` by `coupon_id`, colocated; `request_failure` by
//! `request_id`): see docs/operations.md, "Past one Postgres".
//!
//! Each statement is in one class. *Keyed* statements name one coupon (or
//! one failed request) and run on one shard; the test checks that they do.
//! *Fan-out* statements read or trim every shard and are kept off the
//! decision's path, for a reason given here. *Open* statements must change
//! before the tables are distributed; the list is exact, so a new statement
//! that breaks the rules fails here until it is classified, and a fixed one
//! must leave the list.

use firstcome_suite::{TestEnv, sources};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// One coupon (or one failed request): one shard.
    Keyed,
    /// Every shard, off the decision's path.
    FanOut,
    /// Must change before sharding.
    Open,
    /// Touches no table.
    Local,
}

use Class::*;

/// (a piece of the statement that identifies it, its class, why).
const STATEMENTS: &[(&str, Class, &str)] = &[
    ("INSERT INTO coupon (", Keyed, "creates one coupon"),
    (
        "FROM coupon WHERE coupon_id = $1\"",
        Keyed,
        "reads one coupon",
    ),
    (
        "FROM coupon ORDER BY coupon_id",
        FanOut,
        "every coupon: `firstcome-worker rebuild --all` and reconcile, operator tools",
    ),
    (
        "WHERE ends_at IS NULL OR ends_at > now()",
        FanOut,
        "the live coupons: the ingress's warm-up at start",
    ),
    (
        "SELECT user_id FROM user_coupon WHERE coupon_id = $1",
        Keyed,
        "one coupon's holders (reconcile)",
    ),
    (
        "SELECT count(*) FROM user_coupon WHERE coupon_id = $1",
        Keyed,
        "one coupon's issued count",
    ),
    (
        "UPDATE coupon SET redis_epoch = redis_epoch + 1 WHERE coupon_id = $1",
        Keyed,
        "a rebuild's new epoch",
    ),
    (
        "FROM request_ledger WHERE coupon_id = $1 AND status <> 'failed'",
        Keyed,
        "one coupon's holders and decisions (rebuild)",
    ),
    (
        "SELECT redis_epoch, decided_seq FROM coupon WHERE coupon_id = $1",
        Keyed,
        "one coupon's fence",
    ),
    (
        "SELECT 1 FROM coupon WHERE coupon_id = ANY($1) ORDER BY coupon_id FOR UPDATE",
        Open,
        "the store locks every coupon of a batch in one transaction: a batch spans the coupons of one Kafka partition, so it needs one transaction per coupon, or the tables distributed by the partition's coupons together",
    ),
    (
        "WITH input AS (",
        Open,
        "the store: one statement for every coupon of a batch, with correlated subqueries across them; per coupon it would run on one shard",
    ),
    (
        "FROM request_ledger WHERE request_id = $1",
        FanOut,
        "a status lookup the Redis status could not answer (expired or lost): the URL names no coupon",
    ),
    (
        "JOIN request_ledger l USING (request_id, kafka_offset)",
        Open,
        "the decision stream reads back each batch's decisions by request id, on the decision's path: it must name their coupons",
    ),
    (
        "INSERT INTO request_failure",
        Keyed,
        "distributed by its request id",
    ),
    (
        "SELECT failed_at, record FROM request_failure WHERE request_id = $1",
        Keyed,
        "distributed by its request id",
    ),
    (
        "FROM user_coupon WHERE user_id = $1",
        FanOut,
        "a user's holdings (`GET /v1/users/{id}/coupons`): a user holds coupons on every shard",
    ),
    (
        "WHERE $1::text IS NULL OR coupon_id > $1 ORDER BY coupon_id LIMIT $2",
        FanOut,
        "the admin's coupon list, a page at a time",
    ),
    (
        "WHERE coupon_id = $1 FOR UPDATE",
        Keyed,
        "an admin change locks its coupon",
    ),
    (
        "FROM coupon_change WHERE change_id = $1",
        Open,
        "an admin change's retry looks its key up without the coupon: the key must be (coupon, change id)",
    ),
    (
        "FROM coupon_change WHERE coupon_id = $1 AND kind = 'close'",
        Keyed,
        "one coupon's last close",
    ),
    (
        "UPDATE coupon SET total_stock = $2",
        Keyed,
        "an admin change to one coupon",
    ),
    (
        "INSERT INTO coupon_change (",
        Keyed,
        "one coupon's change, and its last stored offset",
    ),
    (
        "INSERT INTO admin_audit",
        Keyed,
        "one coupon's audit row (an audit row without a coupon goes to the shard of the null key)",
    ),
    (
        "SELECT status, count(*) FROM request_ledger WHERE coupon_id = $1",
        Keyed,
        "one coupon's counts",
    ),
    (
        "SELECT c.coupon_id, c.redis_epoch, c.retire_epoch",
        FanOut,
        "the retire sweep, every minute, over the coupons whose sale is over",
    ),
    (
        "UPDATE coupon SET retire_epoch = $2",
        Keyed,
        "one coupon's retirement",
    ),
    (
        "UPDATE coupon SET retired_epoch = $2",
        Keyed,
        "one coupon's retirement",
    ),
    (
        "SELECT retired_epoch IS NOT DISTINCT FROM redis_epoch FROM coupon WHERE coupon_id = $1",
        Keyed,
        "one coupon's retirement",
    ),
    (
        "DELETE FROM request_ledger WHERE request_id IN",
        FanOut,
        "prune, by age, in batches",
    ),
    (
        "DELETE FROM request_failure WHERE request_id IN",
        FanOut,
        "prune, by age, in batches",
    ),
    (
        "DELETE FROM admin_audit WHERE audit_id IN",
        FanOut,
        "prune, by age, in batches",
    ),
    ("SELECT 1\"", Local, "readiness: Postgres answers"),
];

/// The tables distributed by coupon id.
const BY_COUPON: [&str; 5] = [
    "coupon",
    "request_ledger",
    "user_coupon",
    "coupon_change",
    "admin_audit",
];

/// Every string literal of `text` that reads as SQL, whitespace folded.
fn sql_literals(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        // Comments may quote SQL; they are not run.
        if text[i..].starts_with("//") {
            i += text[i..].find('\n').unwrap_or(text.len() - i);
            continue;
        }
        if bytes[i] != b'"' || (i > 0 && bytes[i - 1] == b'\'') {
            i += 1;
            continue;
        }
        let start = i + 1;
        let mut j = start;
        while j < bytes.len() && !(bytes[j] == b'"' && bytes[j - 1] != b'\\') {
            j += 1;
        }
        // A `\` at a line's end continues the literal on the next line.
        let literal = text[start..j].replace("\\\n", " ");
        let folded = literal.split_whitespace().collect::<Vec<_>>().join(" ");
        let first = folded.split(' ').next().unwrap_or("");
        // One word alone is a Redis command or an HTTP method.
        if folded.contains(' ')
            && ["SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "SET"].contains(&first)
        {
            out.push(folded);
        }
        i = j + 1;
    }
    out
}

/// The statements of the three crates the binaries are built from.
fn statements() -> Vec<(String, String)> {
    let mut found = Vec::new();
    for krate in ["firstcome", "firstcome-ingress", "firstcome-worker"] {
        for path in sources::rust_files(krate) {
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests' own statements are not the binaries'.
            let text = text.split("#[cfg(test)]").next().unwrap();
            for s in sql_literals(text) {
                found.push((path.display().to_string(), s));
            }
        }
    }
    found
}

/// Whether a keyed statement names one coupon (or one failed request) in
/// a way a router can read: `coupon_id = $n`, or a single-row `INSERT`
/// that lists `coupon_id`.
fn names_its_key(s: &str) -> bool {
    let single_insert = s.starts_with("INSERT INTO")
        && s.contains(" VALUES (")
        && s.split(')')
            .next()
            .is_some_and(|cols| cols.contains("coupon_id"));
    let failure = s.contains("request_failure")
        && (s.contains("request_id = $1") || s.starts_with("INSERT INTO request_failure"));
    (s.contains("coupon_id = $") && !s.contains("coupon_id = ANY(")) || single_insert || failure
}

/// The tables of [`BY_COUPON`] a statement reads or writes.
fn coupon_tables(s: &str) -> Vec<&'static str> {
    BY_COUPON
        .iter()
        .copied()
        .filter(|t| {
            [" FROM ", " INTO ", "UPDATE ", " JOIN "]
                .iter()
                .any(|k| s.contains(&format!("{k}{t} ")) || s.ends_with(&format!("{k}{t}")))
        })
        .collect()
}

#[test]
fn every_statement_is_keyed_by_its_coupon_or_named_as_a_fan_out_or_an_open_item() {
    let found = statements();
    assert!(found.len() >= 30, "the statements were read: {found:?}");
    let mut used = vec![0usize; STATEMENTS.len()];
    let mut wrong = Vec::new();
    for (file, s) in &found {
        let matches: Vec<usize> = STATEMENTS
            .iter()
            .enumerate()
            .filter(|(_, (needle, _, _))| {
                // A needle ending in `"` must end the statement.
                match needle.strip_suffix('"') {
                    Some(end) => s.ends_with(end),
                    None => s.contains(needle),
                }
            })
            .map(|(i, _)| i)
            .collect();
        // The most specific (longest) needle decides.
        let Some(&i) = matches.iter().max_by_key(|i| STATEMENTS[**i].0.len()) else {
            wrong.push(format!("not classified ({file}): {s}"));
            continue;
        };
        used[i] += 1;
        let (_, class, why) = STATEMENTS[i];
        match class {
            Keyed if !names_its_key(s) => wrong.push(format!(
                "said keyed ({why}) but names no single key ({file}): {s}"
            )),
            Local if !coupon_tables(s).is_empty() => wrong.push(format!(
                "said local but touches {:?}: {s}",
                coupon_tables(s)
            )),
            FanOut | Open if names_its_key(s) => wrong.push(format!(
                "said {class:?} ({why}) but it names its coupon: keyed now? ({file}): {s}"
            )),
            _ => {}
        }
    }
    for (i, n) in used.iter().enumerate() {
        if *n == 0 {
            wrong.push(format!(
                "no statement matches {:?} any more",
                STATEMENTS[i].0
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let open: Vec<&str> = STATEMENTS
        .iter()
        .filter(|(_, c, _)| *c == Open)
        .map(|(n, _, _)| *n)
        .collect();
    eprintln!(
        "{} statements: {} open items before the tables can be distributed: {open:?}",
        found.len(),
        open.len()
    );
}

#[test]
fn the_reader_finds_sql_in_plain_raw_and_continued_literals_and_not_in_comments() {
    let text = "// \"SELECT nothing\"\nlet a = \"SELECT 1 FROM coupon\n    WHERE coupon_id = $1\";\n\
                let b = \"DELETE FROM x WHERE a IN \\\n (SELECT 1)\";\nlet c = \"not sql\";";
    assert_eq!(
        sql_literals(text),
        [
            "SELECT 1 FROM coupon WHERE coupon_id = $1",
            "DELETE FROM x WHERE a IN (SELECT 1)"
        ]
    );
    assert!(names_its_key("SELECT 1 FROM coupon WHERE coupon_id = $1"));
    assert!(!names_its_key(
        "SELECT 1 FROM coupon WHERE coupon_id = ANY($1)"
    ));
    assert!(names_its_key(
        "INSERT INTO coupon (coupon_id, name) VALUES ($1, $2)"
    ));
    assert_eq!(
        coupon_tables("SELECT a FROM user_coupon WHERE x"),
        ["user_coupon"]
    );
}

/// Rows a plan read from the CTE `name`, over every scan of it: what the
/// store costs in the batch's rows, counted by Postgres rather than timed.
fn rows_read_from(node: &Value, name: &str) -> f64 {
    let own = if node["Node Type"] == "CTE Scan" && node["CTE Name"] == name {
        let per_loop = node["Actual Rows"].as_f64().unwrap_or(0.0)
            + node["Rows Removed by Filter"].as_f64().unwrap_or(0.0);
        per_loop * node["Actual Loops"].as_f64().unwrap_or(0.0)
    } else {
        0.0
    };
    let children = node["Plans"].as_array().map_or(0.0, |plans| {
        plans.iter().map(|p| rows_read_from(p, name)).sum()
    });
    own + children
}

/// The store checks a batch against the fence in one pass, however many
/// coupons the batch spans. It used to check each coupon by reading the
/// whole batch again, so a batch spread over 2,000 coupons read its input
/// 16 million times and took seconds (docs/benchmarks.md, "spread").
/// Postgres's own count, from the plan of a real store rolled back.
#[tokio::test]
async fn the_store_reads_its_batch_a_bounded_number_of_times_however_many_coupons_it_spans() {
    let env = TestEnv::new().await;
    let store = statements()
        .into_iter()
        .map(|(_, s)| s)
        .find(|s| s.starts_with("WITH input AS ("))
        .expect("the store's statement is in the source");
    let n: i64 = 1_000;
    let coupons: Vec<String> = (0..n).map(|i| env.coupon_id(&format!("c{i}"))).collect();
    let ids: Vec<uuid::Uuid> = (0..n).map(|_| uuid::Uuid::new_v4()).collect();
    let users: Vec<String> = (0..n).map(|i| format!("u{i}")).collect();
    let statuses = vec!["issued"; n as usize];
    let partitions = vec![0i32; n as usize];
    let offsets: Vec<i64> = (0..n).collect();
    let now = vec![chrono::Utc::now(); n as usize];
    let (epochs, seqs) = (vec![Some(1i64); n as usize], vec![Some(1i64); n as usize]);
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO coupon (coupon_id, name, total_stock, redis_epoch)
         SELECT id, id, 1, 1 FROM unnest($1::text[]) id",
    )
    .bind(&coupons)
    .execute(&mut *tx)
    .await
    .unwrap();
    let plan: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, FORMAT JSON) {store}"
    )))
    .bind(&ids)
    .bind(&coupons)
    .bind(&users)
    .bind(&statuses)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&now)
    .bind(&now)
    .bind(&epochs)
    .bind(&seqs)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_coupon WHERE coupon_id = ANY($1)")
            .bind(&coupons)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(stored, n, "the store ran and issued each coupon's unit");
    let read = rows_read_from(&plan[0]["Plan"], "input");
    eprintln!("the store read {read} rows of `input` for a {n}-row batch over {n} coupons");
    assert!(
        read > 0.0,
        "the plan reads the batch from `input`: {plan:#}"
    );
    assert!(
        read <= 10.0 * n as f64,
        "the store read {read} rows of a {n}-row batch spread over {n} coupons: more than \
         ten per row, so its cost grows with the coupons a batch spans"
    );
}
