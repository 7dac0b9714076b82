//! What the worker counts, on `/metrics` of its operations port. The names
//! are the contract in [`firstcome::metrics::names`]; the label sets known
//! in advance (outcomes, retry steps, dead-letter kinds) start at zero.

use std::sync::Arc;
use std::time::Duration;

use firstcome::Status;
use firstcome::metrics::{Label, latency, names, render};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::deadletter::ErrorKind;

/// What the worker counts.
pub struct WorkerMetrics {
    registry: Registry,
    decisions: Family<Label, Counter>,
    /// The counters of `decisions`, in the order of [`Status::FINAL`]:
    /// counted once per record, so no lookup in the family.
    outcomes: [Counter; 5],
    /// The partitions whose lag is shown.
    lag_shown: std::sync::Mutex<Vec<i32>>,
    batch_records: Histogram,
    lua_duration: Histogram,
    pg_duration: Histogram,
    retries: Family<[(&'static str, &'static str); 2], Counter>,
    dead_letters: Family<Label, Counter>,
    /// Coupons rebuilt because the fence found their Redis state stale.
    pub state_rebuilds: Counter,
    /// Coupon states deleted from Redis after their sale.
    pub states_retired: Counter,
    consumer_lag: Family<[(&'static str, i32); 1], Gauge>,
    rebalances: Family<Label, Counter>,
    /// Partitions of the request topic this member owns.
    pub assigned_partitions: Gauge,
    /// Partitions paused because their task is behind.
    pub paused_partitions: Gauge,
    stream_transactions: Family<Label, Counter>,
    /// Decisions published in committed transactions of the decision stream.
    pub stream_events: Counter,
    /// Partitions of the decision topic held back by a hanging transaction.
    pub stream_stalled_partitions: Gauge,
}

impl WorkerMetrics {
    /// Registers every worker metric on a registry of its own.
    pub fn new() -> Arc<Self> {
        use names::*;
        let mut registry = Registry::default();
        let decisions: Family<Label, Counter> = Family::default();
        let outcomes =
            Status::FINAL.map(|s| decisions.get_or_create_owned(&[("outcome", s.as_str())]));
        let m = Self {
            registry: Registry::default(),
            decisions,
            outcomes,
            lag_shown: std::sync::Mutex::new(Vec::new()),
            batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            lua_duration: latency(),
            pg_duration: latency(),
            retries: Family::default(),
            dead_letters: Family::default(),
            state_rebuilds: Counter::default(),
            states_retired: Counter::default(),
            consumer_lag: Family::default(),
            rebalances: Family::default(),
            assigned_partitions: Gauge::default(),
            paused_partitions: Gauge::default(),
            stream_transactions: Family::default(),
            stream_events: Counter::default(),
            stream_stalled_partitions: Gauge::default(),
        };
        registry.register(
            WORKER_DECISIONS,
            "Decisions made or confirmed, by outcome (a redelivered record counts again)",
            m.decisions.clone(),
        );
        registry.register(
            WORKER_BATCH_RECORDS,
            "Records per batch",
            m.batch_records.clone(),
        );
        registry.register(
            WORKER_LUA_DURATION,
            "Seconds per decide call to Redis (one coupon's requests of a batch)",
            m.lua_duration.clone(),
        );
        registry.register(
            WORKER_PG_DURATION,
            "Seconds per Postgres write of a batch's decisions",
            m.pg_duration.clone(),
        );
        registry.register(
            WORKER_RETRIES,
            "Failed attempts that are retried, by step and class (transient, permanent)",
            m.retries.clone(),
        );
        registry.register(
            WORKER_DEAD_LETTERS,
            "Records written to the dead-letter topic, by kind",
            m.dead_letters.clone(),
        );
        registry.register(
            WORKER_STATE_REBUILDS,
            "Coupons rebuilt from Postgres because their Redis state was stale",
            m.state_rebuilds.clone(),
        );
        registry.register(
            WORKER_STATES_RETIRED,
            "Coupon states deleted from Redis after their sale",
            m.states_retired.clone(),
        );
        registry.register(
            WORKER_CONSUMER_LAG,
            "Records behind the end of each owned partition, as librdkafka last reported",
            m.consumer_lag.clone(),
        );
        registry.register(
            WORKER_REBALANCES,
            "Rebalance events, by kind (assign, revoke)",
            m.rebalances.clone(),
        );
        registry.register(
            WORKER_ASSIGNED_PARTITIONS,
            "Partitions of the request topic this member owns",
            m.assigned_partitions.clone(),
        );
        registry.register(
            WORKER_PAUSED_PARTITIONS,
            "Partitions paused because their task is behind",
            m.paused_partitions.clone(),
        );
        registry.register(
            WORKER_STREAM_TRANSACTIONS,
            "Transactions of the decision stream, by outcome (committed, aborted)",
            m.stream_transactions.clone(),
        );
        registry.register(
            WORKER_STREAM_EVENTS,
            "Decisions published to the decision stream in committed transactions",
            m.stream_events.clone(),
        );
        registry.register(
            WORKER_STREAM_STALLED_PARTITIONS,
            "Partitions of the decision topic whose last stable offset stood below their end \
             for longer than any live transaction lasts (a hanging transaction)",
            m.stream_stalled_partitions.clone(),
        );
        for outcome in ["committed", "aborted"] {
            let _ = m.stream_transactions.get_or_create(&[("outcome", outcome)]);
        }
        for kind in [Rebalanced::Assign, Rebalanced::Revoke].map(Rebalanced::as_str) {
            let _ = m.rebalances.get_or_create(&[("kind", kind)]);
        }
        for step in RetryStep::ALL {
            for class in ["transient", "permanent"] {
                let _ = m
                    .retries
                    .get_or_create(&[("step", step.as_str()), ("class", class)]);
            }
        }
        for kind in ErrorKind::ALL {
            let _ = m.dead_letters.get_or_create(&[("kind", kind.as_str())]);
        }
        Arc::new(Self { registry, ..m })
    }

    /// Counts one transaction of the decision stream.
    pub fn stream_transaction(&self, outcome: &'static str) {
        self.stream_transactions
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    /// Counts one decision (a final status; `pending` is not one).
    pub fn decided(&self, outcome: Status) {
        if let Some(i) = Status::FINAL.iter().position(|s| *s == outcome) {
            self.outcomes[i].inc();
        }
    }

    /// Records a batch's size.
    pub fn batch(&self, records: usize) {
        self.batch_records.observe(records as f64);
    }

    /// Times one decide call.
    pub fn lua(&self, took: Duration) {
        self.lua_duration.observe(took.as_secs_f64());
    }

    /// Times one Postgres write.
    pub fn pg(&self, took: Duration) {
        self.pg_duration.observe(took.as_secs_f64());
    }

    /// Counts a failed attempt that will be retried.
    pub fn retried(&self, step: RetryStep, permanent: bool) {
        let class = if permanent { "permanent" } else { "transient" };
        self.retries
            .get_or_create(&[("step", step.as_str()), ("class", class)])
            .inc();
    }

    /// Counts a dead letter.
    pub fn dead_lettered(&self, kind: ErrorKind) {
        self.dead_letters
            .get_or_create(&[("kind", kind.as_str())])
            .inc();
    }

    /// Counts a rebalance event.
    pub fn rebalanced(&self, kind: Rebalanced) {
        self.rebalances
            .get_or_create(&[("kind", kind.as_str())])
            .inc();
    }

    /// Sets the lag of the owned partitions and forgets the others (one
    /// by one, so a scrape meanwhile never sees the owned ones missing).
    pub fn set_lag(&self, lags: &[(i32, i64)]) {
        let mut shown = self.lag_shown.lock().expect("lag lock");
        for &(partition, lag) in lags {
            self.consumer_lag
                .get_or_create(&[("partition", partition)])
                .set(lag);
        }
        for gone in shown.iter().filter(|p| !lags.iter().any(|(q, _)| q == *p)) {
            self.consumer_lag.remove(&[("partition", *gone)]);
        }
        *shown = lags.iter().map(|(p, _)| *p).collect();
    }

    /// The current values, in the OpenMetrics text format.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lag_of_a_partition_no_longer_owned_disappears_and_the_others_stay() {
        let m = WorkerMetrics::new();
        m.set_lag(&[(0, 5), (1, 3)]);
        m.set_lag(&[(1, 0), (2, 7)]);
        let text = m.render();
        let lag = names::WORKER_CONSUMER_LAG;
        assert!(
            !text.contains(&format!("{lag}{{partition=\"0\"}}")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{lag}{{partition=\"1\"}} 0")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{lag}{{partition=\"2\"}} 7")),
            "{text}"
        );
    }

    #[test]
    fn each_final_outcome_is_counted_under_its_own_label() {
        let m = WorkerMetrics::new();
        for (n, status) in Status::FINAL.into_iter().enumerate() {
            for _ in 0..=n {
                m.decided(status);
            }
        }
        m.decided(Status::Pending);
        let text = m.render();
        for (n, status) in Status::FINAL.into_iter().enumerate() {
            let line = format!(
                "{}_total{{outcome=\"{}\"}} {}",
                names::WORKER_DECISIONS,
                status.as_str(),
                n + 1
            );
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        assert!(!text.contains("pending"), "{text}");
    }
}

/// The steps that are retried, as the metrics label them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryStep {
    /// A coupon's Lua call.
    Decide,
    /// Building a coupon's state from Postgres after the fence refused it.
    Rebuild,
    /// Storing a round of decisions.
    Persist,
    /// Storing one decision, after Postgres refused its round.
    PersistRecord,
    /// Storing a given-up request as `failed`.
    PersistFailure,
    /// Recording a request whose `failed` row the ledger refused too.
    RecordFailure,
    /// Giving back in Redis what a given-up decision took.
    UndoDecision,
    /// Writing a dead letter.
    DeadLetter,
    /// Writing a batch's final statuses to the cache.
    PublishStatuses,
    /// Reading a stored batch's decisions back for the decision stream.
    ReadBack,
    /// Putting a dead letter back on the request topic (`dlq replay`).
    Replay,
}

impl RetryStep {
    /// Every step.
    pub const ALL: [RetryStep; 11] = [
        RetryStep::Decide,
        RetryStep::Rebuild,
        RetryStep::Persist,
        RetryStep::PersistRecord,
        RetryStep::PersistFailure,
        RetryStep::RecordFailure,
        RetryStep::UndoDecision,
        RetryStep::DeadLetter,
        RetryStep::PublishStatuses,
        RetryStep::ReadBack,
        RetryStep::Replay,
    ];

    /// The metrics label.
    pub const fn as_str(self) -> &'static str {
        match self {
            RetryStep::Decide => "decide",
            RetryStep::Rebuild => "rebuild",
            RetryStep::Persist => "persist",
            RetryStep::PersistRecord => "persist record",
            RetryStep::PersistFailure => "persist failure",
            RetryStep::RecordFailure => "record failure",
            RetryStep::UndoDecision => "undo decision",
            RetryStep::DeadLetter => "dead-letter",
            RetryStep::PublishStatuses => "publish statuses",
            RetryStep::ReadBack => "read back",
            RetryStep::Replay => "replay",
        }
    }
}

/// A rebalance event, as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebalanced {
    /// Partitions given to this worker.
    Assign,
    /// Partitions taken from it.
    Revoke,
}

impl Rebalanced {
    /// The metrics label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Rebalanced::Assign => "assign",
            Rebalanced::Revoke => "revoke",
        }
    }
}
