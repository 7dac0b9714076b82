//! Extractors that validate at the edge and reject in the API's error shape:
//! a JSON [`Body`], an [`Admin`] token, and ids in the path ([`Id`]), each
//! parsed once into its domain type, so handlers never see a raw string.

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Path};
use axum::http::request::Parts;
use firstcome::{CouponId, RequestId, UserId};

use crate::error::ApiError;
use crate::services::AppState;

/// A JSON body whose rejections answer in our error shape.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let Json(v) = Json::<T>::from_request(req, state).await?;
        Ok(Body(v))
    }
}

/// Proof that the request carried an admin bearer token, and which one (its
/// id, for the audit table).
pub struct Admin(pub String);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let given = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthorized)?;
        // Every token is compared, whichever matches.
        let mut found = None;
        for (id, token) in &state.admin_tokens {
            if constant_time_eq(given.as_bytes(), token.as_bytes()) {
                found = Some(id.clone());
            }
        }
        found.map(Admin).ok_or(ApiError::Unauthorized)
    }
}

/// Compares `given` with `secret` without an early exit and in a time that
/// depends on the secret's length only, so response time leaks neither how
/// much of a guess was right nor how long the secret is (red team #16).
fn constant_time_eq(given: &[u8], secret: &[u8]) -> bool {
    let lengths = given.len() ^ secret.len();
    let mut diff = lengths.to_le_bytes().iter().fold(0u8, |acc, b| acc | b);
    for (i, s) in secret.iter().enumerate() {
        diff |= given.get(i).copied().unwrap_or(0) ^ s;
    }
    diff == 0
}

/// The TCP peer's address, when the server recorded it.
pub struct Peer(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(Peer(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

/// An id type a path segment holds.
pub trait PathId: Sized + Send {
    /// Parses the segment; the error's text is the `422`'s message.
    fn parse_segment(raw: String) -> Result<Self, String>;
}

impl PathId for CouponId {
    fn parse_segment(raw: String) -> Result<Self, String> {
        CouponId::parse(raw).map_err(|e| e.to_string())
    }
}

impl PathId for UserId {
    fn parse_segment(raw: String) -> Result<Self, String> {
        UserId::parse(raw).map_err(|e| e.to_string())
    }
}

impl PathId for RequestId {
    fn parse_segment(raw: String) -> Result<Self, String> {
        RequestId::parse(&raw).map_err(|e| e.to_string())
    }
}

/// The one id of a route's path, validated: a bad one answers
/// `422 invalid_request` and the handler never runs.
pub struct Id<T>(pub T);

impl<S: Send + Sync, T: PathId> FromRequestParts<S> for Id<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
        T::parse_segment(raw)
            .map(Id)
            .map_err(ApiError::InvalidRequest)
    }
}

/// Turns a validation error into a `422 invalid_request`.
pub fn invalid<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<T, ApiError> {
    r.map_err(|e| ApiError::InvalidRequest(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison_needs_every_byte_and_the_length() {
        assert!(constant_time_eq(b"secret-token", b"secret-token"));
        assert!(!constant_time_eq(b"secret-tokem", b"secret-token"));
        assert!(!constant_time_eq(b"secret", b"secret-token"));
    }
}
