//! `firstcome-worker`: the consumer (`run`) and the operator's commands.

use clap::{Parser, Subcommand};
use firstcome::config::CommonConfig;
use firstcome_worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "firstcome-worker",
    version,
    about = "Worker and operations tool of firstcome"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the consumer group and decide issue requests until stopped.
    Run(WorkerConfig),
    /// Apply the database migrations (safe to run repeatedly and concurrently).
    Migrate {
        /// Postgres URL.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Create the request and dead-letter topics if they do not exist.
    Topics {
        #[command(flatten)]
        common: CommonConfig,
        /// Partitions of the request topic: the most workers that can share the load.
        #[arg(long, env = "FIRSTCOME_REQUEST_PARTITIONS", default_value_t = 12)]
        partitions: i32,
        /// Partitions of the dead-letter topic.
        #[arg(long, env = "FIRSTCOME_DLQ_PARTITIONS", default_value_t = 3)]
        dlq_partitions: i32,
        /// Replication factor of both topics (3 on a production cluster).
        #[arg(long, env = "FIRSTCOME_REPLICATION", default_value_t = 1)]
        replication: i32,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(cfg) => {
            firstcome::telemetry::init(cfg.common.log_json);
            tracing::info!(config = ?cfg.common, group = %cfg.group_id, "starting");
            let shutdown = CancellationToken::new();
            firstcome::shutdown::cancel_on_signal(shutdown.clone());
            Worker::build(cfg).await?.run_until_stopped(shutdown).await
        }
        Command::Migrate { database_url } => {
            firstcome::telemetry::init(false);
            let pool = sqlx::PgPool::connect(&database_url).await?;
            firstcome::db::migrate(&pool).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Topics {
            common,
            partitions,
            dlq_partitions,
            replication,
        } => {
            firstcome::telemetry::init(common.log_json);
            common.validate()?;
            firstcome::kafka::ensure_topics(
                &common,
                &[
                    (common.request_topic.as_str(), partitions),
                    (common.dlq_topic.as_str(), dlq_partitions),
                ],
                replication,
            )
            .await?;
            tracing::info!(request_topic = %common.request_topic, partitions, dlq_topic = %common.dlq_topic, dlq_partitions, "topics ready");
            Ok(())
        }
    }
}
