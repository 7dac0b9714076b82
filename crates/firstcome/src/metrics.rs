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
//! - [`names`]: every metric name, as exposed: the contract with dashboards,
//!   alerts and the tests
//! - the label and histogram helpers both binaries build their metrics from;
//!   each binary's metrics live next to it (`firstcome_ingress::metrics`,
//!   `firstcome_worker::metrics`)
//!
//! The text format is OpenMetrics: counters are exposed with a `_total`
//! suffix, histograms as `_bucket`, `_sum` and `_count`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
    /// Gauge, `dependency` (`kafka`, `postgres`, `redis`): 1 when the
    /// ingress's last look (once a second) found it answering, else 0.
    pub const INGRESS_DEPENDENCY_UP: &str = "firstcome_ingress_dependency_up";

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
    /// Counter, `outcome` (`committed`, `aborted`): transactions of the
    /// decision stream.
    pub const WORKER_STREAM_TRANSACTIONS: &str = "firstcome_worker_stream_transactions";
    /// Counter: decisions published to the decision stream in committed
    /// transactions.
    pub const WORKER_STREAM_EVENTS: &str = "firstcome_worker_stream_events";
    /// Gauge: partitions of the decision topic whose last stable offset has
    /// stood below their end for longer than any live transaction lasts (a
    /// hanging transaction: docs/operations.md).
    pub const WORKER_STREAM_STALLED_PARTITIONS: &str = "firstcome_worker_stream_stalled_partitions";

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
            WORKER_STREAM_TRANSACTIONS,
            WORKER_STREAM_EVENTS,
        ];
        let gauges = [
            INGRESS_IN_FLIGHT,
            INGRESS_LONG_POLLS,
            INGRESS_CONNECTIONS,
            INGRESS_DEPENDENCY_UP,
            WORKER_CONSUMER_LAG,
            WORKER_STREAM_STALLED_PARTITIONS,
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

/// One label.
pub type Label = [(&'static str, &'static str); 1];

/// `route` × `method` × `status` of an HTTP answer.
pub type HttpLabels = [(&'static str, HttpLabel); 3];

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
pub fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

/// Renders a registry in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(8 * 1024);
    encode(&mut out, registry).expect("writing to a String cannot fail");
    out
}
