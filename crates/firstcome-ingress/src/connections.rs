//! A bound on the connections one ingress holds at once.
//!
//! `FIRSTCOME_MAX_IN_FLIGHT` bounds the requests being served, but under
//! overload a load generator or a crowd keeps opening connections, and each
//! open connection holds its buffers and its task whether or not its request
//! is served: in the benchmark's overload step the ingress reached 153–272
//! MiB. So the listener takes at most `FIRSTCOME_MAX_CONNECTIONS` at a time:
//! while that many are open it stops accepting, and new connections wait in
//! the kernel's accept queue (then its SYN backlog) until one closes, which
//! costs the process nothing. Memory then stays within the bound times what a
//! connection holds, under any load.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::serve::Listener;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
