//! Kafka client settings every producer and consumer of ours starts from, and
//! topic creation. Only the Kafka protocol is used, so any compliant broker
//! works; production and the local stack run Apache Kafka.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::ToBytes;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
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
    // Created is not yet usable: each partition needs a leader, which the
    // controller elects a moment later (on a slow machine, long enough for
    // a first read to fail with NotLeaderForPartition).
    let names: Vec<&str> = topics.iter().map(|(name, _)| *name).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !all_led(admin.inner(), &names) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "topics {names:?} have partitions without a leader 30 s after they were created"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Deletes every topic whose name starts with one of `prefixes` and
/// returns how many there were. For the suite and the bench, which name
/// all their topics after one tag each: a broker keeps files of every
/// partition open, so topics nobody deletes pile up run after run until it
/// runs out of file descriptors.
pub async fn delete_topics_starting_with(
    common: &CommonConfig,
    prefixes: &[String],
) -> anyhow::Result<usize> {
    anyhow::ensure!(
        prefixes.iter().all(|p| !p.is_empty()),
        "an empty prefix names every topic"
    );
    let admin: AdminClient<DefaultClientContext> = client_config(common)?.create()?;
    let meta = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))?;
    let names: Vec<&str> = meta
        .topics()
        .iter()
        .map(|t| t.name())
        .filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
        .collect();
    if names.is_empty() {
        return Ok(0);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.delete_topics(&names, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => anyhow::bail!("deleting topic {topic}: {code}"),
        }
    }
    Ok(names.len())
}

/// Whether every partition of `topics` has a leader, as the broker says now.
fn all_led<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topics: &[&str],
) -> bool {
    topics.iter().all(|topic| {
        client
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()
            .and_then(|m| {
                let t = m.topics().first()?;
                Some(
                    t.error().is_none()
                        && !t.partitions().is_empty()
                        && t.partitions()
                            .iter()
                            .all(|p| p.error().is_none() && p.leader() >= 0),
                )
            })
            .unwrap_or(false)
    })
}

/// How long each topic keeps its records (`retention.ms`); `None` for a
/// topic that keeps them forever (`-1`).
pub async fn retention(
    common: &CommonConfig,
    topics: &[&str],
) -> anyhow::Result<Vec<Option<Duration>>> {
    let admin: AdminClient<DefaultClientContext> = client_config(common)?.create()?;
    let specifiers: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let described = admin.describe_configs(&specifiers, &opts).await?;
    topics
        .iter()
        .zip(described)
        .map(|(topic, result)| {
            let config =
                result.map_err(|code| anyhow::anyhow!("describing topic {topic}: {code}"))?;
            let ms: i64 = config
                .get("retention.ms")
                .and_then(|e| e.value.as_deref())
                .ok_or_else(|| anyhow::anyhow!("topic {topic} shows no retention.ms"))?
                .parse()?;
            Ok(u64::try_from(ms).ok().map(Duration::from_millis))
        })
        .collect()
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

/// A record's headers as text (lossy UTF-8; a header without a value maps
/// to ""), for people and checks; the worker's own parsing of headers it
/// acts on lives in `record` and `deadletter`.
pub fn text_headers(m: &impl Message) -> std::collections::BTreeMap<String, String> {
    use rdkafka::message::Headers;
    m.headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    let value = String::from_utf8_lossy(h.value.unwrap_or_default());
                    (h.key.to_owned(), value.into_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A producer that replaces itself after a fatal error.
///
/// An idempotent producer recovers from a broker outage by itself: records
/// that timed out bump its epoch (KIP-360), which Apache Kafka takes, and the
/// next records go through (tests/broker.rs kills and freezes the broker to
/// check it). What it cannot recover from is a *fatal* error (librdkafka's
/// `rd_kafka_fatal_error`, e.g. a sequence the broker can no longer match):
/// from then on every send fails, and librdkafka's advice is to create a new
/// producer. That is what this does, on the first failure after a fatal
/// error; the fresh producer takes over only once it reaches the broker, so
/// an outage does not churn producers. Every sender holding the old one
/// finishes on it.
pub struct HealingProducer {
    config: ClientConfig,
    current: std::sync::RwLock<(u64, FutureProducer)>,
    replaced: AtomicU64,
    healing: tokio::sync::Mutex<()>,
}

impl HealingProducer {
    /// Creates the first producer from `config` (see [`producer_config`]).
    pub fn new(config: ClientConfig) -> KafkaResult<Self> {
        let producer: FutureProducer = config.create()?;
        Ok(Self {
            config,
            current: std::sync::RwLock::new((0, producer)),
            replaced: AtomicU64::new(0),
            healing: tokio::sync::Mutex::new(()),
        })
    }

    /// The producer in use now.
    pub fn producer(&self) -> FutureProducer {
        self.current.read().expect("lock").1.clone()
    }

    /// How often the producer was replaced.
    pub fn replacements(&self) -> u64 {
        self.replaced.load(Ordering::Relaxed)
    }

    /// Sends one record and waits for the broker's acknowledgement, or for
    /// `queue_timeout` when the local queue is full; where it was written
    /// (partition, offset).
    pub async fn send<K, P>(
        &self,
        record: FutureRecord<'_, K, P>,
        queue_timeout: Duration,
    ) -> Result<(i32, i64), KafkaError>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let (generation, producer) = self.current.read().expect("lock").clone();
        match producer.send(record, Timeout::After(queue_timeout)).await {
            Ok(delivered) => Ok((delivered.partition, delivered.offset)),
            Err((e, _)) => {
                self.failed(generation, &producer).await;
                Err(e)
            }
        }
    }

    async fn failed(&self, generation: u64, producer: &FutureProducer) {
        let Some(fatal) = producer.client().fatal_error() else {
            return;
        };
        // One replacement at a time, and only of the producer that failed.
        let Ok(_healing) = self.healing.try_lock() else {
            return;
        };
        if self.current.read().expect("lock").0 != generation {
            return;
        }
        let config = self.config.clone();
        let fresh = tokio::task::spawn_blocking(move || -> Option<FutureProducer> {
            let fresh: FutureProducer = config.create().ok()?;
            fresh
                .client()
                .fetch_metadata(None, Duration::from_secs(2))
                .ok()?;
            Some(fresh)
        })
        .await
        .ok()
        .flatten();
        let Some(fresh) = fresh else {
            tracing::debug!(
                ?fatal,
                "producer failed fatally, broker unreachable: keeping it for now"
            );
            return;
        };
        *self.current.write().expect("lock") = (generation + 1, fresh);
        self.replaced.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(?fatal, "replaced the Kafka producer after a fatal error");
    }
}
