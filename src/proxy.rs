//! The `ProxyHttp` implementation: a thin dispatcher. The liveness route is answered entirely in
//! `request_filter` (see `liveness`); Pingora's forwarding path is never used, because after the
//! body is read Pingora forwards only its 64 KiB retry buffer and drops the rest of a rewritten body.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderValue;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};

use crate::cors::CorsVerdict;
use crate::error::GatewayError;
use crate::liveness::{self, Reply};
use crate::metrics::DrainEnd;
use crate::state::{AppState, RequestCtx};

pub struct Gateway {
    pub state: Arc<AppState>,
}

/// A client-supplied `X-Request-Id` is kept when it is short and plain and holds no secret of the
/// gateway's (it is written to the log and sent back); otherwise a new one is made.
pub fn request_id(headers: &http::HeaderMap, egress: &crate::egress::Egress) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
                && !egress.holds_secret(v.as_bytes())
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// `GET /.well-known/jwks.json`: the receipts' public keys, which a client may keep a while
/// (`receipt::JWKS_CACHE_CONTROL`); `404` when receipts are off.
async fn jwks(state: &AppState, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
    let method = session.req_header().method.clone();
    let answer = match (method, state.runtime().receipts.clone()) {
        (http::Method::GET | http::Method::HEAD, Some(r)) => Ok(r),
        (http::Method::GET | http::Method::HEAD, None) => Err(GatewayError::NotFound),
        _ => Err(GatewayError::MethodNotAllowed),
    };
    match answer {
        Ok(r) => {
            ctx.answer.served = Some("keys");
            let cache = [("Cache-Control", crate::receipt::JWKS_CACHE_CONTROL.into())];
            write(state, session, ctx, 200, r.jwks(), &cache).await?
        }
        Err(e) => write_error(state, session, ctx, e).await?,
    }
    Ok(true)
}

/// `GET /api/v1/usage`: a tenant's own usage, with its key (see `usage::handle`).
async fn usage(state: &AppState, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
    let rt = state.runtime();
    let answer = match session.req_header().method {
        http::Method::GET => crate::usage::handle(state, &rt, session, ctx).await,
        _ => Err(GatewayError::MethodNotAllowed),
    };
    match answer {
        Ok(report) => {
            ctx.answer.served = Some("usage");
            let mut headers = std::mem::take(&mut ctx.answer.rate_headers);
            if report.csv {
                headers.push(("Content-Type", "text/csv; charset=utf-8".into()));
            }
            write(state, session, ctx, 200, Bytes::from(report.body), &headers).await?
        }
        Err(e) => write_error(state, session, ctx, e).await?,
    }
    Ok(true)
}

async fn write(
    state: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    body: Bytes,
    headers: &[(&'static str, String)],
) -> pingora::Result<()> {
    // Every answer is JSON the gateway wrote (a provider's answer too: see `egress`), and every
    // header is the gateway's.
    let mut resp = ResponseHeader::build(status, Some(8))?;
    resp.insert_header(
        "Content-Type",
        HeaderValue::from_static(crate::egress::CONTENT_TYPE),
    )?;
    resp.insert_header("Content-Length", HeaderValue::from(body.len()))?;
    resp.insert_header("X-Request-Id", ctx.request_id.as_str())?;
    resp.insert_header("Cache-Control", HeaderValue::from_static("no-store"))?;
    if let Some(t) = &ctx.trace {
        // The client finds its trace by it (W3C trace context, the server span's id).
        resp.insert_header("traceparent", t.traceparent())?;
    }
    for (k, v) in headers {
        resp.insert_header(*k, v.as_str())?;
    }
    for (k, v) in ctx.cors.headers() {
        resp.insert_header(k, v)?;
    }
    if !ctx.upload.done {
        // The body was not read: the connection ends after the bounded drain below, rather than
        // Pingora draining an unbounded upload for keep-alive.
        session.set_keepalive(None);
    }
    ctx.answer.status = status;
    crate::logging::count(state, ctx);
    // Counted and no longer in flight before the client can see the answer.
    ctx.inflight = None;
    // An answer to HEAD has its headers (`Content-Length` included) and no body, over every
    // protocol: Pingora leaves the body out over HTTP/1.1, not over HTTP/2, so it is left out
    // here.
    let head = session.req_header().method == http::Method::HEAD;
    session.write_response_header(Box::new(resp), head).await?;
    let sent = match head {
        true => Ok(()),
        false => send_body(session, body).await,
    };
    if let Err(e) = sent {
        if e.etype() == &pingora::ErrorType::WriteTimedout {
            state
                .metrics
                .connections_cut
                .with_label_values(&["send_timeout"])
                .inc();
        }
        return Err(e);
    }
    drain(state, session, ctx).await;
    Ok(())
}

/// How much of an answer is handed to the connection at once: the session's write timeout
/// (`header_timeout`) is on each piece, so it bounds a client that stops taking its answer, not
/// one that takes a large answer slowly (Pingora times a write whole).
const SEND_PIECE: usize = 16 * 1024;

async fn send_body(session: &mut Session, mut body: Bytes) -> pingora::Result<()> {
    loop {
        let piece = body.split_to(body.len().min(SEND_PIECE));
        let last = body.is_empty();
        session.write_response_body(Some(piece), last).await?;
        if last {
            return Ok(());
        }
    }
}

/// The early-answer policy, the same for HTTP/1 and HTTP/2. After an answer given before the
/// body was read (a 401, a 429, a 413 from `Content-Length`…) the client may still be sending,
/// and many clients read the answer only once they have sent everything: curl 7.x and OkHttp
/// 3.x fail the whole call when their upload is cut, over HTTP/1.1 by the reset a close with
/// unread bytes makes, over HTTP/2 by the RST_STREAM (even with NO_ERROR) that `h2` sends when
/// the unread body is dropped. So the rest of the body is read and thrown away until the client
/// ends it, and only then does the stream (or the connection) end: normally, with nothing reset.
/// Nothing else is written after the answer.
///
/// The drain is bounded by `intake.drain_max_bytes` and `intake.drain_timeout`; past either
/// the stream is reset (NO_ERROR) or the connection closed, as before. Over HTTP/2 a body
/// declared larger than the bound is not read at all: the reset would come all the same, and
/// clients that honour it (RFC 9113 §8.1) keep the answer. Each chunk is thrown away as it
/// comes and its flow-control credit given back, so a drain holds no more of a connection's
/// memory than its windows, as any read does; each stream drains in its own task, so the
/// connection's other streams go on. An HTTP/1.1 client that asked `Expect: 100-continue` and
/// got no `100` sends no body: nothing to wait for. (Over HTTP/2 no `100` is ever sent, and
/// such a client ends its stream empty: that end is waited for, so that no reset follows.)
async fn drain(state: &AppState, session: &mut Session, ctx: &RequestCtx) {
    if ctx.upload.done || session.is_body_done() {
        return;
    }
    let headers = &session.req_header().headers;
    let h2 = session.is_http2();
    if !h2 && !ctx.upload.continued && expects_continue(headers) {
        return;
    }
    let intake = &state.runtime().config.intake;
    let (max, limit) = (intake.drain_max_bytes, intake.drain_timeout);
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    // An HTTP/1.1 drain holds a read buffer while it waits for the client (Pingora reads a body
    // 64 KiB at a time): it takes that room in the body budget, as the body's reading would
    // have, so a crowd refused early cannot hold more memory than a crowd read. Without room,
    // the connection closes at once. (An HTTP/2 stream's bytes are in its connection's
    // flow-control window already; reading them frees memory.)
    let room = if h2 {
        None
    } else {
        match state
            .body_budget
            .try_charge(DRAIN_BUFFER, ctx.caller.tenant.is_some())
        {
            Some(room) => Some(room),
            None => {
                count(state, DrainEnd::NoRoom);
                return;
            }
        }
    };
    let end = if h2 && declared.is_some_and(|n| n > max) {
        DrainEnd::ByteLimit
    } else {
        discard(session, max, limit).await
    };
    if !h2 && matches!(end, DrainEnd::ByteLimit | DrainEnd::TimeLimit) {
        linger_close(session).await;
    }
    drop(room);
    count(state, end);
}

/// The room an HTTP/1.1 drain takes in the body budget: one read buffer.
const DRAIN_BUFFER: usize = 64 * 1024;

fn count(state: &AppState, end: DrainEnd) {
    state
        .metrics
        .early_answer_drains
        .with_label_values(&[end.as_str()])
        .inc();
}

fn expects_continue(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}

/// How long an HTTP/1.1 connection whose drain hit its bound still reads (and throws away)
/// after it has sent its end, before it closes.
const LINGER_AFTER_CLOSE: std::time::Duration = std::time::Duration::from_secs(2);

/// The end of an HTTP/1.1 connection whose client is still sending past the drain's bound: a
/// close with unread bytes makes the kernel reset the connection, and a reset that arrives
/// before the client has read the answer throws the answer away (curl: "Send failure: Broken
/// pipe"). So the connection's sending side is closed first (the client reads the answer, then
/// the end), and what the client still sends is read and thrown away for `LINGER_AFTER_CLOSE`
/// at most, as nginx's lingering close does; a client that has read its answer stops sending
/// and closes, and the connection ends without a reset.
async fn linger_close(session: &mut Session) {
    session.shutdown().await;
    let _ = tokio::time::timeout(LINGER_AFTER_CLOSE, async {
        while let Ok(Some(_)) = session.read_request_body().await {}
    })
    .await;
}

/// Read and throw away the rest of the body, up to `max` bytes and for `limit` at most.
async fn discard(session: &mut Session, max: u64, limit: std::time::Duration) -> DrainEnd {
    let all = async {
        let mut read = 0u64;
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    read += chunk.len() as u64;
                    if read > max && !session.is_body_done() {
                        return DrainEnd::ByteLimit;
                    }
                }
                Ok(None) => return DrainEnd::Complete,
                Err(e) if *e.etype() == pingora::ErrorType::ReadTimedout => {
                    return DrainEnd::TimeLimit
                }
                Err(_) => return DrainEnd::ClientClosed,
            }
        }
    };
    tokio::time::timeout(limit, all)
        .await
        .unwrap_or(DrainEnd::TimeLimit)
}

/// An answer without a body (a preflight's 204).
async fn write_empty(
    state: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    headers: &[(&'static str, String)],
) -> pingora::Result<()> {
    let mut resp = ResponseHeader::build(status, Some(8))?;
    resp.insert_header("X-Request-Id", ctx.request_id.as_str())?;
    if let Some(t) = &ctx.trace {
        resp.insert_header("traceparent", t.traceparent())?;
    }
    for (k, v) in headers {
        resp.insert_header(*k, v.as_str())?;
    }
    // A preflight has no body; one that declares one is not kept alive (it was not read).
    let h = &session.req_header().headers;
    let bodiless = h.get(http::header::TRANSFER_ENCODING).is_none()
        && h.get(http::header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0");
    if !bodiless {
        session.set_keepalive(None);
    }
    ctx.answer.status = status;
    crate::logging::count(state, ctx);
    ctx.inflight = None;
    session.write_response_header(Box::new(resp), true).await?;
    drain(state, session, ctx).await;
    Ok(())
}

pub async fn write_error(
    state: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    err: GatewayError,
) -> pingora::Result<()> {
    let mut headers: Vec<(&'static str, String)> = std::mem::take(&mut ctx.answer.rate_headers);
    if let Some(secs) = err.retry_after() {
        headers.push(("Retry-After", secs.to_string()));
    }
    if err == GatewayError::MethodNotAllowed {
        let path = session.req_header().uri.path();
        let allow = if path == crate::receipt::JWKS_PATH {
            "GET, HEAD"
        } else if crate::usage::is_route(path) {
            "GET"
        } else {
            "POST"
        };
        headers.push(("Allow", allow.into()));
    }
    // The store's clock, which periods follow (Redis's in a fleet), as `Retry-After` does.
    let calendar = state.runtime().config.budgets.calendar;
    let body = Bytes::from(err.body_at(&calendar, state.store.now()));
    let status = err.status().as_u16();
    ctx.answer.error = Some(err);
    write(state, session, ctx, status, body, &headers).await
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // One length from here on, for the early 413, the body's buffer and the drain alike.
        if let Some(n) = crate::intake::listed_length(&session.req_header().headers) {
            session
                .req_header_mut()
                .insert_header(http::header::CONTENT_LENGTH, n)?;
        }
        let rt = self.state.runtime();
        // An answer the client stops taking (over HTTP/2 its window kept shut, over HTTP/1.1
        // its socket not read) ends the request when `header_timeout` passes without a piece
        // of it taken (see `send_body`): the stream, and then the connection, are not held.
        session.set_write_timeout(Some(rt.config.edge.header_timeout));
        ctx.request_id = request_id(&session.req_header().headers, &rt.egress);
        if let Some(tracer) = &self.state.tracer {
            let trusted = crate::edge::client::peer_is_trusted(&rt.config.edge, session);
            ctx.trace = Some(tracer.begin(&session.req_header().headers, trusted));
        }
        let path = session.req_header().uri.path();
        ctx.path_withheld =
            !crate::liveness::is_route(path) && rt.egress.holds_secret(path.as_bytes());
        let cors = &rt.config.cors;
        ctx.cors = CorsVerdict::of(cors, &session.req_header().headers);
        if let Err(e) = crate::edge::client::admit_request(&self.state, session, ctx) {
            write_error(&self.state, session, ctx, e).await?;
            return Ok(true);
        }
        let (path, method) = {
            let req = session.req_header();
            (req.uri.path(), req.method.clone())
        };
        if path == crate::receipt::JWKS_PATH {
            return jwks(&self.state, session, ctx).await;
        }
        if crate::usage::is_route(path) {
            return usage(&self.state, session, ctx).await;
        }
        let route = (liveness::is_route(path), method);
        let result = match route {
            // A browser's preflight: answered before authentication, limits or the body.
            (true, http::Method::OPTIONS) if cors.enabled() => {
                let headers = ctx.cors.preflight_headers(cors);
                ctx.answer.served = Some("preflight");
                write_empty(&self.state, session, ctx, 204, &headers).await?;
                return Ok(true);
            }
            (true, http::Method::POST) => {
                ctx.inflight = Some(crate::metrics::GaugeGuard::new(
                    &self.state.metrics.inflight,
                ));
                let ids = ctx.trace.as_ref().map(crate::trace::RequestTrace::ids);
                crate::trace::in_request(ids, liveness::handle(&self.state, session, ctx)).await
            }
            (true, _) => Err(GatewayError::MethodNotAllowed),
            (false, _) => Err(GatewayError::NotFound),
        };
        match result {
            Ok(Reply { answer, headers }) => {
                write(
                    &self.state,
                    session,
                    ctx,
                    answer.status(),
                    answer.body().clone(),
                    &headers,
                )
                .await?
            }
            Err(e) => write_error(&self.state, session, ctx, e).await?,
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // Every request is answered in request_filter; reaching here is a bug.
        Err(pingora::Error::explain(
            pingora::ErrorType::InternalError,
            "no upstream peer: all routes answer in request_filter",
        ))
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &pingora::Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = match e.etype() {
            pingora::ErrorType::ReadError
            | pingora::ErrorType::WriteError
            | pingora::ErrorType::ConnectionClosed => 0,
            // An answer was begun: never a second one.
            _ if ctx.answer.status != 0 => 0,
            _ => {
                let _ = write_error(&self.state, session, ctx, GatewayError::Internal).await;
                500
            }
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// A client that went away (reset, closed, too slow) while its request was handled is the
    /// normal course of serving the internet, not a fault: its access line says so, and Pingora's
    /// error line is written at debug level only.
    fn suppress_error_log(&self, session: &Session, ctx: &RequestCtx, e: &pingora::Error) -> bool {
        let gone = *e.esource() != pingora::ErrorSource::Upstream
            && matches!(
                e.etype(),
                pingora::ErrorType::ReadError
                    | pingora::ErrorType::WriteError
                    | pingora::ErrorType::ReadTimedout
                    | pingora::ErrorType::WriteTimedout
                    | pingora::ErrorType::ConnectionClosed
                    | pingora::ErrorType::H2Error
            );
        if gone {
            tracing::debug!(target: "pingora", "the client went away: {e}, {}", self.request_summary(session, ctx));
        }
        gone
    }

    /// What Pingora's error lines say of a request: its method, path (at most 200 characters)
    /// and id; not its `Host` or anything else of the client's choosing.
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        let req = session.req_header();
        let path = match ctx.path_withheld {
            true => crate::logging::WITHHELD_PATH,
            false => req.uri.path(),
        };
        let cut = path
            .char_indices()
            .nth(200)
            .map_or(path, |(i, _)| &path[..i]);
        format!("{} {cut}, request {}", req.method, ctx.request_id)
    }

    async fn logging(
        &self,
        session: &mut Session,
        e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        if ctx.answer.status == 0 {
            // Never answered (the client went away): count it now.
            crate::logging::count(&self.state, ctx);
        }
        crate::logging::log_line(session, e, ctx);
        // Only a kept trace's spans are built.
        let kept = ctx.trace.take().filter(|t| t.sampled);
        if let (Some(tracer), Some(mut trace)) = (&self.state.tracer, kept) {
            // The client's trace state goes into every span: never a secret (a key the
            // request presented included, which the egress check has learned by now).
            let rt = self.state.runtime();
            trace.screen_state(|b| rt.egress.holds_secret(b));
            let (name, attributes) = crate::logging::span_of(session, ctx);
            tracer.finish(trace, name, &attributes, ctx.answer.status >= 500);
        }
    }
}
