//! The metrics of every request (counted as its answer is written) and its structured log line
//! (written in Pingora's `logging` phase, which also runs for requests answered in
//! `request_filter`). Tenants are named by id; keys, images and the organization key never reach
//! this code.

use pingora::proxy::Session;

use crate::config::LogFormat;
use crate::config::UNKNOWN_TENANT;
use crate::error::GatewayError;
use crate::state::{AppState, RequestCtx};
use crate::trace::Hex;

/// What the log shows for a path that holds a secret.
pub const WITHHELD_PATH: &str = "[withheld: holds a secret]";

/// The format chosen at start; access lines in JSON are written directly (see `AccessLine`).
static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Pingora writes through the `log` crate. This bridge passes its records on as `tracing` events
/// of target `pingora` (`RUST_LOG=pingora=debug` to see more), with the message and the module,
/// and nothing else: the generic bridge would add the build machine's source paths to every
/// JSON line. Trace records are dropped whatever `RUST_LOG` asks: Pingora's proxy prints each
/// request head at trace, the client's `Authorization` and `X-Api-Key` included (the leak test
/// runs at trace).
struct PingoraLog;

impl log::Log for PingoraLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Debug
    }

    fn log(&self, record: &log::Record<'_>) {
        let module = record.target();
        let message = record.args();
        match record.level() {
            log::Level::Error => {
                let text = message.to_string();
                // A new process started with `-u` waits for the old one's sockets and says so
                // every second until the old one gets SIGQUIT: the normal course of an upgrade.
                if text.starts_with("No incoming socket transfer") {
                    tracing::info!(target: "pingora", module, "waiting for the running process to hand over its sockets (send it SIGQUIT)");
                } else if routine(&text) {
                    tracing::debug!(target: "pingora", module, "{text}");
                } else {
                    tracing::error!(target: "pingora", module, "{text}");
                }
            }
            log::Level::Warn => tracing::warn!(target: "pingora", module, "{message}"),
            log::Level::Info => tracing::info!(target: "pingora", module, "{message}"),
            log::Level::Debug => tracing::debug!(target: "pingora", module, "{message}"),
            log::Level::Trace => {}
        }
    }

    fn flush(&self) {}
}

/// Pingora's error records that are the normal course of serving the internet, not a fault:
/// written at debug level, since a crowd of them would otherwise write an error line each.
fn routine(text: &str) -> bool {
    // An HTTP/2 connection that ended before its preface was whole: cut by the edge (counted in
    // `connections_cut_total`), closed by its client, or not HTTP/2 at all.
    text.starts_with("H2 handshake error")
        // A connection that broke before its request head was whole: cut by the edge (a slow
        // or oversized head, counted in `connections_cut_total`) or closed by its client. No
        // request was made (nginx logs these at `info`, below its default level).
        || (text.starts_with("Fail to proxy: Downstream")
            && text.contains("while reading request headers"))
        // The same on the admin listener, and its clients gone before their answer was written
        // or the rest of their body read.
        || text.starts_with("HTTP server fails to read from downstream")
        || text.starts_with("HTTP server fails to write to downstream")
        || text.starts_with("HTTP server fails to finish the request")
        // A refused head's 400 that its client did not stay for.
        || text.starts_with("failed to send error response to downstream")
        // A pooled upstream connection still held by the pool's idle watch: Pingora opens a
        // new one, and nothing failed.
        || text == "failed to acquire reusable stream"
}

/// Install the process-wide subscriber (`RUST_LOG` filters; default `info`), and a panic hook
/// that writes a panic as one error line of the log: its message, no source path (the
/// default hook prints the path and a backtrace to stderr, outside the log's format).
pub fn init(format: LogFormat) {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(panic = %message, "a bug: a task panicked");
    }));
    // Before the subscriber: its own `log` bridge then finds the place taken.
    let bridged = log::set_boxed_logger(Box::new(PingoraLog)).is_ok();
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let _ = FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: a log file or a collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stdout);
    let events = tracing_subscriber::fmt::format();
    let _ = match format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(
                layer
                    .json()
                    .event_format(WithRequest {
                        inner: events.json().flatten_event(true),
                        json: true,
                    })
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(
                layer
                    .event_format(WithRequest {
                        inner: events.with_ansi(ansi),
                        json: false,
                    })
                    .with_filter(filter),
            )
            .try_init(),
    };
    // Pingora's debug records are formatted only when someone asked for them.
    if bridged {
        let debug = tracing::enabled!(target: "pingora", tracing::Level::DEBUG);
        log::set_max_level(if debug {
            log::LevelFilter::Debug
        } else {
            log::LevelFilter::Info
        });
    }
}

/// Count a request in the metrics. Called just before its answer is written, so that a client
/// holding its answer also finds it counted (usage endpoint, metrics).
pub fn count(state: &AppState, ctx: &RequestCtx) {
    let m = &state.metrics;
    let tenant = ctx.caller.tenant.as_deref().unwrap_or(UNKNOWN_TENANT);
    let outcome = ctx.outcome();
    m.requests.with_label_values(&[tenant, outcome]).inc();
    let secs = ctx.started.elapsed().as_secs_f64();
    m.request_duration
        .with_label_values(&[outcome])
        .observe(secs);
    if let Some(t) = ctx.trace.as_ref().filter(|t| t.sampled) {
        m.request_exemplar(outcome, secs, t.trace_id.to_bytes(), t.span_id.to_bytes());
    }

    if let Some(v) = &ctx.answer.verdict {
        let source = if ctx.call.led { "upstream" } else { "cache" };
        let result = if v.result { "pass" } else { "fail" };
        m.liveness_results
            .with_label_values(&[tenant, result, source])
            .inc();
        if let (true, Some(p)) = (ctx.call.led, v.prediction) {
            m.prediction.with_label_values(&[tenant]).observe(p);
        }
        if !v.result {
            let kind = v.failure_type.map(|f| f.as_str()).unwrap_or("OTHER");
            m.failures.with_label_values(&[tenant, kind]).inc();
        }
    }
    let lookup = match ctx.answer.cache {
        Some("HIT") => Some("hit"),
        Some("COALESCED") => Some("coalesced"),
        Some("MISS") => Some("miss"),
        _ => None,
    };
    if let Some(r) = lookup {
        m.cache_lookups.with_label_values(&[tenant, r]).inc();
    }
    // The usage history: calls saved by the cache, and what the gateway refused an
    // authenticated tenant (its own input, its limits, its budget).
    if let Some(t) = &ctx.caller.tenant {
        if matches!(lookup, Some("hit" | "coalesced")) {
            state.store.note(t, crate::store::Noted::CacheHit);
        }
        let refused = ctx.answer.error.as_ref().is_some_and(|e| {
            e.is_rejection()
                || matches!(
                    e,
                    GatewayError::RateLimited { .. }
                        | GatewayError::BudgetExhausted { .. }
                        | GatewayError::SubjectRateLimited { .. }
                        | GatewayError::SubjectBudgetExhausted { .. }
                        | GatewayError::TooManyFailedAttempts { .. }
                )
        });
        if refused {
            state.store.note(t, crate::store::Noted::Rejected);
        }
    }
    match &ctx.answer.error {
        Some(GatewayError::RateLimited { .. }) => {
            m.rate_limited.with_label_values(&[tenant, "rate"]).inc()
        }
        Some(GatewayError::BudgetExhausted { .. }) => {
            m.rate_limited.with_label_values(&[tenant, "budget"]).inc()
        }
        Some(GatewayError::TooManyFailedAttempts { .. }) => {
            m.failed_attempt_limits.with_label_values(&[tenant]).inc()
        }
        Some(GatewayError::Overloaded(_)) => m
            .rate_limited
            .with_label_values(&[tenant, "overloaded"])
            .inc(),
        Some(e) if e.is_rejection() => m.rejected.with_label_values(&[tenant, e.code()]).inc(),
        _ => {}
    }
}

/// One access line in JSON: the fields of the text line, named the same, plus the timestamp,
/// level and target that the JSON formatter of `tracing-subscriber` writes for other events.
///
/// Written by hand rather than through `tracing`: the profile of the 68 KB load test showed
/// `tracing-subscriber`'s JSON formatter (field visitors, a `serde_json::Value` map per event)
/// at 5–8% of the gateway's CPU, for one line per request; serializing this struct directly
/// costs a fraction of that (see benches/README.md).
#[derive(serde::Serialize)]
struct AccessLine<'a> {
    #[serde(serialize_with = "rfc3339")]
    timestamp: std::time::SystemTime,
    level: &'static str,
    target: &'static str,
    message: &'static str,
    request_id: &'a str,
    tenant: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<std::net::IpAddr>,
    method: &'a str,
    path: &'a str,
    status: u16,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<&'static str>,
    /// What the face check found (`intake.face`), when one ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    face: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_class: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    org_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    billing: Option<&'static str>,
    /// An app token's subject, as its keyed hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prediction: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend_session_id: Option<&'a str>,
    image_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_ms: Option<u64>,
    total_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    /// The request's trace and its server span (`[tracing]`), as in its `traceparent`: last
    /// in a JSON line, written by `with_ids`.
    #[serde(skip)]
    ids: Option<(&'a str, &'a str)>,
}

fn rfc3339<S: serde::Serializer>(t: &std::time::SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*t))
}

/// The access log line, once the request is over. `RUST_LOG` filters it as the `access` target
/// at `info`, in both formats.
pub fn log_line(session: &Session, err: Option<&pingora::Error>, ctx: &RequestCtx) {
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    let v = ctx.answer.verdict.as_ref();
    let req = session.req_header();
    let line = AccessLine {
        timestamp: std::time::SystemTime::now(),
        level: "INFO",
        target: "access",
        message: "request",
        request_id: &ctx.request_id,
        tenant: ctx.caller.tenant.as_deref().unwrap_or(UNKNOWN_TENANT),
        client: ctx.caller.client,
        method: method_name(&req.method),
        path: match ctx.path_withheld {
            true => WITHHELD_PATH,
            false => req.uri.path(),
        },
        status: ctx.answer.status,
        outcome: ctx.outcome(),
        code: ctx.answer.error.as_ref().map(|e| e.code()),
        cache: ctx.answer.cache,
        face: ctx.upload.face,
        upstream_status: ctx.call.status,
        upstream_class: ctx.call.class.map(|c| c.as_str()),
        org_key: ctx.call.org_key.as_deref(),
        billing: ctx.call.billing,
        subject: ctx.caller.subject.as_deref(),
        result: v.map(|v| v.result),
        prediction: v.and_then(|v| v.prediction),
        backend_session_id: ctx.answer.session_id.as_deref(),
        image_bytes: ctx.upload.bytes,
        upstream_ms: ctx.call.ms,
        total_ms: ctx.started.elapsed().as_millis() as u64,
        error: err.map(|e| e.etype().as_str()),
        ids: ctx.trace.as_ref().map(|t| t.ids_hex()),
    };
    if FORMAT.get() == Some(&LogFormat::Json) {
        let mut buf = Vec::with_capacity(512);
        if serde_json::to_writer(&mut buf, &line).is_ok() {
            if let Some((trace, span)) = line.ids {
                with_ids(&mut buf, trace, span);
            }
            buf.push(b'\n');
            // One `write` per line: stdout is line-buffered and the line ends in a newline.
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), &buf);
        }
        return;
    }
    tracing::info!(
        target: "access",
        request_id = %line.request_id,
        tenant = line.tenant,
        client = line.client.map(tracing::field::display),
        method = line.method,
        path = line.path,
        status = line.status,
        outcome = line.outcome,
        code = line.code,
        cache = line.cache,
        face = line.face,
        upstream_status = line.upstream_status,
        upstream_class = line.upstream_class,
        org_key = line.org_key,
        billing = line.billing,
        subject = line.subject,
        result = line.result,
        prediction = line.prediction,
        backend_session_id = line.backend_session_id,
        image_bytes = line.image_bytes,
        upstream_ms = line.upstream_ms,
        total_ms = line.total_ms,
        error = line.error,
        trace_id = line.ids.map(|(trace, _)| trace),
        span_id = line.ids.map(|(_, span)| span),
        "request"
    );
}

/// `trace_id` and `span_id` added to the JSON object in `line`, as its last members. Their hex
/// digits are copied as they are: through serde_json, which checks each character for
/// escaping, they cost a traced request about 1,000 instructions (callgrind,
/// benches/load/traces.sh).
fn with_ids(line: &mut Vec<u8>, trace: &str, span: &str) {
    if line.pop_if(|b| *b == b'}').is_none() {
        return;
    }
    line.extend_from_slice(b",\"trace_id\":\"");
    line.extend_from_slice(trace.as_bytes());
    line.extend_from_slice(b"\",\"span_id\":\"");
    line.extend_from_slice(span.as_bytes());
    line.extend_from_slice(b"\"}");
}

/// A request's method as the log and the traces name it: one of HTTP's, or `_OTHER` (as
/// OpenTelemetry's conventions say): a method is the client's text, and may be anything, a key
/// included.
pub fn method_name(method: &http::Method) -> &'static str {
    use http::Method as M;
    match *method {
        M::GET => "GET",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::HEAD => "HEAD",
        M::OPTIONS => "OPTIONS",
        M::PATCH => "PATCH",
        M::TRACE => "TRACE",
        M::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
}

/// The event format of the log: `inner`'s, with the ids of the request being served (under
/// `span` in JSON, `trace_id=… span_id=…` at the end of a text line).
struct WithRequest<E> {
    inner: E,
    json: bool,
}

impl<S, N, E> tracing_subscriber::fmt::FormatEvent<S, N> for WithRequest<E>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    E: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Some(ids) = crate::trace::current_request() else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        let body = line.trim_end_matches('\n');
        let (trace, span) = (Hex::trace(ids.trace_id), Hex::span(ids.span_id));
        let (trace_id, span_id) = (trace.as_str(), span.as_str());
        match body.strip_suffix('}').filter(|_| self.json) {
            Some(open) => writeln!(
                writer,
                "{open},\"span\":{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}}}"
            ),
            None => writeln!(writer, "{body} trace_id={trace_id} span_id={span_id}"),
        }
    }
}

/// The server span's name (`POST /api/v1/backend/liveness/short/`) and attributes: what the
/// access line says, in OpenTelemetry's names where it has them, and nothing secret (the path
/// withheld as in the log; a subject only as its keyed hash; no key, token or image byte).
pub fn span_of<'a>(
    session: &'a Session,
    ctx: &'a RequestCtx,
) -> (
    std::borrow::Cow<'static, str>,
    Vec<crate::trace::Attribute<'a>>,
) {
    use crate::trace::Attribute;
    use std::borrow::Cow;
    let req = session.req_header();
    let path = match ctx.path_withheld {
        true => WITHHELD_PATH,
        false => req.uri.path(),
    };
    let route = match crate::liveness::is_route(path) {
        true => "/api/v1/backend/liveness/short/",
        false => "",
    };
    let method = method_name(&req.method);
    let name = match (route, method) {
        ("", m) => Cow::Borrowed(m),
        (_, "POST") => Cow::Borrowed("POST /api/v1/backend/liveness/short/"),
        (r, m) => Cow::Owned(format!("{m} {r}")),
    };
    // Borrowed from the request: written into the span before it goes (no copy).
    let mut a = Vec::with_capacity(14);
    a.extend([
        Attribute::str("http.request.method", method),
        Attribute::str("url.path", path),
        Attribute::int("http.response.status_code", i64::from(ctx.answer.status)),
        Attribute::str("liveness.request_id", ctx.request_id.as_str()),
        Attribute::str("liveness.outcome", ctx.outcome()),
    ]);
    if !route.is_empty() {
        a.push(Attribute::str("http.route", route));
    }
    let text = |k: &'static str, v: Option<&'a str>| v.map(|v| Attribute::str(k, v));
    a.extend(
        [
            text("liveness.tenant", ctx.caller.tenant.as_deref()),
            text("liveness.subject_hash", ctx.caller.subject.as_deref()),
            text("liveness.cache", ctx.answer.cache),
            text("liveness.face", ctx.upload.face),
            text("error.type", ctx.answer.error.as_ref().map(|e| e.code())),
            text("liveness.org_key", ctx.call.org_key.as_deref()),
            text("liveness.billing", ctx.call.billing),
        ]
        .into_iter()
        .flatten(),
    );
    if let Some(c) = ctx.caller.client {
        a.push(Attribute::ip("client.address", c));
    }
    (name, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_written_as_their_hex_digits() {
        use opentelemetry::trace::{SpanId, TraceId};
        let t = TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap_or(TraceId::INVALID);
        let s = SpanId::from_hex("00f067aa0ba902b7").unwrap_or(SpanId::INVALID);
        let mut line = br#"{"message":"request","total_ms":3}"#.to_vec();
        with_ids(&mut line, Hex::trace(t).as_str(), Hex::span(s).as_str());
        assert_eq!(
            String::from_utf8_lossy(&line),
            r#"{"message":"request","total_ms":3,"trace_id":"0af7651916cd43dd8448eb211c80319c","span_id":"00f067aa0ba902b7"}"#
        );
    }
}
