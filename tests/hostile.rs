//! Hostile load and faults: a provider that echoes the key, a provider that keeps failing (the
//! circuit breaker), bodies and connections that try to exhaust memory and sockets.

mod support;

use std::time::Duration;

use liveness_gateway::emulator::Fault;
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
            (502, "upstream_invalid_response"),
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
