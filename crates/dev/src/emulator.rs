//! An emulator of the provider's Liveness Short endpoint, for the demo, tests and load tests.
//!
//! It checks the organization key and the file extension as the provider documents, answers a
//! verdict that depends only on the image's digest, and counts what it receives at
//! `GET /__emulator/stats`. Fault modes and latency can be changed while it runs
//! (`POST /__emulator/fault?mode=hang`, `POST /__emulator/latency?ms=250`, `POST /__emulator/reset`);
//! `GET /__emulator/last_image` is the last image it received, byte for byte.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub const LIVENESS_PATH: &str = "/api/v1/backend/liveness/short/";

/// Ways the emulator can misbehave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Never answer.
    Hang,
    /// 500 with an HTML page.
    ServerError,
    /// Close the connection with a TCP reset after reading the request.
    Reset,
    /// 200 with a body that is not JSON.
    InvalidJson,
    NoSubscription,
    SubscriptionNotStarted,
    NoActiveSubscription,
    NoAccess,
    ServiceUnavailable,
    /// A 200 verdict whose failure is the provider's own (`SERVICE_ERROR`), not the photo's.
    ServiceErrorVerdict,
    /// A 200 whose body stops halfway: the connection closes before the declared length.
    CutOff,
    /// A well-formed verdict padded past 1 MiB.
    Oversized,
    /// A 422 in the shape of a FastAPI validation error that echoes the submitted fields, the
    /// organization key among them.
    EchoKey,
    /// A 200 verdict that carries the organization key in an extra field.
    EchoKeyVerdict,
    /// A documented refusal (400 `Client does not have subscription`) that carries the
    /// organization key in an extra field.
    EchoKeyRefusal,
    /// The same refusal in plain text, the key in its sentence.
    EchoKeyText,
    /// A 200 verdict whose `Content-Type` carries the organization key in a parameter.
    EchoKeyHeader,
    /// A kept-alive connection is closed, unread, when the next request on it begins to arrive:
    /// a server whose keep-alive timeout fires just as the request comes in. Requests on a new
    /// connection are answered as usual.
    CloseIdle,
}

/// How an echoing fault writes what it echoes (`POST /__emulator/echo?escape=…`): in a JSON
/// string, in a sentence of plain text, or in a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// As serde_json writes a string (the default).
    Serde,
    /// As PHP's `json_encode` does: `/` as `\/`.
    Php,
    /// Every character as `\uXXXX`.
    Unicode,
    /// PHP's `\/` and .NET's `\u002B` for `+` (and `<`, `>`, `&`, `'`) in one string.
    Mixed,
    /// Percent-encoded, upper-case hex.
    Percent,
    /// Base64, standard alphabet.
    Base64,
}

impl Escape {
    pub const NAMES: [&'static str; 6] = ["serde", "php", "unicode", "mixed", "percent", "base64"];

    pub fn parse(s: &str) -> Option<Escape> {
        Some(match s {
            "serde" => Escape::Serde,
            "php" => Escape::Php,
            "unicode" => Escape::Unicode,
            "mixed" => Escape::Mixed,
            "percent" => Escape::Percent,
            "base64" => Escape::Base64,
            _ => return None,
        })
    }

    /// The text as it stands between the quotes of a JSON string.
    fn in_json(self, text: &str) -> String {
        let serde = |t: &str| {
            let quoted = serde_json::to_string(t).unwrap_or_default();
            quoted[1..quoted.len().saturating_sub(1)].to_string()
        };
        match self {
            Escape::Serde => serde(text),
            Escape::Php | Escape::Unicode | Escape::Mixed => self.in_text(text),
            Escape::Percent | Escape::Base64 => serde(&self.in_text(text)),
        }
    }

    /// The text as it stands in a sentence or a header.
    fn in_text(self, text: &str) -> String {
        use base64::Engine;
        let unicode = |c: char| {
            let mut units = [0u16; 2];
            c.encode_utf16(&mut units)
                .iter()
                .map(|u| format!("\\u{u:04x}"))
                .collect::<String>()
        };
        match self {
            Escape::Serde => text.to_string(),
            Escape::Php => text.replace('/', "\\/"),
            Escape::Unicode => text.chars().map(unicode).collect(),
            Escape::Mixed => text
                .chars()
                .map(|c| match c {
                    '/' => "\\/".to_string(),
                    '+' | '<' | '>' | '&' | '\'' => format!("\\u{:04X}", c as u32),
                    c => c.to_string(),
                })
                .collect(),
            Escape::Percent => text
                .bytes()
                .map(|b| match b {
                    b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => {
                        (b as char).to_string()
                    }
                    b => format!("%{b:02X}"),
                })
                .collect(),
            Escape::Base64 => base64::engine::general_purpose::STANDARD.encode(text),
        }
    }
}

impl Fault {
    pub const NAMES: [&'static str; 19] = [
        "none",
        "hang",
        "server_error",
        "reset",
        "invalid_json",
        "no_subscription",
        "subscription_not_started",
        "no_active_subscription",
        "no_access",
        "service_unavailable",
        "service_error_verdict",
        "cut_off",
        "oversized",
        "echo_key",
        "echo_key_verdict",
        "echo_key_refusal",
        "echo_key_text",
        "echo_key_header",
        "close_idle",
    ];

    pub fn parse(s: &str) -> Option<Fault> {
        Some(match s {
            "none" => Fault::None,
            "hang" => Fault::Hang,
            "server_error" => Fault::ServerError,
            "reset" => Fault::Reset,
            "invalid_json" => Fault::InvalidJson,
            "no_subscription" => Fault::NoSubscription,
            "subscription_not_started" => Fault::SubscriptionNotStarted,
            "no_active_subscription" => Fault::NoActiveSubscription,
            "no_access" => Fault::NoAccess,
            "service_unavailable" => Fault::ServiceUnavailable,
            "service_error_verdict" => Fault::ServiceErrorVerdict,
            "cut_off" => Fault::CutOff,
            "oversized" => Fault::Oversized,
            "echo_key" => Fault::EchoKey,
            "echo_key_verdict" => Fault::EchoKeyVerdict,
            "echo_key_refusal" => Fault::EchoKeyRefusal,
            "echo_key_text" => Fault::EchoKeyText,
            "echo_key_header" => Fault::EchoKeyHeader,
            "close_idle" => Fault::CloseIdle,
            _ => return None,
        })
    }

    fn error_message(self) -> Option<&'static str> {
        Some(match self {
            Fault::NoSubscription => "Client does not have subscription",
            Fault::SubscriptionNotStarted => "Subscription has not started",
            Fault::NoActiveSubscription => "No active or future subscription for technology",
            Fault::NoAccess => "Client does not have access to Liveness technology",
            Fault::ServiceUnavailable => "Could not send image to liveness service",
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    pub listen: SocketAddr,
    /// The organization key it accepts (its id: `default`).
    pub api_key: String,
    /// More keys it accepts, each with its id, each with its own subscription state.
    pub more_keys: Vec<(String, String)>,
    pub latency: Duration,
    pub fault: Fault,
    /// PEM certificate chain and key: serve HTTPS instead of HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// Counters, as served at `/__emulator/stats`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct EmulatorStats {
    /// Requests to the liveness path (the calls the provider would bill or refuse).
    pub calls: u64,
    /// Calls answered with a verdict.
    pub verdicts: u64,
    /// Calls the provider would bill: the whole request was received and the answer (if any)
    /// was not one of the documented refusals (subscription, access, file type).
    pub billable: u64,
    /// Billed calls whose answer reached their client: written to a connection the client had
    /// not closed, and not reset by it unread (see `Watched`), so that it read at least the
    /// status line. The other `billable - answered_billable` were billed and their answer never
    /// reached the client: a hang, a reset after the request was read, an answer that came after
    /// the client had given up.
    pub answered_billable: u64,
    /// Calls whose `api_key` was missing or not the organization key.
    pub wrong_key_calls: u64,
    /// Calls that carried more than one `api_key` field.
    pub duplicate_key_calls: u64,
    pub in_flight: u64,
    pub peak_in_flight: u64,
    /// SHA-256 hex and size of the last image received.
    pub last_image_sha256: Option<String>,
    pub last_image_len: Option<u64>,
    /// Calls by the id of the key they carried (`unknown` for none of its keys).
    pub calls_by_key: std::collections::BTreeMap<String, u64>,
    /// Field names of the last call, in order.
    pub last_fields: Vec<String>,
    /// The W3C trace context (`traceparent`, `tracestate`) of the last call, if it had one.
    pub last_traceparent: Option<String>,
    pub last_tracestate: Option<String>,
    /// SNI server name of the last TLS connection.
    pub last_sni: Option<String>,
    /// Documented refusals (not billed) that never reached their client, as `answered_billable`
    /// tells: the gateway, which never read them, counts those calls as uncertain.
    pub refusals_unheard: u64,
    /// Calls whose body never arrived whole (their client went away): never billed.
    pub incomplete: u64,
    /// Requests that began to arrive on a kept-alive connection the `close_idle` fault then
    /// closed unread: never received whole, never billed, never answered.
    pub closed_on_arrival: u64,
}

struct State {
    /// Every key it accepts: (id, value).
    keys: Vec<(String, String)>,
    /// A subscription error for one key's calls only, by key id.
    key_faults: Mutex<std::collections::HashMap<String, Fault>>,
    fault: Mutex<Fault>,
    /// How the echoing faults write what they echo, and what: the call's key unless set.
    echo: Mutex<(Escape, Option<String>)>,
    latency_ms: AtomicU64,
    stats: Mutex<EmulatorStats>,
    /// The last image received, as received (`GET /__emulator/last_image`).
    last_image: Mutex<Option<Bytes>>,
}

impl State {
    fn fault(&self) -> Fault {
        self.fault.lock().map(|f| *f).unwrap_or(Fault::None)
    }

    fn stats(&self) -> EmulatorStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut EmulatorStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }
}

/// Deterministic per image: prediction in [0, 1] from the digest's first four bytes.
pub fn prediction_for(digest: &[u8; 32]) -> f64 {
    let n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    (n as f64 / u32::MAX as f64 * 1e6).round() / 1e6
}

/// Whether the emulator passes this image.
pub fn passes(image: &[u8]) -> bool {
    prediction_for(&Sha256::digest(image).into()) >= 0.5
}

/// A running emulator on its own thread and runtime; stops when dropped.
pub struct EmulatorHandle {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EmulatorHandle {
    pub fn stats(&self) -> EmulatorStats {
        self.state.stats()
    }

    pub fn set_fault(&self, fault: Fault) {
        if let Ok(mut f) = self.state.fault.lock() {
            *f = fault;
        }
    }

    /// A subscription error (or `Fault::None`) for the calls with one key only.
    pub fn set_key_fault(&self, key_id: &str, fault: Fault) {
        if let Ok(mut f) = self.state.key_faults.lock() {
            f.insert(key_id.to_string(), fault);
        }
    }

    /// How the echoing faults write what they echo, and what they echo instead of the call's
    /// key (`None`: the key).
    pub fn set_echo(&self, escape: Escape, text: Option<&str>) {
        if let Ok(mut e) = self.state.echo.lock() {
            *e = (escape, text.map(str::to_string));
        }
    }

    pub fn set_latency(&self, latency: Duration) {
        self.state
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn reset_stats(&self) {
        self.state.update(|s| {
            *s = EmulatorStats {
                in_flight: s.in_flight,
                ..Default::default()
            }
        });
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start on a thread of its own; returns once the listener is bound.
pub fn spawn(cfg: EmulatorConfig) -> anyhow::Result<EmulatorHandle> {
    let state = Arc::new(State {
        keys: std::iter::once(("default".to_string(), cfg.api_key.clone()))
            .chain(cfg.more_keys.iter().cloned())
            .collect(),
        key_faults: Mutex::new(std::collections::HashMap::new()),
        fault: Mutex::new(cfg.fault),
        echo: Mutex::new((Escape::Serde, None)),
        latency_ms: AtomicU64::new(cfg.latency.as_millis() as u64),
        stats: Mutex::new(EmulatorStats::default()),
        last_image: Mutex::new(None),
    });
    let std_listener = std::net::TcpListener::bind(cfg.listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(tls_acceptor(cert, key)?),
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let st = state.clone();
    let thread = std::thread::Builder::new()
        .name("emulator".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("emulator runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("emulator listener: {e}");
                        return;
                    }
                };
                tokio::select! {
                    _ = accept_loop(listener, st, tls) => {}
                    _ = stop_rx => {}
                }
            });
            rt.shutdown_timeout(Duration::from_millis(100));
        })?;
    Ok(EmulatorHandle {
        addr,
        state,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

fn tls_acceptor(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(cert)?))
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(std::fs::File::open(key)?))?
        .ok_or_else(|| anyhow::anyhow!("no private key in {}", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Linger 0: when the `reset` fault drops a connection, the peer sees a TCP reset.
        // (The deprecation is about a nonzero linger blocking on drop; zero never blocks.)
        #[allow(deprecated)]
        let _ = stream.set_linger(Some(Duration::ZERO));
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let tls = tls.clone();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    if let Ok(tls_stream) = acceptor.accept(stream).await {
                        let sni = tls_stream.get_ref().1.server_name().map(str::to_string);
                        state.update(|s| s.last_sni = sni);
                        serve(tls_stream, fd, state).await;
                    }
                }
                None => serve(stream, fd, state).await,
            }
        });
    }
}

/// Serve one connection; `fd` is its TCP socket's (beneath TLS, if any).
async fn serve<S>(io: S, fd: std::os::fd::RawFd, state: Arc<State>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let usage = Arc::new(ConnUse::default());
    let io = Watched {
        io,
        fd,
        usage: usage.clone(),
        state: state.clone(),
        closed: false,
        written: None,
    };
    let service = hyper::service::service_fn(move |req| {
        let (state, conn) = (state.clone(), usage.clone());
        let ended = Ended::begin(&usage);
        async move {
            let _ended = ended;
            handle(req, state, conn).await
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

/// A call's answer, as it counts once it reaches its client (or does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// A billed call's answer; `read_whole`: the client reads all of it (not a cut-off or an
    /// oversized one, which it drops unread).
    Billed { read_whole: bool },
    /// A documented refusal.
    Refused,
}

impl State {
    /// An answer handed to its client (`heard`), or not: its client had gone.
    fn answered(&self, a: Answer, heard: bool) {
        self.update(|s| match (a, heard) {
            (Answer::Billed { .. }, true) => s.answered_billable += 1,
            (Answer::Refused, false) => s.refusals_unheard += 1,
            _ => {}
        });
    }

    /// An answer counted as heard whose client then reset the connection without reading it.
    fn unheard_after_all(&self, a: Answer) {
        self.update(|s| match a {
            Answer::Billed { .. } => s.answered_billable -= 1,
            Answer::Refused => s.refusals_unheard += 1,
        });
    }
}

/// One connection: its requests (for the `close_idle` fault), and the answer of its call that
/// waits to be written.
#[derive(Default)]
struct ConnUse {
    begun: AtomicU64,
    ended: AtomicU64,
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    answer: Option<Answer>,
    /// The connection is gone: nothing more is written on it.
    gone: bool,
}

impl ConnUse {
    /// Kept alive after an answer, with no request in progress.
    fn idle(&self) -> bool {
        let ended = self.ended.load(Ordering::Acquire);
        ended > 0 && self.begun.load(Ordering::Acquire) == ended
    }

    /// The answer about to be handed to hyper: counted when it is written (see `Watched`), or
    /// as unheard if the connection is already gone.
    fn will_answer(&self, state: &State, a: Answer) {
        let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if w.gone {
            state.answered(a, false);
        } else {
            w.answer = Some(a);
        }
    }
}

/// Counts a request as ended when its service is done (answered, or dropped with its client).
struct Ended(Arc<ConnUse>);

impl Ended {
    fn begin(usage: &Arc<ConnUse>) -> Ended {
        usage.begun.fetch_add(1, Ordering::AcqRel);
        Ended(usage.clone())
    }
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::AcqRel);
    }
}

/// A connection's stream as the server reads and writes it.
///
/// It tells whether a call's answer reached its client, as exactly as the client can tell it:
/// an answer is heard when it is written to a connection its client has not closed (asked of
/// the kernel at that moment: hyper may not have seen a FIN yet), unless the client then resets
/// the connection without reading it (a client whose deadline passed as the answer landed).
/// A client that read the whole answer ends the connection with a FIN, or sends its next
/// request on it; on Linux a socket closed with unread bytes sends a reset.
///
/// Under the `close_idle` fault, the first bytes of a new request on an idle kept-alive
/// connection end the stream instead: the server closes the connection with the request unread
/// (a reset, with linger 0).
struct Watched<S> {
    io: S,
    /// The TCP socket beneath `io`, open while `io` is.
    fd: std::os::fd::RawFd,
    usage: Arc<ConnUse>,
    state: Arc<State>,
    closed: bool,
    /// An answer counted as heard that its client may still reset unread.
    written: Option<Answer>,
}

impl<S> Watched<S> {
    /// Whether the peer has closed the connection (its FIN or reset is here), as the kernel
    /// sees it now.
    fn peer_closed(&self) -> bool {
        // SAFETY: `fd` belongs to `io`, which this struct owns and keeps open.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        match socket2::SockRef::from(&fd).peek(&mut byte) {
            Ok(n) => n == 0,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }
}

impl<S> Drop for Watched<S> {
    fn drop(&mut self) {
        let mut w = self.usage.waiting.lock().unwrap_or_else(|p| p.into_inner());
        w.gone = true;
        if let Some(a) = w.answer.take() {
            self.state.answered(a, false);
        }
    }
}

fn is_reset(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    matches!(e.kind(), ConnectionReset | BrokenPipe | ConnectionAborted)
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match ready!(Pin::new(&mut this.io).poll_read(cx, buf)) {
            // The next request, or a FIN: the client read the whole answer.
            Ok(()) => this.written = None,
            Err(e) => {
                if is_reset(&e) {
                    if let Some(a) = this.written.take() {
                        this.state.unheard_after_all(a);
                    }
                }
                return Poll::Ready(Err(e));
            }
        }
        if buf.filled().len() > before
            && this.usage.idle()
            && this.state.fault() == Fault::CloseIdle
        {
            buf.set_filled(before);
            this.closed = true;
            this.state.update(|s| s.closed_on_arrival += 1);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> Watched<S> {
    /// Before the first bytes of an answer go out: count it, heard or not.
    fn answer_goes_out(&mut self) {
        let answer = self
            .usage
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .answer
            .take();
        if let Some(a) = answer {
            let heard = !self.peer_closed();
            self.state.answered(a, heard);
            if heard && a != (Answer::Billed { read_whole: false }) {
                self.written = Some(a);
            }
        }
    }

    fn wrote(&mut self, r: std::io::Result<usize>) -> std::io::Result<usize> {
        if let Err(e) = &r {
            if is_reset(e) {
                if let Some(a) = self.written.take() {
                    self.state.unheard_after_all(a);
                }
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.answer_goes_out();
        let r = ready!(Pin::new(&mut self.io).poll_write(cx, data));
        Poll::Ready(self.wrote(r))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.answer_goes_out();
        let r = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, bufs));
        Poll::Ready(self.wrote(r))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

type Body = BoxBody<Bytes, std::io::Error>;
type Reply = Result<Response<Body>, std::io::Error>;

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|e| match e {}).boxed()
}

fn respond(status: StatusCode, content_type: &str, body: Body) -> Reply {
    Ok(Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(body)
        .unwrap_or_else(|_| Response::new(full(Bytes::new()))))
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    respond(status, "application/json", full(body))
}

fn detail(status: StatusCode, message: &str) -> Reply {
    json(status, serde_json::json!({ "detail": message }).to_string())
}

async fn handle(req: Request<Incoming>, state: Arc<State>, conn: Arc<ConnUse>) -> Reply {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    };
    match (req.method().as_str(), path.as_str()) {
        ("GET", "/__emulator/stats") => json(
            StatusCode::OK,
            serde_json::to_vec(&state.stats()).unwrap_or_default(),
        ),
        ("GET", "/__emulator/last_image") => {
            let last = state.last_image.lock().ok().and_then(|l| l.clone());
            match last {
                Some(b) => respond(StatusCode::OK, "application/octet-stream", full(b)),
                None => detail(StatusCode::NOT_FOUND, "no image received yet"),
            }
        }
        ("POST", "/__emulator/reset") => {
            state.update(|s| {
                *s = EmulatorStats {
                    in_flight: s.in_flight,
                    ..Default::default()
                }
            });
            json(StatusCode::OK, "{}")
        }
        ("POST", "/__emulator/fault") => match param("mode").as_deref().and_then(Fault::parse) {
            Some(f) => {
                match param("key_id") {
                    Some(id) => {
                        if let Ok(mut g) = state.key_faults.lock() {
                            g.insert(id, f);
                        }
                    }
                    None => {
                        if let Ok(mut g) = state.fault.lock() {
                            *g = f;
                        }
                    }
                }
                json(StatusCode::OK, "{}")
            }
            None => detail(
                StatusCode::BAD_REQUEST,
                &format!("mode must be one of {}", Fault::NAMES.join(", ")),
            ),
        },
        ("POST", "/__emulator/echo") => match param("escape").as_deref().map(Escape::parse) {
            Some(Some(e)) => {
                if let Ok(mut g) = state.echo.lock() {
                    *g = (e, param("text"));
                }
                json(StatusCode::OK, "{}")
            }
            _ => detail(
                StatusCode::BAD_REQUEST,
                &format!("escape must be one of {}", Escape::NAMES.join(", ")),
            ),
        },
        ("POST", "/__emulator/latency") => match param("ms").and_then(|v| v.parse::<u64>().ok()) {
            Some(ms) => {
                state.latency_ms.store(ms, Ordering::Relaxed);
                json(StatusCode::OK, "{}")
            }
            None => detail(StatusCode::BAD_REQUEST, "ms must be a whole number"),
        },
        ("POST", LIVENESS_PATH) => {
            state.update(|s| {
                s.calls += 1;
                s.in_flight += 1;
                s.peak_in_flight = s.peak_in_flight.max(s.in_flight);
            });
            // In its own task: a request received whole is processed (and billed) even when
            // its client leaves at once. Hyper drops the service of a connection whose client
            // closed right after its last byte, sometimes before the body was collected; the
            // provider behind its own front server would still bill it, and the gateway counts
            // it (its billing rule: the whole request was written).
            let task = tokio::spawn(async move {
                let call = Call::default();
                let reply = liveness(req, &state, &call).await;
                state.update(|s| s.in_flight -= 1);
                let answer = if call.billed.load(Ordering::Relaxed) {
                    Some(Answer::Billed {
                        read_whole: !call.partial.load(Ordering::Relaxed),
                    })
                } else if call.refused.load(Ordering::Relaxed) {
                    Some(Answer::Refused)
                } else {
                    None
                };
                if let (Ok(_), Some(a)) = (&reply, answer) {
                    conn.will_answer(&state, a);
                }
                reply
            });
            task.await.map_err(std::io::Error::other)?
        }
        (_, LIVENESS_PATH) => detail(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed."),
        _ => detail(StatusCode::NOT_FOUND, "Not found."),
    }
}

/// What became of one call: billed (the whole request came and was not refused), or refused
/// with one of the documented errors; `partial`: its answer is one the client never reads whole.
#[derive(Default)]
struct Call {
    billed: AtomicBool,
    refused: AtomicBool,
    partial: AtomicBool,
}

async fn liveness(req: Request<Incoming>, state: &State, call: &Call) -> Reply {
    let boundary = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok());
    let trace = ["traceparent", "tracestate"].map(|h| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    state.update(|s| [s.last_traceparent, s.last_tracestate] = trace);
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            state.update(|s| s.incomplete += 1);
            return Err(std::io::Error::other(e));
        }
    };
    // The whole request is here: from now on the call is billed unless it is refused below.
    state.update(|s| s.billable += 1);
    call.billed.store(true, Ordering::Relaxed);
    // A documented refusal: not billed, and counted as heard or not like any refusal.
    let refused = || {
        call.billed.store(false, Ordering::Relaxed);
        call.refused.store(true, Ordering::Relaxed);
        state.update(|s| s.billable -= 1);
    };
    let refuse = |status: StatusCode, message: &str| {
        refused();
        detail(status, message)
    };
    let latency = state.latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let fault = state.fault();
    match fault {
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return detail(StatusCode::GATEWAY_TIMEOUT, "hung");
        }
        Fault::Reset => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "reset fault",
            ))
        }
        Fault::ServerError => {
            return respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/html",
                full(Bytes::from_static(b"<h1>Server Error (500)</h1>")),
            )
        }
        _ => {}
    }
    let Some(boundary) = boundary else {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported media type in request.",
        );
    };
    let mut multipart = multer::Multipart::new(
        futures_util::stream::iter([Ok::<_, std::io::Error>(body)]),
        boundary,
    );
    let mut keys = Vec::new();
    let mut image: Option<(Option<String>, Bytes)> = None;
    let mut fields = Vec::new();
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or("").to_string();
                let filename = field.file_name().map(str::to_string);
                fields.push(name.clone());
                let data = field.bytes().await.unwrap_or_default();
                match name.as_str() {
                    "api_key" => keys.push(String::from_utf8_lossy(&data).to_string()),
                    "image" => image = Some((filename, data)),
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(_) => return detail(StatusCode::BAD_REQUEST, "Multipart form parse error."),
        }
    }
    let key_id = match keys.as_slice() {
        [one] => state
            .keys
            .iter()
            .find(|(_, value)| value == one)
            .map(|(id, _)| id.clone()),
        _ => None,
    };
    let key_ok = key_id.is_some();
    let key_fault = key_id.as_ref().and_then(|id| {
        state
            .key_faults
            .lock()
            .ok()
            .and_then(|f| f.get(id).copied())
    });
    state.update(|s| {
        *s.calls_by_key
            .entry(key_id.clone().unwrap_or_else(|| "unknown".into()))
            .or_default() += 1;
        s.last_fields = fields;
        if !key_ok {
            s.wrong_key_calls += 1;
        }
        if keys.len() > 1 {
            s.duplicate_key_calls += 1;
        }
        if let Some((_, data)) = &image {
            s.last_image_sha256 = Some(hex::encode(Sha256::digest(data)));
            s.last_image_len = Some(data.len() as u64);
        }
    });
    if let (Some((_, data)), Ok(mut last)) = (&image, state.last_image.lock()) {
        *last = Some(data.clone());
    }
    if !key_ok {
        return refuse(StatusCode::BAD_REQUEST, "Client does not have subscription");
    }
    if let Some(message) = key_fault
        .and_then(Fault::error_message)
        .or_else(|| fault.error_message())
    {
        return refuse(StatusCode::BAD_REQUEST, message);
    }
    let Some((filename, data)) = image else {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"image": ["No file was submitted."]}"#,
        );
    };
    let ext_ok = filename
        .as_deref()
        .and_then(|f| f.rsplit_once('.'))
        .is_some_and(|(_, e)| ["jpg", "png", "jpeg"].contains(&e.to_ascii_lowercase().as_str()));
    if !ext_ok {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            liveness_gateway::error::PROVIDER_EXTENSION_DETAIL,
        );
    }
    let (escape, echoed) = state
        .echo
        .lock()
        .map(|e| e.clone())
        .unwrap_or((Escape::Serde, None));
    let echoed = echoed.unwrap_or_else(|| keys[0].clone());
    // A JSON body with the echo written in place of the string `ECHO` (as `escape` says).
    let with_echo = |body: serde_json::Value| {
        body.to_string().replace(
            "\"\\u0000echo\\u0000\"",
            &format!("\"{}\"", escape.in_json(&echoed)),
        )
    };
    const ECHO: &str = "\u{0}echo\u{0}";
    match fault {
        Fault::EchoKey => {
            // FastAPI's validation error echoes each field it refused, input included.
            let body = serde_json::json!({"detail": [
                {"type": "string_too_short", "loc": ["body", "api_key"], "msg": "String should have at least 64 characters", "input": ECHO},
            ]});
            return json(StatusCode::UNPROCESSABLE_ENTITY, with_echo(body));
        }
        Fault::EchoKeyRefusal => {
            refused();
            let body =
                serde_json::json!({"detail": "Client does not have subscription", "api_key": ECHO});
            return json(StatusCode::BAD_REQUEST, with_echo(body));
        }
        Fault::EchoKeyText => {
            refused();
            let text = format!(
                "Client does not have subscription (api_key: {})",
                escape.in_text(&echoed)
            );
            return respond(StatusCode::BAD_REQUEST, "text/plain", full(text));
        }
        _ => {}
    }
    if fault == Fault::InvalidJson {
        return json(StatusCode::OK, Bytes::from_static(b"{\"result\": tru"));
    }
    let digest: [u8; 32] = Sha256::digest(&data).into();
    let prediction = prediction_for(&digest);
    let result = prediction >= 0.5;
    let (result, failure) = match fault {
        Fault::ServiceErrorVerdict => (
            false,
            serde_json::json!({"type": "SERVICE_ERROR", "detail": "Could not send image to liveness service"}),
        ),
        _ if result => (true, serde_json::Value::Null),
        _ => (
            false,
            serde_json::json!({"type": "CALC_RESULT", "detail": "Low overall prediction"}),
        ),
    };
    let mut body = serde_json::json!({
        "backend_session_id": uuid::Uuid::new_v4().to_string(),
        "result": result,
        "prediction": format!("{prediction:.6}"),
        "created_at": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        "failure_reason": failure,
    });
    match fault {
        Fault::Oversized => {
            body["padding"] = "x".repeat(1 << 21).into();
            call.partial.store(true, Ordering::Relaxed);
        }
        Fault::EchoKeyVerdict => body["api_key"] = ECHO.into(),
        _ => {}
    }
    state.update(|s| s.verdicts += 1);
    let body = Bytes::from(with_echo(body));
    if fault == Fault::EchoKeyHeader {
        let content_type = format!("application/json; x={}", escape.in_text(&echoed));
        return respond(StatusCode::OK, &content_type, full(body));
    }
    if fault == Fault::CutOff {
        call.partial.store(true, Ordering::Relaxed);
        // Declare the whole length, send half, then fail the body: hyper closes the connection.
        // The failure waits a moment: hyper sends what it holds only once the body has nothing
        // ready, and a failure ready at once closed the connection before the head went out.
        let half = body.slice(..body.len() / 2);
        let frames = futures_util::StreamExt::chain(
            futures_util::stream::once(async { Ok(hyper::body::Frame::data(half)) }),
            futures_util::stream::once(async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Err(std::io::Error::other("cut off"))
            }),
        );
        return Ok(Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(StreamBody::new(frames).boxed())
            .unwrap_or_else(|_| Response::new(full(Bytes::new()))));
    }
    json(StatusCode::OK, body)
}
