//! A per-client rate limit on the API (off by default): a token bucket per
//! client address, refilled at `FIRSTCOME_RATE_LIMIT_PER_SEC` and holding at
//! most `FIRSTCOME_RATE_LIMIT_BURST`; past it the answer is `429
//! rate_limited` with `Retry-After`. The client is the TCP peer, or the first
//! address of `FIRSTCOME_CLIENT_IP_HEADER` (e.g. `x-forwarded-for`) behind a
//! proxy that sets it. Each ingress replica counts on its own.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{ConnectInfo, State};
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Buckets kept before idle ones are dropped.
const MAX_CLIENTS: usize = 100_000;

/// The limiter shared by every request.
pub struct RateLimit {
    per_sec: f64,
    burst: f64,
    header: Option<HeaderName>,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimit {
    /// A limiter, or `None` when `per_sec` is 0 (off).
    pub fn new(per_sec: u32, burst: u32, header: Option<HeaderName>) -> Option<Arc<Self>> {
        (per_sec > 0).then(|| {
            Arc::new(Self {
                per_sec: f64::from(per_sec),
                burst: f64::from(burst.max(1)),
                header,
                buckets: Mutex::new(HashMap::new()),
            })
        })
    }

    /// Takes a token for `client`; `Err(seconds)` until the next one.
    fn take(&self, client: IpAddr, now: Instant) -> Result<(), u32> {
        let mut buckets = self.buckets.lock().expect("lock");
        if buckets.len() >= MAX_CLIENTS && !buckets.contains_key(&client) {
            // Full buckets are the same as no bucket: drop those.
            let (per_sec, burst) = (self.per_sec, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * per_sec < burst
            });
        }
        let (tokens, at) = buckets.entry(client).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.per_sec).ceil().max(1.0) as u32)
        }
    }

    fn client(&self, request: &axum::extract::Request) -> Option<IpAddr> {
        if let Some(name) = &self.header {
            return request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.trim().parse().ok());
        }
        request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
    }
}

/// The middleware.
pub async fn limit(
    State(limit): State<Arc<RateLimit>>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    // No address (a proxy that did not set the header) is one client.
    let client = limit.client(&request).unwrap_or(IpAddr::from([0, 0, 0, 0]));
    match limit.take(client, Instant::now()) {
        Ok(()) => next.run(request).await,
        Err(retry_after_secs) => ApiError::RateLimited { retry_after_secs }.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let limit = RateLimit::new(2, 3, None).expect("on");
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limit.take(a, t0), Ok(()));
        }
        assert_eq!(limit.take(a, t0), Err(1));
        assert_eq!(limit.take(b, t0), Ok(()), "clients are counted apart");
        // Half a second refills one token at 2/s.
        assert_eq!(limit.take(a, t0 + Duration::from_millis(500)), Ok(()));
        assert_eq!(limit.take(a, t0 + Duration::from_millis(500)), Err(1));
        assert!(RateLimit::new(0, 10, None).is_none(), "0 is off");
    }
}
