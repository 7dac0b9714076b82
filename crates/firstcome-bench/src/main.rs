//! `firstcome-bench`: measures the pipeline and, in the same run on the same
//! services, the raw limits under it and the design it replaces.
//!
//! # Layout
//! - [`count`]: instructions per request and per record, by layer (callgrind)
//! - [`env`]: a scenario's own topics, group and Redis prefix on the stack
//! - [`procs`]: the binaries under test, as child processes
//! - [`svg`]: the plots' frame, grid, lines and legend
//! - [`servers`]: this tool's bare-HTTP and seed-design servers
//! - [`load`]: open- and closed-model load with HDR histograms
//! - [`scenarios`]: what is measured
//! - [`lifecycle`]: a thousand sales, memory and storage over time
//! - [`spread`]: one backlog over 1 to 100,000 coupons open at once
//! - [`sizing`]: the model for 10 and 100 times this machine's load
//! - [`topology`]: the flash sale on one node and on three brokers and Redis Cluster
//! - [`report`]: JSON, Markdown table and SVG chart

mod count;
mod env;
mod hostile;
mod lifecycle;
mod load;
mod procs;
mod report;
mod scenarios;
mod servers;
mod sizing;
mod spread;
mod svg;
mod topology;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use scenarios::Size;

/// mimalloc, as in the binaries it measures: the bare-HTTP server and the
/// load generator run on the same allocator as the ingress.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "firstcome-bench",
    about = "Benchmarks of firstcome (run it through scripts/bench)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenarios and write results.json, results.md and latency.svg.
    Run {
        /// Scenarios to run (repeatable); all when absent.
        #[arg(long = "scenario", value_enum)]
        scenarios: Vec<Scenario>,
        /// Seconds-long runs of every scenario, to check the tool works.
        #[arg(long)]
        smoke: bool,
        /// Where to write the results.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// Records of raw-produce, raw-pg and drain (default 100,000; smoke 600).
        #[arg(long)]
        records: Option<usize>,
        /// Requests of flash-sale and seed-baseline (default 30,000; smoke 300).
        #[arg(long)]
        sale_requests: Option<u64>,
    },
    /// Count the instructions per accepted request (ingress, raw-http) and
    /// per decided record (worker) under callgrind, by layer; writes
    /// count.json and count.md.
    Count {
        /// What to count (repeatable); all when absent.
        #[arg(long = "target", value_enum)]
        targets: Vec<CountTarget>,
        /// A few hundred requests, to check the tool works.
        #[arg(long)]
        smoke: bool,
        /// Where to write the results.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// The bare HTTP handler (used by the raw-http scenario).
    ServeRawHttp {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// The seed design (used by the seed-baseline scenario).
    ServeSeed {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    RawHttp,
    Ingress,
    RawProduce,
    RawConsume,
    RawRedis,
    RawPg,
    Drain,
    /// The drain with the decision stream on.
    DrainStream,
    FlashSale,
    /// One coupon of stock 100,000, a million requests from 600,000 users.
    HugeSale,
    SeedBaseline,
    /// Honest clients with and without an attack beside them.
    Hostile,
    /// One backlog spread over 1, 100, 10,000 and 100,000 coupons.
    Spread,
    /// The flash sale on the single node and on three brokers, Redis
    /// Cluster, two ingresses and two workers (three more JVMs; not in the
    /// default set).
    Topology,
    /// A thousand sales one after another (minutes; not in the default
    /// set): memory and storage over time, `lifecycle.svg`.
    Lifecycle,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CountTarget {
    RawHttp,
    Ingress,
    Worker,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_init();
    match Cli::parse().command {
        Command::ServeRawHttp { listen } => servers::raw_http(listen).await,
        Command::ServeSeed { listen } => servers::seed(listen).await,
        Command::Count {
            targets,
            smoke,
            out,
        } => count(targets, smoke, out).await,
        Command::Run {
            scenarios,
            smoke,
            out,
            records,
            sale_requests,
        } => {
            let mut size = if smoke { Size::SMOKE } else { Size::FULL };
            size.records = records.unwrap_or(size.records);
            size.sale_requests = sale_requests.unwrap_or(size.sale_requests);
            run(scenarios, size, smoke, out).await
        }
    }
}

async fn count(mut targets: Vec<CountTarget>, smoke: bool, out: PathBuf) -> anyhow::Result<()> {
    if targets.is_empty() {
        targets = CountTarget::value_variants().to_vec();
    }
    let size = if smoke {
        count::CountSize::SMOKE
    } else {
        count::CountSize::FULL
    };
    let dir = out.join("callgrind");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let machine = report::Machine::probe();
    let started = chrono::Utc::now().to_rfc3339();
    let mut counts = Vec::new();
    for t in targets {
        let outcome = match t {
            CountTarget::RawHttp => count::raw_http(size, &dir).await,
            CountTarget::Ingress => count::ingress(size, &dir).await,
            CountTarget::Worker => count::worker(size, &dir).await,
        };
        if let Err(e) = env::clean_up().await {
            eprintln!("[bench] cleaning up after a count: {e:#}");
        }
        let c = outcome?;
        eprintln!("{}", c.table());
        counts.push(c);
    }
    let md: String = std::iter::once(format!(
        "Machine: {machine}. Size: {}. Started {started}.\n\n",
        if smoke { "smoke" } else { "full" }
    ))
    .chain(counts.iter().map(|c| c.table() + "\n"))
    .collect();
    std::fs::write(
        out.join("count.json"),
        serde_json::to_string_pretty(&serde_json::json!({ "machine": machine, "counts": counts }))?,
    )?;
    std::fs::write(out.join("count.md"), md)?;
    eprintln!("[bench] counts in {}", out.display());
    Ok(())
}

fn tracing_init() {
    firstcome::telemetry::init(false);
}

async fn run(
    mut which: Vec<Scenario>,
    size: Size,
    smoke: bool,
    out: PathBuf,
) -> anyhow::Result<()> {
    if which.is_empty() {
        which = Scenario::value_variants()
            .iter()
            .copied()
            .filter(|s| !matches!(s, Scenario::Lifecycle | Scenario::Topology))
            .collect();
    }
    let mut r = report::Results {
        machine: Some(report::Machine::probe()),
        size: if smoke { "smoke" } else { "full" }.to_owned(),
        started_at: chrono::Utc::now().to_rfc3339(),
        ..Default::default()
    };
    for s in which {
        let name = s
            .to_possible_value()
            .expect("no skipped variants")
            .get_name()
            .to_owned();
        eprintln!("[bench] {name} …");
        let started = std::time::Instant::now();
        let context = || format!("scenario {name}");
        let outcome: anyhow::Result<()> = async {
            match s {
                Scenario::RawHttp => {
                    r.raw_http = Some(scenarios::raw_http(size).await.with_context(context)?)
                }
                Scenario::Ingress => {
                    r.ingress = Some(scenarios::ingress(size).await.with_context(context)?)
                }
                Scenario::RawProduce => {
                    r.raw_produce = Some(scenarios::raw_produce(size).await.with_context(context)?)
                }
                Scenario::RawConsume => {
                    let (spread, one) = scenarios::raw_consume(size).await.with_context(context)?;
                    r.raw_consume = Some(spread);
                    r.raw_consume_one_partition = Some(one);
                }
                Scenario::RawRedis => {
                    r.raw_redis = Some(scenarios::raw_redis(size).await.with_context(context)?)
                }
                Scenario::RawPg => {
                    r.raw_pg = Some(scenarios::raw_pg(size).await.with_context(context)?)
                }
                Scenario::Drain => {
                    r.drain = Some(scenarios::drain(size).await.with_context(context)?)
                }
                Scenario::DrainStream => {
                    r.drain_stream =
                        Some(scenarios::drain_stream(size).await.with_context(context)?)
                }
                Scenario::FlashSale => {
                    r.flash_sale = Some(scenarios::flash_sale(size).await.with_context(context)?)
                }
                Scenario::HugeSale => {
                    r.huge_sale = Some(
                        scenarios::huge_sale(size, smoke)
                            .await
                            .with_context(context)?,
                    )
                }
                Scenario::SeedBaseline => {
                    r.seed_baseline = Some(scenarios::seed(size).await.with_context(context)?)
                }
                Scenario::Hostile => {
                    r.hostile = Some(hostile::hostile(size).await.with_context(context)?)
                }
                Scenario::Topology => {
                    r.topology = Some(
                        topology::topology(size, smoke)
                            .await
                            .with_context(context)?,
                    )
                }
                Scenario::Spread => {
                    r.spread = Some(spread::spread(size, smoke).await.with_context(context)?)
                }
                Scenario::Lifecycle => {
                    let size = if smoke {
                        lifecycle::LifecycleSize::SMOKE
                    } else {
                        lifecycle::LifecycleSize::FULL
                    };
                    r.lifecycle = Some(lifecycle::lifecycle(size).await.with_context(context)?)
                }
            }
            Ok(())
        }
        .await;
        // Whatever happened, the run's data goes.
        if let Err(e) = env::clean_up().await {
            eprintln!("[bench] cleaning up after {name}: {e:#}");
        }
        outcome?;
        eprintln!(
            "[bench] {name} done in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    r.judge();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&r)?)?;
    std::fs::write(out.join("results.md"), r.table())?;
    std::fs::write(out.join("latency.svg"), r.svg())?;
    if let Some(l) = &r.lifecycle {
        std::fs::write(out.join("lifecycle.svg"), l.svg())?;
        std::fs::write(out.join("lifecycle.md"), l.table())?;
        println!("{}", l.table());
        anyhow::ensure!(l.errors == 0, "{} lifecycle requests failed", l.errors);
    }
    println!("{}", r.table());
    eprintln!("[bench] results in {}", out.display());
    // A run that broke the promise is a failed run.
    for (name, f) in r.sales() {
        anyhow::ensure!(
            f.violations == 0,
            "{name} broke the promise: {} violations",
            f.violations
        );
    }
    Ok(())
}
