//! Where the worker's progress in a partition is kept: the offsets of the
//! consumer group. The pipeline stores an offset past a batch once the batch
//! is durable; the retire sweep asks how far the group has committed and
//! where a partition ends. Both go through [`Offsets`], so neither names
//! the consumer type.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::consumer::Rebalancer;

/// How long a question to the broker may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// The group's offsets of the request topic.
pub trait Offsets: Send + Sync {
    /// Stores `next` (the offset after the last durable record) for
    /// librdkafka's next commit. Fails when the partition is no longer
    /// assigned; its next owner reads the records again.
    fn store(&self, partition: i32, next: i64) -> anyhow::Result<()>;

    /// The offset the next record of `partition` will get. Blocks on the
    /// broker.
    fn high_watermark(&self, partition: i32) -> anyhow::Result<i64>;

    /// The offset of the oldest record of `partition` the log still holds
    /// (the low watermark; retention moves it). Blocks on the broker.
    fn log_start(&self, partition: i32) -> anyhow::Result<i64>;

    /// The group's committed offset of `partition` (the next record to
    /// decide); 0 when none was committed. Blocks on the broker.
    fn committed(&self, partition: i32) -> anyhow::Result<i64>;
}

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
