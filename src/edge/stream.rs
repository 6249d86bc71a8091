//! A connection's stream as Pingora sees it, with the deadlines and the head limit Pingora does
//! not have. It follows the connection by the bytes that pass, from its accept to its close:
//! - HTTP/1: waiting for a request, idle (until `keepalive_timeout` after the accept, a TLS
//!   connection's after its handshake, for the first one, or after the last answer for the next ones: a client's pool opens connections
//!   ahead of its requests and keeps them as long as those it has used; blank lines before a
//!   request line do not start a request, as the parser skips them), then its head (until
//!   `header_timeout` after its first byte, at most `max_header_bytes`; it ends where httparse ends it: at the first
//!   empty line after the request line), then its body and answer (no deadline here: the body
//!   has its own, in `intake`). Once a final answer is written, what the client still sends is
//!   only drained (by the request's own bounded drain, `intake.drain_*`) and never read as a head:
//!   the connection gets one answer per request. The next request starts when Pingora reuses the connection.
//! - HTTP/2 (ALPN `h2`, or h2c with prior knowledge): the same rule. Idle (`keepalive_timeout`)
//!   until the client preface begins and again between the preface and the first HEADERS frame,
//!   to the same idle deadline (a preface is not a request: it does not move it, whole or split
//!   over reads); the preface once begun, and the first header block from its HEADERS frame to its end
//!   (END_HEADERS), each within `header_timeout`; from then on the `h2` crate's limits and
//!   Pingora's idle timeout apply (set `header_timeout` past `keepalive_timeout`, in `server`,
//!   so that it never cuts a first head these deadlines still allow). Until the client acknowledges the gateway's SETTINGS, its frames are
//!   followed for that acknowledgement too (see `FrameScan`).
//!
//! Past a deadline a connection waiting for a request is closed as if by its client; a head
//! past its deadline or its size gets a JSON 408 or 431 first.

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use prometheus::IntCounterVec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::Ticket;
use crate::error::GatewayError;

/// The time and size bounds of one listener's connections.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No byte of a request yet, but `blank` bytes of blank lines.
    Waiting { first: bool, blank: usize },
    /// Inside a request head: its bytes so far (blank lines before it included), and the last
    /// three read (to find its end).
    Head { bytes: usize, last: u32 },
    /// The body and the answer.
    Body,
    /// A final answer is written: what comes now is the rest of a body, drained.
    Answered,
}

#[derive(Debug)]
enum Proto {
    Http1(Phase),
    /// HTTP/2, followed frame by frame until `FrameScan::finished`.
    H2(FrameScan),
    /// HTTP/2 after that: passed through.
    Open,
}

/// Follows an HTTP/2 connection's frames from the client by their 9-byte headers (RFC 9113,
/// 4.1), passing them on (payloads are never parsed or kept), to the end of the first header
/// block and to the client's acknowledgement of the gateway's SETTINGS.
///
/// Those SETTINGS raise each stream's flow-control window from the protocol's 65,535 bytes to
/// `config::H2_STREAM_WINDOW`, and the `h2` crate holds a client to 65,535 until it has
/// acknowledged them (RFC 9113, 6.5.3 allows it). OkHttp 3 (Android's stack before 4.x,
/// square/okhttp#5422) applies them at once and writes its acknowledgement later, from another
/// thread: an upload on a new connection could pass 65,535 bytes first, and `h2` reset it
/// (FLOW_CONTROL_ERROR). A compliant client acknowledges the SETTINGS before it acts on the
/// connection's WINDOW_UPDATE sent after them, so until its acknowledgement it may send 65,535
/// bytes of DATA in all. More than that shows a client that has applied the SETTINGS: the scan
/// hands `h2` the acknowledgement right before that DATA, and drops the client's own when it
/// comes. The SETTINGS change nothing else on `h2`'s side (its header-list limit holds from the
/// handshake), so this is `h2` taking the larger window from the client's first use of it, as
/// nginx and Go's server take theirs from each stream's start. At most one incomplete frame
/// header (8 bytes) waits between reads.
#[derive(Debug)]
struct FrameScan {
    preface_left: usize,
    header: [u8; FRAME_HEADER],
    have: usize,
    payload_left: usize,
    /// The frame whose payload is passing ends the first header block.
    ends_head: bool,
    /// A HEADERS frame has come: the first request's head is under way.
    head_begun: bool,
    head_done: bool,
    /// DATA bytes (flow-controlled: the whole payload) before the client's acknowledgement.
    data_before_ack: u64,
    ack: Ack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ack {
    /// The client has not acknowledged the gateway's SETTINGS yet.
    Awaited,
    /// The scan gave `h2` the acknowledgement; the client's own is still to come and is dropped.
    Given,
    /// Acknowledged.
    Done,
}

/// The client preface of HTTP/2 (RFC 9113, 3.4).
pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
/// The flow-control window every stream and the connection start with (RFC 9113, 6.9.2).
const INITIAL_WINDOW: u64 = 65_535;
/// A SETTINGS frame with ACK, on stream 0, without payload.
const SETTINGS_ACK: [u8; FRAME_HEADER] = [0, 0, 0, SETTINGS, ACK, 0, 0, 0, 0];

impl FrameScan {
    fn new() -> Self {
        FrameScan {
            preface_left: H2_PREFACE.len(),
            header: [0; FRAME_HEADER],
            have: 0,
            payload_left: 0,
            ends_head: false,
            head_begun: false,
            head_done: false,
            data_before_ack: 0,
            ack: Ack::Awaited,
        }
    }

    /// Whether the client is in the middle of something the head deadline bounds: the preface
    /// begun and not whole, or the first HEADERS frame come and its header block not ended.
    /// Otherwise it has sent nothing of a request yet: the connection is idle.
    fn in_head(&self) -> bool {
        let preface_begun = self.preface_left < H2_PREFACE.len();
        (preface_begun && self.preface_left > 0) || (self.head_begun && !self.head_done)
    }

    /// Both ends reached: the rest of the connection passes untouched.
    fn finished(&self) -> bool {
        self.head_done && self.ack == Ack::Done
    }

    /// Take the next bytes from the client; what `h2` is to read of them goes to `out`. The
    /// bytes of an incomplete frame header wait for the rest of it, so that the acknowledgement
    /// can go before a frame or the client's own be taken out whole.
    fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<u8>) {
        let skip = self.preface_left.min(bytes.len());
        self.preface_left -= skip;
        out.extend_from_slice(&bytes[..skip]);
        bytes = &bytes[skip..];
        while !bytes.is_empty() {
            if self.finished() {
                out.extend_from_slice(bytes);
                return;
            }
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                out.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                if self.payload_left == 0 && self.ends_head {
                    self.head_done = true;
                }
                continue;
            }
            let n = (FRAME_HEADER - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == FRAME_HEADER {
                self.have = 0;
                self.frame(out);
            }
        }
    }

    /// A whole frame header has come: pass it on (or not), after the acknowledgement if due.
    fn frame(&mut self, out: &mut Vec<u8>) {
        let h = self.header;
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let on_connection = h[5..9] == [0; 4];
        self.payload_left = len;
        self.ends_head = matches!(kind, HEADERS | CONTINUATION) && flags & END_HEADERS != 0;
        self.head_begun |= kind == HEADERS;
        match (kind, self.ack) {
            (SETTINGS, Ack::Given) if flags & ACK != 0 && len == 0 && on_connection => {
                self.ack = Ack::Done;
                return;
            }
            (SETTINGS, Ack::Awaited | Ack::Given) if flags & ACK != 0 => self.ack = Ack::Done,
            (DATA, Ack::Awaited) => {
                self.data_before_ack += len as u64;
                if self.data_before_ack > INITIAL_WINDOW {
                    out.extend_from_slice(&SETTINGS_ACK);
                    self.ack = Ack::Given;
                }
            }
            _ => {}
        }
        out.extend_from_slice(&h);
        if len == 0 && self.ends_head {
            self.head_done = true;
        }
    }
}

/// How a plain connection on an h2c listener opens, told by its first bytes.
pub(super) enum Opening {
    Http1,
    H2,
    /// Closed, or silent past the deadline.
    Gone,
}

pub struct GuardedStream {
    inner: Stream,
    /// Bytes read ahead of Pingora (the h2c preface check), given to it first.
    ahead: Vec<u8>,
    ahead_at: usize,
    /// HTTP/2 bytes the scan has passed on, for Pingora to read.
    ready: Vec<u8>,
    ready_at: usize,
    proto: Proto,
    /// HTTP/2: the deadline running is the head's (else the idle one).
    h2_in_head: bool,
    /// Until when the connection may wait for its next request: `keepalive_timeout` after its
    /// accept (its handshake), or after its last answer. An HTTP/2 preface does not move it:
    /// it is not a request.
    idle_until: Instant,
    /// When the first byte of a head came, read by `open_h2c` before the head was told apart:
    /// the head's deadline counts from there.
    head_from: Option<Instant>,
    deadline: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
    /// Cut: reads end here.
    ended: bool,
    limits: Limits,
    cut: IntCounterVec,
    _ticket: Ticket,
}

impl std::fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedStream")
            .field("proto", &self.proto)
            .field("inner", &self.inner)
            .finish()
    }
}

/// A whole HTTP/1.1 answer for an error the edge writes itself, closing the connection.
fn canned(err: GatewayError) -> Vec<u8> {
    let body = err.body();
    let status = err.status();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

fn head_timeout_answer() -> &'static [u8] {
    static A: OnceLock<Vec<u8>> = OnceLock::new();
    A.get_or_init(|| canned(GatewayError::HeaderTimeout))
}

fn head_too_large_answer() -> &'static [u8] {
    static A: OnceLock<Vec<u8>> = OnceLock::new();
    A.get_or_init(|| canned(GatewayError::HeaderTooLarge))
}

/// Whether this write starts a final answer (status 2xx to 5xx), not an interim `100 Continue`.
fn is_final_status_line(buf: &[u8]) -> bool {
    buf.len() > 9 && buf.starts_with(b"HTTP/1.") && (b'2'..=b'5').contains(&buf[9])
}

/// The empty line that ends a head, seen in the last bytes: httparse ends a line at LF (after
/// CR or not), so an LF followed by LF, or by CR LF.
fn ends_head(last: u32) -> bool {
    last & 0xFFFF == 0x0A0A || last & 0x00FF_FFFF == 0x000A_0D0A
}

/// An HTTP/1 connection's phase after the bytes `new`: blank lines while waiting leave it
/// waiting (they count towards the head's size all the same, as the parser buffers them), the
/// first other byte starts a head, the empty line after it ends it. `Err` when the head (its
/// blank lines included) is over `max` bytes. A scan of each byte once, rather than httparse
/// on a copy of the head: Pingora buffers the head already (a copy would double what each slow
/// head holds), and parsing again at every read of a trickled head is quadratic; a test holds
/// the scan to httparse's ends.
fn scan(phase: Phase, mut new: &[u8], max: usize) -> Result<Phase, ()> {
    let (mut bytes, mut last) = match phase {
        Phase::Waiting { first, blank } => {
            let skipped = new
                .iter()
                .take_while(|b| matches!(b, b'\r' | b'\n'))
                .count();
            let blank = blank + skipped;
            new = &new[skipped..];
            if blank > max {
                return Err(());
            }
            if new.is_empty() {
                return Ok(Phase::Waiting { first, blank });
            }
            (blank, 0)
        }
        Phase::Head { bytes, last } => (bytes, last),
        Phase::Body | Phase::Answered => return Ok(phase),
    };
    for (i, b) in new.iter().enumerate() {
        last = (last << 8) | u32::from(*b);
        if ends_head(last) {
            return if bytes + i + 1 > max {
                Err(())
            } else {
                Ok(Phase::Body)
            };
        }
    }
    bytes += new.len();
    if bytes > max {
        Err(())
    } else {
        Ok(Phase::Head { bytes, last })
    }
}

impl GuardedStream {
    /// Guard `inner`, accepted at `accepted` (its TLS handshake, if any, done): idle until its
    /// first request begins, for `keepalive_timeout` after the accept, as a kept-alive
    /// connection is between requests. A client's pool opens connections ahead of its requests,
    /// and keeps them as long as those it has used: cut sooner, such a connection was closed
    /// under the request the client sent on it before it saw the close.
    pub(super) fn new(
        inner: Stream,
        limits: Limits,
        ticket: Ticket,
        cut: IntCounterVec,
        accepted: Instant,
    ) -> Self {
        let deadline = accepted + limits.keepalive_timeout;
        let proto = if matches!(inner.selected_alpn_proto(), Some(ALPN::H2)) {
            Proto::H2(FrameScan::new())
        } else {
            Proto::Http1(Phase::Waiting {
                first: true,
                blank: 0,
            })
        };
        GuardedStream {
            inner,
            ahead: Vec::new(),
            ahead_at: 0,
            ready: Vec::new(),
            ready_at: 0,
            proto,
            h2_in_head: false,
            idle_until: deadline,
            head_from: None,
            deadline: Some(deadline),
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            ended: false,
            limits,
            cut,
            _ticket: ticket,
        }
    }

    /// Whether the connection speaks HTTP/2 (by ALPN, or found by `open_h2c`).
    pub(super) fn is_h2(&self) -> bool {
        !matches!(self.proto, Proto::Http1(_))
    }

    /// On a plain listener that takes h2c: read the first bytes, within the head deadline,
    /// until they are HTTP/2's whole preface or cannot be. They stay to be read (and
    /// Pingora's own check peeks at them).
    pub(super) async fn open_h2c(&mut self) -> Opening {
        loop {
            let have = self.ahead.len();
            if !H2_PREFACE.starts_with(&self.ahead) {
                return Opening::Http1;
            }
            if have == H2_PREFACE.len() {
                self.proto = Proto::H2(FrameScan::new());
                // The head's deadline runs (the preface's): idle again once it has passed.
                self.h2_in_head = true;
                return Opening::H2;
            }
            let mut chunk = [0u8; H2_PREFACE.len()];
            let want = H2_PREFACE.len() - have;
            let Some(deadline) = self.deadline else {
                return Opening::Gone;
            };
            match tokio::time::timeout_at(deadline, self.inner.read(&mut chunk[..want])).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Opening::Gone,
                Ok(Ok(n)) => {
                    self.ahead.extend_from_slice(&chunk[..n]);
                    if have == 0 && H2_PREFACE.starts_with(&self.ahead) {
                        // A head begun (a preface, or an HTTP/1 head that starts like one,
                        // `POST`): due whole by the head's deadline, from this first byte.
                        let now = Instant::now();
                        self.head_from = Some(now);
                        self.set_deadline(Some(now + self.limits.header_timeout));
                    }
                }
                Err(_) => {
                    self.cut(if have == 0 {
                        "idle_timeout"
                    } else {
                        "header_timeout"
                    });
                    return Opening::Gone;
                }
            }
        }
    }

    /// Pingora keeps the connection for another request: it is idle again.
    pub(super) fn next_request(&mut self) {
        self.proto = Proto::Http1(Phase::Waiting {
            first: false,
            blank: 0,
        });
        self.idle_until = Instant::now() + self.limits.keepalive_timeout;
        self.set_deadline(Some(self.idle_until));
    }

    fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
        if let Some(d) = deadline {
            self.sleep.as_mut().reset(d);
        }
    }

    /// Follow an HTTP/1 connection through bytes just read; an error when a head is too large.
    fn observe(&mut self, new: &[u8]) -> Result<(), ()> {
        match &mut self.proto {
            Proto::Open | Proto::H2(_) => Ok(()),
            Proto::Http1(phase) => {
                let phase = *phase;
                self.observe_http1(phase, new)
            }
        }
    }

    /// Read HTTP/2 while its frames are followed: what comes from the client goes through the
    /// scan, and Pingora reads what the scan passes on.
    fn poll_read_h2(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if self.ready_at < self.ready.len() {
                let n = buf.remaining().min(self.ready.len() - self.ready_at);
                buf.put_slice(&self.ready[self.ready_at..self.ready_at + n]);
                self.ready_at += n;
                if self.ready_at == self.ready.len() {
                    self.ready_at = 0;
                    if matches!(self.proto, Proto::Open) {
                        self.ready = Vec::new();
                    } else {
                        self.ready.clear();
                    }
                }
                return Poll::Ready(Ok(()));
            }
            let Proto::H2(scan) = &mut self.proto else {
                return Pin::new(&mut self.inner).poll_read(cx, buf);
            };
            if self.ahead_at < self.ahead.len() {
                scan.feed(&self.ahead[self.ahead_at..], &mut self.ready);
                self.ahead = Vec::new();
                self.ahead_at = 0;
            } else {
                let before = buf.filled().len();
                match Pin::new(&mut self.inner).poll_read(cx, buf) {
                    Poll::Ready(Ok(())) => {
                        if buf.filled().len() == before {
                            return Poll::Ready(Ok(()));
                        }
                        scan.feed(&buf.filled()[before..], &mut self.ready);
                        buf.set_filled(before);
                    }
                    Poll::Pending => {
                        if self.deadline.is_none() || self.sleep.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        return self.expire(cx);
                    }
                    other => return other,
                }
            }
            if let Proto::H2(scan) = &self.proto {
                let (head_done, finished, in_head) =
                    (scan.head_done, scan.finished(), scan.in_head());
                if head_done {
                    if self.deadline.is_some() {
                        self.set_deadline(None);
                    }
                } else if in_head != self.h2_in_head {
                    // A head begun has `header_timeout`; between the preface and the first
                    // HEADERS the connection is idle, until the idle deadline it had.
                    self.h2_in_head = in_head;
                    let deadline = if in_head {
                        Instant::now() + self.limits.header_timeout
                    } else {
                        self.idle_until
                    };
                    self.set_deadline(Some(deadline));
                }
                if finished {
                    self.proto = Proto::Open;
                }
            }
        }
    }

    fn observe_http1(&mut self, phase: Phase, new: &[u8]) -> Result<(), ()> {
        let next = scan(phase, new, self.limits.max_header_bytes)?;
        match (phase, next) {
            (Phase::Waiting { .. }, Phase::Head { .. }) => {
                let from = self.head_from.take().unwrap_or_else(Instant::now);
                self.set_deadline(Some(from + self.limits.header_timeout))
            }
            (Phase::Waiting { .. } | Phase::Head { .. }, Phase::Body) => self.set_deadline(None),
            _ => {}
        }
        self.proto = Proto::Http1(next);
        Ok(())
    }

    /// Best effort: write the edge's own answer before cutting the connection.
    fn answer(&mut self, cx: &mut Context<'_>, bytes: &[u8]) {
        let _ = Pin::new(&mut self.inner).poll_write(cx, bytes);
        let _ = Pin::new(&mut self.inner).poll_flush(cx);
    }

    fn cut(&self, reason: &str) {
        self.cut.with_label_values(&[reason]).inc();
    }

    /// The deadline has passed: end the connection as its phase says.
    fn expire(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.deadline = None;
        self.ended = true;
        match self.proto {
            Proto::Http1(Phase::Head { .. }) => {
                self.cut("header_timeout");
                self.answer(cx, head_timeout_answer());
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "request head not received in time",
                )))
            }
            // Nothing of a request yet: closed as if by the client.
            Proto::Http1(Phase::Waiting { .. }) => {
                self.cut("idle_timeout");
                Poll::Ready(Ok(()))
            }
            Proto::H2(_) => {
                self.cut(if self.h2_in_head {
                    "header_timeout"
                } else {
                    "idle_timeout"
                });
                Poll::Ready(Ok(()))
            }
            Proto::Http1(Phase::Body | Phase::Answered) | Proto::Open => Poll::Ready(Ok(())),
        }
    }

    fn too_large(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.ended = true;
        self.cut("header_too_large");
        self.answer(cx, head_too_large_answer());
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "request head too large",
        )))
    }

    fn note_write(&mut self, first: &[u8]) {
        if let Proto::Http1(Phase::Head { .. } | Phase::Body) = self.proto {
            if is_final_status_line(first) {
                // What the client still sends is the rest of a refused body: the request's own
                // drain reads it within its bounds (`intake.drain_timeout`, `drain_max_bytes`)
                // and the connection then closes, or Pingora hands a kept-alive one back.
                self.proto = Proto::Http1(Phase::Answered);
                self.set_deadline(None);
            }
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(Ok(()));
        }
        if matches!(this.proto, Proto::H2(_)) || this.ready_at < this.ready.len() {
            return this.poll_read_h2(cx, buf);
        }
        if this.ahead_at < this.ahead.len() {
            let n = buf.remaining().min(this.ahead.len() - this.ahead_at);
            let given = this.ahead[this.ahead_at..this.ahead_at + n].to_vec();
            this.ahead_at += n;
            if this.ahead_at == this.ahead.len() {
                this.ahead = Vec::new();
                this.ahead_at = 0;
            }
            buf.put_slice(&given);
            if this.observe(&given).is_err() {
                return this.too_large(cx);
            }
            return Poll::Ready(Ok(()));
        }
        if matches!(this.proto, Proto::Open) {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.observe(&buf.filled()[before..]).is_err() {
                    return this.too_large(cx);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.deadline.is_none() || this.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.expire(cx)
            }
            other => other,
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.note_write(buf);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
                this.note_write(first);
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<std::sync::Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(
        &self,
    ) -> Option<std::sync::Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<std::sync::Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

/// Pingora peeks for the h2c preface; `open_h2c` has read it already, under the deadline, so
/// the peek is answered from those bytes and never waits.
#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        let ahead = &self.ahead[self.ahead_at..];
        let n = buf.len().min(ahead.len());
        buf[..n].copy_from_slice(&ahead[..n]);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_status_lines_are_told_from_interim_ones() {
        assert!(is_final_status_line(b"HTTP/1.1 200 OK\r\n"));
        assert!(is_final_status_line(
            b"HTTP/1.1 503 Service Unavailable\r\n"
        ));
        assert!(!is_final_status_line(b"HTTP/1.1 100 Continue\r\n"));
        assert!(!is_final_status_line(b"{\"result\": true}"));
    }

    #[test]
    fn canned_answers_are_whole_http_answers_with_json() {
        let a = String::from_utf8(head_timeout_answer().to_vec()).expect("utf8");
        assert!(a.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{a}");
        let (head, body) = a.split_once("\r\n\r\n").expect("head");
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(body.contains("\"code\":\"header_timeout\""));
        let b = String::from_utf8(head_too_large_answer().to_vec()).expect("utf8");
        assert!(b.starts_with("HTTP/1.1 431 "), "{b}");
    }

    /// Where the scan ends a head fed byte by byte (the index after its last byte).
    fn scan_end(bytes: &[u8]) -> Option<usize> {
        let mut phase = Phase::Waiting {
            first: true,
            blank: 0,
        };
        for (i, b) in bytes.iter().enumerate() {
            phase = scan(phase, &[*b], 1 << 20).expect("within the limit");
            if phase == Phase::Body {
                return Some(i + 1);
            }
        }
        None
    }

    fn httparse_end(bytes: &[u8]) -> Option<usize> {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        match httparse::Request::new(&mut headers).parse(bytes) {
            Ok(httparse::Status::Complete(n)) => Some(n),
            _ => None,
        }
    }

    #[test]
    fn a_head_ends_where_httparse_ends_it() {
        for head in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"[..],
            b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"\n\n\r\nGET / HTTP/1.1\nHost: a\n\n",
            b"GET / HTTP/1.1\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\n\r\nrest",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n",
            b"\r\n\r\n",
        ] {
            assert_eq!(
                scan_end(head),
                httparse_end(head),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn blank_lines_keep_a_connection_waiting_and_count_towards_the_limit() {
        let w = Phase::Waiting {
            first: false,
            blank: 0,
        };
        assert_eq!(
            scan(w, b"\r\n\r\n", 16),
            Ok(Phase::Waiting {
                first: false,
                blank: 4
            })
        );
        assert_eq!(scan(w, &[b'\n'; 17], 16), Err(()));
        let head = b"GET / HTTP/1.1\r\n\r\n";
        let mut two = b"\r\n".to_vec();
        two.extend_from_slice(head);
        assert_eq!(scan(w, &two, 20), Ok(Phase::Body));
        let mut four = b"\r\n\r\n".to_vec();
        four.extend_from_slice(head);
        assert_eq!(scan(w, &four, 20), Err(()));
        assert!(matches!(
            scan(w, b"\r\nGET", 20),
            Ok(Phase::Head { bytes: 5, .. })
        ));
        // After the answer, bytes are drained, not read as a head.
        assert_eq!(
            scan(Phase::Answered, b"\r\n\r\nxxxxxxxxxxxxxxxxxxxxxxxxx", 8),
            Ok(Phase::Answered)
        );
    }

    fn frame_on(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        frame_on(kind, flags, 1, payload)
    }

    /// What the scan passes on of `conn` fed in pieces of `sizes` (cycled), and whether it
    /// finished.
    fn passed(conn: &[u8], sizes: &[usize]) -> (Vec<u8>, bool) {
        let mut scan = FrameScan::new();
        let mut out = Vec::new();
        let mut rest = conn;
        for size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, next) = rest.split_at((*size).min(rest.len()));
            scan.feed(piece, &mut out);
            rest = next;
        }
        (out, scan.finished())
    }

    /// Pieces of every size from 1 to 23 bytes, and the whole at once.
    fn piecings() -> Vec<Vec<usize>> {
        let mut all: Vec<Vec<usize>> = (1..24).map(|n| vec![n]).collect();
        all.push(vec![7, 1, 16_393, 2, 9, 40_000, 3]);
        all.push(vec![usize::MAX]);
        all
    }

    #[test]
    fn the_first_http2_header_block_ends_at_end_headers() {
        let mut conn = H2_PREFACE.to_vec();
        conn.extend(frame_on(SETTINGS, 0, 0, &[0; 6]));
        conn.extend(frame_on(0x6, 0, 0, &[0; 8])); // PING
        conn.extend(frame(HEADERS, 0, b"abc"));
        conn.extend(frame(CONTINUATION, END_HEADERS, b"de"));
        let end = conn.len();
        conn.extend(frame(DATA, 0x1, b"body"));
        // Byte by byte: done at the last byte of the CONTINUATION frame.
        let mut scan = FrameScan::new();
        let mut out = Vec::new();
        let done = conn.iter().position(|b| {
            scan.feed(&[*b], &mut out);
            scan.head_done
        });
        assert_eq!(done, Some(end - 1));
        for sizes in piecings() {
            assert_eq!(passed(&conn, &sizes).0, conn, "{sizes:?}");
        }
        let mut scan = FrameScan::new();
        scan.feed(&conn[..end - 1], &mut out);
        assert!(!scan.head_done);
        // A HEADERS frame with END_HEADERS and no payload ends it too.
        let mut bare = H2_PREFACE.to_vec();
        bare.extend(frame(HEADERS, END_HEADERS | 0x1, b""));
        let mut scan = FrameScan::new();
        scan.feed(&bare, &mut out);
        assert!(scan.head_done);
    }

    /// The opening of a client's connection: preface, SETTINGS, a WINDOW_UPDATE on the
    /// connection, a request's HEADERS on stream 1.
    fn opening() -> Vec<u8> {
        let mut conn = H2_PREFACE.to_vec();
        conn.extend(frame_on(SETTINGS, 0, 0, &[0, 4, 0, 0xff, 0xff, 0xff]));
        conn.extend(frame_on(0x8, 0, 0, &[0, 0xff, 0, 0])); // WINDOW_UPDATE
        conn.extend(frame_on(HEADERS, END_HEADERS, 1, b"head"));
        conn.extend(frame_on(HEADERS, END_HEADERS, 3, b"head"));
        conn
    }

    /// OkHttp 3's order: DATA past the protocol's 65,535 bytes (on two streams together), then
    /// its acknowledgement. `h2` gets the acknowledgement before the DATA frame that passes
    /// 65,535, and not the client's own, however the bytes arrive.
    #[test]
    fn data_past_the_initial_window_before_the_acknowledgement_brings_it_forward() {
        let (mut conn, mut want) = (opening(), opening());
        let piece = vec![b'x'; 16_384];
        for (i, stream) in [1, 3, 1, 3, 1].into_iter().enumerate() {
            let f = frame_on(DATA, 0, stream, &piece);
            // The fourth makes 65,536 bytes.
            if i == 3 {
                want.extend_from_slice(&SETTINGS_ACK);
            }
            conn.extend(&f);
            want.extend(&f);
        }
        conn.extend_from_slice(&SETTINGS_ACK);
        let rest = [
            frame_on(DATA, 0x1, 1, b"end"),
            frame_on(SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 1]),
            frame_on(SETTINGS, ACK, 0, b""),
        ]
        .concat();
        conn.extend(&rest);
        want.extend(&rest);
        for sizes in piecings() {
            let (out, finished) = passed(&conn, &sizes);
            assert!(out == want, "{sizes:?}: {} bytes passed", out.len());
            assert!(finished, "{sizes:?}");
        }
    }

    /// A client that acknowledges first, or sends no more than 65,535 bytes before it, is passed
    /// through untouched; the scan ends at its acknowledgement.
    #[test]
    fn a_client_within_the_initial_window_is_passed_through() {
        for before in [vec![16_384, 16_384, 16_384, 16_383], vec![], vec![40_000]] {
            let mut conn = opening();
            for n in &before {
                conn.extend(frame_on(DATA, 0, 1, &vec![b'x'; *n]));
            }
            let acked = conn.len() + SETTINGS_ACK.len();
            conn.extend_from_slice(&SETTINGS_ACK);
            for _ in 0..20 {
                conn.extend(frame_on(DATA, 0, 3, &[b'y'; 16_384]));
            }
            for sizes in piecings() {
                assert_eq!(
                    passed(&conn, &sizes),
                    (conn.clone(), true),
                    "{before:?} {sizes:?}"
                );
            }
            let (_, finished) = passed(&conn[..acked - 1], &[usize::MAX]);
            assert!(!finished);
            let (_, finished) = passed(&conn[..acked], &[usize::MAX]);
            assert!(finished);
        }
    }
}
