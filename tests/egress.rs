//! What the provider sends back reaches a client only as the gateway wrote it, after every string
//! in it was decoded and checked against every secret the gateway holds: an answer that gives one
//! away, however it is escaped or wherever it sits (a refusal, a verdict, an error, a header), is
//! answered `502 upstream_secret_echo`, counted, and never cached, on this replica or in the
//! fleet's store; a secret added by a reload is kept from the cache's answers too.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use liveness_gateway::server::RunningGateway;
use liveness_gateway_dev::emulator::{self, EmulatorConfig, EmulatorHandle, Escape, Fault};
use support::*;

/// An organization key with the characters PHP (`/`) and .NET (`+`) escape.
const KEY: &str = "Org/Secret+Key=42/5d41402abc4b2a76-never+print/me";
const KEY_ENV: &str = "LG_TEST_EGRESS_KEY";
const ADMIN_TOKEN: &str = "admin-token-7d793037a0760186-never-print-me";
/// A tenant key as `keys new` makes them.
const NEW_KEY: &str = "lgk_9a0364b9e99bb480dd25e1f0284c8555b1f4f7e1c1b4f45f0b9b3c5c21e3e7a2";

fn emulator() -> EmulatorHandle {
    emulator::spawn(EmulatorConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        api_key: KEY.into(),
        more_keys: Vec::new(),
        latency: Duration::ZERO,
        fault: Fault::None,
        tls: None,
    })
    .expect("emulator")
}

fn env(name: &str) -> Option<String> {
    match name {
        KEY_ENV => Some(KEY.into()),
        "LG_TEST_ADMIN_TOKEN" => Some(ADMIN_TOKEN.into()),
        _ => None,
    }
}

/// A gateway that calls `emu` with `KEY`, has an admin token, and gives tenant `beta` a key
/// of the generated shape besides its own.
fn builder(emu: &EmulatorHandle) -> TestGateway {
    TestGateway::for_emulator(emu)
        .set("upstream.api_key_env", &format!("{KEY_ENV:?}"))
        .set("server.admin_token_env", "\"LG_TEST_ADMIN_TOKEN\"")
        .tenant_set(
            "beta",
            "key_sha256",
            &format!("[{:?}, {:?}]", digest_of("beta-key"), digest_of(NEW_KEY)),
        )
}

fn start(builder: TestGateway) -> RunningGateway {
    let cfg = liveness_gateway::config::Config::from_toml(&builder.toml(), &env).expect("config");
    RunningGateway::start(cfg, Arc::new(env)).expect("gateway")
}

/// The config of `b` with one more tenant, whose key is `key`.
fn with_tenant(b: &TestGateway, id: &str, key: &str) -> String {
    let mut table: toml::Table = b.toml().parse().expect("toml");
    let mut tenant = toml::Table::new();
    tenant.insert("id".into(), id.into());
    tenant.insert(
        "key_sha256".into(),
        toml::Value::Array(vec![digest_of(key).into()]),
    );
    table["tenants"]
        .as_array_mut()
        .expect("tenants")
        .push(tenant.into());
    toml::to_string(&table).expect("toml")
}

async fn echoes_counted(gw: &RunningGateway) -> f64 {
    let m = metrics_text(&format!("http://{}", gw.admin_addr)).await;
    sample(&m, "liveness_gateway_upstream_secret_echo_total")
}

/// Upload each image twice for each echoing answer; what went wrong, one line per answer.
async fn run_cases(
    gw: &RunningGateway,
    emu: &EmulatorHandle,
    secret: &str,
    cases: &[(Fault, Escape, Option<&str>)],
    seed: u64,
) -> (Vec<String>, Vec<String>) {
    let url = format!("http://{}", gw.addr);
    let (mut leaks, mut wrong) = (Vec::new(), Vec::new());
    for (n, (fault, escape, text)) in cases.iter().enumerate() {
        emu.set_fault(*fault);
        emu.set_echo(*escape, *text);
        let img = variant(&fixture("face.jpg"), seed + n as u64);
        for round in ["first", "again"] {
            let a = post_image(&url, "alpha-key", "a.jpg", &img).await;
            let what = format!(
                "{fault:?}/{escape:?} ({round}): {} {} X-Cache {:?}",
                a.status,
                a.code(),
                a.header("x-cache")
            );
            if answer_holds_secret(&a, secret) {
                leaks.push(what.clone());
            }
            if (a.status, a.code().as_str()) != (502, "upstream_secret_echo")
                || a.header("content-type").as_deref() != Some("application/json")
            {
                wrong.push(what);
            }
        }
    }
    emu.set_fault(Fault::None);
    emu.set_echo(Escape::Serde, None);
    (leaks, wrong)
}

/// The organization key, written by the provider as PHP, .NET or any JSON encoder may write
/// it, in a refusal the gateway passes on, in a verdict it would cache, in an error it does
/// not pass on, in a sentence of plain text, or in the `Content-Type` header: no answer carries
/// it, the first time or the second; each such answer is counted; none is cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_in_any_escaping_anywhere_in_an_answer_reaches_no_client() {
    let emu = emulator();
    let gw = start(builder(&emu));
    use Escape::*;
    let mut cases = Vec::new();
    for fault in [
        Fault::EchoKeyRefusal,
        Fault::EchoKeyVerdict,
        Fault::EchoKey,
        Fault::EchoKeyHeader,
    ] {
        for escape in [Php, Unicode, Mixed] {
            cases.push((fault, escape, None));
        }
    }
    for escape in [Serde, Php, Unicode, Mixed, Percent, Base64] {
        cases.push((Fault::EchoKeyText, escape, None));
    }
    cases.push((Fault::EchoKeyHeader, Serde, None));
    cases.push((Fault::EchoKeyVerdict, Base64, None));
    cases.push((Fault::EchoKeyVerdict, Percent, None));
    let (leaks, wrong) = run_cases(&gw, &emu, KEY, &cases, 0).await;
    let answers = 2 * cases.len();
    assert!(
        leaks.is_empty(),
        "{} of {answers} answers carried the organization key: {leaks:#?}",
        leaks.len()
    );
    assert!(
        wrong.is_empty(),
        "{} of {answers} answers were not 502 upstream_secret_echo: {wrong:#?}",
        wrong.len()
    );
    // Nothing was cached: every upload called the provider, and every answer was counted.
    assert_eq!(emu.stats().calls, answers as u64);
    assert_eq!(echoes_counted(&gw).await, answers as f64);
    // With the provider fixed, the same images are answered by the provider, not the cache.
    let url = format!("http://{}", gw.addr);
    let a = post_image(
        &url,
        "alpha-key",
        "a.jpg",
        &variant(&fixture("face.jpg"), 1),
    )
    .await;
    assert_eq!(
        (a.status, a.header("x-cache").as_deref()),
        (200, Some("MISS"))
    );
    assert!(!answer_holds_secret(&a, KEY));
}

/// Tenant keys and the admin token are held only as digests; an answer that carries one (the
/// caller's, another tenant's, one of the shape `keys new` makes inside a longer text, the
/// admin token) is kept from the client all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_key_or_the_admin_token_in_an_answer_reaches_no_client() {
    let emu = emulator();
    let gw = start(builder(&emu));
    let new_key_in_text = format!("Authorization: Bearer {NEW_KEY}; scope=all");
    let mut count = 0;
    for (secret, text) in [
        ("alpha-key", "alpha-key"),
        ("beta-key", "beta-key"),
        (NEW_KEY, new_key_in_text.as_str()),
        (ADMIN_TOKEN, ADMIN_TOKEN),
    ] {
        let mut cases = Vec::new();
        for escape in [Escape::Serde, Escape::Unicode, Escape::Base64] {
            cases.push((Fault::EchoKeyVerdict, escape, Some(text)));
            cases.push((Fault::EchoKeyRefusal, escape, Some(text)));
        }
        cases.push((Fault::EchoKeyText, Escape::Percent, Some(text)));
        cases.push((Fault::EchoKeyHeader, Escape::Serde, Some(text)));
        let (leaks, wrong) = run_cases(&gw, &emu, secret, &cases, 100 + count).await;
        count += cases.len() as u64;
        assert!(
            leaks.is_empty(),
            "{secret}: {} of {} answers carried it: {leaks:#?}",
            leaks.len(),
            2 * cases.len()
        );
        assert!(
            wrong.is_empty(),
            "{secret}: {} of {} answers were not 502 upstream_secret_echo: {wrong:#?}",
            wrong.len(),
            2 * cases.len()
        );
    }
    assert_eq!(emu.stats().calls, 2 * count);
    assert_eq!(echoes_counted(&gw).await, (2 * count) as f64);
}

/// A verdict the cache holds is checked again when a reload brings a new secret: a tenant
/// key added by the reload that the cached verdict carries is not served from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_added_by_a_reload_is_not_served_from_the_cache() {
    const GAMMA: &str = "gamma-key-6512bd43d9caa6e02c990b0a82652dca";
    let emu = emulator();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("gateway.toml");
    let b = builder(&emu);
    std::fs::write(&path, b.toml()).expect("config");
    let cfg = liveness_gateway::config::Config::load(&path, &env).expect("config");
    let gw = RunningGateway::start(cfg, Arc::new(env)).expect("gateway");
    let url = format!("http://{}", gw.addr);
    let admin = format!("http://{}", gw.admin_addr);
    let img = variant(&fixture("face.jpg"), 900);

    // Not a secret yet: the verdict that carries it is answered and cached.
    emu.set_fault(Fault::EchoKeyVerdict);
    emu.set_echo(Escape::Serde, Some(GAMMA));
    let first = post_image(&url, "alpha-key", "a.jpg", &img).await;
    assert_eq!(
        (first.status, first.header("x-cache").as_deref()),
        (200, Some("MISS"))
    );
    let hit = post_image(&url, "alpha-key", "a.jpg", &img).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));

    // The reload makes it a tenant key.
    std::fs::write(&path, with_tenant(&b, "gamma", GAMMA)).expect("config");
    let reload = client()
        .post(format!("{admin}/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("reload");
    assert_eq!(reload.status(), 200);

    let after = post_image(&url, "alpha-key", "a.jpg", &img).await;
    assert!(
        !answer_holds_secret(&after, GAMMA),
        "the cache served a verdict that carries a tenant key: {} X-Cache {:?}",
        after.status,
        after.header("x-cache")
    );
    // The stored verdict was dropped; the provider, asked again, echoes again.
    assert_eq!(
        (after.status, after.code().as_str()),
        (502, "upstream_secret_echo")
    );
    assert_eq!(emu.stats().calls, 2);
    assert_eq!(echoes_counted(&gw).await, 2.0);
}

/// A reload that brings a secret while a call is at the provider: the answer that carries it
/// reaches neither the request that called nor the one that waited on the same image, though
/// both began before the reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_added_by_a_reload_during_a_call_is_kept_from_its_answers() {
    const GAMMA: &str = "gamma-key-c20ad4d76fe97759aa27a0c99bff6710";
    let emu = emulator();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("gateway.toml");
    let b = builder(&emu);
    std::fs::write(&path, b.toml()).expect("config");
    let cfg = liveness_gateway::config::Config::load(&path, &env).expect("config");
    let gw = RunningGateway::start(cfg, Arc::new(env)).expect("gateway");
    let url = format!("http://{}", gw.addr);
    let admin = format!("http://{}", gw.admin_addr);
    let img = variant(&fixture("face.jpg"), 950);
    emu.set_fault(Fault::EchoKeyVerdict);
    emu.set_echo(Escape::Serde, Some(GAMMA));
    emu.set_latency(Duration::from_millis(1500));

    let call = |url: String, img: Vec<u8>| {
        tokio::spawn(async move { post_image(&url, "alpha-key", "a.jpg", &img).await })
    };
    let leader = call(url.clone(), img.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let follower = call(url.clone(), img.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(&path, with_tenant(&b, "gamma", GAMMA)).expect("config");
    let reload = client()
        .post(format!("{admin}/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("reload");
    assert_eq!(reload.status(), 200);
    assert!(
        emu.stats().verdicts == 0,
        "the reload came while the call was at the provider"
    );
    for (who, task) in [("leader", leader), ("follower", follower)] {
        let a = task.await.expect("task");
        assert!(
            !answer_holds_secret(&a, GAMMA),
            "the {who} got the new tenant key: {} X-Cache {:?}",
            a.status,
            a.header("x-cache")
        );
        assert_eq!(
            (a.status, a.code().as_str()),
            (502, "upstream_secret_echo"),
            "{who}"
        );
    }
    assert_eq!(emu.stats().calls, 1, "one call for both");
    emu.set_latency(Duration::ZERO);
    // Nor is it served from the cache afterwards.
    let later = post_image(&url, "alpha-key", "a.jpg", &img).await;
    assert!(!answer_holds_secret(&later, GAMMA));
}

/// In a fleet: an echoing answer is stored in the shared store for no replica, and a verdict
/// in the store that carries a secret (another replica's, an older version's, or anything else
/// written under the prefix) is checked before it is served: not served, counted, and replaced
/// by the provider's new answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleets_store_neither_keeps_nor_serves_an_answer_with_a_secret() {
    let redis = RedisServer::start();
    let emu = emulator();
    let b = builder(&emu)
        .set("store.backend", "\"redis\"")
        .set("store.url", &format!("\"{}\"", redis.url()))
        .set("store.timeout", "\"250ms\"");
    let (one, two) = (start(b.replica()), start(b.replica()));
    let (url1, url2) = (
        format!("http://{}", one.addr),
        format!("http://{}", two.addr),
    );
    let verdicts = || {
        redis
            .keys("lg:*v:*")
            .into_iter()
            .filter(|k| !k.contains("lock"))
            .collect::<Vec<_>>()
    };

    // An echo is stored nowhere: the other replica asks the provider itself.
    emu.set_fault(Fault::EchoKeyVerdict);
    emu.set_echo(Escape::Unicode, None);
    let img = variant(&fixture("face.jpg"), 700);
    for url in [&url1, &url2] {
        let a = post_image(url, "alpha-key", "a.jpg", &img).await;
        assert!(!answer_holds_secret(&a, KEY), "{}", a.text());
        assert_eq!((a.status, a.code().as_str()), (502, "upstream_secret_echo"));
    }
    assert_eq!(emu.stats().calls, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(verdicts(), Vec::<String>::new(), "nothing was stored");

    // A clean verdict, stored by replica one...
    emu.set_fault(Fault::None);
    emu.set_echo(Escape::Serde, None);
    let img = variant(&fixture("face.jpg"), 701);
    let clean = post_image(&url1, "alpha-key", "a.jpg", &img).await;
    assert_eq!(clean.status, 200);
    let until = Instant::now() + Duration::from_secs(3);
    let key = loop {
        if let [k] = verdicts().as_slice() {
            break k.clone();
        }
        assert!(Instant::now() < until, "the verdict was stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // ... replaced in the store by one that carries the key (as `\uXXXX` in a JSON string).
    let mut v: serde_json::Value = serde_json::from_str(&redis.cli(&["GET", &key])).expect("json");
    let unicode: String = KEY.encode_utf16().map(|u| format!("\\u{u:04x}")).collect();
    let body = clean
        .text()
        .replacen('{', &format!("{{\"debug\":\"{unicode}\","), 1);
    v["body"] = body.into();
    redis.cli(&["SET", &key, &v.to_string(), "PX", "600000"]);

    let served = post_image(&url2, "alpha-key", "a.jpg", &img).await;
    assert!(
        !answer_holds_secret(&served, KEY),
        "a replica served the stored verdict that carries the key: X-Cache {:?}",
        served.header("x-cache")
    );
    assert_eq!(
        (served.status, served.header("x-cache").as_deref()),
        (200, Some("MISS")),
        "the provider was asked again"
    );
    assert_eq!(emu.stats().calls, 4);
    assert_eq!(echoes_counted(&two).await, 2.0);
    // The new verdict replaced it.
    let until = Instant::now() + Duration::from_secs(3);
    while holds_secret(&redis.cli(&["GET", &key]), KEY) {
        assert!(Instant::now() < until, "the stored verdict was replaced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
