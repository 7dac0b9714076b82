//! One partition's batch, from records to a stored offset, in named steps:
//!
//! 1. [`parse`]: every record becomes an issue request, or a dead letter
//!    when it cannot be one; the requests are grouped into one
//!    [`CouponBatch`] per coupon, in log order;
//! 2. [`decide`]: one atomic Lua call per coupon with that coupon's requests
//!    in log order (calls for different coupons run concurrently: their
//!    order does not matter to each other);
//! 3. [`store`]: every decision in Postgres in one statement; the coupons
//!    whose decisions Postgres refuses because they were taken on a stale
//!    Redis state (the fence, see [`firstcome::state`]) are rebuilt from
//!    Postgres ([`rebuild`]) and go back to step 2;
//! 4. [`dead_letter_all`]: the dead letters, acknowledged by the broker;
//! 5. [`publish`]: the final statuses, to the Redis status cache;
//! 6. only then the offset past the batch is stored ([`Offsets`]).
//!
//! Each step is idempotent (a decided request keeps its decision, rows are
//! inserted `ON CONFLICT DO NOTHING`), so a transient failure simply retries
//! the step ([`crate::retry`]), and a crash anywhere replays the batch with
//! the same outcome.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, SubsecRound, Utc};
use firstcome::db::{self, Decided, TakenOn};
use firstcome::state::{Decision, Decisions, Verdict};
use firstcome::status::RequestStatus;
use firstcome::{CouponId, IssueRequest};
use tokio_util::sync::CancellationToken;

use crate::deadletter::DeadLetter;
use crate::gate::{Ahead, Gate, Rebuilt, wait};
use crate::metrics::RetryStep;
use crate::record::Rec;
use crate::retry::{Aborted, Failure, Stop};
use crate::services::Shared;

/// How long one dead-letter write may wait for the broker before it is retried.
const DLQ_DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Coupons of a batch decided at once. A batch spans up to
/// `FIRSTCOME_MAX_BATCH` coupons, each a Lua call and, on its first sight, a
/// rebuild from Postgres; all of them at once held a future of kilobytes
/// each (megabytes a batch, fresh pages every time) and queued thousands
/// for a pool of a few connections. Redis runs one call at a time anyway.
const DECIDE_CONCURRENCY: usize = 32;

/// A record that holds an issue request.
struct Request<'r> {
    rec: &'r Rec,
    request: IssueRequest,
}

/// The requests of one coupon in a batch, in log order (indices into the
/// batch's requests).
struct CouponBatch {
    coupon: CouponId,
    members: Vec<usize>,
}

impl CouponBatch {
    /// Groups `requests` by coupon, the coupons in the log order of their
    /// first request.
    fn group(requests: &[Request<'_>]) -> Vec<CouponBatch> {
        let mut batches: Vec<CouponBatch> = Vec::new();
        let mut index: HashMap<&CouponId, usize> = HashMap::new();
        for (j, r) in requests.iter().enumerate() {
            let b = *index.entry(&r.request.coupon_id).or_insert_with(|| {
                batches.push(CouponBatch {
                    coupon: r.request.coupon_id.clone(),
                    members: Vec::new(),
                });
                batches.len() - 1
            });
            batches[b].members.push(j);
        }
        batches
    }
}

/// A record that goes to the dead-letter topic, and why.
type Dead<'r> = (&'r Rec, DeadLetter);

/// Processes one batch of one partition; see the module docs.
#[tracing::instrument(skip_all, fields(partition = recs[0].partition, first_offset = recs[0].offset, len = recs.len()))]
pub async fn process(
    shared: &Shared,
    recs: Vec<Rec>,
    cancel: &CancellationToken,
    gate: Gate,
) -> Result<(), Aborted> {
    shared.metrics.batch(recs.len());
    let (requests, mut dead) = parse(&recs);
    let (decided, rebuilt) =
        decide_and_store(shared, &requests, &mut dead, cancel, gate.ahead).await?;
    dead_letter_all(shared, &dead, cancel).await?;
    publish(shared, &decided, cancel).await?;
    let last = recs.last().expect("a batch is never empty");
    match &shared.stream {
        Some(stream) => {
            let stored = read_back(shared, &recs, &requests, cancel).await?;
            let known = match stream.knows_start(last.partition) {
                true => None,
                false => stream_start(shared, last.partition).await,
            };
            stream
                .enqueue(
                    gate.generation,
                    last.partition,
                    recs[0].offset,
                    last.offset + 1,
                    &stored,
                    known,
                )
                .await
                .expect("a decision serializes");
        }
        None => {
            if let Err(e) = shared.offsets.store(last.partition, last.offset + 1) {
                // The partition was revoked meanwhile; its next owner reads
                // the batch again and gets the same decisions back.
                tracing::info!(error = %e, "offset not stored, partition no longer assigned");
            }
        }
    }
    for d in &decided {
        shared.metrics.decided(d.decision.status);
        tracing::debug!(
            request_id = %d.request.request_id,
            coupon_id = %d.request.coupon_id,
            partition = d.partition,
            offset = d.offset,
            outcome = %d.decision.status,
            "decided"
        );
    }
    let _ = gate.done.send(rebuilt);
    Ok(())
}

/// Where `partition` stands for the stream: the group's stable committed
/// offset (where its stream goes on) and the start of its log; `None` when
/// the broker does not say (the stream then reads every partition again).
async fn stream_start(shared: &Shared, partition: i32) -> Option<crate::stream::Start> {
    let offsets = shared.offsets.clone();
    let asked = tokio::task::spawn_blocking(move || {
        Ok::<_, anyhow::Error>(crate::stream::Start {
            committed: offsets.committed(partition)?,
            log_start: offsets.log_start(partition)?,
        })
    });
    match asked.await {
        Ok(Ok(start)) => Some(start),
        Ok(Err(e)) => {
            tracing::warn!(
                partition,
                error = format!("{e:#}"),
                "committed offset unknown"
            );
            None
        }
        Err(e) => {
            tracing::warn!(partition, error = %e, "committed offset task failed");
            None
        }
    }
}

/// Step 6 with the decision stream on: the batch's decisions as the ledger
/// holds them, for the stream (see [`crate::stream`]).
async fn read_back(
    shared: &Shared,
    recs: &[Rec],
    requests: &[Request<'_>],
    cancel: &CancellationToken,
) -> Result<Vec<db::StoredDecision>, Aborted> {
    let partition = recs[0].partition;
    let keys: Vec<(firstcome::RequestId, i64)> = requests
        .iter()
        .map(|r| (r.request.request_id, r.rec.offset))
        .collect();
    shared
        .retry(RetryStep::ReadBack, cancel, || async {
            db::stored_decisions(&shared.pool, partition, &keys)
                .await
                .context("reading the batch's decisions back")
        })
        .await
}

/// Step 1: the records that hold issue requests, and the dead letters of
/// those that do not.
fn parse(recs: &[Rec]) -> (Vec<Request<'_>>, Vec<Dead<'_>>) {
    let mut requests = Vec::with_capacity(recs.len());
    let mut dead = Vec::new();
    for rec in recs {
        match rec.parse() {
            Ok(request) => requests.push(Request { rec, request }),
            Err(why) => dead.push((rec, DeadLetter::from(why))),
        }
    }
    (requests, dead)
}

/// Steps 2 and 3, in rounds: decide the coupons, store the round, and decide
/// again the coupons Postgres refused (on a state rebuilt from it) until
/// none is left. Requests of a coupon Postgres does not know become dead
/// letters. Returns the decisions and the coupons it rebuilt.
async fn decide_and_store<'r>(
    shared: &Shared,
    requests: &'r [Request<'r>],
    dead: &mut Vec<Dead<'r>>,
    cancel: &CancellationToken,
    ahead: Ahead,
) -> Result<(Vec<Decided<'r>>, Rebuilt), Aborted> {
    let mut coupons = CouponBatch::group(requests);
    let now = Utc::now().trunc_subsecs(6);
    let mut decided: Vec<Decided<'r>> = Vec::with_capacity(requests.len());
    let mut todo: Vec<usize> = (0..coupons.len()).collect();
    let mut given_up = HashSet::new();
    let mut rebuilt = Rebuilt::new();
    // The previous batch of the partition decides first…
    wait(ahead.decided, cancel).await?;
    let mut prev_done = Some(ahead.done);
    let mut decided_signal = Some(ahead.signal_decided);
    loop {
        let mut round = decide(shared, requests, &coupons, &todo, now, dead, cancel).await?;
        // …and is stored first. The coupons it rebuilt after this batch
        // decided (the fence refused it) were decided here on a state that
        // is gone: they are decided again on the state it left, before the
        // next batch decides. Stored as they were, Postgres would refuse
        // them and this batch would rebuild in turn, leaving the next one
        // stale: under a backlog every batch would pay a rebuild (two
        // 30-minute soaks crawled at that).
        if let Some(prev) = prev_done.take() {
            let theirs = wait(prev, cancel).await?.unwrap_or_default();
            let stale: Vec<usize> = todo
                .iter()
                .copied()
                .filter(|&i| theirs.contains(&coupons[i].coupon))
                .collect();
            if !stale.is_empty() {
                round.retain(|d| !theirs.contains(&d.request.coupon_id));
                round.extend(decide(shared, requests, &coupons, &stale, now, dead, cancel).await?);
            }
        }
        if let Some(signal) = decided_signal.take() {
            let _ = signal.send(());
        }
        // Coupons decided on a stale state, and coupons with a request given
        // up (the requests behind it in the batch were decided as if it held
        // its unit), are rebuilt and go round again without the given-up
        // requests, which keep their `failed`.
        let redo = store(shared, &mut round, requests, cancel).await?;
        let refused_rounds: Vec<(&CouponId, Option<Span>)> =
            redo.iter().map(|c| (c, taken_span(&round, c))).collect();
        for d in round.iter().filter(|d| d.taken_on.is_none()) {
            given_up.insert(d.request.request_id);
            decided.push(d.clone());
        }
        round.retain(|d| !redo.contains(&d.request.coupon_id));
        decided.append(&mut round);
        if redo.is_empty() {
            break;
        }
        // A batch given up (its partition revoked, the worker stopping)
        // stops here rather than rebuilding. A rebuild moves the coupon's
        // epoch, which refuses what the partition's new owner decided
        // meanwhile; a revoked batch that went on would refuse the owner's
        // rounds as the owner's rebuilds refuse its own, for ever (two
        // 30-minute soaks ended in that).
        if cancel.is_cancelled() {
            return Err(Aborted);
        }
        for (coupon, taken) in refused_rounds {
            explain_refusal(shared, coupon, taken).await;
        }
        // In log order of the coupons' first records, so the batch's
        // earliest requests get their state back first.
        let mut gone = HashSet::new();
        for b in coupons.iter().filter(|b| redo.contains(&b.coupon)) {
            shared.metrics.state_rebuilds.inc();
            rebuilt.insert(b.coupon.clone());
            let exists = shared
                .retry(RetryStep::Rebuild, cancel, || rebuild(shared, &b.coupon))
                .await?;
            // In Redis but not in Postgres (a restore to before it existed,
            // a row deleted by hand): unknown, as in the first round, rather
            // than a rebuild retried for ever (red team #13).
            if !exists {
                tracing::error!(coupon = %b.coupon, "coupon state in redis but the coupon is not in postgres; dead-lettering its requests");
                gone.insert(b.coupon.clone());
                dead.extend(
                    b.members
                        .iter()
                        .filter(|&&j| !given_up.contains(&requests[j].request.request_id))
                        .map(|&j| {
                            (
                                requests[j].rec,
                                DeadLetter::unknown_coupon(b.coupon.as_str()),
                            )
                        }),
                );
            }
        }
        for b in coupons.iter_mut().filter(|b| redo.contains(&b.coupon)) {
            if gone.contains(&b.coupon) {
                b.members.clear();
            }
            b.members
                .retain(|&j| !given_up.contains(&requests[j].request.request_id));
        }
        todo.retain(|&i| redo.contains(&coupons[i].coupon) && !coupons[i].members.is_empty());
        if todo.is_empty() {
            break;
        }
    }
    Ok((decided, rebuilt))
}

/// The epoch and the lowest and highest decision numbers a round took for
/// one coupon.
#[derive(Debug, Clone, Copy)]
struct Span {
    epoch: i64,
    first_seq: i64,
    last_seq: i64,
}

/// What a round took for `coupon`; `None` when it took no new number (only
/// given-up requests, or decisions loaded from Postgres).
fn taken_span(round: &[Decided<'_>], coupon: &CouponId) -> Option<Span> {
    round
        .iter()
        .filter(|d| &d.request.coupon_id == coupon)
        .filter_map(|d| d.taken_on)
        .filter(|t| t.seq > 0)
        .fold(None, |span, t| {
            Some(match span {
                None => Span {
                    epoch: t.epoch,
                    first_seq: t.seq,
                    last_seq: t.seq,
                },
                Some(s) => Span {
                    first_seq: s.first_seq.min(t.seq),
                    last_seq: s.last_seq.max(t.seq),
                    ..s
                },
            })
        })
}

/// Says why the fence refused a coupon's round, for whoever reads the log:
/// the state the round was taken on beside the one Postgres holds now (one
/// read, on the refusal path only; an error here only shortens the line).
async fn explain_refusal(shared: &Shared, coupon: &CouponId, taken: Option<Span>) {
    let (pg_epoch, pg_decided_seq) = match db::fence(&shared.pool, coupon).await {
        Ok(Some((e, s))) => (Some(e), Some(s)),
        _ => (None, None),
    };
    tracing::warn!(
        %coupon,
        epoch = taken.map(|t| t.epoch),
        first_seq = taken.map(|t| t.first_seq),
        last_seq = taken.map(|t| t.last_seq),
        pg_epoch,
        pg_decided_seq,
        "the fence refused the coupon's decisions; rebuilding it from postgres and deciding its requests again"
    );
}

/// Step 2: decides the coupons `todo`, one Lua call each, concurrently.
async fn decide<'r>(
    shared: &Shared,
    requests: &'r [Request<'r>],
    coupons: &[CouponBatch],
    todo: &[usize],
    now: DateTime<Utc>,
    dead: &mut Vec<Dead<'r>>,
    cancel: &CancellationToken,
) -> Result<Vec<Decided<'r>>, Aborted> {
    let outcomes = shared
        .retry(RetryStep::Decide, cancel, || async {
            let mut outcomes = Vec::with_capacity(todo.len());
            for chunk in todo.chunks(DECIDE_CONCURRENCY) {
                outcomes.extend(
                    futures::future::try_join_all(chunk.iter().map(|&i| {
                        let b = &coupons[i];
                        let batch: Vec<&IssueRequest> =
                            b.members.iter().map(|&j| &requests[j].request).collect();
                        let last = b.members.last().map(|&j| requests[j].rec.offset);
                        async move { decide_coupon(shared, &b.coupon, &batch, now, last).await }
                    }))
                    .await?,
                );
            }
            anyhow::Ok(outcomes)
        })
        .await?;
    let mut round = Vec::with_capacity(requests.len());
    for (&i, outcome) in todo.iter().zip(outcomes) {
        let b = &coupons[i];
        match outcome {
            Some(Decisions { epoch, decisions }) => {
                for (&j, (decision, seq)) in b.members.iter().zip(decisions) {
                    let r = &requests[j];
                    round.push(Decided {
                        request: &r.request,
                        decision,
                        partition: r.rec.partition,
                        offset: r.rec.offset,
                        taken_on: Some(TakenOn { epoch, seq }),
                    });
                }
            }
            // Unknown to Postgres, so never refused by the fence: this
            // happens in the first round only.
            None => dead.extend(b.members.iter().map(|&j| {
                (
                    requests[j].rec,
                    DeadLetter::unknown_coupon(b.coupon.as_str()),
                )
            })),
        }
    }
    Ok(round)
}

/// One coupon's Lua call; `None` for a coupon Postgres does not know.
async fn decide_coupon(
    shared: &Shared,
    coupon: &CouponId,
    batch: &[&IssueRequest],
    now: DateTime<Utc>,
    last_offset: Option<i64>,
) -> anyhow::Result<Option<Decisions>> {
    let started = std::time::Instant::now();
    let verdict = shared.states.decide(coupon, batch, now, last_offset).await;
    shared.metrics.lua(started.elapsed());
    match verdict? {
        Verdict::Decided(d) => return Ok(Some(d)),
        Verdict::Paused => anyhow::bail!("coupon {coupon} is paused while its state is rebuilt"),
        Verdict::Uninitialized => {}
    }
    // No state in Redis: build it from Postgres, or give up on a coupon
    // that does not exist.
    let Some(built) = shared
        .states
        .rebuild(&shared.pool, coupon)
        .await
        .context("building coupon state")?
    else {
        return Ok(None);
    };
    // A coupon's first sight in a sale of many is no news; a state built
    // back from decisions (Redis lost it) is.
    if built.decisions == 0 {
        tracing::debug!(%coupon, epoch = built.epoch, "built a new coupon's state");
    } else {
        tracing::info!(%coupon, epoch = built.epoch, issued = built.issued, decisions = built.decisions, "built coupon state from postgres");
    }
    match shared
        .states
        .decide(coupon, batch, now, last_offset)
        .await?
    {
        Verdict::Decided(d) => Ok(Some(d)),
        Verdict::Paused => anyhow::bail!("coupon {coupon} is paused while its state is rebuilt"),
        Verdict::Uninitialized => anyhow::bail!("coupon state vanished right after it was built"),
    }
}

/// Rebuilds a coupon's Redis state from Postgres under a new epoch; false
/// if Postgres does not know the coupon.
async fn rebuild(shared: &Shared, coupon: &CouponId) -> anyhow::Result<bool> {
    let Some(built) = shared
        .states
        .rebuild(&shared.pool, coupon)
        .await
        .context("rebuilding coupon state")?
    else {
        return Ok(false);
    };
    tracing::info!(%coupon, epoch = built.epoch, issued = built.issued, decisions = built.decisions, "built coupon state from postgres");
    Ok(true)
}

/// Stores decisions and returns the coupons the fence refused; Postgres
/// errors are classified for the retry policy.
async fn persist(shared: &Shared, batch: &[Decided<'_>]) -> Result<Vec<CouponId>, Failure> {
    let started = std::time::Instant::now();
    let stored = db::persist(&shared.pool, batch).await;
    shared.metrics.pg(started.elapsed());
    stored.map_err(|e| {
        let permanent = db::is_permanent(&e);
        let e = anyhow::Error::new(e).context("persisting decisions");
        if permanent {
            Failure::Permanent(e)
        } else {
            Failure::Transient(e)
        }
    })
}

/// Step 3: persists one round of decisions. A round Postgres refuses for
/// good is stored record by record, so only the records it refuses are
/// given up (left `failed`, without [`TakenOn`]). Returns the coupons to
/// decide again: those the fence refused, and those with a request given
/// up, whose later requests are not stored.
async fn store(
    shared: &Shared,
    round: &mut [Decided<'_>],
    requests: &[Request<'_>],
    cancel: &CancellationToken,
) -> Result<Vec<CouponId>, Aborted> {
    let policy = shared.policy();
    let error = match policy
        .run(RetryStep::Persist, cancel, || persist(shared, round))
        .await
    {
        Ok(refused) => return Ok(refused),
        Err(Stop::Aborted) => return Err(Aborted),
        Err(Stop::GaveUp { error, .. }) => error,
    };
    tracing::warn!(
        error = format!("{error:#}"),
        "postgres refuses the batch, storing record by record"
    );
    let mut refused: Vec<CouponId> = Vec::new();
    for d in round.iter_mut() {
        if refused.contains(&d.request.coupon_id) {
            continue; // its coupon is decided again as a whole
        }
        let one = std::slice::from_ref(&*d);
        match policy
            .run(RetryStep::PersistRecord, cancel, || persist(shared, one))
            .await
        {
            Ok(r) => refused.extend(r),
            Err(Stop::Aborted) => return Err(Aborted),
            Err(Stop::GaveUp {
                error,
                attempts,
                first_failed_at,
            }) => {
                let letter = DeadLetter::permanent(format!("{error:#}"), attempts, first_failed_at);
                let rec = requests
                    .iter()
                    .map(|r| r.rec)
                    .find(|r| r.partition == d.partition && r.offset == d.offset)
                    .expect("a decision comes from a record of its batch");
                give_up(shared, d, rec, letter, cancel).await?;
                refused.push(d.request.coupon_id.clone());
            }
        }
    }
    Ok(refused)
}

/// Gives up on a decision Postgres will not store: gives back in Redis what
/// it took, dead-letters the record, and records it as `failed` (in the
/// ledger when Postgres takes that row, and in the status cache).
async fn give_up(
    shared: &Shared,
    d: &mut Decided<'_>,
    rec: &Rec,
    letter: DeadLetter,
    cancel: &CancellationToken,
) -> Result<(), Aborted> {
    tracing::error!(
        request_id = %d.request.request_id,
        offset = d.offset,
        error = %letter.message,
        "giving up on a decision postgres refuses"
    );
    let now = Utc::now().trunc_subsecs(6);
    shared
        .retry(RetryStep::UndoDecision, cancel, || async {
            shared
                .states
                .undo(d.request)
                .await
                .context("undoing a decision")
        })
        .await?;
    dead_letter(shared, rec, &letter, cancel).await?;
    d.decision = Decision {
        status: firstcome::Status::Failed,
        decided_at: now,
    };
    d.taken_on = None;
    let failed = std::slice::from_ref(&*d);
    let stored = shared
        .policy()
        .run(RetryStep::PersistFailure, cancel, || {
            persist(shared, failed)
        })
        .await;
    match stored {
        Ok(_) => {}
        Err(Stop::Aborted) => return Err(Aborted),
        Err(Stop::GaveUp { error, .. }) => {
            // A request that got a 202 must never be unknown: its record
            // goes where nothing about its content can be refused.
            let reason = format!("{error:#}");
            tracing::error!(
                error = %reason,
                "the ledger refuses the failure too; recording the request apart"
            );
            let record = rec.payload.as_deref().unwrap_or_default();
            shared
                .retry(RetryStep::RecordFailure, cancel, || async {
                    db::record_failure(&shared.pool, d.request.request_id, now, record, &reason)
                        .await
                        .context("recording a failed request")
                })
                .await?;
        }
    }
    Ok(())
}

/// Step 4: the dead letters, acknowledged before anything moves past them.
async fn dead_letter_all(
    shared: &Shared,
    dead: &[Dead<'_>],
    cancel: &CancellationToken,
) -> Result<(), Aborted> {
    for (rec, letter) in dead {
        tracing::warn!(offset = rec.offset, kind = letter.kind.as_str(), message = %letter.message, "dead-lettering record");
        dead_letter(shared, rec, letter, cancel).await?;
    }
    Ok(())
}

/// Writes one dead letter and waits for the broker's acknowledgement.
async fn dead_letter(
    shared: &Shared,
    rec: &Rec,
    letter: &DeadLetter,
    cancel: &CancellationToken,
) -> Result<(), Aborted> {
    let common = &shared.cfg.common;
    shared
        .retry(RetryStep::DeadLetter, cancel, || async {
            let record = letter.record(
                rec,
                &common.request_topic,
                &shared.cfg.group_id,
                &common.dlq_topic,
            );
            shared
                .dlq
                .send(record, DLQ_DELIVERY_TIMEOUT)
                .await
                .map(|_| ())
                .map_err(|e| anyhow::Error::new(e).context("writing a dead letter"))
        })
        .await?;
    shared.metrics.dead_lettered(letter.kind);
    Ok(())
}

/// Step 5: the final statuses, to the cache (and announced to long polls).
async fn publish(
    shared: &Shared,
    decided: &[Decided<'_>],
    cancel: &CancellationToken,
) -> Result<(), Aborted> {
    let statuses: Vec<RequestStatus> = decided
        .iter()
        .map(|d| RequestStatus::decided(d.request, d.decision))
        .collect();
    // Each coupon's last decided offset in this batch: the long polls
    // waiting for a place in line to fall hear of it.
    let mut last: HashMap<&CouponId, i64> = HashMap::new();
    for d in decided {
        let o = last.entry(&d.request.coupon_id).or_insert(d.offset);
        *o = (*o).max(d.offset);
    }
    let progress: Vec<(&CouponId, i64)> = last.into_iter().collect();
    shared
        .retry(RetryStep::PublishStatuses, cancel, || async {
            shared
                .statuses
                .put_decided(&statuses, &progress)
                .await
                .context("writing request statuses")
        })
        .await
}
