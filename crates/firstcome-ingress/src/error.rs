//! The one error type of the HTTP API. Every failure answers
//! `{"error":{"code":"<snake_case>","message":"<human text>"}}`; internal
//! detail is logged once here and never sent to the client.

use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use firstcome::RequestId;
use serde_json::json;

/// What went wrong, by what the client should do about it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401: the admin token is missing or wrong.
    #[error("a valid admin bearer token is required")]
    Unauthorized,
    /// 401: the user's identity is missing or could not be verified (the
    /// reason is said, never which key or claim value was expected).
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// 403: the verified user may not do this (act for another user).
    #[error("{0}")]
    Forbidden(&'static str),
    /// 422: the request is malformed; nothing was changed.
    #[error("{0}")]
    InvalidRequest(String),
    /// 422: the `Idempotency-Key` was used for a different request.
    #[error("this Idempotency-Key was used for a different request")]
    IdempotencyKeyReused,
    /// 409: a coupon with this id exists already.
    #[error("coupon {0} already exists")]
    CouponExists(String),
    /// 404: no such coupon.
    #[error("coupon {0} does not exist")]
    CouponNotFound(String),
    /// 409: the coupon is sold out; nothing was appended.
    #[error("coupon {0} is sold out")]
    SoldOut(String),
    /// 409: the coupon's window is closed now; nothing was appended.
    #[error("coupon {0} is not open now")]
    NotOpen(String),
    /// 404: no such issue request.
    #[error("issue request {0} does not exist")]
    RequestNotFound(String),
    /// 404: no such route.
    #[error("no such endpoint")]
    NotFound,
    /// 405: the route exists, the method does not.
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    /// 413: the body is over the configured limit.
    #[error("request body too large")]
    PayloadTooLarge,
    /// 415: the body is not declared `application/json`.
    #[error("expected a body with Content-Type: application/json")]
    UnsupportedMediaType,
    /// 429: this client is over its rate limit; nothing was done.
    #[error("too many requests from this client, retry later")]
    RateLimited {
        /// Seconds for `Retry-After`.
        retry_after_secs: u32,
    },
    /// 503: too many requests in flight; answered at once, nothing was done.
    #[error("the service is overloaded, retry later")]
    Overloaded,
    /// 503: a dependency did not answer in time; retry after the given seconds.
    #[error("the service is temporarily unavailable, retry later")]
    Unavailable {
        /// Seconds for `Retry-After`.
        retry_after_secs: u32,
        /// What failed, for the log only.
        cause: String,
        /// The request that may or may not have been written.
        request_id: Option<RequestId>,
    },
    /// 500: a bug or an unexpected failure; logged, answered opaquely.
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized | ApiError::Unauthenticated(_) => {
                (StatusCode::UNAUTHORIZED, "unauthorized")
            }
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::InvalidRequest(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            ApiError::IdempotencyKeyReused => {
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
            }
            ApiError::CouponExists(_) => (StatusCode::CONFLICT, "coupon_exists"),
            ApiError::CouponNotFound(_) => (StatusCode::NOT_FOUND, "coupon_not_found"),
            ApiError::SoldOut(_) => (StatusCode::CONFLICT, "sold_out"),
            ApiError::NotOpen(_) => (StatusCode::CONFLICT, "not_open"),
            ApiError::RequestNotFound(_) => (StatusCode::NOT_FOUND, "request_not_found"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// A 503 whose cause goes to the log.
    pub fn unavailable(cause: impl std::fmt::Display) -> Self {
        ApiError::Unavailable {
            retry_after_secs: 1,
            cause: cause.to_string(),
            request_id: None,
        }
    }

    /// A 503 for an issue request the broker did not acknowledge in time; it
    /// may still have been appended, so the answer names it.
    pub fn not_acknowledged(request_id: RequestId, cause: impl std::fmt::Display) -> Self {
        ApiError::Unavailable {
            retry_after_secs: 1,
            cause: cause.to_string(),
            request_id: Some(request_id),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                ApiError::from_postgres(&e)
            }
            other => ApiError::Internal(anyhow::Error::new(other).context("postgres query")),
        }
    }
}

impl ApiError {
    /// The error of a Postgres query whose failure several requests share.
    pub(crate) fn from_postgres(e: &sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                ApiError::unavailable(format!("postgres: {e}"))
            }
            other => ApiError::Internal(anyhow::anyhow!("postgres query: {other}")),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType,
            _ => ApiError::InvalidRequest(r.body_text()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        match &self {
            ApiError::Internal(e) => tracing::error!(error = ?e, "request failed"),
            ApiError::Unavailable { cause, .. } => tracing::warn!(%cause, "answering 503"),
            _ => {}
        }
        let mut body = json!({ "error": { "code": code, "message": self.to_string() } });
        if let ApiError::Unavailable {
            request_id: Some(id),
            ..
        } = &self
        {
            body["error"]["message"] = json!(
                "the request was not confirmed in time and may still be decided: \
                 check status_url before sending it again"
            );
            body["request_id"] = json!(id);
            body["status_url"] = json!(format!("/v1/issue-requests/{id}"));
        }
        let mut response = (status, axum::Json(body)).into_response();
        let unauthenticated = matches!(self, ApiError::Unauthenticated(_));
        let retry_after = match self {
            ApiError::Unavailable {
                retry_after_secs, ..
            } => Some(retry_after_secs),
            ApiError::Overloaded => Some(1),
            ApiError::RateLimited { retry_after_secs } => Some(retry_after_secs),
            _ => None,
        };
        if unauthenticated {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Every error answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
    /// On a `503 unavailable` for an issue request: the request that may or
    /// may not have been appended.
    #[schema(format = Uuid)]
    pub request_id: Option<String>,
    /// With `request_id`: where its status can be read.
    pub status_url: Option<String>,
}

/// The machine-readable code and a human-readable message.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable; clients branch on it.
    pub code: ErrorCode,
    /// For people; may change.
    pub message: String,
}

/// Every error code the API answers.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 401: admin token missing or wrong, or the user's identity missing or
    /// not verified.
    Unauthorized,
    /// 403: the verified user may not act for this user.
    Forbidden,
    /// 422: malformed input; nothing changed.
    InvalidRequest,
    /// 422: the `Idempotency-Key` was used for another request.
    IdempotencyKeyReused,
    /// 409: the coupon id is taken.
    CouponExists,
    /// 404: no such coupon.
    CouponNotFound,
    /// 409: the coupon is sold out; nothing was appended.
    SoldOut,
    /// 409: outside the coupon's window; nothing was appended.
    NotOpen,
    /// 404: no such issue request.
    RequestNotFound,
    /// 404: no such endpoint.
    NotFound,
    /// 405: no such method on this endpoint.
    MethodNotAllowed,
    /// 413: body over the limit.
    PayloadTooLarge,
    /// 415: body not declared `application/json`.
    UnsupportedMediaType,
    /// 503: too many requests in flight; nothing was done.
    Overloaded,
    /// 429: over the per-client rate limit; nothing was done.
    RateLimited,
    /// 503: a dependency did not answer in time.
    Unavailable,
    /// 500: a bug; logged.
    Internal,
}
