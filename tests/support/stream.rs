//! The decision stream, read as a downstream `read_committed` consumer reads
//! it, and checked against the ledger: every stored decision once, as
//! Postgres holds it, in each coupon's decision order, and nothing else.

use std::collections::{BTreeMap, HashMap};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::client::Scrape;
use crate::services::{Hanging, KafkaOperator};

use super::*;

/// One event of the decision topic and where it sat.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    /// The partition of the decision topic.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// The record's key: the coupon id.
    pub key: String,
    /// The event (docs/decision-stream.md).
    pub event: Value,
}

/// Reads the decision topic as a `read_committed` consumer, from the start
/// to the end each partition has once every transaction open now has ended
/// (committed, aborted, or timed out by the broker); panics past `limit`.
pub fn read_decisions(env: &TestEnv, limit: Duration) -> Vec<StreamEvent> {
    let topic = &env.common.decision_topic;
    let consumer: BaseConsumer = firstcome::kafka::client_config(&env.common)
        .unwrap()
        .set("group.id", unique("stream-reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions: Vec<i32> = meta.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    assert!(!partitions.is_empty(), "topic {topic} exists");
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        ends.insert(p, high);
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let deadline = std::time::Instant::now() + limit;
    let mut out = Vec::new();
    loop {
        // The position moves past commit markers and aborted records too,
        // which the consumer never hands over.
        let position = consumer.position().unwrap();
        let behind: Vec<(i32, i64, i64)> = partitions
            .iter()
            .filter_map(|&p| {
                let at = match position.find_partition(topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(n)) => n,
                    _ => 0,
                };
                (at < ends[&p]).then_some((p, at, ends[&p]))
            })
            .collect();
        if behind.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the decision stream was not readable to its end in {limit:?} \
             (partition, position, end): {behind:?}; an open transaction holds it"
        );
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            out.push(StreamEvent {
                partition: m.partition(),
                offset: m.offset(),
                key: String::from_utf8(m.key().unwrap_or_default().to_vec()).unwrap(),
                event: serde_json::from_slice(m.payload().unwrap_or_default())
                    .expect("an event is JSON"),
            });
        }
    }
    out.sort_by_key(|e| (e.partition, e.offset));
    out
}

/// Checks the stream against the ledger for `coupons`: each stored decision
/// appears exactly once (by event id and by request; a request that failed
/// and was replayed has its `failed` event first), says what the ledger
/// says, under its coupon's key, in the coupon's decision order (the log
/// order of the records that decided them, and their decision numbers);
/// and no event names a decision the ledger does not hold. Events still
/// waiting for a worker's next transaction are waited for, up to `limit`.
/// Returns the number of events checked.
pub async fn check_decision_stream(env: &TestEnv, coupons: &[&str], limit: Duration) -> usize {
    let coupon_list: Vec<String> = coupons.iter().map(|c| c.to_string()).collect();
    #[allow(clippy::type_complexity)]
    let rows: Vec<(uuid::Uuid, String, String, String, Option<i64>, i32, i64)> = sqlx::query_as(
        "SELECT request_id, coupon_id, user_id, status, decision_seq, kafka_partition, kafka_offset
         FROM request_ledger WHERE coupon_id = ANY($1)",
    )
    .bind(&coupon_list)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let ledger: HashMap<String, _> = rows.into_iter().map(|r| (r.0.to_string(), r)).collect();
    let deadline = std::time::Instant::now() + limit;
    let events = loop {
        let events: Vec<StreamEvent> = read_decisions(env, limit)
            .into_iter()
            .filter(|e| coupon_list.contains(&e.key))
            .collect();
        let streamed: std::collections::HashSet<&str> = events
            .iter()
            .filter_map(|e| e.event["request_id"].as_str())
            .collect();
        let missing: Vec<&String> = ledger
            .keys()
            .filter(|id| !streamed.contains(id.as_str()))
            .collect();
        if missing.is_empty() {
            break events;
        }
        if std::time::Instant::now() >= deadline {
            panic!(
                "{} of {} stored decisions are not in the stream; {}",
                missing.len(),
                ledger.len(),
                gaps(env, &ledger, &streamed, &missing)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let mut seen_events = HashMap::new();
    let mut by_request: HashMap<String, Vec<&StreamEvent>> = HashMap::new();
    let mut by_coupon: BTreeMap<String, Vec<&StreamEvent>> = BTreeMap::new();
    for e in &events {
        let ev = &e.event;
        let event_id = ev["event_id"].as_str().expect("event_id").to_owned();
        if let Some(first) = seen_events.insert(event_id.clone(), (e.partition, e.offset)) {
            panic!(
                "event {event_id} twice: at {first:?} and at {:?}: {ev}",
                (e.partition, e.offset)
            );
        }
        let request_id = ev["request_id"].as_str().expect("request_id").to_owned();
        by_request.entry(request_id).or_default().push(e);
        by_coupon.entry(e.key.clone()).or_default().push(e);
    }
    for (request_id, evs) in &by_request {
        let Some(row) = ledger.get(request_id) else {
            panic!("an event the ledger does not hold: {}", evs[0].event);
        };
        let (last, earlier) = evs.split_last().expect("one at least");
        for e in earlier {
            assert_eq!(
                e.event["status"], "failed",
                "request {request_id} decided twice in the stream: {} then {}",
                e.event, last.event
            );
        }
        let ev = &last.event;
        assert_eq!(last.key, row.1, "keyed by its coupon: {ev}");
        assert_eq!(ev["coupon_id"], row.1.as_str(), "{ev}");
        assert_eq!(ev["user_id"], row.2.as_str(), "{ev}");
        assert_eq!(ev["status"], row.3.as_str(), "what the ledger holds: {ev}");
        assert_eq!(ev["decision_seq"].as_i64(), row.4, "{ev}");
        assert_eq!(
            ev["request_partition"].as_i64(),
            Some(i64::from(row.5)),
            "{ev}"
        );
        assert_eq!(ev["request_offset"].as_i64(), Some(row.6), "{ev}");
    }
    for (coupon, evs) in &by_coupon {
        let partitions: std::collections::BTreeSet<i32> = evs.iter().map(|e| e.partition).collect();
        assert_eq!(
            partitions.len(),
            1,
            "coupon {coupon} in one partition of the stream"
        );
        // A failed request replayed later is decided at its new place.
        let decided: Vec<&&StreamEvent> = evs
            .iter()
            .filter(|e| e.event["status"] != "failed")
            .collect();
        for w in decided.windows(2) {
            let (a, b) = (&w[0].event, &w[1].event);
            assert!(
                a["request_offset"].as_i64() < b["request_offset"].as_i64(),
                "coupon {coupon}: the stream's order is not the decision order:\n{a}\n{b}"
            );
            if let (Some(x), Some(y)) = (a["decision_seq"].as_i64(), b["decision_seq"].as_i64()) {
                assert!(
                    x < y,
                    "coupon {coupon}: decision numbers out of order:\n{a}\n{b}"
                );
            }
        }
    }
    events.len()
}

/// Where the missing decisions sit in the request topic, beside what the
/// stream holds of each such partition and the group's committed offsets:
/// the facts a loss is explained from.
#[allow(clippy::type_complexity)]
fn gaps(
    env: &TestEnv,
    ledger: &HashMap<String, (uuid::Uuid, String, String, String, Option<i64>, i32, i64)>,
    streamed: &std::collections::HashSet<&str>,
    missing: &[&String],
) -> String {
    let ranges = |offsets: &mut Vec<i64>| {
        offsets.sort_unstable();
        let mut out: Vec<(i64, i64)> = Vec::new();
        for &o in offsets.iter() {
            match out.last_mut() {
                Some((_, end)) if *end + 1 == o => *end = o,
                _ => out.push((o, o)),
            }
        }
        out
    };
    let mut lost: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for id in missing {
        let row = &ledger[*id];
        lost.entry(row.5).or_default().push(row.6);
    }
    let mut have: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for (id, row) in ledger {
        if streamed.contains(id.as_str()) && lost.contains_key(&row.5) {
            have.entry(row.5).or_default().push(row.6);
        }
    }
    let consumer: BaseConsumer = firstcome::kafka::client_config(&env.common)
        .unwrap()
        .set("group.id", &env.group_id)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for &p in lost.keys() {
        tpl.add_partition(&env.common.request_topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .map(|c| {
            c.elements()
                .iter()
                .map(|e| (e.partition(), e.offset()))
                .collect::<Vec<_>>()
        });
    let mut out = String::new();
    for (p, offsets) in &mut lost {
        let streamed_ranges = ranges(have.entry(*p).or_default());
        out.push_str(&format!(
            "\npartition {p}: missing request offsets {:?}; streamed {:?}",
            ranges(offsets),
            streamed_ranges
        ));
    }
    format!("{out}\ncommitted offsets of the group: {committed:?}")
}

/// What the operator on call did.
#[derive(Debug, Default)]
pub struct OnCall {
    /// The transactions it aborted.
    pub aborted: Vec<Hanging>,
    /// Reports of a stall that Kafka's find-hanging did not confirm, 30 s
    /// and more after the last abort: an alert that pages for nothing.
    pub false_alarms: Vec<String>,
}

/// The operator on call (docs/operations.md, "Decision stream hanging"):
/// whenever a worker reports the decision stream stalled, aborts every
/// transaction Kafka's find-hanging lists (any topic: the group's offsets
/// too). A worker that is down or frozen is skipped; while the tool cannot
/// reach a broker (killed, starting), it tries again a second later. Until
/// `stop`.
pub async fn on_call_operator(
    kafka: KafkaOperator,
    workers: Vec<SocketAddr>,
    stop: CancellationToken,
) -> OnCall {
    let started = std::time::Instant::now();
    let mut done = OnCall::default();
    let mut last_abort: Option<std::time::Instant> = None;
    let mut last_alarm: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return done,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let mut stalled = 0.0;
        for ops in &workers {
            if let Some(scrape) = Scrape::try_of(*ops, Duration::from_secs(2)).await {
                stalled += scrape.get("firstcome_worker_stream_stalled_partitions");
            }
        }
        if stalled < 1.0 {
            continue;
        }
        let k = kafka.clone();
        // Quiet for three transaction timeouts: no live transaction is.
        let looked = tokio::task::spawn_blocking(move || {
            let found = k.try_hanging(Duration::from_secs(15))?;
            let mut aborted = Vec::new();
            for h in found {
                k.try_abort(&h)?;
                aborted.push(h);
            }
            Ok::<_, String>(aborted)
        })
        .await
        .unwrap();
        let aborted = match looked {
            Ok(aborted) => aborted,
            Err(said) => {
                eprintln!(
                    "operator on call: Kafka's tool cannot look now: {}",
                    said.trim()
                );
                continue;
            }
        };
        eprintln!("operator on call: the workers report {stalled} stalled; aborted {aborted:?}");
        let now = std::time::Instant::now();
        if !aborted.is_empty() {
            last_abort = Some(now);
            done.aborted.extend(aborted);
        } else if last_abort.is_none_or(|t| now - t > Duration::from_secs(30))
            && last_alarm.is_none_or(|t| now - t > Duration::from_secs(30))
        {
            last_alarm = Some(now);
            done.false_alarms.push(format!(
                "{stalled} partitions reported stalled at {:?}, none hanging",
                now - started
            ));
        }
    }
}

/// Once every worker has stopped cleanly (each commits what it stored),
/// any transaction still open is one Kafka lost that no worker reported.
pub async fn assert_no_transaction_left(kafka: KafkaOperator) {
    let left = tokio::task::spawn_blocking(move || kafka.hanging(Duration::ZERO))
        .await
        .unwrap();
    assert!(
        left.is_empty(),
        "transactions Kafka left open that no worker reported: {left:?}"
    );
}
