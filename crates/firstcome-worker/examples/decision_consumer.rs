//! A downstream consumer of the decision stream (docs/decision-stream.md):
//! reads committed decisions only, and prints each once.
//!
//! ```text
//! cargo run -p firstcome-worker --example decision_consumer -- 127.0.0.1:59092 firstcome.decisions
//! ```
//!
//! A real consumer would apply each event and its offset in one transaction
//! of its own store, and keep `event_id` to drop a redelivery; this one
//! keeps the ids it saw in memory.

use std::collections::HashSet;

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};

#[derive(serde::Deserialize)]
struct Decision {
    event_id: String,
    coupon_id: String,
    user_id: String,
    status: String,
    decision_seq: Option<i64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let brokers = args.next().unwrap_or_else(|| "127.0.0.1:59092".into());
    let topic = args.next().unwrap_or_else(|| "firstcome.decisions".into());
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "decision-consumer-example")
        // Only what committed transactions hold: every stored decision once.
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let mut seen = HashSet::new();
    loop {
        let m = consumer.recv().await?;
        let d: Decision = serde_json::from_slice(m.payload().unwrap_or_default())?;
        if seen.insert(d.event_id.clone()) {
            println!(
                "{} #{:?} {} {}",
                d.coupon_id, d.decision_seq, d.user_id, d.status
            );
        }
        consumer.commit_message(&m, CommitMode::Async)?;
    }
}
