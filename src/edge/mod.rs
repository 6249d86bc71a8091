//! The edge: what happens to a connection outside the requests Pingora reads from it. Pingora
//! 0.9 has no deadline for receiving a request head (only a per-read timeout, so a client that
//! sends one header line every few seconds is never cut off), a fixed head limit of 1 MiB, no
//! cap on connections, and a TLS handshake that it bounds only at 60 s and does before its app
//! sees the connection. So each listener's app is wrapped: `EdgeApp` admits every connection at
//! its accept against its listener's caps (past a cap it is closed at once, before a byte is
//! read), does the TLS listener's handshakes itself, and wraps the stream in `GuardedStream`,
//! which holds `server.header_timeout`, `server.max_header_bytes` and
//! `server.keepalive_timeout` over HTTP/1, HTTP/2 and h2c alike, until the connection closes.
//! The client listeners share `server.max_connections` and `server.max_connections_per_ip`; the
//! admin listener has caps of its own. Connections from `server.trusted_proxies` are exempt
//! from the per-address cap; their requests carry the client's address in a header (see
//! `client`).

pub mod client;
mod stream;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::listeners::tls::Acceptor;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, Peek, Ssl, Stream};
use pingora::server::ShutdownWatch;
use prometheus::{IntCounterVec, IntGauge};

use crate::config::EdgeConfig;

pub use crate::limits::{ClientSlot, ClientSlots};
pub use stream::GuardedStream;

/// Counters of the edge, shared by every connection.
#[derive(Clone)]
pub struct EdgeMetrics {
    pub open: IntGauge,
    pub refused: IntCounterVec,
    pub cut: IntCounterVec,
}

/// Open connections, in all and per peer address.
struct Admission {
    cfg: EdgeConfig,
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One admitted connection; gives its place back when the connection is dropped.
pub struct Ticket {
    shared: Arc<Shared>,
    ip: Option<IpAddr>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut a = self.shared.lock();
        a.total = a.total.saturating_sub(1);
        if let Some(ip) = self.ip {
            if let Some(n) = a.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    a.per_ip.remove(&ip);
                }
            }
        }
        self.shared.metrics.open.dec();
    }
}

struct Shared {
    admission: Mutex<Admission>,
    limits: stream::Limits,
    metrics: EdgeMetrics,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Admission> {
        self.admission.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a new connection from `peer`, or the cap it would pass.
    fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<Ticket, &'static str> {
        let mut a = self.lock();
        if a.total >= a.cfg.max_connections {
            return Err("max_connections");
        }
        // A trusted proxy carries many clients: only the total cap applies to it.
        let ip = peer.filter(|ip| !a.cfg.trusted_proxies.contains(*ip));
        if let Some(ip) = ip {
            let cap = a.cfg.max_connections_per_ip;
            let n = a.per_ip.entry(ip).or_default();
            if *n >= cap {
                return Err("max_connections_per_ip");
            }
            *n += 1;
        }
        a.total += 1;
        self.metrics.open.inc();
        Ok(Ticket {
            shared: self.clone(),
            ip,
        })
    }
}

/// How long after the server's shutdown signal the proxy app hears it (its shutdown watch and
/// its `cleanup`). Pingora drops a connection whose request it has not read yet the moment
/// either comes; a connection
/// accepted just before the listeners stopped (during an upgrade's hand-over, at the end of a
/// SIGTERM's shutdown delay) sends its request a moment later and would fail. Measured: 7 to 26
/// failed requests of about 45,000 from 100 clients across an upgrade, none with this delay.
const LATE_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// The TLS side of a listener the edge terminates itself.
pub struct EdgeTls {
    /// The TLS listener's address: its connections are the ones that arrive on it.
    pub listen: SocketAddr,
    pub acceptor: Acceptor,
}

impl EdgeTls {
    fn serves(&self, local: SocketAddr) -> bool {
        local.port() == self.listen.port()
            && (self.listen.ip().is_unspecified()
                || client::canonical(local.ip()) == client::canonical(self.listen.ip()))
    }
}

/// A TLS record header: content type 22 (handshake), major version 3, then the length.
const TLS_RECORD_HEADER: usize = 5;
const TLS_HANDSHAKE: u8 = 22;

/// A Pingora HTTP app (the proxy, or the admin server) behind the edge: every connection of its
/// listeners is admitted here at its accept and guarded until it closes (see `stream`); a TLS
/// listener's handshake is done here too, so that it is counted and bounded like the rest.
pub struct EdgeApp<A> {
    inner: Arc<A>,
    shared: Arc<Shared>,
    tls: Option<EdgeTls>,
    /// The shutdown signal the app sees: the server's, `LATE_REQUEST_GRACE` later.
    late_shutdown: std::sync::OnceLock<ShutdownWatch>,
}

impl<A> EdgeApp<A> {
    /// `tls`: the listener among this app's whose connections are TLS (Pingora sees it as a
    /// plain TCP listener).
    pub fn new(inner: A, cfg: EdgeConfig, metrics: EdgeMetrics, tls: Option<EdgeTls>) -> Self {
        let limits = stream::Limits {
            header_timeout: cfg.header_timeout,
            keepalive_timeout: cfg.keepalive_timeout,
            max_header_bytes: cfg.max_header_bytes,
        };
        EdgeApp {
            inner: Arc::new(inner),
            shared: Arc::new(Shared {
                admission: Mutex::new(Admission {
                    cfg,
                    total: 0,
                    per_ip: HashMap::new(),
                }),
                limits,
                metrics,
            }),
            tls,
            late_shutdown: std::sync::OnceLock::new(),
        }
    }

    /// The delayed copy of `shutdown`, made on first use.
    fn late(&self, shutdown: &ShutdownWatch) -> ShutdownWatch {
        self.late_shutdown
            .get_or_init(|| {
                let (tx, rx) = tokio::sync::watch::channel(*shutdown.borrow());
                let mut server = shutdown.clone();
                tokio::spawn(async move {
                    if server.wait_for(|down| *down).await.is_ok() {
                        tokio::time::sleep(LATE_REQUEST_GRACE).await;
                    }
                    let _ = tx.send(true);
                });
                rx
            })
            .clone()
    }

    /// The TLS handshake of a connection to the TLS listener, within the time its first request
    /// head has. Anything that does not open with a TLS handshake record (plain HTTP on the TLS
    /// port) is closed at once, without an answer.
    async fn handshake(
        &self,
        tls: &EdgeTls,
        stream: Stream,
        deadline: tokio::time::Instant,
    ) -> Option<Stream> {
        let mut l4 = stream.into_any().downcast::<L4Stream>().ok()?;
        let peer = l4
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        // Pinned here so that a timed-out handshake still holds the socket while it is counted:
        // a client that sees the close then finds the count.
        let mut handshake = std::pin::pin!(async {
            // `try_peek` reads exactly the buffer's length and puts it back for rustls.
            let mut head = [0u8; TLS_RECORD_HEADER];
            l4.try_peek(&mut head).await.ok()?;
            if head[0] != TLS_HANDSHAKE || head[1] != 3 {
                tracing::debug!(peer = ?peer, "not a TLS handshake on the TLS listener");
                return None;
            }
            match tls.acceptor.tls_handshake(*l4).await {
                Ok(s) => Some(Box::new(s) as Stream),
                Err(e) => {
                    // A scanner, an old TLS version, a client gone: counted nowhere, logged
                    // below the default level (a flood of them must not flood the log).
                    tracing::debug!(peer = ?peer, error = %e, "TLS handshake failed");
                    None
                }
            }
        });
        match tokio::time::timeout_at(deadline, handshake.as_mut()).await {
            Ok(s) => s,
            Err(_) => {
                self.shared
                    .metrics
                    .cut
                    .with_label_values(&["tls_handshake_timeout"])
                    .inc();
                None
            }
        }
    }
}

impl<A> EdgeApp<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// Pingora's HTTP/1 loop (its `ServerApp` for HTTP apps), with the guard told when a
    /// connection is taken back for its next request: only then is it idle again.
    async fn serve_http1(&self, stream: Stream, shutdown: &ShutdownWatch) {
        let mut session = ServerSession::new_http1(stream);
        // Pingora's own per-read timeout while waiting; the guard's deadlines come first.
        session.set_keepalive((!*shutdown.borrow()).then_some(60));
        session.set_keepalive_reuses_remaining(
            self.inner
                .server_options()
                .and_then(|o| o.keepalive_request_limit),
        );
        let mut result = self.inner.process_new_http(session, shutdown).await;
        while let Some((stream, settings)) = result.map(ReusedHttpStream::consume) {
            let Ok(mut guarded) = stream.into_any().downcast::<GuardedStream>() else {
                return;
            };
            guarded.next_request();
            let mut session = ServerSession::new_http1(guarded);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            result = self.inner.process_new_http(session, shutdown).await;
        }
    }
}

#[async_trait]
impl<A> ServerApp for EdgeApp<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let accepted = tokio::time::Instant::now();
        let late = self.late(shutdown);
        let digest = stream.get_socket_digest();
        let peer = digest
            .as_ref()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let ticket = match self.shared.admit(peer) {
            Ok(t) => t,
            Err(reason) => {
                // Refused cheaply: closed before a byte is read.
                self.shared
                    .metrics
                    .refused
                    .with_label_values(&[reason])
                    .inc();
                return None;
            }
        };
        let limits = self.shared.limits;
        let stream = match &self.tls {
            Some(tls) => {
                // Which listener a connection came to: the local address it was accepted on.
                let local = digest.as_ref()?.local_addr()?.as_inet().copied()?;
                if tls.serves(local) {
                    self.handshake(tls, stream, accepted + limits.header_timeout)
                        .await?
                } else {
                    stream
                }
            }
            None => stream,
        };
        // Idle from here: a TLS connection's window starts once its handshake is done.
        let ready = tokio::time::Instant::now();
        let mut guarded = GuardedStream::new(
            stream,
            limits,
            ticket,
            self.shared.metrics.cut.clone(),
            ready,
        );
        let h2c = guarded.get_ssl_digest().is_none()
            && self.inner.server_options().is_some_and(|o| o.h2c);
        if h2c {
            match guarded.open_h2c().await {
                stream::Opening::Gone => return None,
                stream::Opening::H2 | stream::Opening::Http1 => {}
            }
        }
        if guarded.is_h2() {
            // Pingora's HTTP/2 server, which takes it by its ALPN or (h2c) by its preface.
            return ServerApp::process_new(&self.inner, Box::new(guarded), &late).await;
        }
        self.serve_http1(Box::new(guarded), &late).await;
        None
    }

    /// Called when the listeners stop. Pingora's proxy then aborts every connection still
    /// waiting for its request: that too waits for `LATE_REQUEST_GRACE`.
    async fn cleanup(&self) {
        tokio::time::sleep(LATE_REQUEST_GRACE).await;
        ServerApp::cleanup(&*self.inner).await
    }
}
