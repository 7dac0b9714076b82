//! Retrying a step, by what its failure means: a [`Failure::Transient`] one
//! (infrastructure that will come back) is retried for as long as it takes,
//! or up to a bound where the caller sets one (the replay tool); a
//! [`Failure::Permanent`] one (the data is refused) a few times, then given
//! up. Waits grow with [`Backoff`]. The pipeline and the dead-letter replay
//! both retry through here.

use std::future::Future;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::config::Backoff;
use crate::metrics::{RetryStep, WorkerMetrics};

/// Why a step failed, by what the loop must do about it.
pub enum Failure {
    /// Infrastructure that will come back: retry.
    Transient(anyhow::Error),
    /// The data itself is refused: retry a few times, then give up.
    Permanent(anyhow::Error),
}

/// Why a retried step stopped without succeeding.
pub enum Stop {
    /// `cancel` fired: the partition was revoked or the worker is stopping.
    Aborted,
    /// The failures outlasted the policy's attempts.
    GaveUp {
        /// The last failure.
        error: anyhow::Error,
        /// Failed attempts of the class that gave up.
        attempts: u32,
        /// When the first of them failed, kept on a dead letter.
        first_failed_at: DateTime<Utc>,
    },
}

/// How a step is retried.
#[derive(Clone, Copy)]
pub struct Policy<'a> {
    /// The waits between attempts.
    pub backoff: Backoff,
    /// Permanent failures before giving up.
    pub permanent_attempts: u32,
    /// Transient failures before giving up; `None`: never give up.
    pub transient_attempts: Option<u32>,
    /// Where retries are counted, when the process exports metrics.
    pub metrics: Option<&'a WorkerMetrics>,
}

impl Policy<'_> {
    /// Runs `step` until it succeeds, the policy gives up, or `cancel` fires.
    pub async fn run<T, F, Fut>(
        &self,
        what: RetryStep,
        cancel: &CancellationToken,
        mut step: F,
    ) -> Result<T, Stop>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let (mut attempt, mut transient, mut permanent) = (0u32, 0u32, 0u32);
        let (mut first_transient, mut first_permanent) = (None, None);
        loop {
            let error = match step().await {
                Ok(v) => {
                    if attempt > 0 {
                        tracing::info!(step = what.as_str(), attempts = attempt + 1, "recovered");
                    }
                    return Ok(v);
                }
                Err(Failure::Transient(e)) => {
                    if let Some(m) = self.metrics {
                        m.retried(what, false);
                    }
                    transient += 1;
                    let first = *first_transient.get_or_insert_with(Utc::now);
                    if self.transient_attempts.is_some_and(|max| transient >= max) {
                        return Err(Stop::GaveUp {
                            error: e,
                            attempts: transient,
                            first_failed_at: first,
                        });
                    }
                    e
                }
                Err(Failure::Permanent(e)) => {
                    if let Some(m) = self.metrics {
                        m.retried(what, true);
                    }
                    permanent += 1;
                    let first = *first_permanent.get_or_insert_with(Utc::now);
                    if permanent >= self.permanent_attempts {
                        return Err(Stop::GaveUp {
                            error: e,
                            attempts: permanent,
                            first_failed_at: first,
                        });
                    }
                    e
                }
            };
            attempt += 1;
            let delay = self.backoff.delay(attempt);
            tracing::warn!(
                step = what.as_str(),
                attempt,
                ?delay,
                error = format!("{error:#}"),
                "failed, retrying"
            );
            tokio::select! {
                () = cancel.cancelled() => return Err(Stop::Aborted),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// The batch was given up because its partition was revoked or the worker is
/// stopping; nothing past its start was stored, so it will be read again.
#[derive(Debug)]
pub struct Aborted;
