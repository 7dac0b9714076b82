//! Long-poll support: `GET /v1/issue-requests/{id}?wait_ms=N` waits here for
//! the request's decision.
//!
//! The worker publishes the ids of every batch it has stored on one Redis
//! channel (`{prefix}decided`); each ingress holds one subscription and wakes
//! the clients waiting for those ids. A waiting client costs no Redis traffic
//! at all; a lost message (the subscription reconnecting) only means its
//! client waits out its `wait_ms` and gets the plain answer then.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use firstcome::RequestId;
use futures::StreamExt;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// The clients waiting, by request. Every entry belongs to a live
/// [`Waiter`]: a wake takes the entries it wakes, and a wait that ends
/// otherwise (timed out, or its client gone) takes its own, so the map holds
/// exactly the long polls in progress, whatever clients do.
#[derive(Default)]
pub struct Waiters {
    inner: Mutex<Registered>,
    /// The entries of the map, for `/metrics`.
    gauge: Gauge,
}

#[derive(Default)]
struct Registered {
    by_request: HashMap<RequestId, Vec<(u64, oneshot::Sender<()>)>>,
    /// The number the next waiter gets, so its drop finds its own entry.
    next: u64,
}

/// One client's wait; dropping it (woken, timed out, or the client gone)
/// takes it off the list.
pub struct Waiter {
    waiters: Arc<Waiters>,
    request: RequestId,
    number: u64,
    woken: oneshot::Receiver<()>,
}

impl Waiters {
    /// Waiters that count themselves on `gauge`.
    pub fn new(gauge: Gauge) -> Self {
        Self {
            inner: Mutex::default(),
            gauge,
        }
    }

    /// Starts waiting for `request`. Register before reading the status, so
    /// a decision published in between is not missed.
    pub fn register(self: &Arc<Self>, request: RequestId) -> Waiter {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().expect("lock");
        let number = inner.next;
        inner.next += 1;
        inner
            .by_request
            .entry(request)
            .or_default()
            .push((number, tx));
        self.gauge.inc();
        Waiter {
            waiters: self.clone(),
            request,
            number,
            woken: rx,
        }
    }

    /// Long polls registered now.
    pub fn len(&self) -> usize {
        let inner = self.inner.lock().expect("lock");
        inner.by_request.values().map(Vec::len).sum()
    }

    /// Whether no long poll is registered.
    pub fn is_empty(&self) -> bool {
        self.inner.lock().expect("lock").by_request.is_empty()
    }

    /// Wakes whoever waits for these requests, taking them off the list.
    fn wake(&self, requests: impl IntoIterator<Item = RequestId>) {
        let mut inner = self.inner.lock().expect("lock");
        for r in requests {
            for (_, tx) in inner.by_request.remove(&r).unwrap_or_default() {
                self.gauge.dec();
                let _ = tx.send(());
            }
        }
    }

    /// Wakes everybody (shutdown): they answer what they know now.
    fn wake_all(&self) {
        let mut inner = self.inner.lock().expect("lock");
        for (_, tx) in inner.by_request.drain().flat_map(|(_, list)| list) {
            self.gauge.dec();
            let _ = tx.send(());
        }
    }
}

impl Waiter {
    /// Until the request is decided, everybody is woken, or `limit` passes.
    pub async fn wait(mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, &mut self.woken).await;
    }
}

impl Drop for Waiter {
    /// Takes this wait's own entry off the list, if a wake has not already.
    fn drop(&mut self) {
        let mut inner = self.waiters.inner.lock().expect("lock");
        if let Some(list) = inner.by_request.get_mut(&self.request) {
            let before = list.len();
            list.retain(|(number, _)| *number != self.number);
            if list.len() < before {
                self.waiters.gauge.dec();
            }
            if list.is_empty() {
                inner.by_request.remove(&self.request);
            }
        }
    }
}

/// Follows the decisions channel until `stop`, waking waiters; reconnects
/// after a failure, to the next of `clients` (the nodes of a cluster, where
/// a publication reaches the subscribers of every node).
pub async fn listen(
    clients: Vec<redis::Client>,
    channel: String,
    waiters: Arc<Waiters>,
    stop: CancellationToken,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(100);
    let mut backoff = FIRST_BACKOFF;
    for client in clients.iter().cycle() {
        let started = std::time::Instant::now();
        let followed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            tracing::debug!(%channel, "following decisions");
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let payload: String = msg.get_payload()?;
                waiters.wake(
                    payload
                        .split_ascii_whitespace()
                        .filter_map(|id| RequestId::parse(id).ok()),
                );
            }
            Ok::<(), redis::RedisError>(())
        };
        tokio::select! {
            () = stop.cancelled() => {
                waiters.wake_all();
                return;
            }
            r = followed => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "decisions channel lost; reconnecting");
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => {
                waiters.wake_all();
                return;
            }
            () = tokio::time::sleep(backoff) => {}
        }
        // A subscription that lasted starts the backoff over.
        backoff = if started.elapsed() > Duration::from_secs(10) {
            FIRST_BACKOFF
        } else {
            (backoff * 2).min(Duration::from_secs(5))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiters() -> Arc<Waiters> {
        Arc::new(Waiters::new(Gauge::default()))
    }

    #[tokio::test]
    async fn a_wait_that_times_out_leaves_nothing_behind() {
        let waiters = waiters();
        for _ in 0..1000 {
            let waiter = waiters.register(RequestId::new());
            waiter.wait(Duration::from_millis(0)).await;
        }
        // Two polls of one request, one of them ending early.
        let request = RequestId::new();
        let (first, second) = (waiters.register(request), waiters.register(request));
        drop(first);
        assert_eq!(waiters.len(), 1, "the second poll is still waiting");
        drop(second);
        assert_eq!(waiters.len(), 0);
        assert!(waiters.is_empty());
        assert_eq!(waiters.gauge.get(), 0);
    }

    #[tokio::test]
    async fn a_wake_reaches_every_poll_of_the_request_and_no_other() {
        let waiters = waiters();
        let (request, other) = (RequestId::new(), RequestId::new());
        let polls = [waiters.register(request), waiters.register(request)];
        let unrelated = waiters.register(other);
        waiters.wake([request]);
        assert_eq!(waiters.len(), 1, "only the unrelated poll is left");
        for poll in polls {
            // Woken: returns at once although the limit is an hour.
            tokio::time::timeout(Duration::from_secs(5), poll.wait(Duration::from_secs(3600)))
                .await
                .expect("a woken poll returns");
        }
        drop(unrelated);
        assert_eq!((waiters.len(), waiters.gauge.get()), (0, 0));
    }
}
