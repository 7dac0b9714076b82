//! `topology`: the flash sale on the single node beside the production
//! topology, in the same run: three Kafka brokers (KRaft, each also a
//! controller) with replication 3 and `min.insync.replicas` 2, the stack's
//! Redis Cluster, two ingresses and two workers. On one machine the cluster
//! shares the same cores, so its figures are what the replication and the
//! extra processes cost per request, not what more machines would buy.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::env::{BenchEnv, Services};
use crate::scenarios::{FlashSale, Placement, SALE, Size, sale_on};

/// `topology`: the same sale twice.
#[derive(Debug, Clone, Serialize)]
pub struct Topology {
    /// One broker, one Redis, one ingress, one worker.
    pub single: FlashSale,
    /// Three brokers, Redis Cluster, two ingresses, two workers.
    pub production: FlashSale,
    /// How long the three brokers took to start, seconds.
    pub cluster_start_s: f64,
}

/// Runs the scenario.
pub async fn topology(size: Size, smoke: bool) -> anyhow::Result<Topology> {
    let n = size.sale_requests;
    let users = (n / 2).max(1);
    let single = sale_on(
        BenchEnv::new("topo1").await?,
        Placement::single(),
        &SALE,
        n,
        users,
        size.sale_clients,
    )
    .await
    .context("on the single node")?;

    let started = Instant::now();
    let cluster = KafkaCluster::start(3, smoke).await?;
    let cluster_start_s = started.elapsed().as_secs_f64();
    let services = Services {
        kafka_brokers: cluster.brokers(),
        replication: 3,
        redis_url: std::env::var("REDIS_CLUSTER_URL").context(
            "REDIS_CLUSTER_URL is not set: run through `scripts/bench`, which reads the stack's settings",
        )?,
        redis_cluster: true,
    };
    let placement = Placement {
        ingresses: 2,
        workers: 2,
        broker_pids: cluster.pids(),
    };
    let production = sale_on(
        BenchEnv::on("topo3", services).await?,
        placement,
        &SALE,
        n,
        users,
        size.sale_clients,
    )
    .await
    .context("on the production topology")?;
    drop(cluster);
    Ok(Topology {
        single,
        production,
        cluster_start_s,
    })
}

/// Apache Kafka nodes of the bench's own, started by `scripts/kafka-node`
/// from the same jars and `deploy/kafka/server.properties` as every other
/// broker of the project; killed and their storage deleted when dropped.
struct KafkaCluster {
    nodes: Vec<(Child, u16)>,
    dir: PathBuf,
}

impl KafkaCluster {
    /// Starts `n` nodes; `quick` ones as the tests' brokers are (C1 only,
    /// small internal topics: a smoke run checks the tool, not the speed).
    async fn start(n: usize, quick: bool) -> anyhow::Result<Self> {
        let script = std::env::current_dir()?.join("scripts/kafka-node");
        anyhow::ensure!(
            script.exists(),
            "{} is missing: run the bench from the project's root (`scripts/bench`)",
            script.display()
        );
        let dir = PathBuf::from("target/bench/cluster");
        let _ = std::fs::remove_dir_all(&dir);
        // Two ports a node, all different (each is only checked free).
        let mut free = std::collections::BTreeSet::new();
        while free.len() < 2 * n {
            free.insert(crate::procs::free_addr().port());
        }
        let free: Vec<u16> = free.into_iter().collect();
        let ports: Vec<(u16, u16)> = free.chunks(2).map(|p| (p[0], p[1])).collect();
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, (_, c))| format!("{}@127.0.0.1:{c}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let id = Command::new(&script).arg("cluster-id").output()?;
        let cluster_id = String::from_utf8_lossy(&id.stdout).trim().to_owned();
        let mut cluster = Self {
            nodes: Vec::new(),
            dir: dir.clone(),
        };
        for (i, (port, controller)) in ports.iter().enumerate() {
            let node = dir.join(format!("node{}", i + 1));
            std::fs::create_dir_all(&node)?;
            let log = std::fs::File::create(node.join("kafka.log"))?;
            let mut cmd = Command::new(&script);
            if quick {
                cmd.env("KAFKA_QUICK", "1");
            }
            let child = cmd
                .arg("run")
                .arg(&node)
                .env("KAFKA_PORT", port.to_string())
                .env("KAFKA_CONTROLLER_PORT", controller.to_string())
                .env("KAFKA_NODE_ID", (i + 1).to_string())
                .env("KAFKA_VOTERS", &voters)
                .env("KAFKA_CLUSTER_ID", &cluster_id)
                .env("KAFKA_REPLICATION", n.min(3).to_string())
                .stdout(log.try_clone()?)
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .context("starting scripts/kafka-node")?;
            cluster.nodes.push((child, *port));
        }
        let deadline = Instant::now() + Duration::from_secs(180);
        for i in 0..n {
            let log = dir.join(format!("node{}", i + 1)).join("kafka.log");
            while !std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("Kafka Server started")
            {
                if let Some(status) = cluster.nodes[i].0.try_wait()? {
                    anyhow::bail!(
                        "kafka node {} exited ({status}); see {}",
                        i + 1,
                        log.display()
                    );
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "kafka node {} did not start in 3 minutes; see {}",
                    i + 1,
                    log.display()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(cluster)
    }

    fn brokers(&self) -> String {
        self.nodes
            .iter()
            .map(|(_, p)| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn pids(&self) -> Vec<u32> {
        // `scripts/kafka-node run` execs the JVM: the child is the broker.
        self.nodes.iter().map(|(c, _)| c.id()).collect()
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        for (child, _) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
