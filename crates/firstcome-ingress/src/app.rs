//! Building and running the ingress: connect to the services, bind the
//! listener, serve until the shutdown token fires, then drain and flush.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::IngressMetrics;
use anyhow::Context;
use firstcome::kafka::{self, HealingProducer};
use firstcome::ops::{self, OpsServer};
use firstcome::state::CouponState;
use firstcome::status::StatusCache;
use rdkafka::producer::Producer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{IdentityMode, IngressConfig};
use crate::connections::{self, BoundedListener};
use crate::http;
use crate::identity::{self, Identity};
use crate::issue::admission::{CouponCache, SoldOutCheck};
use crate::issue::pending::PendingWrites;
use crate::issue::{Issue, IssueParts};
use crate::services::{AppState, Services};
use crate::waiters::{self, Waiters};

/// A ready-to-serve ingress.
pub struct Application {
    listener: TcpListener,
    ops: OpsServer,
    state: AppState,
    /// For the decisions subscription: one client per address of
    /// `REDIS_URL` (on a cluster any node hears every publication).
    redis_clients: Vec<redis::Client>,
}

impl Application {
    /// Connects to Postgres, Redis and Kafka and binds the listener.
    pub async fn build(cfg: IngressConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let pool = cfg.common.connect_postgres().await?;
        let redis = cfg.common.connect_redis(Duration::from_secs(2)).await?;
        let producer = Arc::new(
            HealingProducer::new(kafka::producer_config(
                &cfg.common,
                cfg.produce_timeout(),
                cfg.produce_linger,
            )?)
            .context("creating the Kafka producer (KAFKA_BROKERS)")?,
        );
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let ops = OpsServer::bind(cfg.metrics_listen).await?;
        let keys = cfg.common.keys()?;
        let admin_tokens = cfg.admin_tokens()?;
        let redis_clients = cfg
            .common
            .redis_urls()
            .into_iter()
            .map(redis::Client::open)
            .collect::<Result<Vec<_>, _>>()
            .context("REDIS_URL")?;
        let identity = identity(&cfg)?;
        let metrics = IngressMetrics::new();
        let states = CouponState::new(redis.clone(), keys.clone());
        let statuses = StatusCache::new(redis.clone(), keys.clone(), cfg.common.status_ttl());
        let issue = Issue::new(IssueParts {
            coupons: CouponCache::new(pool.clone()),
            sold_out: SoldOutCheck::new(states.clone(), cfg.sold_out_check),
            pending: PendingWrites::new(statuses.clone()),
            states: states.clone(),
            producer: producer.clone(),
            topic: cfg.common.request_topic.clone(),
            produce_timeout: cfg.produce_timeout(),
            metrics: metrics.clone(),
        });
        let state = AppState::new(Services {
            cfg,
            pool,
            issue,
            states,
            statuses,
            redis,
            keys,
            producer,
            admin_tokens,
            waiters: Arc::new(Waiters::new(metrics.long_polls.clone())),
            readiness: Default::default(),
            identity,
            metrics,
        });
        // The first look at the dependencies before anything is served, so
        // a probe never finds none; `run_until_stopped` takes one a second.
        http::health::look(&state).await;
        Ok(Self {
            listener,
            ops,
            state,
            redis_clients,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The address of the operations port (`/metrics`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.ops.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, waits for
    /// in-flight requests (bounded by the shutdown timeout) and flushes the
    /// producer.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            ops,
            state,
            redis_clients,
        } = self;
        let cfg = &state.cfg;
        let grace = cfg.shutdown_timeout;
        tracing::info!(addr = %listener.local_addr()?, metrics = %ops.local_addr(), "ingress listening");
        let metrics = state.metrics.clone();
        // The probes here too: the kubelet asks them on this port, away
        // from the public listener's connection bound.
        let scrape = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || async move { ops::metrics_response(metrics.render()) }),
            )
            .merge(http::health::routes().with_state(state.clone()));
        let jwks = match &state.identity {
            Identity::Jwt(verifier) => Some(tokio::spawn(verifier.clone().watch(shutdown.clone()))),
            _ => None,
        };
        let watching = tokio::spawn(http::health::watch(state.clone(), shutdown.clone()));
        let ops = ops.spawn(scrape, shutdown.clone());
        let app = http::router(state.clone());
        // Long polls follow the worker's decisions; on shutdown they are
        // woken and answer what they know.
        let listening = tokio::spawn(waiters::listen(
            redis_clients,
            state.statuses.decided_channel(),
            state.waiters.clone(),
            shutdown.clone(),
        ));
        let listener = BoundedListener::new(
            listener,
            cfg.max_connections,
            state.metrics.connections.clone(),
        );
        let limits = connections::Limits {
            header_read_timeout: cfg.header_read_timeout,
            max_buf_bytes: cfg.max_header_bytes,
            per_peer: cfg.max_connections_per_peer,
            trusted: cfg.trusted_proxy_nets()?,
        };
        let serve = connections::serve(listener, app, limits, shutdown.clone());
        tokio::select! {
            () = serve => {},
            () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!("shutdown timeout reached with requests still in flight");
            }
        }
        shutdown.cancel();
        let _ = listening.await;
        let _ = watching.await;
        if let Some(jwks) = jwks {
            let _ = jwks.await;
        }
        let _ = ops.await;
        let producer = state.producer.producer();
        tokio::task::spawn_blocking(move || producer.flush(grace))
            .await?
            .context("flushing the producer")?;
        tracing::info!("ingress stopped");
        Ok(())
    }
}

/// The identity the settings ask for; `body` with a warning.
fn identity(cfg: &IngressConfig) -> anyhow::Result<Identity> {
    Ok(match cfg.identity {
        IdentityMode::Body => {
            tracing::warn!(
                "FIRSTCOME_IDENTITY=body: the user of an issue request is whatever the client \
                 writes; anyone can ask for anyone. Use jwt or header outside a trusted network"
            );
            Identity::Body
        }
        IdentityMode::Jwt => Identity::Jwt(identity::JwtVerifier::new(identity::JwtSettings {
            jwks_file: cfg.jwks_file.clone().context("FIRSTCOME_JWKS_FILE")?,
            issuer: cfg.jwt_issuer.clone().context("FIRSTCOME_JWT_ISSUER")?,
            audience: cfg.jwt_audience.clone().context("FIRSTCOME_JWT_AUDIENCE")?,
            user_claim: cfg.jwt_user_claim.clone(),
        })?),
        IdentityMode::Header => Identity::Header {
            name: axum::http::HeaderName::try_from(
                cfg.user_header
                    .as_deref()
                    .context("FIRSTCOME_USER_HEADER")?,
            )
            .context("FIRSTCOME_USER_HEADER")?,
            trusted: cfg.trusted_proxy_nets()?,
        },
    })
}
