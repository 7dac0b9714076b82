//! The decision stream: every stored decision, published to the decision
//! topic exactly once for a `read_committed` consumer, in each coupon's
//! decision order (docs/decision-stream.md).
//!
//! A batch's decisions are read back from the ledger once stored, so an
//! event says what Postgres holds, and only the record the ledger names
//! publishes it (a request the log holds twice is published once). They
//! wait in [`Pending`] with the offset past the batch; a committer takes
//! what is pending every commit interval and commits it in one Kafka
//! transaction together with the group's offsets
//! (`send_offsets_to_transaction`, KIP-447). Either both are visible or
//! neither, so:
//! - a worker killed before its commit leaves its offsets where they were;
//!   the next owner decides those records again (a decided request keeps
//!   its decision) and publishes them in a transaction of its own, while
//!   the broker aborts the dead one's;
//! - a member whose partitions moved on (a freeze past the session timeout,
//!   a rebalance it missed) is fenced by the group generation its offsets
//!   carry: the broker refuses the transaction and it aborts;
//! - a transaction that aborts for any other reason (a broker restarted in
//!   the middle) takes back the positions too: every partition task is
//!   given up, pending work of the old [generation](DecisionStream::generation)
//!   is dropped, and the poll loop seeks each partition back to its
//!   committed offset ([`Rewind`]);
//! - a revoke commits what its partitions handed over, and anything their
//!   tasks would still hand over is dropped ([`DecisionStream::revoke`]):
//!   an offset of a partition this member no longer owns is never sent.
//!
//! Offsets are committed by transactions only: the consumer's own commits
//! are off while the stream is on.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use firstcome::db::StoredDecision;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::Notify;

use crate::config::WorkerConfig;
use crate::metrics::WorkerMetrics;

/// Most events waiting for a transaction; a partition task that would pass
/// it waits for the next commit (and its partition's buffer fills, and the
/// partition pauses at the broker).
const MAX_PENDING: usize = 50_000;

/// The namespace of event ids: UUID v5 of a request id and its status.
const EVENT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6d1f_7c2e_4a4b_5e83_9b0c_51f1_8a0e_d3c7);

/// One decision as the stream carries it (the contract of
/// docs/decision-stream.md).
#[derive(Debug, Serialize)]
pub struct DecisionEvent<'a> {
    /// Stable: the same decision has the same id, whoever publishes it. A
    /// request has two events only if it `failed` and was replayed.
    pub event_id: uuid::Uuid,
    #[allow(missing_docs)]
    pub request_id: String,
    #[allow(missing_docs)]
    pub coupon_id: &'a str,
    #[allow(missing_docs)]
    pub user_id: &'a str,
    /// `issued`, `duplicate`, `sold_out`, `not_open` or `failed`.
    pub status: &'a str,
    #[allow(missing_docs)]
    pub accepted_at: chrono::DateTime<chrono::Utc>,
    #[allow(missing_docs)]
    pub decided_at: chrono::DateTime<chrono::Utc>,
    /// The decision's number in its coupon's sequence (`null` for `failed`).
    pub decision_seq: Option<i64>,
    /// Where the request sits in the request topic.
    pub request_partition: i32,
    #[allow(missing_docs)]
    pub request_offset: i64,
}

impl<'a> DecisionEvent<'a> {
    /// The event of a stored decision.
    pub fn of(d: &'a StoredDecision) -> Self {
        let status = d.status.as_str();
        let id = d.request_id.to_string();
        Self {
            event_id: uuid::Uuid::new_v5(&EVENT_NAMESPACE, format!("{id}/{status}").as_bytes()),
            request_id: id,
            coupon_id: d.coupon_id.as_str(),
            user_id: d.user_id.as_str(),
            status,
            accepted_at: d.accepted_at,
            decided_at: d.decided_at,
            decision_seq: d.decision_seq,
            request_partition: d.kafka_partition,
            request_offset: d.kafka_offset,
        }
    }
}

/// Where a partition's stream stands in its log, read from the broker for
/// the first batch of a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// The group's stable committed offset: the stream has everything
    /// before it.
    pub committed: i64,
    /// The oldest offset the log still holds.
    pub log_start: i64,
}

/// What waits for the next transaction.
#[derive(Default)]
struct Pending {
    /// (key, value) in the order the batches were stored.
    events: Vec<(String, Vec<u8>)>,
    /// Per partition of the request topic, the offset past its last batch.
    offsets: BTreeMap<i32, i64>,
    /// The generation of each partition's task: its work is taken only
    /// while this is its generation. A revoke moves the revoked partitions
    /// on, a rewind every partition.
    generations: HashMap<i32, u64>,
    /// The generation of a partition not in `generations`.
    base: u64,
    /// The last generation handed out.
    last: u64,
    /// Per partition, the offset past the last batch taken in its current
    /// generation: the next batch must start there.
    next: HashMap<i32, i64>,
}

impl Pending {
    fn generation(&self, partition: i32) -> u64 {
        self.generations
            .get(&partition)
            .copied()
            .unwrap_or(self.base)
    }

    /// Where the stream of `partition` goes on, for a batch that starts at
    /// `first_offset`: its events from there on are new. `None` when the
    /// batch leaves a gap behind the one before it, or when nothing tells
    /// where the partition's stream ends (`known` unknown).
    fn start(&self, partition: i32, first_offset: i64, known: Option<Start>) -> Option<i64> {
        match (self.next.get(&partition), known) {
            (Some(&next), _) => (first_offset <= next).then_some(next),
            // The first batch of a generation: below the group's offset it
            // was streamed already.
            (None, Some(s)) if first_offset <= s.committed => Some(s.committed),
            // Past it: only where retention deleted what was never
            // committed, so the log starts there. Anywhere else the records
            // between were handed to a task that is gone and never read
            // again (the position was not taken back); streaming on would
            // commit offsets past decisions never streamed (the 30-minute
            // soak of 2026-12-06 lost 97 of each of two partitions so).
            (None, Some(s)) => (first_offset <= s.log_start).then_some(first_offset),
            (None, None) => None,
        }
    }

    /// Drops what is pending (its transaction is gone).
    fn clear(&mut self) {
        self.events.clear();
        self.offsets.clear();
        self.next.clear();
    }
}

/// Asks the poll loop to take back the positions of an aborted transaction.
pub type Rewind = Arc<Notify>;

/// The transactional publisher of decisions; see the module docs.
pub struct DecisionStream {
    /// The producer, held for a whole transaction: the committer's and a
    /// revoke's flush take turns. `None` after a fatal error until a new
    /// one has initialized its transactions.
    producer: Mutex<Option<ThreadedProducer<DefaultProducerContext>>>,
    config: rdkafka::ClientConfig,
    topic: String,
    request_topic: String,
    timeout: Duration,
    pending: Mutex<Pending>,
    /// Wakes partition tasks waiting for room in [`Pending`].
    room: Notify,
    rewind: Rewind,
    metrics: Arc<WorkerMetrics>,
}

/// How a flush ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Committed (or nothing was pending).
    Committed,
    /// Aborted: the positions are taken back ([`Rewind`]).
    Aborted,
}

impl DecisionStream {
    /// A transactional producer for the decision topic, its transactions
    /// initialized (which aborts what an earlier life of the same
    /// `transactional.id` left open).
    pub fn new(cfg: &WorkerConfig, metrics: Arc<WorkerMetrics>) -> anyhow::Result<Self> {
        let timeout = cfg.transaction_timeout;
        let mut producer_cfg =
            firstcome::kafka::producer_config(&cfg.common, timeout, Duration::from_millis(5))?;
        producer_cfg
            .set("transactional.id", cfg.transactional_id())
            .set("transaction.timeout.ms", timeout.as_millis().to_string());
        // A broker's transaction coordinator is made at its first use (50
        // partitions of `__transaction_state`), which on a slow machine
        // takes longer than one try: the first flushes try again.
        let producer = match Self::producer(&producer_cfg, timeout) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "the decision stream's transactions are not ready yet; trying again at the next commit"
                );
                None
            }
        };
        Ok(Self {
            producer: Mutex::new(producer),
            config: producer_cfg,
            topic: cfg.common.decision_topic.clone(),
            request_topic: cfg.common.request_topic.clone(),
            timeout,
            pending: Mutex::new(Pending::default()),
            room: Notify::new(),
            rewind: Arc::new(Notify::new()),
            metrics,
        })
    }

    /// A producer with its transactions initialized, which fences any other
    /// of the same `transactional.id` and aborts what it left open.
    fn producer(
        config: &rdkafka::ClientConfig,
        timeout: Duration,
    ) -> anyhow::Result<ThreadedProducer<DefaultProducerContext>> {
        let producer: ThreadedProducer<DefaultProducerContext> = config
            .create()
            .context("creating the decision stream's producer")?;
        producer
            .init_transactions(timeout * 3)
            .context("initializing the decision stream's transactions")?;
        Ok(producer)
    }

    /// The generation a task of `partition` spawned now belongs to.
    pub fn generation(&self, partition: i32) -> u64 {
        self.pending
            .lock()
            .expect("pending lock")
            .generation(partition)
    }

    /// Ends the generation of `partitions` (revoked): work of their tasks
    /// that was not handed over yet is dropped from now on. Call it before
    /// the revoke's [`flush`](Self::flush), which commits what was handed
    /// over while they were still this member's.
    pub fn revoke(&self, partitions: &[i32]) {
        let mut p = self.pending.lock().expect("pending lock");
        for &partition in partitions {
            p.last += 1;
            let next = p.last;
            p.generations.insert(partition, next);
            p.next.remove(&partition);
        }
    }

    /// What the poll loop waits on for a rewind.
    pub fn rewinds(&self) -> Rewind {
        self.rewind.clone()
    }

    /// Whether the stream knows where `partition`'s next batch must start
    /// (it took a batch of it in this generation). If not, the caller
    /// passes where the partition stands ([`Start`]) to [`Self::enqueue`].
    pub fn knows_start(&self, partition: i32) -> bool {
        self.pending
            .lock()
            .expect("pending lock")
            .next
            .contains_key(&partition)
    }

    /// Hands over one stored batch of `partition` (records `first_offset`
    /// up to `next_offset`): its decisions and the offset past it, for the
    /// next transaction. Waits while too much is pending. Work of an older
    /// generation is dropped: its partition was rewound and reads the batch
    /// again.
    ///
    /// The batches of a partition must follow each other, starting at the
    /// group's committed offset (`known`, the stable one: a transaction
    /// still open holds it back), whatever the consumer hands over: a batch
    /// that starts below it carries records streamed already, and only its
    /// events from the committed offset on are taken (librdkafka 2.12
    /// restarts a partition from the beginning when its assignment changes
    /// while the offset fetch waits on such a transaction; tests/stream.rs
    /// caught request offset 0 streamed twice). A first batch past the
    /// committed offset is taken only where the log itself starts later
    /// (retention). A batch past the end of the batch before it, or one
    /// whose start is not known, rewinds every partition to its committed
    /// offset.
    pub async fn enqueue(
        &self,
        generation: u64,
        partition: i32,
        first_offset: i64,
        next_offset: i64,
        decisions: &[StoredDecision],
        known: Option<Start>,
    ) -> anyhow::Result<()> {
        let mut events = Vec::with_capacity(decisions.len());
        for d in decisions {
            events.push((
                d.kafka_offset,
                d.coupon_id.as_str().to_owned(),
                serde_json::to_vec(&DecisionEvent::of(d))?,
            ));
        }
        loop {
            let room = self.room.notified();
            {
                let mut p = self.pending.lock().expect("pending lock");
                if generation != p.generation(partition) {
                    return Ok(());
                }
                let Some(expected) = p.start(partition, first_offset, known) else {
                    drop(p);
                    tracing::error!(
                        partition,
                        first_offset,
                        ?known,
                        "decision stream: a batch does not start where the partition's stream ends; reading every partition again from its committed offset"
                    );
                    self.rewind_all();
                    return Ok(());
                };
                if next_offset <= expected {
                    // Streamed already, all of it.
                    return Ok(());
                }
                if p.events.len() < MAX_PENDING || p.events.is_empty() {
                    p.events.extend(
                        events
                            .drain(..)
                            .filter(|(offset, _, _)| *offset >= expected)
                            .map(|(_, key, value)| (key, value)),
                    );
                    p.next.insert(partition, next_offset);
                    p.offsets.insert(partition, next_offset);
                    return Ok(());
                }
            }
            room.await;
        }
    }

    /// Commits what is pending in one transaction with the group's offsets
    /// past it. Blocking: run it off the runtime's workers, or from the
    /// consumer's own callbacks. `Err` only when another producer took this
    /// one's `transactional.id` (two workers configured alike): the worker
    /// must stop.
    pub fn flush(&self, group: Option<ConsumerGroupMetadata>) -> anyhow::Result<Flushed> {
        let mut producer = self.producer.lock().expect("producer lock");
        let (events, offsets) = {
            let mut p = self.pending.lock().expect("pending lock");
            (
                std::mem::take(&mut p.events),
                std::mem::take(&mut p.offsets),
            )
        };
        self.room.notify_waiters();
        if offsets.is_empty() {
            return Ok(Flushed::Committed);
        }
        if producer.is_none() {
            match Self::producer(&self.config, self.timeout) {
                Ok(p) => *producer = Some(p),
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "the decision stream has no producer yet"
                    );
                    self.metrics.stream_transaction("aborted");
                    self.rewind_all();
                    return Ok(Flushed::Aborted);
                }
            }
        }
        let live = producer.as_ref().expect("made above");
        let n = events.len() as u64;
        let Err(e) = self.transaction(live, &events, &offsets, group) else {
            tracing::debug!(?offsets, events = n, "decision stream: committed");
            self.metrics.stream_transaction("committed");
            self.metrics.stream_events.inc_by(n);
            return Ok(Flushed::Committed);
        };
        self.metrics.stream_transaction("aborted");
        self.rewind_all();
        let code = e.rdkafka_error_code();
        if code == Some(RDKafkaErrorCode::ProducerFenced) {
            anyhow::bail!(
                "another producer took the decision stream's transactional.id {:?}: {e}",
                self.config.get("transactional.id")
            );
        }
        let fatal = matches!(&e, KafkaError::Transaction(t) if t.is_fatal())
            || live.abort_transaction(self.timeout).is_err();
        tracing::warn!(error = %e, fatal, "decision stream transaction failed; its records are read again");
        if fatal {
            // A new producer of the same id starts afresh (at the next flush).
            *producer = None;
        }
        Ok(Flushed::Aborted)
    }

    /// Drops everything pending and of the current generation, and asks
    /// the poll loop to take the positions back to the committed offsets.
    fn rewind_all(&self) {
        {
            let mut p = self.pending.lock().expect("pending lock");
            p.last += 1;
            let next = p.last;
            p.base = next;
            for g in p.generations.values_mut() {
                *g = next;
            }
            p.clear();
        }
        self.room.notify_waiters();
        self.rewind.notify_one();
    }

    fn transaction(
        &self,
        producer: &ThreadedProducer<DefaultProducerContext>,
        events: &[(String, Vec<u8>)],
        offsets: &BTreeMap<i32, i64>,
        group: Option<ConsumerGroupMetadata>,
    ) -> Result<(), KafkaError> {
        // None: the member is between generations; the offsets cannot go.
        let group = group.ok_or(KafkaError::Global(RDKafkaErrorCode::State))?;
        producer.begin_transaction()?;
        for (key, value) in events {
            let mut record = BaseRecord::to(&self.topic).key(key).payload(value);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err((e, _)) => return Err(e),
                }
            }
        }
        let mut tpl = TopicPartitionList::new();
        for (&partition, &next) in offsets {
            tpl.add_partition_offset(&self.request_topic, partition, Offset::Offset(next))?;
        }
        producer.send_offsets_to_transaction(&tpl, &group, self.timeout)?;
        // A retriable failure of the commit may simply be tried again.
        let mut tries = 0;
        loop {
            match producer.commit_transaction(self.timeout) {
                Ok(()) => return Ok(()),
                Err(KafkaError::Transaction(t)) if t.is_retriable() && tries < 3 => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }
}

/// How often [`watch_stalls`] looks at the decision topic.
const STALL_CHECK: Duration = Duration::from_secs(5);

/// How long past the transaction timeout a partition's last stable offset
/// may stand still below its end before it counts as stalled: the broker
/// aborts a transaction that outlived its timeout in a sweep every 10 s
/// (`transaction.abort.timed.out.transaction.cleanup.interval.ms`).
const STALL_MARGIN: Duration = Duration::from_secs(30);

/// Watches the decision topic for a hanging transaction until `shutdown`.
///
/// A `read_committed` consumer reads a partition only up to its last stable
/// offset (LSO): the first offset of the oldest transaction still open
/// there. A live transaction ends within its timeout (committed, aborted,
/// or aborted by the broker past it), so an LSO that stands still below the
/// partition's end for longer than that names a transaction the broker lost
/// track of, and every decision behind it waits, in every downstream
/// reader, until an operator aborts it. Kafka 4.4 was seen to leave one on a
/// single broker stopped while a transaction committed (docs/operations.md,
/// "Decision stream hanging"). Counted in
/// `firstcome_worker_stream_stalled_partitions` and logged with the remedy.
pub async fn watch_stalls(
    cfg: Arc<WorkerConfig>,
    metrics: Arc<WorkerMetrics>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let limit = cfg.transaction_timeout + STALL_MARGIN;
    let mut watcher = match StallWatch::new(&cfg) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "the decision stream's stall watch did not start"
            );
            return;
        }
    };
    let mut tick = tokio::time::interval(STALL_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (w, checked) = match tokio::task::spawn_blocking(move || {
            let checked = watcher.check(limit);
            if checked.is_err() {
                watcher.unreadable();
            }
            (watcher, checked)
        })
        .await
        {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!(error = %e, "stall watch task failed; the watch stops");
                return;
            }
        };
        watcher = w;
        match checked {
            Ok(stalled) => {
                metrics.stream_stalled_partitions.set(stalled as i64);
            }
            Err(e) => tracing::debug!(
                error = format!("{e:#}"),
                "stall watch: the decision topic is not readable now"
            ),
        }
    }
}

/// The state of [`watch_stalls`]: per partition, the LSO last seen below
/// the end and since when it stands there.
struct StallWatch {
    committed: rdkafka::consumer::BaseConsumer,
    uncommitted: rdkafka::consumer::BaseConsumer,
    topic: String,
    brokers: String,
    standing: HashMap<i32, (i64, std::time::Instant)>,
    reported: std::collections::HashSet<i32>,
}

impl StallWatch {
    fn new(cfg: &WorkerConfig) -> anyhow::Result<Self> {
        let client = |isolation: &str| -> anyhow::Result<rdkafka::consumer::BaseConsumer> {
            let mut c = firstcome::kafka::client_config(&cfg.common)?;
            c.set("group.id", format!("{}-stall-watch", cfg.group_id))
                .set("isolation.level", isolation)
                .set("enable.auto.commit", "false");
            Ok(c.create()?)
        };
        Ok(Self {
            committed: client("read_committed")?,
            uncommitted: client("read_uncommitted")?,
            topic: cfg.common.decision_topic.clone(),
            brokers: cfg.common.kafka_brokers.clone(),
            standing: HashMap::new(),
            reported: std::collections::HashSet::new(),
        })
    }

    /// Looks at every partition once; returns how many are stalled.
    fn check(&mut self, limit: Duration) -> anyhow::Result<usize> {
        use rdkafka::consumer::Consumer;
        const TIMEOUT: Duration = Duration::from_secs(5);
        let meta = self
            .uncommitted
            .fetch_metadata(Some(&self.topic), TIMEOUT)?;
        let partitions: Vec<i32> = meta
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut stalled = 0;
        for p in partitions {
            let (_, lso) = self.committed.fetch_watermarks(&self.topic, p, TIMEOUT)?;
            let (_, end) = self.uncommitted.fetch_watermarks(&self.topic, p, TIMEOUT)?;
            let now = std::time::Instant::now();
            let Some(standing) = self.observe(p, lso, end, now, limit) else {
                if self.reported.remove(&p) {
                    tracing::info!(partition = p, lso, "decision stream partition moves again");
                }
                continue;
            };
            stalled += 1;
            if self.reported.insert(p) {
                tracing::error!(
                    topic = %self.topic,
                    partition = p,
                    last_stable_offset = lso,
                    end = end,
                    standing = ?standing,
                    "the decision stream stands still behind a transaction the broker left open; \
                     find and abort it: scripts/kafka-node transactions --bootstrap-server {} \
                     find-hanging --broker-id <leader> (docs/operations.md)",
                    self.brokers
                );
            }
        }
        Ok(stalled)
    }

    /// One look at partition `p`: how long its LSO has stood still below
    /// its end, if for `limit` or longer.
    fn observe(
        &mut self,
        p: i32,
        lso: i64,
        end: i64,
        now: std::time::Instant,
        limit: Duration,
    ) -> Option<Duration> {
        if lso >= end {
            self.standing.remove(&p);
            return None;
        }
        let since = match self.standing.get(&p) {
            Some(&(seen, since)) if seen == lso => since,
            _ => {
                self.standing.insert(p, (lso, now));
                now
            }
        };
        Some(now.duration_since(since)).filter(|d| *d >= limit)
    }

    /// The topic could not be read: the broker is down or its leaders
    /// move. A transaction open across that ends only once the broker is
    /// back (its coordinator loads, finds it past its timeout at its next
    /// scan, and aborts it), so standing time counts again from then. The
    /// soak's broker, killed and 17 s back under load, held a live
    /// transaction open 35 s: counted through the outage, it was reported
    /// as hanging, and Kafka's find-hanging found nothing.
    fn unreadable(&mut self) {
        self.standing.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch() -> StallWatch {
        StallWatch::new(&crate::config::validation::parse(&[])).unwrap()
    }

    #[test]
    fn an_lso_standing_below_the_end_past_the_limit_is_a_stall_and_an_outage_restarts_the_clock() {
        let mut w = watch();
        let limit = Duration::from_secs(35);
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(w.observe(3, 100, 120, at(0), limit), None);
        assert_eq!(w.observe(3, 100, 130, at(34), limit), None);
        assert_eq!(
            w.observe(3, 100, 130, at(36), limit),
            Some(Duration::from_secs(36))
        );
        // It moved: a new transaction is the oldest open one now.
        assert_eq!(w.observe(3, 125, 140, at(40), limit), None);
        assert_eq!(w.observe(3, 125, 140, at(70), limit), None);
        // The broker was down in between: the clock starts again.
        w.unreadable();
        assert_eq!(w.observe(3, 125, 140, at(80), limit), None);
        assert_eq!(w.observe(3, 125, 140, at(114), limit), None);
        assert!(w.observe(3, 125, 140, at(115), limit).is_some());
        // Caught up: nothing stands.
        assert_eq!(w.observe(3, 140, 140, at(116), limit), None);
        assert_eq!(w.observe(3, 140, 150, at(200), limit), None);
    }

    #[test]
    fn a_first_batch_below_the_committed_offset_streams_only_what_follows_it() {
        let p = Pending::default();
        let at = |committed, log_start| {
            Some(Start {
                committed,
                log_start,
            })
        };
        // librdkafka restarted the partition at 0 though 131 was committed.
        assert_eq!(p.start(2, 0, at(131, 0)), Some(131));
        // Where it should have started.
        assert_eq!(p.start(2, 131, at(131, 0)), Some(131));
        // Retention deleted records never committed: the log starts later.
        assert_eq!(p.start(2, 500, at(0, 500)), Some(500));
        // Nothing says where the partition's stream ends.
        assert_eq!(p.start(2, 0, None), None);
    }

    #[test]
    fn a_first_batch_past_the_committed_offset_is_a_gap_unless_the_log_starts_there() {
        let p = Pending::default();
        let at = |committed, log_start| {
            Some(Start {
                committed,
                log_start,
            })
        };
        // The 30-minute soak: a rewind the broker could not serve left the
        // position past 14,138..14,234, whose task was gone; taking this
        // batch committed offsets past 97 decisions never streamed.
        assert_eq!(p.start(2, 14_235, at(14_138, 0)), None);
        // Retention took the log past the committed offset, but not this far.
        assert_eq!(p.start(2, 14_235, at(14_138, 14_200)), None);
    }

    #[test]
    fn a_later_batch_goes_on_where_the_one_before_ended_or_not_at_all() {
        let mut p = Pending::default();
        p.next.insert(2, 140);
        assert_eq!(p.start(2, 140, None), Some(140));
        // A re-fetch that overlaps: only what follows 140 is new.
        let at = |committed, log_start| {
            Some(Start {
                committed,
                log_start,
            })
        };
        assert_eq!(p.start(2, 135, at(0, 0)), Some(140));
        // A gap: records 140..150 would never be streamed.
        assert_eq!(p.start(2, 150, at(150, 0)), None);
    }
}
