//! The sizing model: from one run's costs per request and per record, what
//! a shop needs for 1, 10 and 100 times the load this machine carries, and
//! which part runs out first. `results.md` carries it when the scenarios it
//! needs ran (`ingress`, `drain`, `spread`, `flash-sale`). docs/operations.md, "Sizing for ten and a hundred
//! times", reads it.
//!
//! The model's assumptions, all on the safe side:
//! - every request reaches the log (a sale that sells out early appends far
//!   fewer: the ingress answers the rest `409` at once);
//! - each part runs at most at 60 % of its cores, so a burst and a failed
//!   node have room;
//! - a Redis shard is one core (Redis runs commands on one thread), and a
//!   Postgres primary has at most 64 cores;
//! - a coupon is one partition, decided by one worker and stored by one
//!   stream of transactions: its ceiling is the hot coupon's drain,
//!   however many machines are added.

use serde::Serialize;

use crate::scenarios::{Drain, FlashSale, HttpCurve};
use crate::spread::Spread;

/// Cores a part may use at most, as a share.
const UTILIZATION: f64 = 0.6;
/// Cores of one replica of the ingress, the worker or a broker.
const REPLICA_CORES: f64 = 2.0;
/// Brokers that write each record at replication 3: three times one
/// broker's work. (The `topology` scenario measures the cluster on one
/// machine, where its idle replication and heartbeats weigh on every
/// request of a short sale: 24 times one broker's CPU per request on
/// 2026-12-06, not a cost that grows with the load.)
const REPLICATION: f64 = 3.0;
/// Cores of the largest Postgres primary the model allows.
const PG_PRIMARY_CORES: f64 = 64.0;

/// What the model starts from, as measured.
#[derive(Debug, Clone, Serialize)]
pub struct Costs {
    /// Requests/s this machine carried end to end (the flash sale).
    pub base_per_s: f64,
    /// The ingress's CPU per request, µs (the ingress scenario at 80 %).
    pub ingress_us: f64,
    /// The worker's CPU per record, µs (`spread` over 100 coupons).
    pub worker_us: f64,
    /// The brokers' CPU per record, µs, at replication 3.
    pub broker_us: f64,
    /// Postgres's CPU per record, µs.
    pub pg_us: f64,
    /// Redis's CPU per record, µs.
    pub redis_us: f64,
    /// Redis memory per record while its sale runs, bytes.
    pub redis_bytes: f64,
    /// One partition's (one hot coupon's) decisions/s.
    pub partition_per_s: f64,
}

/// One row of the model.
#[derive(Debug, Clone, Serialize)]
pub struct Need {
    /// Times the base load.
    pub times: u32,
    /// Requests/s.
    pub per_s: f64,
    /// Ingress replicas of 2 cores.
    pub ingresses: u32,
    /// Worker replicas of 2 cores (one partition at least each).
    pub workers: u32,
    /// Partitions of the request topic.
    pub partitions: u32,
    /// Brokers of 2 cores (3 at least, for replication 3).
    pub brokers: u32,
    /// Redis shards (primaries) of one core.
    pub redis_shards: u32,
    /// Postgres cores.
    pub pg_cores: f64,
    /// Redis memory for a sale's worth of records held for a minute, GiB.
    pub redis_gib_per_minute: f64,
}

/// The model of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Sizing {
    /// The costs it starts from.
    pub costs: Costs,
    /// 1, 10 and 100 times the base.
    pub needs: Vec<Need>,
    /// Times the base at which one Redis (one core) is outgrown and Redis
    /// Cluster is needed.
    pub redis_outgrown_at: f64,
    /// Times the base at which one Postgres primary of 64 cores is
    /// outgrown and Postgres must be sharded (docs/operations.md, "Past
    /// one Postgres").
    pub pg_outgrown_at: f64,
}

fn cores(per_s: f64, us: f64) -> f64 {
    per_s * us / 1e6 / UTILIZATION
}

fn count(x: f64) -> u32 {
    x.ceil().max(1.0) as u32
}

impl Sizing {
    /// The model, when the run measured what it needs: the ingress's
    /// curve, the flash sale, the spread and the drain.
    pub fn of(
        ingress: Option<&HttpCurve>,
        sale: Option<&FlashSale>,
        spread: Option<&Spread>,
        drain: Option<&Drain>,
    ) -> Option<Self> {
        let (ingress, sale, spread) = (ingress?, sale?, spread?);
        let mixed = spread
            .points
            .iter()
            .find(|p| p.coupons == 100)
            .or(spread.points.first())?;
        let costs = Costs {
            base_per_s: sale.end_to_end_per_s,
            ingress_us: ingress.cpu_us_per_request?,
            worker_us: mixed.worker_cpu_us_per_record,
            broker_us: mixed.broker.as_ref()?.cpu_us_per_item * REPLICATION,
            pg_us: mixed.pg_cpu_us_per_record,
            redis_us: mixed.redis_cpu_us_per_record,
            redis_bytes: mixed.redis_bytes_per_record,
            partition_per_s: drain?.hot.per_s,
        };
        let needs = [1, 10, 100]
            .into_iter()
            .map(|times| {
                let per_s = costs.base_per_s * f64::from(times);
                let workers = count(cores(per_s, costs.worker_us) / REPLICA_CORES);
                let redis_shards = count(cores(per_s, costs.redis_us));
                let pg_cores = cores(per_s, costs.pg_us);
                Need {
                    times,
                    per_s,
                    ingresses: count(cores(per_s, costs.ingress_us) / REPLICA_CORES),
                    workers,
                    partitions: count(per_s / costs.partition_per_s).max(workers),
                    brokers: count(cores(per_s, costs.broker_us) / REPLICA_CORES).max(3),
                    redis_shards,
                    pg_cores,
                    redis_gib_per_minute: per_s * 60.0 * costs.redis_bytes
                        / 1024.0
                        / 1024.0
                        / 1024.0,
                }
            })
            .collect();
        let outgrown = |us: f64, cores: f64| cores * UTILIZATION * 1e6 / us / costs.base_per_s;
        Some(Self {
            redis_outgrown_at: outgrown(costs.redis_us, 1.0),
            pg_outgrown_at: outgrown(costs.pg_us, PG_PRIMARY_CORES),
            costs,
            needs,
        })
    }

    /// The model as Markdown.
    pub fn table(&self) -> String {
        let c = &self.costs;
        let mut out = format!(
            "Costs: ingress {:.0} µs/request, worker {:.0}, brokers (replication 3) {:.0}, Postgres {:.0}, Redis {:.0} µs/record; Redis {:.0} B/record; one partition {:.0} decisions/s. Base: {:.0} requests/s end to end.\n\n",
            c.ingress_us,
            c.worker_us,
            c.broker_us,
            c.pg_us,
            c.redis_us,
            c.redis_bytes,
            c.partition_per_s,
            c.base_per_s
        );
        out.push_str(
            "| load | requests/s | ingresses | workers | partitions | brokers | Redis shards | Postgres cores | Redis GiB per minute of sale |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        for n in &self.needs {
            out.push_str(&format!(
                "| {}× | {:.0} | {} | {} | {} | {} | {} | {:.1} | {:.2} |\n",
                n.times,
                n.per_s,
                n.ingresses,
                n.workers,
                n.partitions,
                n.brokers,
                n.redis_shards,
                n.pg_cores,
                n.redis_gib_per_minute,
            ));
        }
        out.push_str(&format!(
            "\nOutgrown first: one Redis (one core) at {:.1}× the base, one Postgres primary of 64 cores at {:.0}×; the ingresses, workers and brokers scale out. One hot coupon: at most {:.0} decisions/s, whatever is added (one partition, one worker, one stream of transactions).\n",
            self.redis_outgrown_at, self.pg_outgrown_at, c.partition_per_s
        ));
        out
    }
}
