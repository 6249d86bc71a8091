//! A connection's stream as Pingora sees it, with the deadlines and the head limit Pingora does
//! not have. It follows the connection by the bytes that pass, from its accept to its close:
//! - HTTP/1: waiting for a request (until `header_timeout` after the accept for the first one,
//!   until `keepalive_timeout` after the last answer for the next ones; blank lines before a
//!   request line do not start a request, as the parser skips them), then its head (until
//!   `header_timeout`, at most `max_header_bytes`; it ends where httparse ends it: at the first
//!   empty line after the request line), then its body and answer (no deadline here: the body
//!   has its own, in `intake`). Once a final answer is written, what the client still sends is
//!   only drained (by the request's own bounded drain, `intake.drain_*`) and never read as a head:
//!   the connection gets one answer per request. The next request starts when Pingora reuses the connection.
//! - HTTP/2 (ALPN `h2`, or h2c with prior knowledge): the client preface and the frames up to
//!   the end of the first header block (a HEADERS or CONTINUATION frame with END_HEADERS) must
//!   arrive within `header_timeout`; from then on the `h2` crate's limits and Pingora's idle
//!   timeout apply.
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
    /// HTTP/2 before the end of its first header block.
    H2Head(FrameScan),
    /// HTTP/2 after it: passed through.
    Open,
}

/// Follows HTTP/2 frames by their 9-byte headers (RFC 9113, 4.1) to the end of the first header
/// block; payloads are skipped, never parsed or kept.
#[derive(Debug)]
struct FrameScan {
    preface_left: usize,
    header: [u8; 9],
    have: usize,
    payload_left: usize,
    ends_head: bool,
}

/// The client preface of HTTP/2 (RFC 9113, 3.4).
pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

impl FrameScan {
    fn new() -> Self {
        FrameScan {
            preface_left: H2_PREFACE.len(),
            header: [0; 9],
            have: 0,
            payload_left: 0,
            ends_head: false,
        }
    }

    /// Take the next bytes of the connection; true once the first header block is whole.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let skip = self.preface_left.min(bytes.len());
        self.preface_left -= skip;
        bytes = &bytes[skip..];
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
                if self.payload_left == 0 && self.ends_head {
                    return true;
                }
                continue;
            }
            let n = (self.header.len() - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == self.header.len() {
                self.have = 0;
                let h = self.header;
                self.payload_left =
                    usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                self.ends_head = matches!(h[3], HEADERS | CONTINUATION) && h[4] & END_HEADERS != 0;
                if self.payload_left == 0 && self.ends_head {
                    return true;
                }
            }
        }
        false
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
    proto: Proto,
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
    /// Guard `inner`, accepted at `accepted`; its first request head is due `header_timeout`
    /// after that (a TLS handshake comes out of the same time).
    pub(super) fn new(
        inner: Stream,
        limits: Limits,
        ticket: Ticket,
        cut: IntCounterVec,
        accepted: Instant,
    ) -> Self {
        let deadline = accepted + limits.header_timeout;
        let proto = if matches!(inner.selected_alpn_proto(), Some(ALPN::H2)) {
            Proto::H2Head(FrameScan::new())
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
            proto,
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
                self.proto = Proto::H2Head(FrameScan::new());
                return Opening::H2;
            }
            let mut chunk = [0u8; H2_PREFACE.len()];
            let want = H2_PREFACE.len() - have;
            let Some(deadline) = self.deadline else {
                return Opening::Gone;
            };
            match tokio::time::timeout_at(deadline, self.inner.read(&mut chunk[..want])).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Opening::Gone,
                Ok(Ok(n)) => self.ahead.extend_from_slice(&chunk[..n]),
                Err(_) => {
                    self.cut("header_timeout");
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
        self.set_deadline(Some(Instant::now() + self.limits.keepalive_timeout));
    }

    fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
        if let Some(d) = deadline {
            self.sleep.as_mut().reset(d);
        }
    }

    /// Follow the connection through bytes just read; an error when a head is too large.
    fn observe(&mut self, new: &[u8]) -> Result<(), ()> {
        match &mut self.proto {
            Proto::Open => Ok(()),
            Proto::H2Head(scan) => {
                if scan.feed(new) {
                    self.proto = Proto::Open;
                    self.set_deadline(None);
                }
                Ok(())
            }
            Proto::Http1(phase) => {
                let phase = *phase;
                self.observe_http1(phase, new)
            }
        }
    }

    fn observe_http1(&mut self, phase: Phase, new: &[u8]) -> Result<(), ()> {
        let next = scan(phase, new, self.limits.max_header_bytes)?;
        match (phase, next) {
            (Phase::Waiting { first: false, .. }, Phase::Head { .. }) => {
                self.set_deadline(Some(Instant::now() + self.limits.header_timeout))
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
            Proto::Http1(Phase::Waiting { first, .. }) => {
                self.cut(if first {
                    "header_timeout"
                } else {
                    "idle_timeout"
                });
                Poll::Ready(Ok(()))
            }
            Proto::H2Head(_) => {
                self.cut("header_timeout");
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

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn the_first_http2_header_block_ends_at_end_headers() {
        let mut conn = H2_PREFACE.to_vec();
        conn.extend(frame(0x4, 0, &[0; 6])); // SETTINGS
        conn.extend(frame(0x6, 0, &[0; 8])); // PING
        conn.extend(frame(HEADERS, 0, b"abc"));
        conn.extend(frame(CONTINUATION, END_HEADERS, b"de"));
        let end = conn.len();
        conn.extend(frame(0x0, 0x1, b"body"));
        // Byte by byte, and whole: done at the last byte of the CONTINUATION frame.
        let mut scan = FrameScan::new();
        let done = conn.iter().position(|b| scan.feed(&[*b]));
        assert_eq!(done, Some(end - 1));
        assert!(FrameScan::new().feed(&conn));
        assert!(!FrameScan::new().feed(&conn[..end - 1]));
        // A HEADERS frame with END_HEADERS and no payload ends it too.
        let mut bare = H2_PREFACE.to_vec();
        bare.extend(frame(HEADERS, END_HEADERS | 0x1, b""));
        assert!(FrameScan::new().feed(&bare));
    }
}
