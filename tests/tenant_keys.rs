//! Tenant keys issued at runtime and grants, through the real binary: the admin API and the
//! `keys` command line, on a fleet of two replicas sharing Redis and on one host with its state
//! file, across a restart.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const ADMIN_TOKEN: &str = "admin-token-for-tenant-keys-0123456789";
const ADMIN_ENV: &str = "LG_KEYS_TEST_ADMIN_TOKEN";

fn with_admin(builder: TestGateway) -> TestGateway {
    builder
        .set("server.admin_token_env", &format!("\"{ADMIN_ENV}\""))
        .set("server.log_format", "\"json\"")
}

async fn admin(method: &str, url: &str, body: Option<Value>) -> Answer {
    let mut req = client()
        .request(method.parse().expect("method"), url)
        .bearer_auth(ADMIN_TOKEN);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let r = req.send().await.expect("admin");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.bytes().await.expect("body").to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

/// `liveness-gateway keys …` against an admin listener: (exit status, stdout, stderr).
fn cli(admin_url: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_liveness-gateway"))
        .arg("keys")
        .args(args)
        .env("LIVENESS_GATEWAY_ADMIN_URL", admin_url)
        .env("LIVENESS_GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("cli");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Poll a call with `key` on `url` until its status is `want`; how long it took.
async fn until_status(url: &str, key: &str, image: &[u8], want: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let a = post_image(url, key, "a.jpg", image).await;
        if a.status == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "still {} ({}) after {limit:?}, not {want}",
            a.status,
            a.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_keys_are_created_used_rotated_and_revoked_across_a_fleet() {
    let emu = start_emulator();
    let redis = RedisServer::start();
    let builder = with_admin(
        TestGateway::for_emulator(&emu)
            .set("store.backend", "\"redis\"")
            .set("store.url", &format!("\"{}\"", redis.url()))
            .set("store.timeout", "\"250ms\"")
            .set("cache.enabled", "false"),
    )
    .tenant_set("alpha", "daily_budget", "1000");
    let dir = tempfile::tempdir().expect("dir");
    let env = [(ADMIN_ENV, ADMIN_TOKEN)];
    let (a_proc, a) = GatewayProcess::start_named(&builder.replica(), dir.path(), "a", &env).await;
    let (b_proc, b) = GatewayProcess::start_named(&builder.replica(), dir.path(), "b", &env).await;
    let (a_url, a_admin) = (
        format!("http://{}", a.listen),
        format!("http://{}", a.admin_listen),
    );
    let b_url = format!("http://{}", b.listen);
    let b_admin = format!("http://{}", b.admin_listen);
    let img = fixture("face.jpg");

    // Created on A with the command line: the secret alone on stdout.
    let (ok, stdout, stderr) = cli(
        &a_admin,
        &[
            "create",
            "--tenant",
            "alpha",
            "--label",
            "ci runner",
            "--expires-in",
            "90d",
        ],
    );
    assert!(ok, "{stderr}");
    let key = stdout.trim().to_string();
    assert!(key.starts_with("lgr_") && key.len() == 73, "{stdout}");
    assert_eq!(stdout.lines().count(), 1);
    let key_id = key[4..16].to_string();
    assert!(
        stderr.contains(&key_id) && !stderr.contains(&key),
        "{stderr}"
    );

    // Used on B within two seconds, and A at once.
    assert_eq!(post_image(&a_url, &key, "a.jpg", &img).await.status, 200);
    let took = until_status(&b_url, &key, &img, 200, Duration::from_secs(2)).await;
    eprintln!("a created key works on the other replica after {took:?}");

    // A typo is refused without a call; so is a well-formed key never issued.
    let calls = emu.stats().calls;
    let mut typo = key.clone().into_bytes();
    typo[30] = if typo[30] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).expect("ascii");
    let t = post_image(&b_url, &typo, "a.jpg", &img).await;
    assert_eq!((t.status, t.code()), (401, "invalid_credentials".into()));
    assert_eq!(emu.stats().calls, calls);

    // Listed on B, with the config's key beside it; no secret in the list.
    let list = admin("GET", &format!("{b_admin}/admin/tenants/alpha/keys"), None).await;
    assert_eq!(list.status, 200, "{}", list.text());
    assert!(!list.text().contains(&key[16..]));
    let keys = list.json()["keys"].as_array().expect("keys").clone();
    let sources: Vec<&str> = keys.iter().filter_map(|k| k["source"].as_str()).collect();
    assert_eq!(sources, ["config", "runtime"]);
    let runtime = &keys[1];
    assert_eq!(runtime["key_id"], json!(key_id));
    assert_eq!(runtime["label"], json!("ci runner"));
    assert!(runtime["expires_at"].is_string() && runtime["created"].is_string());
    // Its last use, to the minute, reaches the store within a poll.
    let started = Instant::now();
    loop {
        let l = admin("GET", &format!("{a_admin}/admin/tenants/alpha/keys"), None).await;
        if l.json()["keys"][1]["last_used"].is_string() {
            assert!(l.json()["keys"][1]["last_used"]
                .as_str()
                .expect("t")
                .ends_with(":00Z"));
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(3), "{}", l.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, table, _) = cli(&b_admin, &["list", "--tenant", "alpha"]);
    assert!(
        ok && table.contains(&key_id) && table.contains("ci runner"),
        "{table}"
    );
    assert!(!table.contains(&key[16..]));

    // Rotated on A with a grace: the same key id, a new secret; the old one works until the
    // grace ends, then is refused as expired; the new one works on B.
    let used_before = admin_json_auth(&a_admin, "/admin/usage?tenant=alpha").await;
    let r = admin(
        "POST",
        &format!("{a_admin}/admin/tenants/alpha/keys/{key_id}/rotate"),
        Some(json!({ "grace": "3s" })),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let new_key = r.json()["key"].as_str().expect("key").to_string();
    assert_eq!(r.json()["key_id"], json!(key_id));
    assert!(new_key != key && new_key[4..16] == key_id);
    assert!(r.json()["previous_valid_until"].is_string());
    until_status(&b_url, &new_key, &img, 200, Duration::from_secs(2)).await;
    assert_eq!(post_image(&b_url, &key, "a.jpg", &img).await.status, 200);
    let took = until_status(&b_url, &key, &img, 401, Duration::from_secs(6)).await;
    let old = post_image(&b_url, &key, "a.jpg", &img).await;
    assert_eq!(old.code(), "key_expired", "{}", old.text());
    eprintln!("the replaced secret was refused {took:?} into a 3 s grace");
    // The rotation left the tenant's budget as it was: the calls since count on.
    let used_after = admin_json_auth(&a_admin, "/admin/usage?tenant=alpha").await;
    let used = |v: &Value| v["tenants"][0]["daily"]["used"].as_u64().expect("used");
    assert!(used(&used_after) >= used(&used_before) + 2, "{used_after}");
    assert_eq!(used_after["tenants"][0]["daily"]["limit"], json!(1000));

    // Revoked on A with the command line: refused on B within two seconds.
    let (ok, stdout, stderr) = cli(
        &a_admin,
        &["revoke", "--tenant", "alpha", "--key-id", &key_id],
    );
    assert!(ok && stdout.is_empty(), "{stderr}");
    let took = until_status(&b_url, &new_key, &img, 401, Duration::from_secs(2)).await;
    eprintln!("a revocation on one replica was in force on the other after {took:?}");
    let gone = admin(
        "DELETE",
        &format!("{b_admin}/admin/tenants/alpha/keys/{key_id}"),
        None,
    )
    .await;
    assert_eq!((gone.status, gone.code()), (404, "unknown_key".into()));

    // A key that expires: works, then is refused as expired on both replicas.
    let e = admin(
        "POST",
        &format!("{b_admin}/admin/tenants/alpha/keys"),
        Some(json!({ "expires_in": "2s" })),
    )
    .await;
    assert_eq!(e.status, 201, "{}", e.text());
    let short = e.json()["key"].as_str().expect("key").to_string();
    until_status(&a_url, &short, &img, 200, Duration::from_secs(2)).await;
    until_status(&a_url, &short, &img, 401, Duration::from_secs(4)).await;
    let expired = post_image(&b_url, &short, "a.jpg", &img).await;
    assert_eq!(expired.code(), "key_expired");

    // The config's keys cannot be changed here; bad bodies are refused, their values unsaid.
    let cfg_id = keys[0]["key_id"].as_str().expect("id");
    let c = admin(
        "DELETE",
        &format!("{a_admin}/admin/tenants/alpha/keys/{cfg_id}"),
        None,
    )
    .await;
    assert_eq!((c.status, c.code()), (409, "key_in_config".into()));
    let bad = admin(
        "POST",
        &format!("{a_admin}/admin/tenants/alpha/keys"),
        Some(json!({ "expires_in": "soon-ish-secret-value" })),
    )
    .await;
    assert_eq!((bad.status, bad.code()), (400, "invalid_body".into()));
    assert!(!bad.text().contains("soon-ish-secret-value"));
    let bad = admin(
        "POST",
        &format!("{a_admin}/admin/tenants/alpha/keys"),
        Some(json!({ "lable": "typo-secret-value" })),
    )
    .await;
    assert_eq!((bad.status, bad.code()), (400, "invalid_body".into()));
    assert!(!bad.text().contains("typo-secret-value"));
    let nobody = admin(
        "POST",
        &format!("{a_admin}/admin/tenants/nobody/keys"),
        None,
    )
    .await;
    assert_eq!(
        (nobody.status, nobody.code()),
        (404, "unknown_tenant".into())
    );
    let unauth = client()
        .post(format!("{a_admin}/admin/tenants/alpha/keys"))
        .send()
        .await
        .expect("post");
    assert_eq!(unauth.status().as_u16(), 401);

    // Audit lines for every change; no secret in any log line.
    let logs = format!("{}{}", a_proc.log(), b_proc.log());
    let audit: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "audit")
        .collect();
    let created = audit
        .iter()
        .find(|v| v["action"] == "key_create" && v["key_id"] == key_id.as_str())
        .expect("created");
    assert!(
        created["expires_at"]
            .as_str()
            .is_some_and(|e| e.ends_with('Z') && e.starts_with("20")),
        "{created}"
    );
    for action in ["key_create", "key_rotate", "key_revoke"] {
        assert!(
            audit.iter().any(|v| v["action"] == action
                && v["tenant"] == "alpha"
                && v["key_id"] == key_id.as_str()),
            "{action}: {audit:?}"
        );
    }
    for secret in [&key, &new_key, &short] {
        assert!(!holds_secret(&logs, secret), "a key in the log");
    }
}

async fn admin_json_auth(admin_url: &str, path: &str) -> Value {
    admin("GET", &format!("{admin_url}{path}"), None)
        .await
        .json()
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_keys_outlive_a_restart_on_one_host_and_need_a_state_file() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("budgets.json");
    let builder = with_admin(TestGateway::for_emulator(&emu)).set(
        "budgets.state_file",
        &format!("{:?}", state.to_str().expect("path")),
    );
    let env = [(ADMIN_ENV, ADMIN_TOKEN)];
    let (mut gw, cfg) = GatewayProcess::start_named(&builder, dir.path(), "one", &env).await;
    let (url, admin_url) = (
        format!("http://{}", cfg.listen),
        format!("http://{}", cfg.admin_listen),
    );
    let img = fixture("face.jpg");
    let (ok, stdout, stderr) = cli(&admin_url, &["create", "--tenant", "beta"]);
    assert!(ok, "{stderr}");
    let key = stdout.trim().to_string();
    assert_eq!(post_image(&url, &key, "a.jpg", &img).await.status, 200);
    let (ok, rotated, stderr) = cli(
        &admin_url,
        &[
            "rotate",
            "--tenant",
            "beta",
            "--key-id",
            &key[4..16],
            "--grace",
            "1h",
        ],
    );
    assert!(ok, "{stderr}");
    let rotated = rotated.trim().to_string();

    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(15)).success());
    let (gw, _) = GatewayProcess::start_named(&builder, dir.path(), "one", &env).await;
    wait_ready(cfg.admin_listen).await;
    // Both secrets of the key, the new one and the old in its grace, after the restart.
    until_status(&url, &rotated, &img, 200, Duration::from_secs(2)).await;
    assert_eq!(post_image(&url, &key, "a.jpg", &img).await.status, 200);
    let (ok, _, stderr) = cli(
        &admin_url,
        &["revoke", "--tenant", "beta", "--key-id", &key[4..16]],
    );
    assert!(ok, "{stderr}");
    for k in [&key, &rotated] {
        let a = post_image(&url, k, "a.jpg", &img).await;
        assert_eq!((a.status, a.code()), (401, "invalid_credentials".into()));
    }
    drop(gw);

    // Without a state file, keys would not outlive the process: refused, saying why.
    let memory = with_admin(TestGateway::for_emulator(&emu));
    let (_gw, cfg) = GatewayProcess::start_named(&memory, dir.path(), "memory", &env).await;
    let (ok, stdout, stderr) = cli(
        &format!("http://{}", cfg.admin_listen),
        &["create", "--tenant", "beta"],
    );
    assert!(!ok && stdout.is_empty());
    assert!(stderr.contains("store_not_durable"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_adds_calls_to_the_budgets_until_it_ends() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("budgets.json");
    let gw = with_admin(TestGateway::for_emulator(&emu))
        .set("cache.enabled", "false")
        .set(
            "budgets.state_file",
            &format!("{:?}", state.to_str().expect("path")),
        )
        .tenant_set("alpha", "daily_budget", "2")
        .tenant_set("alpha", "monthly_budget", "1000");
    let env = [(ADMIN_ENV, ADMIN_TOKEN)];
    let (_gw, cfg) = GatewayProcess::start_named(&gw, dir.path(), "g", &env).await;
    let (url, admin_url) = (
        format!("http://{}", cfg.listen),
        format!("http://{}", cfg.admin_listen),
    );
    let img = fixture("face.jpg");
    for _ in 0..2 {
        assert_eq!(
            post_image(&url, "alpha-key", "a.jpg", &img).await.status,
            200
        );
    }
    let spent = post_image(&url, "alpha-key", "a.jpg", &img).await;
    assert_eq!(spent.code(), "budget_exhausted");

    let g = admin(
        "POST",
        &format!("{admin_url}/admin/usage/grant"),
        Some(json!({ "tenant": "alpha", "calls": 1, "until": "4s", "reason": "launch day" })),
    )
    .await;
    assert_eq!(g.status, 201, "{}", g.text());
    let grant_id = g.json()["grant_id"].as_str().expect("id").to_string();
    assert_eq!(g.json()["in_force"], json!(true));
    // One more call, and no more.
    assert_eq!(
        post_image(&url, "alpha-key", "a.jpg", &img).await.status,
        200
    );
    assert_eq!(
        post_image(&url, "alpha-key", "a.jpg", &img).await.code(),
        "budget_exhausted"
    );
    // Shown in both usage answers: the limit with the grant, and the grant itself.
    let own: Value = client()
        .get(format!("{url}/api/v1/usage"))
        .header("x-api-key", "alpha-key")
        .send()
        .await
        .expect("usage")
        .json()
        .await
        .expect("json");
    assert_eq!(own["daily"]["limit"], json!(3), "{own}");
    assert_eq!(own["daily"]["granted"], json!(1));
    assert_eq!(own["monthly"]["limit"], json!(1001));
    assert_eq!(own["grants"][0]["grant_id"], json!(grant_id));
    assert_eq!(own["grants"][0]["reason"], json!("launch day"));
    let by_admin = admin_json_auth(&admin_url, "/admin/usage?tenant=alpha").await;
    assert_eq!(
        by_admin["tenants"][0]["daily"]["limit"],
        json!(3),
        "{by_admin}"
    );
    let beta = admin_json_auth(&admin_url, "/admin/usage?tenant=beta").await;
    assert_eq!(beta["tenants"][0]["grants"], json!([]));

    // When it ends the headroom goes with it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let own = admin_json_auth(&admin_url, "/admin/usage?tenant=alpha").await;
    assert_eq!(own["tenants"][0]["daily"]["limit"], json!(2), "{own}");
    assert_eq!(own["tenants"][0]["grants"], json!([]));

    // A grant ended early; refusals.
    let g = admin(
        "POST",
        &format!("{admin_url}/admin/usage/grant"),
        Some(json!({ "tenant": "alpha", "calls": 5, "until": "2099-01-01T00:00:00Z" })),
    )
    .await;
    assert_eq!(
        (g.status, g.code()),
        (400, "invalid_body".into()),
        "more than 366 days"
    );
    let g = admin(
        "POST",
        &format!("{admin_url}/admin/usage/grant"),
        Some(json!({ "tenant": "alpha", "calls": 5, "until": "1h" })),
    )
    .await;
    let id = g.json()["grant_id"].as_str().expect("id").to_string();
    assert_eq!(
        post_image(&url, "alpha-key", "a.jpg", &img).await.status,
        200
    );
    let end = admin(
        "DELETE",
        &format!("{admin_url}/admin/usage/grant?tenant=alpha&grant_id={id}"),
        None,
    )
    .await;
    assert_eq!(end.status, 200, "{}", end.text());
    assert_eq!(
        post_image(&url, "alpha-key", "a.jpg", &img).await.code(),
        "budget_exhausted"
    );
    let none = admin(
        "POST",
        &format!("{admin_url}/admin/usage/grant"),
        Some(json!({ "tenant": "beta", "calls": 5, "until": "1h" })),
    )
    .await;
    assert_eq!((none.status, none.code()), (409, "no_budget".into()));
    for bad in [
        json!({ "tenant": "alpha", "calls": 0, "until": "1h" }),
        json!({ "tenant": "alpha", "calls": 5, "until": "yesterday" }),
        json!({ "tenant": "alpha", "calls": 5 }),
    ] {
        let b = admin("POST", &format!("{admin_url}/admin/usage/grant"), Some(bad)).await;
        assert_eq!((b.status, b.code()), (400, "invalid_body".into()));
    }
}
