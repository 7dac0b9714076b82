//! The consumer loop: one poll loop hands each record to the task of its
//! partition; each partition task decides its records strictly in offset
//! order, and partitions run in parallel.
//!
//! Offsets are stored by the partition task only after a batch is durable
//! (see [`crate::pipeline`]); librdkafka commits stored offsets every
//! `FIRSTCOME_COMMIT_INTERVAL`, and we commit synchronously on revoke and
//! on shutdown. A revoked partition's task is cancelled; whatever it had not
//! stored is read again by the next owner, and because a decided request
//! keeps its decision, reading it again changes nothing.
//!
//! The poll loop never waits for a partition: when a partition's buffer is
//! full (its task is retrying, say while Postgres is down) the partition is
//! paused at the broker and its records are parked in order; the loop keeps
//! polling, so the member stays in the group and other partitions go on, and
//! the partition resumes once its task has caught up.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::gate::Gate;
use crate::metrics::{Rebalanced, WorkerMetrics};
use crate::offsets::Offsets;
use crate::pipeline;
use crate::record::Rec;
use crate::retry::Aborted;
use crate::services::Shared;
use crate::stream::{DecisionStream, Flushed};

/// How often the poll loop reports itself alive (`/healthz`).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How often the poll loop checks whether paused partitions have room again.
const RESUME_CHECK: Duration = Duration::from_millis(20);

/// A running partition task.
pub struct PartitionTask {
    tx: mpsc::Sender<Rec>,
    /// Gives up the batches in hand at once (revoked, or the shutdown's
    /// grace is over); a worker that is stopping first lets them finish.
    cancel: CancellationToken,
    join: JoinHandle<()>,
    /// Records that did not fit into the buffer, in offset order. While any
    /// are here the partition is paused at the broker.
    parked: VecDeque<Rec>,
    /// The offset after the last record handed to this task; anything below
    /// was handed over already (a re-fetch after a resume) and is skipped.
    next_offset: i64,
}

/// What happened to a record offered to a partition task.
enum Handed {
    /// In the task's buffer, or skipped as already handed over.
    Done,
    /// Parked behind a full buffer; the partition must be paused.
    Parked,
    /// The partition's task is gone (it can only have panicked): the record
    /// has no one to decide it.
    Orphaned,
}

impl PartitionTask {
    fn hand(&mut self, rec: Rec) -> Handed {
        if rec.offset < self.next_offset {
            return Handed::Done;
        }
        self.next_offset = rec.offset + 1;
        if !self.parked.is_empty() {
            self.parked.push_back(rec);
            return Handed::Parked;
        }
        match self.tx.try_send(rec) {
            Ok(()) => Handed::Done,
            Err(TrySendError::Closed(_)) => Handed::Orphaned,
            Err(TrySendError::Full(rec)) => {
                self.parked.push_back(rec);
                Handed::Parked
            }
        }
    }

    /// Moves parked records into the buffer while there is room; true once
    /// none are left.
    fn unpark(&mut self) -> bool {
        while let Some(rec) = self.parked.pop_front() {
            match self.tx.try_send(rec) {
                Ok(()) => {}
                Err(TrySendError::Full(rec)) => {
                    self.parked.push_front(rec);
                    return false;
                }
                // Seen by the poll loop at the partition's next record, or
                // by the shutdown that follows.
                Err(TrySendError::Closed(_)) => self.parked.clear(),
            }
        }
        true
    }
}

/// The live partition tasks, by partition of the request topic.
pub type Partitions = Arc<Mutex<HashMap<i32, PartitionTask>>>;

/// Consumer context that stops the tasks of revoked partitions and publishes
/// the current assignment.
pub struct Rebalancer {
    topic: String,
    partitions: Partitions,
    assignment: watch::Sender<BTreeSet<i32>>,
    metrics: Arc<WorkerMetrics>,
    /// The decision stream, which commits the offsets when it is on.
    stream: Option<Arc<DecisionStream>>,
}

impl Rebalancer {
    /// A context for `topic` acting on `partitions`.
    pub fn new(
        topic: String,
        partitions: Partitions,
        metrics: Arc<WorkerMetrics>,
        stream: Option<Arc<DecisionStream>>,
    ) -> Self {
        Self {
            topic,
            partitions,
            assignment: watch::Sender::new(BTreeSet::new()),
            metrics,
            stream,
        }
    }

    fn publish_assignment(&self, change: impl FnOnce(&mut BTreeSet<i32>)) {
        self.assignment.send_modify(|a| {
            change(a);
            self.metrics.assigned_partitions.set(a.len() as i64);
        });
    }

    /// The partitions of the request topic this member owns, kept current.
    pub fn assignment(&self) -> watch::Receiver<BTreeSet<i32>> {
        self.assignment.subscribe()
    }
}

impl ClientContext for Rebalancer {
    /// Exports the consumer lag of the owned partitions (librdkafka reports
    /// every `FIRSTCOME_STATS_INTERVAL`; -1, not known yet, is left out).
    fn stats(&self, statistics: Statistics) {
        let owned = self.assignment.borrow().clone();
        let lags: Vec<(i32, i64)> = statistics
            .topics
            .get(&self.topic)
            .map(|t| {
                t.partitions
                    .values()
                    .filter(|p| owned.contains(&p.partition) && p.consumer_lag >= 0)
                    .map(|p| (p.partition, p.consumer_lag))
                    .collect()
            })
            .unwrap_or_default();
        self.metrics.set_lag(&lags);
    }
}

impl ConsumerContext for Rebalancer {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked: Vec<i32> = tpl
                    .elements_for_topic(&self.topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect();
                if let Some(stream) = &self.stream {
                    stream.revoke(&revoked);
                }
                {
                    let mut map = self.partitions.lock().expect("partition map lock");
                    for p in &revoked {
                        if let Some(task) = map.remove(p) {
                            task.cancel.cancel();
                        }
                    }
                }
                self.publish_assignment(|a| {
                    for p in &revoked {
                        a.remove(p);
                    }
                });
                self.metrics.rebalanced(Rebalanced::Revoke);
                tracing::info!(?revoked, "partitions revoked");
                match &self.stream {
                    // What the revoked partitions handed over is committed
                    // while they are still this member's.
                    Some(stream) => {
                        if let Err(e) = stream.flush(consumer.group_metadata()) {
                            tracing::error!(error = %e, "decision stream failed at a revoke");
                        }
                    }
                    None => commit(consumer, "revoke"),
                }
            }
            Rebalance::Assign(tpl) => {
                let assigned: Vec<i32> = tpl
                    .elements_for_topic(&self.topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect();
                self.metrics.rebalanced(Rebalanced::Assign);
                tracing::info!(?assigned, "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Published after the assignment took effect (cooperative: it adds to
        // what the member already owns).
        if let Rebalance::Assign(tpl) = rebalance {
            // A partition paused when it was revoked starts afresh.
            if let Err(e) = consumer.resume(tpl) {
                tracing::warn!(error = %e, "resuming newly assigned partitions failed");
            }
            let assigned = tpl.elements_for_topic(&self.topic);
            self.publish_assignment(|a| a.extend(assigned.iter().map(|e| e.partition())));
        }
    }
}

/// Commits the stored offsets synchronously; "nothing to commit" is fine.
pub fn commit<C: Consumer<X>, X: ConsumerContext>(consumer: &C, when: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::debug!(when, "offsets committed"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(when, error = %e, "offset commit failed"),
    }
}

/// Polls until `shutdown`, then lets the partition tasks finish the batches
/// in hand (bounded by `grace`) and commits. A partition task that is gone
/// while its partition is assigned stops the worker with an error (red team
/// #15: its records were dropped silently): nothing past the last stored
/// offset is committed, so the partition's next owner reads them again.
pub async fn run(
    consumer: Arc<StreamConsumer<Rebalancer>>,
    shared: Arc<Shared>,
    partitions: Partitions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut orphaned = None;
    let topic = shared.cfg.common.request_topic.clone();
    let mut paused: HashSet<i32> = HashSet::new();
    let mut resume_check = tokio::time::interval(RESUME_CHECK);
    resume_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let committing = shared.stream.as_ref().map(|stream| {
        tokio::spawn(commit_loop(
            stream.clone(),
            consumer.clone(),
            shared.cfg.commit_interval,
            shutdown.clone(),
        ))
    });
    let rewinds = shared.stream.as_ref().map(|s| s.rewinds());
    loop {
        shared.metrics.paused_partitions.set(paused.len() as i64);
        let message = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            () = async { rewinds.as_ref().expect("checked").notified().await }, if rewinds.is_some() => {
                rewind(consumer.as_ref(), &topic, &partitions, &mut paused);
                continue;
            }
            _ = heartbeat.tick() => {
                shared.liveness.beat();
                continue;
            }
            _ = resume_check.tick(), if !paused.is_empty() => {
                let ready: Vec<i32> = {
                    let mut map = partitions.lock().expect("partition map lock");
                    // A revoked partition's task is gone; nothing to resume.
                    paused.retain(|p| map.contains_key(p));
                    paused
                        .iter()
                        .copied()
                        .filter(|p| map.get_mut(p).is_some_and(PartitionTask::unpark))
                        .collect()
                };
                for p in ready {
                    paused.remove(&p);
                    set_paused(consumer.as_ref(), &topic, p, false);
                }
                continue;
            }
            m = consumer.recv() => m,
        };
        let rec = match message {
            Ok(m) => Rec::from_message(&m),
            Err(e) => {
                // librdkafka reconnects and retries by itself; these are
                // reports, not a reason to stop.
                tracing::warn!(error = %e, "consumer error");
                continue;
            }
        };
        let partition = rec.partition;
        let handed = partitions
            .lock()
            .expect("partition map lock")
            .entry(partition)
            .or_insert_with(|| {
                let generation = shared
                    .stream
                    .as_ref()
                    .map_or(0, |s| s.generation(partition));
                spawn_partition(shared.clone(), partition, generation, &shutdown)
            })
            .hand(rec);
        match handed {
            Handed::Parked if paused.insert(partition) => {
                set_paused(consumer.as_ref(), &topic, partition, true);
            }
            Handed::Orphaned => {
                tracing::error!(
                    partition,
                    "the partition's task is gone; stopping so its records are read again"
                );
                orphaned = Some(partition);
                shutdown.cancel();
                break;
            }
            _ => {}
        }
    }

    let tasks = take_all(&partitions);
    // The tasks saw `shutdown` too: they take no new batch and finish the
    // ones in hand, for at most the grace period; then they give them up.
    let grace = shared.cfg.shutdown_timeout;
    let aborts: Vec<CancellationToken> = tasks.iter().map(|t| t.cancel.clone()).collect();
    let mut joined = futures::future::join_all(tasks.into_iter().map(|t| t.join));
    if tokio::time::timeout(grace, &mut joined).await.is_err() {
        tracing::warn!(
            ?grace,
            "shutdown timeout reached with batches still in hand; giving them up"
        );
        for a in &aborts {
            a.cancel();
        }
        joined.await;
    }
    let mut failed = None;
    match (&shared.stream, committing) {
        (Some(stream), Some(committing)) => {
            if let Ok(Err(e)) = committing.await {
                failed = Some(e);
            }
            let (stream, group) = (stream.clone(), consumer.group_metadata());
            match tokio::task::spawn_blocking(move || stream.flush(group)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(e) => failed = failed.or(Some(e.into())),
            }
        }
        _ => commit(consumer.as_ref(), "shutdown"),
    }
    leave(consumer.as_ref(), grace.min(LEAVE_LIMIT)).await;
    if let Some(e) = failed {
        return Err(e);
    }
    match orphaned {
        Some(p) => anyhow::bail!("the task of partition {p} stopped"),
        None => Ok(()),
    }
}

/// Commits the decision stream's pending work every `interval` until
/// `shutdown`. A fatal producer error stops the worker.
async fn commit_loop(
    stream: Arc<DecisionStream>,
    consumer: Arc<StreamConsumer<Rebalancer>>,
    interval: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let (s, group) = (stream.clone(), consumer.group_metadata());
        match tokio::task::spawn_blocking(move || s.flush(group)).await? {
            Ok(Flushed::Committed | Flushed::Aborted) => {}
            Err(e) => {
                tracing::error!(error = %e, "the decision stream stopped; stopping the worker");
                shutdown.cancel();
                return Err(e);
            }
        }
    }
}

/// Takes every partition back to its committed offset after the decision
/// stream aborted a transaction: the tasks are given up (their work would
/// be dropped anyway) and librdkafka drops what it fetched past the seek.
fn rewind(
    consumer: &StreamConsumer<Rebalancer>,
    topic: &str,
    partitions: &Partitions,
    paused: &mut HashSet<i32>,
) {
    let tasks = take_all(partitions);
    for t in &tasks {
        t.cancel.cancel();
    }
    for p in paused.drain() {
        set_paused(consumer, topic, p, false);
    }
    let assigned = match consumer.assignment() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "no assignment to rewind");
            return;
        }
    };
    let committed = match consumer.committed_offsets(assigned.clone(), REWIND_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "committed offsets unknown; leaving the group to read them again");
            consumer.unsubscribe();
            let _ = consumer.subscribe(&[topic]);
            return;
        }
    };
    for e in committed.elements_for_topic(topic) {
        let to = match e.offset() {
            Offset::Offset(n) => Offset::Offset(n),
            _ => Offset::Beginning,
        };
        if let Err(err) = consumer.seek(topic, e.partition(), to, REWIND_TIMEOUT) {
            tracing::error!(partition = e.partition(), error = %err, "seek failed; leaving the group to read it again");
            consumer.unsubscribe();
            let _ = consumer.subscribe(&[topic]);
            return;
        }
    }
    tracing::warn!(
        tasks = tasks.len(),
        committed = ?committed.elements_for_topic(topic).iter().map(|e| (e.partition(), e.offset())).collect::<Vec<_>>(),
        "partitions taken back to their committed offsets"
    );
}

/// Every partition task, taken out of the map.
fn take_all(partitions: &Partitions) -> Vec<PartitionTask> {
    partitions
        .lock()
        .expect("partition map lock")
        .drain()
        .map(|(_, t)| t)
        .collect()
}

/// Longest a rewind waits for the broker.
const REWIND_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a stopping worker serves its consumer to leave the group.
const LEAVE_LIMIT: Duration = Duration::from_secs(10);

/// Leaves the group before the consumer is closed: unsubscribes, then
/// serves the consumer (so the revoke runs) until nothing is assigned and a
/// few more rounds pass quietly. librdkafka aborts
/// (`rd_kafka_cgrp_terminated: assert: !rd_kafka_assignment_in_progress`)
/// or hangs when a consumer is closed while an assignment is still in
/// progress (its issues 4527 and 4792), which is where a worker stopped
/// during its join would close it. Records that still arrive are dropped:
/// their offsets are not stored, so they are read again by the next owner.
async fn leave(consumer: &StreamConsumer<Rebalancer>, limit: Duration) {
    /// Rounds of serving with nothing assigned before the close.
    const QUIET_ROUNDS: u32 = 3;
    consumer.unsubscribe();
    let deadline = tokio::time::Instant::now() + limit;
    let mut quiet = 0;
    while quiet < QUIET_ROUNDS {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                ?limit,
                "the group was not left in time; closing the consumer anyway"
            );
            return;
        }
        let _ = tokio::time::timeout(RESUME_CHECK * 5, consumer.recv()).await;
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        quiet = if assigned == 0 { quiet + 1 } else { 0 };
    }
}

fn set_paused<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    topic: &str,
    partition: i32,
    pause: bool,
) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let done = if pause {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    match done {
        // Debug: under steady backpressure this flips every few batches; a
        // partition that is really stuck shows in the retry warnings.
        Ok(()) if pause => tracing::debug!(partition, "partition paused: its task is behind"),
        Ok(()) => tracing::debug!(partition, "partition resumed"),
        Err(e) => tracing::warn!(partition, pause, error = %e, "pause/resume failed"),
    }
}

fn spawn_partition(
    shared: Arc<Shared>,
    partition: i32,
    generation: u64,
    shutdown: &CancellationToken,
) -> PartitionTask {
    let (tx, rx) = mpsc::channel(shared.cfg.partition_buffer);
    // Not a child of `shutdown`: stopping finishes the batches in hand.
    let cancel = CancellationToken::new();
    let join = tokio::spawn(partition_loop(
        shared,
        partition,
        generation,
        rx,
        shutdown.clone(),
        cancel.clone(),
    ));
    PartitionTask {
        tx,
        cancel,
        join,
        parked: VecDeque::new(),
        next_offset: i64::MIN,
    }
}

/// Takes whatever is buffered (up to a batch) and processes it, in order.
/// Once `stop` fires it takes no new batch and returns when the batches in
/// hand are done; once `cancel` fires it gives them up at once (nothing past
/// their start is stored, so they are read again).
async fn partition_loop(
    shared: Arc<Shared>,
    partition: i32,
    generation: u64,
    mut rx: mpsc::Receiver<Rec>,
    stop: CancellationToken,
    cancel: CancellationToken,
) {
    tracing::debug!(partition, "partition task started");
    let max = shared.cfg.max_batch;
    let mut batch = Vec::with_capacity(max);
    // Up to two batches in flight, ordered by their gates (see
    // `gate::Gate`): the next one decides while this one is stored.
    let mut running: futures::stream::FuturesOrdered<_> = futures::stream::FuturesOrdered::new();
    let mut handoff = None;
    let mut stopping = false;
    loop {
        if stopping && running.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            () = stop.cancelled(), if !stopping => stopping = true,
            Some(r) = running.next(), if !running.is_empty() => {
                let r: Result<(), Aborted> = r;
                if r.is_err() {
                    break;
                }
            }
            n = rx.recv_many(&mut batch, max), if running.len() < 2 && !stopping => {
                if n == 0 {
                    // Sender gone: finish what is in hand.
                    while let Some(r) = running.next().await {
                        if r.is_err() {
                            break;
                        }
                    }
                    break;
                }
                let recs = std::mem::replace(&mut batch, Vec::with_capacity(max));
                let (gate, next) = Gate::after(handoff.take(), generation);
                handoff = Some(next);
                running.push_back(pipeline::process(&shared, recs, &cancel, gate));
            }
        }
    }
    tracing::debug!(partition, "partition task stopped");
}

/// How long a question to the broker about offsets may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// [`Offsets`] of a consumer group member.
pub struct GroupOffsets {
    consumer: Arc<StreamConsumer<Rebalancer>>,
    topic: String,
}

impl GroupOffsets {
    /// The offsets `consumer` keeps for `topic`.
    pub fn new(consumer: Arc<StreamConsumer<Rebalancer>>, topic: String) -> Self {
        Self { consumer, topic }
    }
}

impl Offsets for GroupOffsets {
    fn store(&self, partition: i32, next: i64) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(next))?;
        Ok(self.consumer.store_offsets(&tpl)?)
    }

    fn high_watermark(&self, partition: i32) -> anyhow::Result<i64> {
        let (_, high) = self
            .consumer
            .fetch_watermarks(&self.topic, partition, BROKER_TIMEOUT)?;
        Ok(high)
    }

    fn log_start(&self, partition: i32) -> anyhow::Result<i64> {
        let (low, _) = self
            .consumer
            .fetch_watermarks(&self.topic, partition, BROKER_TIMEOUT)?;
        Ok(low)
    }

    fn committed(&self, partition: i32) -> anyhow::Result<i64> {
        let mut asked = TopicPartitionList::new();
        asked.add_partition(&self.topic, partition);
        let got = self.consumer.committed_offsets(asked, BROKER_TIMEOUT)?;
        Ok(
            match got
                .find_partition(&self.topic, partition)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(n)) => n,
                _ => 0,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(offset: i64) -> Rec {
        Rec {
            partition: 0,
            offset,
            key: None,
            payload: None,
            timestamp_ms: None,
            replay_count: 0,
            request_id_header: None,
        }
    }

    #[tokio::test]
    async fn a_record_for_a_partition_whose_task_is_gone_is_reported_not_dropped() {
        let (tx, rx) = mpsc::channel(1);
        let mut task = PartitionTask {
            tx,
            cancel: CancellationToken::new(),
            join: tokio::spawn(async {}),
            parked: VecDeque::new(),
            next_offset: 0,
        };
        assert!(matches!(task.hand(rec(0)), Handed::Done));
        assert!(matches!(task.hand(rec(1)), Handed::Parked));
        // The task ends (a panic is the only way): its receiver is dropped.
        drop(rx);
        assert!(
            matches!(task.hand(rec(2)), Handed::Parked),
            "behind the parked one"
        );
        task.parked.clear();
        assert!(matches!(task.hand(rec(3)), Handed::Orphaned));
    }
}
