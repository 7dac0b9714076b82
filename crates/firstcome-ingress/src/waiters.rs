//! Long-poll support: `GET /v1/issue-requests/{id}?wait_ms=N` waits here for
//! the request's decision.
//!
//! The worker publishes the ids of every batch it has stored on one Redis
//! channel (`{prefix}decided`); each ingress holds one subscription and wakes
//! the clients waiting for those ids. A waiting client costs no Redis traffic
//! at all; a lost message (the subscription reconnecting) only means its
//! client waits out its `wait_ms` and gets the plain answer then.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use firstcome::{CouponId, RequestId};
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
    /// Long polls that also end once their coupon's progress reaches an
    /// offset (a place in line fallen by the step asked for), by coupon,
    /// in the order of that offset.
    by_coupon: HashMap<CouponId, BTreeMap<(i64, u64), oneshot::Sender<()>>>,
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
    /// With [`Waiter::until_progress`]: the coupon and offset waited for.
    progress: Option<(CouponId, i64, oneshot::Receiver<()>)>,
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
            progress: None,
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

    /// Wakes whoever waits for `coupon`'s progress to reach `offset` or
    /// less (their entries for the request stay until the wait ends).
    fn progress(&self, coupon: &CouponId, offset: i64) {
        let mut inner = self.inner.lock().expect("lock");
        let Some(waiting) = inner.by_coupon.get_mut(coupon) else {
            return;
        };
        let later = waiting.split_off(&(offset.saturating_add(1), 0));
        for (_, tx) in std::mem::replace(waiting, later) {
            let _ = tx.send(());
        }
        if waiting.is_empty() {
            inner.by_coupon.remove(coupon);
        }
    }

    /// Wakes everybody (shutdown): they answer what they know now.
    fn wake_all(&self) {
        let mut inner = self.inner.lock().expect("lock");
        for (_, tx) in inner.by_request.drain().flat_map(|(_, list)| list) {
            self.gauge.dec();
            let _ = tx.send(());
        }
        for (_, tx) in inner.by_coupon.drain().flat_map(|(_, list)| list) {
            let _ = tx.send(());
        }
    }
}

impl Waiter {
    /// Also ends the wait once `coupon`'s decisions reach `offset` of its
    /// partition (announced by the worker with each batch).
    pub fn until_progress(mut self, coupon: CouponId, offset: i64) -> Self {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.waiters.inner.lock().expect("lock");
        inner
            .by_coupon
            .entry(coupon.clone())
            .or_default()
            .insert((offset, self.number), tx);
        drop(inner);
        self.progress = Some((coupon, offset, rx));
        self
    }

    /// Until the request is decided, its coupon's progress reaches what
    /// [`Waiter::until_progress`] asked, everybody is woken, or `limit`
    /// passes.
    pub async fn wait(mut self, limit: Duration) {
        let progress = async {
            match self.progress.as_mut() {
                Some((_, _, rx)) => {
                    let _ = rx.await;
                }
                None => std::future::pending().await,
            }
        };
        let _ = tokio::time::timeout(limit, async {
            tokio::select! {
                _ = &mut self.woken => {}
                () = progress => {}
            }
        })
        .await;
    }
}

impl Drop for Waiter {
    /// Takes this wait's own entry off the list, if a wake has not already.
    fn drop(&mut self) {
        let mut inner = self.waiters.inner.lock().expect("lock");
        if let Some((coupon, offset, _)) = &self.progress
            && let Some(waiting) = inner.by_coupon.get_mut(coupon)
        {
            waiting.remove(&(*offset, self.number));
            if waiting.is_empty() {
                inner.by_coupon.remove(coupon);
            }
        }
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
                let (progress, ids): (Vec<&str>, Vec<&str>) = payload
                    .split_ascii_whitespace()
                    .partition(|t| t.starts_with('@'));
                waiters.wake(ids.into_iter().filter_map(|id| RequestId::parse(id).ok()));
                for token in progress {
                    let parsed = token[1..].split_once('=').and_then(|(c, o)| {
                        Some((CouponId::parse(c.to_owned()).ok()?, o.parse::<i64>().ok()?))
                    });
                    if let Some((coupon, offset)) = parsed {
                        waiters.progress(&coupon, offset);
                    }
                }
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
    async fn a_progress_wakes_the_polls_it_reaches_and_every_poll_leaves_nothing_behind() {
        let waiters = waiters();
        let coupon = CouponId::parse("c1".to_owned()).unwrap();
        let near = waiters
            .register(RequestId::new())
            .until_progress(coupon.clone(), 10);
        let far = waiters
            .register(RequestId::new())
            .until_progress(coupon.clone(), 30);
        waiters.progress(&coupon, 20);
        // Woken: answers at once, long before its limit.
        tokio::time::timeout(Duration::from_secs(5), near.wait(Duration::from_secs(3600)))
            .await
            .expect("the progress reached it");
        assert!(
            tokio::time::timeout(
                Duration::from_millis(50),
                far.wait(Duration::from_secs(3600))
            )
            .await
            .is_err(),
            "not reached yet"
        );
        // The timed-out future dropped its waiter: nothing is left.
        let inner = waiters.inner.lock().unwrap();
        assert!(inner.by_coupon.is_empty() && inner.by_request.is_empty());
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
