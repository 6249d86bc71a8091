//! The call to the provider, through Pingora's own `Connector` (its TLS and connection pool).
//!
//! The body is rebuilt: the organization `api_key` field plus the client's image part. The image
//! is written from the body buffer it arrived in, so it is not copied again here. The request
//! goes out with one vectored write on Pingora's connection, and the answer is read with
//! Pingora's HTTP/1 session.
//!
//! The host name is resolved here, not by Pingora: `HttpPeer::new` with a host name resolves
//! with a blocking call and panics when DNS fails.

use std::net::SocketAddr;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::v1::client::HttpSession as Http1Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;
use tokio::io::AsyncWriteExt;

use crate::config::{OrgApiKey, UpstreamConfig};
use crate::image::{ImageBytes, ImageKind};
use crate::verdict::{UpstreamAnswer, UpstreamClass};

mod exchange;
pub use exchange::{call, Charge, Exchange};

/// Why there is no usable answer, split by the billing rule: a call counts against the budget as
/// soon as its request was fully written to the provider, unless the provider's own answer shows
/// it was not billed. So the first question about a failure is whether the whole request was out,
/// and the second whether the provider's answer began (`outcome_unknown`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The request never reached the provider whole (connect failed, the write failed or timed
    /// out, or a pooled connection was found closed before a byte was written on it): the
    /// provider cannot have billed it.
    #[error("request not delivered: {0}")]
    NotDelivered(Undelivered),
    /// The whole request was written, then no usable answer came back (the connection died, the
    /// answer was cut off, too large, or late). The provider may have billed it. `status` is the
    /// answer's status when its head came back (the provider processed the request), `None`
    /// when not even a head did.
    #[error("request delivered, no usable answer: {why}")]
    Delivered {
        why: Unanswered,
        status: Option<u16>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Undelivered {
    #[error("cannot resolve the host: {0}")]
    Resolve(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("write failed: {0}")]
    Write(String),
    #[error("write timed out")]
    WriteTimeout,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unanswered {
    #[error("no answer before the deadline")]
    Timeout,
    #[error("the connection ended before a whole answer: {0}")]
    ConnectionLost(String),
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
}

impl UpstreamError {
    /// Whether the provider may have received the whole request, and so may bill it.
    pub fn may_have_billed(&self) -> bool {
        matches!(self, UpstreamError::Delivered { .. })
    }

    /// Whether the gateway cannot know if the provider billed the call: the whole request was
    /// written and no answer head came back, or only the head of a 4xx, whose body (which tells
    /// a documented refusal from a billed error) never came whole. From here, a provider that
    /// processed the request and failed before answering looks the same as one that never read
    /// it (it closed the kept-alive connection as the request arrived): such a call counts
    /// against the budget, and apart, as uncertain, in the usage history.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            UpstreamError::Delivered {
                status: None | Some(400..=499),
                ..
            }
        )
    }

    /// The error class of a failed call (the `error` label of `upstream_requests_total`).
    pub fn class(&self) -> UpstreamClass {
        match self {
            UpstreamError::NotDelivered(
                Undelivered::Resolve(_) | Undelivered::Connect(_) | Undelivered::Write(_),
            ) => UpstreamClass::Connect,
            UpstreamError::NotDelivered(
                Undelivered::ConnectTimeout | Undelivered::WriteTimeout,
            )
            | UpstreamError::Delivered {
                why: Unanswered::Timeout,
                ..
            } => UpstreamClass::Timeout,
            UpstreamError::Delivered {
                why: Unanswered::ConnectionLost(_),
                ..
            } => UpstreamClass::ConnectionLost,
            UpstreamError::Delivered {
                why: Unanswered::TooLarge(_),
                ..
            } => UpstreamClass::InvalidResponse,
        }
    }

    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            UpstreamError::Delivered {
                why: Unanswered::Timeout,
                ..
            } | UpstreamError::NotDelivered(
                Undelivered::ConnectTimeout | Undelivered::WriteTimeout
            )
        )
    }
}

/// The multipart body sent upstream: a prefix (the key field and the image part's headers),
/// the image, and the closing boundary.
pub struct UpstreamBody {
    pub boundary: String,
    pub pieces: [Bytes; 3],
    pub len: usize,
    /// The `traceparent` (and `tracestate`) the request's head carries, when it is traced.
    pub trace: Option<(String, Option<String>)>,
}

/// Assemble the upstream body. The file name is rebuilt from the checked extension rather than
/// copied from the client, so nothing the client wrote reaches the provider's part headers.
pub fn build_body(
    key: &OrgApiKey,
    extension: &str,
    kind: ImageKind,
    image: &ImageBytes,
) -> UpstreamBody {
    let boundary = format!("liveness-gateway-{}", uuid::Uuid::new_v4().simple());
    let prefix = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"api_key\"\r\n\r\n{k}\r\n--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"image{ext}\"\r\nContent-Type: {mime}\r\n\r\n",
        b = boundary,
        k = key.expose(),
        ext = extension,
        mime = kind.mime()
    );
    let suffix = format!("\r\n--{boundary}--\r\n");
    let pieces = [
        Bytes::from(prefix),
        image.bytes().clone(),
        Bytes::from(suffix),
    ];
    let len = pieces.iter().map(Bytes::len).sum();
    UpstreamBody {
        boundary,
        pieces,
        len,
        trace: None,
    }
}

pub struct UpstreamClient {
    cfg: UpstreamConfig,
    /// How many idle connections the pool keeps.
    pool_size: usize,
    /// The request head up to the boundary, the same for every call: request line, `Host`
    /// (with the port when it is not the scheme's default) and the fixed headers.
    head_prefix: Bytes,
    connector: Connector,
    addr: RwLock<Option<SocketAddr>>,
}

impl UpstreamClient {
    pub fn new(cfg: UpstreamConfig, pool_size: usize) -> Self {
        let mut opts = ConnectorOptions::new(pool_size);
        // A configured CA file replaces the system roots (rustls), so it is only set when asked.
        opts.ca_file = cfg.ca_file.as_ref().map(|p| p.display().to_string());
        let addr = cfg
            .connect_address
            .or_else(|| cfg.host.parse::<std::net::IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, cfg.port));
        let default_port = if cfg.tls { 443 } else { 80 };
        // An IPv6 literal is bracketed in `Host`, as in the URL it came from.
        let name = if cfg.host.contains(':') {
            format!("[{}]", cfg.host)
        } else {
            cfg.host.clone()
        };
        let host = if cfg.port == default_port {
            name
        } else {
            format!("{name}:{}", cfg.port)
        };
        let head_prefix = Bytes::from(format!(
            "POST {} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n\
             Accept-Encoding: identity\r\nUser-Agent: liveness-gateway/{}\r\n\
             Content-Type: multipart/form-data; boundary=",
            cfg.path,
            env!("CARGO_PKG_VERSION"),
        ));
        UpstreamClient {
            connector: Connector::new(Some(opts)),
            pool_size,
            head_prefix,
            addr: RwLock::new(addr),
            cfg,
        }
    }

    /// The address in use, once one is known.
    pub fn address(&self) -> Option<SocketAddr> {
        self.addr.read().ok().and_then(|a| *a)
    }

    /// Resolve the host again; keeps the previous address when resolution fails.
    pub async fn resolve(&self) -> std::io::Result<SocketAddr> {
        if let Some(ip) = self.cfg.connect_address {
            return Ok(SocketAddr::new(ip, self.cfg.port));
        }
        let all: Vec<SocketAddr> = tokio::net::lookup_host((self.cfg.host.as_str(), self.cfg.port))
            .await?
            .collect();
        // IPv4 first: hosts with a broken IPv6 route are common, the reverse is rare.
        let found = all
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| all.first())
            .copied()
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no address for the upstream host",
                )
            })?;
        if let Ok(mut a) = self.addr.write() {
            *a = Some(found);
        }
        Ok(found)
    }

    fn peer(&self, addr: SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, self.cfg.tls, self.cfg.host.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(self.cfg.connect_timeout);
        o.total_connection_timeout = Some(self.cfg.connect_timeout * 2);
        o.read_timeout = Some(self.cfg.read_timeout);
        o.write_timeout = Some(self.cfg.write_timeout);
        o.idle_timeout = Some(self.cfg.pool_idle_timeout);
        peer
    }

    /// One call, bounded by the total deadline. A pooled connection is looked at right before the
    /// request goes out on it (`open_and_idle`): one the provider has closed is dropped for the
    /// next, nothing written. One that turns out dead while the request is still being written is
    /// replaced once by a fresh one (the provider cannot have seen a whole request); after the
    /// request is out, there is no second attempt.
    /// It ends by `deadline` at the latest: `total_timeout` after the first call of the upload
    /// (a failover's second call shares the first's deadline).
    pub async fn call_until(
        &self,
        body: &UpstreamBody,
        deadline: Instant,
    ) -> Result<UpstreamAnswer, UpstreamError> {
        // One deadline for everything, resolution included: the single-flight followers and the
        // shutdown grace period are sized from it (see `Config::longest_call`).
        let mut progress = Progress::Unsent;
        let attempt = async {
            let addr = match self.address() {
                Some(a) => a,
                None => tokio::time::timeout(self.cfg.connect_timeout, self.resolve())
                    .await
                    .map_err(|_| "timed out".to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .map_err(|e| UpstreamError::NotDelivered(Undelivered::Resolve(e)))?,
            };
            let peer = self.peer(addr);
            let mut rewritten = false;
            // Every pooled connection at most once, and a fresh one.
            for _ in 0..self.pool_size + 2 {
                let (session, reused) = self
                    .connector
                    .get_http_session(&peer)
                    .await
                    .map_err(|e| connect_error(&e))?;
                if reused && !open_and_idle(&session) {
                    tracing::debug!(
                        "a pooled upstream connection was closed by the provider; taking another"
                    );
                    continue;
                }
                match self.exchange(session, &peer, body, &mut progress).await {
                    Err(Failure {
                        error,
                        retry_fresh: true,
                    }) if reused && !rewritten => {
                        tracing::debug!(%error, "pooled upstream connection was dead; retrying on a new one");
                        rewritten = true;
                        progress = Progress::Unsent;
                        continue;
                    }
                    other => return other.map_err(|f| f.error),
                }
            }
            Err(UpstreamError::NotDelivered(Undelivered::Write(
                "the connection closed before the request was written".into(),
            )))
        };
        match tokio::time::timeout_at(deadline.into(), attempt).await {
            Ok(r) => r,
            Err(_) => Err(match progress {
                Progress::Unsent => UpstreamError::NotDelivered(Undelivered::WriteTimeout),
                Progress::Sent => UpstreamError::Delivered {
                    why: Unanswered::Timeout,
                    status: None,
                },
                Progress::Head(status) => UpstreamError::Delivered {
                    why: Unanswered::Timeout,
                    status: Some(status),
                },
            }),
        }
    }

    async fn exchange(
        &self,
        s: HttpSession,
        peer: &HttpPeer,
        body: &UpstreamBody,
        progress: &mut Progress,
    ) -> Result<UpstreamAnswer, Failure> {
        let HttpSession::H1(h1) = s else {
            return Err(Failure::not_delivered(
                "the provider is reached over HTTP/1.1 only".into(),
            ));
        };
        let head = self.request_head(body);
        // The request goes out in one vectored write: header, then the body's pieces. Pingora's
        // session flushes its header on its own and writes each body piece separately (four
        // `sendto`s, each waking the provider's side); measured, the single `writev` cut the
        // gateway's CPU per request (see benches/README.md).
        let mut stream = h1.into_inner();
        let [prefix, image, suffix] = body.pieces.clone();
        let mut request = head.chain(prefix).chain(image).chain(suffix);
        let write = async {
            stream.write_all_buf(&mut request).await?;
            stream.flush().await
        };
        match tokio::time::timeout(self.cfg.write_timeout, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(Failure {
                    error: UpstreamError::NotDelivered(Undelivered::Write(e.kind().to_string())),
                    retry_fresh: true,
                })
            }
            Err(_) => {
                return Err(Failure {
                    error: UpstreamError::NotDelivered(Undelivered::WriteTimeout),
                    retry_fresh: false,
                })
            }
        }
        // From here on the provider has the whole request: whatever happens next may be billed.
        *progress = Progress::Sent;
        let mut s = Http1Session::new_with_options(stream, peer);
        s.read_timeout = Some(self.cfg.read_timeout);
        // Interim answers (`100 Continue`, `103 Early Hints`, …) end at their head (RFC 9110,
        // 15.2): they are read past to the final one. Pingora sets no body reader up for them,
        // and reading the body of one panics.
        let mut interim = 0;
        let (status, head) = loop {
            s.read_response()
                .await
                .map_err(|e| Failure::after_send(&e, None))?;
            let Some(h) = s.resp_header() else {
                return Err(Failure::after_send_lost("no response header".into()));
            };
            let status = h.status.as_u16();
            if !(100..200).contains(&status) || status == 101 {
                break (status, h.headers.clone());
            }
            interim += 1;
            if interim > MAX_INTERIM_ANSWERS {
                return Err(Failure::after_send_lost(format!(
                    "more than {MAX_INTERIM_ANSWERS} interim answers"
                )));
            }
        };
        *progress = Progress::Head(status);
        let mut buf = BytesMut::new();
        loop {
            match s.read_body_bytes().await {
                Ok(Some(chunk)) => {
                    if buf.len() + chunk.len() > self.cfg.max_response_bytes {
                        return Err(Failure {
                            error: UpstreamError::Delivered {
                                why: Unanswered::TooLarge(self.cfg.max_response_bytes),
                                status: Some(status),
                            },
                            retry_fresh: false,
                        });
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(Failure::after_send(&e, Some(status))),
            }
        }
        s.respect_keepalive();
        self.connector
            .release_http_session(HttpSession::H1(s), peer, Some(self.cfg.pool_idle_timeout))
            .await;
        Ok(UpstreamAnswer {
            status,
            head,
            body: buf.freeze(),
        })
    }

    /// The request head, written straight to bytes: the fixed part computed once, then the
    /// boundary and the length (one allocation; building Pingora's header map for it took 13).
    /// The path and host were checked when the configuration was loaded.
    fn request_head(&self, body: &UpstreamBody) -> Bytes {
        use std::fmt::Write;
        let mut head = BytesMut::with_capacity(self.head_prefix.len() + body.boundary.len() + 160);
        head.extend_from_slice(&self.head_prefix);
        head.extend_from_slice(body.boundary.as_bytes());
        // Writing into a BytesMut cannot fail.
        let _ = write!(head, "\r\nContent-Length: {}\r\n", body.len);
        // Made by the gateway (`trace::RequestTrace`): hex ids; a client's `tracestate` was
        // parsed and written anew by the propagator, its list members checked.
        if let Some((parent, state)) = &body.trace {
            let _ = write!(head, "traceparent: {parent}\r\n");
            if let Some(state) = state {
                let _ = write!(head, "tracestate: {state}\r\n");
            }
        }
        head.extend_from_slice(b"\r\n");
        head.freeze()
    }

    pub fn total_timeout(&self) -> Duration {
        self.cfg.total_timeout
    }
}

/// The most interim (1xx) answers read before the final one: a provider sends one or two.
const MAX_INTERIM_ANSWERS: usize = 8;

/// How far one exchange got: what a deadline that cuts it short leaves known.
#[derive(Debug, Clone, Copy)]
enum Progress {
    /// The request is not out whole.
    Unsent,
    /// The whole request was written, and no answer head has come.
    Sent,
    /// The answer's head came, with this status.
    Head(u16),
}

/// Whether a pooled connection is still open with nothing to read, as the kernel sees it now.
/// Pingora tests a pooled connection as it hands it out, but through the runtime's record of the
/// socket's readiness: a FIN (or a reset) that has reached the kernel and not yet the runtime's
/// event loop, which a busy runtime polls only between tasks, passes that test. Asked here, right
/// before the request is written, the kernel itself answers. An idle HTTP/1.1 connection has
/// nothing to read: bytes waiting on it (or a TLS alert) also mean it is not to be used.
fn open_and_idle(session: &HttpSession) -> bool {
    use std::os::fd::BorrowedFd;
    use std::os::unix::io::RawFd;
    let HttpSession::H1(h1) = session else {
        return true;
    };
    let fd: RawFd = pingora::protocols::UniqueID::id(h1);
    // SAFETY: the descriptor belongs to `session`, which is borrowed for the whole call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    // The socket is non-blocking (the runtime's): an open, idle one answers `WouldBlock`.
    matches!(
        socket2::SockRef::from(&fd).peek(&mut byte),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    )
}

struct Failure {
    error: UpstreamError,
    /// The connection died before the request was completely written: safe to try a fresh one.
    retry_fresh: bool,
}

impl Failure {
    fn not_delivered(m: String) -> Self {
        Failure {
            error: UpstreamError::NotDelivered(Undelivered::Connect(m)),
            retry_fresh: false,
        }
    }

    /// A failure reading the answer (`status`: its head's, once it came). The whole request is
    /// out, so the provider may have processed (and billed) it: never send it again, whatever
    /// happened to the connection.
    fn after_send(e: &pingora::Error, status: Option<u16>) -> Self {
        let why = match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => Unanswered::Timeout,
            other => Unanswered::ConnectionLost(other.as_str().to_string()),
        };
        Failure {
            error: UpstreamError::Delivered { why, status },
            retry_fresh: false,
        }
    }

    fn after_send_lost(m: String) -> Self {
        Failure {
            error: UpstreamError::Delivered {
                why: Unanswered::ConnectionLost(m),
                status: None,
            },
            retry_fresh: false,
        }
    }
}

fn connect_error(e: &pingora::Error) -> UpstreamError {
    UpstreamError::NotDelivered(match e.etype() {
        ErrorType::ConnectTimedout => Undelivered::ConnectTimeout,
        other => Undelivered::Connect(other.as_str().to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_exact_length_and_one_key_field() {
        let key = OrgApiKey::new("ORG");
        let img = ImageBytes::new(Bytes::from_static(b"\xff\xd8\xffrest"));
        let b = build_body(&key, ".jpg", ImageKind::Jpeg, &img);
        let all: Vec<u8> = b.pieces.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(all.len(), b.len);
        let text = String::from_utf8_lossy(&all);
        assert_eq!(text.matches("name=\"api_key\"").count(), 1);
        assert!(text.contains("filename=\"image.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n\u{fffd}\u{fffd}\u{fffd}rest\r\n"));
        assert!(text.ends_with(&format!("--{}--\r\n", b.boundary)));
        // The image is the very same buffer, not a copy.
        assert_eq!(b.pieces[1].as_ptr(), img.bytes().as_ptr());
    }

    fn client(url: &str) -> UpstreamClient {
        let text = format!(
            "[upstream]\nurl = \"{url}\"\napi_key_env = \"K\"\n\
             [[tenants]]\nid = \"a\"\nkey_sha256 = [\"{}\"]\n",
            "0".repeat(64)
        );
        let cfg = crate::config::Config::from_toml(&text, &|_| Some("ORG".into())).expect("valid");
        UpstreamClient::new(cfg.upstream, 4)
    }

    #[test]
    fn the_request_head_is_one_well_formed_http11_head() {
        let key = OrgApiKey::new("ORG");
        let img = ImageBytes::new(Bytes::from_static(b"\xff\xd8\xffrest"));
        let body = build_body(&key, ".jpg", ImageKind::Jpeg, &img);
        for (url, host) in [
            ("https://kyc.biometric.kz", "kyc.biometric.kz"),
            ("http://127.0.0.1:8081", "127.0.0.1:8081"),
            ("https://[::1]:8443", "[::1]:8443"),
        ] {
            let head = client(url).request_head(&body);
            let text = std::str::from_utf8(&head).expect("ascii");
            let mut lines = text.split("\r\n");
            assert_eq!(
                lines.next(),
                Some("POST /api/v1/backend/liveness/short/ HTTP/1.1")
            );
            let headers: Vec<&str> = lines.by_ref().take_while(|l| !l.is_empty()).collect();
            assert!(text.ends_with("\r\n\r\n"), "{text}");
            assert_eq!(headers.len(), 6, "{headers:?}");
            for expected in [
                format!("Host: {host}"),
                format!(
                    "Content-Type: multipart/form-data; boundary={}",
                    body.boundary
                ),
                format!("Content-Length: {}", body.len),
                "Accept: application/json".to_string(),
                "Accept-Encoding: identity".to_string(),
                format!("User-Agent: liveness-gateway/{}", env!("CARGO_PKG_VERSION")),
            ] {
                assert!(
                    headers.contains(&expected.as_str()),
                    "{expected} in {headers:?}"
                );
            }
        }
    }

    /// Only an answer's head settles a delivered call's billing, and a 4xx head only with its
    /// body (which tells a documented refusal from a billed error).
    #[test]
    fn the_outcome_is_unknown_without_an_answer_head() {
        let delivered = |status| UpstreamError::Delivered {
            why: Unanswered::ConnectionLost("reset".into()),
            status,
        };
        assert!(delivered(None).outcome_unknown());
        assert!(delivered(Some(400)).outcome_unknown());
        assert!(delivered(Some(415)).outcome_unknown());
        assert!(!delivered(Some(200)).outcome_unknown());
        assert!(!delivered(Some(500)).outcome_unknown());
        let timeout = UpstreamError::Delivered {
            why: Unanswered::Timeout,
            status: None,
        };
        assert!(timeout.outcome_unknown() && timeout.may_have_billed());
        let unsent = UpstreamError::NotDelivered(Undelivered::Write("reset".into()));
        assert!(!unsent.outcome_unknown() && !unsent.may_have_billed());
    }

    /// A pooled connection the provider has closed is told apart by the kernel at once, before
    /// the runtime has seen its FIN: the runtime's own readiness (what Pingora tests a pooled
    /// connection with) still says it may be used. An open, idle one passes; one with unread
    /// bytes does not.
    #[tokio::test]
    async fn a_connection_closed_by_the_provider_is_told_before_the_runtime_sees_it() {
        use futures_util::FutureExt;
        use tokio::io::AsyncReadExt;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let upstream = client(&format!("http://{addr}"));
        let peer = upstream.peer(addr);
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (closed_tx, closed_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            use std::io::Write;
            // First connection: kept open. Second: sends a byte. Third: closed, once the
            // runtime of the test is blocked and polls no event.
            let (open, _) = listener.accept().expect("accept");
            let (mut chatty, _) = listener.accept().expect("accept");
            let (closed, _) = listener.accept().expect("accept");
            let _ = go_rx.recv_timeout(Duration::from_secs(10));
            chatty.write_all(b"x").expect("write");
            drop(closed);
            closed_tx.send(()).expect("send");
            let _ = done_rx.recv_timeout(Duration::from_secs(10));
            drop((open, chatty));
        });
        let mut sessions = Vec::new();
        for _ in 0..3 {
            let (s, reused) = upstream
                .connector
                .get_http_session(&peer)
                .await
                .expect("connect");
            assert!(!reused);
            sessions.push(s);
        }
        // Blocking, so that the runtime polls no event meanwhile.
        go_tx.send(()).expect("go");
        closed_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("closed");
        std::thread::sleep(Duration::from_millis(50));
        let closed = sessions.pop().expect("closed");
        let chatty = sessions.pop().expect("chatty");
        let open = sessions.pop().expect("open");
        assert!(open_and_idle(&open), "an open, idle connection");
        assert!(!open_and_idle(&chatty), "bytes wait on it");
        assert!(!open_and_idle(&closed), "the provider closed it");
        let HttpSession::H1(h1) = closed else {
            panic!("HTTP/1.1");
        };
        let mut stream = h1.into_inner();
        let mut byte = [0u8; 1];
        let seen = tokio::task::unconstrained(stream.read(&mut byte)).now_or_never();
        assert!(
            seen.is_none(),
            "the runtime has not seen the FIN yet: {seen:?}"
        );
        drop((open, chatty, stream));
        let _ = done_tx.send(());
        server.join().expect("server");
    }
}
