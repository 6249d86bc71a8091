//! Operating the real binary: graceful shutdown, hot reload (admin endpoint and SIGHUP), and a
//! zero-downtime upgrade with Pingora's socket hand-over.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use liveness_gateway::config::Config;
use support::*;

fn distinct(n: u64) -> Vec<u8> {
    variant(&fixture("face.jpg"), n)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_requests_then_exits_cleanly() {
    let emu = start_emulator();
    emu.set_latency(Duration::from_millis(1500));
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("budgets.json");
    let builder = TestGateway::for_emulator(&emu)
        .set("server.grace_period", "\"4s\"")
        .set(
            "budgets.state_file",
            &format!("{:?}", state.display().to_string()),
        )
        .set("budgets.flush_interval", "\"10s\"")
        .tenant_set("alpha", "daily_budget", "100");
    let cfg = builder.config();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, builder.toml()).expect("write");
    let mut gw = GatewayProcess::spawn(&path, dir.path(), "gw", false, &[]);
    wait_listening(&cfg).await;
    let url = format!("http://{}", cfg.listen);

    let inflight: Vec<_> = (0..5)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move { post_image(&url, "alpha-key", "a.jpg", &distinct(i)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(emu.stats().in_flight, 5, "all five are at the provider");
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // During the shutdown delay it is not ready, but still accepts and serves.
    assert_eq!(
        get_status(&format!("http://{}/readyz", cfg.admin_listen)).await,
        503
    );
    let late = {
        let url = url.clone();
        tokio::spawn(async move { post_image(&url, "alpha-key", "a.jpg", &distinct(99)).await })
    };
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // After the delay, no new connections.
    assert!(
        TcpStream::connect(cfg.listen).is_err(),
        "still accepting after the shutdown delay"
    );
    for t in inflight.into_iter().chain([late]) {
        let a = t.await.expect("task");
        assert_eq!(a.status, 200, "an in-flight request was cut: {}", a.text());
    }
    let status = gw.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
    // The budget state was flushed at shutdown (the periodic flush is 10 s away).
    let saved = std::fs::read_to_string(&state).expect("state file written at shutdown");
    let v: serde_json::Value = serde_json::from_str(&saved).expect("json");
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(v["tenants"]["alpha"]["days"][&today], 6, "{saved}");
}

/// Behind a Kubernetes Service, clients keep arriving for a few seconds after the pod got
/// SIGTERM. A loop opening a new connection for every request through the signal sees no refused
/// connection during `server.shutdown_delay`; then the process drains and exits at once, without
/// waiting out a long grace period when nothing is in flight.
#[tokio::test(flavor = "multi_thread")]
async fn new_connections_are_served_through_the_shutdown_delay() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let builder = TestGateway::for_emulator(&emu)
        .set("server.shutdown_delay", "\"2s\"")
        .set("server.grace_period", "\"30s\"");
    let (mut gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
    let url = format!("http://{}", cfg.listen);
    // No pooled connections: every request opens a new one.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let body = multipart(&[Part::image("a.jpg", &fixture("face.jpg"))]);
    let send = || {
        fresh
            .post(format!("{url}{ROUTE}"))
            .header("Content-Type", multipart_ct())
            .header("Authorization", "Bearer alpha-key")
            .body(body.clone())
            .send()
    };
    for _ in 0..5 {
        assert_eq!(send().await.expect("before").status(), 200);
    }
    gw.signal("TERM");
    let signalled = Instant::now();
    let (mut served, mut refused) = (0, 0);
    while signalled.elapsed() < Duration::from_millis(1700) {
        match send().await {
            Ok(r) if r.status() == 200 => served += 1,
            Ok(r) => panic!("answered {} during the delay", r.status()),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(
        refused, 0,
        "{served} served, {refused} refused during the delay"
    );
    assert!(served > 10, "only {served} requests during the delay");
    let status = gw.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(8),
        "idle, it exits without waiting out the 30 s grace period ({:?})",
        signalled.elapsed()
    );
    assert!(send().await.is_err(), "refused once stopped");
}

/// One request on an existing keep-alive connection.
fn keepalive_request(s: &mut TcpStream, key: &str, image: &[u8]) -> (u16, String) {
    let body = multipart(&[Part::image("a.jpg", image)]);
    let head = format!("POST {ROUTE} HTTP/1.1\r\nHost: x\r\nX-Api-Key: {key}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n", multipart_ct(), body.len());
    s.write_all(head.as_bytes()).expect("head");
    s.write_all(&body).expect("body");
    read_response(s)
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_reload_swaps_tenants_without_dropping_connections() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("gateway.toml");
    let gw = TestGateway::for_emulator(&emu).start_from_file(&path);
    // Keep the listen addresses of the running gateway in the rewritten files.
    let keep = |b: TestGateway| {
        b.set("server.listen", &format!("\"{}\"", gw.addr))
            .set("server.admin_listen", &format!("\"{}\"", gw.admin_addr))
    };

    let mut conn = TcpStream::connect(gw.addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert_eq!(
        keepalive_request(&mut conn, "beta-key", &distinct(1)).0,
        200
    );

    // beta's key is rotated to a new one, gamma is added, alpha gets a budget of 1.
    let next = keep(TestGateway::for_emulator(&emu))
        .tenant_set(
            "beta",
            "key_sha256",
            &format!("[\"{}\"]", digest_of("beta-key-2")),
        )
        .tenant_set("alpha", "daily_budget", "1");
    let mut text = next.toml();
    text.push_str(&format!(
        "\n[[tenants]]\nid = \"gamma\"\nkey_sha256 = [\"{}\"]\n",
        digest_of("gamma-key")
    ));
    std::fs::write(&path, &text).expect("write");
    let r = client()
        .post(format!("{}/admin/reload", gw.admin_url()))
        .send()
        .await
        .expect("reload");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());

    // The same connection goes on, under the new config.
    let (status, body) = keepalive_request(&mut conn, "beta-key", &distinct(2));
    assert_eq!(
        (status, json_code(&body).as_str()),
        (401, "invalid_credentials"),
        "the old key is gone"
    );
    let mut conn = TcpStream::connect(gw.addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert_eq!(
        keepalive_request(&mut conn, "beta-key-2", &distinct(3)).0,
        200
    );
    assert_eq!(
        keepalive_request(&mut conn, "gamma-key", &distinct(4)).0,
        200,
        "same connection, new tenant"
    );
    assert_eq!(
        keepalive_request(&mut conn, "alpha-key", &distinct(5)).0,
        200
    );
    let (status, body) = keepalive_request(&mut conn, "alpha-key", &distinct(6));
    assert_eq!(
        (status, json_code(&body).as_str()),
        (429, "budget_exhausted")
    );

    // An invalid file is refused with its reasons, and the config in force stays.
    std::fs::write(
        &path,
        text.replace("id = \"gamma\"", "id = \"gamma\"\nrate_per_second = 0"),
    )
    .expect("write");
    let r = client()
        .post(format!("{}/admin/reload", gw.admin_url()))
        .send()
        .await
        .expect("reload");
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["code"], "invalid_config");
    assert!(
        v["detail"]
            .as_str()
            .expect("detail")
            .contains("rate_per_second"),
        "{v}"
    );
    let mut conn = TcpStream::connect(gw.addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert_eq!(
        keepalive_request(&mut conn, "gamma-key", &distinct(7)).0,
        200,
        "the old config is still in force"
    );
    let mut buf = [0u8; 1];
    conn.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    assert!(conn.read(&mut buf).is_err(), "the connection is still open");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_and_refuses_an_invalid_file() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("gateway.toml");
    let builder = TestGateway::for_emulator(&emu);
    let cfg = builder.config();
    std::fs::write(&path, builder.toml()).expect("write");
    let gw = GatewayProcess::spawn(&path, dir.path(), "gw", false, &[]);
    wait_listening(&cfg).await;
    let url = format!("http://{}", cfg.listen);
    assert_eq!(
        post_image(&url, "gamma-key", "a.jpg", &distinct(1))
            .await
            .status,
        401
    );

    let mut text = builder.toml();
    text.push_str(&format!(
        "\n[[tenants]]\nid = \"gamma\"\nkey_sha256 = [\"{}\"]\n",
        digest_of("gamma-key")
    ));
    std::fs::write(&path, &text).expect("write");
    gw.signal("HUP");
    let until = Instant::now() + Duration::from_secs(10);
    while post_image(&url, "gamma-key", "a.jpg", &distinct(2))
        .await
        .status
        != 200
    {
        assert!(Instant::now() < until, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gw.log().contains("config reloaded"));

    std::fs::write(&path, "this is = not [valid").expect("write");
    gw.signal("HUP");
    let until = Instant::now() + Duration::from_secs(10);
    while !gw.log().contains("config reload refused") {
        assert!(Instant::now() < until, "no refusal logged:\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        post_image(&url, "gamma-key", "a.jpg", &distinct(3))
            .await
            .status,
        200,
        "the old config stays in force"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_hands_the_sockets_over_without_a_failed_request() {
    let emu = start_emulator();
    emu.set_latency(Duration::from_millis(20));
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("gateway.toml");
    let builder = TestGateway::for_emulator(&emu).set("server.grace_period", "\"3s\"");
    let cfg: Config = builder.config();
    std::fs::write(&path, builder.toml()).expect("write");
    let mut old = GatewayProcess::spawn(&path, dir.path(), "old", false, &[]);
    wait_listening(&cfg).await;
    let url = format!("http://{}", cfg.listen);

    // A client loop, a new connection per request, for the whole upgrade.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_loop = stop.clone();
    let loop_url = url.clone();
    let client_loop = tokio::spawn(async move {
        let c = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        let (mut ok, mut failed) = (0u32, Vec::new());
        let mut n = 0u64;
        while !stop_loop.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            let body = multipart(&[Part::image("a.jpg", &distinct(n % 7))]);
            let r = c
                .post(format!("{loop_url}{ROUTE}"))
                .header("X-Api-Key", "alpha-key")
                .header("Content-Type", multipart_ct())
                .body(body)
                .send()
                .await;
            match r {
                Ok(r) if r.status() == 200 => ok += 1,
                Ok(r) => failed.push(format!("status {}", r.status())),
                Err(e) => failed.push(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (ok, failed)
    });

    tokio::time::sleep(Duration::from_millis(500)).await;
    // The documented procedure: start the new binary with -u, then SIGQUIT the old one.
    let new = GatewayProcess::spawn(&path, dir.path(), "new", true, &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    old.signal("QUIT");
    let status = old.wait_exit(Duration::from_secs(20));
    assert!(
        status.success(),
        "the old process exits cleanly: {status:?}"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = client_loop.await.expect("loop");
    assert!(
        failed.is_empty(),
        "{} failed of {}: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );
    assert!(ok > 50, "only {ok} requests made");
    // The new process serves on its own now.
    assert_eq!(
        post_image(&url, "alpha-key", "a.jpg", &distinct(100))
            .await
            .status,
        200
    );
    assert!(client()
        .get(format!("http://{}/healthz", cfg.admin_listen))
        .send()
        .await
        .is_ok());
    // Waiting for the hand-over is the normal course of an upgrade, not an error; and no
    // line carries a source path of the machine the binary was built on.
    let log = new.log();
    assert!(
        log.contains("waiting for the running process to hand over its sockets"),
        "{log}"
    );
    assert!(!log.contains("ERROR"), "{log}");
    assert!(
        !log.contains(".cargo/registry") && !log.contains(".rs:"),
        "{log}"
    );
    drop(new);
}

/// One upload on a connection of its own: the status, or why there was none.
async fn send_once(url: &str, key: &str, image: Vec<u8>) -> Result<u16, String> {
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    c.post(format!("{url}{ROUTE}"))
        .header("Authorization", format!("Bearer {key}"))
        .header("Content-Type", multipart_ct())
        .body(multipart(&[Part::image("a.jpg", &image)]))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

/// A budget holds through a zero-downtime upgrade on one host (the local state file): calls the
/// old process has at the provider, and its counts, are seen by the new one from its first
/// claim, and a budget with room is not refused while both serve. The provider is slow (7 s), so
/// the old process's calls are still in flight after it stopped accepting (5 s after SIGQUIT),
/// when every new connection reaches the new process.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_never_overshoots_a_budget() {
    let emu = start_emulator();
    emu.set_latency(Duration::from_millis(7000));
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("budgets.json");
    let builder = TestGateway::for_emulator(&emu)
        .set("server.grace_period", "\"15s\"")
        .set("upstream.total_timeout", "\"10s\"")
        .set(
            "budgets.state_file",
            &format!("{:?}", state.display().to_string()),
        )
        .tenant_set("alpha", "daily_budget", "4")
        .tenant_set("beta", "daily_budget", "3");
    let cfg = builder.config();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, builder.toml()).expect("write");
    let mut old = GatewayProcess::spawn(&path, dir.path(), "old", false, &[]);
    wait_listening(&cfg).await;
    let url = format!("http://{}", cfg.listen);
    let send = |key: &'static str, n: u64| {
        let url = url.clone();
        tokio::spawn(async move { (key, send_once(&url, key, distinct(n)).await) })
    };

    // alpha's whole budget at the provider, through the old process.
    let mut calls: Vec<_> = (0..4).map(|n| send("alpha-key", n)).collect();
    let until = Instant::now() + Duration::from_secs(5);
    while emu.stats().in_flight < 4 {
        assert!(
            Instant::now() < until,
            "the calls never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let new = GatewayProcess::spawn(&path, dir.path(), "new", true, &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    old.signal("QUIT");
    // While both processes accept: beta's budget has room for three, alpha's for none.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    calls.extend((10..13).map(|n| send("beta-key", n)));
    calls.extend((20..23).map(|n| send("alpha-key", n)));
    // Once the old one has stopped accepting: the new one alone takes new connections, while
    // the old one's calls are still at the provider.
    tokio::time::sleep(Duration::from_millis(5000)).await;
    calls.extend((30..33).map(|n| send("alpha-key", n)));
    calls.push(send("beta-key", 40));
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.expect("task"));
    }
    assert!(old.wait_exit(Duration::from_secs(20)).success());
    assert!(
        old.log().contains("handing over"),
        "the old process counts through the journal from the upgrade signal: {}",
        old.log()
    );
    let of = |key: &str, status: u16| {
        answers
            .iter()
            .filter(|(k, r)| *k == key && r.as_ref().ok() == Some(&status))
            .count()
    };
    let billable = emu.stats().billable;
    assert!(
        answers.iter().all(|(_, r)| matches!(r, Ok(200) | Ok(429))),
        "every client gets an answer, a verdict or budget_exhausted: {answers:?}"
    );
    assert_eq!(
        (of("alpha-key", 200), of("beta-key", 200), billable),
        (4, 3, 7),
        "alpha's budget is 4 and beta's 3; the provider billed {billable}: {answers:?}"
    );

    // The counts after the upgrade are exact: in the new process, and in the file.
    for key in ["alpha-key", "beta-key"] {
        assert_eq!(send_once(&url, key, distinct(50)).await, Ok(429), "{key}");
    }
    let mut new = new;
    new.signal("TERM");
    assert!(new.wait_exit(Duration::from_secs(20)).success());
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).expect("state")).expect("json");
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(saved["tenants"]["alpha"]["days"][&today], 4, "{saved}");
    assert_eq!(saved["tenants"]["beta"]["days"][&today], 3, "{saved}");
    assert_eq!(emu.stats().billable, 7);
}

/// Two processes on one state file without an upgrade signal (a second gateway on other ports):
/// the first counts through the journal from its next flush, once it sees the second's slot
/// taken, and the second admits nothing until then; together they give the budget exactly.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_on_the_state_file_shares_its_budgets() {
    let emu = start_emulator();
    emu.set_latency(Duration::from_millis(3000));
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("budgets.json");
    let builder = TestGateway::for_emulator(&emu)
        .set(
            "budgets.state_file",
            &format!("{:?}", state.display().to_string()),
        )
        .tenant_set("alpha", "daily_budget", "3");
    let (_first, a) = GatewayProcess::start_named(&builder, dir.path(), "first", &[]).await;
    let a = format!("http://{}", a.listen);
    let held: Vec<_> = (0..2)
        .map(|n| {
            let a = a.clone();
            tokio::spawn(async move { send_once(&a, "alpha-key", distinct(n)).await })
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(5);
    while emu.stats().in_flight < 2 {
        assert!(
            Instant::now() < until,
            "the calls never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_second, b) =
        GatewayProcess::start_named(&builder.replica(), dir.path(), "second", &[]).await;
    let b = format!("http://{}", b.listen);
    let third = send_once(&b, "alpha-key", distinct(2)).await;
    let fourth = send_once(&b, "alpha-key", distinct(3)).await;
    let fifth = send_once(&a, "alpha-key", distinct(4)).await;
    assert_eq!((third, fourth, fifth), (Ok(200), Ok(429), Ok(429)));
    for h in held {
        assert_eq!(h.await.expect("task"), Ok(200));
    }
    assert_eq!(emu.stats().billable, 3);
}

/// An old process that dies during an upgrade (SIGKILL while it drains) leaves no hold behind:
/// while it lives its calls in flight take the budget's room, and once it is gone they do not.
#[tokio::test(flavor = "multi_thread")]
async fn a_process_killed_during_an_upgrade_leaves_no_hold() {
    let emu = start_emulator();
    emu.set_latency(Duration::from_millis(4000));
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("budgets.json");
    let builder = TestGateway::for_emulator(&emu)
        .set("server.grace_period", "\"15s\"")
        .set("upstream.total_timeout", "\"10s\"")
        .set(
            "budgets.state_file",
            &format!("{:?}", state.display().to_string()),
        )
        .tenant_set("alpha", "daily_budget", "2");
    let cfg = builder.config();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, builder.toml()).expect("write");
    let mut old = GatewayProcess::spawn(&path, dir.path(), "old", false, &[]);
    wait_listening(&cfg).await;
    let url = format!("http://{}", cfg.listen);
    let cut: Vec<_> = (0..2)
        .map(|n| {
            let url = url.clone();
            tokio::spawn(async move { send_once(&url, "alpha-key", distinct(n)).await })
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(5);
    while emu.stats().in_flight < 2 {
        assert!(
            Instant::now() < until,
            "the calls never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut new = GatewayProcess::spawn(&path, dir.path(), "new", true, &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    old.signal("QUIT");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(send_once(&url, "alpha-key", distinct(10)).await, Ok(429));
    old.signal("KILL");
    old.wait_exit(Duration::from_secs(5));
    for c in cut {
        assert!(c.await.expect("task").is_err(), "cut with the process");
    }
    emu.set_latency(Duration::ZERO);
    assert_eq!(send_once(&url, "alpha-key", distinct(11)).await, Ok(200));
    assert_eq!(send_once(&url, "alpha-key", distinct(12)).await, Ok(200));
    assert_eq!(send_once(&url, "alpha-key", distinct(13)).await, Ok(429));
    new.signal("TERM");
    assert!(new.wait_exit(Duration::from_secs(20)).success());
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).expect("state")).expect("json");
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(saved["tenants"]["alpha"]["days"][&today], 2, "{saved}");
    assert!(
        !dir.path().join("budgets.json.journal").exists(),
        "the journal went into the state file"
    );
}

/// The new process of an upgrade stopped before the old one is gone (a rollback): the old one,
/// the last on the state file when it exits, adds the journal's counts to it.
#[tokio::test(flavor = "multi_thread")]
async fn the_last_process_of_an_upgrade_folds_the_journal_whichever_stops_first() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("budgets.json");
    let builder = TestGateway::for_emulator(&emu)
        .set("server.grace_period", "\"15s\"")
        .set("server.shutdown_delay", "\"0s\"")
        .set(
            "budgets.state_file",
            &format!("{:?}", state.display().to_string()),
        )
        .tenant_set("alpha", "daily_budget", "100");
    let cfg = builder.config();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, builder.toml()).expect("write");
    let mut old = GatewayProcess::spawn(&path, dir.path(), "old", false, &[]);
    wait_listening(&cfg).await;
    let url = format!("http://{}", cfg.listen);
    let mut new = GatewayProcess::spawn(&path, dir.path(), "new", true, &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    old.signal("QUIT");
    // The new one is up (it counts through the journal) and handles its signals.
    let until = Instant::now() + Duration::from_secs(10);
    while !new.log().contains("counting through its journal") {
        assert!(Instant::now() < until, "{}", new.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 0..6 {
        assert_eq!(send_once(&url, "alpha-key", distinct(n)).await, Ok(200));
    }
    new.signal("TERM");
    let exit = new.wait_exit(Duration::from_secs(20));
    assert!(exit.success(), "{exit:?}: {}", new.log());
    assert!(old.wait_exit(Duration::from_secs(20)).success());
    assert_eq!(emu.stats().billable, 6);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).expect("state")).expect("json");
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(saved["tenants"]["alpha"]["days"][&today], 6, "{saved}");
    assert!(
        !dir.path().join("budgets.json.journal").exists(),
        "the journal went into the state file"
    );
}

/// A fast stop (SIGINT) with a budget's calls at the provider: they are settled before the
/// process goes (their clients get their verdicts), no new call starts meanwhile, and the
/// process started next on the state file finds the budget spent.
#[tokio::test(flavor = "multi_thread")]
async fn a_fast_stop_settles_the_calls_at_the_provider_first() {
    let emu = start_emulator();
    emu.set_latency(Duration::from_millis(2500));
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("budgets.json");
    let builder = TestGateway::for_emulator(&emu)
        .set("upstream.total_timeout", "\"10s\"")
        .set(
            "budgets.state_file",
            &format!("{:?}", state.display().to_string()),
        )
        .tenant_set("alpha", "daily_budget", "3");
    let cfg = builder.config();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, builder.toml()).expect("write");
    let mut first = GatewayProcess::spawn(&path, dir.path(), "first", false, &[]);
    wait_listening(&cfg).await;
    let url = format!("http://{}", cfg.listen);
    let calls: Vec<_> = (0..3)
        .map(|n| {
            let url = url.clone();
            tokio::spawn(async move { send_once(&url, "beta-key", distinct(100 + n)).await })
        })
        .chain((0..3).map(|n| {
            let url = url.clone();
            tokio::spawn(async move { send_once(&url, "alpha-key", distinct(n)).await })
        }))
        .collect();
    let until = Instant::now() + Duration::from_secs(5);
    while emu.stats().in_flight < 6 {
        assert!(
            Instant::now() < until,
            "the calls never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.signal("INT");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Sent while the stop waits: refused, not called.
    let late = send_once(&url, "beta-key", distinct(200)).await;
    assert!(matches!(late, Ok(503) | Err(_)), "{late:?}");
    assert!(first.wait_exit(Duration::from_secs(20)).success());
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.expect("task"));
    }
    assert!(
        answers.iter().all(|r| r == &Ok(200)),
        "the calls at the provider are answered: {answers:?}"
    );
    assert_eq!(emu.stats().billable, 6, "no call after the signal");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).expect("state")).expect("json");
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(saved["tenants"]["alpha"]["days"][&today], 3, "{saved}");

    emu.set_latency(Duration::ZERO);
    let mut next = GatewayProcess::spawn(&path, dir.path(), "next", false, &[]);
    wait_listening(&cfg).await;
    assert_eq!(send_once(&url, "alpha-key", distinct(10)).await, Ok(429));
    assert_eq!(
        emu.stats().billable,
        6,
        "the budget of 3 holds across the stop"
    );
    next.signal("TERM");
    assert!(next.wait_exit(Duration::from_secs(20)).success());
}

/// A second `serve` on busy ports exits at once, non-zero, with one line that names the address;
/// the first one's pid file holds its pid while it runs and is gone once it stopped.
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_port_fails_fast_and_the_pid_file_comes_and_goes() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let (mut first, cfg) =
        GatewayProcess::start(&TestGateway::for_emulator(&emu), dir.path(), &[]).await;
    let pid_file = dir.path().join("gw.pid");
    let written = std::fs::read_to_string(&pid_file).expect("pid file");
    assert_eq!(written.trim(), first.child.0.id().to_string());

    let started = Instant::now();
    let mut second = GatewayProcess::spawn(
        &dir.path().join("gateway.toml"),
        dir.path(),
        "second",
        false,
        &[],
    );
    let status = second.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "the second process must fail");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it failed fast: {:?}",
        started.elapsed()
    );
    let err = std::fs::read_to_string(&second.stderr).expect("stderr");
    assert!(
        err.contains(&format!("cannot listen on {}", cfg.listen)) && err.contains("server.listen"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    first.signal("TERM");
    assert!(first.wait_exit(Duration::from_secs(20)).success());
    assert!(!pid_file.exists(), "the pid file is removed at exit");
}

/// `check-config` reports every problem at once: a listener clash, two key sources, deadlines
/// that contradict each other, a zero budget, a budget with no state file.
#[test]
fn check_config_reports_every_problem_of_a_file() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[server]
listen = "0.0.0.0:8080"
admin_listen = "127.0.0.1:8080"
treads = 4
[upstream]
url = "http://127.0.0.1:8081"
api_key_env = "K"
api_key_file = "/run/k"
read_timeout = "30s"
total_timeout = "10s"
[[tenants]]
id = "a"
key_sha256 = ["0000000000000000000000000000000000000000000000000000000000000000"]
daily_budget = 0
"#,
    )
    .expect("write");
    let (ok, text) = check_offline(&path);
    assert!(!ok);
    for expected in [
        "server.admin_listen: 127.0.0.1:8080 clashes with server.listen",
        "set api_key_env or api_key_file, not both",
        "upstream.total_timeout: 10s is shorter than upstream.read_timeout",
        "tenants[0].daily_budget: 0 would refuse every call",
        // A typo does not hide the rest, and says where it is.
        "server.treads: unknown key (line 5)",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // A budget needs a state file: reported once the rest is right.
    std::fs::write(
        &path,
        r#"
[upstream]
url = "http://127.0.0.1:8081"
api_key_env = "K"
[[tenants]]
id = "a"
key_sha256 = ["0000000000000000000000000000000000000000000000000000000000000000"]
daily_budget = 10
"#,
    )
    .expect("write");
    let (ok, text) = check_offline(&path);
    assert!(!ok && text.contains("budgets.state_file"), "{text}");
}

/// `check-config --memory-limit`: a config whose bodies, cache, connections and process may
/// hold more than a container's limit is refused, each term named; one that fits says how much
/// it may hold. Over HTTP/2 (h2c here) each connection may hold its flow-control window too.
#[test]
fn check_config_holds_a_config_to_a_memory_limit() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("gateway.toml");
    // One conversion worker (its default, one per core, depends on the machine that checks).
    let base = r#"
[intake.convert]
workers = 1
[upstream]
url = "http://127.0.0.1:8081"
api_key_env = "K"
[[tenants]]
id = "a"
key_sha256 = ["0000000000000000000000000000000000000000000000000000000000000000"]
"#;
    let run = |config: &str, limit: &str| {
        std::fs::write(&path, config).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_liveness-gateway"))
            .args(["check-config", "--offline", "--memory-limit", limit, "-c"])
            .arg(&path)
            .output()
            .expect("run");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // The defaults: 256 MiB of bodies, a 64 MiB cache, 10,000 connections, a conversion of
    // 25 megapixels, the process.
    let (ok, text) = run(base, "256Mi");
    assert!(!ok, "{text}");
    assert!(
        text.contains("memory: the process may hold up to 1280 MiB (bodies 256 + cache 64 + connections 625 + conversions 239 + process 96), over the limit of 256 MiB"),
        "{text}"
    );
    let (ok, text) = run(base, "1300Mi");
    assert!(ok && text.contains("memory: up to 1280 MiB"), "{text}");
    let sized = format!(
        "[server]\nmax_connections = 2048\n[intake]\nmax_buffered_bytes = 134217728\nmax_unauthenticated_buffered_bytes = 16777216\n{}",
        base.replace("workers = 1\n", "workers = 1\nmax_pixels = 13000000\n")
    );
    let (ok, text) = run(&sized, "640Mi");
    assert!(ok && text.contains("up to 540 MiB"), "{text}");
    let h2c = sized.replace("[server]\n", "[server]\nh2c = true\n");
    let (ok, text) = run(&h2c, "640Mi");
    assert!(!ok && text.contains("connections 2176"), "{text}");
    let off = base.replace("workers = 1\n", "formats = []\n");
    let (ok, text) = run(&off, "1100Mi");
    assert!(
        ok && text.contains("up to 1041 MiB") && text.contains("conversions 0"),
        "{text}"
    );
    // Units are bytes or binary ones: "512M" means different things to Kubernetes and Docker.
    let (ok, text) = run(base, "512M");
    assert!(!ok && text.contains("binary unit"), "{text}");
}

/// `check-config --offline` on a file: whether it passed, and what it printed.
fn check_offline(path: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_liveness-gateway"))
        .args(["check-config", "--offline", "-c"])
        .arg(path)
        .output()
        .expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

/// `keys new` refuses a bad id, writes the secret to stderr (or a 0600 file) and only the
/// tenant's lines to stdout; `keys hash` digests a key from stdin.
#[test]
fn keys_tooling_keeps_the_secret_out_of_stdout() {
    let bin = env!("CARGO_BIN_EXE_liveness-gateway");
    let bad = std::process::Command::new(bin)
        .args(["keys", "new", "--tenant", "bad id!"])
        .output()
        .expect("run");
    assert!(!bad.status.success());
    let out = std::process::Command::new(bin)
        .args(["keys", "new", "--tenant", "mobile-app"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let key = stderr.trim().rsplit(' ').next().expect("key").to_string();
    assert!(
        key.starts_with("lgk_") && !stdout.contains(&key),
        "{stdout}"
    );
    let table: toml::Table = stdout.parse().expect("stdout is TOML");
    let t = &table["tenants"].as_array().expect("tenants")[0];
    assert_eq!(t["id"].as_str(), Some("mobile-app"));
    assert_eq!(t["key_sha256"][0].as_str(), Some(digest_of(&key).as_str()));

    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("key");
    let out = std::process::Command::new(bin)
        .args(["keys", "new", "--tenant", "t2", "--key-file"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(out.status.success());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).expect("file").permissions().mode() & 0o777,
        0o600
    );
    let saved = std::fs::read_to_string(&file)
        .expect("key")
        .trim()
        .to_string();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&digest_of(&saved)));

    let mut hash = std::process::Command::new(bin)
        .args(["keys", "hash"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    hash.stdin
        .take()
        .expect("stdin")
        .write_all(b"alpha-key\n")
        .expect("write");
    let out = hash.wait_with_output().expect("wait");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        digest_of("alpha-key")
    );
}

/// Admin actions leave an audit line and a count; usage can be asked for one tenant; a purge
/// says how many entries it removed.
#[tokio::test(flavor = "multi_thread")]
async fn admin_actions_are_audited_and_answer_precisely() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let builder = TestGateway::for_emulator(&emu)
        .set("server.log_format", "\"json\"")
        .set(
            "budgets.state_file",
            &format!("{:?}", dir.path().join("budgets.json")),
        )
        .tenant_set("alpha", "daily_budget", "3");
    let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
    let (url, admin) = (
        format!("http://{}", cfg.listen),
        format!("http://{}", cfg.admin_listen),
    );
    for n in 0..3 {
        post_image(&url, "alpha-key", "a.jpg", &distinct(n)).await;
    }
    // The budget is used up; a refund of two calls gives exactly two back.
    let a = post_image(&url, "alpha-key", "a.jpg", &distinct(10)).await;
    assert_eq!(a.code(), "budget_exhausted");
    let adjust = |q: &str| {
        client()
            .post(format!("{admin}/admin/usage/adjust?{q}"))
            .send()
    };
    let r = adjust("tenant=alpha&delta=-2&reason=provider-refund-4711")
        .await
        .expect("adjust");
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["daily"]["used"], 1, "{body}");
    assert_eq!(body["monthly"]["used"], 1, "{body}");
    assert_eq!(
        (&body["clamped"], &body["daily"]["applied"]),
        (&false.into(), &(-2).into())
    );
    for n in 11..13 {
        assert_eq!(
            post_image(&url, "alpha-key", "a.jpg", &distinct(n))
                .await
                .status,
            200
        );
    }
    let a = post_image(&url, "alpha-key", "a.jpg", &distinct(13)).await;
    assert_eq!(a.code(), "budget_exhausted");
    // A refund larger than the count stops at zero, and says so.
    let body: serde_json::Value = adjust("tenant=alpha&delta=-5")
        .await
        .expect("adjust")
        .json()
        .await
        .expect("json");
    assert_eq!(body["clamped"], true, "{body}");
    assert_eq!(
        (&body["daily"]["used"], &body["daily"]["applied"]),
        (&0.into(), &(-3).into()),
        "{body}"
    );
    assert!(body["note"].as_str().is_some_and(|n| n.contains("zero")));
    adjust("tenant=alpha&delta=3").await.expect("adjust");
    for bad in ["tenant=alpha&delta=0", "tenant=alpha&delta=x", "delta=1"] {
        let r = adjust(bad).await.expect("adjust");
        assert_eq!(r.status(), 400, "{bad}");
        assert!(r.text().await.expect("t").contains("invalid_adjustment"));
    }
    assert_eq!(
        adjust("tenant=nobody&delta=1").await.expect("a").status(),
        404
    );
    let usage = admin_json(&admin, "/admin/usage?tenant=beta").await;
    let tenants = usage["tenants"].as_array().expect("tenants");
    assert_eq!(tenants.len(), 1);
    assert_eq!(tenants[0]["tenant"], "beta");
    assert_eq!(
        get_status(&format!("{admin}/admin/usage?tenant=nobody")).await,
        404
    );
    let purge: serde_json::Value = client()
        .delete(format!("{admin}/admin/cache?tenant=alpha"))
        .send()
        .await
        .expect("purge")
        .json()
        .await
        .expect("json");
    assert_eq!(purge["entries_purged"], 5, "{purge}");
    assert_eq!(purge["entries"], 0);
    let r = client()
        .post(format!("{admin}/admin/reload"))
        .send()
        .await
        .expect("reload");
    assert_eq!(r.status(), 200);
    let m = metrics_text(&admin).await;
    assert_eq!(
        sample(&m, r#"liveness_gateway_reloads_total{outcome="applied"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            &format!(
                r#"liveness_gateway_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let audit: Vec<serde_json::Value> = gw
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "audit")
        .collect();
    assert!(
        audit
            .iter()
            .any(|v| v["action"] == "cache_purge" && v["purged"] == 5),
        "{audit:?}"
    );
    assert!(
        audit.iter().any(|v| v["action"] == "usage_adjust"
            && v["tenant"] == "alpha"
            && v["delta"] == -2
            && v["reason"] == "provider-refund-4711"),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|v| v["action"] == "reload" && v["outcome"] == "applied"),
        "{audit:?}"
    );
}

/// The binary started on `builder`'s config (written to `dir`), caught as soon as it has
/// written its pid file, that is while it is still starting: the process and its config file.
fn spawn_until_pid_file(
    builder: &TestGateway,
    dir: &std::path::Path,
) -> (GatewayProcess, std::path::PathBuf) {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, builder.toml()).expect("write");
    let gw = GatewayProcess::spawn(&path, dir, "gw", false, &[]);
    let pid_file = dir.join("gw.pid");
    let until = Instant::now() + Duration::from_secs(20);
    while !pid_file.exists() {
        assert!(Instant::now() < until, "no pid file");
        std::thread::sleep(Duration::from_millis(1));
    }
    (gw, path)
}

/// A SIGHUP while the process starts (a tool that restarts the gateway, then asks it to
/// reload) does not stop it. From the moment its pid file is there, SIGHUP is taken, not fatal
/// (its default action), though the maintenance service that reloads starts later.
#[tokio::test(flavor = "multi_thread")]
async fn a_hangup_while_starting_does_not_stop_the_process() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let builder = TestGateway::for_emulator(&emu);
    let cfg = builder.config();
    let (mut gw, _) = spawn_until_pid_file(&builder, dir.path());
    let until = Instant::now() + Duration::from_secs(20);
    // Hangups from then on, through the start, until it has served for a moment.
    let mut sent = 0;
    let mut serving_since: Option<Instant> = None;
    while serving_since.is_none_or(|t| t.elapsed() < Duration::from_millis(300)) {
        if let Ok(Some(status)) = gw.child.0.try_wait() {
            panic!("stopped ({status}) after {sent} SIGHUPs:\n{}", gw.log());
        }
        gw.signal("HUP");
        sent += 1;
        if serving_since.is_none() && TcpStream::connect(cfg.listen).is_ok() {
            serving_since = Some(Instant::now());
        }
        assert!(Instant::now() < until, "never listened");
        std::thread::sleep(Duration::from_millis(2));
    }
    let url = format!("http://{}", cfg.listen);
    let a = post_image(&url, "alpha-key", "a.jpg", &distinct(1)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(gw.child.0.try_wait().ok().flatten().is_none());
}

/// A config file changed while the process starts (after it was read, before the watcher runs)
/// is applied once the process is up: the watcher compares with what was loaded, not with what
/// it first sees.
#[tokio::test(flavor = "multi_thread")]
async fn a_config_changed_while_starting_is_applied() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let builder = TestGateway::for_emulator(&emu).set("server.watch_config", "true");
    let cfg = builder.config();
    let (_gw, path) = spawn_until_pid_file(&builder, dir.path());
    let with_gamma = format!(
        "{}\n[[tenants]]\nid = \"gamma\"\nkey_sha256 = [\"{}\"]\n",
        builder.toml(),
        digest_of("gamma-key")
    );
    replace_file(&path, &with_gamma);
    wait_listening(&cfg).await;
    let url = format!("http://{}", cfg.listen);
    let until = Instant::now() + Duration::from_secs(10);
    while post_image(&url, "gamma-key", "a.jpg", &distinct(1))
        .await
        .status
        != 200
    {
        assert!(
            Instant::now() < until,
            "the change made while starting was never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A config change reaches the process without a signal: a Kubernetes ConfigMap update (the
/// file is a symlink into a folder that is swapped whole), then an invalid edit that is refused
/// while the last good config stays in force, then a good edit again.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_config_file_is_reloaded_all_or_nothing() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let builder = TestGateway::for_emulator(&emu)
        .set("server.watch_config", "true")
        .set("server.log_format", "\"json\"");
    let cfg = builder.config();
    // The layout kubelet makes: gateway.toml -> ..data/gateway.toml, ..data -> ..v1.
    let (v1, v2) = (dir.path().join("..v1"), dir.path().join("..v2"));
    std::fs::create_dir(&v1).expect("v1");
    std::fs::create_dir(&v2).expect("v2");
    std::fs::write(v1.join("gateway.toml"), builder.toml()).expect("write");
    std::os::unix::fs::symlink("..v1", dir.path().join("..data")).expect("data");
    let path = dir.path().join("gateway.toml");
    std::os::unix::fs::symlink("..data/gateway.toml", &path).expect("link");
    let gw = GatewayProcess::spawn(&path, dir.path(), "gw", false, &[]);
    wait_listening(&cfg).await;
    let (url, admin) = (
        format!("http://{}", cfg.listen),
        format!("http://{}", cfg.admin_listen),
    );
    let gamma = |n| {
        let url = url.clone();
        async move {
            post_image(&url, "gamma-key", "a.jpg", &distinct(n))
                .await
                .status
        }
    };
    assert_eq!(gamma(1).await, 401);

    let with_gamma = format!(
        "{}\n[[tenants]]\nid = \"gamma\"\nkey_sha256 = [\"{}\"]\n",
        builder.toml(),
        digest_of("gamma-key")
    );
    std::fs::write(v2.join("gateway.toml"), &with_gamma).expect("write");
    // Swap the folder link atomically, as kubelet does.
    std::os::unix::fs::symlink("..v2", dir.path().join("..data_tmp")).expect("tmp");
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).expect("swap");
    let until = Instant::now() + Duration::from_secs(10);
    while gamma(2).await != 200 {
        assert!(
            Instant::now() < until,
            "the swapped ConfigMap was not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An invalid edit: refused, counted, and the config in force stays.
    replace_file(&v2.join("gateway.toml"), "this is = not [valid");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics_text(&admin).await;
        if sample(&m, r#"liveness_gateway_reloads_total{outcome="refused"}"#) >= 1.0 {
            break;
        }
        assert!(Instant::now() < until, "the invalid edit was not noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(gamma(3).await, 200, "the old config stays in force");

    // Fixed again, without gamma: applied.
    replace_file(&v2.join("gateway.toml"), &builder.toml());
    let until = Instant::now() + Duration::from_secs(10);
    while gamma(4).await != 401 {
        assert!(Instant::now() < until, "the fixed file was not reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = metrics_text(&admin).await;
    assert_eq!(
        sample(&m, r#"liveness_gateway_reloads_total{outcome="applied"}"#),
        2.0
    );
    assert_eq!(
        sample(&m, r#"liveness_gateway_reloads_total{outcome="refused"}"#),
        1.0
    );
    assert!(
        gw.log().contains("file change"),
        "the audit line names the trigger"
    );
}

/// Write a file whole or not at all (a temporary file renamed over it), as editors and kubelet
/// do: the watcher never sees it half-written.
fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// `healthcheck` (what the image and compose run, with no shell or curl): 0 while the gateway
/// is up and ready; with `--ready`, 1 once SIGTERM made it unready; 1 when nothing answers.
#[tokio::test(flavor = "multi_thread")]
async fn the_healthcheck_command_follows_health_and_readiness() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let builder = TestGateway::for_emulator(&emu).set("server.shutdown_delay", "\"3s\"");
    let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
    let check = |ready: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_liveness-gateway"));
        cmd.args(["healthcheck", "--admin", &cfg.admin_listen.to_string()]);
        if ready {
            cmd.arg("--ready");
        }
        cmd.output().expect("run")
    };
    assert!(check(false).status.success());
    assert!(check(true).status.success());
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let unready = check(true);
    assert!(!unready.status.success(), "ready during the shutdown delay");
    assert!(String::from_utf8_lossy(&unready.stderr).contains("HTTP 503"));
    assert!(check(false).status.success(), "still up while it drains");
    let nobody = std::process::Command::new(env!("CARGO_BIN_EXE_liveness-gateway"))
        .args([
            "healthcheck",
            "--admin",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .output()
        .expect("run");
    assert!(!nobody.status.success());
}

/// The reloads counted so far (applied and refused).
async fn reloads_counted(admin: &str) -> f64 {
    let m = metrics_text(admin).await;
    sample(&m, r#"liveness_gateway_reloads_total{outcome="applied"}"#)
        + sample(&m, r#"liveness_gateway_reloads_total{outcome="refused"}"#)
}

/// Reloads run in order, whatever starts them. While the file changes from A to B, an
/// `/admin/reload` that reads A (slow to read: a tenant with many keys) races the file watch,
/// and in every other round a SIGHUP sent once B is written; at the end of every round B is in
/// force: gamma, whose key only A has, is refused, and the round's own tenant, which only B
/// has, is served. Without the SIGHUP, the watch alone must bring B in after the slow reload.
#[tokio::test(flavor = "multi_thread")]
async fn racing_reloads_leave_the_newest_file_in_force() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let builder = TestGateway::for_emulator(&emu).set("server.watch_config", "true");
    let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
    let path = dir.path().join("gateway.toml");
    let (url, admin) = (
        format!("http://{}", cfg.listen),
        format!("http://{}", cfg.admin_listen),
    );
    // About 8 MB of key digests: reading A takes about a second in a debug build, B milliseconds.
    let padding: String = (0..120_000u32)
        .map(|i| format!("\"{}\",\n", sha256_hex(&i.to_be_bytes())))
        .collect();
    let rounds = 6u64;
    let mut outcomes = Vec::new();
    for round in 0..rounds {
        let a = format!(
            "{}\n[[tenants]]\nid = \"gamma\"\nkey_sha256 = [\n\"{}\",\n{padding}]\n",
            builder.toml(),
            digest_of("gamma-key")
        );
        let own_key = format!("round-{round}-key");
        let b = format!(
            "{}\n[[tenants]]\nid = \"round{round}\"\nkey_sha256 = [\"{}\"]\n",
            builder.toml(),
            digest_of(&own_key)
        );
        replace_file(&path, &a);
        let reload = tokio::spawn({
            let admin = admin.clone();
            async move { admin_reload(&admin).await }
        });
        // The admin reload is reading A when B replaces it and the SIGHUP comes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        replace_file(&path, &b);
        let hup = round % 2 == 0;
        if hup {
            gw.signal("HUP");
        }
        let admin_status = reload.await.expect("reload");
        // Settled: no reload counted for 3 s, longer than a watch tick and the slowest read.
        let until = Instant::now() + Duration::from_secs(40);
        let (mut last, mut since) = (reloads_counted(&admin).await, Instant::now());
        while since.elapsed() < Duration::from_secs(3) {
            assert!(Instant::now() < until, "reloads never stopped");
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = reloads_counted(&admin).await;
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        let gamma = post_image(&url, "gamma-key", "a.jpg", &distinct(1000 + 2 * round)).await;
        let own = post_image(&url, &own_key, "a.jpg", &distinct(1001 + 2 * round)).await;
        outcomes.push((round, hup, admin_status, gamma.status, own.status));
    }
    let stale = outcomes
        .iter()
        .filter(|(.., gamma, own)| (*gamma, *own) != (401, 200))
        .count();
    assert_eq!(
        stale, 0,
        "A stayed in force in {stale} of {rounds} rounds; (round, SIGHUP sent, /admin/reload's \
         status, gamma's status, the round tenant's status): {outcomes:?}"
    );
}

/// An instance finds its files relative to its config file, wherever it is started from; its
/// pid file and upgrade socket are its config's own unless given (two instances of different
/// configs run side by side), a pid file a running gateway holds is refused, and
/// `healthcheck -c FILE` asks the admin listener the file names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_has_files_of_its_own_and_finds_them_beside_its_config() {
    let emu = start_emulator();
    let (one, two) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let write = |dir: &std::path::Path| {
        let builder = TestGateway::for_emulator(&emu);
        let text = builder.toml().replace(
            &format!("api_key_env = \"{ORG_KEY_ENV}\""),
            "api_key_file = \"secrets/org.key\"",
        );
        std::fs::create_dir(dir.join("secrets")).expect("dir");
        std::fs::write(dir.join("secrets/org.key"), ORG_KEY).expect("key");
        let text = format!("{text}\n[budgets]\nstate_file = \"budgets.json\"\n");
        std::fs::write(dir.join("gateway.toml"), text).expect("config");
        builder.config()
    };
    // The first instance runs from a renamed copy of the binary (an upgrade installs the new one
    // beside the old): a pid file's guard may not depend on the name.
    let renamed = one.path().join("liveness-gateway.next");
    std::fs::copy(env!("CARGO_BIN_EXE_liveness-gateway"), &renamed).expect("copy");
    let bin = |dir: &std::path::Path| {
        if dir == one.path() {
            renamed.clone()
        } else {
            env!("CARGO_BIN_EXE_liveness-gateway").into()
        }
    };
    let start = |dir: &std::path::Path, name: &str, extra: &[&str]| {
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
        let child = std::process::Command::new(bin(dir))
            .args(["serve", "-c"])
            .arg(dir.join("gateway.toml"))
            .args(extra)
            .current_dir("/")
            .env_remove(ORG_KEY_ENV)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("gateway");
        KillOnDrop(child)
    };
    let healthy = |dir: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_liveness-gateway"))
            .args(["healthcheck", "-c"])
            .arg(dir.join("gateway.toml"))
            .current_dir("/")
            .output()
            .expect("healthcheck")
            .status
            .success()
    };
    let (cfg_one, cfg_two) = (write(one.path()), write(two.path()));
    let first = start(one.path(), "gw0", &[]);
    wait_listening(&cfg_one).await;
    wait_ready(cfg_one.admin_listen).await;
    let answer = post_image(
        &format!("http://{}", cfg_one.listen),
        "alpha-key",
        "a.jpg",
        &distinct(1),
    )
    .await;
    assert_eq!(answer.status, 200, "the key read from beside the config");
    assert!(
        healthy(one.path()),
        "healthcheck -c FILE asks its admin listener"
    );
    // Only the admin address is read: a bad edit (refused by a reload) does not make a running
    // gateway unhealthy, nor does a file that is not even TOML.
    let broken = one.path().join("broken");
    std::fs::create_dir(&broken).expect("dir");
    for (n, tail) in ["[upstream]\nurl = 5\n", "[upstream\nurl = = 5\n"]
        .iter()
        .enumerate()
    {
        let text = format!(
            "[server]\nadmin_listen = \"{}\"\n{tail}",
            cfg_one.admin_listen
        );
        std::fs::write(broken.join("gateway.toml"), text).expect("write");
        assert!(healthy(&broken), "case {n}");
    }
    // Probes may ask with HEAD.
    for path in ["/healthz", "/readyz"] {
        let r = client()
            .head(format!("http://{}{path}", cfg_one.admin_listen))
            .send()
            .await
            .expect("head");
        assert_eq!(r.status(), 200, "HEAD {path}");
    }
    assert!(!healthy(two.path()), "the other one is not up yet");
    let log = std::fs::read_to_string(one.path().join("gw0.log")).expect("log");
    let pid_file = log
        .split("pid_file=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the pid file is logged")
        .to_string();
    assert!(pid_file.contains("liveness-gateway-"), "{pid_file}");

    // Another config's instance beside it, on its own files; given the first one's pid file,
    // it is refused at once.
    let mut clash = start(two.path(), "clash", &["--pid-file", &pid_file]);
    let status = clash.0.wait().expect("exit");
    assert!(!status.success());
    let err = std::fs::read_to_string(two.path().join("clash.log")).expect("log");
    assert!(err.contains("held by a running gateway"), "{err}");
    // A pid file that is a link is never written through.
    let victim = two.path().join("victim.txt");
    std::fs::write(&victim, "precious").expect("victim");
    let link = two.path().join("link.pid");
    std::os::unix::fs::symlink(&victim, &link).expect("link");
    let link_arg = link.display().to_string();
    let mut linked = start(two.path(), "linked", &["--pid-file", &link_arg]);
    assert!(!linked.0.wait().expect("exit").success());
    let err = std::fs::read_to_string(two.path().join("linked.log")).expect("log");
    assert!(err.contains("cannot open the pid file"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious"
    );
    let second = start(two.path(), "gw0", &[]);
    wait_listening(&cfg_two).await;
    wait_ready(cfg_two.admin_listen).await;
    assert!(healthy(two.path()) && healthy(one.path()));
    let answer = post_image(
        &format!("http://{}", cfg_two.listen),
        "alpha-key",
        "a.jpg",
        &distinct(2),
    )
    .await;
    assert_eq!(answer.status, 200);
    let log = std::fs::read_to_string(two.path().join("gw0.log")).expect("log");
    assert!(!log.contains(&pid_file), "a pid file of its own: {log}");

    for (gw, dir) in [(first, one.path()), (second, two.path())] {
        let pid = gw.0.id().to_string();
        assert!(std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success());
        let mut gw = gw;
        assert!(gw.0.wait().expect("exit").success());
        assert!(
            dir.join("budgets.json").exists(),
            "the state file beside the config"
        );
        assert!(!healthy(dir));
    }
    assert!(!std::path::Path::new(&pid_file).exists(), "removed at exit");
}

/// `tenants_dir`: the teams' files join the config, and the folder is watched with it. A file
/// added is a tenant served; a broken file refuses the whole change (a good file added with it
/// is not applied either), named by its file and line in the log and by `check-config`; a
/// file removed is a tenant gone; `keys new`'s block is such a file as printed.
#[tokio::test(flavor = "multi_thread")]
async fn a_folder_of_tenant_files_is_watched_and_reloaded_all_or_nothing() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let builder = TestGateway::for_emulator(&emu)
        .set("server.watch_config", "true")
        .set("server.log_format", "\"json\"");
    let cfg = builder.config();
    let folder = dir.path().join("tenants.d");
    std::fs::create_dir(&folder).expect("folder");
    let team = |id: &str, key: &str| {
        format!(
            "[[tenants]]\nid = \"{id}\"\nkey_sha256 = [\"{}\"]\n",
            digest_of(key)
        )
    };
    replace_file(&folder.join("gamma.toml"), &team("gamma", "gamma-key"));
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        format!("tenants_dir = \"tenants.d\"\n{}", builder.toml()),
    )
    .expect("write");
    let gw = GatewayProcess::spawn(&path, dir.path(), "gw", false, &[]);
    wait_listening(&cfg).await;
    let (url, admin) = (
        format!("http://{}", cfg.listen),
        format!("http://{}", cfg.admin_listen),
    );
    let status = |key: &'static str, n: u64| {
        let url = url.clone();
        async move { post_image(&url, key, "a.jpg", &distinct(n)).await.status }
    };
    assert_eq!(status("gamma-key", 1).await, 200, "read at start");
    assert_eq!(
        status("alpha-key", 2).await,
        200,
        "the main file's tenants too"
    );

    // A good file and a broken one in one change: neither is applied.
    replace_file(&folder.join("delta.toml"), &team("delta", "delta-key"));
    let broken = format!(
        "{}rate_per_second = \"fast\"\n",
        team("epsilon", "epsilon-key")
    );
    replace_file(&folder.join("epsilon.toml"), &broken);
    let until = Instant::now() + Duration::from_secs(10);
    while reloads_refused(&admin).await < 1.0 {
        assert!(Instant::now() < until, "the broken file was not noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status("delta-key", 3).await, 401, "all or nothing");
    assert_eq!(
        status("gamma-key", 4).await,
        200,
        "the config in force stays"
    );
    let log = gw.log();
    let named = format!("{}: tenants[0]", folder.join("epsilon.toml").display());
    assert!(
        log.contains(&named) && log.contains("(line 4)"),
        "the refusal names the file and line: {log}"
    );
    let (ok, said) = check_config(&path, false);
    assert!(
        !ok && said.contains(&named) && said.contains("(line 4)"),
        "{said}"
    );

    // The broken file removed: the good one is applied.
    std::fs::remove_file(folder.join("epsilon.toml")).expect("rm");
    let until = Instant::now() + Duration::from_secs(10);
    while status("delta-key", 5).await != 200 {
        assert!(Instant::now() < until, "the fixed folder was not reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A team's file changed in place: its new key is served, the old one refused.
    replace_file(&folder.join("delta.toml"), &team("delta", "delta-key-2"));
    let until = Instant::now() + Duration::from_secs(10);
    while status("delta-key-2", 8).await != 200 {
        assert!(Instant::now() < until, "the changed file was not reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status("delta-key", 9).await, 401);

    // A team's file removed: its tenant is gone.
    std::fs::remove_file(folder.join("gamma.toml")).expect("rm");
    let until = Instant::now() + Duration::from_secs(10);
    while status("gamma-key", 6).await != 401 {
        assert!(Instant::now() < until, "the removed file was not noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The main file pointed at a new folder holding a broken file: refused; the broken file
    // fixed in that folder (the config in force still names the old one): applied.
    let refused = reloads_refused(&admin).await;
    let other = dir.path().join("teams2.d");
    std::fs::create_dir(&other).expect("folder");
    replace_file(&other.join("eta.toml"), &broken.replace("epsilon", "eta"));
    replace_file(
        &path,
        &format!("tenants_dir = \"teams2.d\"\n{}", builder.toml()),
    );
    let until = Instant::now() + Duration::from_secs(10);
    while reloads_refused(&admin).await <= refused {
        assert!(
            Instant::now() < until,
            "the new folder's broken file was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    replace_file(&other.join("eta.toml"), &team("eta", "eta-key"));
    let until = Instant::now() + Duration::from_secs(10);
    while status("eta-key", 10).await != 200 {
        assert!(
            Instant::now() < until,
            "the fix in the new folder was not applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status("delta-key-2", 11).await,
        401,
        "the old folder is no longer read"
    );
    let folder = other;

    // `keys new` prints a block that is a team's file as it is.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_liveness-gateway"))
        .args(["keys", "new", "--tenant", "zeta"])
        .output()
        .expect("keys new");
    assert!(out.status.success());
    let key = String::from_utf8_lossy(&out.stderr)
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_string();
    replace_file(
        &folder.join("zeta.toml"),
        &String::from_utf8_lossy(&out.stdout),
    );
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let r = post_image(&url, &key, "a.jpg", &distinct(7)).await.status;
        if r == 200 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the new team's key was not served: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn reloads_refused(admin: &str) -> f64 {
    let m = metrics_text(admin).await;
    sample(&m, r#"liveness_gateway_reloads_total{outcome="refused"}"#)
}
