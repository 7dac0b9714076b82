//! `firstcome-worker topics`: the request, dead-letter and decision topics,
//! created if they do not exist.

use std::process::ExitCode;

use firstcome::config::CommonConfig;

/// The arguments of `topics`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The settings every binary shares.
    #[command(flatten)]
    pub common: CommonConfig,
    /// Partitions of the request topic (the most workers that can share
    /// the load) and of the decision topic.
    #[arg(long, env = "FIRSTCOME_REQUEST_PARTITIONS", default_value_t = 12)]
    pub partitions: i32,
    /// Partitions of the dead-letter topic.
    #[arg(long, env = "FIRSTCOME_DLQ_PARTITIONS", default_value_t = 3)]
    pub dlq_partitions: i32,
    /// Replication factor of the topics (3 on a production cluster).
    #[arg(long, env = "FIRSTCOME_REPLICATION", default_value_t = 1)]
    pub replication: i32,
}

/// Creates what is missing.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let Args {
        common,
        partitions,
        dlq_partitions,
        replication,
    } = args;
    super::start(&common)?;
    firstcome::kafka::ensure_topics(
        &common,
        &[
            (common.request_topic.as_str(), partitions),
            (common.dlq_topic.as_str(), dlq_partitions),
            // As many as the requests: keyed alike, a coupon's decisions
            // land in the partition of its requests.
            (common.decision_topic.as_str(), partitions),
        ],
        replication,
    )
    .await?;
    tracing::info!(request_topic = %common.request_topic, partitions, dlq_topic = %common.dlq_topic, dlq_partitions, decision_topic = %common.decision_topic, "topics ready");
    Ok(ExitCode::SUCCESS)
}
