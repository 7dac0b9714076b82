//! Clients that behave as an attacker would: they hang up early, send
//! slowly, or send a little of a large header and stop. Each opens raw TCP
//! connections, so nothing in an HTTP client library tidies up after it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Sends `GET path` and resets the connection (RST, no FIN) after `after`,
/// whether or not an answer came.
pub async fn get_and_hang_up(addr: SocketAddr, path: &str, after: Duration) {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return;
    };
    let request = format!("GET {path} HTTP/1.1\r\nhost: firstcome\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return;
    }
    tokio::time::sleep(after).await;
    reset(stream);
}

/// Closes `stream` with a reset, as a client that crashed or gave up does.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// `n` connections at once, each asking for `path(i)` and hanging up after
/// `after`; returns when every one has hung up.
pub async fn hang_up_flood(
    addr: SocketAddr,
    n: usize,
    after: Duration,
    path: impl Fn(usize) -> String,
) {
    let sent: Vec<_> = (0..n)
        .map(|i| tokio::spawn(get_and_hang_up_owned(addr, path(i), after)))
        .collect();
    for s in sent {
        let _ = s.await;
    }
}

async fn get_and_hang_up_owned(addr: SocketAddr, path: String, after: Duration) {
    get_and_hang_up(addr, &path, after).await;
}

/// Opens a connection and sends `head` (the start of a request that never
/// ends), then holds the connection open until it is dropped.
pub async fn half_sent(addr: SocketAddr, head: &[u8]) -> Option<TcpStream> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream.write_all(head).await.ok()?;
    Some(stream)
}

/// Whether the server closed `stream` (or answered and closed) within
/// `limit`: reads until end of stream; what it read, if it closed.
pub async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()?;
    Some(got)
}
