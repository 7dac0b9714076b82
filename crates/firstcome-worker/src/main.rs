//! `firstcome-worker`: the consumer (`run`) and the operator's commands.

use clap::{Parser, Subcommand};
use firstcome::config::CommonConfig;
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
    Migrate {
        /// Postgres URL.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Compare each coupon's Redis state with Postgres. Exit code 0: in sync;
    /// 1: drift; 2: the check could not run.
    Reconcile {
        #[command(flatten)]
        common: CommonConfig,
        /// Only this coupon.
        #[arg(long)]
        coupon: Option<String>,
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Redis maintenance.
    Redis {
        #[command(subcommand)]
        command: RedisCommand,
    },
    /// Read the dead-letter topic.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Delete ledger rows, failure records (and audit rows) older than a
    /// cutoff, in small batches, while everything runs. Refuses a cutoff
    /// shorter than the topics' retention (see `docs/operations.md`).
    Prune {
        #[command(flatten)]
        common: CommonConfig,
        #[command(flatten)]
        opts: firstcome_worker::prune::PruneOptions,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Create the request, dead-letter and decision topics if they do not
    /// exist.
    Topics {
        #[command(flatten)]
        common: CommonConfig,
        /// Partitions of the request topic (the most workers that can share
        /// the load) and of the decision topic.
        #[arg(long, env = "FIRSTCOME_REQUEST_PARTITIONS", default_value_t = 12)]
        partitions: i32,
        /// Partitions of the dead-letter topic.
        #[arg(long, env = "FIRSTCOME_DLQ_PARTITIONS", default_value_t = 3)]
        dlq_partitions: i32,
        /// Replication factor of the topics (3 on a production cluster).
        #[arg(long, env = "FIRSTCOME_REPLICATION", default_value_t = 1)]
        replication: i32,
    },
}

#[derive(Subcommand)]
enum RedisCommand {
    /// Rebuild coupons' Redis state from Postgres (stock, holders, earlier
    /// decisions), pausing decisions on each coupon while it runs. Safe while
    /// workers run. Exit code 0: rebuilt; 2: failed (run it again).
    Rebuild {
        #[command(flatten)]
        common: CommonConfig,
        /// Only these coupons (repeatable); every coupon when absent.
        #[arg(long)]
        coupon: Vec<String>,
        /// Longest a coupon stays paused, should this tool die half-way.
        #[arg(long, default_value_t = 60)]
        pause_secs: u64,
        /// How long to wait for Redis to answer first (down, or still
        /// loading its data after a restart: the usual moment to rebuild).
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Dead letters with what their headers say, one line each.
    List {
        #[command(flatten)]
        common: CommonConfig,
        #[command(flatten)]
        filter: firstcome_worker::dlq::Filter,
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back on the request topic (same key, value and
    /// request id; error headers stripped; replay count raised).
    Replay {
        #[command(flatten)]
        common: CommonConfig,
        #[command(flatten)]
        opts: firstcome_worker::dlq::ReplayOptions,
        /// Print the summary as JSON at the end.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter in full: every header and the original value.
    Show {
        #[command(flatten)]
        common: CommonConfig,
        /// Partition of the dead-letter topic.
        #[arg(long)]
        partition: i32,
        /// Offset there.
        #[arg(long)]
        offset: i64,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(cfg) => {
            let _telemetry =
                firstcome::telemetry::init_service(cfg.common.log_json, "firstcome-worker");
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
        Command::Reconcile {
            common,
            coupon,
            json,
        } => {
            firstcome::telemetry::init(common.log_json);
            match reconcile(&common, coupon.as_deref(), json).await {
                Ok(true) => Ok(()),
                Ok(false) => std::process::exit(1),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::exit(2);
                }
            }
        }
        Command::Redis {
            command:
                RedisCommand::Rebuild {
                    common,
                    coupon,
                    pause_secs,
                    wait_secs,
                    json,
                },
        } => {
            firstcome::telemetry::init(common.log_json);
            let waits = (pause_secs, wait_secs);
            if let Err(e) = rebuild(&common, &coupon, waits, json).await {
                eprintln!("error: {e:#}");
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Dlq {
            command: DlqCommand::Replay { common, opts, json },
        } => {
            firstcome::telemetry::init(common.log_json);
            common.validate()?;
            let summary =
                firstcome_worker::dlq::replay(&common, &opts, &mut std::io::stdout()).await?;
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            }
            Ok(())
        }
        Command::Dlq { command } => dlq(command),
        Command::Prune { common, opts, json } => {
            firstcome::telemetry::init(common.log_json);
            common.validate()?;
            let pruned = firstcome_worker::prune::prune(&common, &opts).await?;
            if json {
                println!("{}", serde_json::to_string(&pruned)?);
            } else {
                println!(
                    "pruned {} ledger rows, {} failure records, {} audit rows",
                    pruned.ledger_rows, pruned.failure_rows, pruned.audit_rows
                );
            }
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
                    // As many as the requests: keyed alike, a coupon's
                    // decisions land in the partition of its requests.
                    (common.decision_topic.as_str(), partitions),
                ],
                replication,
            )
            .await?;
            tracing::info!(request_topic = %common.request_topic, partitions, dlq_topic = %common.dlq_topic, dlq_partitions, decision_topic = %common.decision_topic, "topics ready");
            Ok(())
        }
    }
}

/// Prints the comparison; `Ok(true)` when every coupon is in sync.
async fn reconcile(
    common: &CommonConfig,
    coupon: Option<&str>,
    json: bool,
) -> anyhow::Result<bool> {
    common.validate()?;
    let only = coupon.map(firstcome::CouponId::parse).transpose()?;
    let pool = common.connect_postgres().await?;
    let mut redis = common
        .connect_redis(std::time::Duration::from_secs(10))
        .await?;
    let reports =
        firstcome_worker::reconcile::reconcile(&pool, &mut redis, &common.keys()?, only.as_ref())
            .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", firstcome_worker::reconcile::table(&reports));
    }
    Ok(reports.iter().all(|r| r.drift.is_empty()))
}

/// Rebuilds and prints what it did.
async fn rebuild(
    common: &CommonConfig,
    coupons: &[String],
    (pause_secs, wait_secs): (u64, u64),
    json: bool,
) -> anyhow::Result<()> {
    common.validate()?;
    let only = coupons
        .iter()
        .map(|c| firstcome::CouponId::parse(c.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let pool = common.connect_postgres().await?;
    let mut redis =
        firstcome_worker::rebuild::ready_redis(common, std::time::Duration::from_secs(wait_secs))
            .await?;
    let reports = firstcome_worker::rebuild::rebuild(
        &pool,
        &mut redis,
        &common.keys()?,
        &only,
        std::time::Duration::from_secs(pause_secs.max(1)),
    )
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", firstcome_worker::rebuild::table(&reports));
    }
    Ok(())
}

fn dlq(command: DlqCommand) -> anyhow::Result<()> {
    use firstcome_worker::dlq;
    match command {
        DlqCommand::List {
            common,
            filter,
            json,
        } => {
            firstcome::telemetry::init(common.log_json);
            common.validate()?;
            let letters = dlq::list(&common, &filter)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else {
                print!("{}", dlq::table(&letters));
            }
        }
        DlqCommand::Show {
            common,
            partition,
            offset,
            json,
        } => {
            firstcome::telemetry::init(common.log_json);
            common.validate()?;
            let filter = dlq::Filter {
                partition: Some(partition),
                offset: Some(offset),
                ..Default::default()
            };
            let letter = dlq::list(&common, &filter)?
                .into_iter()
                .next()
                .ok_or_else(|| {
                    anyhow::anyhow!("no dead letter at partition {partition}, offset {offset}")
                })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letter)?);
            } else {
                print!("{}", dlq::detail(&letter));
            }
        }
        DlqCommand::Replay { .. } => unreachable!("replay is async and handled in main"),
    }
    Ok(())
}
