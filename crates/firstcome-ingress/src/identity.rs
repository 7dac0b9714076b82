//! Who asks: the user an issue request is made for, from something the
//! client cannot forge (`FIRSTCOME_IDENTITY`).
//!
//! - `jwt`: `Authorization: Bearer <JWT>`, signed by a key of the JWKS
//!   document at `FIRSTCOME_JWKS_FILE` (re-read when it changes, so keys
//!   rotate without a restart), with `exp` (and `nbf` when present) checked
//!   with [`LEEWAY_SECS`] of leeway, `iss` equal to `FIRSTCOME_JWT_ISSUER`
//!   and `aud` holding `FIRSTCOME_JWT_AUDIENCE`. The user is the claim
//!   `FIRSTCOME_JWT_USER_CLAIM` (`sub` by default), which must be a valid
//!   user id. The algorithm is the key's own (its `alg`, else the one its
//!   type implies), never the token's choice.
//! - `header`: a header set by a trusted gateway that has authenticated the
//!   user (`FIRSTCOME_USER_HEADER`), believed only when the TCP peer is one
//!   of `FIRSTCOME_TRUSTED_PROXIES`.
//! - `body`: the body's `user_id`, as the client writes it. Only for a
//!   trusted network (the local stack's default); the ingress warns at start.
//!
//! In the verified modes a body `user_id`, if sent, must be the verified
//! user's (else `403`), and `GET /v1/users/{id}/coupons` answers only the
//! verified user's own holdings. A missing, forged, expired, not yet valid,
//! wrong-issuer or wrong-audience token is `401` and appends nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderName, header};
use firstcome::UserId;
use ipnet::IpNet;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;

/// How often the JWKS file is looked at for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// Longest token accepted, in bytes (a JWT with a few claims is well under
/// 2 KiB; this bounds the work a forged one can cause).
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// How the user of a request is known.
pub enum Identity {
    /// The body's `user_id`, unverified.
    Body,
    /// A signed token.
    Jwt(Arc<JwtVerifier>),
    /// A header from a trusted gateway.
    Header {
        /// The header's name.
        name: HeaderName,
        /// The peers allowed to set it.
        trusted: Vec<IpNet>,
    },
}

impl Identity {
    /// Whether the user comes from something the client cannot forge.
    pub fn verified(&self) -> bool {
        !matches!(self, Identity::Body)
    }

    /// The user of a request from `peer` with `headers`, whose body named
    /// `claimed` (if it did).
    pub fn user(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
        claimed: Option<String>,
    ) -> Result<UserId, ApiError> {
        let verified = match self {
            Identity::Body => {
                let claimed = claimed
                    .ok_or_else(|| ApiError::InvalidRequest("user_id is required".to_owned()))?;
                return UserId::parse(claimed).map_err(|e| ApiError::InvalidRequest(e.to_string()));
            }
            Identity::Jwt(verifier) => verifier.user(headers)?,
            Identity::Header { name, trusted } => {
                let from_gateway =
                    peer.is_some_and(|p| trusted.iter().any(|n| n.contains(&p.to_canonical())));
                if !from_gateway {
                    return Err(ApiError::Unauthenticated(
                        "the user must be authenticated by the gateway",
                    ));
                }
                let value = headers.get(name).and_then(|v| v.to_str().ok()).ok_or(
                    ApiError::Unauthenticated("the gateway did not name the user"),
                )?;
                UserId::parse(value)
                    .map_err(|_| ApiError::Unauthenticated("the gateway named no valid user id"))?
            }
        };
        if let Some(claimed) = claimed
            && claimed != verified.as_str()
        {
            return Err(ApiError::Forbidden(
                "user_id must be the authenticated user's own",
            ));
        }
        Ok(verified)
    }

    /// Checks that the request from `peer` with `headers` is `user`'s own
    /// (any request is, when identity is not verified).
    pub fn check_own(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
        user: &UserId,
    ) -> Result<(), ApiError> {
        if !self.verified() {
            return Ok(());
        }
        self.user(headers, peer, Some(user.to_string())).map(|_| ())
    }
}

/// One usable key of the JWKS document.
struct Key {
    key: DecodingKey,
    validation: Validation,
}

/// The usable keys of a JWKS document by `kid`.
type Keys = Arc<HashMap<String, Key>>;

/// The settings of [`JwtVerifier`].
pub struct JwtSettings {
    /// The JWKS document.
    pub jwks_file: PathBuf,
    /// The `iss` every token must carry.
    pub issuer: String,
    /// The audience every token must name.
    pub audience: String,
    /// The claim that names the user.
    pub user_claim: String,
}

/// Checks tokens against the keys of a JWKS document, re-read when the file
/// changes.
pub struct JwtVerifier {
    settings: JwtSettings,
    /// The keys by `kid` (a key without one under ""), and the file's
    /// modification time they were read at.
    keys: RwLock<(Keys, Option<SystemTime>)>,
}

impl JwtVerifier {
    /// Reads the keys once; an unreadable document, or one without a usable
    /// key, is an error (the ingress does not start).
    pub fn new(settings: JwtSettings) -> anyhow::Result<Arc<Self>> {
        let verifier = Self {
            settings,
            keys: RwLock::new((Arc::new(HashMap::new()), None)),
        };
        verifier.reload()?;
        Ok(Arc::new(verifier))
    }

    /// Re-reads the document if it changed since the last read; on a bad
    /// document the keys read last stay.
    fn reload(&self) -> anyhow::Result<bool> {
        let path = &self.settings.jwks_file;
        let modified = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .map_err(|e| anyhow::anyhow!("FIRSTCOME_JWKS_FILE {}: {e}", path.display()))?;
        if self.keys.read().expect("lock").1 == Some(modified) {
            return Ok(false);
        }
        let text = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("FIRSTCOME_JWKS_FILE {}: {e}", path.display()))?;
        let set: JwkSet = serde_json::from_slice(&text)
            .map_err(|e| anyhow::anyhow!("FIRSTCOME_JWKS_FILE is not a JWKS document: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            match self.key(jwk) {
                Ok(key) => {
                    keys.insert(jwk.common.key_id.clone().unwrap_or_default(), key);
                }
                Err(e) => tracing::warn!(kid = ?jwk.common.key_id, error = %e, "JWKS key skipped"),
            }
        }
        anyhow::ensure!(!keys.is_empty(), "FIRSTCOME_JWKS_FILE holds no usable key");
        tracing::info!(keys = keys.len(), "JWKS keys loaded");
        *self.keys.write().expect("lock") = (Arc::new(keys), Some(modified));
        Ok(true)
    }

    /// A key and the validation its tokens get.
    fn key(&self, jwk: &Jwk) -> anyhow::Result<Key> {
        let alg = match jwk.common.key_algorithm {
            Some(a) => a
                .to_string()
                .parse::<Algorithm>()
                .map_err(|_| anyhow::anyhow!("algorithm {a} cannot sign"))?,
            None => match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                    EllipticCurve::P384 => Algorithm::ES384,
                    _ => Algorithm::ES256,
                },
                AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
                _ => anyhow::bail!("a key of this type needs its `alg`"),
            },
        };
        let key = DecodingKey::from_jwk(jwk)?;
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        Ok(Key { key, validation })
    }

    /// The user a request's bearer token names.
    fn user(&self, headers: &HeaderMap) -> Result<UserId, ApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthenticated("a bearer token is required"))?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(ApiError::Unauthenticated("the token is too long"));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| ApiError::Unauthenticated("the token is malformed"))?;
        let keys = self.keys.read().expect("lock").0.clone();
        let key = match &header.kid {
            Some(kid) => keys.get(kid),
            None if keys.len() == 1 => keys.values().next(),
            None => None,
        }
        .ok_or(ApiError::Unauthenticated("the token's key is not known"))?;
        let claims = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key.key,
            &key.validation,
        )
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            ApiError::Unauthenticated(match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired",
                ErrorKind::ImmatureSignature => "the token is not valid yet",
                ErrorKind::InvalidAudience => "the token is for another audience",
                ErrorKind::InvalidIssuer => "the token is from another issuer",
                ErrorKind::MissingRequiredClaim(_) => "the token lacks a required claim",
                _ => "the token's signature does not verify",
            })
        })?
        .claims;
        claims
            .get(&self.settings.user_claim)
            .and_then(|v| v.as_str())
            .and_then(|s| UserId::parse(s).ok())
            .ok_or(ApiError::Unauthenticated(
                "the token names no valid user id",
            ))
    }

    /// Re-reads the JWKS file every few seconds until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(RELOAD_EVERY) => {}
                () = shutdown.cancelled() => return,
            }
            if let Err(e) = self.reload() {
                tracing::error!(error = %e, "JWKS not reloaded; the keys read last stay");
            }
        }
    }
}
