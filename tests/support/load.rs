//! Load: closed and open-model clients, and a sale of several coupons.

use super::*;

/// Sends `total` issue requests from 8 concurrent clients in the background,
/// request `i` to coupon `i % coupons.len()` for user `user(i)`, pausing
/// `pace` between a client's requests. Every request must be accepted; the
/// handle resolves to the ids of all of them.
pub fn spawn_load(
    client: &Client,
    coupons: &[(String, i64)],
    total: usize,
    pace: Duration,
    user: fn(usize) -> String,
) -> JoinHandle<std::collections::HashSet<String>> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let senders: Vec<JoinHandle<Vec<String>>> = (0..8)
        .map(|_| {
            let (client, next, coupons) = (client.clone(), next.clone(), coupons.to_vec());
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        return accepted;
                    }
                    let coupon = &coupons[i % coupons.len()].0;
                    let (code, body) = client.issue(coupon, &user(i)).await;
                    assert_eq!(code, 202, "request {i}: {body}");
                    accepted.push(body["request_id"].as_str().unwrap().to_owned());
                    tokio::time::sleep(pace).await;
                }
            })
        })
        .collect();
    tokio::spawn(async move {
        let mut all = std::collections::HashSet::new();
        for s in senders {
            all.extend(s.await.expect("a load client panicked"));
        }
        assert_eq!(
            all.len(),
            total,
            "every request accepted once, with its own id"
        );
        all
    })
}

/// What [`spawn_open_load`] saw.
#[derive(Debug, Default)]
pub struct LoadOutcome {
    /// Request ids answered 202.
    pub accepted: std::collections::HashSet<String>,
    /// Request ids answered 503 (not confirmed; maybe written).
    pub unconfirmed: std::collections::HashSet<String>,
    /// The longest a 503 took to arrive.
    pub slowest_refusal: Duration,
    /// When the last 503 was answered.
    pub last_refusal: Option<tokio::time::Instant>,
    /// When each 202 was answered.
    pub accepted_at: Vec<tokio::time::Instant>,
}

/// Eight clients issuing requests over `coupons` round robin until `stop`
/// fires; a 503 must name its request (it may have been written), anything
/// but 202 or 503 fails the test.
pub fn spawn_open_load(
    client: &Client,
    coupons: &[(String, i64)],
    pace: Duration,
    user: fn(usize) -> String,
    stop: CancellationToken,
) -> JoinHandle<LoadOutcome> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let senders: Vec<JoinHandle<LoadOutcome>> = (0..8)
        .map(|_| {
            let (client, next, coupons) = (client.clone(), next.clone(), coupons.to_vec());
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut seen = LoadOutcome::default();
                while !stop.is_cancelled() {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let coupon = &coupons[i % coupons.len()].0;
                    let started = tokio::time::Instant::now();
                    let (code, body) = client.issue(coupon, &user(i)).await;
                    let id = body["request_id"].as_str().map(str::to_owned);
                    match code {
                        202 => {
                            seen.accepted.insert(id.expect("a 202 names its request"));
                            seen.accepted_at.push(tokio::time::Instant::now());
                        }
                        503 => {
                            seen.unconfirmed.insert(
                                id.unwrap_or_else(|| panic!("a 503 names its request: {body}")),
                            );
                            seen.slowest_refusal = seen.slowest_refusal.max(started.elapsed());
                            seen.last_refusal = Some(tokio::time::Instant::now());
                        }
                        _ => panic!("request {i}: {code} {body}"),
                    }
                    tokio::time::sleep(pace).await;
                }
                seen
            })
        })
        .collect();
    tokio::spawn(async move {
        let mut all = LoadOutcome::default();
        for s in senders {
            let seen = s.await.expect("a load client panicked");
            all.accepted.extend(seen.accepted);
            all.unconfirmed.extend(seen.unconfirmed);
            all.slowest_refusal = all.slowest_refusal.max(seen.slowest_refusal);
            all.last_refusal = all.last_refusal.max(seen.last_refusal);
            all.accepted_at.extend(seen.accepted_at);
        }
        all
    })
}

/// An ingress and a worker (batches of `max_batch`, every partition
/// assigned) over freshly created coupons: how every fault scenario starts.
pub struct Sale {
    /// The ingress.
    pub ingress: Running,
    /// The worker.
    pub worker: Running,
    /// A client of the ingress.
    pub client: Client,
    /// Coupon ids and stocks.
    pub coupons: Vec<(String, i64)>,
}

impl Sale {
    /// The coupon ids.
    pub fn ids(&self) -> Vec<&str> {
        self.coupons.iter().map(|(c, _)| c.as_str()).collect()
    }

    /// Stops the worker, then the ingress.
    pub async fn close(self) {
        self.worker.stop().await;
        self.ingress.stop().await;
    }
}

impl TestEnv {
    /// Opens a sale of the coupons `stocks` (name, stock); see [`Sale`].
    pub async fn open_sale(&self, stocks: &[(&str, i64)], max_batch: usize) -> Sale {
        let ingress = self.spawn_ingress().await;
        let client = self.client(&ingress);
        let coupons: Vec<(String, i64)> = stocks
            .iter()
            .map(|(name, stock)| (self.coupon_id(name), *stock))
            .collect();
        for (id, stock) in &coupons {
            assert_eq!(client.create_coupon(id, *stock).await.0, 201);
        }
        let mut cfg = self.worker_config();
        cfg.max_batch = max_batch;
        let worker = self.spawn_worker_with(cfg).await;
        worker
            .wait_assignment("every partition", |a| a.len() == PARTITIONS as usize)
            .await;
        Sale {
            ingress,
            worker,
            client,
            coupons,
        }
    }
}
