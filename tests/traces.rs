//! Traces against a real OTLP/HTTP receiver (tests/clients/otlp_receiver.py, which decodes what
//! the gateway sends with the official OpenTelemetry protobuf definitions): for a MISS, a HIT, a
//! 429, a provider timeout and a fleet request, the spans' names, parents and attributes, the
//! client's trace continued (only when it is trusted), the provider given the call's span as its
//! parent, the access line carrying the ids, no secret in any attribute; and a collector that is
//! down or hangs changes nothing for clients (its spans are counted as dropped).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// The OTLP receiver, and where it writes the spans it decodes.
struct Receiver {
    _child: KillOnDrop,
    port: u16,
    spans: PathBuf,
}

impl Receiver {
    fn start(dir: &Path, mode: &str) -> Receiver {
        let (port_file, spans) = (dir.join("otlp.port"), dir.join("spans.jsonl"));
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/otlp_receiver.py"
        );
        let child = std::process::Command::new("python3")
            .arg(script)
            .arg(&port_file)
            .arg(&spans)
            .args((!mode.is_empty()).then_some(mode))
            .spawn()
            .expect("python3 (.ci/install-deps installs opentelemetry-proto)");
        let child = KillOnDrop(child);
        let until = Instant::now() + Duration::from_secs(20);
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                break p;
            }
            assert!(Instant::now() < until, "the OTLP receiver did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        Receiver {
            _child: child,
            port,
            spans,
        }
    }

    fn url(&self) -> String {
        format!("\"http://127.0.0.1:{}\"", self.port)
    }

    /// The spans of `trace_id` once at least `n` have come (within 10 s).
    async fn trace(&self, trace_id: &str, n: usize) -> Vec<Value> {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let spans: Vec<Value> = std::fs::read_to_string(&self.spans)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|s| s["trace_id"] == trace_id)
                .collect();
            if spans.len() >= n || Instant::now() > until {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A client's W3C trace context.
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn traceparent_of(answer: &Answer) -> (String, String, String) {
    let tp = answer
        .header("traceparent")
        .expect("traceparent on the answer");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

async fn post_traced(url: &str, key: &str, image: &[u8], client_trace: bool) -> Answer {
    let mut headers = vec![("X-Api-Key", key)];
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    if client_trace {
        headers.push(("traceparent", tp.as_str()));
        headers.push(("tracestate", "vendor=abc"));
    }
    post(url, &headers, multipart(&[Part::image("face.jpg", image)])).await
}

fn names(spans: &[Value]) -> BTreeSet<String> {
    spans
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn server_span(spans: &[Value]) -> &Value {
    spans
        .iter()
        .find(|s| s["kind"] == 2)
        .expect("a server span")
}

/// No key (the organization's, a tenant's, the collector's) in any span's name or attribute.
fn assert_no_secret(spans: &[Value]) {
    for s in spans {
        let text = format!("{} {}", s["name"], s["attributes"]);
        for secret in [ORG_KEY, "alpha-key", "beta-key", "collector-secret"] {
            assert!(!text.contains(secret), "{secret} in a span: {text}");
        }
    }
}

/// One gateway behind which the client is trusted (127.0.0.1 is a trusted proxy), its spans
/// to the receiver: a MISS continues the client's trace and is parented to its span, with a
/// child per step and the provider call as a client span whose id the provider got as its
/// parent; a HIT, a 429 and a provider timeout are traces of their own shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_a_trace_with_a_span_per_step() {
    let dir = tempfile::tempdir().expect("dir");
    let receiver = Receiver::start(dir.path(), "");
    let emu = start_emulator();
    let builder = TestGateway::for_emulator(&emu)
        .set("server.trusted_proxies", "[\"127.0.0.1/32\"]")
        .set("server.log_format", "\"json\"")
        .set("tracing.otlp_endpoint", &receiver.url())
        .set("tracing.service_name", "\"gateway-under-test\"")
        .set("tracing.headers_env", "\"LG_TEST_OTLP_HEADERS\"")
        .set("upstream.total_timeout", "\"1s\"")
        .tenant_set("beta", "rate_per_second", "1")
        .tenant_set("beta", "burst", "1");
    let env = [("LG_TEST_OTLP_HEADERS", "x-collector-key=collector-secret")];
    let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &env).await;
    let url = format!("http://{}", cfg.listen);
    let face = fixture("face.jpg");

    // A MISS, continuing the client's trace.
    let a = post_traced(&url, "alpha-key", &face, true).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let (trace, server_id, flags) = traceparent_of(&a);
    assert_eq!((trace.as_str(), flags.as_str()), (CLIENT_TRACE, "01"));
    let spans = receiver.trace(CLIENT_TRACE, 9).await;
    let want: BTreeSet<String> = [
        "POST /api/v1/backend/liveness/short/",
        "read_upload",
        "validate",
        "cache_lookup",
        "prepare_photo",
        "budget_claim",
        "upstream_slot",
        "provider_call",
        "settle",
    ]
    .map(String::from)
    .into();
    assert_eq!(names(&spans), want, "{spans:#?}");
    let server = server_span(&spans);
    assert_eq!(server["span_id"], server_id.as_str());
    assert_eq!(
        server["parent_span_id"], CLIENT_SPAN,
        "the client's span is the parent"
    );
    assert_eq!(server["service"], "gateway-under-test");
    assert_eq!(server["scope"], "liveness-gateway");
    assert_eq!(server["scope_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(server["trace_state"], "vendor=abc");
    assert_eq!(
        server["flags"], 0x301,
        "sampled, with a parent known to be remote"
    );
    assert_eq!(server["content_type"], "application/x-protobuf");
    assert_eq!(server["headers"]["x-collector-key"], "collector-secret");
    let attrs = &server["attributes"];
    assert_eq!(attrs["http.request.method"], "POST");
    assert_eq!(attrs["http.response.status_code"], 200);
    assert_eq!(attrs["liveness.tenant"], "alpha");
    assert_eq!(attrs["liveness.cache"], "MISS");
    assert_eq!(attrs["liveness.org_key"], "default");
    for child in spans.iter().filter(|s| s["kind"] != 2) {
        assert_eq!(child["parent_span_id"], server_id.as_str(), "{child}");
        assert_eq!(child["flags"], 0x101, "sampled, a local parent: {child}");
        let (start, end) = (child["start"].as_u64(), child["end"].as_u64());
        assert!(start <= end && start >= server["start"].as_u64(), "{child}");
    }
    let call = spans
        .iter()
        .find(|s| s["name"] == "provider_call")
        .expect("provider_call");
    assert_eq!(call["kind"], 3, "a client span");
    assert_eq!(call["attributes"]["server.address"], "127.0.0.1");
    assert_eq!(call["attributes"]["http.response.status_code"], 200);
    assert!(call["attributes"]["http.request.body.size"].as_i64() > Some(face.len() as i64));
    assert!(call["attributes"]["http.response.body.size"].as_i64() > Some(0));
    let stats = emu.stats();
    assert_eq!(
        stats.last_traceparent.as_deref(),
        Some(
            format!(
                "00-{CLIENT_TRACE}-{}-01",
                call["span_id"].as_str().unwrap_or("")
            )
            .as_str()
        ),
        "the provider is sent the call's span"
    );
    assert_eq!(stats.last_tracestate.as_deref(), Some("vendor=abc"));
    assert_no_secret(&spans);

    // The access line names the trace and the server span.
    let lines = gw.access_lines_soon(1).await;
    let line = lines.last().expect("an access line");
    assert_eq!(line["trace_id"], CLIENT_TRACE);
    assert_eq!(line["span_id"], server_id.as_str());

    // A method or a path is the client's text: an invented method is `_OTHER`, a path holding
    // the collector's key is withheld, in the span as in the log.
    let method = reqwest::Method::from_bytes(b"COLLECTORSECRETMETHOD").expect("method");
    let odd = client()
        .request(method, format!("{url}/x/collector-secret"))
        .send()
        .await
        .expect("request");
    let (trace, _, _) = traceparent_of(&Answer {
        status: odd.status().as_u16(),
        headers: odd.headers().clone(),
        body: Vec::new(),
    });
    let spans = receiver.trace(&trace, 1).await;
    let server = server_span(&spans);
    assert_eq!(server["name"], "_OTHER");
    assert_eq!(server["attributes"]["http.request.method"], "_OTHER");
    assert_eq!(
        server["attributes"]["url.path"],
        "[withheld: holds a secret]"
    );
    let lines = gw.access_lines_soon(2).await;
    let line = lines.last().expect("an access line");
    assert_eq!(
        (line["method"].as_str(), line["path"].as_str()),
        (Some("_OTHER"), Some("[withheld: holds a secret]"))
    );

    // A HIT: a trace of its own (no client context), no provider call.
    let hit = post_traced(&url, "alpha-key", &face, false).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    let (trace, _, _) = traceparent_of(&hit);
    assert_ne!(trace, CLIENT_TRACE);
    let spans = receiver.trace(&trace, 4).await;
    assert_eq!(server_span(&spans)["attributes"]["liveness.cache"], "HIT");
    assert_eq!(server_span(&spans)["parent_span_id"], "", "a root span");
    assert!(!names(&spans).contains("provider_call"), "{spans:#?}");

    // A 429: the refusal's code on the server span.
    let mut refused = None;
    for n in 0..3 {
        let r = post_traced(&url, "beta-key", &variant(&face, 10 + n), false).await;
        if r.status == 429 {
            refused = Some(r);
            break;
        }
    }
    let refused = refused.expect("a 429");
    let (trace, _, _) = traceparent_of(&refused);
    let spans = receiver.trace(&trace, 1).await;
    let attrs = &server_span(&spans)["attributes"];
    assert_eq!(attrs["http.response.status_code"], 429);
    assert_eq!(attrs["error.type"], "rate_limited");
    assert_eq!(
        server_span(&spans)["status"],
        0,
        "a client's error is not the server's"
    );

    // The provider times out: the call's span and the server's are errors.
    emu.set_latency(Duration::from_millis(2500));
    let slow = post_traced(&url, "alpha-key", &variant(&face, 99), false).await;
    emu.set_latency(Duration::ZERO);
    assert_eq!(slow.code(), "upstream_timeout", "{}", slow.text());
    let (trace, _, _) = traceparent_of(&slow);
    let spans = receiver.trace(&trace, 9).await;
    let call = spans
        .iter()
        .find(|s| s["name"] == "provider_call")
        .expect("provider_call");
    assert_eq!(call["status"], 2, "an error: {call}");
    assert_eq!(server_span(&spans)["status"], 2);
    assert_eq!(
        server_span(&spans)["attributes"]["error.type"],
        "upstream_timeout"
    );
    // The warning the failed call logged leads to its trace.
    let warned = gw
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "upstream call failed")
        .expect("the failed call's warning");
    assert_eq!(warned["span"]["trace_id"], trace.as_str(), "{warned}");
    let m = metrics_text(&format!("http://{}", cfg.admin_listen)).await;
    assert_eq!(
        sample(&m, "liveness_gateway_trace_spans_dropped_total"),
        0.0
    );
}

/// Without a trusted peer (and `trust_client_context` off), a client's `traceparent` does not
/// choose the trace: a new one is begun. With `sample_ratio = 0`, no span is sent, and the
/// answer still names its trace (flags `00`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_trusted_clients_continue_their_trace_and_the_ratio_samples() {
    let dir = tempfile::tempdir().expect("dir");
    let receiver = Receiver::start(dir.path(), "");
    let emu = start_emulator();
    let untrusted = TestGateway::for_emulator(&emu)
        .set("tracing.otlp_endpoint", &receiver.url())
        .start();
    let face = fixture("face.jpg");
    let a = post_traced(&untrusted.url(), "alpha-key", &face, true).await;
    let (trace, _, _) = traceparent_of(&a);
    assert_ne!(
        trace, CLIENT_TRACE,
        "an untrusted client's trace is not continued"
    );
    let spans = receiver.trace(&trace, 9).await;
    assert_eq!(server_span(&spans)["parent_span_id"], "");
    assert!(emu
        .stats()
        .last_traceparent
        .is_some_and(|tp| tp.contains(&trace)));
    drop(untrusted);

    let trusting = TestGateway::for_emulator(&emu)
        .set("tracing.otlp_endpoint", &receiver.url())
        .set("tracing.trust_client_context", "true")
        .set("tracing.sample_ratio", "0.0")
        .start();
    let unsampled = post_traced(&trusting.url(), "alpha-key", &variant(&face, 1), false).await;
    let (trace, _, flags) = traceparent_of(&unsampled);
    assert_eq!(flags, "00");
    // A sampled parent is kept whatever the ratio (parent-based).
    let kept = post_traced(&trusting.url(), "alpha-key", &variant(&face, 2), true).await;
    let (kept_trace, _, kept_flags) = traceparent_of(&kept);
    assert_eq!(
        (kept_trace.as_str(), kept_flags.as_str()),
        (CLIENT_TRACE, "01")
    );
    assert!(receiver.trace(CLIENT_TRACE, 9).await.len() >= 9);
    assert!(receiver.trace(&trace, 1).await.is_empty(), "not sampled");
}

/// A trusted client's `tracestate` is passed on (to the provider, into the spans) bounded, and
/// not at all when it holds a secret: here the request's own tenant key, or the collector's
/// header value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_s_trace_state_is_passed_on_bounded_and_never_with_a_secret() {
    let dir = tempfile::tempdir().expect("dir");
    let receiver = Receiver::start(dir.path(), "");
    let emu = start_emulator();
    let builder = TestGateway::for_emulator(&emu)
        .set("tracing.otlp_endpoint", &receiver.url())
        .set("tracing.trust_client_context", "true")
        .set("tracing.headers_env", "\"LG_TEST_OTLP_HEADERS\"");
    let env = [("LG_TEST_OTLP_HEADERS", "x-collector-key=collector-secret")];
    let (_gw, cfg) = GatewayProcess::start(&builder, dir.path(), &env).await;
    let url = format!("http://{}", cfg.listen);
    let face = fixture("face.jpg");
    let long: Vec<String> = (0..40)
        .map(|i| format!("m{i}={}", "v".repeat(60)))
        .collect();
    for (n, (trace, state)) in [
        (
            "4bf92f3577b34da6a3ce929d0e0e4701",
            "leak=alpha-key,ok=1".to_string(),
        ),
        (
            "4bf92f3577b34da6a3ce929d0e0e4702",
            "ok=1,c=collector-secret".to_string(),
        ),
        ("4bf92f3577b34da6a3ce929d0e0e4703", long.join(",")),
    ]
    .into_iter()
    .enumerate()
    {
        let tp = format!("00-{trace}-{CLIENT_SPAN}-01");
        let headers = [
            ("X-Api-Key", "alpha-key"),
            ("traceparent", tp.as_str()),
            ("tracestate", state.as_str()),
        ];
        let a = post(
            &url,
            &headers,
            multipart(&[Part::image("face.jpg", &variant(&face, 70 + n as u64))]),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.text());
        let spans = receiver.trace(trace, 9).await;
        assert_eq!(spans.len(), 9, "{spans:?}");
        let sent = emu.stats().last_tracestate.unwrap_or_default();
        for s in &spans {
            let kept = s["trace_state"].as_str().unwrap_or_default();
            assert!(kept.len() <= 512, "{kept}");
            assert!(
                !kept.contains("alpha-key") && !kept.contains("collector-secret"),
                "{kept}"
            );
        }
        assert!(sent.len() <= 512 && !sent.contains("alpha-key"), "{sent}");
        assert!(!sent.contains("collector-secret"), "{sent}");
        if n == 2 {
            assert!(spans[0]["trace_state"]
                .as_str()
                .is_some_and(|t| t.starts_with("m0=")));
        }
    }
}

/// A collector that answers with a redirect is not followed (the spans and the collector's
/// headers stay with the collector named): the batch is dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_s_redirect_is_not_followed() {
    let dir = tempfile::tempdir().expect("dir");
    let receiver = Receiver::start(dir.path(), "--redirect");
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("tracing.otlp_endpoint", &receiver.url())
        .start();
    let a = post_traced(&gw.url(), "alpha-key", &fixture("face.jpg"), false).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let until = Instant::now() + Duration::from_secs(10);
    while sample(
        &metrics_text(&gw.admin_url()).await,
        "liveness_gateway_trace_spans_dropped_total",
    ) == 0.0
    {
        assert!(
            Instant::now() < until,
            "the redirected batch was not counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let noted = std::fs::read_to_string(&receiver.spans).unwrap_or_default();
    assert!(!noted.contains("followed"), "{noted}");
}

/// A collector (or a load balancer before it) that closes connections idle for a second loses
/// no batch: the exporter does not send on a connection kept past half a second, which it
/// would not have seen closed (its runtime runs only while it sends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_closing_idle_connections_loses_no_batch() {
    let dir = tempfile::tempdir().expect("dir");
    let receiver = Receiver::start(dir.path(), "--idle-close");
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("tracing.otlp_endpoint", &receiver.url())
        .start();
    let face = fixture("face.jpg");
    let mut traces = Vec::new();
    for n in 0..4 {
        let a = post_traced(&gw.url(), "alpha-key", &variant(&face, 90 + n), false).await;
        assert_eq!(a.status, 200, "{}", a.text());
        traces.push(traceparent_of(&a).0);
        // The batch goes within a second; the connection it went on is closed a second later.
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    for t in &traces {
        assert_eq!(receiver.trace(t, 9).await.len(), 9, "trace {t}");
    }
    let m = metrics_text(&gw.admin_url()).await;
    assert_eq!(
        sample(&m, "liveness_gateway_trace_spans_dropped_total"),
        0.0
    );
}

/// A line logged while a request is served carries its ids even when its trace is not kept
/// (they lead to its access line), in the text format as in JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_s_log_lines_carry_its_ids_whether_kept_or_not() {
    let dir = tempfile::tempdir().expect("dir");
    let receiver = Receiver::start(dir.path(), "");
    let emu = start_emulator();
    let builder = TestGateway::for_emulator(&emu)
        .set("server.log_format", "\"text\"")
        .set("tracing.otlp_endpoint", &receiver.url())
        .set("tracing.sample_ratio", "0.0")
        .set("upstream.total_timeout", "\"1s\"");
    let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
    emu.set_latency(Duration::from_millis(2500));
    let slow = post_traced(
        &format!("http://{}", cfg.listen),
        "alpha-key",
        &fixture("face.jpg"),
        false,
    )
    .await;
    emu.set_latency(Duration::ZERO);
    assert_eq!(slow.code(), "upstream_timeout", "{}", slow.text());
    let (trace, server, flags) = traceparent_of(&slow);
    assert_eq!(flags, "00", "not kept");
    let log = gw.log();
    let warned = log
        .lines()
        .find(|l| l.contains("upstream call failed"))
        .expect("the failed call's warning");
    assert!(
        warned.ends_with(&format!(" trace_id={trace} span_id={server}")),
        "{warned}"
    );
    // A line logged outside a request carries no ids.
    let starting = log
        .lines()
        .find(|l| l.contains("starting"))
        .expect("the start line");
    assert!(!starting.contains("trace_id="), "{starting}");
}

/// A fleet request: the store's turn (the image's lock and the budget claim, on Redis) is a
/// span of its trace, and the trace id is the same one the provider was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_request_is_traced_through_its_claim() {
    let dir = tempfile::tempdir().expect("dir");
    let receiver = Receiver::start(dir.path(), "");
    let redis = RedisServer::start();
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("store.backend", "\"redis\"")
        .set("store.url", &format!("\"{}\"", redis.url()))
        .set("tracing.otlp_endpoint", &receiver.url())
        .tenant_set("alpha", "daily_budget", "5")
        .start();
    let a = post_traced(&gw.url(), "alpha-key", &fixture("face.jpg"), false).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let (trace, _, _) = traceparent_of(&a);
    let spans = receiver.trace(&trace, 9).await;
    let claim = spans
        .iter()
        .find(|s| s["name"] == "budget_claim")
        .expect("budget_claim");
    assert_eq!(claim["status"], 0);
    assert!(emu
        .stats()
        .last_traceparent
        .is_some_and(|tp| tp.starts_with(&format!("00-{trace}-"))));
    assert_no_secret(&spans);
}

/// A collector that answers without end (a gibibyte for every batch): the gateway reads 64 KiB
/// of it at most, and its memory stays where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_answering_without_end_costs_no_memory() {
    let dir = tempfile::tempdir().expect("dir");
    let huge = Receiver::start(dir.path(), "--huge");
    let emu = start_emulator();
    let builder = TestGateway::for_emulator(&emu)
        .set("tracing.otlp_endpoint", &huge.url())
        .set("tracing.timeout", "\"3s\"");
    let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
    let pid = gw.child.0.id();
    let url = format!("http://{}", cfg.listen);
    let face = fixture("face.jpg");
    let idle = proc_kib(pid, "VmRSS:");
    for round in 0..3 {
        for n in 0..5 {
            let a = post_traced(&url, "alpha-key", &variant(&face, round * 10 + n), false).await;
            assert_eq!(a.status, 200, "{}", a.text());
        }
        // The batch goes within a second; its answer is read for up to the timeout.
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let peak = proc_kib(pid, "VmHWM:");
    eprintln!("idle {} MiB, peak {} MiB", idle / 1024, peak / 1024);
    assert!(
        peak < idle + 64 * 1024,
        "a collector's answer took the memory: {} MiB over {} MiB",
        peak / 1024,
        idle / 1024
    );
}

/// A collector that hangs or is down: every client is answered as without tracing, and the
/// spans that could not go are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_hangs_or_is_down_changes_nothing_for_clients() {
    let dir = tempfile::tempdir().expect("dir");
    let hanging = Receiver::start(dir.path(), "--hang");
    let emu = start_emulator();
    for endpoint in [
        hanging.url(),
        format!("\"http://127.0.0.1:{}\"", free_port()),
    ] {
        let gw = TestGateway::for_emulator(&emu)
            .set("tracing.otlp_endpoint", &endpoint)
            .set("tracing.timeout", "\"300ms\"")
            .set("tracing.queue", "16")
            .start();
        let face = fixture("face.jpg");
        for n in 0..20 {
            let a = post_traced(&gw.url(), "alpha-key", &variant(&face, n), false).await;
            assert_eq!(a.status, 200, "{}", a.text());
        }
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let m = metrics_text(&gw.admin_url()).await;
            let dropped = sample(&m, "liveness_gateway_trace_spans_dropped_total");
            if dropped > 0.0 {
                break;
            }
            assert!(
                Instant::now() < until,
                "no span counted as dropped ({endpoint})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Prometheus, scraping with exemplar storage on, keeps the trace of a request in the latency
/// histograms' buckets: the dashboard's way from a slow bucket to its trace. Its scrape asks
/// for OpenMetrics, which the gateway then writes (the exposition a strict parser reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_keeps_the_traces_of_requests_as_exemplars() {
    let dir = tempfile::tempdir().expect("dir");
    let receiver = Receiver::start(dir.path(), "");
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("tracing.otlp_endpoint", &receiver.url())
        .start();
    let cfg = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: [\"{}\"]\n",
        gw.admin_addr
    );
    std::fs::write(dir.path().join("prometheus.yml"), cfg).expect("write");
    let (_prom, port) = start_prometheus(dir.path(), &["--enable-feature=exemplar-storage"]);
    let mut traces = BTreeSet::new();
    for n in 0..3 {
        let a = post_traced(
            &gw.url(),
            "alpha-key",
            &variant(&fixture("face.jpg"), n),
            false,
        )
        .await;
        assert_eq!(a.status, 200);
        traces.insert(traceparent_of(&a).0);
    }
    let api = format!("http://127.0.0.1:{port}/api/v1");
    let until = Instant::now() + Duration::from_secs(30);
    let (mut request, mut upstream) = (false, false);
    while !(request && upstream) {
        assert!(
            Instant::now() < until,
            "no exemplar with a request's trace: request {request}, upstream {upstream}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (metric, seen) in [
            (
                "liveness_gateway_request_duration_seconds_bucket",
                &mut request,
            ),
            (
                "liveness_gateway_upstream_duration_seconds_bucket",
                &mut upstream,
            ),
        ] {
            let v: Value = match client()
                .get(format!("{api}/query_exemplars"))
                .query(&[("query", metric), ("start", "0"), ("end", "9999999999")])
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => continue,
            };
            let found = v["data"].as_array().into_iter().flatten().any(|series| {
                series["exemplars"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| {
                        e["labels"]["trace_id"]
                            .as_str()
                            .is_some_and(|t| traces.contains(t))
                    })
            });
            *seen |= found;
        }
    }
    // And Prometheus read every sample of the exposition as before.
    let v: Value = client()
        .get(format!("{api}/query"))
        .query(&[(
            "query",
            "liveness_gateway_requests_total{tenant=\"alpha\",outcome=\"pass\"}",
        )])
        .send()
        .await
        .expect("query")
        .json()
        .await
        .expect("json");
    let passes: f64 = v["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["value"][1].as_str()?.parse::<f64>().ok())
        .sum();
    assert!(passes > 0.0, "{v}");
}
