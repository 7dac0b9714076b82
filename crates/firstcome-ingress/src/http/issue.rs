//! `POST /v1/coupons/{coupon_id}/issue`: the request for a coupon. The rule
//! itself is [`crate::issue`]; this handler adds `Idempotency-Key` around it
//! and answers `202` once the record is in the log.

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use firstcome::redis_conn::RedisConn;
use firstcome::{CouponId, IssueRequest, RequestId, Status, UserId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::http::extract::{Body, Id, Peer};
use crate::issue::idempotency::{self, Prior};
use crate::services::AppState;

/// The routes of this resource.
pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/coupons/{coupon_id}/issue", post(issue))
}

/// The body of an issue request: the user who asks, nothing else (the
/// coupon is in the path, the time is the ingress's).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct IssueBody {
    /// Required with `FIRSTCOME_IDENTITY=body`; with a verified identity
    /// (a bearer JWT, a gateway's header) optional, and if sent it must be
    /// the verified user's.
    #[schema(pattern = r"^[A-Za-z0-9_-]{1,64}$", example = "alice")]
    user_id: Option<String>,
}

/// The `202` answer: the request is in the log.
#[derive(Serialize, ToSchema)]
pub struct AcceptedView {
    #[schema(value_type = String, format = Uuid)]
    request_id: RequestId,
    /// Always `pending`.
    #[schema(value_type = String, example = "pending")]
    status: Status,
    /// Where to follow it.
    #[schema(example = "/v1/issue-requests/0193c6a0-0000-7000-8000-000000000000")]
    status_url: String,
}

#[utoipa::path(
    post, path = "/v1/coupons/{coupon_id}/issue", tag = "issue",
    params(
        ("coupon_id" = String, Path, pattern = r"^[A-Za-z0-9_-]{1,64}$"),
        ("Idempotency-Key" = Option<String>, Header, pattern = r"^[!-~]{1,128}$",
         description = "1-128 visible ASCII characters; a retry with the same key and user gets the same request back"),
    ),
    request_body = IssueBody,
    responses(
        (status = 202, description = "In the log; it will be decided", body = AcceptedView),
        (status = 401, description = "`unauthorized`: the user's token (or gateway header) is missing or does not verify; nothing appended", body = ErrorBody),
        (status = 403, description = "`forbidden`: the body's `user_id` is not the verified user's; nothing appended", body = ErrorBody),
        (status = 404, description = "`coupon_not_found`", body = ErrorBody),
        (status = 409, description = "`sold_out` or `not_open`, answered at once; nothing appended", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_request` or `idempotency_key_reused`; nothing appended", body = ErrorBody),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = ErrorBody),
        (status = 503, description = "`unavailable` (names the request, which may still be decided) or `overloaded`, with `Retry-After`", body = ErrorBody),
    )
)]
#[tracing::instrument(skip(state, body), fields(coupon_id = %coupon_id, request_id))]
pub(crate) async fn issue(
    State(state): State<AppState>,
    Id(coupon_id): Id<CouponId>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Body(body): Body<IssueBody>,
) -> Result<Response, ApiError> {
    let user_id: UserId = state.identity.user(&headers, peer, body.user_id)?;
    let slot = idempotency::key(&headers)?.map(|key| {
        let ttl = state.cfg.idempotency_ttl;
        idempotency::Slot::new(&state.keys, &coupon_id, &key, ttl)
    });
    let mut redis = state.redis.clone();
    let prior = match &slot {
        Some(slot) => slot.prior(&mut redis, &coupon_id, &user_id).await?,
        None => Prior::None,
    };
    let request = match prior {
        Prior::Confirmed(id) => return Ok(accepted(id)),
        Prior::Refused(refusal) => return Err(refusal.error(&coupon_id)),
        Prior::Unconfirmed(request) => request,
        Prior::Stale(request) => match in_the_log(&state, &request).await? {
            true => {
                if let Some(slot) = &slot {
                    slot.confirm(&mut redis, &request).await;
                }
                return Ok(accepted(request.request_id));
            }
            // Never seen: admitted afresh (window, stock), as the same id.
            false => IssueRequest {
                request_id: request.request_id,
                ..state
                    .issue
                    .admit(coupon_id.clone(), user_id.clone())
                    .await?
            },
        },
        Prior::None => {
            let admitted = state.issue.admit(coupon_id.clone(), user_id.clone()).await;
            let Some(slot) = &slot else {
                return append_and_answer(&state, admitted?, None, &mut redis).await;
            };
            // The first attempt to claim the key fixes its answer (see
            // `idempotency`); an answer that may change (503) fixes nothing.
            let outcome = match &admitted {
                Ok(request) => idempotency::Outcome::Admitted(request),
                Err(e) => match idempotency::Refusal::of(e) {
                    Some(refusal) => idempotency::Outcome::Refused(refusal),
                    None => return Err(admitted.expect_err("matched an error")),
                },
            };
            if slot.claim(&mut redis, &user_id, outcome).await? {
                admitted?
            } else {
                match slot.prior(&mut redis, &coupon_id, &user_id).await? {
                    Prior::Confirmed(id) => return Ok(accepted(id)),
                    Prior::Refused(refusal) => return Err(refusal.error(&coupon_id)),
                    Prior::Unconfirmed(first) | Prior::Stale(first) => first,
                    // Claimed and expired in between: as if alone.
                    Prior::None => admitted?,
                }
            }
        }
    };
    append_and_answer(&state, request, slot.as_ref(), &mut redis).await
}

/// Whether an unconfirmed request of long ago is known to have reached the
/// log: it has a status, or a ledger row (or a `failed` record).
async fn in_the_log(state: &AppState, request: &IssueRequest) -> Result<bool, ApiError> {
    let id = request.request_id;
    if let Ok(Some(_)) = state.statuses.get(id).await {
        return Ok(true);
    }
    Ok(firstcome::db::ledger_row(&state.pool, id).await?.is_some()
        || firstcome::db::failure(&state.pool, id).await?.is_some())
}

/// Appends an admitted request, marks its key confirmed, and answers `202`.
async fn append_and_answer(
    state: &AppState,
    request: IssueRequest,
    slot: Option<&idempotency::Slot>,
    redis: &mut RedisConn,
) -> Result<Response, ApiError> {
    tracing::Span::current().record("request_id", tracing::field::display(request.request_id));
    state.issue.append(&request).await?;
    if let Some(slot) = slot {
        slot.confirm(redis, &request).await;
    }
    Ok(accepted(request.request_id))
}

/// The `202` answer: an [`AcceptedView`], written by hand because every
/// accepted request pays for it (serializing the view and formatting its
/// URL took 4,000 instructions; this takes a tenth). The test below holds
/// it to the view's serialization.
fn accepted(id: RequestId) -> Response {
    (
        StatusCode::ACCEPTED,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        accepted_body(id),
    )
        .into_response()
}

/// The length of every `202` answer (ids have one length).
const ACCEPTED_LEN: usize = 143;

/// The JSON of the `202` answer of `id`.
fn accepted_body(id: RequestId) -> String {
    let mut buf = [0; 36];
    let id = id.encode(&mut buf);
    let mut body = String::with_capacity(ACCEPTED_LEN);
    for part in [
        r#"{"request_id":""#,
        id,
        r#"","status":"pending","status_url":"/v1/issue-requests/"#,
        id,
        r#""}"#,
    ] {
        body.push_str(part);
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accepted_answer_is_the_views_serialization() {
        for _ in 0..1_000 {
            let id = RequestId::new();
            let view = AcceptedView {
                request_id: id,
                status: Status::Pending,
                status_url: format!("/v1/issue-requests/{id}"),
            };
            let body = accepted_body(id);
            assert_eq!(body, serde_json::to_string(&view).unwrap());
            assert_eq!(body.len(), ACCEPTED_LEN);
        }
    }
}
