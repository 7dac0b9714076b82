//! The `pending` status of an acknowledged request, so that a lookup says
//! "pending" rather than 404 until the worker decides it. Best effort: the
//! request is in the log whatever happens here. After a failed write the
//! next ones are skipped for a while, so a Redis outage does not cost every
//! request the write's timeout.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use firstcome::IssueRequest;
use firstcome::status::StatusCache;

/// How long the ingress waits for Redis when recording a pending status.
const WRITE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long pending-status writes are skipped after one failed.
const SKIP: Duration = Duration::from_secs(1);

/// The writes, and the breaker in front of them.
pub struct PendingWrites {
    cache: StatusCache,
    /// Until when writes are skipped (Redis failing).
    skip_until: Mutex<Option<Instant>>,
}

impl PendingWrites {
    /// Writes to `cache`.
    pub fn new(cache: StatusCache) -> Self {
        Self {
            cache,
            skip_until: Mutex::new(None),
        }
    }

    /// Records `request` as pending, unless writes are being skipped.
    pub async fn record(&self, request: &IssueRequest) {
        if self.skipped() {
            return;
        }
        let write = self.cache.put_pending(request);
        let failed = match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timed out".to_owned()),
        };
        if let Some(error) = failed
            && self.skip_for(SKIP)
        {
            tracing::warn!(%error, "accepted, but the pending status was not cached; skipping it for a second");
        }
    }

    /// Whether writes are being skipped now.
    fn skipped(&self) -> bool {
        self.skip_until
            .lock()
            .expect("lock")
            .is_some_and(|until| Instant::now() < until)
    }

    /// Skips writes for `period`; false when another failure already started
    /// a skip (writes in flight fail together).
    fn skip_for(&self, period: Duration) -> bool {
        let mut until = self.skip_until.lock().expect("lock");
        let now = Instant::now();
        let started = until.is_none_or(|u| u <= now);
        if started {
            *until = Some(now + period);
        }
        started
    }
}
