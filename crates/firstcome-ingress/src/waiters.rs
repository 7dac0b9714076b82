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
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// The clients waiting, by request.
#[derive(Default)]
pub struct Waiters {
    by_request: Mutex<HashMap<RequestId, Vec<oneshot::Sender<()>>>>,
}

/// One client's wait; dropping it (a timeout) takes it off the list.
pub struct Waiter {
    waiters: Arc<Waiters>,
    request: RequestId,
    woken: oneshot::Receiver<()>,
}

impl Waiters {
    /// Starts waiting for `request`. Register before reading the status, so
    /// a decision published in between is not missed.
    pub fn register(self: &Arc<Self>, request: RequestId) -> Waiter {
        let (tx, rx) = oneshot::channel();
        self.by_request
            .lock()
            .expect("lock")
            .entry(request)
            .or_default()
            .push(tx);
        Waiter {
            waiters: self.clone(),
            request,
            woken: rx,
        }
    }

    /// Wakes whoever waits for these requests.
    fn wake(&self, requests: impl IntoIterator<Item = RequestId>) {
        let mut map = self.by_request.lock().expect("lock");
        for r in requests {
            for tx in map.remove(&r).unwrap_or_default() {
                let _ = tx.send(());
            }
        }
    }

    /// Wakes everybody (shutdown): they answer what they know now.
    fn wake_all(&self) {
        self.by_request.lock().expect("lock").clear();
    }
}

impl Waiter {
    /// Until the request is decided, everybody is woken, or `limit` passes.
    pub async fn wait(mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, &mut self.woken).await;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut map = self.waiters.by_request.lock().expect("lock");
        if let Some(list) = map.get_mut(&self.request) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                map.remove(&self.request);
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
