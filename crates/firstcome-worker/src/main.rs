//! `firstcome-worker`: the consumer (`run`) and the operator's commands
//! (`firstcome_worker::commands`, each with its arguments and its `run`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use firstcome_worker::commands::{dlq, migrate, prune, rebuild, reconcile, topics};
use firstcome_worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc's malloc: a sixth of the instructions per
/// record (docs/benchmarks.md, "What the counts cut").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    Migrate(migrate::Args),
    /// Compare each coupon's Redis state with Postgres. Exit code 0: in sync;
    /// 1: drift; 2: the check could not run.
    Reconcile(reconcile::Args),
    /// Redis maintenance.
    Redis {
        #[command(subcommand)]
        command: RedisCommand,
    },
    /// Read the dead-letter topic.
    Dlq {
        #[command(subcommand)]
        command: dlq::Command,
    },
    /// Delete ledger rows, failure records (and audit rows) older than a
    /// cutoff, in small batches, while everything runs. Refuses a cutoff
    /// shorter than the topics' retention (see `docs/operations.md`).
    Prune(prune::Args),
    /// Create the request, dead-letter and decision topics if they do not
    /// exist.
    Topics(topics::Args),
}

#[derive(Subcommand)]
enum RedisCommand {
    /// Rebuild coupons' Redis state from Postgres (stock, holders, earlier
    /// decisions), pausing decisions on each coupon while it runs. Safe while
    /// workers run. Exit code 0: rebuilt; 2: failed (run it again).
    Rebuild(rebuild::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Run(cfg) => run(cfg).await,
        Command::Migrate(args) => migrate::run(args).await,
        Command::Reconcile(args) => Ok(reconcile::run(args).await),
        Command::Redis {
            command: RedisCommand::Rebuild(args),
        } => Ok(rebuild::run(args).await),
        Command::Dlq { command } => dlq::run(command).await,
        Command::Prune(args) => prune::run(args).await,
        Command::Topics(args) => topics::run(args).await,
    }
}

/// The consumer, until SIGTERM or SIGINT.
async fn run(cfg: WorkerConfig) -> anyhow::Result<ExitCode> {
    let _telemetry = firstcome::telemetry::init_service(cfg.common.log_json, "firstcome-worker");
    tracing::info!(config = ?cfg.common, group = %cfg.group_id, "starting");
    let shutdown = CancellationToken::new();
    firstcome::shutdown::cancel_on_signal(shutdown.clone());
    Worker::build(cfg)
        .await?
        .run_until_stopped(shutdown)
        .await?;
    Ok(ExitCode::SUCCESS)
}
