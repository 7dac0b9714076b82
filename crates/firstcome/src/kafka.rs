//! Kafka client settings every producer and consumer of ours starts from, and
//! topic creation. Only the Kafka protocol is used, so any compliant broker
//! (Apache Kafka in production, nisshi locally) works.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::config::{CommonConfig, ConfigError};

/// Settings shared by every client: brokers, then the operator's extra options.
pub fn client_config(common: &CommonConfig) -> Result<ClientConfig, ConfigError> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &common.kafka_brokers)
        // Resolve `localhost` and friends to IPv4 first; a broker that only
        // listens on 127.0.0.1 otherwise costs a failed IPv6 attempt.
        .set("broker.address.family", "v4");
    for (k, v) in common.kafka_options()? {
        cfg.set(k, v);
    }
    Ok(cfg)
}

/// A producer that writes each record exactly once and only reports success
/// once every in-sync replica has it. `murmur2_random` is the Java client's
/// partitioner, so a coupon lands in the same partition whoever writes it.
pub fn producer_config(
    common: &CommonConfig,
    delivery_timeout: Duration,
    linger: Duration,
) -> Result<ClientConfig, ConfigError> {
    let mut cfg = client_config(common)?;
    cfg.set("acks", "all")
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", linger.as_millis().to_string())
        .set(
            "message.timeout.ms",
            delivery_timeout.as_millis().to_string(),
        );
    // The operator's options win over our defaults.
    for (k, v) in common.kafka_options()? {
        cfg.set(k, v);
    }
    Ok(cfg)
}

/// Creates the topics that do not exist yet; existing ones are left alone.
pub async fn ensure_topics(
    common: &CommonConfig,
    topics: &[(&str, i32)],
    replication: i32,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(common)?.create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| {
            NewTopic::new(name, *partitions, TopicReplication::Fixed(replication))
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Reads a whole topic, every partition from its first to its last record at
/// the time of the call, in (partition, offset) order. For tools and tests:
/// it joins no group and commits nothing.
pub fn read_topic(
    common: &CommonConfig,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<OwnedMessage>> {
    let consumer: BaseConsumer = client_config(common)?
        .set("group.id", "firstcome-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()?;
    let meta = consumer.fetch_metadata(Some(topic), timeout)?;
    let Some(t) = meta.topics().first().filter(|t| t.error().is_none()) else {
        anyhow::bail!("topic {topic} does not exist");
    };
    let mut partitions: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    partitions.sort_unstable();
    let mut out = Vec::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
        consumer.assign(&tpl)?;
        let deadline = std::time::Instant::now() + timeout;
        let mut next = low;
        while next < high {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "reading {topic}/{p} timed out at offset {next} of {high}"
            );
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = m?;
            if m.partition() != p || m.offset() < next {
                continue;
            }
            next = m.offset() + 1;
            out.push(m.detach());
        }
    }
    Ok(out)
}
