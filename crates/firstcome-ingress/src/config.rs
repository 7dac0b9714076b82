//! Settings of the ingress: the shared connection settings plus what only the
//! HTTP side needs. Flags or environment variables; see `firstcome-ingress --help`.

use std::net::SocketAddr;
use std::time::Duration;

use firstcome::cli::{duration, renamed_default};
use firstcome::config::{CommonConfig, ConfigError, ensure};

/// Everything the ingress needs to run.
#[derive(Clone, clap::Parser)]
#[command(
    name = "firstcome-ingress",
    version,
    about = "HTTP ingress of firstcome"
)]
pub struct IngressConfig {
    /// Services, topics and keys shared with the worker.
    #[command(flatten)]
    pub common: CommonConfig,

    /// Where the user of an issue request comes from: `jwt` (a bearer token
    /// checked against `FIRSTCOME_JWKS_FILE`), `header` (set by a gateway
    /// in `FIRSTCOME_TRUSTED_PROXIES`, named by `FIRSTCOME_USER_HEADER`) or
    /// `body` (the body's `user_id` as the client writes it: anyone can ask
    /// for anyone; only for a trusted network, such as the local stack).
    #[arg(long, env = "FIRSTCOME_IDENTITY", value_enum)]
    pub identity: IdentityMode,

    /// With `FIRSTCOME_IDENTITY=jwt`: the JWKS document (a file, re-read
    /// when it changes, so keys rotate without a restart).
    #[arg(long, env = "FIRSTCOME_JWKS_FILE")]
    pub jwks_file: Option<std::path::PathBuf>,

    /// With `FIRSTCOME_IDENTITY=jwt`: the `iss` every token must carry.
    #[arg(long, env = "FIRSTCOME_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// With `FIRSTCOME_IDENTITY=jwt`: the audience every token must name.
    #[arg(long, env = "FIRSTCOME_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// With `FIRSTCOME_IDENTITY=jwt`: the claim that names the user.
    #[arg(long, env = "FIRSTCOME_JWT_USER_CLAIM", default_value = "sub")]
    pub jwt_user_claim: String,

    /// With `FIRSTCOME_IDENTITY=header`: the header in which the gateway
    /// names the authenticated user (e.g. `x-authenticated-user`).
    #[arg(long, env = "FIRSTCOME_USER_HEADER")]
    pub user_header: Option<String>,

    /// Address the public HTTP API listens on (port 0 picks a free one).
    #[arg(long, env = "FIRSTCOME_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address of the operations port: `/metrics` for Prometheus. Keep it
    /// off the public network: it listens on loopback unless told otherwise
    /// (the manifests bind all interfaces inside the pod network).
    #[arg(
        long,
        env = "FIRSTCOME_METRICS_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub metrics_listen: SocketAddr,

    /// Bearer token that admin endpoints (coupon creation) require.
    #[arg(long, env = "FIRSTCOME_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,

    /// More admin tokens, `id=token` separated by commas (for rotation and
    /// for telling admins apart in the audit table, which records the id;
    /// `FIRSTCOME_ADMIN_TOKEN`'s id is `admin`).
    #[arg(
        long,
        env = "FIRSTCOME_ADMIN_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub admin_tokens: Vec<String>,

    /// How long a request waits for the broker's acknowledgement before the
    /// client gets `503 unavailable`.
    #[arg(
        long,
        env = "FIRSTCOME_PRODUCE_TIMEOUT",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_PRODUCE_TIMEOUT_MS", "ms", "FIRSTCOME_PRODUCE_TIMEOUT", "5s")
    )]
    pub produce_timeout: Duration,

    /// How long the producer waits to fill a batch. A few milliseconds buy
    /// large batches under load for little latency; see docs/design.md.
    #[arg(
        long,
        env = "FIRSTCOME_PRODUCE_LINGER",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_PRODUCE_LINGER_MS", "ms", "FIRSTCOME_PRODUCE_LINGER", "2ms")
    )]
    pub produce_linger: Duration,

    /// Longest any HTTP request may take before it is cut off.
    #[arg(
        long,
        env = "FIRSTCOME_REQUEST_TIMEOUT",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_REQUEST_TIMEOUT_MS", "ms", "FIRSTCOME_REQUEST_TIMEOUT", "15s")
    )]
    pub request_timeout: Duration,

    /// Longest a graceful shutdown waits for in-flight requests.
    #[arg(
        long,
        env = "FIRSTCOME_SHUTDOWN_TIMEOUT",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_SHUTDOWN_TIMEOUT_MS", "ms", "FIRSTCOME_SHUTDOWN_TIMEOUT", "10s")
    )]
    pub shutdown_timeout: Duration,

    /// Most API requests served at once; past it the ingress answers `503
    /// overloaded` with `Retry-After` at once instead of queueing (memory
    /// stays bounded under overload). Health endpoints are not counted.
    #[arg(long, env = "FIRSTCOME_MAX_IN_FLIGHT", default_value_t = 4_096)]
    pub max_in_flight: usize,

    /// Most client connections held at once; past it the ingress accepts
    /// no more until one closes (they wait in the kernel's queue), so what
    /// the connections hold stays bounded under any load. Measured
    /// (docs/benchmarks.md, "Memory"): through the overload step 1,024 held
    /// 47 MiB but lowered the sustained rate, 2,048 held 76 MiB at the full
    /// rate, 4,096 reached 128 MiB.
    #[arg(long, env = "FIRSTCOME_MAX_CONNECTIONS", default_value_t = 2_048)]
    pub max_connections: usize,

    /// Longest a client may take to send a request's header block, and
    /// longest a kept-alive connection may wait idle for its next request;
    /// then it is closed (slow, idle and half-sent connections give their
    /// place back).
    #[arg(
        long,
        env = "FIRSTCOME_HEADER_READ_TIMEOUT",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_HEADER_READ_TIMEOUT_MS", "ms", "FIRSTCOME_HEADER_READ_TIMEOUT", "10s")
    )]
    pub header_read_timeout: Duration,

    /// Largest read buffer of a connection, in bytes: a header block larger
    /// than this is refused, and a connection never holds more of an
    /// unfinished one (at least 8,192).
    #[arg(long, env = "FIRSTCOME_MAX_HEADER_BYTES", default_value_t = 32 * 1024)]
    pub max_header_bytes: usize,

    /// Most connections one peer address (an IPv6 peer by its /64) may hold
    /// at once; past it a new one is closed at once. 0 (the default) turns
    /// it off: behind a proxy every client shares the proxy's address, so
    /// turn it on where the peers are the clients (a layer-4 load balancer
    /// that keeps the source address); `FIRSTCOME_TRUSTED_PROXIES` are
    /// exempt.
    #[arg(long, env = "FIRSTCOME_MAX_CONNECTIONS_PER_PEER", default_value_t = 0)]
    pub max_connections_per_peer: usize,

    /// How long the ingress trusts its last look at a coupon's stock in
    /// Redis. While the worker has the stock at zero, issue requests are
    /// answered `409 sold_out` without touching the log (they would all be
    /// decided `sold_out`); 0 turns the short-circuit off.
    #[arg(
        long,
        env = "FIRSTCOME_SOLD_OUT_CHECK",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_SOLD_OUT_CHECK_MS", "ms", "FIRSTCOME_SOLD_OUT_CHECK", "250ms")
    )]
    pub sold_out_check: Duration,

    /// Longest `wait_ms` a status lookup may ask for (long poll).
    #[arg(
        long,
        env = "FIRSTCOME_MAX_WAIT",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_MAX_WAIT_MS", "ms", "FIRSTCOME_MAX_WAIT", "10s")
    )]
    pub max_wait: Duration,

    /// How long a status lookup trusts a cached `pending` before it asks
    /// the ledger too. A Redis that lost its last writes (a crash with
    /// `appendfsync everysec`, a failover to a lagging replica) can keep a
    /// `pending` whose final status it lost, and nothing writes that status
    /// again; past this age the lookup reads the ledger (one primary-key
    /// query), answers the decision and puts it back in the cache.
    #[arg(
        long,
        env = "FIRSTCOME_PENDING_RECHECK",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_PENDING_RECHECK_MS", "ms", "FIRSTCOME_PENDING_RECHECK", "2s")
    )]
    pub pending_recheck: Duration,

    /// How long an `Idempotency-Key` is remembered (in Redis).
    #[arg(
        long,
        env = "FIRSTCOME_IDEMPOTENCY_TTL",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_IDEMPOTENCY_TTL_SECS", "s", "FIRSTCOME_IDEMPOTENCY_TTL", "24h")
    )]
    pub idempotency_ttl: Duration,

    /// Per-client rate limit on the API, requests per second; 0 (the
    /// default) turns it off. Past it: `429 rate_limited` with `Retry-After`.
    #[arg(long, env = "FIRSTCOME_RATE_LIMIT_PER_SEC", default_value_t = 0)]
    pub rate_limit_per_sec: u32,

    /// Requests a client may send at once before the rate applies.
    #[arg(long, env = "FIRSTCOME_RATE_LIMIT_BURST", default_value_t = 20)]
    pub rate_limit_burst: u32,

    /// Clients the rate limit remembers at most; past it the client seen
    /// longest ago is forgotten (it starts again with a full burst).
    #[arg(long, env = "FIRSTCOME_RATE_LIMIT_CLIENTS", default_value_t = 100_000)]
    pub rate_limit_clients: usize,

    /// The prefix length by which the rate limit counts an IPv6 client:
    /// a subscriber is given a whole /64 and may rotate through it.
    #[arg(long, env = "FIRSTCOME_RATE_LIMIT_IPV6_PREFIX", default_value_t = 64)]
    pub rate_limit_ipv6_prefix: u8,

    /// Header in which the proxies in front name the client's address
    /// (e.g. `x-forwarded-for`); believed only from
    /// `FIRSTCOME_TRUSTED_PROXIES`, read from the right. Unset: the TCP peer.
    #[arg(long, env = "FIRSTCOME_CLIENT_IP_HEADER")]
    pub client_ip_header: Option<String>,

    /// The proxies in front, as addresses or CIDR blocks separated by commas
    /// (e.g. `10.0.0.0/8,127.0.0.1`): the client is the rightmost hop of
    /// `FIRSTCOME_CLIENT_IP_HEADER` that is not one of them.
    #[arg(long, env = "FIRSTCOME_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// Largest request body, in bytes; larger ones are answered `413`.
    #[arg(long, env = "FIRSTCOME_MAX_BODY_BYTES", default_value_t = 16 * 1024)]
    pub max_body_bytes: usize,
}

/// Where the user of an issue request comes from (see
/// [`crate::identity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IdentityMode {
    /// A bearer JWT checked against a JWKS document.
    Jwt,
    /// A header set by a trusted gateway.
    Header,
    /// The body's `user_id`, unverified (a trusted network only).
    Body,
}

impl std::fmt::Debug for IngressConfig {
    // Hand-written so the admin token never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngressConfig")
            .field("common", &self.common)
            .field("identity", &self.identity)
            .field("jwks_file", &self.jwks_file)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("user_header", &self.user_header)
            .field("listen", &self.listen)
            .field("produce_timeout", &self.produce_timeout)
            .field("produce_linger", &self.produce_linger)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_peer", &self.max_connections_per_peer)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("sold_out_check", &self.sold_out_check)
            .field("idempotency_ttl", &self.idempotency_ttl)
            .field("max_wait", &self.max_wait)
            .field("pending_recheck", &self.pending_recheck)
            .field("rate_limit_per_sec", &self.rate_limit_per_sec)
            .field("rate_limit_burst", &self.rate_limit_burst)
            .field("rate_limit_clients", &self.rate_limit_clients)
            .field("rate_limit_ipv6_prefix", &self.rate_limit_ipv6_prefix)
            .field("client_ip_header", &self.client_ip_header)
            .field("trusted_proxies", &self.trusted_proxies)
            .finish_non_exhaustive()
    }
}

impl IngressConfig {
    /// Checks everything that can be checked without connecting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.common.validate()?;
        ensure(
            self.admin_token.len() >= 16,
            "FIRSTCOME_ADMIN_TOKEN",
            "must be at least 16 characters",
        )?;
        self.admin_tokens()?;
        ensure(
            !self.produce_timeout.is_zero() && self.produce_timeout < self.request_timeout,
            "FIRSTCOME_PRODUCE_TIMEOUT",
            "must be positive and below FIRSTCOME_REQUEST_TIMEOUT",
        )?;
        let is_header = |h: &str| axum::http::HeaderName::try_from(h).is_ok();
        match self.identity {
            IdentityMode::Jwt => {
                for (key, set) in [
                    ("FIRSTCOME_JWKS_FILE", self.jwks_file.is_some()),
                    ("FIRSTCOME_JWT_ISSUER", self.jwt_issuer.is_some()),
                    ("FIRSTCOME_JWT_AUDIENCE", self.jwt_audience.is_some()),
                ] {
                    ensure(set, key, "is required with FIRSTCOME_IDENTITY=jwt")?;
                }
            }
            IdentityMode::Header => {
                ensure(
                    self.user_header.as_deref().is_some_and(is_header),
                    "FIRSTCOME_USER_HEADER",
                    "must be a header name with FIRSTCOME_IDENTITY=header",
                )?;
                ensure(
                    !self.trusted_proxy_nets()?.is_empty(),
                    "FIRSTCOME_TRUSTED_PROXIES",
                    "must name the gateway with FIRSTCOME_IDENTITY=header",
                )?;
            }
            IdentityMode::Body => {}
        }
        let trusted = self.trusted_proxy_nets()?;
        if let Some(h) = &self.client_ip_header {
            ensure(
                is_header(h),
                "FIRSTCOME_CLIENT_IP_HEADER",
                "must be a header name",
            )?;
            ensure(
                !trusted.is_empty(),
                "FIRSTCOME_CLIENT_IP_HEADER",
                "needs FIRSTCOME_TRUSTED_PROXIES: a header anyone may send names nobody",
            )?;
        }
        ensure(
            self.rate_limit_clients > 0,
            "FIRSTCOME_RATE_LIMIT_CLIENTS",
            "must be at least 1",
        )?;
        ensure(
            (32..=128).contains(&self.rate_limit_ipv6_prefix),
            "FIRSTCOME_RATE_LIMIT_IPV6_PREFIX",
            "must be between 32 and 128",
        )?;
        ensure(
            self.max_wait < self.request_timeout,
            "FIRSTCOME_MAX_WAIT",
            "must be below FIRSTCOME_REQUEST_TIMEOUT",
        )?;
        ensure(
            self.idempotency_ttl >= Duration::from_secs(1),
            "FIRSTCOME_IDEMPOTENCY_TTL",
            "must be at least 1s",
        )?;
        ensure(
            self.max_connections > 0,
            "FIRSTCOME_MAX_CONNECTIONS",
            "must be at least 1",
        )?;
        ensure(
            self.max_header_bytes >= 8_192,
            "FIRSTCOME_MAX_HEADER_BYTES",
            "must be at least 8192",
        )?;
        ensure(
            !self.header_read_timeout.is_zero(),
            "FIRSTCOME_HEADER_READ_TIMEOUT",
            "must be positive",
        )?;
        ensure(
            self.max_in_flight > 0,
            "FIRSTCOME_MAX_IN_FLIGHT",
            "must be at least 1",
        )?;
        ensure(
            self.max_body_bytes >= 256,
            "FIRSTCOME_MAX_BODY_BYTES",
            "must be at least 256",
        )
    }

    /// `FIRSTCOME_TRUSTED_PROXIES` parsed: a bare address is a block of one.
    pub fn trusted_proxy_nets(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        self.trusted_proxies
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<ipnet::IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| ConfigError::Invalid {
                        key: "FIRSTCOME_TRUSTED_PROXIES",
                        message: format!("{p:?} is neither an address nor a CIDR block"),
                    })
            })
            .collect()
    }

    /// Every admin token with its id, `FIRSTCOME_ADMIN_TOKEN` first as `admin`.
    pub fn admin_tokens(&self) -> Result<Vec<(String, String)>, ConfigError> {
        const KEY: &str = "FIRSTCOME_ADMIN_TOKENS";
        let mut tokens = vec![("admin".to_owned(), self.admin_token.clone())];
        for entry in &self.admin_tokens {
            let (id, token) = entry.split_once('=').unwrap_or_default();
            ensure(entry.contains('='), KEY, "entries are id=token")?;
            let id_ok = !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            ensure(id_ok, KEY, "ids are 1-64 characters of [A-Za-z0-9_-]")?;
            ensure(
                token.len() >= 16,
                KEY,
                "tokens must be at least 16 characters",
            )?;
            ensure(tokens.iter().all(|(i, _)| i != id), KEY, "ids must differ")?;
            tokens.push((id.to_owned(), token.to_owned()));
        }
        Ok(tokens)
    }

    /// The produce timeout.
    pub fn produce_timeout(&self) -> Duration {
        self.produce_timeout
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::IngressConfig;

    fn parse(extra: &[&str]) -> IngressConfig {
        let mut args = vec![
            "firstcome-ingress",
            "--database-url",
            "postgres://u:p@127.0.0.1:1/db",
            "--redis-url",
            "redis://127.0.0.1:1",
            "--kafka-brokers",
            "127.0.0.1:1",
        ];
        if !extra.contains(&"--identity") {
            args.extend_from_slice(&["--identity", "body"]);
        }
        if !extra.contains(&"--admin-token") {
            args.extend_from_slice(&["--admin-token", "a-token-long-enough"]);
        }
        args.extend_from_slice(extra);
        IngressConfig::try_parse_from(args).expect("arguments parse")
    }

    #[test]
    fn a_valid_configuration_passes_and_bad_values_name_their_key() {
        assert!(parse(&[]).validate().is_ok());
        let behind_proxies = parse(&[
            "--client-ip-header",
            "x-forwarded-for",
            "--trusted-proxies",
            "10.0.0.0/8, 127.0.0.1,::1",
        ]);
        assert!(behind_proxies.validate().is_ok());
        assert_eq!(behind_proxies.trusted_proxy_nets().unwrap().len(), 3);
        let cases: [(&[&str], &str); 18] = [
            (&["--identity", "jwt"], "FIRSTCOME_JWKS_FILE"),
            (&["--identity", "header"], "FIRSTCOME_USER_HEADER"),
            (&["--max-header-bytes", "100"], "FIRSTCOME_MAX_HEADER_BYTES"),
            (
                &["--header-read-timeout", "0s"],
                "FIRSTCOME_HEADER_READ_TIMEOUT",
            ),
            (
                &["--rate-limit-ipv6-prefix", "16"],
                "FIRSTCOME_RATE_LIMIT_IPV6_PREFIX",
            ),
            (
                &["--client-ip-header", "x-forwarded-for"],
                "FIRSTCOME_CLIENT_IP_HEADER",
            ),
            (
                &["--trusted-proxies", "10.0.0.0/8,proxy.local"],
                "FIRSTCOME_TRUSTED_PROXIES",
            ),
            (
                &["--rate-limit-clients", "0"],
                "FIRSTCOME_RATE_LIMIT_CLIENTS",
            ),
            (&["--max-connections", "0"], "FIRSTCOME_MAX_CONNECTIONS"),
            (&["--admin-tokens", "ci"], "FIRSTCOME_ADMIN_TOKENS"),
            (
                &["--admin-tokens", "c i=long-enough-token-1"],
                "FIRSTCOME_ADMIN_TOKENS",
            ),
            (&["--max-in-flight", "0"], "FIRSTCOME_MAX_IN_FLIGHT"),
            (&["--max-body-bytes", "10"], "FIRSTCOME_MAX_BODY_BYTES"),
            (&["--admin-token", "short"], "FIRSTCOME_ADMIN_TOKEN"),
            (&["--redis-prefix", "a{b"], "FIRSTCOME_REDIS_PREFIX"),
            (&["--kafka-options", "nonsense"], "FIRSTCOME_KAFKA_OPTIONS"),
            (&["--produce-timeout", "20s"], "FIRSTCOME_PRODUCE_TIMEOUT"),
            (
                &["--dlq-topic", "firstcome.issue-requests"],
                "FIRSTCOME_DLQ_TOPIC",
            ),
        ];
        for (args, key) in cases {
            let err = parse(args).validate().expect_err(key).to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn the_debug_form_never_shows_secrets() {
        let shown = format!("{:?}", parse(&[]));
        assert!(!shown.contains("a-token-long-enough"), "{shown}");
        assert!(!shown.contains("u:p@"), "{shown}");
    }
}
