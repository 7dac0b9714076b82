//! The consumer loop: one poll loop hands each record to the task of its
//! partition; each partition task decides its records strictly in offset
//! order, and partitions run in parallel.
//!
//! Offsets are stored by the partition task only after a batch is durable
//! (see [`crate::pipeline`]); librdkafka commits stored offsets every
//! `FIRSTCOME_COMMIT_INTERVAL_MS`, and we commit synchronously on revoke and
//! on shutdown. A revoked partition's task is cancelled; whatever it had not
//! stored is read again by the next owner, and because a decided request
//! keeps its decision, reading it again changes nothing.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::pipeline::{self, Rec, Shared};

/// A running partition task.
pub struct PartitionTask {
    tx: mpsc::Sender<Rec>,
    cancel: CancellationToken,
    join: JoinHandle<()>,
}

/// The live partition tasks, by partition of the request topic.
pub type Partitions = Arc<Mutex<HashMap<i32, PartitionTask>>>;

/// Consumer context that stops the tasks of revoked partitions and publishes
/// the current assignment.
pub struct Rebalancer {
    topic: String,
    partitions: Partitions,
    assignment: watch::Sender<BTreeSet<i32>>,
}

impl Rebalancer {
    /// A context for `topic` acting on `partitions`.
    pub fn new(topic: String, partitions: Partitions) -> Self {
        Self {
            topic,
            partitions,
            assignment: watch::Sender::new(BTreeSet::new()),
        }
    }

    /// The partitions of the request topic this member owns, kept current.
    pub fn assignment(&self) -> watch::Receiver<BTreeSet<i32>> {
        self.assignment.subscribe()
    }
}

impl ClientContext for Rebalancer {}

impl ConsumerContext for Rebalancer {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked: Vec<i32> = tpl
                    .elements_for_topic(&self.topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect();
                {
                    let mut map = self.partitions.lock().expect("partition map lock");
                    for p in &revoked {
                        if let Some(task) = map.remove(p) {
                            task.cancel.cancel();
                        }
                    }
                }
                self.assignment.send_modify(|a| {
                    for p in &revoked {
                        a.remove(p);
                    }
                });
                tracing::info!(?revoked, "partitions revoked");
                commit(consumer, "revoke");
            }
            Rebalance::Assign(tpl) => {
                let assigned: Vec<i32> = tpl
                    .elements_for_topic(&self.topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect();
                tracing::info!(?assigned, "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Published after the assignment took effect (cooperative: it adds to
        // what the member already owns).
        if let Rebalance::Assign(tpl) = rebalance {
            let assigned = tpl.elements_for_topic(&self.topic);
            self.assignment
                .send_modify(|a| a.extend(assigned.iter().map(|e| e.partition())));
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
/// in hand (bounded by `grace`) and commits.
pub async fn run(shared: Arc<Shared>, partitions: Partitions, shutdown: CancellationToken) {
    let consumer = shared.consumer.clone();
    loop {
        let message = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
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
        let tx = {
            let mut map = partitions.lock().expect("partition map lock");
            map.entry(rec.partition)
                .or_insert_with(|| spawn_partition(shared.clone(), rec.partition, &shutdown))
                .tx
                .clone()
        };
        // A full buffer holds the poll loop here until the partition task
        // catches up; heartbeats go on in librdkafka's own thread.
        if tx.send(rec).await.is_err() {
            tracing::debug!("record for a revoked partition dropped; its next owner reads it");
        }
    }

    let tasks: Vec<PartitionTask> = partitions
        .lock()
        .expect("partition map lock")
        .drain()
        .map(|(_, t)| t)
        .collect();
    for t in &tasks {
        t.cancel.cancel();
    }
    let grace = Duration::from_millis(shared.cfg.shutdown_timeout_ms);
    let joined = futures::future::join_all(tasks.into_iter().map(|t| t.join));
    if tokio::time::timeout(grace, joined).await.is_err() {
        tracing::warn!("shutdown timeout reached with batches still in hand");
    }
    commit(consumer.as_ref(), "shutdown");
}

fn spawn_partition(
    shared: Arc<Shared>,
    partition: i32,
    shutdown: &CancellationToken,
) -> PartitionTask {
    let (tx, rx) = mpsc::channel(shared.cfg.partition_buffer);
    let cancel = shutdown.child_token();
    let join = tokio::spawn(partition_loop(shared, partition, rx, cancel.clone()));
    PartitionTask { tx, cancel, join }
}

/// Takes whatever is buffered (up to a batch) and processes it, in order,
/// until cancelled. A batch in hand is finished unless it is waiting on a
/// retry when the cancellation comes.
async fn partition_loop(
    shared: Arc<Shared>,
    partition: i32,
    mut rx: mpsc::Receiver<Rec>,
    cancel: CancellationToken,
) {
    tracing::debug!(partition, "partition task started");
    let max = shared.cfg.max_batch;
    let mut batch = Vec::with_capacity(max);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            n = rx.recv_many(&mut batch, max) => if n == 0 { break },
        }
        let recs = std::mem::replace(&mut batch, Vec::with_capacity(max));
        if pipeline::process(&shared, recs, &cancel).await.is_err() {
            break;
        }
    }
    tracing::debug!(partition, "partition task stopped");
}
