//! Several organization keys: each tenant's calls go out with its own key, a refused
//! subscription fails over to the tenant's fallback key once (and the lapsed key is skipped until
//! a probe finds it back), a key file is rotated with a SIGHUP under load, usage and metrics are
//! per key, and no key leaks anywhere.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use liveness_gateway_dev::emulator::{self, EmulatorConfig, EmulatorHandle, Fault};
use support::*;

const RETAIL: &str = "RETAIL-KEY-5f4dcc3b5aa765d61d8327deb882cf99-never-print-me";
const LENDING: &str = "LENDING-KEY-9e107d9d372bb6826bd81d3542a419d6-never-print-me";
const RETAIL_NEXT: &str = "RETAIL-NEXT-KEY-e4d909c290d0fb1ca068ffaddf22cbd0-never-print-me";

fn emulator_with(keys: &[(&str, &str)]) -> EmulatorHandle {
    emulator::spawn(EmulatorConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        api_key: ORG_KEY.into(),
        more_keys: keys
            .iter()
            .map(|(id, k)| (id.to_string(), k.to_string()))
            .collect(),
        latency: Duration::ZERO,
        fault: Fault::None,
        tls: None,
    })
    .expect("emulator")
}

fn write_key(dir: &Path, name: &str, value: &str) -> String {
    let path = dir.join(format!("{name}.key"));
    std::fs::write(&path, format!("{value}\n")).expect("key file");
    path.display().to_string()
}

/// A gateway with the default key (`ORG_KEY`), `retail` and `lending` from files.
fn gateway(emu: &EmulatorHandle, dir: &Path) -> TestGateway {
    let (retail, lending) = (
        write_key(dir, "retail", RETAIL),
        write_key(dir, "lending", LENDING),
    );
    TestGateway::for_emulator(emu).set(
        "upstream.keys",
        &format!(
            "[{{ id = \"retail\", api_key_file = {retail:?} }}, {{ id = \"lending\", api_key_file = {lending:?} }}]"
        ),
    )
}

fn calls(emu: &EmulatorHandle, id: &str) -> u64 {
    emu.stats().calls_by_key.get(id).copied().unwrap_or(0)
}

fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

async fn post(url: &str, key: &str, n: u64) -> Answer {
    post_image(url, key, "a.jpg", &variant(&fixture("face.jpg"), n)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_calls_with_its_own_key_and_usage_is_per_key() {
    let emu = emulator_with(&[("retail", RETAIL), ("lending", LENDING)]);
    let dir = tempfile::tempdir().expect("dir");
    let gw = gateway(&emu, dir.path())
        .tenant_set("alpha", "org_key", "\"retail\"")
        .tenant_set("beta", "org_key", "\"lending\"")
        .tenant_set("off", "disabled", "false")
        .start();
    for n in 0..3 {
        assert_eq!(post(&gw.url(), "alpha-key", n).await.status, 200);
    }
    for n in 10..12 {
        assert_eq!(post(&gw.url(), "beta-key", n).await.status, 200);
    }
    // A tenant that names no key: the default one.
    assert_eq!(post(&gw.url(), "off-key", 20).await.status, 200);
    assert_eq!(calls(&emu, "retail"), 3);
    assert_eq!(calls(&emu, "lending"), 2);
    assert_eq!(calls(&emu, "default"), 1);
    assert_eq!(calls(&emu, "unknown"), 0);

    let m = metrics_text(&gw.admin_url()).await;
    assert_eq!(
        sample(
            &m,
            r#"liveness_gateway_upstream_requests_total{error="none",org_key="retail",status_class="2xx"}"#
        ),
        3.0
    );
    assert_eq!(
        sample(&m, r#"liveness_gateway_org_key_lapsed{org_key="lending"}"#),
        0.0
    );

    let day = today();
    let usage = admin_json(
        &gw.admin_url(),
        &format!("/admin/usage?from={day}&to={day}"),
    )
    .await;
    let row = |t: &str| {
        usage["days"]
            .as_array()
            .expect("days")
            .iter()
            .find(|r| r["tenant"] == t)
            .cloned()
            .expect("row")
    };
    assert_eq!(
        row("alpha")["billable_by_org_key"],
        serde_json::json!({"retail": 3})
    );
    assert_eq!(
        row("beta")["billable_by_org_key"],
        serde_json::json!({"lending": 2})
    );
    let totals = usage["org_keys"].as_array().expect("org_keys");
    let total = |id: &str| {
        totals
            .iter()
            .find(|r| r["org_key"] == id)
            .map(|r| r["billable_calls"].as_u64().unwrap_or(0))
    };
    assert_eq!(
        (total("retail"), total("lending"), total("default")),
        (Some(3), Some(2), Some(1))
    );

    let csv = reqwest::Client::new()
        .get(format!(
            "{}/admin/usage?from={day}&to={day}",
            gw.admin_url()
        ))
        .header("Accept", "text/csv")
        .send()
        .await
        .expect("csv")
        .text()
        .await
        .expect("text");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("tenant,day,billable_calls,cache_hits_saved,rejected,billable_calls_default,billable_calls_retail,billable_calls_lending,uncertain_calls,uncertain_calls_default,uncertain_calls_retail,uncertain_calls_lending")
    );
    assert!(
        csv.lines()
            .any(|l| l == format!("alpha,{day},3,0,0,0,3,0,0,0,0,0")),
        "{csv}"
    );
}

/// The tenant's key lapses: the same upload goes once more with its fallback (a verdict, two
/// upstream calls, one budget count); later uploads skip the lapsed key, but for one probe per
/// interval, which finds it back. A tenant without a fallback gets the provider's refusal, and
/// that refusal does not open the circuit for tenants on other keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_key_fails_over_once_and_is_probed_back() {
    let emu = emulator_with(&[("retail", RETAIL), ("lending", LENDING)]);
    let dir = tempfile::tempdir().expect("dir");
    let gw = gateway(&emu, dir.path())
        .set("upstream.key_probe_interval", "\"1s\"")
        .set("breaker.enabled", "true")
        .set("breaker.subscription_open_for", "\"30s\"")
        .tenant_set("alpha", "org_key", "\"retail\"")
        .tenant_set("alpha", "org_key_fallback", "[\"lending\"]")
        .tenant_set("alpha", "daily_budget", "10")
        .tenant_set("beta", "org_key", "\"retail\"")
        .tenant_set("off", "org_key", "\"lending\"")
        .tenant_set("off", "disabled", "false")
        .start();
    // Any other failure is not a reason to spend the fallback key.
    emu.set_fault(Fault::ServerError);
    assert_eq!(post(&gw.url(), "alpha-key", 100).await.status, 502);
    // (The emulator fails it before reading the key: one call in all, none with lending.)
    assert_eq!((emu.stats().calls, calls(&emu, "lending")), (1, 0));
    emu.set_fault(Fault::None);
    emu.reset_stats();
    // The key's subscription lapses (through the emulator's HTTP control, as an operator would).
    let r = reqwest::Client::new()
        .post(format!(
            "{}/__emulator/fault?mode=no_active_subscription&key_id=retail",
            emu.url()
        ))
        .send()
        .await
        .expect("fault");
    assert_eq!(r.status().as_u16(), 200);

    let a = post(&gw.url(), "alpha-key", 1).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert!(a.json()["result"].is_boolean());
    assert_eq!((calls(&emu, "retail"), calls(&emu, "lending")), (1, 1));
    let usage = admin_json(&gw.admin_url(), "/admin/usage").await;
    let alpha = usage["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .find(|t| t["tenant"] == "alpha")
        .cloned()
        .expect("alpha");
    // The 500 before counts (the provider had the whole request); the failover upload once.
    assert_eq!(alpha["daily"]["used"], 2, "committed once: {alpha}");
    let m = metrics_text(&gw.admin_url()).await;
    assert_eq!(
        sample(&m, r#"liveness_gateway_org_key_lapsed{org_key="retail"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            r#"liveness_gateway_org_key_failovers_total{org_key="retail"}"#
        ),
        1.0
    );

    // Lapsed: straight to the fallback.
    assert_eq!(post(&gw.url(), "alpha-key", 2).await.status, 200);
    assert_eq!((calls(&emu, "retail"), calls(&emu, "lending")), (1, 2));

    // Without a fallback: the provider's refusal, passed through, nothing counted.
    let b = post(&gw.url(), "beta-key", 3).await;
    assert_eq!(b.status, 400);
    assert_eq!(b.code(), "upstream_no_active_subscription");
    assert_eq!(calls(&emu, "retail"), 2);
    // The circuit stays closed for the tenants of the key that works.
    assert_eq!(post(&gw.url(), "off-key", 4).await.status, 200);
    assert_eq!(calls(&emu, "lending"), 3);

    // The subscription is back; after the interval one request probes the key and finds it.
    emu.set_key_fault("retail", Fault::None);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(post(&gw.url(), "alpha-key", 5).await.status, 200);
    assert_eq!((calls(&emu, "retail"), calls(&emu, "lending")), (3, 3));
    let m = metrics_text(&gw.admin_url()).await;
    assert_eq!(
        sample(&m, r#"liveness_gateway_org_key_lapsed{org_key="retail"}"#),
        0.0
    );
    assert_eq!(post(&gw.url(), "alpha-key", 6).await.status, 200);
    assert_eq!((calls(&emu, "retail"), calls(&emu, "lending")), (4, 3));

    // Both lapsed: the upload still goes once per key, and the refusal comes back.
    emu.set_key_fault("retail", Fault::NoActiveSubscription);
    emu.set_key_fault("lending", Fault::NoSubscription);
    let both = post(&gw.url(), "alpha-key", 7).await;
    assert_eq!(both.status, 400);
    assert_eq!(both.code(), "upstream_no_subscription");
    assert_eq!((calls(&emu, "retail"), calls(&emu, "lending")), (5, 4));
}

/// A key file replaced in place, then SIGHUP, under a client loop: no request fails, and calls
/// after the reload carry the new key. A bad new value (empty) is refused and the key in force
/// stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_rotates_with_a_reload_under_load() {
    // The provider knows both values of the key during the rotation, as it does in practice.
    let emu = emulator_with(&[("retail-old", RETAIL), ("retail-new", RETAIL_NEXT)]);
    let dir = tempfile::tempdir().expect("dir");
    let key_file = write_key(dir.path(), "retail", RETAIL);
    let builder = TestGateway::for_emulator(&emu)
        .set(
            "upstream.keys",
            &format!("[{{ id = \"retail\", api_key_file = {key_file:?} }}]"),
        )
        .set("server.watch_config", "false")
        .set("server.log_format", "\"json\"")
        .tenant_set("alpha", "org_key", "\"retail\"");
    let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
    let url = format!("http://{}", cfg.listen);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..2u64 {
        let (url, stop) = (url.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                statuses.push(post(&url, "alpha-key", 1000 * c + n).await.status);
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Replaced in place, as a secret manager does: a new file renamed over the old one.
    let tmp = dir.path().join("retail.key.tmp");
    std::fs::write(&tmp, format!("{RETAIL_NEXT}\n")).expect("new key");
    std::fs::rename(&tmp, &key_file).expect("rename");
    gw.signal("HUP");
    let until = Instant::now() + Duration::from_secs(5);
    while calls(&emu, "retail-new") == 0 {
        assert!(Instant::now() < until, "the new key was never used");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut statuses = Vec::new();
    for c in clients {
        statuses.extend(c.await.expect("client"));
    }
    assert!(statuses.len() > 10, "{} requests", statuses.len());
    assert!(
        statuses.iter().all(|s| *s == 200),
        "failed requests across the rotation: {:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    let old = calls(&emu, "retail-old");
    assert!(old > 0);
    assert_eq!(post(&url, "alpha-key", 99_001).await.status, 200);
    assert_eq!(
        calls(&emu, "retail-old"),
        old,
        "a call after the reload used the old key"
    );

    // An empty key file: the reload is refused, the key in force stays.
    std::fs::write(&key_file, "  \n").expect("empty key");
    let refused_before = sample(
        &metrics_text(&format!("http://{}", cfg.admin_listen)).await,
        r#"liveness_gateway_reloads_total{outcome="refused"}"#,
    );
    gw.signal("HUP");
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics_text(&format!("http://{}", cfg.admin_listen)).await;
        if sample(&m, r#"liveness_gateway_reloads_total{outcome="refused"}"#) > refused_before {
            break;
        }
        assert!(Instant::now() < until, "the bad key was not refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new = calls(&emu, "retail-new");
    assert_eq!(post(&url, "alpha-key", 99_002).await.status, 200);
    assert_eq!(calls(&emu, "retail-new"), new + 1);
    assert_eq!(calls(&emu, "unknown"), 0);

    let logs = std::fs::read_to_string(&gw.stdout).unwrap_or_default()
        + &std::fs::read_to_string(&gw.stderr).unwrap_or_default();
    for key in [RETAIL, RETAIL_NEXT, ORG_KEY] {
        assert!(!logs.contains(key), "a key in the logs");
    }
    // Each call's access line names the key it went out with, by id.
    let access: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access" && v["cache"] == "MISS")
        .collect();
    assert!(!access.is_empty());
    assert!(
        access.iter().all(|v| v["org_key"] == "retail"),
        "{:?}",
        access.iter().find(|v| v["org_key"] != "retail")
    );
}

/// Every key is kept from every answer: a provider that echoes the key a call carried (in an
/// error or in a verdict) gets the client a 502, never the key; nor do logs or metrics show one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_leaks_whichever_the_call_carried() {
    let emu = emulator_with(&[("retail", RETAIL), ("lending", LENDING)]);
    let dir = tempfile::tempdir().expect("dir");
    let builder = gateway(&emu, dir.path())
        .tenant_set("alpha", "org_key", "\"retail\"")
        .tenant_set("beta", "org_key", "\"lending\"")
        .tenant_set("off", "disabled", "false");
    let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
    let url = format!("http://{}", cfg.listen);
    let mut n = 0;
    for fault in [Fault::EchoKey, Fault::EchoKeyVerdict] {
        emu.set_fault(fault);
        for key in ["alpha-key", "beta-key", "off-key"] {
            n += 1;
            let a = post(&url, key, n).await;
            assert_eq!(a.status, 502, "{fault:?} {key}");
            for secret in [RETAIL, LENDING, ORG_KEY] {
                let body = String::from_utf8_lossy(&a.body);
                assert!(!body.contains(secret), "a key in an answer");
            }
        }
    }
    assert_eq!((calls(&emu, "retail"), calls(&emu, "lending")), (2, 2));
    let m = metrics_text(&format!("http://{}", cfg.admin_listen)).await;
    let logs = std::fs::read_to_string(&gw.stdout).unwrap_or_default()
        + &std::fs::read_to_string(&gw.stderr).unwrap_or_default();
    for secret in [RETAIL, LENDING, ORG_KEY] {
        assert!(!m.contains(secret), "a key in the metrics");
        assert!(!logs.contains(secret), "a key in the logs");
    }
}

/// `check-config` names a tenant's unknown key, a key without a source, a key file that is
/// missing (not with `--offline`), and a fallback that repeats the tenant's own key.
#[test]
fn check_config_refuses_unknown_and_missing_keys() {
    let emu = emulator_with(&[]);
    let dir = tempfile::tempdir().expect("dir");
    let builder = gateway(&emu, dir.path())
        .set(
            "upstream.keys",
            "[{ id = \"retail\", api_key_file = \"/nonexistent/retail.key\" }, { id = \"lending\" }]",
        )
        .tenant_set("alpha", "org_key", "\"wholesale\"")
        .tenant_set("beta", "org_key", "\"retail\"")
        .tenant_set("beta", "org_key_fallback", "[\"retail\"]");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, builder.toml()).expect("config");
    let (ok, text) = check_config(&path, false);
    assert!(!ok);
    for expected in [
        "tenants[0].org_key",
        "\"wholesale\" is not an organization key",
        "tenants[1].org_key_fallback",
        "upstream.keys[0].api_key_file",
        "upstream.keys[1]: set api_key_env or api_key_file",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    let (ok, text) = check_config(&path, true);
    assert!(!ok);
    assert!(!text.contains("upstream.keys[0].api_key_file"), "{text}");
    assert!(
        text.contains("\"wholesale\" is not an organization key"),
        "{text}"
    );
}

/// The chain fits in one `total_timeout`: a refusal that took more than half of it passes
/// through, with no fallback call that the deadline could cut off after its request was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_refusal_is_not_followed_by_a_fallback() {
    let emu = emulator_with(&[("retail", RETAIL), ("lending", LENDING)]);
    let dir = tempfile::tempdir().expect("dir");
    let gw = gateway(&emu, dir.path())
        .set("upstream.total_timeout", "\"2s\"")
        .tenant_set("alpha", "org_key", "\"retail\"")
        .tenant_set("alpha", "org_key_fallback", "[\"lending\"]")
        .start();
    emu.set_key_fault("retail", Fault::NoActiveSubscription);
    emu.set_latency(Duration::from_millis(1200));
    let a = post(&gw.url(), "alpha-key", 1).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.code(), "upstream_no_active_subscription");
    assert_eq!((calls(&emu, "retail"), calls(&emu, "lending")), (1, 0));
    // The key is lapsed now: the next upload goes straight to the fallback.
    emu.set_latency(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b = post(&gw.url(), "alpha-key", 2).await;
    assert_eq!(b.status, 200);
    assert_eq!(calls(&emu, "lending"), 1);
}
