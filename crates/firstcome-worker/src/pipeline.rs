//! One partition's batch, from records to a stored offset:
//!
//! 1. parse and validate every record; what cannot be an issue request is a
//!    dead letter;
//! 2. decide the valid ones, one atomic Lua call per coupon with that
//!    coupon's requests in log order (calls for different coupons run
//!    concurrently: their order does not matter to each other);
//! 3. persist every decision in Postgres in one statement; the coupons whose
//!    decisions Postgres refuses because they were taken on a stale Redis
//!    state (the fence, see [`firstcome::state`]) are rebuilt from Postgres
//!    and go back to step 2;
//! 4. write the dead letters and wait for the broker's acknowledgement;
//! 5. publish the final statuses to the Redis status cache;
//! 6. only then store the offset past the batch.
//!
//! Each step is idempotent (a decided request keeps its decision, rows are
//! inserted `ON CONFLICT DO NOTHING`), so a transient failure simply retries
//! the step, and a crash anywhere replays the batch with the same outcome.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{SubsecRound, Utc};
use firstcome::db::{self, Decided, TakenOn};
use firstcome::metrics::WorkerMetrics;
use firstcome::redis_conn::RedisConn;
use firstcome::state::{self, Decision, Decisions, Keys, RequestStatus, Verdict};
use firstcome::{CouponId, IssueRequest};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::consumer::Rebalancer;
use crate::deadletter::DeadLetter;

/// How long one dead-letter write may wait for the broker before it is retried.
const DLQ_DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A record copied out of the consumer, so it can cross into a partition task.
#[derive(Debug, Clone)]
pub struct Rec {
    /// Partition it was read from.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key (the coupon id, for records the ingress wrote).
    pub key: Option<Vec<u8>>,
    /// Its value.
    pub payload: Option<Vec<u8>>,
    /// Its Kafka timestamp, in ms since the epoch.
    pub timestamp_ms: Option<i64>,
    /// How often it was replayed from the dead-letter topic (0 for a record
    /// the ingress wrote).
    pub replay_count: u32,
    /// Its request id header ([`firstcome::record::REQUEST_ID_HEADER`]),
    /// kept on its dead letter.
    pub request_id_header: Option<String>,
}

impl Rec {
    /// Copies what the pipeline needs out of a consumed message.
    pub fn from_message(m: &BorrowedMessage<'_>) -> Self {
        Self {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            timestamp_ms: m.timestamp().to_millis(),
            replay_count: crate::dlq::replay_count(m),
            request_id_header: crate::dlq::header(m, firstcome::record::REQUEST_ID_HEADER),
        }
    }
}

/// What every partition task shares.
pub struct Shared {
    /// The worker's settings.
    pub cfg: WorkerConfig,
    /// Postgres, the system of record.
    pub pool: PgPool,
    /// Redis, where decisions are made.
    pub redis: RedisConn,
    /// The Redis key layout.
    pub keys: Keys,
    /// Producer for the dead-letter topic.
    pub dlq: firstcome::kafka::HealingProducer,
    /// The consumer, to store offsets on.
    pub consumer: Arc<StreamConsumer<Rebalancer>>,
    /// What `/metrics` shows.
    pub metrics: Arc<WorkerMetrics>,
    /// When the poll loop last went round (`/healthz`).
    pub liveness: firstcome::ops::Liveness,
}

/// The batch was given up because its partition was revoked or the worker is
/// stopping; nothing past its start was stored, so it will be read again.
#[derive(Debug)]
pub struct Aborted;

/// Why a step failed, by what the loop must do about it.
enum Failure {
    /// Infrastructure that will come back: retry for as long as it takes.
    Transient(anyhow::Error),
    /// The data itself is refused: retry a few times, then give up.
    Permanent(anyhow::Error),
}

/// Why a retried step stopped without succeeding.
enum Stop {
    /// The partition was revoked or the worker is stopping.
    Aborted,
    /// A permanent failure outlasted `FIRSTCOME_PERMANENT_ATTEMPTS`.
    GaveUp {
        error: anyhow::Error,
        attempts: u32,
        first_failed_at: chrono::DateTime<Utc>,
    },
}

/// Runs `step` until it succeeds, waiting longer after each failure: for
/// ever on transient failures, up to the configured attempts on permanent
/// ones; or until `cancel` fires.
async fn retry_classified<T, F, Fut>(
    shared: &Shared,
    what: &'static str,
    cancel: &CancellationToken,
    mut step: F,
) -> Result<T, Stop>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let backoff = shared.cfg.backoff();
    let (mut attempt, mut permanent) = (0u32, 0u32);
    let mut first_failed_at = None;
    loop {
        let error = match step().await {
            Ok(v) => {
                if attempt > 0 {
                    tracing::info!(step = what, attempts = attempt + 1, "recovered");
                }
                return Ok(v);
            }
            Err(Failure::Transient(e)) => {
                shared.metrics.retried(what, false);
                e
            }
            Err(Failure::Permanent(e)) => {
                shared.metrics.retried(what, true);
                permanent += 1;
                let first = *first_failed_at.get_or_insert_with(Utc::now);
                if permanent >= shared.cfg.permanent_attempts {
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
        let delay = backoff.delay(attempt);
        tracing::warn!(
            step = what,
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

/// [`retry_classified`] for steps whose failures are all transient.
async fn retry<T, F, Fut>(
    shared: &Shared,
    what: &'static str,
    cancel: &CancellationToken,
    mut step: F,
) -> Result<T, Aborted>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let transient = || {
        let f = step();
        async move { f.await.map_err(Failure::Transient) }
    };
    match retry_classified(shared, what, cancel, transient).await {
        Ok(v) => Ok(v),
        Err(Stop::Aborted) => Err(Aborted),
        Err(Stop::GaveUp { .. }) => {
            unreachable!("a step with only transient failures never gives up")
        }
    }
}

/// Stores decisions and returns the coupons the fence refused; Postgres
/// errors are classified for [`retry_classified`].
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

/// Processes one batch of one partition; see the module docs.
#[tracing::instrument(skip_all, fields(partition = recs[0].partition, first_offset = recs[0].offset, len = recs.len()))]
pub async fn process(
    shared: &Shared,
    recs: Vec<Rec>,
    cancel: &CancellationToken,
    gate: Gate,
) -> Result<(), Aborted> {
    let Gate {
        prev_decided,
        prev_done,
        decided: decided_signal,
        done: done_signal,
    } = gate;
    shared.metrics.batch(recs.len());
    // 1. Parse.
    let mut requests: Vec<(usize, IssueRequest)> = Vec::with_capacity(recs.len());
    let mut dead: Vec<(usize, DeadLetter)> = Vec::new();
    for (i, rec) in recs.iter().enumerate() {
        match parse(rec) {
            Ok(r) => requests.push((i, r)),
            Err(d) => dead.push((i, d)),
        }
    }

    // 2. Decide, per coupon in log order.
    let mut groups: Vec<(CouponId, Vec<usize>)> = Vec::new();
    let mut group_of: HashMap<&CouponId, usize> = HashMap::new();
    for (j, (_, r)) in requests.iter().enumerate() {
        let g = *group_of.entry(&r.coupon_id).or_insert_with(|| {
            groups.push((r.coupon_id.clone(), Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push(j);
    }
    let now = Utc::now().trunc_subsecs(6);
    let mut decided: Vec<Decided<'_>> = Vec::with_capacity(requests.len());
    let mut todo: Vec<usize> = (0..groups.len()).collect();
    let mut given_up = std::collections::HashSet::new();
    // The previous batch of the partition decides first…
    wait(prev_decided, cancel).await?;
    let mut prev_done = Some(prev_done);
    let mut decided_signal = Some(decided_signal);
    loop {
        let outcomes = retry(shared, "decide", cancel, || {
            decide_groups(shared, &groups, &todo, &requests, now)
        })
        .await?;
        let mut round: Vec<Decided<'_>> = Vec::new();
        for (&g, outcome) in todo.iter().zip(outcomes) {
            let (coupon, members) = &groups[g];
            match outcome {
                Some(Decisions { epoch, decisions }) => {
                    for (&j, (decision, seq)) in members.iter().zip(decisions) {
                        let (i, request) = &requests[j];
                        round.push(Decided {
                            request,
                            decision,
                            partition: recs[*i].partition,
                            offset: recs[*i].offset,
                            taken_on: Some(TakenOn { epoch, seq }),
                        });
                    }
                }
                // Unknown to Postgres, so never refused by the fence: this
                // happens in the first round only.
                None => dead.extend(
                    members
                        .iter()
                        .map(|&j| (requests[j].0, DeadLetter::unknown_coupon(coupon.as_str()))),
                ),
            }
        }

        if let Some(signal) = decided_signal.take() {
            let _ = signal.send(());
        }
        // …and is stored first. If it changed a coupon's state meanwhile
        // (a rebuild), the fence refuses what this batch decided on the old
        // state, and it is decided again below.
        if let Some(prev) = prev_done.take() {
            wait(prev, cancel).await?;
        }

        // 3. Persist. Coupons decided on a stale state, and coupons with a
        //    request given up (the requests behind it in the batch were
        //    decided as if it held its unit), are rebuilt and go round again
        //    without the given-up requests, which keep their `failed`.
        let redo = store(shared, &mut round, &recs, cancel).await?;
        for d in round.iter().filter(|d| d.taken_on.is_none()) {
            given_up.insert(d.request.request_id);
            decided.push(d.clone());
        }
        round.retain(|d| !redo.contains(&d.request.coupon_id));
        decided.append(&mut round);
        if redo.is_empty() {
            break;
        }
        // In log order of the coupons' first records, so the batch's
        // earliest requests get their state back first.
        let redo: Vec<&CouponId> = groups
            .iter()
            .map(|(c, _)| c)
            .filter(|c| redo.contains(c))
            .collect();
        for &coupon in &redo {
            shared.metrics.state_rebuilds.inc();
            tracing::warn!(%coupon, "rebuilding the coupon from postgres and deciding its requests again");
            retry(shared, "rebuild", cancel, || rebuild(shared, coupon)).await?;
        }
        let redo: Vec<CouponId> = redo.into_iter().cloned().collect();
        for (coupon, members) in &mut groups {
            if redo.contains(coupon) {
                members.retain(|&j| !given_up.contains(&requests[j].1.request_id));
            }
        }
        todo.retain(|&g| redo.contains(&groups[g].0) && !groups[g].1.is_empty());
        if todo.is_empty() {
            break;
        }
    }

    // 4. Dead letters, acknowledged before anything moves past them.
    for (i, letter) in &dead {
        let rec = &recs[*i];
        tracing::warn!(offset = rec.offset, kind = letter.kind.as_str(), message = %letter.message, "dead-lettering record");
        retry(shared, "dead-letter", cancel, || {
            dead_letter(shared, rec, letter)
        })
        .await?;
        shared.metrics.dead_lettered(letter.kind.as_str());
    }

    // 5. Publish the final statuses.
    let statuses: Vec<RequestStatus> = decided
        .iter()
        .map(|d| RequestStatus::decided(d.request, d.decision))
        .collect();
    retry(shared, "publish statuses", cancel, || async {
        state::put_statuses(
            &mut shared.redis.clone(),
            &shared.keys,
            &statuses,
            shared.cfg.common.status_ttl(),
        )
        .await
        .context("writing request statuses")
    })
    .await?;

    // 6. Move the partition past the batch.
    let last = recs.last().expect("a batch is never empty");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(
        &shared.cfg.common.request_topic,
        last.partition,
        Offset::Offset(last.offset + 1),
    )
    .expect("a fresh partition list accepts an offset");
    if let Err(e) = shared.consumer.store_offsets(&tpl) {
        // The partition was revoked meanwhile; its next owner reads the batch
        // again and gets the same decisions back.
        tracing::info!(error = %e, "offset not stored, partition no longer assigned");
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
    let _ = done_signal.send(());
    Ok(())
}

/// Orders two overlapping batches of one partition: a batch decides only
/// once the batch before it has decided, and stores (persists, publishes,
/// moves the offset) only once the batch before it is done. So decisions
/// still follow the log, and the next batch's Lua call overlaps the previous
/// batch's Postgres write.
pub struct Gate {
    prev_decided: Option<oneshot::Receiver<()>>,
    prev_done: Option<oneshot::Receiver<()>>,
    decided: oneshot::Sender<()>,
    done: oneshot::Sender<()>,
}

/// What a batch hands the next one: signals of its progress.
pub struct Handoff {
    decided: oneshot::Receiver<()>,
    done: oneshot::Receiver<()>,
}

impl Gate {
    /// The gate of a batch that follows `prev` (`None`: nothing in flight).
    pub fn after(prev: Option<Handoff>) -> (Self, Handoff) {
        let (decided, decided_rx) = oneshot::channel();
        let (done, done_rx) = oneshot::channel();
        let (prev_decided, prev_done) = match prev {
            Some(h) => (Some(h.decided), Some(h.done)),
            None => (None, None),
        };
        (
            Self {
                prev_decided,
                prev_done,
                decided,
                done,
            },
            Handoff {
                decided: decided_rx,
                done: done_rx,
            },
        )
    }
}

/// Waits for the previous batch's signal; if it was given up (revoked,
/// stopping), so is this one: nothing may be stored past it.
async fn wait(
    signal: Option<oneshot::Receiver<()>>,
    cancel: &CancellationToken,
) -> Result<(), Aborted> {
    let Some(signal) = signal else {
        return Ok(());
    };
    tokio::select! {
        () = cancel.cancelled() => Err(Aborted),
        r = signal => r.map_err(|_| Aborted),
    }
}

/// Persists one round of decisions. A batch Postgres refuses for good is
/// stored record by record, so only the records it refuses are given up
/// (left `failed`, without [`TakenOn`]). Returns the coupons to decide
/// again: those the fence refused, and those with a request given up, whose
/// later requests are not stored.
async fn store(
    shared: &Shared,
    round: &mut [Decided<'_>],
    recs: &[Rec],
    cancel: &CancellationToken,
) -> Result<Vec<CouponId>, Aborted> {
    let error = match retry_classified(shared, "persist", cancel, || persist(shared, round)).await {
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
        match retry_classified(shared, "persist record", cancel, || persist(shared, one)).await {
            Ok(r) => refused.extend(r),
            Err(Stop::Aborted) => return Err(Aborted),
            Err(Stop::GaveUp {
                error,
                attempts,
                first_failed_at,
            }) => {
                let letter = DeadLetter::permanent(format!("{error:#}"), attempts, first_failed_at);
                give_up(shared, d, recs, letter, cancel).await?;
                refused.push(d.request.coupon_id.clone());
            }
        }
    }
    Ok(refused)
}

/// Rebuilds a coupon's Redis state from Postgres under a new epoch.
async fn rebuild(shared: &Shared, coupon: &CouponId) -> anyhow::Result<()> {
    let built = firstcome::rebuild::coupon(
        &shared.pool,
        &mut shared.redis.clone(),
        &shared.keys,
        coupon,
    )
    .await
    .context("rebuilding coupon state")?
    .with_context(|| format!("coupon {coupon} is gone from postgres"))?;
    tracing::info!(%coupon, epoch = built.epoch, issued = built.issued, decisions = built.decisions, "built coupon state from postgres");
    Ok(())
}

/// Gives up on a decision Postgres will not store: gives back in Redis what
/// it took, dead-letters the record, and records it as `failed` (in the
/// ledger when Postgres takes that row, and in the status cache).
async fn give_up(
    shared: &Shared,
    d: &mut Decided<'_>,
    recs: &[Rec],
    letter: DeadLetter,
    cancel: &CancellationToken,
) -> Result<(), Aborted> {
    let rec = recs
        .iter()
        .find(|r| r.partition == d.partition && r.offset == d.offset)
        .expect("a decision comes from a record of its batch");
    tracing::error!(
        request_id = %d.request.request_id,
        offset = d.offset,
        error = %letter.message,
        "giving up on a decision postgres refuses"
    );
    let now = Utc::now().trunc_subsecs(6);
    let keys = shared.keys.coupon(&d.request.coupon_id);
    retry(shared, "undo decision", cancel, || async {
        state::undo(&mut shared.redis.clone(), &keys, d.request)
            .await
            .context("undoing a decision")
    })
    .await?;
    retry(shared, "dead-letter", cancel, || {
        dead_letter(shared, rec, &letter)
    })
    .await?;
    shared.metrics.dead_lettered(letter.kind.as_str());
    d.decision = Decision {
        status: firstcome::Status::Failed,
        decided_at: now,
    };
    d.taken_on = None;
    let failed = std::slice::from_ref(&*d);
    match retry_classified(shared, "persist failure", cancel, || {
        persist(shared, failed)
    })
    .await
    {
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
            retry(shared, "record failure", cancel, || async {
                db::record_failure(&shared.pool, d.request.request_id, now, record, &reason)
                    .await
                    .context("recording a failed request")
            })
            .await?;
        }
    }
    Ok(())
}

/// Parses a record into an issue request whose key matches its coupon.
fn parse(rec: &Rec) -> Result<IssueRequest, DeadLetter> {
    let payload = rec
        .payload
        .as_deref()
        .ok_or_else(|| DeadLetter::invalid_record("record has no value"))?;
    let request = IssueRequest::from_json(payload).map_err(DeadLetter::invalid_record)?;
    if rec.key.as_deref() != Some(request.coupon_id.as_str().as_bytes()) {
        return Err(DeadLetter::key_mismatch(
            rec.key.as_deref(),
            request.coupon_id.as_str(),
        ));
    }
    Ok(request)
}

/// Decides the groups `todo`; `None` for a coupon Postgres does not know.
async fn decide_groups(
    shared: &Shared,
    groups: &[(CouponId, Vec<usize>)],
    todo: &[usize],
    requests: &[(usize, IssueRequest)],
    now: chrono::DateTime<Utc>,
) -> anyhow::Result<Vec<Option<Decisions>>> {
    futures::future::try_join_all(todo.iter().map(|&g| {
        let (coupon, members) = &groups[g];
        let batch: Vec<&IssueRequest> = members.iter().map(|&j| &requests[j].1).collect();
        async move { decide_coupon(shared, coupon, &batch, now).await }
    }))
    .await
}

async fn decide_coupon(
    shared: &Shared,
    coupon: &CouponId,
    batch: &[&IssueRequest],
    now: chrono::DateTime<Utc>,
) -> anyhow::Result<Option<Decisions>> {
    let mut conn = shared.redis.clone();
    let keys = shared.keys.coupon(coupon);
    let started = std::time::Instant::now();
    let verdict = state::decide(&mut conn, &keys, batch, now).await;
    shared.metrics.lua(started.elapsed());
    match verdict? {
        Verdict::Decided(d) => return Ok(Some(d)),
        Verdict::Paused => anyhow::bail!("coupon {coupon} is paused while its state is rebuilt"),
        Verdict::Uninitialized => {}
    }
    // No state in Redis: build it from Postgres, or give up on a coupon
    // that does not exist.
    let Some(built) = firstcome::rebuild::coupon(&shared.pool, &mut conn, &shared.keys, coupon)
        .await
        .context("building coupon state")?
    else {
        return Ok(None);
    };
    tracing::info!(%coupon, epoch = built.epoch, issued = built.issued, "built coupon state from postgres");
    match state::decide(&mut conn, &keys, batch, now).await? {
        Verdict::Decided(d) => Ok(Some(d)),
        Verdict::Paused => anyhow::bail!("coupon {coupon} is paused while its state is rebuilt"),
        Verdict::Uninitialized => anyhow::bail!("coupon state vanished right after it was built"),
    }
}

async fn dead_letter(shared: &Shared, rec: &Rec, letter: &DeadLetter) -> anyhow::Result<()> {
    let topic = &shared.cfg.common.request_topic;
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&shared.cfg.common.dlq_topic)
        .headers(letter.headers(rec, topic, &shared.cfg.group_id));
    if let Some(k) = &rec.key {
        record = record.key(k.as_slice());
    }
    if let Some(p) = &rec.payload {
        record = record.payload(p.as_slice());
    }
    shared
        .dlq
        .send(record, DLQ_DELIVERY_TIMEOUT)
        .await
        .map_err(|e| anyhow::Error::new(e).context("writing a dead letter"))
}
