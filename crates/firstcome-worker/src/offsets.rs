//! Where the worker's progress in a partition is kept: the offsets of the
//! consumer group. The pipeline stores an offset past a batch once the batch
//! is durable; the retire sweep asks how far the group has committed and
//! where a partition ends. Both go through [`Offsets`], so neither names
//! the consumer type; the consumer implements it (`GroupOffsets`, beside
//! the consumer it asks).

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
