//! Prometheus metrics of both binaries, served on a port of their own
//! ([`crate::ops`]), never on the public one.
//!
//! Every metric is named in [`names`] and registered with its help text when
//! the process starts, so a scrape shows all of them from the first second
//! (label sets known in advance, such as decision outcomes, start at zero).
//! Each process builds its own [`Registry`]: tests run several ingresses and
//! workers in one process and scrape each on its own.
//!
//! # Layout
//! - [`names`]: every metric name, as exposed
//! - [`IngressMetrics`]: what the HTTP ingress counts
//! - [`WorkerMetrics`]: what the consumer counts
//!
//! The text format is OpenMetrics: counters are exposed with a `_total`
//! suffix, histograms as `_bucket`, `_sum` and `_count`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::Status;

/// Metric names as they appear on `/metrics`. Counters are registered
/// without their `_total` suffix, which the encoder adds; [`names::exposed`]
/// lists the names a scrape shows.
pub mod names {
    /// Counter, `route` × `method` × `status`: HTTP answers of the ingress.
    pub const INGRESS_REQUESTS: &str = "firstcome_ingress_http_requests";
    /// Histogram, `route`: seconds from request to answer.
    pub const INGRESS_REQUEST_DURATION: &str = "firstcome_ingress_http_request_duration_seconds";
    /// Gauge: HTTP requests being served now.
    pub const INGRESS_IN_FLIGHT: &str = "firstcome_ingress_in_flight_requests";
    /// Gauge: long polls (`GET /v1/issue-requests/{id}?wait_ms=N`) waiting
    /// for a decision now.
    pub const INGRESS_LONG_POLLS: &str = "firstcome_ingress_long_polls";
    /// Gauge: client connections open now (at most
    /// `FIRSTCOME_MAX_CONNECTIONS`).
    pub const INGRESS_CONNECTIONS: &str = "firstcome_ingress_connections";
    /// Histogram: seconds from produce to the broker's acknowledgement.
    pub const INGRESS_PRODUCE_DURATION: &str = "firstcome_ingress_produce_duration_seconds";
    /// Counter: issue requests the broker acknowledged (answered `202`).
    pub const INGRESS_ACCEPTED: &str = "firstcome_ingress_accepted";
    /// Counter, `kind` (`error`, `timeout`): appends not acknowledged.
    pub const INGRESS_BROKER_ERRORS: &str = "firstcome_ingress_broker_errors";
    /// Counter, `reason` (`sold_out`, `not_open`): issue requests answered
    /// `409` at once, without an append.
    pub const INGRESS_SHORT_CIRCUIT: &str = "firstcome_ingress_short_circuit";

    /// Counter, `outcome` (a final status): decisions made or confirmed.
    pub const WORKER_DECISIONS: &str = "firstcome_worker_decisions";
    /// Histogram: records per batch.
    pub const WORKER_BATCH_RECORDS: &str = "firstcome_worker_batch_records";
    /// Histogram: seconds per decide call to Redis (one coupon's requests
    /// of a batch in one Lua call).
    pub const WORKER_LUA_DURATION: &str = "firstcome_worker_lua_duration_seconds";
    /// Histogram: seconds per Postgres write of a batch's decisions.
    pub const WORKER_PG_DURATION: &str = "firstcome_worker_pg_duration_seconds";
    /// Counter, `step` × `class` (`transient`, `permanent`): failed
    /// attempts that are retried.
    pub const WORKER_RETRIES: &str = "firstcome_worker_retries";
    /// Counter, `kind`: records written to the dead-letter topic.
    pub const WORKER_DEAD_LETTERS: &str = "firstcome_worker_dead_letters";
    /// Counter: coupons rebuilt from Postgres because the fence found their
    /// Redis state stale (Redis and Postgres drifted apart).
    pub const WORKER_STATE_REBUILDS: &str = "firstcome_worker_state_rebuilds";
    /// Counter: coupon states deleted from Redis after their sale (see
    /// `firstcome-worker`'s `retire`).
    pub const WORKER_STATES_RETIRED: &str = "firstcome_worker_states_retired";
    /// Gauge, `partition`: records behind the partition's end, as
    /// librdkafka last reported (`consumer_lag`, every statistics interval).
    pub const WORKER_CONSUMER_LAG: &str = "firstcome_worker_consumer_lag";
    /// Counter, `kind` (`assign`, `revoke`): rebalance events.
    pub const WORKER_REBALANCES: &str = "firstcome_worker_rebalances";
    /// Gauge: partitions of the request topic this member owns.
    pub const WORKER_ASSIGNED_PARTITIONS: &str = "firstcome_worker_assigned_partitions";
    /// Gauge: partitions paused because their task is behind.
    pub const WORKER_PAUSED_PARTITIONS: &str = "firstcome_worker_paused_partitions";

    /// The names a scrape shows for each metric (suffixes included).
    pub fn exposed() -> Vec<String> {
        let counters = [
            INGRESS_REQUESTS,
            INGRESS_ACCEPTED,
            INGRESS_BROKER_ERRORS,
            INGRESS_SHORT_CIRCUIT,
            WORKER_DECISIONS,
            WORKER_RETRIES,
            WORKER_DEAD_LETTERS,
            WORKER_STATE_REBUILDS,
            WORKER_STATES_RETIRED,
            WORKER_REBALANCES,
        ];
        let gauges = [
            INGRESS_IN_FLIGHT,
            INGRESS_LONG_POLLS,
            INGRESS_CONNECTIONS,
            WORKER_CONSUMER_LAG,
            WORKER_ASSIGNED_PARTITIONS,
            WORKER_PAUSED_PARTITIONS,
        ];
        let histograms = [
            INGRESS_REQUEST_DURATION,
            INGRESS_PRODUCE_DURATION,
            WORKER_BATCH_RECORDS,
            WORKER_LUA_DURATION,
            WORKER_PG_DURATION,
        ];
        let mut all: Vec<String> = counters.iter().map(|n| format!("{n}_total")).collect();
        all.extend(gauges.iter().map(|n| n.to_string()));
        for h in histograms {
            all.extend(["_bucket", "_sum", "_count"].map(|s| format!("{h}{s}")));
        }
        all
    }
}

/// The worker's retried steps, shown at zero from the start.
pub const RETRY_STEPS: [&str; 8] = [
    "decide",
    "rebuild",
    "persist",
    "persist record",
    "persist failure",
    "undo decision",
    "dead-letter",
    "publish statuses",
];

/// One label.
type Label = [(&'static str, &'static str); 1];

/// `route` × `method` × `status` of an HTTP answer.
type HttpLabels = [(&'static str, HttpLabel); 3];

/// A label value of an HTTP answer: static text, or a status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum HttpLabel {
    /// A route pattern or a method.
    Text(&'static str),
    /// A status code.
    Code(u16),
}

impl prometheus_client::encoding::EncodeLabelValue for HttpLabel {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        match self {
            Self::Text(t) => t.encode(encoder),
            Self::Code(c) => c.encode(encoder),
        }
    }
}

/// Seconds, from 0.5 ms to about 8 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

/// Renders a registry in the OpenMetrics text format.
fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(8 * 1024);
    encode(&mut out, registry).expect("writing to a String cannot fail");
    out
}

/// What the HTTP ingress counts.
pub struct IngressMetrics {
    registry: Registry,
    requests: Family<HttpLabels, Counter>,
    request_duration: Family<Label, Histogram, fn() -> Histogram>,
    /// HTTP requests being served now.
    pub in_flight: Gauge,
    /// Long polls waiting now.
    pub long_polls: Gauge,
    /// Client connections open now.
    pub connections: Gauge,
    produce_duration: Histogram,
    /// Issue requests the broker acknowledged.
    pub accepted: Counter,
    broker_errors: Family<Label, Counter>,
    short_circuit: Family<Label, Counter>,
}

impl IngressMetrics {
    /// Registers every ingress metric on a registry of its own.
    pub fn new() -> Arc<Self> {
        use names::*;
        let mut registry = Registry::default();
        let m = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency),
            in_flight: Gauge::default(),
            long_polls: Gauge::default(),
            connections: Gauge::default(),
            produce_duration: latency(),
            accepted: Counter::default(),
            broker_errors: Family::default(),
            short_circuit: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            INGRESS_REQUESTS,
            "HTTP answers by route, method and status",
            m.requests.clone(),
        );
        registry.register(
            INGRESS_REQUEST_DURATION,
            "Seconds from request to answer, by route",
            m.request_duration.clone(),
        );
        registry.register(
            INGRESS_IN_FLIGHT,
            "HTTP requests being served",
            m.in_flight.clone(),
        );
        registry.register(
            INGRESS_LONG_POLLS,
            "Long polls waiting for a decision",
            m.long_polls.clone(),
        );
        registry.register(
            INGRESS_CONNECTIONS,
            "Client connections open",
            m.connections.clone(),
        );
        registry.register(
            INGRESS_PRODUCE_DURATION,
            "Seconds from producing an issue request to the broker's acknowledgement",
            m.produce_duration.clone(),
        );
        registry.register(
            INGRESS_ACCEPTED,
            "Issue requests the broker acknowledged (answered 202)",
            m.accepted.clone(),
        );
        registry.register(
            INGRESS_BROKER_ERRORS,
            "Appends the broker did not acknowledge, by kind (error, timeout)",
            m.broker_errors.clone(),
        );
        registry.register(
            INGRESS_SHORT_CIRCUIT,
            "Issue requests answered 409 without an append, by reason (sold_out, not_open)",
            m.short_circuit.clone(),
        );
        for kind in ["error", "timeout"] {
            let _ = m.broker_errors.get_or_create(&[("kind", kind)]);
        }
        for reason in ["sold_out", "not_open"] {
            let _ = m.short_circuit.get_or_create(&[("reason", reason)]);
        }
        Arc::new(Self { registry, ..m })
    }

    /// Counts one HTTP answer. `route` is the matched route pattern, or
    /// `other` for paths no route matched (so the label set stays bounded).
    pub fn answered(&self, route: &'static str, method: &'static str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&[
                ("route", HttpLabel::Text(route)),
                ("method", HttpLabel::Text(method)),
                ("status", HttpLabel::Code(status)),
            ])
            .inc();
        self.request_duration
            .get_or_create(&[("route", route)])
            .observe(took.as_secs_f64());
    }

    /// Times one produce until its acknowledgement (or failure).
    pub fn produced(&self, took: Duration) {
        self.produce_duration.observe(took.as_secs_f64());
    }

    /// Counts an append the broker did not acknowledge.
    pub fn broker_error(&self, kind: &'static str) {
        self.broker_errors.get_or_create(&[("kind", kind)]).inc();
    }

    /// Counts an issue request answered at once.
    pub fn short_circuit(&self, reason: &'static str) {
        self.short_circuit
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// The current values, in the OpenMetrics text format.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

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
}

impl WorkerMetrics {
    /// Registers every worker metric on a registry of its own;
    /// `dead_letter_kinds` are shown at zero from the start.
    pub fn new(dead_letter_kinds: &[&'static str]) -> Arc<Self> {
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
        for kind in ["assign", "revoke"] {
            let _ = m.rebalances.get_or_create(&[("kind", kind)]);
        }
        for step in RETRY_STEPS {
            for class in ["transient", "permanent"] {
                let _ = m.retries.get_or_create(&[("step", step), ("class", class)]);
            }
        }
        for &kind in dead_letter_kinds {
            let _ = m.dead_letters.get_or_create(&[("kind", kind)]);
        }
        Arc::new(Self { registry, ..m })
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
    pub fn retried(&self, step: &'static str, permanent: bool) {
        let class = if permanent { "permanent" } else { "transient" };
        self.retries
            .get_or_create(&[("step", step), ("class", class)])
            .inc();
    }

    /// Counts a dead letter.
    pub fn dead_lettered(&self, kind: &'static str) {
        self.dead_letters.get_or_create(&[("kind", kind)]).inc();
    }

    /// Counts a rebalance event.
    pub fn rebalanced(&self, kind: &'static str) {
        self.rebalances.get_or_create(&[("kind", kind)]).inc();
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
        let m = WorkerMetrics::new(&[]);
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
        let m = WorkerMetrics::new(&[]);
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
