//! Webhooks through the real binary: budget thresholds told once across a fleet of two
//! replicas on Redis, across a restart, to a receiver that was down when they happened and
//! verifies every signature with the Standard Webhooks reference library; an organization key
//! that lapses and works again, on one host.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use liveness_gateway_dev::emulator::Fault;
use serde_json::{json, Value};
use support::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SECRET_ENV: &str = "LG_NOTIFY_TEST_SECRET";

/// The receiver of `tests/clients/webhook_receiver.py` on `port`, writing to `out`; it also
/// runs the check docs/operations.md shows, as printed.
fn receiver(port: u16, out: &Path) -> KillOnDrop {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/webhook_receiver.py");
    let snippet = out.with_extension("docs.py");
    std::fs::write(
        &snippet,
        docs_block("docs/operations.md", "python", "webhook-signature"),
    )
    .expect("snippet");
    let child = std::process::Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .arg(out)
        .arg(SECRET)
        .arg(&snippet)
        .spawn()
        .expect("python3");
    let until = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "the receiver did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    KillOnDrop(child)
}

fn received(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Wait until `out` holds `n` deliveries to `path`.
async fn until_received(out: &Path, path: &str, n: usize, limit: Duration) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let got: Vec<Value> = received(out)
            .into_iter()
            .filter(|v| v["path"] == path)
            .collect();
        if got.len() >= n {
            return got;
        }
        assert!(
            started.elapsed() < limit,
            "{} of {n} deliveries to {path} after {limit:?}: {got:?}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn hooks(builder: TestGateway, port: u16, thresholds: &str) -> TestGateway {
    let text = format!(
        r#"
[[webhooks]]
name = "ops"
url = "http://127.0.0.1:{port}/hook"
secret_env = "{SECRET_ENV}"
thresholds = {thresholds}

[[webhooks]]
name = "chat"
url = "http://127.0.0.1:{port}/slack"
format = "slack"
events = ["budget.threshold", "budget.exhausted", "org_key.lapsed", "org_key.restored"]
thresholds = {thresholds}
"#
    );
    let table: toml::Table = text.parse().expect("toml");
    builder.set("notify.webhooks", &table["webhooks"].to_string())
}

async fn spend(url: &str, n: u64, from: u64) {
    let base = fixture("face.jpg");
    for i in 0..n {
        let a = post_image(url, "alpha-key", "a.jpg", &variant(&base, from + i)).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn budget_thresholds_reach_a_signed_webhook_once_across_a_fleet_and_a_restart() {
    let emu = start_emulator();
    let redis = RedisServer::start();
    let port = free_port();
    let builder = hooks(
        TestGateway::for_emulator(&emu)
            .set("store.backend", "\"redis\"")
            .set("store.url", &format!("\"{}\"", redis.url()))
            .set("store.timeout", "\"250ms\"")
            .set("cache.enabled", "false"),
        port,
        "[0.5, 0.8, 1.0]",
    )
    .tenant_set("alpha", "daily_budget", "10");
    let dir = tempfile::tempdir().expect("dir");
    let out: PathBuf = dir.path().join("received.jsonl");
    let env = [(SECRET_ENV, SECRET)];
    let a_builder = builder.replica();
    let (mut a_proc, a) = GatewayProcess::start_named(&a_builder, dir.path(), "a", &env).await;
    let (b_proc, b) = GatewayProcess::start_named(&builder.replica(), dir.path(), "b", &env).await;
    let (a_url, b_url) = (
        format!("http://{}", a.listen),
        format!("http://{}", b.listen),
    );

    // The receiver is down while the budget crosses half on both replicas.
    spend(&a_url, 3, 0).await;
    spend(&b_url, 3, 100).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A restarts in the middle.
    a_proc.signal("TERM");
    assert!(a_proc.wait_exit(Duration::from_secs(15)).success());
    let (a_proc, _) = GatewayProcess::start_named(&a_builder, dir.path(), "a", &env).await;
    spend(&a_url, 2, 200).await;
    spend(&b_url, 2, 300).await;
    let over = post_image(
        &a_url,
        "alpha-key",
        "a.jpg",
        &variant(&fixture("face.jpg"), 400),
    )
    .await;
    assert_eq!(over.code(), "budget_exhausted");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(received(&out).is_empty());

    // Up now: it gets what it missed, tried again with backoff.
    let _receiver = receiver(port, &out);
    let got = until_received(&out, "/hook", 3, Duration::from_secs(40)).await;
    let slack = until_received(&out, "/slack", 3, Duration::from_secs(10)).await;
    // And nothing more, however long the replicas go on looking.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = received(&out);
    let got_again: Vec<&Value> = all.iter().filter(|v| v["path"] == "/hook").collect();
    assert_eq!(got_again.len(), 3, "{all:?}");
    assert_eq!(all.iter().filter(|v| v["path"] == "/slack").count(), 3);

    for d in &got {
        assert_eq!(d["verified"], json!(true), "{d}");
        assert_eq!(d["verified_by_docs"], json!(true), "{d}");
    }
    let mut ids: Vec<&str> = got.iter().filter_map(|d| d["id"].as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "three events, each sent once: {got:?}");
    let mut events: Vec<(String, f64)> = got
        .iter()
        .map(|d| {
            let body = &d["body"];
            assert_eq!(body["data"]["tenant"], json!("alpha"));
            assert_eq!(body["data"]["period"], json!("day"));
            assert_eq!(body["data"]["limit"], json!(10));
            let threshold = body["data"]["threshold"].as_f64().expect("threshold");
            let used = body["data"]["used"].as_u64().expect("used");
            assert!(used as f64 >= threshold * 10.0, "{body}");
            assert!(body["timestamp"].is_string());
            (body["type"].as_str().expect("type").to_string(), threshold)
        })
        .collect();
    events.sort_by(|x, y| x.1.total_cmp(&y.1));
    assert_eq!(
        events,
        vec![
            ("budget.threshold".to_string(), 0.5),
            ("budget.threshold".to_string(), 0.8),
            ("budget.exhausted".to_string(), 1.0),
        ]
    );
    assert!(slack.iter().all(|s| s["body"]["text"]
        .as_str()
        .is_some_and(|t| t.contains("`alpha`"))));

    // Counted: raised once across the fleet, delivered once.
    let mut raised = 0.0;
    let mut delivered = 0.0;
    for admin in [a.admin_listen, b.admin_listen] {
        let m = metrics_text(&format!("http://{admin}")).await;
        for kind in ["budget.threshold", "budget.exhausted"] {
            raised += sample(
                &m,
                &format!("liveness_gateway_notify_events_total{{event=\"{kind}\"}}"),
            );
            delivered += sample(
                &m,
                &format!("liveness_gateway_webhook_deliveries_total{{event=\"{kind}\",outcome=\"delivered\",webhook=\"ops\"}}"),
            );
        }
    }
    // Replica A restarted: what the first A counted is gone with it.
    assert!(raised <= 3.0 && delivered == 3.0, "{raised} {delivered}");
    let logs = format!("{}{}", a_proc.log(), b_proc.log());
    assert!(!logs.contains(&SECRET[6..]), "the secret in a log");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_organization_key_that_lapses_and_works_again_is_told_once_each() {
    let emu = start_emulator();
    let port = free_port();
    let dir = tempfile::tempdir().expect("dir");
    let out: PathBuf = dir.path().join("received.jsonl");
    let _receiver = receiver(port, &out);
    let state = dir.path().join("budgets.json");
    let builder = hooks(TestGateway::for_emulator(&emu), port, "[1.0]")
        .set("cache.enabled", "false")
        .set(
            "budgets.state_file",
            &format!("{:?}", state.to_str().expect("path")),
        )
        .set("upstream.key_probe_interval", "\"1s\"");
    let env = [(SECRET_ENV, SECRET)];
    let (mut gw, cfg) = GatewayProcess::start_named(&builder, dir.path(), "one", &env).await;
    let url = format!("http://{}", cfg.listen);
    let base = fixture("face.jpg");
    emu.set_fault(Fault::NoSubscription);
    for i in 0..3 {
        post_image(&url, "alpha-key", "a.jpg", &variant(&base, i)).await;
    }
    let lapsed = until_received(&out, "/hook", 1, Duration::from_secs(10)).await;
    assert_eq!(
        lapsed[0]["body"]["type"],
        json!("org_key.lapsed"),
        "{lapsed:?}"
    );
    assert!(lapsed[0]["body"]["data"]["org_key"].is_string());
    emu.set_fault(Fault::None);
    let started = Instant::now();
    loop {
        let a = post_image(&url, "alpha-key", "a.jpg", &variant(&base, 10)).await;
        if a.status == 200 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{}", a.text());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let both = until_received(&out, "/hook", 2, Duration::from_secs(10)).await;
    assert_eq!(both[1]["body"]["type"], json!("org_key.restored"));
    assert!(both.iter().all(|d| d["verified"] == json!(true)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        received(&out)
            .iter()
            .filter(|v| v["path"] == "/hook")
            .count(),
        2
    );
    let slack = until_received(&out, "/slack", 2, Duration::from_secs(5)).await;
    assert!(slack[0]["body"]["text"]
        .as_str()
        .is_some_and(|t| t.contains("subscription")));

    // It lapses again, and the process that saw it dies: the one started in its place tells
    // the fleet the key works as soon as it sees it work, and a later lapse is told again.
    emu.set_fault(Fault::NoSubscription);
    post_image(&url, "alpha-key", "a.jpg", &variant(&base, 20)).await;
    let got = until_received(&out, "/hook", 3, Duration::from_secs(10)).await;
    assert_eq!(got[2]["body"]["type"], json!("org_key.lapsed"));
    gw.signal("KILL");
    gw.wait_exit(Duration::from_secs(10));
    emu.set_fault(Fault::None);
    let (mut gw, _) = GatewayProcess::start_named(&builder, dir.path(), "one", &env).await;
    let a = post_image(&url, "alpha-key", "a.jpg", &variant(&base, 21)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let got = until_received(&out, "/hook", 4, Duration::from_secs(10)).await;
    assert_eq!(got[3]["body"]["type"], json!("org_key.restored"));
    emu.set_fault(Fault::NoSubscription);
    post_image(&url, "alpha-key", "a.jpg", &variant(&base, 22)).await;
    let got = until_received(&out, "/hook", 5, Duration::from_secs(10)).await;
    assert_eq!(got[4]["body"]["type"], json!("org_key.lapsed"));
    gw.signal("TERM");
    gw.wait_exit(Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expiring_key_a_replay_and_the_breaker_are_told() {
    let emu = start_emulator();
    let port = free_port();
    let dir = tempfile::tempdir().expect("dir");
    let out: PathBuf = dir.path().join("received.jsonl");
    let _receiver = receiver(port, &out);
    let state = dir.path().join("budgets.json");
    let admin_env = "LG_NOTIFY_TEST_ADMIN";
    let builder = hooks(TestGateway::for_emulator(&emu), port, "[1.0]")
        .set(
            "budgets.state_file",
            &format!("{:?}", state.to_str().expect("path")),
        )
        .set("server.admin_token_env", &format!("\"{admin_env}\""))
        .set("breaker.enabled", "true")
        .set("breaker.failures", "2")
        .set("breaker.open_for", "\"1s\"");
    let env = [
        (SECRET_ENV, SECRET),
        (admin_env, "admin-token-notify-0123456789"),
    ];
    let (_gw, cfg) = GatewayProcess::start_named(&builder, dir.path(), "one", &env).await;
    let (url, admin) = (
        format!("http://{}", cfg.listen),
        format!("http://{}", cfg.admin_listen),
    );
    let types = |n: usize| {
        let out = out.clone();
        async move {
            until_received(&out, "/hook", n, Duration::from_secs(15))
                .await
                .iter()
                .map(|d| {
                    assert_eq!(d["verified"], json!(true));
                    d["body"].clone()
                })
                .collect::<Vec<Value>>()
        }
    };

    // A runtime key that expires within the week.
    let k = client()
        .post(format!("{admin}/admin/tenants/beta/keys"))
        .bearer_auth("admin-token-notify-0123456789")
        .header("content-type", "application/json")
        .body(r#"{"label": "ios build", "expires_in": "6d"}"#)
        .send()
        .await
        .expect("create");
    assert_eq!(k.status().as_u16(), 201);
    let got = types(1).await;
    assert_eq!(got[0]["type"], json!("key.expiring"));
    assert_eq!(got[0]["data"]["tenant"], json!("beta"));
    assert_eq!(got[0]["data"]["label"], json!("ios build"));

    // An image that passed for alpha, sent by beta.
    let (img, _) = image_with_verdict(true, 0);
    assert_eq!(
        post_image(&url, "alpha-key", "a.jpg", &img).await.status,
        200
    );
    assert_eq!(
        post_image(&url, "beta-key", "a.jpg", &img).await.status,
        200
    );
    let got = types(2).await;
    assert_eq!(got[1]["type"], json!("replay.suspected"));
    assert_eq!(got[1]["data"]["tenant"], json!("beta"));

    // The breaker opens, and closes once the provider answers again.
    emu.set_fault(Fault::ServerError);
    for i in 0..3 {
        post_image(&url, "alpha-key", "a.jpg", &variant(&img, 1000 + i)).await;
    }
    let got = types(3).await;
    assert_eq!(got[2]["type"], json!("circuit.opened"));
    // A probe that hangs holds the breaker half-open for its whole call: that is not closed.
    emu.set_fault(Fault::Hang);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let probe = {
        let (url, img) = (url.clone(), variant(&img, 1500));
        tokio::spawn(async move { post_image(&url, "alpha-key", "a.jpg", &img).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        received(&out)
            .iter()
            .filter(|v| v["path"] == "/hook")
            .count(),
        3,
        "told of something while half-open"
    );
    emu.set_fault(Fault::None);
    probe.await.expect("probe");
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let a = post_image(&url, "alpha-key", "a.jpg", &variant(&img, 2000)).await;
        if a.status == 200 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{}", a.text());
    }
    let got = types(4).await;
    assert_eq!(got[3]["type"], json!("circuit.closed"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        received(&out)
            .iter()
            .filter(|v| v["path"] == "/hook")
            .count(),
        4
    );
}
