//! What the ingress counts, on `/metrics` of its operations port. The
//! names are the contract in [`firstcome::metrics::names`].

use std::sync::Arc;
use std::time::Duration;

use firstcome::Status;
use firstcome::metrics::{HttpLabel, HttpLabels, Label, latency, names, render};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

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
    dependency_up: Family<Label, Gauge>,
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
            dependency_up: Family::default(),
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
        registry.register(
            INGRESS_DEPENDENCY_UP,
            "1 when the last look (once a second) found the dependency answering, by dependency (kafka, postgres, redis)",
            m.dependency_up.clone(),
        );
        for kind in [BrokerError::Error, BrokerError::Timeout] {
            let _ = m.broker_errors.get_or_create(&[("kind", kind.as_str())]);
        }
        for reason in [Status::SoldOut, Status::NotOpen] {
            let _ = m
                .short_circuit
                .get_or_create(&[("reason", reason.as_str())]);
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
    pub fn broker_error(&self, kind: BrokerError) {
        self.broker_errors
            .get_or_create(&[("kind", kind.as_str())])
            .inc();
    }

    /// Counts an issue request answered at once with its final status
    /// (`sold_out` or `not_open`), never appended.
    pub fn short_circuit(&self, reason: Status) {
        self.short_circuit
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    /// Records the last look at a dependency.
    pub fn dependency(&self, name: &'static str, up: bool) {
        self.dependency_up
            .get_or_create(&[("dependency", name)])
            .set(i64::from(up));
    }

    /// The current values, in the OpenMetrics text format.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

/// Why the broker did not acknowledge an append, as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerError {
    /// The broker (or librdkafka) answered with an error.
    Error,
    /// No answer within the produce timeout.
    Timeout,
}

impl BrokerError {
    /// The metrics label.
    pub const fn as_str(self) -> &'static str {
        match self {
            BrokerError::Error => "error",
            BrokerError::Timeout => "timeout",
        }
    }
}
