//! The connections one ingress holds, and what each may hold.
//!
//! `FIRSTCOME_MAX_IN_FLIGHT` bounds the requests being served, but under
//! overload a load generator or a crowd keeps opening connections, and each
//! open connection holds its buffers and its task whether or not its request
//! is served: in the benchmark's overload step the ingress reached 153–272
//! MiB. So the listener takes at most `FIRSTCOME_MAX_CONNECTIONS` at a time:
//! while that many are open it stops accepting, and new connections wait in
//! the kernel's accept queue (then its SYN backlog) until one closes, which
//! costs the process nothing.
//!
//! A bound on connections is only a bound on memory if each connection's
//! share is bounded too, and only keeps the service up if a connection that
//! does nothing gives its place back (red team #6). So [`serve`] runs its
//! own accept loop on hyper (axum's `serve` gives hyper no timer, which
//! turns hyper's header-read timeout off):
//! - a connection must deliver a request's whole header block within
//!   `FIRSTCOME_HEADER_READ_TIMEOUT`, and an idle keep-alive connection
//!   waiting for its next request is under the same clock: idle, slow-header
//!   and half-sent connections are closed, whatever they trickle;
//! - its read buffer holds at most `FIRSTCOME_MAX_HEADER_BYTES` (hyper's
//!   default was 408 KiB: 2,048 connections of fat half-sent headers passed
//!   the pod's memory limit);
//! - one peer address (an IPv6 peer by its /64) holds at most
//!   `FIRSTCOME_MAX_CONNECTIONS_PER_PEER` of the places (0: no limit; the
//!   trusted proxies are exempt), so one client cannot take them all; a
//!   connection past it is closed at once.
//!
//! The probes are served on the operations port as well, so the kubelet's
//! look never waits behind the public connections.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// A TCP listener that holds at most a fixed number of connections.
pub struct BoundedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    open: Gauge,
}

impl BoundedListener {
    /// At most `max` connections of `inner` at once, counted on `open`.
    pub fn new(inner: TcpListener, max: usize, open: Gauge) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(max)),
            open,
        }
    }
}

impl Listener for BoundedListener {
    type Io = Bounded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // Waits for a free place before accepting: meanwhile the kernel
        // queues the newcomers.
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (io, addr) = Listener::accept(&mut self.inner).await;
        self.open.inc();
        (
            Bounded {
                io,
                _permit: permit,
                open: self.open.clone(),
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// One accepted connection; closing it frees its place.
pub struct Bounded {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for Bounded {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl AsyncRead for Bounded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Bounded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What one connection may hold and for how long.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest a request's header block (or the wait for the next request
    /// on a kept-alive connection) may take.
    pub header_read_timeout: Duration,
    /// Largest read buffer of a connection, in bytes (at least 8,192).
    pub max_buf_bytes: usize,
    /// Most connections of one peer; 0 is no limit.
    pub per_peer: usize,
    /// Peers exempt from `per_peer` (the proxies in front).
    pub trusted: Vec<IpNet>,
}

/// The connections each peer holds now (only peers holding some).
struct Peers {
    limits: Limits,
    held: Mutex<HashMap<IpAddr, usize>>,
}

impl Peers {
    /// The peer's key: its address, an IPv6 peer's /64.
    fn key(ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => IpAddr::V6(
                ipnet::Ipv6Net::new(v6, 64)
                    .expect("64 is a prefix")
                    .network(),
            ),
            v4 => v4,
        }
    }

    /// Takes a place for `ip`, unless it holds its share already.
    fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<PeerPlace> {
        let limit = self.limits.per_peer;
        if limit == 0
            || self
                .limits
                .trusted
                .iter()
                .any(|n| n.contains(&ip.to_canonical()))
        {
            return Some(PeerPlace(None));
        }
        let key = Self::key(ip);
        let mut held = self.held.lock().expect("lock");
        let n = held.entry(key).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(PeerPlace(Some((self.clone(), key))))
    }
}

/// A peer's place, given back when its connection closes.
struct PeerPlace(Option<(Arc<Peers>, IpAddr)>);

impl Drop for PeerPlace {
    fn drop(&mut self) {
        if let Some((peers, key)) = self.0.take() {
            let mut held = peers.held.lock().expect("lock");
            if let Some(n) = held.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&key);
                }
            }
        }
    }
}

/// Serves `app` on `listener` until `shutdown`, every connection under
/// `limits`; then asks each open connection to finish its request in hand
/// and returns once all have closed.
pub async fn serve(
    mut listener: BoundedListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_buf_bytes.max(8_192));
    let peers = Arc::new(Peers {
        limits,
        held: Mutex::new(HashMap::new()),
    });
    // Every connection task holds a receiver; all dropped = all closed.
    let (open_tx, open_rx) = tokio::sync::watch::channel(());
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let Some(place) = peers.enter(peer.ip()) else {
            // Past its share: closed at once, its place goes to others.
            drop(io);
            continue;
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(request)
        });
        let connection = http.serve_connection(TokioIo::new(io), service);
        let (shutdown, open) = (shutdown.clone(), open_rx.clone());
        tokio::spawn(async move {
            let _place = place;
            let _open = open;
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                r = connection.as_mut() => {
                    if let Err(e) = r {
                        tracing::trace!(error = %e, "connection ended");
                    }
                    return;
                }
                () = shutdown.cancelled() => {}
            }
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
    drop(open_rx);
    drop(listener);
    open_tx.closed().await;
}
