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

use crate::edge::cors::CorsVerdict;
use crate::error::GatewayError;
use crate::liveness::{self, Reply};
use crate::state::{AppState, RequestCtx};

pub struct Gateway {
    pub state: Arc<AppState>,
}

/// A client-supplied `X-Request-Id` is kept when it is short and plain; otherwise a new one is made.
pub fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
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
    for (k, v) in headers {
        resp.insert_header(*k, v.as_str())?;
    }
    for (k, v) in ctx.cors.headers() {
        resp.insert_header(k, v)?;
    }
    if !ctx.body_done {
        // The body was not read: do not let Pingora drain an unbounded upload for keep-alive.
        session.set_keepalive(None);
    }
    ctx.status = status;
    crate::logging::count(state, ctx);
    // Counted and no longer in flight before the client can see the answer.
    ctx.inflight = None;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    if !ctx.body_done {
        linger(session).await;
    }
    Ok(())
}

/// The most of an unread body the gateway reads and throws away after answering early.
const LINGER_MAX_BYTES: u64 = 2 * 1024 * 1024;
/// How long it waits for that body at most.
const LINGER_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// After an early answer (a 401, a 429, …) over HTTP/1.1 the client may still be sending its
/// body. Closing at once would make the kernel reset the connection, and the client would see
/// a broken pipe instead of the answer. So a body of a declared size up to 2 MiB is read and
/// thrown away, for 1 s at most, before the connection closes (nginx's lingering close does
/// the same). Larger or undeclared bodies are not waited for. HTTP/2 resets only the stream.
async fn linger(session: &mut Session) {
    let h = &session.req_header().headers;
    // A client that asked `Expect: 100-continue` and was refused before any 100 does not send
    // its body: nothing to wait for.
    if session.is_http2() || h.contains_key(http::header::EXPECT) {
        return;
    }
    let declared = h
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > 0 && n <= LINGER_MAX_BYTES) {
        let _ = tokio::time::timeout(LINGER_FOR, session.drain_request_body()).await;
    }
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
    ctx.status = status;
    crate::logging::count(state, ctx);
    ctx.inflight = None;
    session.write_response_header(Box::new(resp), true).await
}

pub async fn write_error(
    state: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    err: GatewayError,
) -> pingora::Result<()> {
    let mut headers: Vec<(&'static str, String)> = std::mem::take(&mut ctx.rate_headers);
    if let Some(secs) = err.retry_after() {
        headers.push(("Retry-After", secs.to_string()));
    }
    if err == GatewayError::MethodNotAllowed {
        headers.push(("Allow", "POST".into()));
    }
    let body = Bytes::from(err.body());
    let status = err.status().as_u16();
    ctx.error = Some(err);
    write(state, session, ctx, status, body, &headers).await
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.request_id = request_id(&session.req_header().headers);
        let rt = self.state.runtime();
        let cors = &rt.config.cors;
        ctx.cors = CorsVerdict::of(cors, &session.req_header().headers);
        if let Err(e) = crate::edge::client::admit_request(&self.state, session, ctx) {
            write_error(&self.state, session, ctx, e).await?;
            return Ok(true);
        }
        let route = {
            let req = session.req_header();
            (liveness::is_route(req.uri.path()), req.method.clone())
        };
        let result = match route {
            // A browser's preflight: answered before authentication, limits or the body.
            (true, http::Method::OPTIONS) if cors.enabled() => {
                let headers = ctx.cors.preflight_headers(cors);
                write_empty(&self.state, session, ctx, 204, &headers).await?;
                return Ok(true);
            }
            (true, http::Method::POST) => {
                ctx.inflight = Some(crate::metrics::GaugeGuard::new(
                    &self.state.metrics.inflight,
                ));
                liveness::handle(&self.state, session, ctx).await
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

    async fn logging(
        &self,
        session: &mut Session,
        e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        if ctx.status == 0 {
            // Never answered (the client went away): count it now.
            crate::logging::count(&self.state, ctx);
        }
        crate::logging::log_line(session, e, ctx);
    }
}
