//! Hostile load and faults: a provider that echoes the key, a provider that keeps failing (the
//! circuit breaker), bodies and connections that try to exhaust memory and sockets.

mod support;

use std::time::Duration;

use liveness_gateway_dev::emulator::Fault;
use support::*;

/// A provider whose answer echoes the submitted fields (a FastAPI-style 422, or a 200 with a
/// debug field) never gets the organization key to a client or into the cache.
#[tokio::test(flavor = "multi_thread")]
async fn an_echoing_provider_never_gets_the_key_to_the_client() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let (pass, _) = image_with_verdict(true, 0);
    for fault in [Fault::EchoKey, Fault::EchoKeyVerdict] {
        emu.set_fault(fault);
        let a = post_image(&gw.url(), "alpha-key", "a.jpg", &pass).await;
        assert_eq!(
            (a.status, a.code().as_str()),
            (502, "upstream_secret_echo"),
            "{fault:?}: {}",
            a.text()
        );
        assert!(!a.text().contains(ORG_KEY), "{fault:?}");
        for (k, v) in a.headers.iter() {
            assert!(
                !v.to_str().unwrap_or("").contains(ORG_KEY),
                "{fault:?}: {k}"
            );
        }
    }
    let m = metrics_text(&gw.admin_url()).await;
    assert_eq!(
        sample(&m, "liveness_gateway_upstream_secret_echo_total"),
        2.0
    );
    // Nothing was cached: with the provider fixed, the same image is asked again.
    emu.set_fault(Fault::None);
    emu.reset_stats();
    let ok = post_image(&gw.url(), "alpha-key", "a.jpg", &pass).await;
    assert_eq!(
        (ok.status, ok.header("x-cache").as_deref()),
        (200, Some("MISS"))
    );
    assert_eq!(emu.stats().calls, 1);
}

/// A provider that keeps failing is not called any more: the circuit opens after the configured
/// consecutive failures, clients get 503 `upstream_circuit_open` with `Retry-After` at once and
/// no budget is reserved; after the cool-down one probe goes through, and its success closes
/// the circuit. While the probe is out, others are still refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_circuit_opens_probes_and_closes() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("breaker.enabled", "true")
        .set("breaker.failures", "3")
        .set("breaker.open_for", "\"1s\"")
        .tenant_set("alpha", "daily_budget", "100")
        .start();
    let base = fixture("face.jpg");
    emu.set_fault(Fault::ServerError);
    for n in 0..3 {
        let a = post_image(&gw.url(), "alpha-key", "a.jpg", &variant(&base, n)).await;
        assert_eq!(a.code(), "upstream_error");
    }
    let open = post_image(&gw.url(), "alpha-key", "a.jpg", &variant(&base, 10)).await;
    assert_eq!(
        (open.status, open.code().as_str()),
        (503, "upstream_circuit_open")
    );
    assert_eq!(open.header("retry-after").as_deref(), Some("1"));
    assert_eq!(emu.stats().calls, 3, "the open circuit made no call");
    let usage = admin_json(&gw.admin_url(), "/admin/usage").await;
    assert_eq!(
        usage["tenants"][0]["daily"]["used"], 3,
        "the refused request reserved nothing"
    );
    let m = metrics_text(&gw.admin_url()).await;
    assert_eq!(
        sample(&m, r#"liveness_gateway_circuit_state{state="open"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            r#"liveness_gateway_requests_total{outcome="circuit_open",tenant="alpha"}"#
        ),
        1.0
    );

    // The cool-down passes and the provider is back: one slow probe, others refused meanwhile.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    emu.set_fault(Fault::None);
    emu.set_latency(Duration::from_millis(400));
    let url = gw.url();
    let probe = {
        let (url, img) = (url.clone(), variant(&base, 20));
        tokio::spawn(async move { post_image(&url, "alpha-key", "a.jpg", &img).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let during = post_image(&url, "alpha-key", "a.jpg", &variant(&base, 21)).await;
    assert_eq!(
        during.code(),
        "upstream_circuit_open",
        "one probe at a time"
    );
    assert_eq!(probe.await.expect("probe").status, 200);
    let after = post_image(&url, "alpha-key", "a.jpg", &variant(&base, 22)).await;
    assert_eq!(after.status, 200, "closed again");
    let m = metrics_text(&gw.admin_url()).await;
    assert_eq!(
        sample(&m, r#"liveness_gateway_circuit_state{state="closed"}"#),
        1.0
    );
    for (to, n) in [("open", 1.0), ("half_open", 1.0), ("closed", 1.0)] {
        assert_eq!(
            sample(
                &m,
                &format!(r#"liveness_gateway_circuit_transitions_total{{to="{to}"}}"#)
            ),
            n,
            "{to}"
        );
    }
}

/// A subscription error fails every call until a person acts: the first one passes through
/// (with the provider's words), then the circuit is open for the shorter subscription time.
#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_error_opens_the_circuit_at_once() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("breaker.enabled", "true")
        .set("breaker.subscription_open_for", "\"1s\"")
        .start();
    let base = fixture("face.jpg");
    emu.set_fault(Fault::NoActiveSubscription);
    let first = post_image(&gw.url(), "alpha-key", "a.jpg", &variant(&base, 0)).await;
    assert_eq!(first.status, 400);
    let second = post_image(&gw.url(), "beta-key", "a.jpg", &variant(&base, 1)).await;
    assert_eq!(second.code(), "upstream_circuit_open", "for every tenant");
    assert_eq!(emu.stats().calls, 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    emu.set_fault(Fault::None);
    let back = post_image(&gw.url(), "alpha-key", "a.jpg", &variant(&base, 2)).await;
    assert_eq!(back.status, 200);
}

fn rss_kib(pid: u32) -> u64 {
    proc_kib(pid, "VmRSS:")
}

/// Hundreds of connections with no credential at all, each declaring a 10 MB body and trickling
/// a multipart head and 60 KB, used to hold the gateway at about 2 MB of memory each (buffers
/// were sized from the declared length). Now a buffer grows with what arrives, bodies read
/// before authentication share `intake.max_unauthenticated_buffered_bytes`, the excess gets
/// `503 overloaded`, and a tenant with a header credential is still served meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn strangers_declaring_large_bodies_cannot_take_the_memory() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let builder = TestGateway::for_emulator(&emu)
        .set("intake.max_unauthenticated_buffered_bytes", "8388608")
        .set("intake.body_read_timeout", "\"20s\"")
        .set("intake.body_deadline", "\"30s\"");
    let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
    let pid = gw.child.0.id();
    let idle = rss_kib(pid);
    let head = format!(
        "POST {ROUTE} HTTP/1.1\r\nHost: gw\r\nContent-Type: {}\r\nContent-Length: 10000000\r\n\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n",
        multipart_ct()
    );
    let n = 300;
    let mut conns = Vec::new();
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(cfg.listen)
            .await
            .expect("connect");
        s.write_all(head.as_bytes()).await.expect("head");
        conns.push(s);
    }
    let chunk = vec![b'x'; 6000];
    let mut peak = idle;
    for _ in 0..10 {
        for s in conns.iter_mut() {
            let _ = s.write_all(&chunk).await;
        }
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Meanwhile, a tenant with a header credential is served.
    let url = format!("http://{}", cfg.listen);
    let a = post_image(&url, "alpha-key", "a.jpg", &fixture("face.jpg")).await;
    assert_eq!(a.status, 200, "{}", a.text());
    peak = peak.max(rss_kib(pid));
    // The strangers past the budget were told to come back.
    let mut overloaded = 0;
    for s in conns.iter_mut() {
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok(k)) = tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await {
            if String::from_utf8_lossy(&buf[..k]).contains("\"code\":\"overloaded\"") {
                overloaded += 1;
            }
        }
    }
    let grown_mib = (peak.saturating_sub(idle)) as f64 / 1024.0;
    println!("{n} trickling strangers: RSS {idle} KiB idle, peak +{grown_mib:.1} MiB; {overloaded} told 503 overloaded");
    assert!(
        grown_mib < 48.0,
        "RSS grew by {grown_mib:.1} MiB with {n} strangers (8 MiB budget)"
    );
    assert!(overloaded >= n / 2, "only {overloaded} of {n} were refused");
    drop(conns);
    drop(gw);
}

/// A tenant can take its key in headers only. When every tenant does, a request with no header
/// credential is refused before one byte of its body is read; otherwise a form-field key of such
/// a tenant is refused after the body.
#[tokio::test(flavor = "multi_thread")]
async fn header_only_tenants_refuse_strangers_before_the_body() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .tenant_set("alpha", "require_header_credentials", "true")
        .start();
    let form = |key: &str| {
        multipart(&[
            Part::image("a.jpg", &fixture("face.jpg")),
            Part::text("api_key", key),
        ])
    };
    let a = post(&gw.url(), &[], form("alpha-key")).await;
    assert_eq!(
        (a.status, a.code().as_str()),
        (401, "header_credentials_required")
    );
    let b = post(&gw.url(), &[], form("beta-key")).await;
    assert_eq!(b.status, 200, "beta still takes the form field");

    let gw = TestGateway::for_emulator(&emu)
        .tenant_set("alpha", "require_header_credentials", "true")
        .tenant_set("beta", "require_header_credentials", "true")
        .start();
    // A head that declares 10 MB and sends none of it: answered at once.
    let started = std::time::Instant::now();
    let (status, body) = raw(
        gw.addr,
        format!(
            "POST {ROUTE} HTTP/1.1\r\nHost: gw\r\nContent-Type: {}\r\nContent-Length: 10000000\r\n\r\n",
            multipart_ct()
        )
        .as_bytes(),
        Duration::from_secs(5),
    );
    assert_eq!(
        (status, json_code(&body).as_str()),
        (401, "missing_credentials")
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(emu.stats().calls, 1);
}

/// Read what a raw connection gets within `wait`: its bytes, and whether it was closed.
async fn outcome_of(s: &mut tokio::net::TcpStream, wait: Duration) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    let until = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into(), false),
        }
    }
}

/// A crowd that sends a request line and then one header line every 300 ms (slowloris) used
/// to stay connected forever. Each connection is now cut at `server.header_timeout` with a JSON
/// 408, the gateway's memory stays flat, and a normal client is served during the attack.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_header_crowd_is_cut_at_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let builder = TestGateway::for_emulator(&emu).set("server.header_timeout", "\"1s\"");
    let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
    let pid = gw.child.0.id();
    let idle = rss_kib(pid);
    let n = 1000;
    let mut crowd = Vec::new();
    for i in 0..n {
        let mut s = tokio::net::TcpStream::connect(cfg.listen)
            .await
            .unwrap_or_else(|e| panic!("connect {i}: {e}"));
        s.write_all(format!("POST {ROUTE} HTTP/1.1\r\nHost: gw\r\n").as_bytes())
            .await
            .expect("line");
        crowd.push(s);
    }
    let started = std::time::Instant::now();
    let mut peak = idle;
    // Keep trickling for longer than the timeout.
    for i in 0..6 {
        for s in crowd.iter_mut() {
            let _ = s.write_all(format!("X-Slow-{i}: y\r\n").as_bytes()).await;
        }
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let url = format!("http://{}", cfg.listen);
    let ok = post_image(&url, "alpha-key", "a.jpg", &fixture("face.jpg")).await;
    assert_eq!(
        ok.status, 200,
        "a normal client is served during the attack"
    );
    let mut timed_out = 0;
    for s in crowd.iter_mut() {
        let (text, closed) = outcome_of(s, Duration::from_millis(200)).await;
        assert!(
            closed,
            "a slow-header connection is still open after {:?}",
            started.elapsed()
        );
        if text.contains("HTTP/1.1 408") && text.contains("\"code\":\"header_timeout\"") {
            timed_out += 1;
        }
    }
    let grown_mib = peak.saturating_sub(idle) as f64 / 1024.0;
    println!("{n} slow-header connections: all closed, {timed_out} with a 408; RSS peak +{grown_mib:.1} MiB");
    assert!(
        timed_out >= n * 9 / 10,
        "only {timed_out} of {n} got the 408"
    );
    assert!(grown_mib < 64.0, "RSS grew by {grown_mib:.1} MiB");
    let m = metrics_text(&format!("http://{}", cfg.admin_listen)).await;
    assert!(
        sample(
            &m,
            r#"liveness_gateway_connections_cut_total{reason="header_timeout"}"#
        ) >= n as f64
    );
    // Clients that leave halfway through their head, too.
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(cfg.listen)
            .await
            .expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHo")
            .await
            .expect("half a head");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Logged at debug level only: a crowd must not write an error line per connection.
    let errors: Vec<String> = gw
        .log()
        .lines()
        .filter(|l| l.contains("ERROR"))
        .map(str::to_string)
        .collect();
    assert!(
        errors.is_empty(),
        "{} error lines, the first: {:?}",
        errors.len(),
        errors.first()
    );
}

/// A request head is bounded (`server.max_header_bytes`, 16 KiB by default; Pingora's own limit
/// is 1 MiB): a larger one gets a JSON 431 and the connection is cut.
#[tokio::test(flavor = "multi_thread")]
async fn a_huge_request_head_is_refused_at_the_limit() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    for (size, expect) in [(12_000, 404), (20_000, 431), (1_000_000, 431)] {
        let request = format!(
            "GET /nope HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\n\r\n",
            "a".repeat(size)
        );
        let (status, body) = raw(gw.addr, request.as_bytes(), Duration::from_secs(5));
        assert_eq!(status, expect, "{size}: {body}");
        if expect == 431 {
            assert_eq!(json_code(&body), "header_too_large");
        }
    }
}

/// Past `server.max_connections` (or the per-address cap), a new connection is closed at once,
/// and the connections already open keep being served.
#[tokio::test(flavor = "multi_thread")]
async fn connection_caps_refuse_newcomers_and_keep_serving_the_others() {
    use tokio::io::AsyncWriteExt;
    let emu = start_emulator();
    for (key, cap) in [("max_connections", 4), ("max_connections_per_ip", 3)] {
        let gw = TestGateway::for_emulator(&emu)
            .set(&format!("server.{key}"), &cap.to_string())
            .start();
        // `start` knows the gateway listens once a connection of its own is accepted; that
        // connection takes a place until the gateway has seen it close, and a held connection
        // accepted before then would be refused. A request answered on a later connection
        // shows it was accepted (in order); then its place is waited back.
        let mut probe = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        probe
            .write_all(b"GET /nope HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let (text, _) = outcome_of(&mut probe, Duration::from_secs(5)).await;
        assert!(text.starts_with("HTTP/1.1 404"), "{key}: {text}");
        drop(probe);
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while sample(
            &metrics_text(&gw.admin_url()).await,
            "liveness_gateway_connections_open",
        ) > 0.0
        {
            assert!(std::time::Instant::now() < until, "{key}: probe still open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Hold `cap` connections open, idle.
        let mut held = Vec::new();
        for _ in 0..cap {
            held.push(
                tokio::net::TcpStream::connect(gw.addr)
                    .await
                    .expect("connect"),
            );
        }
        // Admitted: each is counted when its task runs, which on a loaded machine can come
        // after a newcomer's connect.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while sample(
            &metrics_text(&gw.admin_url()).await,
            "liveness_gateway_connections_open",
        ) < cap as f64
        {
            assert!(
                std::time::Instant::now() < until,
                "{key}: not all {cap} admitted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut extra = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        let _ = extra
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await;
        let (text, closed) = outcome_of(&mut extra, Duration::from_secs(2)).await;
        assert!(
            closed && text.is_empty(),
            "{key}: the newcomer was served: {text}"
        );
        // One of the held connections is still served.
        let s = &mut held[0];
        s.write_all(b"GET /nope HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await
            .expect("write");
        let (text, _) = outcome_of(s, Duration::from_secs(2)).await;
        assert!(text.starts_with("HTTP/1.1 404"), "{key}: {text}");
        let m = metrics_text(&gw.admin_url()).await;
        assert!(
            sample(
                &m,
                &format!(r#"liveness_gateway_connections_refused_total{{reason="{key}"}}"#)
            ) >= 1.0,
            "{key}"
        );
    }
}

/// A kept-alive connection idle for `server.keepalive_timeout` is closed.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_kept_alive_connection_is_closed() {
    use tokio::io::AsyncWriteExt;
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("server.keepalive_timeout", "\"1s\"")
        .start();
    let mut s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let body = multipart(&[Part::image("a.jpg", &fixture("face.jpg"))]);
    let mut request = format!(
        "POST {ROUTE} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer alpha-key\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        multipart_ct(),
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    s.write_all(&request).await.expect("write");
    let (first, closed) = outcome_of(&mut s, Duration::from_millis(500)).await;
    assert!(first.starts_with("HTTP/1.1 200") && !closed, "{first}");
    let (_, closed) = outcome_of(&mut s, Duration::from_millis(1800)).await;
    assert!(closed, "still open after the keep-alive timeout");
}

/// Behind a trusted proxy, the client is the address `X-Forwarded-For` names, and the
/// per-address cap counts its requests in flight; an untrusted peer's header is ignored.
#[tokio::test(flavor = "multi_thread")]
async fn forwarded_clients_behind_a_trusted_proxy_have_their_own_cap() {
    let emu = start_emulator();
    emu.set_latency(Duration::from_millis(400));
    let gw = TestGateway::for_emulator(&emu)
        .set("server.trusted_proxies", "[\"127.0.0.1\"]")
        .set("server.max_connections_per_ip", "2")
        .start();
    let url = gw.url();
    let base = fixture("face.jpg");
    let send = |n: u64, client: &'static str| {
        let (url, img) = (url.clone(), variant(&base, n));
        tokio::spawn(async move {
            post(
                &url,
                &[
                    ("Authorization", "Bearer alpha-key"),
                    ("X-Forwarded-For", client),
                ],
                multipart(&[Part::image("a.jpg", &img)]),
            )
            .await
        })
    };
    let tasks: Vec<_> = (0..3)
        .map(|n| send(n, "198.51.100.7"))
        .chain([send(10, "198.51.100.8")])
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        let a = t.await.expect("task");
        codes.push((a.status, a.code()));
    }
    let refused = codes
        .iter()
        .filter(|(s, c)| *s == 429 && c == "too_many_connections")
        .count();
    assert_eq!(refused, 1, "{codes:?}");
    assert_eq!(codes[3].0, 200, "another client is not affected: {codes:?}");
}

/// Everything a raw connection receives until it is closed (or `wait` passes): the bytes, and
/// how long after `since` the end came.
async fn until_closed(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
    since: std::time::Instant,
    wait: Duration,
) -> (String, Option<Duration>) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    let until = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (String::from_utf8_lossy(&got).into(), Some(since.elapsed()))
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into(), None),
        }
    }
}

/// The parser skips blank lines before a request line (RFC 9112, 2.2), and so does the head
/// guard: a head after them still has `server.header_timeout` (408) and `server.max_header_bytes`
/// (431), and a kept-alive connection that sends only blank lines is still idle, closed after
/// `server.keepalive_timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn blank_lines_before_a_head_do_not_switch_the_guard_off() {
    use tokio::io::AsyncWriteExt;
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("server.header_timeout", "\"1s\"")
        .set("server.keepalive_timeout", "\"1s\"")
        .start();

    // Blank lines, then a head trickled for 3 s: 408 at the deadline.
    let started = std::time::Instant::now();
    let s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let (mut r, mut w) = s.into_split();
    w.write_all(b"\r\n\r\nGET /nope HTTP/1.1\r\n")
        .await
        .expect("write");
    let trickle = tokio::spawn(async move {
        for i in 0..12 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if w.write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
        w
    });
    let (text, closed) = until_closed(&mut r, started, Duration::from_secs(5)).await;
    let _ = trickle.await;
    println!("trickled head after blank lines: {:?}, {text:?}", closed);
    assert!(
        text.starts_with("HTTP/1.1 408") && text.contains("\"code\":\"header_timeout\""),
        "{text}"
    );
    let closed = closed.expect("closed");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_millis(2500),
        "answered after {closed:?}"
    );

    // Blank lines, then a 100 KB head: 431.
    let mut big = b"\r\n\r\n".to_vec();
    big.extend_from_slice(
        format!(
            "GET /nope HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\n\r\n",
            "a".repeat(100_000)
        )
        .as_bytes(),
    );
    let (status, body) = raw(gw.addr, &big, Duration::from_secs(5));
    assert_eq!(
        (status, json_code(&body).as_str()),
        (431, "header_too_large"),
        "{body}"
    );

    // A kept-alive connection that sends blank lines after its answer is still idle.
    let mut s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let body = multipart(&[Part::image("a.jpg", &fixture("face.jpg"))]);
    let mut request = format!(
        "POST {ROUTE} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer alpha-key\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        multipart_ct(),
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    s.write_all(&request).await.expect("write");
    let (first, closed) = outcome_of(&mut s, Duration::from_millis(500)).await;
    assert!(first.starts_with("HTTP/1.1 200") && !closed, "{first}");
    let started = std::time::Instant::now();
    s.write_all(b"\r\n\r\n").await.expect("blank lines");
    let (text, closed) = until_closed(&mut s, started, Duration::from_secs(4)).await;
    println!("kept-alive connection after blank lines: closed after {closed:?}");
    assert!(text.is_empty(), "{text}");
    let closed = closed.expect("still open 4 s after its blank lines");
    assert!(
        closed < Duration::from_millis(2500),
        "closed after {closed:?}"
    );
}

/// Forty unfinished heads of a megabyte each, after blank lines on the client listener and as
/// they come on the admin listener, from one address: each is cut at `server.max_header_bytes`
/// (or refused at the admin listener's own per-address cap), and the process's memory stays
/// flat.
#[tokio::test(flavor = "multi_thread")]
async fn unfinished_megabyte_heads_are_bounded_on_every_listener() {
    use tokio::io::AsyncWriteExt;
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let builder = TestGateway::for_emulator(&emu)
        .set("server.header_timeout", "\"30s\"")
        .set("server.admin_max_connections_per_ip", "16");
    let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
    let pid = gw.child.0.id();
    let idle = rss_kib(pid);
    let pad = format!("X-Pad: {}", "a".repeat(1_000_000));
    let mut peak = idle;
    let mut listeners = Vec::new();
    for (addr, start, refused) in [
        (cfg.listen, "\r\n\r\nGET /nope HTTP/1.1\r\n", 0),
        (cfg.admin_listen, "GET /metrics HTTP/1.1\r\n", 24),
    ] {
        // All open at once, each with the start of its head; then the megabyte.
        let mut conns = Vec::new();
        for _ in 0..40 {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let _ = s.write_all(start.as_bytes()).await;
            conns.push(s);
        }
        // Past the cap, connections are closed as the gateway accepts them.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        let closed = |conns: &[tokio::net::TcpStream]| {
            conns
                .iter()
                .filter(|s| !matches!(s.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock))
                .count()
        };
        while closed(&conns) < refused && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for s in conns.iter_mut() {
            // The gateway stops reading a head it refuses: a write that cannot finish ends.
            let _ = tokio::time::timeout(Duration::from_secs(2), s.write_all(pad.as_bytes())).await;
            peak = peak.max(rss_kib(pid));
        }
        listeners.push(conns);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    peak = peak.max(rss_kib(pid));
    let grown_mib = peak.saturating_sub(idle) as f64 / 1024.0;
    // What each connection got: a 431, or nothing (closed at once past a cap).
    let mut outcomes = Vec::new();
    for conns in listeners.iter_mut() {
        let (mut refused, mut too_large) = (0, 0);
        for s in conns.iter_mut() {
            let (text, closed) = outcome_of(s, Duration::from_secs(2)).await;
            assert!(closed, "still open: {text}");
            if text.starts_with("HTTP/1.1 431") {
                too_large += 1;
            } else if text.is_empty() {
                refused += 1;
            }
        }
        outcomes.push((too_large, refused));
    }
    println!("80 unfinished 1 MB heads: RSS {idle} KiB idle, peak +{grown_mib:.1} MiB; (431, refused) client {:?}, admin {:?}", outcomes[0], outcomes[1]);
    assert_eq!(outcomes, [(40, 0), (16, 24)]);
    // Still serving.
    assert_eq!(
        get_status(&format!("http://{}/healthz", cfg.admin_listen)).await,
        200
    );
    assert!(grown_mib < 24.0, "RSS grew by {grown_mib:.1} MiB");
}

/// An early refusal is the connection's only answer: the rest of the upload is read and thrown
/// away (the drain), never taken for the next request's head. Here a multipart upload whose
/// `Content-Type` has no boundary: its first part's headers end in a blank line, and the photo
/// after them is larger than a head may be.
#[tokio::test(flavor = "multi_thread")]
async fn an_early_refusal_is_the_only_answer_on_its_connection() {
    use tokio::io::AsyncWriteExt;
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let body = multipart(&[Part::image("face.jpg", &fixture("face.jpg"))]);
    let mut request = format!(
        "POST {ROUTE} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer alpha-key\r\nContent-Type: multipart/form-data\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let mut answers = Vec::new();
    for _ in 0..5 {
        let mut s = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        let _ = s.write_all(&request).await;
        let (text, closed) =
            until_closed(&mut s, std::time::Instant::now(), Duration::from_secs(5)).await;
        assert!(closed.is_some(), "still open: {text}");
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert!(text.contains("\"code\":\"missing_boundary\""), "{text}");
        answers.push(text.matches("HTTP/1.1 ").count());
    }
    assert_eq!(answers, vec![1; 5], "answers on each connection");
    assert_eq!(emu.stats().calls, 0);
}

/// A crowd of anonymous clients that send a head with a long `Host` and leave in the middle of
/// their upload: the normal course of mobile networks, logged at debug level only.
#[tokio::test(flavor = "multi_thread")]
async fn a_crowd_leaving_mid_upload_writes_no_line_above_info() {
    use tokio::io::AsyncWriteExt;
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let builder = TestGateway::for_emulator(&emu);
    let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
    let before = gw.log().len();
    let body = multipart(&[Part::image("face.jpg", &fixture("face.jpg"))]);
    let host = "h".repeat(8000);
    let head = format!(
        "POST {ROUTE} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        multipart_ct(),
        body.len()
    );
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(cfg.listen)
            .await
            .expect("connect");
        s.write_all(head.as_bytes()).await.expect("head");
        s.write_all(&body[..body.len() / 2]).await.expect("half");
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Gone without a goodbye: a reset, as when a phone loses its network.
        s.set_zero_linger().expect("linger");
        drop(s);
    }
    let url = format!("http://{}", cfg.listen);
    assert_eq!(
        post_image(&url, "alpha-key", "a.jpg", &fixture("face.jpg"))
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = gw.log();
    let loud: Vec<&str> = log[before..]
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(
        loud.is_empty(),
        "{} lines above INFO, the first: {:?}",
        loud.len(),
        loud.first().map(|l| &l[..l.len().min(300)])
    );
}

/// A credential header sent twice is refused (which one the client meant is not the gateway's
/// guess), on the client listener and on the admin listener alike.
#[tokio::test(flavor = "multi_thread")]
async fn credential_headers_sent_twice_are_refused() {
    let emu = start_emulator();
    let parsed = TestGateway::for_emulator(&emu)
        .set("server.admin_token_env", "\"LG_TEST_ADMIN_TOKEN\"")
        .config_with(&[("LG_TEST_ADMIN_TOKEN", "admin-secret")]);
    let gw = liveness_gateway::server::RunningGateway::start(
        parsed,
        std::sync::Arc::new(|n: &str| (n == ORG_KEY_ENV).then(|| ORG_KEY.to_string())),
    )
    .expect("start");
    let body = multipart(&[Part::image("a.jpg", &fixture("face.jpg"))]);
    for (name, first, second) in [
        ("Authorization", "Bearer alpha-key", "Bearer beta-key"),
        ("Authorization", "Bearer alpha-key", "Bearer alpha-key"),
        ("X-Api-Key", "alpha-key", "beta-key"),
    ] {
        let mut request = format!(
            "POST {ROUTE} HTTP/1.1\r\nHost: gw\r\n{name}: {first}\r\n{name}: {second}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
            multipart_ct(),
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        let (status, text) = raw(gw.addr, &request, Duration::from_secs(5));
        assert_eq!(
            (status, json_code(&text).as_str()),
            (401, "malformed_credentials"),
            "{name} twice: {text}"
        );
    }
    assert_eq!(emu.stats().calls, 0);
    let (status, text) = raw(
        gw.admin_addr,
        format!("GET /admin/usage HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer admin-secret\r\nAuthorization: Bearer wrong\r\n\r\n", gw.admin_addr).as_bytes(),
        Duration::from_secs(5),
    );
    assert_eq!(status, 401, "admin token twice: {text}");
}

/// `Content-Length: n, n` (a list of equal values, as some intermediaries merge repeated fields)
/// is one length: refused before the body when too large, served when right; unequal values are
/// refused, and nothing reaches the provider.
#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_equal_content_length_is_one_length() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let started = std::time::Instant::now();
    let (status, text) = raw(
        gw.addr,
        format!(
            "POST {ROUTE} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer alpha-key\r\nContent-Type: {}\r\nContent-Length: 20000000, 20000000\r\n\r\n",
            multipart_ct()
        )
        .as_bytes(),
        Duration::from_secs(5),
    );
    assert_eq!(
        (status, json_code(&text).as_str()),
        (413, "body_too_large"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    let body = multipart(&[Part::image("a.jpg", &fixture("face.jpg"))]);
    for (lengths, expect) in [
        (format!("{0}, {0}", body.len()), 200),
        (format!("{0}\r\nContent-Length: {0}", body.len()), 200),
        (format!("{}, {}", body.len(), body.len() + 1), 400),
    ] {
        let mut request = format!(
            "POST {ROUTE} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer alpha-key\r\nContent-Type: {}\r\nContent-Length: {lengths}\r\n\r\n",
            multipart_ct(),
        )
        .into_bytes();
        request.extend_from_slice(&body);
        let (status, text) = raw(gw.addr, &request, Duration::from_secs(5));
        assert_eq!(status, expect, "Content-Length: {lengths}: {text}");
    }
    assert_eq!(emu.stats().calls, 1);
}

/// Behind a trusted proxy that writes the client's port into `X-Forwarded-For` (as some load
/// balancers do), the client is still the address.
#[tokio::test(flavor = "multi_thread")]
async fn a_forwarded_entry_with_a_port_names_its_client() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let builder = TestGateway::for_emulator(&emu)
        .set("server.trusted_proxies", "[\"127.0.0.1\"]")
        .set("server.log_format", "\"json\"");
    let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
    let url = format!("http://{}", cfg.listen);
    let base = fixture("face.jpg");
    for (n, entry) in ["203.0.113.7:51234", "[2001:db8::7]:4711"]
        .iter()
        .enumerate()
    {
        let a = post(
            &url,
            &[
                ("Authorization", "Bearer alpha-key"),
                ("X-Forwarded-For", entry),
            ],
            multipart(&[Part::image("a.jpg", &variant(&base, n as u64))]),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.text());
        // Its line before the next request's (a line is written once its answer is out).
        gw.access_lines_soon(n + 1).await;
    }
    let lines = gw.access_lines_soon(2).await;
    let clients: Vec<&str> = lines.iter().filter_map(|l| l["client"].as_str()).collect();
    assert_eq!(clients, ["203.0.113.7", "2001:db8::7"], "{lines:?}");
}
