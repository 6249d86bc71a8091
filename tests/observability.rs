//! Metrics, health endpoints and request ids, checked against the running gateway; the shipped
//! dashboard and alert rules checked against what it exports; a real Prometheus scrape.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use liveness_gateway_dev::emulator::Fault;
use support::*;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[tokio::test(flavor = "multi_thread")]
async fn counters_move_exactly_as_requests_imply() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let (n, m) = (7u64, 4u64);
    for i in 0..n {
        let (img, _) = image_with_verdict(true, i * 100);
        assert_eq!(
            post_image(&gw.url(), "alpha-key", "a.jpg", &img)
                .await
                .status,
            200
        );
    }
    for i in 0..m {
        let (img, _) = image_with_verdict(false, 10_000 + i * 100);
        assert_eq!(
            post_image(&gw.url(), "alpha-key", "a.jpg", &img)
                .await
                .status,
            200
        );
    }
    // One cache hit of a passing image.
    let (img, _) = image_with_verdict(true, 0);
    assert_eq!(
        post_image(&gw.url(), "alpha-key", "a.jpg", &img)
            .await
            .header("x-cache")
            .as_deref(),
        Some("HIT")
    );

    let t = metrics_text(&gw.admin_url()).await;
    let s = |series: &str| sample(&t, series);
    assert_eq!(
        s(
            r#"liveness_gateway_liveness_results_total{result="pass",source="upstream",tenant="alpha"}"#
        ),
        n as f64
    );
    assert_eq!(
        s(
            r#"liveness_gateway_liveness_results_total{result="fail",source="upstream",tenant="alpha"}"#
        ),
        m as f64
    );
    assert_eq!(
        s(
            r#"liveness_gateway_liveness_results_total{result="pass",source="cache",tenant="alpha"}"#
        ),
        1.0
    );
    let pass = s(
        r#"liveness_gateway_liveness_results_total{result="pass",source="upstream",tenant="alpha"}"#,
    );
    assert!((pass / (n + m) as f64 - 7.0 / 11.0).abs() < 1e-12);
    assert_eq!(
        s(r#"liveness_gateway_liveness_failures_total{tenant="alpha",type="CALC_RESULT"}"#),
        m as f64
    );
    assert_eq!(
        s(r#"liveness_gateway_requests_total{outcome="pass",tenant="alpha"}"#),
        (n + 1) as f64
    );
    assert_eq!(
        s(r#"liveness_gateway_requests_total{outcome="fail",tenant="alpha"}"#),
        m as f64
    );
    assert_eq!(
        s(
            r#"liveness_gateway_upstream_requests_total{error="none",org_key="default",status_class="2xx"}"#
        ),
        (n + m) as f64
    );
    assert_eq!(
        s(r#"liveness_gateway_cache_lookups_total{result="hit",tenant="alpha"}"#),
        1.0
    );
    assert_eq!(
        s(r#"liveness_gateway_cache_lookups_total{result="miss",tenant="alpha"}"#),
        (n + m) as f64
    );
    assert_eq!(s(r#"liveness_gateway_cache_entries"#), (n + m) as f64);
    // Histograms observe: every verdict from upstream, every upstream call, every answer.
    assert_eq!(
        s(r#"liveness_gateway_liveness_prediction_count{tenant="alpha"}"#),
        (n + m) as f64
    );
    assert_eq!(
        s(r#"liveness_gateway_upstream_duration_seconds_count"#),
        (n + m) as f64
    );
    assert_eq!(
        s(r#"liveness_gateway_request_duration_seconds_count{outcome="pass"}"#),
        (n + 1) as f64
    );
    assert!(
        s(r#"liveness_gateway_liveness_prediction_bucket{tenant="alpha",le="0.5"}"#) >= m as f64
    );
    assert_eq!(s(r#"liveness_gateway_inflight_requests"#), 0.0);

    // Each fault lands in its own error class.
    let img = fixture("face.jpg");
    for (k, (fault, class, status_class)) in [
        (Fault::NoSubscription, "no_subscription", "4xx"),
        (
            Fault::SubscriptionNotStarted,
            "subscription_not_started",
            "4xx",
        ),
        (Fault::NoActiveSubscription, "no_active_subscription", "4xx"),
        (Fault::NoAccess, "no_access", "4xx"),
        (Fault::ServiceUnavailable, "service_unavailable", "4xx"),
        (Fault::ServerError, "server_error", "5xx"),
        (Fault::InvalidJson, "invalid_response", "2xx"),
        (Fault::Reset, "connection_lost", "none"),
    ]
    .into_iter()
    .enumerate()
    {
        emu.set_fault(fault);
        post_image(
            &gw.url(),
            "beta-key",
            "a.jpg",
            &variant(&img, 50_000 + k as u64),
        )
        .await;
        let t = metrics_text(&gw.admin_url()).await;
        let series = format!(
            r#"liveness_gateway_upstream_requests_total{{error="{class}",org_key="default",status_class="{status_class}"}}"#
        );
        assert_eq!(sample(&t, &series), 1.0, "{fault:?} → {series}");
    }
    // Provider refusals pass through (upstream_error); failures become gateway errors.
    emu.set_fault(Fault::None);
    let t = metrics_text(&gw.admin_url()).await;
    assert_eq!(
        sample(
            &t,
            r#"liveness_gateway_requests_total{outcome="upstream_error",tenant="beta"}"#
        ),
        5.0
    );
    assert_eq!(
        sample(
            &t,
            r#"liveness_gateway_requests_total{outcome="gateway_error",tenant="beta"}"#
        ),
        3.0
    );
    // The billing rule: the five documented refusals cost nothing; the 5xx, the unreadable 200
    // and the reset after the whole request was sent are billable, without a verdict.
    assert_eq!(
        sample(
            &t,
            r#"liveness_gateway_billable_calls_total{tenant="beta"}"#
        ),
        3.0
    );
    for class in ["server_error", "invalid_response", "connection_lost"] {
        assert_eq!(
            sample(
                &t,
                &format!(r#"liveness_gateway_billed_without_verdict_total{{class="{class}"}}"#)
            ),
            1.0,
            "{class}"
        );
    }
    // Of those, only the reset brought no answer head back: its billing is uncertain.
    assert_eq!(
        sample(
            &t,
            r#"liveness_gateway_upstream_uncertain_total{org_key="default"}"#
        ),
        1.0
    );

    // Timeouts and refused connections too.
    let hang = start_emulator();
    hang.set_fault(Fault::Hang);
    let gw2 = TestGateway::for_emulator(&hang)
        .set("upstream.total_timeout", "\"500ms\"")
        .start();
    post_image(&gw2.url(), "alpha-key", "a.jpg", &img).await;
    let closed = TestGateway::new(&format!("http://127.0.0.1:{}", free_port())).start();
    post_image(&closed.url(), "alpha-key", "a.jpg", &img).await;
    assert_eq!(
        sample(
            &metrics_text(&gw2.admin_url()).await,
            r#"liveness_gateway_upstream_requests_total{error="timeout",org_key="default",status_class="none"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics_text(&closed.admin_url()).await,
            r#"liveness_gateway_upstream_requests_total{error="connect",org_key="default",status_class="none"}"#
        ),
        1.0
    );
    // A timeout after the whole request was sent may be billed (no answer tells: uncertain);
    // a refused connection is not.
    let hung = metrics_text(&gw2.admin_url()).await;
    assert_eq!(
        sample(
            &hung,
            r#"liveness_gateway_billed_without_verdict_total{class="timeout"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &hung,
            r#"liveness_gateway_upstream_uncertain_total{org_key="default"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics_text(&closed.admin_url()).await,
            r#"liveness_gateway_billable_calls_total{tenant="alpha"}"#
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_unknown_keys_make_one_unknown_series() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let url = gw.url();
    let body = multipart(&[Part::image("a.jpg", &fixture("face-small.jpg"))]);
    let keys: Vec<String> = (0..1000)
        .map(|_| format!("random-{}", uuid::Uuid::new_v4()))
        .collect();
    for batch in keys.chunks(50) {
        let answers = futures_util::future::join_all(batch.iter().map(|k| {
            let (url, body) = (url.clone(), body.clone());
            async move { post(&url, &[("X-Api-Key", k)], body).await }
        }))
        .await;
        assert!(answers.iter().all(|a| a.status == 401));
    }
    let t = metrics_text(&gw.admin_url()).await;
    assert_eq!(
        sample(
            &t,
            r#"liveness_gateway_requests_total{outcome="unauthenticated",tenant="unknown"}"#
        ),
        1000.0
    );
    let tenants: BTreeSet<&str> = t
        .lines()
        .filter_map(|l| l.split("tenant=\"").nth(1))
        .filter_map(|r| r.split('"').next())
        .collect();
    assert_eq!(
        tenants,
        BTreeSet::from(["alpha", "beta", "off", "unknown"]),
        "tenant label values come from the config"
    );
    assert!(!keys.iter().any(|k| t.contains(k.as_str())));
    assert_eq!(emu.stats().calls, 0);
}

/// Metric names a PromQL text refers to.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("liveness_gateway") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b':')
        {
            end += 1;
        }
        names.insert(text[start..end].to_string());
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_in_the_dashboard_and_alerts_is_exported() {
    let emu = start_emulator();
    // With a TLS listener: its certificate's expiry is exported only then.
    let dir = tempfile::tempdir().expect("dir");
    let (cert, key, _) = support::pki::TestPki::new().leaf(dir.path(), "leaf");
    let (gw, _) = support::pki::tls_gateway(&emu, &cert, &key);
    let gw = gw.tenant_set("alpha", "daily_budget", "100").start();
    post_image(&gw.url(), "alpha-key", "a.jpg", &fixture("face.jpg")).await;
    post(
        &gw.url(),
        &[("X-Api-Key", "alpha-key")],
        multipart(&[Part::image("a.gif", b"x")]),
    )
    .await;
    let exported = metrics_text(&gw.admin_url()).await;
    let types: BTreeSet<String> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();

    let dashboard =
        std::fs::read_to_string(repo("deploy/grafana/dashboards/liveness-gateway.json"))
            .expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let mut exprs = String::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            exprs.push_str(t["expr"].as_str().expect("expr"));
            exprs.push('\n');
        }
    }
    exprs.push_str(dash["templating"].to_string().as_str());
    let rules = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).expect("rules");
    let recorded: BTreeSet<String> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(str::to_string)
        .collect();
    let used = metric_names(&exprs).into_iter().chain(metric_names(&rules));
    let mut checked = 0;
    for name in used {
        if name.contains(':') {
            assert!(
                recorded.contains(&name),
                "{name} is not a recording rule in alerts.yml"
            );
            continue;
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| types.contains(*b)))
            .unwrap_or(&name);
        assert!(types.contains(base), "{name} is used but not exported");
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} names checked");
}

#[tokio::test(flavor = "multi_thread")]
async fn promtool_finds_the_exposition_clean() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .tenant_set("alpha", "daily_budget", "100")
        .start();
    post_image(&gw.url(), "alpha-key", "a.jpg", &fixture("face.jpg")).await;
    let text = metrics_text(&gw.admin_url()).await;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/install-deps installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn request_ids_are_kept_when_plain_and_made_otherwise() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let body = multipart(&[Part::image("a.jpg", &fixture("face.jpg"))]);
    let kept = post(
        &gw.url(),
        &[
            ("X-Api-Key", "alpha-key"),
            ("X-Request-Id", "mobile-7f3a.42"),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(
        kept.header("x-request-id").as_deref(),
        Some("mobile-7f3a.42")
    );
    for bad in ["has space", "quote\"", &"x".repeat(200)] {
        let made = post(
            &gw.url(),
            &[("X-Api-Key", "alpha-key"), ("X-Request-Id", bad)],
            body.clone(),
        )
        .await;
        let id = made.header("x-request-id").expect("id");
        assert!(
            uuid::Uuid::parse_str(&id).is_ok(),
            "{bad:?} replaced by {id}"
        );
    }
    let none = post(&gw.url(), &[], body).await;
    assert!(uuid::Uuid::parse_str(&none.header("x-request-id").expect("id on errors too")).is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_readiness() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let c = client();
    assert_eq!(
        get_status(&format!("{}/healthz", gw.admin_url())).await,
        200
    );
    let r = c
        .get(format!("{}/readyz", gw.admin_url()))
        .send()
        .await
        .expect("r");
    assert_eq!(r.status(), 200);
    // A host that does not resolve: alive, not ready, and requests get a 502.
    let gw = TestGateway::new("https://upstream.invalid").start();
    assert_eq!(
        get_status(&format!("{}/healthz", gw.admin_url())).await,
        200
    );
    let r = c
        .get(format!("{}/readyz", gw.admin_url()))
        .send()
        .await
        .expect("r");
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["upstream_resolved"], false);
    let a = post_image(&gw.url(), "alpha-key", "a.jpg", &fixture("face.jpg")).await;
    assert_eq!((a.status, a.code().as_str()), (502, "upstream_unreachable"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrape_gives_the_pass_rate_the_requests_imply() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let dir = tempfile::tempdir().expect("dir");
    // The shipped scrape config and rules, pointed at this gateway and scraping every second.
    let shipped =
        std::fs::read_to_string(repo("deploy/prometheus/prometheus.yml")).expect("config");
    let cfg = shipped
        .replace("127.0.0.1:9464", &gw.admin_addr.to_string())
        .replace("15s", "1s");
    assert_ne!(cfg, shipped);
    std::fs::write(dir.path().join("prometheus.yml"), cfg).expect("write");
    std::fs::copy(
        repo("deploy/prometheus/alerts.yml"),
        dir.path().join("alerts.yml"),
    )
    .expect("copy");
    let (prom, port) = start_prometheus(dir.path(), &[]);
    let api = format!("http://127.0.0.1:{port}/api/v1/query");
    let query = |q: String| {
        let api = api.clone();
        async move {
            let v: serde_json::Value = client()
                .get(&api)
                .query(&[("query", q)])
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            v["data"]["result"][0]["value"][1]
                .as_str()?
                .parse::<f64>()
                .ok()
        }
    };
    let until = Instant::now() + Duration::from_secs(30);
    while query("up{job=\"liveness-gateway\"}".into()).await != Some(1.0) {
        assert!(
            Instant::now() < until,
            "Prometheus never scraped the gateway"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (passes, fails) = (9u64, 3u64);
    for i in 0..passes {
        post_image(
            &gw.url(),
            "alpha-key",
            "a.jpg",
            &image_with_verdict(true, i * 100).0,
        )
        .await;
    }
    for i in 0..fails {
        post_image(
            &gw.url(),
            "beta-key",
            "a.jpg",
            &image_with_verdict(false, 20_000 + i * 100).0,
        )
        .await;
    }
    // The pass-rate expression of docs/observability.md, over a window that holds all the requests.
    let expr = r#"sum(rate(liveness_gateway_liveness_results_total{result="pass"}[5m])) / sum(rate(liveness_gateway_liveness_results_total[5m]))"#;
    let want = passes as f64 / (passes + fails) as f64;
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let got = query(expr.to_string()).await;
        if got.is_some_and(|g| (g - want).abs() < 1e-9) {
            break;
        }
        assert!(Instant::now() < until, "pass rate {got:?}, want {want}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(prom);
}

#[tokio::test(flavor = "multi_thread")]
async fn access_lines_are_json_with_the_facts_of_each_request() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let builder = TestGateway::for_emulator(&emu).set("server.log_format", "\"json\"");
    let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
    let url = format!("http://{}", cfg.listen);
    let (pass, _) = image_with_verdict(true, 7_000);
    let mut session = String::new();
    for (key, status) in [("alpha-key", 200), ("alpha-key", 200), ("wrong-key", 401)] {
        let a = post_image(&url, key, "a.jpg", &pass).await;
        assert_eq!(a.status, status);
        if status == 200 {
            session = a.json()["backend_session_id"]
                .as_str()
                .expect("id")
                .to_string();
        }
    }
    let gif = post_image(&url, "beta-key", "a.gif", &pass).await;
    assert_eq!(gif.status, 415);
    let lines = gw.access_lines_soon(4).await;
    assert_eq!(lines.len(), 4, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["level"], "INFO");
        assert_eq!(l["method"], "POST");
        assert_eq!(l["path"], "/api/v1/backend/liveness/short/");
        assert!(
            l["request_id"].as_str().is_some_and(|id| id.len() >= 16),
            "{l}"
        );
        let ts = l["timestamp"].as_str().expect("timestamp");
        assert!(humantime::parse_rfc3339(ts).is_ok(), "timestamp {ts}");
        assert!(l["total_ms"].is_u64(), "{l}");
    }
    // Each line is written once its answer is out, so two requests on different connections
    // may log in either order: find each by what it is.
    let find = |what: &dyn Fn(&serde_json::Value) -> bool| {
        lines
            .iter()
            .find(|l| what(l))
            .unwrap_or_else(|| panic!("no such line in {lines:#?}"))
    };
    let miss = find(&|l| l["cache"] == "MISS");
    let hit = find(&|l| l["cache"] == "HIT");
    let refused = find(&|l| l["status"] == 401);
    let rejected = find(&|l| l["status"] == 415);
    assert_eq!(miss["tenant"], "alpha");
    assert_eq!(miss["status"], 200);
    assert_eq!(miss["outcome"], "pass");
    assert_eq!(miss["cache"], "MISS");
    assert_eq!(miss["upstream_status"], 200);
    assert_eq!(miss["result"], true);
    assert!(miss["prediction"].is_f64(), "{miss}");
    assert_eq!(miss["image_bytes"], pass.len());
    assert!(miss["upstream_ms"].is_u64(), "{miss}");
    assert!(miss.get("code").is_none(), "{miss}");
    // The provider's session id, to match its bill to the request; a hit names the session of
    // the call it reuses.
    assert_eq!(miss["backend_session_id"], session.as_str(), "{miss}");
    assert_eq!(hit["backend_session_id"], session.as_str(), "{hit}");
    assert!(refused.get("backend_session_id").is_none());
    assert_eq!(miss["client"], "127.0.0.1");
    assert_eq!(hit["cache"], "HIT");
    assert_eq!(hit["result"], true);
    assert!(
        hit.get("upstream_status").is_none(),
        "a hit made no call: {hit}"
    );
    assert_eq!(miss["billing"], "billed", "{miss}");
    assert!(hit.get("billing").is_none(), "a hit costs nothing: {hit}");
    assert_eq!(refused["status"], 401);
    assert_eq!(refused["tenant"], "unknown");
    assert_eq!(refused["code"], "invalid_credentials");
    assert!(refused.get("result").is_none(), "{refused}");
    assert_eq!(rejected["tenant"], "beta");
    assert_eq!(rejected["status"], 415);
    assert_eq!(rejected["code"], gif.code());
    assert_eq!(emu.stats().calls, 1);
    // The default level is info for every target, Pingora's own included: nothing it prints per
    // request at debug (with its build paths) reaches the log.
    let levels = |log: String| -> Vec<String> {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| v["level"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let all = levels(gw.log());
    assert!(
        all.iter().all(|l| l != "DEBUG" && l != "TRACE"),
        "debug lines at the default level: {all:?}"
    );

    // RUST_LOG filters access lines like any other event of the `access` target.
    let quiet_dir = tempfile::tempdir().expect("dir");
    let quiet = TestGateway::for_emulator(&emu).set("server.log_format", "\"json\"");
    let (quiet, quiet_cfg) =
        GatewayProcess::start(&quiet, quiet_dir.path(), &[("RUST_LOG", "warn")]).await;
    assert_eq!(
        post_image(
            &format!("http://{}", quiet_cfg.listen),
            "alpha-key",
            "a.jpg",
            &pass
        )
        .await
        .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        quiet.access_lines().is_empty(),
        "RUST_LOG=warn still wrote access lines"
    );
    let all = levels(quiet.log());
    assert!(
        all.iter().all(|l| l == "WARN" || l == "ERROR"),
        "RUST_LOG=warn, and yet: {all:?}"
    );
}
