//! A per-client rate limit on the API (off by default): GCRA (governor's
//! token bucket) per client address, refilled at
//! `FIRSTCOME_RATE_LIMIT_PER_SEC` and holding at most
//! `FIRSTCOME_RATE_LIMIT_BURST`; past it the answer is `429 rate_limited`
//! with `Retry-After`. Each ingress replica counts on its own.
//!
//! **Who the client is.** The TCP peer, unless the peer is one of
//! `FIRSTCOME_TRUSTED_PROXIES` and `FIRSTCOME_CLIENT_IP_HEADER` is set: then
//! the header's hops are read from the right (the hop the nearest proxy
//! saw) and the first one that is not a trusted proxy is the client. The
//! left of the header is whatever the client wrote, so it never decides:
//! a client cannot name itself someone else by sending the header.
//!
//! A hop may carry a port (`203.0.113.9:4711`, `[2001:db8::1]:443`, as some
//! load balancers write it), and with `FIRSTCOME_CLIENT_IP_HEADER=forwarded`
//! the hops are RFC 7239's `for=` parameters; IPv4 peers of a dual-stack
//! listener (`::ffff:a.b.c.d`) are their IPv4 address. Any of those read as
//! garbage would have made the proxy the client: one bucket for everyone.
//!
//! **An IPv6 client is its /64** (`FIRSTCOME_RATE_LIMIT_IPV6_PREFIX`): one
//! subscriber gets a whole /64 and can rotate through 2^64 addresses, each a
//! fresh bucket with a full burst, and enough of them flush every other
//! client's bucket from the LRU.
//!
//! **Bounded.** Clients live in an LRU of `FIRSTCOME_RATE_LIMIT_CLIENTS`
//! entries: each request costs O(1), and past the bound the client seen
//! longest ago is forgotten (it starts again with a full burst). A million
//! addresses cost no more memory than the bound.

use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::HeaderName;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::{Quota, RateLimiter};
use ipnet::IpNet;

use crate::error::ApiError;

/// Each client's GCRA state (its theoretical arrival time), the least
/// recently seen evicted first.
pub struct Clients {
    lru: Mutex<lru::LruCache<IpAddr, Nanos>>,
}

impl Clients {
    fn new(capacity: NonZeroUsize) -> Self {
        Self {
            lru: Mutex::new(lru::LruCache::new(capacity)),
        }
    }
}

impl ShrinkableKeyedStateStore<IpAddr> for Clients {
    /// Not needed for the bound (the LRU keeps it), but part of the trait.
    fn retain_recent(&self, drop_below: Nanos) {
        let mut lru = self.lru.lock().expect("lock");
        let stale: Vec<IpAddr> = lru
            .iter()
            .filter(|(_, at)| **at < drop_below)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in stale {
            lru.pop(&ip);
        }
    }

    fn len(&self) -> usize {
        self.lru.lock().expect("lock").len()
    }

    fn is_empty(&self) -> bool {
        self.lru.lock().expect("lock").is_empty()
    }
}

impl StateStore for Clients {
    type Key = IpAddr;

    fn measure_and_replace<T, F, E>(&self, key: &IpAddr, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // One lock for read and write, so the update is atomic.
        let mut lru = self.lru.lock().expect("lock");
        let (answer, state) = f(lru.get(key).copied())?;
        lru.put(*key, state);
        Ok(answer)
    }
}

/// Where the client's address comes from.
struct Source {
    header: Option<HeaderName>,
    trusted: Vec<IpNet>,
}

/// A hop of a forwarding header as an address: bare, with a port, in
/// brackets, or as an RFC 7239 element (`for=...;proto=...`); v4-mapped
/// IPv6 as IPv4. `None` for anything else (`unknown`, obfuscated ids,
/// garbage).
fn hop_address(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    let hop = match hop
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("for=").or_else(|| p.strip_prefix("For=")))
    {
        Some(value) => value.trim_matches('"'),
        None if hop.contains('=') => return None,
        None => hop,
    };
    let ip = hop
        .parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse().ok())
        })?;
    Some(ip.to_canonical())
}

impl Source {
    fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client of a request that came from `peer` with `forwarded`
    /// (the header's values, in order).
    fn client<'a>(&self, peer: IpAddr, forwarded: impl Iterator<Item = &'a str>) -> IpAddr {
        let peer = peer.to_canonical();
        if self.header.is_none() || !self.trusts(peer) {
            return peer;
        }
        let hops: Vec<&str> = forwarded
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop_address(hop) {
                // A trusted proxy passed it on: look one hop further.
                Some(ip) if self.trusts(ip) => client = ip,
                Some(ip) => return ip,
                // Garbage where an address should be: the proxy that wrote
                // it last is as far as anyone can tell.
                None => return client,
            }
        }
        client
    }
}

/// The limiter shared by every request.
pub struct RateLimit<C: Clock = DefaultClock> {
    limiter: RateLimiter<IpAddr, Clients, C, NoOpMiddleware<C::Instant>>,
    source: Source,
    /// The prefix length an IPv6 client is counted by.
    ipv6_prefix: u8,
}

/// The settings of a limiter.
pub struct Settings {
    /// Requests per second per client; 0 is off.
    pub per_sec: u32,
    /// Requests a client may send at once.
    pub burst: u32,
    /// Clients remembered at most.
    pub clients: usize,
    /// The header proxies name the client in, if any.
    pub header: Option<HeaderName>,
    /// The proxies whose header is believed.
    pub trusted: Vec<IpNet>,
    /// The prefix length an IPv6 client is counted by (64: a subscriber's
    /// whole /64 is one client).
    pub ipv6_prefix: u8,
}

impl RateLimit {
    /// A limiter on the real clock, or `None` when it is off.
    pub fn new(settings: Settings) -> Option<Self> {
        Self::with_clock(settings, DefaultClock::default())
    }
}

impl<C: Clock> RateLimit<C> {
    /// A limiter on `clock`, or `None` when `per_sec` is 0 (off).
    fn with_clock(settings: Settings, clock: C) -> Option<Self> {
        let per_sec = NonZeroU32::new(settings.per_sec)?;
        let burst = NonZeroU32::new(settings.burst).unwrap_or(NonZeroU32::MIN);
        let capacity = NonZeroUsize::new(settings.clients).unwrap_or(NonZeroUsize::MIN);
        Some(Self {
            limiter: RateLimiter::new(
                Quota::per_second(per_sec).allow_burst(burst),
                Clients::new(capacity),
                clock,
            ),
            source: Source {
                header: settings.header,
                trusted: settings.trusted,
            },
            ipv6_prefix: settings.ipv6_prefix.min(128),
        })
    }

    /// The bucket of `client`: itself for IPv4, its prefix for IPv6.
    fn bucket(&self, client: IpAddr) -> IpAddr {
        match client.to_canonical() {
            IpAddr::V6(v6) => {
                let net = ipnet::Ipv6Net::new(v6, self.ipv6_prefix).expect("a prefix of 0-128");
                IpAddr::V6(net.network())
            }
            v4 => v4,
        }
    }

    /// Takes a token for `client`; `Err(seconds)` until the next one.
    fn take(&self, client: IpAddr) -> Result<(), u32> {
        let client = self.bucket(client);
        self.limiter.check_key(&client).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.limiter.clock().now());
            wait.max(Duration::from_secs(1)).as_secs_f64().ceil() as u32
        })
    }

    fn client(&self, request: &axum::extract::Request) -> IpAddr {
        // No peer (only in tests that serve without connect info): one client.
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
        let forwarded = self.source.header.as_ref().into_iter().flat_map(|name| {
            request
                .headers()
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
        });
        self.source.client(peer, forwarded)
    }

    /// Takes a token for the request's client, or refuses it with `429
    /// rate_limited` and `Retry-After`.
    pub fn check(&self, request: &axum::extract::Request) -> Result<(), ApiError> {
        self.take(self.client(request))
            .map_err(|retry_after_secs| ApiError::RateLimited { retry_after_secs })
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn settings(per_sec: u32, burst: u32, clients: usize) -> Settings {
        Settings {
            per_sec,
            burst,
            clients,
            header: None,
            trusted: Vec::new(),
            ipv6_prefix: 64,
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let clock = FakeRelativeClock::default();
        let limit = RateLimit::with_clock(settings(2, 3, 100), clock.clone()).expect("on");
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        for _ in 0..3 {
            assert_eq!(limit.take(a), Ok(()));
        }
        assert_eq!(limit.take(a), Err(1));
        assert_eq!(limit.take(b), Ok(()), "clients are counted apart");
        // Half a second refills one token at 2/s.
        clock.advance(Duration::from_millis(500));
        assert_eq!(limit.take(a), Ok(()));
        assert_eq!(limit.take(a), Err(1));
        assert!(RateLimit::new(settings(0, 10, 100)).is_none(), "0 is off");
    }

    #[test]
    fn a_million_distinct_clients_stay_within_the_bound() {
        let clock = FakeRelativeClock::default();
        let limit = RateLimit::with_clock(settings(1, 2, 10_000), clock.clone()).expect("on");
        let regular = IpAddr::from([192, 0, 2, 1]);
        assert_eq!(limit.take(regular), Ok(()));
        for i in 0..1_000_000u32 {
            // One /64 each: an IPv6 client is counted by its /64.
            let fake = IpAddr::from(((u128::from(i) << 64) + (1 << 120)).to_be_bytes());
            assert_eq!(limit.take(fake), Ok(()), "a new client has its burst");
            assert!(limit.limiter.len() <= 10_000);
        }
        assert_eq!(limit.limiter.len(), 10_000);
        // The regular client, seen a million clients ago, was forgotten:
        // it starts again with a full burst rather than being refused.
        assert_eq!((limit.take(regular), limit.take(regular)), (Ok(()), Ok(())));
        assert_eq!(limit.take(regular), Err(1));
    }

    #[test]
    fn the_client_is_the_rightmost_hop_no_trusted_proxy_vouches_for() {
        let source = Source {
            header: Some(HeaderName::from_static("x-forwarded-for")),
            trusted: vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let proxy = ip("10.0.0.7");
        let client = |peer, hops: &[&str]| source.client(peer, hops.iter().copied());
        // What the client wrote on the left never counts.
        assert_eq!(client(proxy, &["6.6.6.6, 203.0.113.9"]), ip("203.0.113.9"));
        assert_eq!(
            client(proxy, &["6.6.6.6", "203.0.113.9, 10.1.2.3"]),
            ip("203.0.113.9"),
            "headers in order, trusted hops skipped"
        );
        // A peer that is not a trusted proxy is the client, header or not.
        assert_eq!(
            client(ip("198.51.100.4"), &["10.0.0.1"]),
            ip("198.51.100.4")
        );
        // Only trusted hops: the furthest one; no header: the proxy.
        assert_eq!(client(proxy, &["10.9.9.9, 10.8.8.8"]), ip("10.9.9.9"));
        assert_eq!(client(proxy, &[]), proxy);
        // Garbage stops the walk at the last proxy that vouched.
        assert_eq!(
            client(proxy, &["203.0.113.9, junk, 10.1.2.3"]),
            ip("10.1.2.3")
        );
        assert_eq!(client(ip("::1"), &["2001:db8::5"]), ip("2001:db8::5"));
    }

    #[test]
    fn hops_with_ports_forwarded_elements_and_v4_mapped_peers_name_the_client() {
        let source = Source {
            header: Some(HeaderName::from_static("x-forwarded-for")),
            trusted: vec!["10.0.0.0/8".parse().unwrap()],
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let proxy = ip("10.0.0.7");
        let client = |peer, hops: &[&str]| source.client(peer, hops.iter().copied());
        assert_eq!(client(proxy, &["203.0.113.9:4711"]), ip("203.0.113.9"));
        assert_eq!(client(proxy, &["[2001:db8::1]:443"]), ip("2001:db8::1"));
        assert_eq!(client(proxy, &["[2001:db8::1]"]), ip("2001:db8::1"));
        assert_eq!(
            client(
                proxy,
                &[r#"for="[2001:db8::17]:4711";proto=https, for=10.1.1.1"#]
            ),
            ip("2001:db8::17")
        );
        assert_eq!(
            client(proxy, &["for=198.51.100.3;by=10.0.0.7"]),
            ip("198.51.100.3")
        );
        assert_eq!(
            client(proxy, &["for=_hidden, 10.2.2.2"]),
            ip("10.2.2.2"),
            "an obfuscated hop stops the walk"
        );
        // A dual-stack listener sees IPv4 peers as v4-mapped addresses.
        assert_eq!(
            client(ip("::ffff:10.0.0.7"), &["198.51.100.8"]),
            ip("198.51.100.8")
        );
        assert_eq!(client(ip("::ffff:198.51.100.9"), &[]), ip("198.51.100.9"));
    }

    #[test]
    fn an_ipv6_client_rotating_through_its_64_is_one_client() {
        let clock = FakeRelativeClock::default();
        let limit = RateLimit::with_clock(settings(1, 5, 10_000), clock).expect("on");
        let base = u128::from_be_bytes(ip6("2001:db8:1:2::").octets());
        let refused = (0..200_000u128)
            .filter(|i| limit.take(IpAddr::from((base + i).to_be_bytes())).is_err())
            .count();
        assert_eq!(refused, 200_000 - 5, "one burst for the whole /64");
        assert!(
            limit.take(ip6("2001:db8:1:3::1").into()).is_ok(),
            "the next /64 is another client"
        );
    }

    fn ip6(s: &str) -> std::net::Ipv6Addr {
        s.parse().unwrap()
    }
}
