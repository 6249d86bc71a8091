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

/// What a raw provider answers to the request body it received: a status and the bytes of a
/// JSON (or text) body.
type Answering = Arc<dyn Fn(&[u8]) -> (u16, Vec<u8>) + Send + Sync>;

/// A provider that answers each request (one a connection) with whatever the test sets: the
/// emulator writes its echoes through one escape into one string; a red team's provider writes
/// anything.
struct RawProvider {
    addr: std::net::SocketAddr,
    answering: Arc<std::sync::Mutex<Answering>>,
    calls: Arc<std::sync::atomic::AtomicU64>,
}

impl RawProvider {
    async fn start() -> RawProvider {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let answering: Answering = Arc::new(|_: &[u8]| (200, verdict(&[]).into_bytes()));
        let answering = Arc::new(std::sync::Mutex::new(answering));
        let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (a, c) = (answering.clone(), calls.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (a, c) = (a.clone(), c.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 16384];
                    let body = loop {
                        let n = conn.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let body = &buf[end + 4..];
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok());
                        match length {
                            Some(n) if body.len() >= n => break body[..n].to_vec(),
                            None if body.ends_with(b"0\r\n\r\n") => break body.to_vec(),
                            _ => {}
                        }
                    };
                    c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let f = a.lock().expect("answering").clone();
                    let (status, answer) = f(&body);
                    let head = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        answer.len()
                    );
                    let _ = conn.write_all(head.as_bytes()).await;
                    let _ = conn.write_all(&answer).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        RawProvider {
            addr,
            answering,
            calls,
        }
    }

    fn answer(&self, f: impl Fn(&[u8]) -> (u16, Vec<u8>) + Send + Sync + 'static) {
        *self.answering.lock().expect("answering") = Arc::new(f);
    }

    fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A verdict with `extra` members (raw JSON text each) after its own.
fn verdict(extra: &[(&str, String)]) -> String {
    let mut text = String::from(
        r#"{"backend_session_id": "3f2a9c1e-7b4d-4e5f-8a9b-0c1d2e3f4a5b", "result": true, "prediction": "0.982312", "created_at": "2026-11-25T10:00:00.000Z", "failure_reason": null"#,
    );
    for (k, v) in extra {
        text.push_str(&format!(", {k:?}: {v}"));
    }
    text.push('}');
    text
}

/// A gateway in front of a raw provider, with the test's secrets and a tenant `gamma` whose key
/// has the characters of a base64 key (`.`, `+`), as `openssl rand -base64` makes them.
async fn raw_gateway(provider: &RawProvider) -> RunningGateway {
    let b = TestGateway::new(&format!("http://{}", provider.addr))
        .set("upstream.api_key_env", &format!("{KEY_ENV:?}"))
        .set("server.admin_token_env", "\"LG_TEST_ADMIN_TOKEN\"");
    let text = with_tenant(&b, "gamma", GAMMA_KEY);
    let cfg = liveness_gateway::config::Config::from_toml(&text, &env).expect("config");
    RunningGateway::start(cfg, Arc::new(env)).expect("gateway")
}

const GAMMA_KEY: &str = "gamma.key.0002+x/Q==";

/// Each answer is asked for twice (a miss, then what would be a hit): both must be withheld,
/// `502 upstream_secret_echo`, and the provider called both times (nothing cached).
async fn withheld_twice(
    gw: &RunningGateway,
    provider: &RawProvider,
    cases: Vec<(String, Answering)>,
    seed: u64,
) -> Vec<String> {
    let url = format!("http://{}", gw.addr);
    let mut passed = Vec::new();
    for (n, (name, f)) in cases.into_iter().enumerate() {
        provider.answer(move |body| f(body));
        let img = variant(&fixture("face.jpg"), seed + n as u64);
        for round in ["miss", "again"] {
            let a = post_image(&url, "alpha-key", "a.jpg", &img).await;
            if (a.status, a.code().as_str()) != (502, "upstream_secret_echo") {
                passed.push(format!(
                    "{name} ({round}): {} {} X-Cache {:?}",
                    a.status,
                    a.code(),
                    a.header("x-cache")
                ));
            }
        }
    }
    provider.answer(|_| (200, verdict(&[]).into_bytes()));
    passed
}

fn answering(f: impl Fn(&[u8]) -> (u16, Vec<u8>) + Send + Sync + 'static) -> Answering {
    Arc::new(f)
}

/// A verdict with one extra member.
fn verdict_with(name: &str, value: serde_json::Value) -> Answering {
    let text = verdict(&[(name, value.to_string())]);
    answering(move |_| (200, text.clone().into_bytes()))
}

/// The ways software echoes a secret that a red team's provider used: a debug dump of the
/// request in MIME base64 (a line break every 76 characters), base64 broken by spaces, HTML
/// references without `;`, octal escapes, `%uXXXX`, the key split over fields, object keys,
/// an array of characters or of byte values, a refusal with the key split by a line break,
/// UTF-16 text, four layers of encoding, base32, gzip and zlib in base64, quoted-printable,
/// hex with separators, invisible characters and U+FFFD between the characters, fullwidth
/// forms, rot13 and the reversed key: every answer is withheld, on the miss and after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_echoed_by_common_software_in_any_form_reaches_no_client() {
    use base64::Engine;
    use std::io::Write;
    let b64 = base64::engine::general_purpose::STANDARD;
    let provider = RawProvider::start().await;
    let gw = raw_gateway(&provider).await;
    let half = KEY.len() / 2;
    let (head, tail) = KEY.split_at(half);
    let mime = move |bytes: &[u8]| -> String {
        let line = base64::engine::general_purpose::STANDARD.encode(bytes);
        let lines: Vec<&str> = line
            .as_bytes()
            .chunks(76)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        lines.join("\n") + "\n"
    };
    let utf16: Vec<u8> = KEY.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let deflated = |gzip: bool| -> Vec<u8> {
        let text = format!("api_key={KEY}");
        if gzip {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(text.as_bytes()).expect("gzip");
            e.finish().expect("gzip")
        } else {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(text.as_bytes()).expect("zlib");
            e.finish().expect("zlib")
        }
    };
    let mut four = format!("api_key={KEY}");
    for _ in 0..4 {
        four = b64.encode(&four);
    }
    let spaced: String = b64
        .encode(format!("api_key={KEY}"))
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect::<Vec<_>>()
        .join(" ");
    let each = |f: &dyn Fn(char) -> String| -> String { KEY.chars().map(f).collect() };
    let rot13: String = each(&|c| {
        match c {
            'a'..='z' => (((c as u8 - b'a' + 13) % 26) + b'a') as char,
            'A'..='Z' => (((c as u8 - b'A' + 13) % 26) + b'A') as char,
            c => c,
        }
        .to_string()
    });
    let mut qp = String::new();
    for b in format!("api_key={KEY}").bytes() {
        match b {
            b'=' | b'/' | b'+' => qp.push_str(&format!("={b:02X}")),
            b => qp.push(b as char),
        }
    }
    let mut invalid = format!("{{\"result\": true, \"debug\": \"{head}").into_bytes();
    invalid.push(0xff);
    invalid.extend_from_slice(format!("{tail}\"}}").as_bytes());
    let refusal = format!("Client does not have subscription (api_key: {head}\n{tail})");
    let cases: Vec<(String, Answering)> = vec![
        (
            "MIME base64 of the request".into(),
            answering(move |body| {
                let v = serde_json::Value::String(mime(body));
                (
                    200,
                    verdict(&[("debug_request", v.to_string())]).into_bytes(),
                )
            }),
        ),
        (
            "base64 broken by spaces".into(),
            verdict_with("d", spaced.into()),
        ),
        (
            "HTML decimal references without ;".into(),
            verdict_with("d", each(&|c| format!("&#{}", c as u32)).into()),
        ),
        (
            "HTML hex references without ;".into(),
            verdict_with("d", each(&|c| format!("&#x{:x}", c as u32)).into()),
        ),
        (
            "octal escapes".into(),
            verdict_with("d", each(&|c| format!("\\{:o}", c as u32)).into()),
        ),
        (
            "%uXXXX".into(),
            verdict_with("d", each(&|c| format!("%u{:04X}", c as u32)).into()),
        ),
        (
            "two fields".into(),
            answering({
                let text = verdict(&[
                    ("key_start", format!("{head:?}")),
                    ("key_end", format!("{tail:?}")),
                ]);
                move |_| (200, text.clone().into_bytes())
            }),
        ),
        (
            "two object keys".into(),
            verdict_with("d", serde_json::json!({ head: 1, tail: 2 })),
        ),
        (
            "an array of characters".into(),
            verdict_with("d", KEY.chars().map(|c| c.to_string()).collect()),
        ),
        (
            "an array of byte values".into(),
            verdict_with("d", KEY.bytes().collect()),
        ),
        (
            "a refusal with the key split by a line break".into(),
            answering(move |_| (400, refusal.clone().into_bytes())),
        ),
        (
            "UTF-16LE in a JSON string".into(),
            verdict_with("d", String::from_utf8(utf16.clone()).expect("ascii").into()),
        ),
        (
            "UTF-16LE in base64".into(),
            verdict_with("d", b64.encode(&utf16).into()),
        ),
        ("base64 four times".into(), verdict_with("d", four.into())),
        (
            "base32".into(),
            verdict_with(
                "d",
                data_encoding::BASE32
                    .encode(format!("api_key={KEY}").as_bytes())
                    .into(),
            ),
        ),
        (
            "gzip in base64".into(),
            verdict_with("d", b64.encode(deflated(true)).into()),
        ),
        (
            "zlib in base64".into(),
            verdict_with("d", b64.encode(deflated(false)).into()),
        ),
        ("quoted-printable".into(), verdict_with("d", qp.into())),
        (
            "hex with : separators".into(),
            verdict_with(
                "d",
                KEY.bytes()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
                    .into(),
            ),
        ),
        (
            "zero-width spaces between the characters".into(),
            verdict_with("d", each(&|c| format!("{c}\u{200b}")).into()),
        ),
        (
            "an invalid byte in the key".into(),
            answering(move |_| (200, invalid.clone())),
        ),
        (
            "fullwidth forms".into(),
            verdict_with(
                "d",
                each(&|c| {
                    char::from_u32(c as u32 - 0x20 + 0xff00)
                        .expect("char")
                        .to_string()
                })
                .into(),
            ),
        ),
        ("rot13".into(), verdict_with("d", rot13.into())),
        (
            "reversed".into(),
            verdict_with("d", KEY.chars().rev().collect::<String>().into()),
        ),
    ];
    let n = cases.len() as u64;
    let passed = withheld_twice(&gw, &provider, cases, 3000).await;
    assert!(
        passed.is_empty(),
        "{} of {} answers were not withheld: {passed:#?}",
        passed.len(),
        2 * n
    );
    assert_eq!(provider.calls(), 2 * n, "nothing was cached");
    assert_eq!(echoes_counted(&gw).await, (2 * n) as f64);
    // A plain verdict still passes, and is cached.
    let url = format!("http://{}", gw.addr);
    let img = variant(&fixture("face.jpg"), 2999);
    let a = post_image(&url, "alpha-key", "a.jpg", &img).await;
    assert_eq!(
        (a.status, a.header("x-cache").as_deref()),
        (200, Some("MISS"))
    );
    let a = post_image(&url, "alpha-key", "a.jpg", &img).await;
    assert_eq!(
        (a.status, a.header("x-cache").as_deref()),
        (200, Some("HIT"))
    );
}

/// Tenant keys and the admin token in the contexts software writes them: a key with `.`, `+`
/// and `/` after `api_key=`, in a query string, percent-encoded, in base64; any key glued to
/// other text by `-` or `_`. Both for a key this process never saw (found by its key-shaped
/// pieces) and for one a client presented (found anywhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_key_or_the_admin_token_in_an_ordinary_context_reaches_no_client() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let provider = RawProvider::start().await;
    let gw = raw_gateway(&provider).await;
    let percent: String = GAMMA_KEY
        .bytes()
        .map(|b| match b.is_ascii_alphanumeric() {
            true => (b as char).to_string(),
            false => format!("%{b:02X}"),
        })
        .collect();
    let mut cases: Vec<(String, Answering)> = Vec::new();
    for text in [
        format!("api_key={GAMMA_KEY}"),
        format!("?a=1&api_key={GAMMA_KEY}&b=2"),
        format!("api_key={percent}"),
        b64.encode(format!("api_key={GAMMA_KEY}")),
        "tenant_beta-key".to_string(),
        "x-beta-key".to_string(),
        "beta-key_suffix".to_string(),
        // `alpha-key` authenticated the request: found glued to anything.
        "xalpha-keyz".to_string(),
        format!("admin_token_{ADMIN_TOKEN}"),
        format!("Bearer-{ADMIN_TOKEN}"),
        format!("{ADMIN_TOKEN}0"),
    ] {
        cases.push((text.clone(), verdict_with("d", text.into())));
    }
    let n = cases.len() as u64;
    let passed = withheld_twice(&gw, &provider, cases, 4000).await;
    assert!(
        passed.is_empty(),
        "{} of {} answers were not withheld: {passed:#?}",
        passed.len(),
        2 * n
    );
    assert_eq!(provider.calls(), 2 * n, "nothing was cached");
}

/// A client's `X-Request-Id` is sent back and logged; one that is a secret of the gateway's (a
/// tenant key, the admin token) is replaced by a new one, whether or not the request is
/// authenticated by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_that_is_a_secret_is_not_kept() {
    let provider = RawProvider::start().await;
    let gw = raw_gateway(&provider).await;
    let url = format!("http://{}", gw.addr);
    let img = variant(&fixture("face.jpg"), 5000);
    for (id, kept) in [
        ("alpha-key", false),
        ("beta-key", false),
        (GAMMA_KEY, false),
        (ADMIN_TOKEN, false),
        ("req-0001-plain", true),
    ] {
        for round in 0..2 {
            let r = post(
                &url,
                &[("Authorization", "Bearer alpha-key"), ("X-Request-Id", id)],
                multipart(&[Part::image("a.jpg", &img)]),
            )
            .await;
            let echoed = r.header("x-request-id").unwrap_or_default();
            assert_eq!(r.status, 200, "{id} ({round})");
            assert_eq!(echoed == id, kept, "{id} ({round}): X-Request-Id {echoed}");
            assert!(!echoed.is_empty());
        }
    }
}

/// A reload that makes a key with `.`, `+` and `/` a tenant key: a cached verdict that carries
/// it after `api_key=`, as a debug field writes it, is not served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dotted_key_added_by_a_reload_is_not_served_from_the_cache() {
    const DELTA: &str = "delta.key.42+Q/x==";
    let emu = emulator();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("gateway.toml");
    let b = builder(&emu);
    std::fs::write(&path, b.toml()).expect("config");
    let cfg = liveness_gateway::config::Config::load(&path, &env).expect("config");
    let gw = RunningGateway::start(cfg, Arc::new(env)).expect("gateway");
    let url = format!("http://{}", gw.addr);
    let img = variant(&fixture("face.jpg"), 950);
    emu.set_fault(Fault::EchoKeyVerdict);
    emu.set_echo(Escape::Serde, Some("debug: api_key=delta.key.42+Q/x==&b=2"));
    let first = post_image(&url, "alpha-key", "a.jpg", &img).await;
    assert_eq!(first.status, 200);
    let hit = post_image(&url, "alpha-key", "a.jpg", &img).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));

    std::fs::write(&path, with_tenant(&b, "delta", DELTA)).expect("config");
    let reload = client()
        .post(format!("http://{}/admin/reload", gw.admin_addr))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("reload");
    assert_eq!(reload.status(), 200);
    let after = post_image(&url, "alpha-key", "a.jpg", &img).await;
    assert_eq!(
        (after.status, after.code().as_str()),
        (502, "upstream_secret_echo"),
        "X-Cache {:?}",
        after.header("x-cache")
    );
    assert_eq!(emu.stats().calls, 2);
}

/// A client that types its key (or the admin token) into the URL does not put it into the
/// access log: the line shows the path withheld.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_holds_a_secret_is_not_logged() {
    let emu = emulator();
    let dir = tempfile::tempdir().expect("dir");
    let b = TestGateway::for_emulator(&emu)
        .set("server.admin_token_env", "\"LG_TEST_ADMIN_TOKEN\"")
        .set("server.log_format", "\"json\"");
    let vars = [("LG_TEST_ADMIN_TOKEN", ADMIN_TOKEN)];
    let cfg = b.config_with(&vars);
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, b.toml()).expect("config");
    let gw = GatewayProcess::spawn(&path, dir.path(), "gw", false, &vars);
    wait_listening(&cfg).await;
    let url = format!("http://{}", cfg.listen);
    for (n, path) in ["/alpha-key", &format!("/x/{ADMIN_TOKEN}"), "/nothing-here"]
        .iter()
        .enumerate()
    {
        let r = client()
            .get(format!("{url}{path}"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 404);
        // A line is written once its answer is out: the next request waits for it, or its
        // own line (on another connection) may come first.
        gw.access_lines_soon(n + 1).await;
    }
    let paths: Vec<String> = gw
        .access_lines_soon(3)
        .await
        .iter()
        .filter_map(|l| l["path"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        paths,
        [
            "[withheld: holds a secret]",
            "[withheld: holds a secret]",
            "/nothing-here"
        ]
    );
    let log = gw.log();
    assert!(!log.contains("alpha-key") && !log.contains(ADMIN_TOKEN));
}
