//! The `pending` status of an acknowledged request, so that a lookup says
//! "pending" rather than 404 until the worker decides it. Best effort: the
//! request is in the log whatever happens here.
//!
//! **Written together.** Requests hand their entry to one writer task and
//! wait for it; the writer writes everything that queued while the last
//! write was out in one round trip ([`StatusCache::put_pending`]), so under
//! load a write costs a request a queue push and a wake-up rather than a
//! Redis command of its own (which cost about 10,000 instructions per
//! request on both sides of redis-rs; docs/benchmarks.md). An idle ingress
//! writes each entry alone, as before.
//!
//! **A breaker.** After a failed write the next ones are skipped for a
//! while, so a Redis outage does not cost every request the write's
//! timeout.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use firstcome::IssueRequest;
use firstcome::status::{RequestStatus, StatusCache};
use tokio::sync::{mpsc, oneshot};

/// How long the writer waits for Redis.
const WRITE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long writes are skipped after one failed.
const SKIP: Duration = Duration::from_secs(1);
/// The most entries written in one round trip.
const MAX_BATCH: usize = 1_024;

/// An entry, and who waits for it.
type Entry = (RequestStatus, oneshot::Sender<()>);

/// The handle requests write through. Dropping it ends the writer once the
/// entries queued are written.
pub struct PendingWrites {
    queue: mpsc::UnboundedSender<Entry>,
    breaker: Arc<Breaker>,
}

impl PendingWrites {
    /// Writes to `cache`, from a task of its own (spawned here).
    pub fn new(cache: StatusCache) -> Self {
        let (queue, entries) = mpsc::unbounded_channel();
        let breaker = Arc::new(Breaker::default());
        tokio::spawn(write(cache, entries, breaker.clone()));
        Self { queue, breaker }
    }

    /// Records `request`, acknowledged at `offset` of its partition, as
    /// pending and returns once it is written (or failed, or is being
    /// skipped).
    pub async fn record(&self, request: &IssueRequest, offset: i64) {
        if self.breaker.open() {
            return;
        }
        let (done, written) = oneshot::channel();
        if self
            .queue
            .send((RequestStatus::pending(request).at_offset(offset), done))
            .is_ok()
        {
            // The writer answers every entry, written or not.
            let _ = written.await;
        }
    }
}

/// The writer: takes whatever queued, writes it in one round trip, answers
/// the requests waiting for it.
async fn write(
    cache: StatusCache,
    mut entries: mpsc::UnboundedReceiver<Entry>,
    breaker: Arc<Breaker>,
) {
    let mut batch: Vec<Entry> = Vec::with_capacity(MAX_BATCH);
    let mut statuses: Vec<RequestStatus> = Vec::with_capacity(MAX_BATCH);
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::with_capacity(MAX_BATCH);
    while entries.recv_many(&mut batch, MAX_BATCH).await > 0 {
        for (status, done) in batch.drain(..) {
            statuses.push(status);
            waiting.push(done);
        }
        if !breaker.open() {
            let failed =
                match tokio::time::timeout(WRITE_TIMEOUT, cache.put_pending(&statuses)).await {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some("timed out".to_owned()),
                };
            if let Some(error) = failed {
                breaker.trip(SKIP);
                tracing::warn!(
                    %error,
                    requests = statuses.len(),
                    "accepted, but the pending status was not cached; skipping it for a second"
                );
            }
        }
        statuses.clear();
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Until when writes are skipped (Redis failing).
#[derive(Default)]
struct Breaker {
    until: Mutex<Option<Instant>>,
}

impl Breaker {
    /// Whether writes are being skipped now.
    fn open(&self) -> bool {
        self.until
            .lock()
            .expect("lock")
            .is_some_and(|until| Instant::now() < until)
    }

    /// Skips writes for `period`.
    fn trip(&self, period: Duration) {
        *self.until.lock().expect("lock") = Some(Instant::now() + period);
    }
}
