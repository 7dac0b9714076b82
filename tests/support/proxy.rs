//! A TCP proxy a test can cut, to part a process from a service.

use super::*;

/// A TCP proxy in front of a real service, to cut the connection for real:
/// while cut, open connections are dropped and new ones closed at once.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, _) = tokio::sync::watch::channel(true);
        let state = open.clone();
        let target = target.to_owned();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut cut = state.subscribe();
                if !*cut.borrow() {
                    continue; // dropped: the client sees its connection closed
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = cut.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self { addr, open, accept }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }

    /// `url` with its `host:port` replaced by this proxy's address.
    pub fn rewrite(&self, url: &str) -> String {
        Self::rewrite_to(url, self.addr)
    }

    /// `url` with its `host:port` replaced by `addr`.
    pub fn rewrite_to(url: &str, addr: SocketAddr) -> String {
        let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
        let (auth, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let host_start = auth.rfind('@').map_or(0, |i| i + 1);
        format!("{scheme}://{}{addr}{path}", &auth[..host_start])
    }

    /// The `host:port` of a URL.
    pub fn target_of(url: &str) -> String {
        let rest = url.split_once("://").expect("a URL with a scheme").1;
        let auth = &rest[..rest.find('/').unwrap_or(rest.len())];
        auth[auth.rfind('@').map_or(0, |i| i + 1)..].to_owned()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
