//! A connection's stream as Pingora sees it, with the deadlines and the head limit Pingora does
//! not have. It follows the connection through its phases by the bytes that pass:
//! - waiting for a request: until `header_timeout` after the accept for the first one, until
//!   `keepalive_timeout` after the last answer for the next ones; then the connection is closed
//!   as if the client had closed it;
//! - receiving a head (from its first byte to the blank line that ends it): until
//!   `header_timeout`, and at most `max_header_bytes`; past either, a JSON 408 or 431 is written
//!   and the connection is cut;
//! - the body and the answer: no deadline here (the body has its own, in `intake`), until a
//!   final status line (`HTTP/1.x 2xx`…`5xx`) is written: then it waits for a request again.
//!
//! HTTP/2 connections (ALPN `h2`) pass through untouched: their frames have no such phases.

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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::{EdgeConfig, Ticket};
use crate::error::GatewayError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first byte of a request.
    Idle { first: bool },
    /// Inside a request head: its bytes so far, and the last bytes read (to find its end).
    Head { bytes: usize, last: u32 },
    /// The body and the answer.
    Body,
}

pub struct GuardedStream {
    inner: Stream,
    phase: Phase,
    deadline: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
    header_timeout: Duration,
    keepalive_timeout: Duration,
    max_header_bytes: usize,
    passthrough: bool,
    /// `server.h2c`: a connection that opens with the HTTP/2 preface becomes a passthrough.
    h2c: bool,
    cut: IntCounterVec,
    _ticket: Ticket,
}

impl std::fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedStream")
            .field("phase", &self.phase)
            .field("inner", &self.inner)
            .finish()
    }
}

/// A whole HTTP/1.1 answer for an error the edge writes itself, closing the connection.
/// The client preface of HTTP/2 (RFC 9113, 3.4), whole: a partial one stays under the head guard.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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

impl GuardedStream {
    pub(super) fn new(inner: Stream, cfg: &EdgeConfig, ticket: Ticket, cut: IntCounterVec) -> Self {
        let passthrough = matches!(inner.selected_alpn_proto(), Some(ALPN::H2));
        let deadline = Instant::now() + cfg.header_timeout;
        GuardedStream {
            inner,
            phase: Phase::Idle { first: true },
            deadline: (!passthrough).then_some(deadline),
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            header_timeout: cfg.header_timeout,
            keepalive_timeout: cfg.keepalive_timeout,
            max_header_bytes: cfg.max_header_bytes,
            passthrough,
            h2c: cfg.h2c,
            cut,
            _ticket: ticket,
        }
    }

    fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
        if let Some(d) = deadline {
            self.sleep.as_mut().reset(d);
        }
    }

    /// Follow the phase through bytes just read; an error when the head is too large.
    fn observe(&mut self, new: &[u8]) -> Result<(), ()> {
        if new.is_empty() {
            return Ok(());
        }
        if let Phase::Idle { first } = self.phase {
            // HTTP/2 with prior knowledge (h2c): frames, not heads; Pingora's HTTP/2 server
            // takes the connection from here.
            if first && self.h2c && new.starts_with(H2_PREFACE) {
                self.passthrough = true;
                self.set_deadline(None);
                return Ok(());
            }
            self.phase = Phase::Head { bytes: 0, last: 0 };
            if !first {
                self.set_deadline(Some(Instant::now() + self.header_timeout));
            }
        }
        let Phase::Head { bytes, mut last } = self.phase else {
            return Ok(());
        };
        for (i, b) in new.iter().enumerate() {
            last = (last << 8) | u32::from(*b);
            // The blank line that ends a head: CRLF CRLF, or a bare LF LF (httparse takes both).
            if last == u32::from_be_bytes(*b"\r\n\r\n") || last & 0xFFFF == 0x0A0A {
                if bytes + i + 1 > self.max_header_bytes {
                    return Err(());
                }
                self.phase = Phase::Body;
                self.set_deadline(None);
                return Ok(());
            }
        }
        let bytes = bytes + new.len();
        if bytes > self.max_header_bytes {
            return Err(());
        }
        self.phase = Phase::Head { bytes, last };
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
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.passthrough {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.observe(&buf.filled()[before..]).is_err() {
                    this.cut("header_too_large");
                    this.answer(cx, head_too_large_answer());
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "request head too large",
                    )));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.deadline.is_none() || this.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.deadline = None;
                match this.phase {
                    // Nothing of a request yet: closed as if by the client.
                    Phase::Idle { first } => {
                        this.cut(if first {
                            "header_timeout"
                        } else {
                            "idle_timeout"
                        });
                        Poll::Ready(Ok(()))
                    }
                    _ => {
                        this.cut("header_timeout");
                        this.answer(cx, head_timeout_answer());
                        Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "request head not received in time",
                        )))
                    }
                }
            }
            other => other,
        }
    }
}

impl GuardedStream {
    fn note_write(&mut self, first: &[u8]) {
        if !self.passthrough && self.phase == Phase::Body && is_final_status_line(first) {
            self.phase = Phase::Idle { first: false };
            self.set_deadline(Some(Instant::now() + self.keepalive_timeout));
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

#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
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
}
