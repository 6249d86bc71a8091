//! Traces (`[tracing]`): a server span per request with a child span per step it went through
//! (reading the upload, validation, the cache lookup, the photo's conversion, the store's turn
//! with the budget hold, the wait for an upstream slot, the provider call, its settlement), sent
//! to an OTLP collector over HTTP with protobuf; W3C trace context in (`traceparent` and
//! `tracestate` from trusted clients) and out (to the provider, and on every answer).
//!
//! A request notes its steps as it goes (`RequestTrace::step`), cheap and without a lock; when
//! it ends, its spans are built at once as OpenTelemetry's `SpanData` and handed to a bounded
//! queue. A thread of its own sends them in batches through opentelemetry-otlp's exporter. A
//! full queue drops the span, and a batch the collector does not take is dropped too: both
//! counted (`trace_spans_dropped_total`), and the request path never waits for a collector.
//! Spans are built here rather than through the SDK's tracer because their ids must be known
//! before they end (the provider is sent the call's span id, the client the server span's) and
//! their times are those the steps noted.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::SystemTime;

use bytes::Bytes;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample, SpanData, SpanEvents,
    SpanExporter, SpanLinks,
};
use opentelemetry_sdk::Resource;
use prometheus::IntCounter;
use std::sync::{Arc, Condvar, Mutex};

use crate::config::TracingConfig;

/// Spans sent to the collector in one request at most; the exporting thread is woken when
/// this many wait, else once a second.
const BATCH: usize = 2048;

/// The spans waiting for the exporting thread. A request adds its spans under one short lock
/// and wakes the thread only when a batch is full: a channel that woke it for every span cost
/// the request path more in wake-ups than the spans themselves (measured on the cache-hit
/// path, `benches/load/traces.sh`).
struct Waiting {
    spans: Mutex<Vec<SpanData>>,
    full: Condvar,
    cap: usize,
}

impl Waiting {
    /// Add a request's spans, all or none: past `cap` they are dropped (the return: how many).
    fn add(&self, spans: Vec<SpanData>) -> usize {
        let Ok(mut waiting) = self.spans.lock() else {
            return spans.len();
        };
        if waiting.len() + spans.len() > self.cap {
            return spans.len();
        }
        waiting.extend(spans);
        if waiting.len() >= BATCH {
            self.full.notify_one();
        }
        0
    }

    /// The spans waiting once a batch is full or a second has passed (none: the lock is gone).
    fn take(&self) -> Option<Vec<SpanData>> {
        let waiting = self.spans.lock().ok()?;
        let (mut waiting, _) = self
            .full
            .wait_timeout_while(waiting, std::time::Duration::from_secs(1), |w| {
                w.len() < BATCH
            })
            .ok()?;
        Some(std::mem::take(&mut *waiting))
    }
}

/// The traces of a process: the sampler, the ids and the queue to the exporting thread.
pub struct Tracer {
    sampler: Sampler,
    ids: RandomIdGenerator,
    trust_client: bool,
    queue: Arc<Waiting>,
    dropped: IntCounter,
    scope: InstrumentationScope,
}

impl Tracer {
    /// The tracer of `[tracing]`, and the thread that sends its spans. `dropped` counts the
    /// spans that never reached the collector.
    pub fn start(
        cfg: &TracingConfig,
        http: reqwest::Client,
        dropped: IntCounter,
    ) -> anyhow::Result<Tracer> {
        let headers: HashMap<String, String> = cfg.headers.iter().cloned().collect();
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Http(http))
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(cfg.traces_url.clone())
            .with_timeout(cfg.timeout)
            .with_headers(headers)
            .build()
            .map_err(|e| anyhow::anyhow!("tracing: {e}"))?;
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name(cfg.service_name.clone())
                .build(),
        );
        let queue = Arc::new(Waiting {
            spans: Mutex::new(Vec::new()),
            full: Condvar::new(),
            cap: cfg.queue,
        });
        let (spans, timeout, lost) = (queue.clone(), cfg.timeout, dropped.clone());
        std::thread::Builder::new()
            .name("trace-export".into())
            .spawn(move || export(exporter, &spans, timeout, lost))?;
        Ok(Tracer {
            sampler: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sample_ratio))),
            ids: RandomIdGenerator::default(),
            trust_client: cfg.trust_client_context,
            queue,
            dropped,
            scope: InstrumentationScope::builder("liveness-gateway")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        })
    }

    /// The trace of a request: the client's, continued, when it sent a valid `traceparent` and
    /// is trusted (behind `server.trusted_proxies`, or `trust_client_context`), else a new one;
    /// kept or not as the sampler says (a client's sampled flag decides for its trace).
    pub fn begin(&self, headers: &http::HeaderMap, trusted_peer: bool) -> RequestTrace {
        let parent = if (trusted_peer || self.trust_client) && valid_traceparent(headers) {
            TraceContextPropagator::new().extract(&Headers::of(headers))
        } else {
            Context::new()
        };
        let remote = parent.span().span_context().clone();
        let trace_id = if remote.is_valid() {
            remote.trace_id()
        } else {
            self.ids.new_trace_id()
        };
        let sampled = self
            .sampler
            .should_sample(
                Some(&parent),
                trace_id,
                "request",
                &SpanKind::Server,
                &[],
                &[],
            )
            .decision
            == SamplingDecision::RecordAndSample;
        RequestTrace {
            trace_id,
            span_id: self.ids.new_span_id(),
            parent: remote.is_valid().then(|| remote.span_id()),
            state: remote.trace_state().clone(),
            sampled,
            start: SystemTime::now(),
            steps: Vec::new(),
        }
    }

    /// A new span id (the provider call's, known before it starts).
    pub fn span_id(&self) -> SpanId {
        self.ids.new_span_id()
    }

    /// The request has ended: its spans go to the collector when its trace is sampled. `name`
    /// is the server span's (`POST /api/v1/backend/liveness/short/`), `error` whether it failed
    /// on the gateway's side (a 5xx).
    pub fn finish(
        &self,
        trace: RequestTrace,
        name: Cow<'static, str>,
        attributes: Vec<KeyValue>,
        error: bool,
    ) {
        if !trace.sampled {
            return;
        }
        let end = SystemTime::now();
        let context = |span_id| {
            SpanContext::new(
                trace.trace_id,
                span_id,
                TraceFlags::SAMPLED,
                false,
                trace.state.clone(),
            )
        };
        let status = |error: bool| {
            if error {
                Status::error("")
            } else {
                Status::Unset
            }
        };
        let server = SpanData {
            span_context: context(trace.span_id),
            parent_span_id: trace.parent.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: trace.parent.is_some(),
            span_kind: SpanKind::Server,
            name,
            start_time: trace.start,
            end_time: end,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: status(error),
            instrumentation_scope: self.scope.clone(),
        };
        let steps = trace.steps.into_iter().map(|s| SpanData {
            span_context: context(s.span_id),
            parent_span_id: trace.span_id,
            parent_span_is_remote: false,
            span_kind: s.kind,
            name: Cow::Borrowed(s.name),
            start_time: s.start,
            end_time: s.end,
            attributes: s.attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: status(s.error),
            instrumentation_scope: self.scope.clone(),
        });
        let spans: Vec<SpanData> = steps.chain(std::iter::once(server)).collect();
        let dropped = self.queue.add(spans);
        if dropped > 0 {
            self.dropped.inc_by(dropped as u64);
        }
    }
}

/// The trace and server span ids of the request a task serves: the lines it logs carry them
/// (the log's event format reads them, see `logging`), so that an error line leads to its
/// access line and, when kept, its trace.
#[derive(Debug, Clone, Copy)]
pub struct RequestIds {
    pub trace_id: TraceId,
    pub span_id: SpanId,
}

tokio::task_local! {
    static REQUEST: Option<RequestIds>;
}

/// The ids of the request the current task serves: for a task it spawns to serve it too.
pub fn current_request() -> Option<RequestIds> {
    REQUEST.try_with(|ids| *ids).ok().flatten()
}

/// `fut`, run as serving the request of `ids`: what it logs carries them. A task-local value
/// rather than a `tracing` span: a span formats its fields and enters the subscriber's registry
/// on every poll, which cost a cache hit about 5% (measured, benches/load/traces.sh); this
/// costs a thread-local swap per poll, and an event's ids are written only when it is logged.
pub fn in_request<F: std::future::Future>(
    ids: Option<RequestIds>,
    fut: F,
) -> tokio::task::futures::TaskLocalFuture<Option<RequestIds>, F> {
    REQUEST.scope(ids, fut)
}

/// One request's trace: its ids, whether it is kept, and the steps noted so far.
#[derive(Debug, Clone)]
pub struct RequestTrace {
    pub trace_id: TraceId,
    /// The server span's id.
    pub span_id: SpanId,
    /// The client's span, when its trace is continued.
    parent: Option<SpanId>,
    state: TraceState,
    pub sampled: bool,
    start: SystemTime,
    steps: Vec<Step>,
}

/// A step of a request, as a child span of its server span.
#[derive(Debug, Clone)]
struct Step {
    name: &'static str,
    kind: SpanKind,
    span_id: SpanId,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
    error: bool,
}

impl RequestTrace {
    /// Its trace and server span ids, for the lines logged while it is served.
    pub fn ids(&self) -> RequestIds {
        RequestIds {
            trace_id: self.trace_id,
            span_id: self.span_id,
        }
    }

    /// The `traceparent` of the server span (on the answer: a client finds its trace by it).
    pub fn traceparent(&self) -> String {
        self.traceparent_of(self.span_id)
    }

    /// The `traceparent` of one of its spans (the provider call's, on the call).
    pub fn traceparent_of(&self, span_id: SpanId) -> String {
        let flags = if self.sampled { "01" } else { "00" };
        format!("00-{}-{span_id}-{flags}", self.trace_id)
    }

    /// The `tracestate` the client sent, passed on with the trace: its list members of 128
    /// characters at most, up to 512 in all (the W3C's advice for a list cut short), so that a
    /// client cannot make every paid call's head kilobytes longer.
    pub fn tracestate(&self) -> Option<String> {
        let header = self.state.header();
        let mut out = String::new();
        // Validated by the propagator as it parsed it; written in a request head, so checked
        // once more for anything but visible ASCII and spaces.
        let members = header
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty() && m.len() <= 128)
            .filter(|m| m.bytes().all(|b| (0x20..0x7f).contains(&b)));
        for m in members {
            if out.len() + m.len() + 1 > 512 {
                break;
            }
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(m);
        }
        (!out.is_empty()).then_some(out)
    }

    /// A step that began at `start` and ends now.
    pub fn step(&mut self, name: &'static str, start: SystemTime, error: bool) {
        self.steps.push(Step {
            name,
            kind: SpanKind::Internal,
            span_id: SpanId::from_bytes(rand::random::<u64>().max(1).to_be_bytes()),
            start,
            end: SystemTime::now(),
            attributes: Vec::new(),
            error,
        });
    }

    /// A step between two moments noted elsewhere (in the call's own task).
    pub fn step_between(&mut self, name: &'static str, start: SystemTime, end: SystemTime) {
        self.step(name, start, false);
        if let Some(s) = self.steps.last_mut() {
            s.end = end;
        }
    }

    /// A step with its own span id (known before it began), kind, end and attributes: the
    /// provider call.
    pub fn span(&mut self, span: Span) {
        self.steps.push(Step {
            name: span.name,
            kind: span.kind,
            span_id: span.id,
            start: span.start,
            end: span.end,
            attributes: span.attributes,
            error: span.error,
        });
    }
}

/// A span noted in full (see `RequestTrace::span`).
pub struct Span {
    pub name: &'static str,
    pub kind: SpanKind,
    pub id: SpanId,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    pub error: bool,
}

/// The exporting thread: batches of spans to the collector, as they fill or every second; a
/// batch it does not take (down, slow, refusing) is dropped and counted.
fn export(
    exporter: opentelemetry_otlp::SpanExporter,
    waiting: &Waiting,
    timeout: std::time::Duration,
    dropped: IntCounter,
) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        tracing::error!("tracing: no runtime for the exporting thread; no span will be sent");
        return;
    };
    // A collector that does not take spans is said at `warn`, then at most once a minute
    // (the counter has every dropped span).
    let mut warned: Option<std::time::Instant> = None;
    let mut warn = |what: String| {
        if warned.is_none_or(|w| w.elapsed() >= std::time::Duration::from_secs(60)) {
            warned = Some(std::time::Instant::now());
            tracing::warn!("tracing: {what}; spans are dropped (trace_spans_dropped_total)");
        }
    };
    while let Some(mut spans) = waiting.take() {
        while !spans.is_empty() {
            let rest = spans.split_off(spans.len().min(BATCH));
            let n = spans.len() as u64;
            let sent =
                rt.block_on(async { tokio::time::timeout(timeout, exporter.export(spans)).await });
            match sent {
                Ok(Ok(())) => {}
                // The error's text is not logged: it may quote the collector's answer.
                Ok(Err(_)) => {
                    dropped.inc_by(n);
                    warn(format!(
                        "the collector refused {n} spans, or could not be reached"
                    ));
                }
                Err(_) => {
                    dropped.inc_by(n);
                    warn(format!(
                        "the collector took longer than tracing.timeout for {n} spans"
                    ));
                }
            }
            spans = rest;
        }
    }
}

/// Whether a request has one `traceparent` as W3C Trace Context level 1 writes it: version 00
/// and exactly `00-<32 hex>-<16 hex>-<2 hex>`, lower case, ids not all zero; a later version
/// (not `ff`) with those fields first and more after a `-`. The propagator takes looser ones
/// (an id of one digit, a `+` sign, a trailing `-`): such a header starts a new trace, as the
/// spec asks of an invalid one.
fn valid_traceparent(headers: &http::HeaderMap) -> bool {
    let mut all = headers.get_all("traceparent").iter();
    let (Some(one), None) = (all.next(), all.next()) else {
        return false;
    };
    let Ok(v) = one.to_str() else {
        return false;
    };
    let hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let b = v.as_bytes();
    if b.len() < 55 || (b.len() > 55 && (b[..2] == *b"00" || b[55] != b'-')) {
        return false;
    }
    let (version, trace, span, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
    [b[2], b[35], b[52]] == [b'-'; 3]
        && [version, trace, span, flags].iter().all(|f| hex(f))
        && version != "ff"
        && trace.bytes().any(|c| c != b'0')
        && span.bytes().any(|c| c != b'0')
}

/// The request's headers as the propagator reads them: `tracestate` given in several fields
/// read as the one list they are (the propagator asks for one value).
struct Headers<'a> {
    map: &'a http::HeaderMap,
    tracestate: Option<String>,
}

impl<'a> Headers<'a> {
    fn of(map: &'a http::HeaderMap) -> Headers<'a> {
        let fields: Vec<&str> = (map.get_all("tracestate").iter())
            .filter_map(|v| v.to_str().ok())
            .collect();
        Headers {
            map,
            tracestate: (!fields.is_empty()).then(|| fields.join(",")),
        }
    }
}

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if key.eq_ignore_ascii_case("tracestate") {
            return self.tracestate.as_deref();
        }
        self.map.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.map.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The most of a collector's answer read.
const COLLECTOR_ANSWER_BYTES: usize = 64 * 1024;

/// The gateway's HTTP client (reqwest, with its TLS roots) for the OTLP exporter.
#[derive(Debug)]
struct Http(reqwest::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Http {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let answer = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await?;
        let status = answer.status();
        let headers = answer.headers().clone();
        // A collector's answer is a few bytes (an OTLP response, or an error's text): at most
        // 64 KiB of it is read, and the connection is dropped with the rest.
        let mut body = Vec::new();
        let mut answer = answer;
        while let Some(chunk) = answer.chunk().await? {
            let room = COLLECTOR_ANSWER_BYTES.saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if chunk.len() >= room {
                break;
            }
        }
        let mut out = http::Response::builder()
            .status(status)
            .body(Bytes::from(body))?;
        *out.headers_mut() = headers;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, http::HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn only_a_traceparent_as_the_spec_writes_it_is_continued() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(valid_traceparent(&headers(&[("traceparent", good)])));
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        assert!(valid_traceparent(&headers(&[("traceparent", later)])));
        for bad in [
            "00-1-2-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4738-+0f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "",
        ] {
            assert!(
                !valid_traceparent(&headers(&[("traceparent", bad)])),
                "{bad}"
            );
        }
        assert!(
            !valid_traceparent(&headers(&[("traceparent", good), ("traceparent", good)])),
            "two are one too many"
        );
    }

    #[test]
    fn tracestate_fields_are_one_list_passed_on_bounded() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let h = headers(&[
            ("traceparent", tp),
            ("tracestate", "a=1"),
            ("tracestate", "b=2"),
        ]);
        let cx = TraceContextPropagator::new().extract(&Headers::of(&h));
        let trace = RequestTrace {
            trace_id: cx.span().span_context().trace_id(),
            span_id: SpanId::from_bytes([1; 8]),
            parent: None,
            state: cx.span().span_context().trace_state().clone(),
            sampled: true,
            start: SystemTime::now(),
            steps: Vec::new(),
        };
        assert_eq!(trace.tracestate().as_deref(), Some("a=1,b=2"));
        let long = format!("k=a{}", "x".repeat(200));
        let many: Vec<String> = (0..30)
            .map(|i| format!("m{i}={}", "v".repeat(40)))
            .collect();
        let listed = [vec![long], many].concat().join(",");
        let h = headers(&[("traceparent", tp), ("tracestate", &listed)]);
        let cx = TraceContextPropagator::new().extract(&Headers::of(&h));
        let trace = RequestTrace {
            state: cx.span().span_context().trace_state().clone(),
            ..trace
        };
        let passed = trace.tracestate().unwrap_or_default();
        assert!(passed.len() <= 512 && !passed.contains("xxxx"), "{passed}");
        assert!(passed.starts_with("m0="), "{passed}");
    }
}
