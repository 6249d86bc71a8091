//! Billing and verdict integrity, one test per way it used to break: calls the provider may have
//! billed are counted whatever comes back, only final verdicts are cached, passes expire sooner
//! and are never served across tenants, a failed state write loses no count, a reload is all or
//! nothing, and the admin token guards `/metrics` off loopback.

mod support;

use std::time::Duration;

use liveness_gateway::emulator::Fault;
use support::*;

/// One request with a budget of one call, then a second: the second tells whether the first was
/// counted.
async fn first_then_second(builder: TestGateway) -> (Answer, Answer, serde_json::Value) {
    let gw = builder.tenant_set("alpha", "daily_budget", "1").start();
    let base = fixture("face.jpg");
    let first = post_image(&gw.url(), "alpha-key", "a.jpg", &variant(&base, 1)).await;
    let second = post_image(&gw.url(), "alpha-key", "a.jpg", &variant(&base, 2)).await;
    let usage = admin_json(&gw.admin_url(), "/admin/usage").await;
    (first, second, usage)
}

/// The billing rule: once the whole request was written to the provider, the call counts,
/// whatever comes back, unless the provider's answer is one of its documented refusals. Before,
/// a reset while reading the answer, a cut-off 200, an oversized 200 and an unreadable 200 all
/// released the reservation: the client retried on the 502 and spending was unlimited. A call
/// that brought no answer head back (a reset, a hang) counts as uncertain too: the provider may
/// or may not have processed it; one whose status came (200, 500) was processed.
#[tokio::test(flavor = "multi_thread")]
async fn every_call_the_provider_may_bill_is_counted() {
    for (fault, max_response, status, code, uncertain) in [
        (Fault::Reset, None, 502, "upstream_invalid_response", 1),
        (Fault::CutOff, None, 502, "upstream_invalid_response", 0),
        (Fault::None, Some("64"), 502, "upstream_invalid_response", 0),
        (Fault::Oversized, None, 502, "upstream_invalid_response", 0),
        (
            Fault::InvalidJson,
            None,
            502,
            "upstream_invalid_response",
            0,
        ),
        (Fault::ServerError, None, 502, "upstream_error", 0),
        (Fault::Hang, None, 504, "upstream_timeout", 1),
    ] {
        let emu = start_emulator();
        emu.set_fault(fault);
        let mut builder = TestGateway::for_emulator(&emu).set("upstream.total_timeout", "\"1s\"");
        if let Some(max) = max_response {
            builder = builder.set("upstream.max_response_bytes", max);
        }
        let (first, second, usage) = first_then_second(builder).await;
        let case = format!("{fault:?} (max_response_bytes {max_response:?})");
        assert_eq!(
            (first.status, first.code().as_str()),
            (status, code),
            "{case}: {}",
            first.text()
        );
        assert_eq!(
            (second.status, second.code().as_str()),
            (429, "budget_exhausted"),
            "{case}: the first call was counted"
        );
        assert_eq!(usage["tenants"][0]["daily"]["used"], 1, "{case}: {usage}");
        assert_eq!(
            usage["tenants"][0]["daily"]["uncertain"], uncertain,
            "{case}: {usage}"
        );
        let stats = emu.stats();
        assert_eq!(
            stats.calls, 1,
            "{case}: the second never reached the provider"
        );
        assert_eq!(
            stats.billable, 1,
            "{case}: the provider had the whole request"
        );
        assert_eq!(
            stats.answered_billable,
            1 - uncertain,
            "{case}: the provider's answer reached the gateway"
        );
    }
}

/// The provider's documented refusals show it did not process the image: not billed. Neither is
/// a call whose connection was refused.
#[tokio::test(flavor = "multi_thread")]
async fn documented_refusals_and_refused_connections_cost_nothing() {
    for fault in [
        Fault::NoSubscription,
        Fault::SubscriptionNotStarted,
        Fault::NoActiveSubscription,
        Fault::NoAccess,
        Fault::ServiceUnavailable,
    ] {
        let emu = start_emulator();
        emu.set_fault(fault);
        let (first, second, usage) = first_then_second(TestGateway::for_emulator(&emu)).await;
        assert_eq!(first.status, 400, "{fault:?}");
        assert_eq!(second.status, 400, "{fault:?}: not refused by the budget");
        assert_eq!(usage["tenants"][0]["daily"]["used"], 0, "{fault:?}");
        assert_eq!(emu.stats().billable, 0);
    }
    let closed = TestGateway::new(&format!("http://127.0.0.1:{}", free_port()));
    let (first, second, usage) = first_then_second(closed).await;
    assert_eq!(
        (first.code(), second.code()),
        (
            "upstream_unreachable".to_string(),
            "upstream_unreachable".to_string()
        )
    );
    assert_eq!(usage["tenants"][0]["daily"]["used"], 0);
}

/// A 200 whose failure is the provider's own trouble (`SERVICE_ERROR`) goes back to the client
/// but is not cached: the retry asks again and gets a real verdict. Before, it stuck to the photo
/// for the whole TTL.
#[tokio::test(flavor = "multi_thread")]
async fn only_final_verdicts_are_cached() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let (fail, _) = image_with_verdict(false, 0);
    emu.set_fault(Fault::ServiceErrorVerdict);
    let a = post_image(&gw.url(), "alpha-key", "a.jpg", &fail).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["failure_reason"]["type"], "SERVICE_ERROR");
    assert_eq!(a.header("x-cache").as_deref(), Some("MISS"));
    emu.set_fault(Fault::None);
    let b = post_image(&gw.url(), "alpha-key", "a.jpg", &fail).await;
    assert_eq!(
        b.header("x-cache").as_deref(),
        Some("MISS"),
        "the retry asked again"
    );
    assert_eq!(b.json()["failure_reason"]["type"], "CALC_RESULT");
    // The provider's judgement of the photo is final: cached.
    let c = post_image(&gw.url(), "alpha-key", "a.jpg", &fail).await;
    assert_eq!(c.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(c.body, b.body);
    assert_eq!(emu.stats().calls, 2);
    let cache = admin_json(&gw.admin_url(), "/admin/cache").await;
    assert_eq!(cache["entries"], 1, "{cache}");
}

/// A pass lives `pass_ttl`, a fail `ttl`; a pass is never served to another tenant, and the
/// same passing image from another tenant is counted as a replay signal.
#[tokio::test(flavor = "multi_thread")]
async fn passes_expire_sooner_and_replays_across_tenants_are_signalled() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("cache.pass_ttl", "\"1s\"")
        .set("cache.ttl", "\"1h\"")
        .start();
    let (pass, _) = image_with_verdict(true, 0);
    let (fail, _) = image_with_verdict(false, 0);
    for img in [&pass, &fail] {
        assert_eq!(
            cache_label(&gw.url(), "alpha-key", img).await.as_deref(),
            Some("MISS")
        );
        assert_eq!(
            cache_label(&gw.url(), "alpha-key", img).await.as_deref(),
            Some("HIT")
        );
    }
    // Another tenant uploading the passing selfie is not served alpha's pass, and is noticed.
    let replay = post_image(&gw.url(), "beta-key", "a.jpg", &pass).await;
    assert_eq!(replay.header("x-cache").as_deref(), Some("MISS"));
    let replays = |m: &str, tenant: &str| {
        sample(
            m,
            &format!(r#"liveness_gateway_replay_suspected_total{{tenant="{tenant}"}}"#),
        )
    };
    let m = metrics_text(&gw.admin_url()).await;
    assert_eq!((replays(&m, "beta"), replays(&m, "alpha")), (1.0, 0.0));
    // A fail shared by two tenants is no replay: nobody gains from replaying a fail.
    post_image(&gw.url(), "beta-key", "a.jpg", &fail).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        cache_label(&gw.url(), "alpha-key", &pass).await.as_deref(),
        Some("MISS"),
        "the pass expired after pass_ttl"
    );
    assert_eq!(
        cache_label(&gw.url(), "alpha-key", &fail).await.as_deref(),
        Some("HIT"),
        "the fail lives on"
    );
    let m = metrics_text(&gw.admin_url()).await;
    assert_eq!(
        (replays(&m, "beta"), replays(&m, "alpha")),
        (1.0, 1.0),
        "beta's pass, then alpha's own again: alpha is now the other tenant"
    );
}

/// A failed write of the state file (here: a directory where its temporary file goes, which
/// stops root too) keeps every count in memory, is counted in a metric, and the counts reach the
/// file once writing works again. Before, the next flush lowered the count to the file's.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_state_write_loses_no_count() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("budgets.json");
    let blocker = dir.path().join(".budgets.json.tmp");
    let builder = || {
        TestGateway::for_emulator(&emu)
            .set(
                "budgets.state_file",
                &format!("{:?}", state.display().to_string()),
            )
            .set("budgets.flush_interval", "\"100ms\"")
            .tenant_set("alpha", "daily_budget", "50")
    };
    let gw = builder().start();
    let base = fixture("face.jpg");
    for n in 0..3 {
        assert_eq!(
            post_image(&gw.url(), "alpha-key", "a.jpg", &variant(&base, n))
                .await
                .status,
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    std::fs::create_dir(&blocker).expect("blocker");
    for n in 3..5 {
        assert_eq!(
            post_image(&gw.url(), "alpha-key", "a.jpg", &variant(&base, n))
                .await
                .status,
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = metrics_text(&gw.admin_url()).await;
    assert!(
        sample(&m, "liveness_gateway_state_write_failures_total") >= 2.0,
        "failed flushes are counted"
    );
    let usage = admin_json(&gw.admin_url(), "/admin/usage").await;
    assert_eq!(
        usage["tenants"][0]["daily"]["used"], 5,
        "nothing lost in memory: {usage}"
    );
    std::fs::remove_dir(&blocker).expect("unblock");
    tokio::time::sleep(Duration::from_millis(400)).await;
    drop(gw);
    let gw = builder().start();
    let usage = admin_json(&gw.admin_url(), "/admin/usage").await;
    assert_eq!(
        usage["tenants"][0]["daily"]["used"], 5,
        "every count reached the file: {usage}"
    );
}

/// A reload that would move the upstream (or change any other restart-only setting) is refused
/// as a whole, naming what needs a restart; the organization key and the host it goes to never
/// come from two configs. Before, the new key went to the old host.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_is_all_or_nothing() {
    let emu = start_emulator();
    let other = liveness_gateway::emulator::spawn(liveness_gateway::emulator::EmulatorConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        api_key: "OTHER-ORG-KEY-for-the-other-host".into(),
        more_keys: Vec::new(),
        latency: Duration::ZERO,
        fault: Fault::None,
        tls: None,
    })
    .expect("emulator");
    let dir = tempfile::tempdir().expect("dir");
    let key_file = dir.path().join("org.key");
    std::fs::write(&key_file, ORG_KEY).expect("key");
    let path = dir.path().join("gateway.toml");
    let key_file_toml = format!("{:?}", key_file.display().to_string());
    let base = TestGateway::for_emulator(&emu).set("upstream.api_key_file", &key_file_toml);
    let builder = || base.clone();
    // The file names the key by file only (no api_key_env).
    let without_env = |b: TestGateway| {
        b.toml()
            .replace(&format!("api_key_env = \"{ORG_KEY_ENV}\"\n"), "")
    };
    std::fs::write(&path, without_env(builder())).expect("config");
    let cfg = liveness_gateway::config::Config::load(&path, &|_| None).expect("config");
    let gw =
        liveness_gateway::server::RunningGateway::start(cfg, std::sync::Arc::new(|_: &str| None))
            .expect("gw");
    let reload = || async {
        let r = client()
            .post(format!("{}/admin/reload", gw.admin_url()))
            .send()
            .await
            .expect("reload");
        (r.status().as_u16(), r.text().await.expect("text"))
    };

    // A new host and a new key together: refused, and nothing of it applies.
    std::fs::write(&key_file, "OTHER-ORG-KEY-for-the-other-host").expect("key");
    let mut text = without_env(builder()).replace(&emu.url(), &other.url());
    std::fs::write(&path, &text).expect("config");
    let (status, body) = reload().await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("invalid_config") && body.contains("upstream.url"),
        "{body}"
    );
    std::fs::write(&key_file, ORG_KEY).expect("key");
    let a = post_image(&gw.url(), "alpha-key", "a.jpg", &fixture("face.jpg")).await;
    assert_eq!(a.status, 200, "the old host with the old key: {}", a.text());
    assert_eq!(other.stats().calls, 0, "nothing went to the new host");
    assert_eq!(emu.stats().wrong_key_calls, 0);

    // Intake settings need a restart too, and say so.
    text = without_env(builder().set("intake.max_parts", "3"));
    std::fs::write(&path, &text).expect("config");
    let (status, body) = reload().await;
    assert_eq!(status, 400);
    assert!(body.contains("intake"), "{body}");

    // Tenants, limits and the key itself reload.
    text = without_env(builder().tenant_set("beta", "disabled", "true"));
    std::fs::write(&path, &text).expect("config");
    assert_eq!(reload().await.0, 200);
    let b = post_image(&gw.url(), "beta-key", "a.jpg", &fixture("face.jpg")).await;
    assert_eq!(b.code(), "tenant_disabled");
}

/// With a non-loopback admin listener and a token, `/metrics` (tenant ids, budgets) asks for the
/// token like `/admin/*`; the probes stay open.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_need_the_token_off_loopback() {
    let emu = start_emulator();
    let port = free_port();
    let text = TestGateway::for_emulator(&emu)
        .set("server.admin_listen", &format!("\"0.0.0.0:{port}\""))
        .set("server.admin_token_env", "\"LG_TEST_ADMIN_TOKEN\"")
        .toml();
    let env = |n: &str| match n {
        ORG_KEY_ENV => Some(ORG_KEY.to_string()),
        "LG_TEST_ADMIN_TOKEN" => Some("admin-secret".to_string()),
        _ => None,
    };
    let cfg = liveness_gateway::config::Config::from_toml(&text, &env).expect("config");
    let gw =
        liveness_gateway::server::RunningGateway::start(cfg, std::sync::Arc::new(env)).expect("gw");
    let admin = format!("http://127.0.0.1:{port}");
    let c = client();
    let status = |path: &'static str, token: Option<&'static str>| {
        let c = c.clone();
        let admin = admin.clone();
        async move {
            let mut r = c.get(format!("{admin}{path}"));
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            r.send().await.expect("admin").status().as_u16()
        }
    };
    assert_eq!(status("/metrics", None).await, 401);
    assert_eq!(status("/metrics", Some("admin-secre")).await, 401);
    assert_eq!(status("/metrics", Some("admin-secret")).await, 200);
    assert_eq!(status("/healthz", None).await, 200);
    assert_eq!(status("/readyz", None).await, 200);
    drop(gw);
}

/// A follower waits as long as its leader can take: a slot wait, a pace wait, then the call.
/// Before, it waited only `total_timeout + upstream_queue_timeout` and got a 504 while the
/// leader's paid call was still running and then answered.
#[tokio::test(flavor = "multi_thread")]
async fn followers_wait_for_a_leader_that_queued_for_a_slot_and_the_pace() {
    let emu = start_emulator();
    emu.set_latency(Duration::from_millis(100));
    let gw = TestGateway::for_emulator(&emu)
        .set("limits.max_concurrent_upstream", "1")
        .set("limits.global_upstream_rate_per_second", "1")
        .set("limits.upstream_queue_timeout", "\"1300ms\"")
        .set("upstream.total_timeout", "\"600ms\"")
        .start();
    let url = gw.url();
    let base = fixture("face.jpg");
    let send = |n: u64, after_ms: u64| {
        let (url, img) = (url.clone(), variant(&base, n));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(after_ms)).await;
            post_image(&url, "alpha-key", "a.jpg", &img).await
        })
    };
    // One slot (handed out in arrival order) and one call a second. A calls at once. E waits
    // for A's slot, then holds it while it waits for the next second. B, the leader for image
    // 3, waits for E's slot (about 1 s), then for the second after (about 0.9 s), then calls:
    // about 2 s in all, longer than total_timeout + upstream_queue_timeout (1.9 s). C follows B.
    let a = send(1, 0);
    let e = send(2, 40);
    let b = send(3, 80);
    let c = send(3, 160);
    for (name, t) in [("A", a), ("E", e), ("B", b)] {
        let r = t.await.expect("task");
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    let c = c.await.expect("task");
    assert_eq!(
        (c.status, c.header("x-cache").as_deref()),
        (200, Some("COALESCED")),
        "the follower got its leader's answer: {}",
        c.text()
    );
    assert_eq!(emu.stats().calls, 3);
}

/// The provider model the billing tests compare against: a request received whole is billed even
/// when its client leaves at once (the gateway's total deadline can close the connection right
/// after the last byte went out). The emulator must not drop it with the connection.
#[tokio::test]
async fn the_provider_bills_a_whole_request_whose_client_left_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emu = start_emulator();
    let addr = emu.url().trim_start_matches("http://").to_string();
    let body = {
        let mut v = format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"api_key\"\r\n\r\n{ORG_KEY}\r\n"
        )
        .into_bytes();
        v.extend(multipart(&[Part::image("a.jpg", &fixture("face.jpg"))]));
        v
    };
    for n in 1..=20u64 {
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let mut request = format!(
            "POST /api/v1/backend/liveness/short/ HTTP/1.1\r\nHost: x\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
            multipart_ct(),
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        // All of it, then the client's side closed, before the provider read a byte.
        s.write_all(&request).await.expect("write");
        s.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while emu.stats().billable < n && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(emu.stats().billable, n, "request {n} was received whole");
    }
}

/// A provider that closes a kept-alive connection as the next request on it arrives (its
/// keep-alive timeout firing just then) never has that request whole, while the gateway wrote
/// it whole and got no answer byte: from the gateway, that is a provider that processed the
/// request and died before answering. Such a call counts against the budget (it may have been
/// billed), and apart, as uncertain: committed = billed by the provider + uncertain, exactly,
/// in `/admin/usage`, its history and CSV, and the metrics. Over plain HTTP and TLS to the
/// provider, with the local store and with Redis. Before, the three calls dropped unread were
/// committed like the three the provider billed: 6 committed for 3 billed, nothing apart.
#[tokio::test(flavor = "multi_thread")]
async fn calls_on_a_connection_the_provider_closes_as_they_arrive_are_counted_apart() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = support::pki::TestPki::new();
    let (cert, key, _) = pki.leaf(dir.path(), "upstream");
    let ca = pki.ca_file(dir.path());
    let redis = RedisServer::start();
    let small = fixture("face-small.jpg");
    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    for (tls, fleet) in [(false, false), (true, false), (false, true)] {
        let case = format!("tls {tls}, redis {fleet}");
        let emu = liveness_gateway::emulator::spawn(liveness_gateway::emulator::EmulatorConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            api_key: ORG_KEY.into(),
            more_keys: Vec::new(),
            latency: Duration::ZERO,
            fault: Fault::CloseIdle,
            tls: tls.then(|| (cert.clone(), key.clone())),
        })
        .expect("emulator");
        let mut builder = if tls {
            TestGateway::new(&format!("https://localhost:{}", emu.addr.port()))
                .set("upstream.connect_address", "\"127.0.0.1\"")
                .set(
                    "upstream.ca_file",
                    &format!("{:?}", ca.display().to_string()),
                )
        } else {
            TestGateway::for_emulator(&emu)
        };
        if fleet {
            builder = builder
                .set("store.backend", "\"redis\"")
                .set("store.url", &format!("\"{}\"", redis.url()));
        }
        // One worker thread: Pingora hands a pooled connection out only once its idle watcher has
        // let go of it, and on two threads that race sometimes closes it and connects anew.
        let gw = builder
            .set("server.threads", "1")
            .tenant_set("alpha", "daily_budget", "6")
            .start();
        // One at a time: a new connection is answered, the next request on it is dropped unread.
        let mut statuses = Vec::new();
        for n in 0..6 {
            let a = post_image(&gw.url(), "alpha-key", "a.jpg", &variant(&small, n)).await;
            statuses.push((a.status, a.code()));
        }
        let stats = emu.stats();
        let dropped = (502, "upstream_invalid_response".to_string());
        let ok = (200, String::new());
        assert_eq!(
            statuses,
            [
                ok.clone(),
                dropped.clone(),
                ok.clone(),
                dropped.clone(),
                ok,
                dropped
            ],
            "{case}: {stats:?}"
        );
        assert_eq!(
            (
                stats.billable,
                stats.answered_billable,
                stats.closed_on_arrival
            ),
            (3, 3, 3),
            "{case}: the provider billed and answered 3, and dropped 3 unread"
        );
        // Redis takes the settlements in the background.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        let usage = loop {
            let u = admin_json(&gw.admin_url(), "/admin/usage?tenant=alpha").await;
            if u["tenants"][0]["daily"]["used"] == 6 || std::time::Instant::now() > until {
                break u;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let daily = &usage["tenants"][0]["daily"];
        let (committed, uncertain) = (daily["used"].as_u64(), daily["uncertain"].as_u64());
        assert_eq!(
            (committed, uncertain),
            (Some(6), Some(3)),
            "{case}: committed = 3 billed + 3 uncertain: {usage}"
        );
        assert_eq!(usage["tenants"][0]["monthly"]["uncertain"], 3, "{case}");
        let history = admin_json(
            &gw.admin_url(),
            &format!("/admin/usage?from={day}&to={day}"),
        )
        .await;
        let row = history["days"]
            .as_array()
            .and_then(|d| d.iter().find(|r| r["tenant"] == "alpha"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            (
                row["billable_calls"].as_u64(),
                row["uncertain_calls"].as_u64()
            ),
            (Some(6), Some(3)),
            "{case}: {history}"
        );
        assert_eq!(
            row["uncertain_by_org_key"]["default"], 3,
            "{case}: {history}"
        );
        assert_eq!(
            history["org_keys"],
            serde_json::json!([{"org_key": "default", "day": day, "billable_calls": 6, "uncertain_calls": 3}]),
            "{case}"
        );
        let csv = client()
            .get(format!("{}/admin/usage?tenant=alpha", gw.admin_url()))
            .header("Accept", "text/csv")
            .send()
            .await
            .expect("csv")
            .text()
            .await
            .expect("csv text");
        let mut lines = csv.lines();
        assert_eq!(
            lines.next(),
            Some("tenant,day,billable_calls,cache_hits_saved,rejected,uncertain_calls"),
            "{case}"
        );
        assert!(
            lines.any(|l| l == format!("alpha,{day},6,0,0,3")),
            "{case}: {csv}"
        );
        let m = metrics_text(&gw.admin_url()).await;
        assert_eq!(
            sample(
                &m,
                r#"liveness_gateway_upstream_uncertain_total{org_key="default"}"#
            ),
            3.0,
            "{case}"
        );
        assert_eq!(
            sample(
                &m,
                r#"liveness_gateway_billable_calls_total{tenant="alpha"}"#
            ),
            6.0,
            "{case}"
        );
        // The uncertain calls hold their place in the budget: it is spent.
        let seventh = post_image(&gw.url(), "alpha-key", "a.jpg", &variant(&small, 99)).await;
        assert_eq!(seventh.code(), "budget_exhausted", "{case}");
    }
}

/// A provider that answers each request with `interim` (interim answers, a 1xx head each) and
/// then a verdict, on a connection of its own; the number of requests it received whole.
async fn provider_with_interim_answers(
    interim: &'static str,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let received = std::sync::Arc::new(AtomicU64::new(0));
    let count = received.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                // The head, then as many body bytes as it declares.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16384];
                let (head_end, length) = loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (i + 4, length);
                    }
                };
                while buf.len() < head_end + length {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                count.fetch_add(1, Ordering::SeqCst);
                let body = format!(
                    r#"{{"backend_session_id":"s-{}","result":true,"prediction":"0.9","failure_reason":null}}"#,
                    count.load(Ordering::SeqCst)
                );
                let answer = format!(
                    "{interim}HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (url, received)
}

/// Interim answers before the verdict (`100 Continue`, `102 Processing`, `103 Early Hints`)
/// are read past: each verdict reaches its client and is billed. Before, the gateway panicked
/// reading the body of the interim answer: every client got 500, and the call was given back to
/// the budget though the provider had billed it (a budget of 3 let 13 calls through).
#[tokio::test(flavor = "multi_thread")]
async fn interim_answers_before_the_verdict_are_read_past_and_billed() {
    for interim in [
        "HTTP/1.1 100 Continue\r\n\r\n",
        "HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n",
    ] {
        let (url, received) = provider_with_interim_answers(interim).await;
        let gw = TestGateway::new(&url)
            .tenant_set("alpha", "daily_budget", "3")
            .start();
        let base = fixture("face.jpg");
        let mut statuses = Vec::new();
        for n in 0..4 {
            let a = post_image(&gw.url(), "alpha-key", "a.jpg", &variant(&base, n)).await;
            statuses.push((a.status, a.code()));
        }
        let usage = admin_json(&gw.admin_url(), "/admin/usage").await;
        assert_eq!(
            statuses,
            vec![
                (200, String::new()),
                (200, String::new()),
                (200, String::new()),
                (429, "budget_exhausted".to_string()),
            ],
            "{interim:?}"
        );
        assert_eq!(usage["tenants"][0]["daily"]["used"], 3, "{interim:?}: {usage}");
        assert_eq!(received.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
