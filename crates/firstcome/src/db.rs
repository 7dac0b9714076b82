//! Postgres, the system of record: coupons, the request ledger and the
//! coupons users hold. Queries are plain `sqlx::query` (no compile-time
//! database), migrations are embedded from `migrations/`.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

use crate::decision::{CouponSnapshot, Decision};
use crate::ids::{CouponId, RequestId, UserId};
use crate::record::{IssueRequest, Status};

/// The migrations in `migrations/`, compiled into every binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Applies pending migrations (Postgres serializes concurrent runs by a lock).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Largest `total_stock` a coupon may have (the column is an `integer`).
pub const MAX_STOCK: i64 = 1_000_000_000;

/// A coupon campaign as stored.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct Coupon {
    /// Chosen by the admin.
    pub coupon_id: CouponId,
    /// Display name.
    pub name: String,
    /// Units to hand out.
    pub total_stock: i32,
    /// Requests accepted before this are `not_open`.
    pub starts_at: Option<DateTime<Utc>>,
    /// Requests accepted after this are `not_open`.
    pub ends_at: Option<DateTime<Utc>>,
}

/// Inserts a coupon; `false` when one with that id exists already.
pub async fn insert_coupon(pool: &PgPool, c: &Coupon) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO coupon (coupon_id, name, total_stock, starts_at, ends_at)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (coupon_id) DO NOTHING",
    )
    .bind(c.coupon_id.as_str())
    .bind(&c.name)
    .bind(c.total_stock)
    .bind(c.starts_at)
    .bind(c.ends_at)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Reads a coupon.
pub async fn coupon(pool: &PgPool, id: &CouponId) -> Result<Option<Coupon>, sqlx::Error> {
    sqlx::query_as(
        "SELECT coupon_id, name, total_stock, starts_at, ends_at FROM coupon WHERE coupon_id = $1",
    )
    .bind(id.as_str())
    .fetch_optional(pool)
    .await
}

/// Every coupon, by id.
pub async fn coupons(pool: &PgPool) -> Result<Vec<Coupon>, sqlx::Error> {
    sqlx::query_as(
        "SELECT coupon_id, name, total_stock, starts_at, ends_at FROM coupon ORDER BY coupon_id",
    )
    .fetch_all(pool)
    .await
}

/// The coupons whose sale has not ended (no `ends_at`, or one still
/// ahead): what `redis rebuild` of every coupon builds. An ended coupon's
/// state is built again only when a record of it comes (a late one, a
/// replay), so a rebuild of everything does not bring back every retired
/// sale's decisions (red team #8).
pub async fn live_coupons(pool: &PgPool) -> Result<Vec<Coupon>, sqlx::Error> {
    sqlx::query_as(
        "SELECT coupon_id, name, total_stock, starts_at, ends_at FROM coupon
         WHERE ends_at IS NULL OR ends_at > now() ORDER BY coupon_id",
    )
    .fetch_all(pool)
    .await
}

/// The users holding the coupon.
pub async fn issued_users(pool: &PgPool, id: &CouponId) -> Result<Vec<UserId>, sqlx::Error> {
    sqlx::query_scalar("SELECT user_id FROM user_coupon WHERE coupon_id = $1")
        .bind(id.as_str())
        .fetch_all(pool)
        .await
}

/// How many users hold the coupon.
pub async fn issued_count(pool: &PgPool, id: &CouponId) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM user_coupon WHERE coupon_id = $1")
        .bind(id.as_str())
        .fetch_one(pool)
        .await
}

/// Starts a new build of the coupon's Redis state: takes the next epoch
/// (waiting for batches being stored to finish; any stored later with an
/// older epoch is refused) and reads everything Redis needs to decide for the
/// coupon. `None` when the coupon does not exist.
///
/// One transaction: the epoch's `UPDATE` locks the coupon's row until the
/// commit, and every store locks that row before it writes, so the read
/// after it (one statement, one snapshot) sees each store that finished
/// before, and each one after finds the new epoch and is refused. Four
/// statements and one commit, paid by every coupon on its first sight in a
/// worker; an `UPDATE` committed on its own and a read-only transaction
/// after it took six and two (docs/benchmarks.md, "spread").
pub async fn rebuild_snapshot(
    pool: &PgPool,
    id: &CouponId,
) -> Result<Option<CouponSnapshot>, sqlx::Error> {
    type Row = (i32, Option<DateTime<Utc>>, Option<DateTime<Utc>>, i64, i64);
    let mut tx = pool.begin().await?;
    let row: Option<Row> = sqlx::query_as(
        "UPDATE coupon SET redis_epoch = redis_epoch + 1 WHERE coupon_id = $1
         RETURNING total_stock, starts_at, ends_at, redis_epoch, decided_seq",
    )
    .bind(id.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some((total_stock, starts_at, ends_at, epoch, seq)) = row else {
        return Ok(None);
    };
    // A holder is a row with a user and no request; a decision one with a
    // request and no user.
    type Held = (
        Option<String>,
        Option<Uuid>,
        Option<String>,
        Option<DateTime<Utc>>,
    );
    let rows: Vec<Held> = sqlx::query_as(
        "SELECT user_id, NULL::uuid, NULL::text, NULL::timestamptz
         FROM user_coupon WHERE coupon_id = $1
         UNION ALL
         SELECT NULL, request_id, status, decided_at
         FROM request_ledger WHERE coupon_id = $1 AND status <> 'failed'",
    )
    .bind(id.as_str())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let (mut users, mut decisions) = (Vec::new(), Vec::new());
    for row in rows {
        match row {
            (Some(user), ..) => users.push(user),
            (None, Some(request), Some(status), Some(decided_at)) => {
                decisions.push((request, status, decided_at))
            }
            _ => return Err(sqlx::Error::Decode("a rebuild row of neither kind".into())),
        }
    }
    let corrupt = |what: String| sqlx::Error::Decode(what.into());
    Ok(Some(CouponSnapshot {
        epoch,
        seq,
        total_stock: total_stock.into(),
        starts_at,
        ends_at,
        issued_users: users
            .into_iter()
            .map(|u| UserId::parse(u).map_err(|e| corrupt(e.to_string())))
            .collect::<Result<_, _>>()?,
        decisions: decisions
            .into_iter()
            .map(|(id, status, decided_at)| {
                let status: Status = status.parse().map_err(|e| corrupt(format!("{e}")))?;
                Ok((RequestId::from(id), Decision { status, decided_at }))
            })
            .collect::<Result<_, sqlx::Error>>()?,
    }))
}

/// A coupon's fence as Postgres holds it (see [`crate::state`]).
pub async fn fence(pool: &PgPool, id: &CouponId) -> Result<Option<(i64, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT redis_epoch, decided_seq FROM coupon WHERE coupon_id = $1")
        .bind(id.as_str())
        .fetch_optional(pool)
        .await
}

/// Whether waiting will not fix `e`: Postgres refused the data itself
/// (SQLSTATE class 22, data exception, or 23, integrity constraint violation,
/// other than the conflicts `ON CONFLICT DO NOTHING` absorbs).
pub fn is_permanent(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
        _ => false,
    }
}

/// A decided request and where it sat in the log.
#[derive(Debug, Clone)]
pub struct Decided<'a> {
    /// The request as read from Kafka.
    pub request: &'a IssueRequest,
    /// Its final answer.
    pub decision: Decision,
    /// Kafka partition it was read from.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// The Redis state it was decided on; `None` for a row that holds no
    /// decision (a `failed` request), which is stored unfenced.
    pub taken_on: Option<TakenOn>,
}

/// Where in a coupon's Redis history a decision was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TakenOn {
    /// Epoch of the state.
    pub epoch: i64,
    /// The decision's number in the coupon's sequence; 0 for a decision the
    /// state was built with (loaded from Postgres).
    pub seq: i64,
}

/// Persists a batch of decisions in one statement (so all or nothing per
/// coupon): every request into the ledger, the issued ones into
/// `user_coupon`. Rows that are already there stay as they are, which makes
/// redelivery harmless; only a `failed` ledger row gives way, to the decision
/// of a replayed dead letter.
///
/// The rows of a coupon are stored only if its decisions were taken on the
/// state Postgres knows, in the order they were taken (the fence, see
/// [`crate::state`]):
/// - every one carries the current `redis_epoch`;
/// - the numbers past `decided_seq` are exactly the next ones, without a gap
///   or a repeat (`decided_seq` then moves to the highest), so a decision
///   is never stored before one Redis took earlier, by this worker, another
///   one or a zombie;
/// - a number not past `decided_seq` belongs to a decision stored already:
///   its ledger row is there *with the same status*, so a redelivery stores
///   nothing new, and a number reused by a Redis that lost its last writes
///   is refused, whether the request is new or was stored with another
///   decision (a Redis rolled back to before `a` took the last unit would
///   otherwise re-decide the stored `sold_out` of `b` as `issued`).
///
/// Only rows the ledger actually took (new, or a `failed` one replaced)
/// reach `user_coupon`: a decision the ledger already holds never adds a
/// holder, whatever the incoming copy says.
///
/// The coupon rows are locked first (in id order, so two stores never
/// deadlock), and the check runs in the next statement, so two stores for
/// one coupon serialize and the second is checked against everything the
/// first stored. The check reads the batch once, grouped by coupon: one
/// that read it again for each coupon cost a batch spread over 2,000
/// coupons seconds (docs/benchmarks.md, "spread"). Returns the coupons
/// refused; nothing of theirs was stored.
pub async fn persist(pool: &PgPool, batch: &[Decided<'_>]) -> Result<Vec<CouponId>, sqlx::Error> {
    // A request twice in one batch (a dead letter replayed twice) is stored
    // once, with its first decision; the upsert below may touch a row once.
    let mut seen = std::collections::HashSet::with_capacity(batch.len());
    let batch: Vec<&Decided<'_>> = batch
        .iter()
        .filter(|d| seen.insert(d.request.request_id))
        .collect();
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let n = batch.len();
    let (mut ids, mut coupons, mut users, mut statuses) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut partitions, mut offsets, mut accepted, mut decided) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut epochs, mut seqs) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for d in &batch {
        ids.push(d.request.request_id.as_uuid());
        coupons.push(d.request.coupon_id.as_str());
        users.push(d.request.user_id.as_str());
        statuses.push(d.decision.status.as_str());
        partitions.push(d.partition);
        offsets.push(d.offset);
        accepted.push(d.request.accepted_at);
        decided.push(d.decision.decided_at);
        epochs.push(d.taken_on.map(|t| t.epoch));
        seqs.push(d.taken_on.map(|t| t.seq));
    }
    let mut fenced: Vec<&str> = batch
        .iter()
        .filter(|d| d.taken_on.is_some())
        .map(|d| d.request.coupon_id.as_str())
        .collect();
    fenced.sort_unstable();
    fenced.dedup();
    let mut tx = pool.begin().await?;
    if !fenced.is_empty() {
        sqlx::query("SELECT 1 FROM coupon WHERE coupon_id = ANY($1) ORDER BY coupon_id FOR UPDATE")
            .bind(&fenced)
            .execute(&mut *tx)
            .await?;
    }
    let refused: Vec<String> = sqlx::query_scalar(
        "WITH input AS (
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[],
                                  $5::int[], $6::bigint[], $7::timestamptz[], $8::timestamptz[],
                                  $9::bigint[], $10::bigint[])
                 AS t(request_id, coupon_id, user_id, status, kafka_partition, kafka_offset,
                      accepted_at, decided_at, epoch, seq)
         ), checked AS (
             SELECT i.coupon_id,
                    bool_and(i.epoch = c.redis_epoch) AS same_epoch,
                    max(i.seq) AS last_seq,
                    count(*) FILTER (WHERE i.seq > c.decided_seq) AS n_new,
                    count(DISTINCT i.seq) FILTER (WHERE i.seq > c.decided_seq) AS n_distinct,
                    COALESCE(max(i.seq) FILTER (WHERE i.seq > c.decided_seq) - c.decided_seq, 0)
                        AS n_span,
                    bool_and(i.seq > c.decided_seq
                             OR EXISTS (SELECT 1 FROM request_ledger l
                                        WHERE l.request_id = i.request_id
                                          AND l.status <> 'failed'
                                          AND l.status = i.status)) AS old_stored
             FROM input i JOIN coupon c ON c.coupon_id = i.coupon_id
             WHERE i.epoch IS NOT NULL
             GROUP BY i.coupon_id, c.decided_seq
         ), fenced AS (
             UPDATE coupon c
             SET decided_seq = GREATEST(c.decided_seq, k.last_seq)
             FROM checked k
             WHERE c.coupon_id = k.coupon_id
               AND k.same_epoch AND k.n_new = k.n_distinct AND k.n_new = k.n_span
               AND k.old_stored
             RETURNING c.coupon_id
         ), admitted AS (
             SELECT request_id, coupon_id, user_id, status, kafka_partition, kafka_offset,
                    accepted_at, decided_at, seq
             FROM input
             WHERE epoch IS NULL OR coupon_id IN (SELECT coupon_id FROM fenced)
         ), ledger AS (
             INSERT INTO request_ledger (request_id, coupon_id, user_id, status,
                                         kafka_partition, kafka_offset, accepted_at, decided_at,
                                         decision_seq)
             SELECT * FROM admitted
             ON CONFLICT (request_id) DO UPDATE
                 SET status = EXCLUDED.status, kafka_partition = EXCLUDED.kafka_partition,
                     kafka_offset = EXCLUDED.kafka_offset, decided_at = EXCLUDED.decided_at,
                     decision_seq = EXCLUDED.decision_seq
                 WHERE request_ledger.status = 'failed'
             RETURNING request_id, coupon_id, user_id, status, decided_at
         ), issued AS (
             INSERT INTO user_coupon (coupon_id, user_id, request_id, issued_at)
             SELECT coupon_id, user_id, request_id, decided_at FROM ledger
             WHERE status = 'issued'
             ON CONFLICT DO NOTHING
         )
         SELECT DISTINCT coupon_id FROM input
         WHERE epoch IS NOT NULL AND coupon_id NOT IN (SELECT coupon_id FROM fenced)",
    )
    .bind(&ids)
    .bind(&coupons)
    .bind(&users)
    .bind(&statuses)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&accepted)
    .bind(&decided)
    .bind(&epochs)
    .bind(&seqs)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    refused
        .into_iter()
        .map(|c| CouponId::parse(c).map_err(|e| sqlx::Error::Decode(e.to_string().into())))
        .collect()
}

/// A ledger row, as a status lookup needs it, decoded into domain types
/// (see [`columns`]).
#[derive(Debug, Clone, FromRow)]
#[allow(missing_docs)] // the columns of `request_ledger`; the names say it all
pub struct LedgerRow {
    pub request_id: RequestId,
    pub coupon_id: CouponId,
    pub user_id: UserId,
    pub status: Status,
    pub accepted_at: DateTime<Utc>,
    pub decided_at: DateTime<Utc>,
}

/// Reads one request's ledger row.
pub async fn ledger_row(pool: &PgPool, id: RequestId) -> Result<Option<LedgerRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT request_id, coupon_id, user_id, status, accepted_at, decided_at
         FROM request_ledger WHERE request_id = $1",
    )
    .bind(id.as_uuid())
    .fetch_optional(pool)
    .await
}

/// A decision as the ledger holds it, with the record that decided it.
#[derive(Debug, Clone, FromRow)]
#[allow(missing_docs)] // the columns of `request_ledger`; the names say it all
pub struct StoredDecision {
    pub request_id: RequestId,
    pub coupon_id: CouponId,
    pub user_id: UserId,
    pub status: Status,
    pub accepted_at: DateTime<Utc>,
    pub decided_at: DateTime<Utc>,
    pub decision_seq: Option<i64>,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
}

/// The decisions the ledger holds of `requests` (id and offset of the
/// record that holds it) of `partition` that those very records decided, in
/// log order. A request the log holds twice (appended again after an
/// unconfirmed write, or a dead letter replayed) is decided by one of its
/// records, and only that record finds its row here.
pub async fn stored_decisions(
    pool: &PgPool,
    partition: i32,
    requests: &[(RequestId, i64)],
) -> Result<Vec<StoredDecision>, sqlx::Error> {
    let ids: Vec<Uuid> = requests.iter().map(|(id, _)| id.as_uuid()).collect();
    let offsets: Vec<i64> = requests.iter().map(|(_, o)| *o).collect();
    sqlx::query_as(
        "SELECT l.request_id, l.coupon_id, l.user_id, l.status, l.accepted_at, l.decided_at,
                l.decision_seq, l.kafka_partition, l.kafka_offset
         FROM UNNEST($2::uuid[], $3::bigint[]) AS r(request_id, kafka_offset)
         JOIN request_ledger l USING (request_id, kafka_offset)
         WHERE l.kafka_partition = $1
         ORDER BY l.kafka_offset",
    )
    .bind(partition)
    .bind(&ids)
    .bind(&offsets)
    .fetch_all(pool)
    .await
}

/// Records a request whose `failed` ledger row was refused too: its record
/// as it was in the log, so its status lookup still answers (`failed`).
pub async fn record_failure(
    pool: &PgPool,
    id: RequestId,
    failed_at: DateTime<Utc>,
    record: &[u8],
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO request_failure (request_id, failed_at, record, reason)
         VALUES ($1, $2, $3, $4) ON CONFLICT (request_id) DO NOTHING",
    )
    .bind(id.as_uuid())
    .bind(failed_at)
    .bind(record)
    // Text cannot hold NUL.
    .bind(reason.replace('\0', "\\0"))
    .execute(pool)
    .await?;
    Ok(())
}

/// A request recorded by [`record_failure`]: when it failed, and the
/// request its record holds.
pub async fn failure(
    pool: &PgPool,
    id: RequestId,
) -> Result<Option<(DateTime<Utc>, IssueRequest)>, sqlx::Error> {
    let row: Option<(DateTime<Utc>, Vec<u8>)> =
        sqlx::query_as("SELECT failed_at, record FROM request_failure WHERE request_id = $1")
            .bind(id.as_uuid())
            .fetch_optional(pool)
            .await?;
    row.map(|(at, record)| {
        IssueRequest::from_json(&record)
            .map(|r| (at, r))
            .map_err(|e| sqlx::Error::Decode(format!("request_failure {id}: {e}").into()))
    })
    .transpose()
}

/// A coupon a user holds.
#[derive(Debug, Clone, FromRow)]
pub struct HeldCoupon {
    /// The coupon.
    pub coupon_id: CouponId,
    /// The request that won it.
    pub request_id: RequestId,
    /// When it was issued.
    pub issued_at: DateTime<Utc>,
}

/// The coupons a user holds, oldest first.
pub async fn user_coupons(pool: &PgPool, user: &UserId) -> Result<Vec<HeldCoupon>, sqlx::Error> {
    sqlx::query_as(
        "SELECT coupon_id, request_id, issued_at FROM user_coupon
         WHERE user_id = $1 ORDER BY issued_at, coupon_id",
    )
    .bind(user.as_str())
    .fetch_all(pool)
    .await
}

/// A page of coupons by id, after `after` (exclusive).
pub async fn coupons_page(
    pool: &PgPool,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Coupon>, sqlx::Error> {
    sqlx::query_as(
        "SELECT coupon_id, name, total_stock, starts_at, ends_at FROM coupon
         WHERE $1::text IS NULL OR coupon_id > $1 ORDER BY coupon_id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// An admin change to a coupon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// More units, the total staying at most the given maximum.
    AddStock {
        /// Units to add.
        units: i64,
        /// Largest total allowed.
        max_total: i64,
    },
    /// The window ends at this time, unless it ends earlier already.
    Close(DateTime<Utc>),
    /// The window ends at this time (`None`: no end).
    Reopen(Option<DateTime<Utc>>),
}

impl Change {
    /// The `kind` stored in `coupon_change`.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::AddStock { .. } => "add_stock",
            Change::Close(_) => "close",
            Change::Reopen(_) => "reopen",
        }
    }
}

/// What [`apply_change`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeOutcome {
    /// Applied now; the coupon as it is after it.
    Applied(Coupon),
    /// A change with this id was applied before (of this coupon and kind):
    /// nothing changed.
    AppliedBefore,
    /// A change with this id was applied before, to another coupon or of
    /// another kind.
    IdTaken,
    /// No such coupon.
    NotFound,
    /// Refused, nothing changed: the reason.
    Invalid(String),
}

/// Applies an admin change exactly once: in one transaction, under the
/// coupon row's lock, the coupon row changes, its `redis_epoch` moves (so a
/// decision taken on the state before the change is refused by the fence
/// and taken again on one built with it), and the change is recorded under
/// `change_id` with the place in the log where it took effect, and in the
/// audit table. A retry with the same id changes nothing.
pub async fn apply_change(
    pool: &PgPool,
    change_id: Uuid,
    id: &CouponId,
    change: Change,
    token_id: &str,
    mut detail: serde_json::Value,
) -> Result<ChangeOutcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let coupon: Option<Coupon> = sqlx::query_as(
        "SELECT coupon_id, name, total_stock, starts_at, ends_at FROM coupon
         WHERE coupon_id = $1 FOR UPDATE",
    )
    .bind(id.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(mut coupon) = coupon else {
        return Ok(ChangeOutcome::NotFound);
    };
    let before: Option<(String, String, serde_json::Value)> =
        sqlx::query_as("SELECT coupon_id, kind, detail FROM coupon_change WHERE change_id = $1")
            .bind(change_id)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some((coupon_id, kind, stored)) = before {
        // The same key with another body is another change, not a retry.
        let same_body = ["add", "ends_at"]
            .iter()
            .all(|k| stored.get(k) == detail.get(k));
        return Ok(
            if coupon_id == id.as_str() && kind == change.kind() && same_body {
                ChangeOutcome::AppliedBefore
            } else {
                ChangeOutcome::IdTaken
            },
        );
    }
    match change {
        Change::AddStock { units, max_total } => {
            let total = i64::from(coupon.total_stock) + units;
            if total > max_total {
                return Ok(ChangeOutcome::Invalid(format!(
                    "the total would pass {max_total}"
                )));
            }
            coupon.total_stock = i32::try_from(total).expect("max_total fits a Postgres integer");
        }
        // An earlier end stays: closing never extends a window. A close
        // before the window opens ends it there (it starts and ends at the
        // close): the sale never opens, and the window stays a window.
        // The start it had is kept in the change, for a reopen to restore.
        Change::Close(at) => {
            coupon.ends_at = Some(coupon.ends_at.map_or(at, |e| e.min(at)));
            if let Some(s) = coupon.starts_at.filter(|s| *s > at) {
                coupon.starts_at = Some(at);
                if let Some(d) = detail.as_object_mut() {
                    d.insert("starts_at_before".into(), serde_json::json!(s));
                    d.insert("closed_at".into(), serde_json::json!(at));
                }
            }
        }
        // A reopen after a close that moved the start gives the start back
        // (red team #9: it opened the sale early, at the close's time).
        Change::Reopen(ends_at) => {
            type Moved = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);
            let moved: Option<Moved> = sqlx::query_as(
                "SELECT (detail->>'starts_at_before')::timestamptz, (detail->>'closed_at')::timestamptz
                 FROM coupon_change WHERE coupon_id = $1 AND kind = 'close'
                 ORDER BY applied_at DESC LIMIT 1",
            )
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((Some(before), Some(closed_at))) = moved
                && coupon.starts_at == Some(closed_at)
            {
                coupon.starts_at = Some(before);
            }
            if let (Some(e), Some(s)) = (ends_at, coupon.starts_at)
                && e < s
            {
                return Ok(ChangeOutcome::Invalid(
                    "ends_at must not be before starts_at".into(),
                ));
            }
            coupon.ends_at = ends_at;
        }
    }
    sqlx::query(
        "UPDATE coupon SET total_stock = $2, starts_at = $3, ends_at = $4,
                           redis_epoch = redis_epoch + 1
         WHERE coupon_id = $1",
    )
    .bind(id.as_str())
    .bind(coupon.total_stock)
    .bind(coupon.starts_at)
    .bind(coupon.ends_at)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO coupon_change (change_id, coupon_id, kind, detail, token_id, after_offset)
         VALUES ($1, $2, $3, $4, $5,
                 (SELECT max(kafka_offset) FROM request_ledger WHERE coupon_id = $2))",
    )
    .bind(change_id)
    .bind(id.as_str())
    .bind(change.kind())
    .bind(&detail)
    .bind(token_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO admin_audit (token_id, action, coupon_id, detail) VALUES ($1, $2, $3, $4)",
    )
    .bind(token_id)
    .bind(change.kind())
    .bind(id.as_str())
    .bind(&detail)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(ChangeOutcome::Applied(coupon))
}

/// Decided requests of the coupon, by status.
pub async fn decided_counts(
    pool: &PgPool,
    id: &CouponId,
) -> Result<Vec<(Status, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT status, count(*) FROM request_ledger WHERE coupon_id = $1 GROUP BY status",
    )
    .bind(id.as_str())
    .fetch_all(pool)
    .await
}

/// Records an admin action.
pub async fn audit(
    pool: &PgPool,
    token_id: &str,
    action: &str,
    coupon: Option<&str>,
    detail: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO admin_audit (token_id, action, coupon_id, detail) VALUES ($1, $2, $3, $4)",
    )
    .bind(token_id)
    .bind(action)
    .bind(coupon)
    .bind(detail)
    .execute(pool)
    .await?;
    Ok(())
}

/// A table `prune` trims, with the column that dates its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prunable {
    /// `request_ledger`, by `decided_at`.
    Ledger,
    /// `request_failure`, by `failed_at`.
    Failures,
    /// `admin_audit`, by `at`.
    Audit,
}

impl Prunable {
    /// One batch: up to `$2` rows dated before the cutoff `$1`, by key (the
    /// ledger's found by its `decided_at` index).
    fn statement(self) -> &'static str {
        match self {
            Self::Ledger => {
                "DELETE FROM request_ledger WHERE request_id IN \
                 (SELECT request_id FROM request_ledger WHERE decided_at < $1 LIMIT $2)"
            }
            Self::Failures => {
                "DELETE FROM request_failure WHERE request_id IN \
                 (SELECT request_id FROM request_failure WHERE failed_at < $1 LIMIT $2)"
            }
            Self::Audit => {
                "DELETE FROM admin_audit WHERE audit_id IN \
                 (SELECT audit_id FROM admin_audit WHERE at < $1 LIMIT $2)"
            }
        }
    }
}

/// Deletes the rows of `table` dated before `before`, `batch` rows per
/// statement, each statement a transaction of its own: the table stays
/// writable throughout and no lock is held longer than one batch. Returns
/// the rows deleted.
pub async fn prune(
    pool: &PgPool,
    table: Prunable,
    before: DateTime<Utc>,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let mut deleted = 0;
    loop {
        let done = sqlx::query(table.statement())
            .bind(before)
            .bind(batch)
            .execute(pool)
            .await?
            .rows_affected();
        deleted += done;
        if done < u64::try_from(batch).unwrap_or(u64::MAX) {
            return Ok(deleted);
        }
    }
}

/// A coupon whose sale is over and whose Redis state may still be there
/// (see `firstcome-worker`'s `retire`).
#[derive(Debug, Clone, FromRow)]
pub struct RetireCandidate {
    /// The coupon.
    pub coupon_id: CouponId,
    /// The epoch whose state may be retired; a newer one is kept.
    pub redis_epoch: i64,
    /// The partition its stored records were read from; `None` when none
    /// was ever stored.
    pub kafka_partition: Option<i32>,
    /// The epoch at which `retire_offset` was read.
    pub retire_epoch: Option<i64>,
    /// The partition's end, read once the sale was over.
    pub retire_offset: Option<i64>,
}

/// Coupons whose window ended more than `over_for` ago and whose state of
/// the current epoch has not been retired, the longest over first.
pub async fn retire_candidates(
    pool: &PgPool,
    over_for: std::time::Duration,
    limit: i64,
) -> Result<Vec<RetireCandidate>, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.coupon_id, c.redis_epoch, c.retire_epoch, c.retire_offset,
                (SELECT l.kafka_partition FROM request_ledger l
                  WHERE l.coupon_id = c.coupon_id LIMIT 1) AS kafka_partition
           FROM coupon c
          WHERE c.ends_at < now() - make_interval(secs => $1)
            AND c.retired_epoch IS DISTINCT FROM c.redis_epoch
          ORDER BY c.ends_at
          LIMIT $2",
    )
    .bind(over_for.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Records the end of the coupon's partition, read at `epoch` once its sale
/// was over; false when the epoch has moved since (look again later).
pub async fn mark_retire_offset(
    pool: &PgPool,
    id: &CouponId,
    epoch: i64,
    offset: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE coupon SET retire_epoch = $2, retire_offset = $3
          WHERE coupon_id = $1 AND redis_epoch = $2",
    )
    .bind(id.as_str())
    .bind(epoch)
    .bind(offset)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records that the coupon's state of `epoch` left Redis.
pub async fn mark_retired(pool: &PgPool, id: &CouponId, epoch: i64) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE coupon SET retired_epoch = $2 WHERE coupon_id = $1 AND redis_epoch = $2",
    )
    .bind(id.as_str())
    .bind(epoch)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Whether the coupon's state of its current epoch was retired.
pub async fn is_retired(pool: &PgPool, id: &CouponId) -> Result<bool, sqlx::Error> {
    let retired: Option<bool> = sqlx::query_scalar(
        "SELECT retired_epoch IS NOT DISTINCT FROM redis_epoch FROM coupon WHERE coupon_id = $1",
    )
    .bind(id.as_str())
    .fetch_optional(pool)
    .await?;
    Ok(retired.unwrap_or(false))
}

/// Columns decoded into domain types: a row is checked once, here, and the
/// layers above never parse its strings again. A value the type refuses is
/// a `sqlx::Error::Decode` (the schema's CHECKs make it a bug).
pub mod columns {
    use sqlx::error::BoxDynError;
    use sqlx::postgres::{PgTypeInfo, PgValueRef, Postgres};
    use sqlx::{Decode, Type};

    use crate::ids::{CouponId, RequestId, UserId};
    use crate::record::Status;

    macro_rules! text_column {
        ($t:ty, $parse:expr) => {
            impl Type<Postgres> for $t {
                fn type_info() -> PgTypeInfo {
                    <String as Type<Postgres>>::type_info()
                }

                fn compatible(ty: &PgTypeInfo) -> bool {
                    <String as Type<Postgres>>::compatible(ty)
                }
            }

            impl<'r> Decode<'r, Postgres> for $t {
                fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                    let s = <String as Decode<'r, Postgres>>::decode(value)?;
                    Ok($parse(s)?)
                }
            }
        };
    }

    text_column!(CouponId, CouponId::parse);
    text_column!(UserId, UserId::parse);
    text_column!(Status, |s: String| s.parse::<Status>());

    impl Type<Postgres> for RequestId {
        fn type_info() -> PgTypeInfo {
            <uuid::Uuid as Type<Postgres>>::type_info()
        }
    }

    impl<'r> Decode<'r, Postgres> for RequestId {
        fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
            Ok(RequestId::from(
                <uuid::Uuid as Decode<'r, Postgres>>::decode(value)?,
            ))
        }
    }
}
