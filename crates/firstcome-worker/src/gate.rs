//! The order of a partition's batches in flight: see [`Gate`].

use std::collections::HashSet;

use firstcome::CouponId;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::retry::Aborted;

/// Orders two overlapping batches of one partition: a batch decides only
/// once the batch before it has decided, and stores (persists, publishes,
/// moves the offset) only once the batch before it is done. So decisions
/// still follow the log, and the next batch's Lua call overlaps the previous
/// batch's Postgres write.
///
/// A batch hands the next one the coupons it rebuilt: the next one decided
/// them on the state the rebuild replaced, so it decides them again before
/// it says it has decided (see `pipeline::decide_and_store`). With at most two
/// batches in flight that costs no overlap: the batch after next starts
/// only once this one is done.
pub struct Gate {
    pub(crate) ahead: Ahead,
    pub(crate) done: oneshot::Sender<Rebuilt>,
    /// The decision stream's generation the partition task belongs to.
    pub(crate) generation: u64,
}

/// The coupons a batch rebuilt from Postgres.
pub type Rebuilt = HashSet<CouponId>;

/// The signals a batch waits for from the one ahead of it, and the one it
/// gives once it has decided.
pub(crate) struct Ahead {
    pub(crate) decided: Option<oneshot::Receiver<()>>,
    pub(crate) done: Option<oneshot::Receiver<Rebuilt>>,
    pub(crate) signal_decided: oneshot::Sender<()>,
}

/// What a batch hands the next one: signals of its progress.
pub struct Handoff {
    decided: oneshot::Receiver<()>,
    done: oneshot::Receiver<Rebuilt>,
}

impl Gate {
    /// The gate of a batch that follows `prev` (`None`: nothing in flight).
    pub fn after(prev: Option<Handoff>, generation: u64) -> (Self, Handoff) {
        let (decided, decided_rx) = oneshot::channel();
        let (done, done_rx) = oneshot::channel();
        let (prev_decided, prev_done) = match prev {
            Some(h) => (Some(h.decided), Some(h.done)),
            None => (None, None),
        };
        (
            Self {
                ahead: Ahead {
                    decided: prev_decided,
                    done: prev_done,
                    signal_decided: decided,
                },
                done,
                generation,
            },
            Handoff {
                decided: decided_rx,
                done: done_rx,
            },
        )
    }
}

/// Waits for the previous batch's signal (`None` when there is no previous
/// batch); if it was given up (revoked, stopping), so is this one: nothing
/// may be stored past it.
pub(crate) async fn wait<T>(
    signal: Option<oneshot::Receiver<T>>,
    cancel: &CancellationToken,
) -> Result<Option<T>, Aborted> {
    let Some(signal) = signal else {
        return Ok(None);
    };
    tokio::select! {
        () = cancel.cancelled() => Err(Aborted),
        r = signal => r.map(Some).map_err(|_| Aborted),
    }
}
