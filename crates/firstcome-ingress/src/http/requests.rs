//! `GET /v1/issue-requests/{request_id}`: where a request stands, from the
//! status cache, else the ledger; with `?wait_ms=N` a long poll woken by the
//! worker's decisions ([`crate::waiters`]).

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use firstcome::db;
use firstcome::state::Line;
use firstcome::status::RequestStatus;
use firstcome::{RequestId, Status};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::http::extract::Id;
use crate::services::AppState;

/// The routes of this resource.
pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/issue-requests/{request_id}", get(get_request))
}

/// `?wait_ms=N`: hold the lookup until the request is final or `N` ms pass.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Milliseconds to wait for a final status (at most the configured
    /// maximum, 10,000 by default); absent or 0 answers at once.
    #[param(minimum = 0, maximum = 10_000)]
    wait_ms: Option<u64>,
    /// With `wait_ms`: also answer, still pending, as soon as the request's
    /// `line.ahead_at_most` has fallen by this much since the call.
    #[param(minimum = 1, maximum = 1_000_000_000)]
    step: Option<i64>,
}

#[utoipa::path(
    get, path = "/v1/issue-requests/{request_id}", tag = "issue",
    params(("request_id" = String, Path, format = Uuid), WaitQuery),
    responses(
        (status = 200, description = "Where the request stands", body = RequestStatusView),
        (status = 404, description = "`request_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_request`", body = ErrorBody),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = ErrorBody),
        (status = 503, description = "`unavailable` or `overloaded`, with `Retry-After`", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(request_id = %id))]
pub(crate) async fn get_request(
    State(state): State<AppState>,
    Id(id): Id<RequestId>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<Answer>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let max = state.cfg.max_wait.as_millis();
    let wait = match query.wait_ms {
        Some(ms) if u128::from(ms) > max => {
            return Err(ApiError::InvalidRequest(format!(
                "wait_ms must be at most {max}"
            )));
        }
        Some(ms) if ms > 0 => Some(Duration::from_millis(ms)),
        _ => None,
    };
    let step = match query.step {
        Some(n) if !(1..=1_000_000_000).contains(&n) => {
            return Err(ApiError::InvalidRequest(
                "step must be 1 to 1000000000".into(),
            ));
        }
        Some(_) if wait.is_none() => {
            return Err(ApiError::InvalidRequest("step needs wait_ms".into()));
        }
        step => step,
    };
    let Some(wait) = wait else {
        let status = lookup(&state, id).await?;
        return Ok(Json(answer(&state, status).await.0));
    };
    // Registered before the first look, so a decision in between wakes it.
    let mut waiter = state.waiters.register(id);
    match lookup(&state, id).await {
        Ok(s) if s.status != Status::Pending => return Ok(Json(answer(&state, s).await.0)),
        Ok(s) => {
            // Also woken once the coupon's decisions have come `step`
            // records further: the place has fallen by `step` at least.
            let coupon = s.coupon_id.clone();
            if let (Some(step), (_, Some(line))) = (step, answer(&state, s).await) {
                waiter = waiter.until_progress(coupon, line.decided_offset.saturating_add(step));
            }
        }
        // Not (yet) known: a request whose 503 hid a write, or whose
        // pending entry was skipped, may still be decided.
        Err(ApiError::RequestNotFound(_)) => {}
        Err(e) => return Err(e),
    }
    waiter.wait(wait).await;
    let status = lookup(&state, id).await?;
    Ok(Json(answer(&state, status).await.0))
}

/// What a lookup answers: the status, and a pending request's place in
/// line.
#[derive(Debug, Serialize)]
pub(crate) struct Answer {
    #[serde(flatten)]
    status: RequestStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<LineView>,
}

/// A pending request's place in line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LineView {
    /// At most this many of the coupon's requests are ahead of this one and
    /// not decided yet: every record between the coupon's last decision and
    /// this request in its partition counts, the coupon's or not (exact when
    /// the coupon has its partition to itself). Never rises for one request.
    pub ahead_at_most: i64,
    /// Units of the coupon left, as last decided. While
    /// `remaining_stock > ahead_at_most`, a unit is left for this request.
    pub remaining_stock: i64,
}

/// The answer of `status`: the cache's offset is dropped, and a pending
/// request whose offset and coupon progress are known gets its place (one
/// round trip to the coupon's Redis slot; without Redis, none). Also the
/// coupon's progress the place was counted from.
async fn answer(state: &AppState, mut status: RequestStatus) -> (Answer, Option<Line>) {
    let offset = status.log_offset.take();
    let line = match (status.status, offset) {
        (Status::Pending, Some(offset)) => match state.states.line(&status.coupon_id).await {
            Ok(line) => line.map(|l| (l, offset)),
            Err(e) => {
                tracing::warn!(error = %e, "place in line unavailable");
                None
            }
        },
        _ => None,
    };
    let view = line.map(|(l, offset)| LineView {
        ahead_at_most: l.ahead_of(offset),
        remaining_stock: l.remaining_stock,
    });
    (Answer { status, line: view }, line.map(|(l, _)| l))
}

/// A request's status: the cache, else the ledger. A cached `pending`
/// older than `FIRSTCOME_PENDING_RECHECK` is checked against the ledger
/// too: a Redis rolled back after the decision keeps the `pending` and has
/// lost the final status, which nothing else writes again (red team #3).
async fn lookup(state: &AppState, id: RequestId) -> Result<RequestStatus, ApiError> {
    let cached = match state.statuses.get(id).await {
        Ok(cached) => cached,
        Err(e) => {
            tracing::warn!(error = %e, "redis status unavailable, reading the ledger");
            None
        }
    };
    let Some(cached) = cached else {
        return from_ledger(state, id)
            .await?
            .ok_or_else(|| ApiError::RequestNotFound(id.to_string()));
    };
    let trusted = state.cfg.pending_recheck;
    let age = (Utc::now() - cached.accepted_at)
        .to_std()
        .unwrap_or_default();
    if cached.status != Status::Pending || age < trusted {
        return Ok(cached);
    }
    match from_ledger(state, id).await {
        Ok(Some(decided)) => {
            tracing::warn!(status = %decided.status.as_str(), "a pending status outlived its decision; the ledger answers");
            if let Err(e) = state
                .statuses
                .put_final(std::slice::from_ref(&decided))
                .await
            {
                tracing::warn!(error = %e, "the ledger's decision was not put back in the cache");
            }
            Ok(decided)
        }
        Ok(None) => Ok(cached),
        // The cache's word stands while Postgres cannot be asked.
        Err(e) => {
            tracing::warn!(error = %e, "ledger unavailable, answering the cached pending");
            Ok(cached)
        }
    }
}

/// A request's decision as Postgres holds it: its ledger row, else the
/// `failed` record kept when even that row was refused; `None` if neither.
async fn from_ledger(state: &AppState, id: RequestId) -> Result<Option<RequestStatus>, ApiError> {
    let Some(row) = db::ledger_row(&state.pool, id).await? else {
        let Some((failed_at, r)) = db::failure(&state.pool, id).await? else {
            return Ok(None);
        };
        return Ok(Some(RequestStatus {
            status: Status::Failed,
            decided_at: Some(failed_at),
            ..RequestStatus::pending(&r)
        }));
    };
    Ok(Some(RequestStatus {
        request_id: row.request_id,
        coupon_id: row.coupon_id,
        user_id: row.user_id,
        status: row.status,
        accepted_at: row.accepted_at,
        decided_at: Some(row.decided_at),
        log_offset: None,
    }))
}

/// A status lookup.
#[derive(Serialize, ToSchema)]
#[schema(as = RequestStatus)]
pub struct RequestStatusView {
    /// The id the 202 answer gave.
    #[schema(format = Uuid)]
    pub request_id: String,
    /// The coupon asked for.
    pub coupon_id: String,
    /// The user who asked.
    pub user_id: String,
    /// Where it stands: `pending` until the worker decides it, then final.
    pub status: firstcome::Status,
    /// When the ingress accepted it.
    pub accepted_at: DateTime<Utc>,
    /// When the worker decided it; null while pending.
    pub decided_at: Option<DateTime<Utc>>,
    /// While pending, once the worker has decided a request of the coupon:
    /// where this one stands.
    #[schema(nullable = false)]
    pub line: Option<LineView>,
}
