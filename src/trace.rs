//! Traces (`[tracing]`): a server span per request with a child span per step it went through
//! (reading the upload, validation, the cache lookup, the photo's conversion, the store's turn
//! with the budget hold, the wait for an upstream slot, the provider call, its settlement), sent
//! to an OTLP collector over HTTP with protobuf; W3C trace context in (`traceparent` and
//! `tracestate` from trusted clients) and out (to the provider, and on every answer).
//!
//! A request notes its steps as it goes (`RequestTrace::step`), cheap and without a lock; when
//! it ends, its spans are written at once as OTLP protobuf (`otlp`) and handed to a bounded
//! queue. A thread of its own posts them in batches to the collector. A full queue drops the
//! spans, and a batch the collector does not take is dropped too: both counted
//! (`trace_spans_dropped_total`), and the request path never waits for a collector.
//! Spans are built here rather than through the SDK's tracer because their ids must be known
//! before they end (the provider is sent the call's span id, the client the server span's) and
//! their times are those the steps noted.

mod otlp;

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanId, SpanKind, TraceContextExt, TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample,
};
use prometheus::IntCounter;

use crate::config::TracingConfig;

/// Spans sent to the collector in one request at most; the exporting thread is woken when
/// this many wait, else once a second.
const BATCH: usize = 2048;

/// The spans waiting for the exporting thread, written, in batches of `BATCH` at most. A
/// request adds its spans under one short lock and wakes the thread only when a batch is full:
/// a channel that woke it for every span cost the request path more in wake-ups than the spans
/// themselves (measured on the cache-hit path, `benches/load/traces.sh`).
struct Waiting {
    batches: Mutex<Batches>,
    full: Condvar,
    cap: usize,
    /// The room a batch leaves before its spans, for the export's head (`otlp::Envelope`).
    room: usize,
}

#[derive(Default)]
struct Batches {
    ready: Vec<Batch>,
    /// Spans in all of them.
    spans: usize,
    /// The buffers of batches sent, kept for the next ones (`SPARE` at most): a new buffer
    /// grew by doubling, a copy each time, on fresh pages the kernel had to clear, which cost
    /// a traced request a third of what writing its spans does (callgrind and perf,
    /// benches/load/traces.sh).
    spare: Vec<Vec<u8>>,
}

/// Buffers kept for batches to come.
const SPARE: usize = 4;

/// Spans written one after the other as `ScopeSpans.spans` entries.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    spans: usize,
}

impl Waiting {
    /// Add a request's `n` spans, written, all or none: past `cap` they are dropped (the
    /// return: how many).
    fn add(&self, written: &[u8], n: usize) -> usize {
        let Ok(mut waiting) = self.batches.lock() else {
            return n;
        };
        if waiting.spans + n > self.cap {
            return n;
        }
        waiting.spans += n;
        let room = waiting.ready.last().is_some_and(|b| b.spans + n <= BATCH);
        if !room {
            let mut bytes = waiting.spare.pop().unwrap_or_default();
            bytes.resize(self.room, 0);
            waiting.ready.push(Batch { bytes, spans: 0 });
        }
        if let Some(b) = waiting.ready.last_mut() {
            b.bytes.extend_from_slice(written);
            b.spans += n;
        }
        // A batch has just filled (the one before this new one): the exporting thread is
        // woken once for it, not on every add while batches wait for it (a condition
        // variable's notice is a system call whether a thread waits or not).
        if !room && waiting.ready.len() > 1 {
            self.full.notify_one();
        }
        0
    }

    /// The batches waiting once one is full or a second has passed (none: the lock is gone).
    fn take(&self) -> Option<Vec<Batch>> {
        let waiting = self.batches.lock().ok()?;
        let (mut waiting, _) = self
            .full
            .wait_timeout_while(waiting, Duration::from_secs(1), |w| w.ready.len() < 2)
            .ok()?;
        waiting.spans = 0;
        Some(std::mem::take(&mut waiting.ready))
    }

    /// A sent batch's buffer, for a batch to come.
    fn recycle(&self, mut bytes: Vec<u8>) {
        bytes.clear();
        if let Ok(mut waiting) = self.batches.lock() {
            if waiting.spare.len() < SPARE {
                waiting.spare.push(bytes);
            }
        }
    }
}

thread_local! {
    /// Where a request's spans are written before they join the queue (its allocation kept).
    static WRITTEN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A span attribute: its key (OpenTelemetry's semantic name where it has one) and its value,
/// borrowed from the request where it can be: the server span's are written while the request
/// is still there, without a copy.
#[derive(Debug, Clone)]
pub struct Attribute<'a> {
    pub key: &'static str,
    pub value: Value<'a>,
}

#[derive(Debug, Clone)]
pub enum Value<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    /// An address, written as its text when the span is (without a `String` of its own).
    Ip(std::net::IpAddr),
}

impl<'a> Attribute<'a> {
    pub fn str(key: &'static str, value: impl Into<Cow<'a, str>>) -> Attribute<'a> {
        Attribute {
            key,
            value: Value::Str(value.into()),
        }
    }

    pub fn int(key: &'static str, value: i64) -> Attribute<'a> {
        Attribute {
            key,
            value: Value::Int(value),
        }
    }

    pub fn ip(key: &'static str, value: std::net::IpAddr) -> Attribute<'a> {
        Attribute {
            key,
            value: Value::Ip(value),
        }
    }
}

/// The traces of a process: the sampler, the ids and the queue to the exporting thread.
pub struct Tracer {
    sampler: Sampler,
    ids: RandomIdGenerator,
    trust_client: bool,
    queue: Arc<Waiting>,
    dropped: IntCounter,
}

impl Tracer {
    /// The tracer of `[tracing]`, and the thread that sends its spans. `dropped` counts the
    /// spans that never reached the collector.
    pub fn start(cfg: &TracingConfig, dropped: IntCounter) -> anyhow::Result<Tracer> {
        // A client of its own: a redirect is not followed (it would carry the collector's
        // headers to another host, or turn the POST into a GET whose 200 hides lost spans),
        // and an idle connection is not kept past half a second: the exporting thread's
        // runtime runs only while it sends, so it would not notice a collector (or a load
        // balancer) closing it, and the next batch would fail on it.
        let http = reqwest::Client::builder()
            .user_agent(concat!("liveness-gateway/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_millis(500))
            .build()?;
        let envelope = otlp::Envelope::new(&cfg.service_name, env!("CARGO_PKG_VERSION"));
        let queue = Arc::new(Waiting {
            batches: Mutex::new(Batches::default()),
            full: Condvar::new(),
            cap: cfg.queue,
            room: envelope.room(),
        });
        let collector = Collector {
            http,
            url: cfg.traces_url.clone(),
            headers: cfg.headers.clone(),
            timeout: cfg.timeout,
            envelope,
        };
        let (spans, lost) = (queue.clone(), dropped.clone());
        std::thread::Builder::new()
            .name("trace-export".into())
            .spawn(move || export(&collector, &spans, lost))?;
        Ok(Tracer {
            sampler: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sample_ratio))),
            ids: RandomIdGenerator::default(),
            trust_client: cfg.trust_client_context,
            queue,
            dropped,
        })
    }

    /// The trace of a request: the client's, continued, when it sent a valid `traceparent` and
    /// is trusted (behind `server.trusted_proxies`, or `trust_client_context`), else a new one;
    /// kept or not as the sampler says (a client's sampled flag decides for its trace).
    pub fn begin(&self, headers: &http::HeaderMap, trusted_peer: bool) -> RequestTrace {
        // The propagator and its context only for a client's trace that is continued: a new
        // trace's sampler is asked without a parent, which is what the parent-based sampler
        // does with an empty context.
        let remote = ((trusted_peer || self.trust_client) && valid_traceparent(headers))
            .then(|| {
                let parent = TraceContextPropagator::new().extract(&Headers::of(headers));
                let remote = parent.span().span_context().clone();
                (parent, remote)
            })
            .filter(|(_, remote)| remote.is_valid());
        let trace_id = match &remote {
            Some((_, r)) => r.trace_id(),
            None => self.ids.new_trace_id(),
        };
        let sampled = self
            .sampler
            .should_sample(
                remote.as_ref().map(|(parent, _)| parent),
                trace_id,
                "request",
                &SpanKind::Server,
                &[],
                &[],
            )
            .decision
            == SamplingDecision::RecordAndSample;
        let span_id = self.ids.new_span_id();
        RequestTrace {
            trace_id,
            span_id,
            parent: remote.as_ref().map(|(_, r)| r.span_id()),
            state: remote.and_then(|(_, r)| bounded(&r.trace_state().header())),
            sampled,
            // An unkept trace reads no clock: its start is never written anywhere.
            start: match sampled {
                true => SystemTime::now(),
                false => SystemTime::UNIX_EPOCH,
            },
            traceparent: traceparent(trace_id, span_id, sampled),
            // A kept trace notes a step or ten: room for them at once.
            steps: Vec::with_capacity(if sampled { 12 } else { 0 }),
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
        name: Cow<'_, str>,
        attributes: &[Attribute<'_>],
        error: bool,
    ) {
        if !trace.sampled {
            return;
        }
        let end = SystemTime::now();
        let state = trace.state.as_deref().unwrap_or_default();
        let n = trace.steps.len() + 1;
        let dropped = WRITTEN.with_borrow_mut(|out| {
            out.clear();
            for s in &trace.steps {
                otlp::span(
                    out,
                    &otlp::SpanRecord {
                        trace_id: trace.trace_id,
                        span_id: s.span_id,
                        trace_state: state,
                        parent: Some((trace.span_id, false)),
                        name: s.name,
                        kind: &s.kind,
                        start: s.start,
                        end: s.end,
                        attributes: &s.attributes,
                        error: s.error,
                    },
                );
            }
            otlp::span(
                out,
                &otlp::SpanRecord {
                    trace_id: trace.trace_id,
                    span_id: trace.span_id,
                    trace_state: state,
                    parent: trace.parent.map(|p| (p, true)),
                    name: &name,
                    kind: &SpanKind::Server,
                    start: trace.start,
                    end,
                    attributes,
                    error,
                },
            );
            self.queue.add(out, n)
        });
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
    /// The client's `tracestate`, bounded (see `bounded`), passed on to the provider and
    /// written in the spans.
    state: Option<String>,
    pub sampled: bool,
    start: SystemTime,
    /// The server span's `traceparent`, written once: the answer carries it, and the log line
    /// its ids (`ids_hex`).
    traceparent: [u8; 55],
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
    attributes: Vec<Attribute<'static>>,
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
    pub fn traceparent(&self) -> http::HeaderValue {
        // Visible ASCII only: always a valid value.
        http::HeaderValue::from_bytes(&self.traceparent)
            .unwrap_or(http::HeaderValue::from_static(""))
    }

    /// The trace id and the server span's id in hex, as in its `traceparent`.
    pub fn ids_hex(&self) -> (&str, &str) {
        let tp = std::str::from_utf8(&self.traceparent).unwrap_or_default();
        (
            tp.get(3..35).unwrap_or_default(),
            tp.get(36..52).unwrap_or_default(),
        )
    }

    /// The `traceparent` of one of its spans (the provider call's, on the call).
    pub fn traceparent_of(&self, span_id: SpanId) -> String {
        let mut tp = self.traceparent;
        tp[36..52].copy_from_slice(&Hex::span(span_id).0);
        String::from_utf8_lossy(&tp).into_owned()
    }

    /// The `tracestate` the client sent, bounded, passed on with the trace.
    pub fn tracestate(&self) -> Option<String> {
        self.state.clone()
    }

    /// Forget the client's `tracestate` when it holds a secret (`holds`: the egress check's
    /// test): neither the provider nor the collector is given it.
    pub fn screen_state(&mut self, holds: impl Fn(&[u8]) -> bool) {
        if self.state.as_deref().is_some_and(|s| holds(s.as_bytes())) {
            self.state = None;
        }
    }

    /// A step that began at `start` and ends now. A trace that is not kept notes none, here
    /// for every step and span: nothing would ever write them.
    pub fn step(&mut self, name: &'static str, start: SystemTime, error: bool) {
        if !self.sampled {
            return;
        }
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
        if !self.sampled {
            return;
        }
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

/// `00-<trace id>-<span id>-<flags>`, written in place (see `Hex`).
fn traceparent(trace_id: TraceId, span_id: SpanId, sampled: bool) -> [u8; 55] {
    let mut tp = *b"00-00000000000000000000000000000000-0000000000000000-00";
    tp[3..35].copy_from_slice(&Hex::trace(trace_id).0);
    tp[36..52].copy_from_slice(&Hex::span(span_id).0);
    if sampled {
        tp[54] = b'1';
    }
    tp
}

/// A client's `tracestate` as it is passed on: its list members of 128 characters at most, up
/// to 512 in all (the W3C's advice for a list cut short), so that a client cannot make every
/// paid call's head, or every span, kilobytes longer.
fn bounded(header: &str) -> Option<String> {
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

/// An id (`N` bytes) as its `2 * N` lower-case hex digits, written without the formatter: a
/// trace id's `{:032x}` went through the formatter's padding for a `u128`, and with the span id
/// and the `traceparent` cost a cache hit about 2,000 instructions of the 5,800 that tracing
/// added to it at `sample_ratio = 0` (callgrind, benches/load/traces.sh).
pub struct Hex<const M: usize>([u8; M]);

impl Hex<32> {
    pub fn trace(id: TraceId) -> Hex<32> {
        Hex::of(id.to_bytes())
    }
}

impl Hex<16> {
    pub fn span(id: SpanId) -> Hex<16> {
        Hex::of(id.to_bytes())
    }
}

impl<const M: usize> Hex<M> {
    fn of<const N: usize>(bytes: [u8; N]) -> Hex<M> {
        let mut out = [b'0'; M];
        // M is 2 * N at every use (`trace`, `span`).
        let _ = hex::encode_to_slice(bytes, &mut out);
        Hex(out)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// A span noted in full (see `RequestTrace::span`).
pub struct Span {
    pub name: &'static str,
    pub kind: SpanKind,
    pub id: SpanId,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<Attribute<'static>>,
    pub error: bool,
}

/// Where the exporting thread posts the spans.
struct Collector {
    http: reqwest::Client,
    url: String,
    /// Secret values among them: never logged.
    headers: Vec<(String, String)>,
    timeout: Duration,
    envelope: otlp::Envelope,
}

impl Collector {
    /// Post one batch; whether the collector took it (a 2xx), within `timeout`. Its buffer
    /// goes back to `waiting` once the client is done with it.
    async fn send(&self, mut bytes: Vec<u8>, waiting: &Arc<Waiting>) -> Result<(), Refused> {
        let start = self.envelope.write(&mut bytes);
        let body = bytes::Bytes::from_owner(Export {
            bytes,
            start,
            waiting: waiting.clone(),
        });
        let mut request = self
            .http
            .post(&self.url)
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(body);
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        let sent = async {
            let mut answer = request.send().await.map_err(|_| Refused::Unreachable)?;
            // A collector's answer is a few bytes (an OTLP response, or an error's text): at
            // most 64 KiB of it is read, and the connection is dropped with the rest.
            let mut read = 0;
            while let Some(chunk) = answer.chunk().await.map_err(|_| Refused::Unreachable)? {
                read += chunk.len();
                if read >= COLLECTOR_ANSWER_BYTES {
                    break;
                }
            }
            if answer.status().is_success() {
                Ok(())
            } else {
                Err(Refused::Status(answer.status().as_u16()))
            }
        };
        tokio::time::timeout(self.timeout, sent)
            .await
            .unwrap_or(Err(Refused::TimedOut))
    }
}

/// A batch's buffer as the body of its export (from `start`), given back to the queue for a
/// batch to come when the client drops it.
struct Export {
    bytes: Vec<u8>,
    start: usize,
    waiting: Arc<Waiting>,
}

impl AsRef<[u8]> for Export {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.waiting.recycle(std::mem::take(&mut self.bytes));
    }
}

/// Why a batch did not reach the collector.
enum Refused {
    Unreachable,
    Status(u16),
    TimedOut,
}

/// The exporting thread: batches of spans to the collector, as they fill or every second; a
/// batch it does not take (down, slow, refusing) is dropped and counted.
fn export(collector: &Collector, waiting: &Arc<Waiting>, dropped: IntCounter) {
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
        if warned.is_none_or(|w| w.elapsed() >= Duration::from_secs(60)) {
            warned = Some(std::time::Instant::now());
            tracing::warn!("tracing: {what}; spans are dropped (trace_spans_dropped_total)");
        }
    };
    while let Some(batches) = waiting.take() {
        for batch in batches {
            let n = batch.spans;
            // The error's text is not logged: it may quote the collector's answer.
            let sent = rt.block_on(collector.send(batch.bytes, waiting));
            match sent {
                Ok(()) => {}
                Err(Refused::Unreachable) => {
                    dropped.inc_by(n as u64);
                    warn(format!("the collector could not be reached for {n} spans"));
                }
                Err(Refused::Status(status)) => {
                    dropped.inc_by(n as u64);
                    warn(format!("the collector answered {status} to {n} spans"));
                }
                Err(Refused::TimedOut) => {
                    dropped.inc_by(n as u64);
                    warn(format!(
                        "the collector took longer than tracing.timeout for {n} spans"
                    ));
                }
            }
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
    fn the_queue_keeps_a_request_s_spans_together_in_batches_and_drops_past_its_cap() {
        let q = Waiting {
            batches: Mutex::new(Batches::default()),
            full: Condvar::new(),
            cap: BATCH + 10,
            room: 0,
        };
        assert_eq!(q.add(b"ab", BATCH - 1), 0);
        // Two more do not fit the first batch: both go to a second one, and the first is full.
        assert_eq!(q.add(b"cd", 2), 0);
        assert_eq!(q.add(b"ef", 20), 20, "past the cap: all of them dropped");
        assert_eq!(q.add(b"gh", 8), 0);
        let batches = q.take().expect("batches");
        let got: Vec<(&[u8], usize)> = batches.iter().map(|b| (&b.bytes[..], b.spans)).collect();
        assert_eq!(got, [(&b"ab"[..], BATCH - 1), (&b"cdgh"[..], 10)]);
        // A sent batch's buffer is the next batch's, emptied, its room kept.
        let mut sent = batches.into_iter().map(|b| b.bytes);
        let room = sent.next().map(|mut b| {
            b.reserve(4096);
            let room = b.capacity();
            q.recycle(b);
            room
        });
        assert_eq!(q.add(b"ij", BATCH), 0, "taken: room again");
        let waiting = q.batches.lock().expect("lock");
        let next = &waiting.ready[0].bytes;
        assert_eq!((&next[..], Some(next.capacity())), (&b"ij"[..], room));
    }

    #[test]
    fn a_batch_leaves_room_for_the_export_s_head_before_its_spans() {
        let q = Waiting {
            batches: Mutex::new(Batches::default()),
            full: Condvar::new(),
            cap: 100,
            room: 3,
        };
        q.recycle(b"old spans".to_vec());
        assert_eq!(q.add(b"ab", 1), 0);
        assert_eq!(q.add(b"cd", 1), 0);
        let waiting = q.batches.lock().expect("lock");
        assert_eq!(waiting.ready[0].bytes, b"\0\0\0abcd");
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
            state: bounded(&cx.span().span_context().trace_state().header()),
            sampled: true,
            start: SystemTime::now(),
            traceparent: [b'0'; 55],
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
            state: bounded(&cx.span().span_context().trace_state().header()),
            ..trace
        };
        let passed = trace.tracestate().unwrap_or_default();
        assert!(passed.len() <= 512 && !passed.contains("xxxx"), "{passed}");
        assert!(passed.starts_with("m0="), "{passed}");
    }

    fn tracer(sample_ratio: f64, trust_client_context: bool) -> Tracer {
        let cfg = TracingConfig {
            // Nothing is exported in these tests: no span is kept long enough.
            traces_url: "http://127.0.0.1:9/v1/traces".into(),
            service_name: "gateway".into(),
            sample_ratio,
            headers: Vec::new(),
            timeout: Duration::from_secs(1),
            trust_client_context,
            queue: 16,
        };
        let dropped = IntCounter::new("dropped", "dropped spans");
        match dropped
            .map_err(anyhow::Error::from)
            .and_then(|d| Tracer::start(&cfg, d))
        {
            Ok(t) => t,
            Err(e) => panic!("tracer: {e}"),
        }
    }

    #[test]
    fn a_request_s_trace_is_its_client_s_when_trusted_and_its_traceparent_says_so() {
        let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7";
        let tp = |flags: &str| format!("{sent}-{flags}");
        let parent = |t: &RequestTrace| t.parent.map(|p| p.to_string());
        for (ratio, trust) in [(0.0, false), (1.0, false), (0.0, true), (1.0, true)] {
            let tracer = tracer(ratio, trust);
            for (peer, flags) in [(false, "01"), (true, "01"), (true, "00")] {
                let h = headers(&[("traceparent", &tp(flags)), ("tracestate", "a=1")]);
                let t = tracer.begin(&h, peer);
                let case = format!("ratio {ratio}, trust {trust}, peer {peer}, flags {flags}");
                let continued = peer || trust;
                assert_eq!(
                    t.trace_id.to_string() == "4bf92f3577b34da6a3ce929d0e0e4736",
                    continued,
                    "{case}"
                );
                assert_eq!(
                    parent(&t),
                    continued.then(|| "00f067aa0ba902b7".to_string()),
                    "{case}"
                );
                assert_eq!(t.tracestate().is_some(), continued, "{case}");
                // A continued trace is kept as its client's flag says; a new one as the ratio.
                let sampled = match continued {
                    true => flags == "01",
                    false => ratio == 1.0,
                };
                assert_eq!(t.sampled, sampled, "{case}");
                // The answer's `traceparent` and the log line's ids are the server span's.
                let (trace_hex, span_hex) = t.ids_hex();
                assert_eq!(trace_hex, t.trace_id.to_string(), "{case}");
                assert_eq!(span_hex, t.span_id.to_string(), "{case}");
                let flag = if sampled { "01" } else { "00" };
                let answer = format!("00-{trace_hex}-{span_hex}-{flag}");
                assert_eq!(
                    t.traceparent().to_str().ok(),
                    Some(answer.as_str()),
                    "{case}"
                );
                // The provider's is the call's span, in the same trace.
                let call = SpanId::from_bytes([0xC7; 8]);
                let to_provider = format!("00-{trace_hex}-c7c7c7c7c7c7c7c7-{flag}");
                assert_eq!(t.traceparent_of(call), to_provider, "{case}");
            }
            let fresh = tracer.begin(&http::HeaderMap::new(), true);
            assert_eq!((fresh.parent, fresh.sampled), (None, ratio == 1.0));
        }
    }

    #[test]
    fn only_a_kept_trace_notes_its_steps_and_spans() {
        for (ratio, kept) in [(0.0, false), (1.0, true)] {
            let tracer = tracer(ratio, false);
            let mut t = tracer.begin(&http::HeaderMap::new(), false);
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
            t.step("validate", at, false);
            t.step_between("settle", at, at);
            t.span(Span {
                name: "call",
                kind: SpanKind::Client,
                id: tracer.span_id(),
                start: at,
                end: at,
                attributes: vec![Attribute::int("http.response.status_code", 200)],
                error: false,
            });
            let names: Vec<_> = t.steps.iter().map(|s| s.name).collect();
            let noted: &[&str] = if kept {
                &["validate", "settle", "call"]
            } else {
                &[]
            };
            assert_eq!(names, noted, "sample_ratio {ratio}");
        }
    }
}
