//! The admin API against what a web page can make an operator's browser send: requests to a real
//! gateway's admin listener with each header a page controls (or a DNS-rebinding page presents),
//! written byte for byte, and the tools that must keep working (curl, probes, Prometheus by
//! address or by a configured name, the shipped deployments).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use liveness_gateway::config::Config;
use liveness_gateway::server::{RunningGateway, SharedEnv};
use support::*;

const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";
const ADMIN_TOKEN_ENV: &str = "LG_TEST_ADMIN_TOKEN";

/// A gateway started from a config file (so `/admin/reload` applies it), with the admin token
/// set when `token` is.
fn gateway(builder: TestGateway, dir: &std::path::Path, token: bool) -> RunningGateway {
    let builder = if token {
        builder.set("server.admin_token_env", &format!("\"{ADMIN_TOKEN_ENV}\""))
    } else {
        builder
    };
    let path = dir.join("gateway.toml");
    std::fs::write(&path, builder.toml()).expect("write config");
    let env: SharedEnv = Arc::new(|n: &str| match n {
        ORG_KEY_ENV => Some(ORG_KEY.to_string()),
        ADMIN_TOKEN_ENV => Some(ADMIN_TOKEN.to_string()),
        _ => None,
    });
    let cfg = Config::load(&path, &|n| env(n)).expect("valid config");
    RunningGateway::start(cfg, env).expect("gateway")
}

/// One request written as given: `host` is the `Host` line (none when `None`), then `headers`,
/// then a body of `body`. HTTP/1.1 unless `target` says otherwise by a trailing version.
fn send(
    addr: SocketAddr,
    method: &str,
    target: &str,
    host: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let line = if target.contains(" HTTP/") {
        format!("{method} {target}\r\n")
    } else {
        format!("{method} {target} HTTP/1.1\r\n")
    };
    let mut req = line;
    if let Some(h) = host {
        req.push_str(&format!("Host: {h}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    raw(addr, req.as_bytes(), Duration::from_secs(10))
}

/// What the operator's own tools see: alpha's calls today and the reloads counted so far.
fn state_of(addr: SocketAddr, auth: &[(&str, &str)]) -> (i64, f64) {
    let host = addr.to_string();
    let (status, body) = send(
        addr,
        "GET",
        "/admin/usage?tenant=alpha",
        Some(&host),
        auth,
        "",
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let used = v["tenants"][0]["daily"]["used"].as_i64().expect("used");
    let (status, metrics) = send(addr, "GET", "/metrics", Some(&host), auth, "");
    assert_eq!(status, 200);
    let reloads = sample(
        &metrics,
        r#"liveness_gateway_reloads_total{outcome="applied"}"#,
    ) + sample(
        &metrics,
        r#"liveness_gateway_reloads_total{outcome="refused"}"#,
    );
    (used, reloads)
}

/// Every way a page can send a state-changing request is refused, with or without the admin
/// token, and changes nothing: no adjustment, no reload, no purge.
#[test]
fn state_changing_requests_a_page_can_send_are_refused() {
    for token in [false, true] {
        let dir = tempfile::tempdir().expect("dir");
        let gw = gateway(TestGateway::new("http://127.0.0.1:1"), dir.path(), token);
        let addr = gw.admin_addr;
        let host = addr.to_string();
        let bearer = format!("Bearer {ADMIN_TOKEN}");
        let auth: Vec<(&str, &str)> = if token {
            vec![("Authorization", bearer.as_str())]
        } else {
            Vec::new()
        };
        // The operator's own adjustment (curl -X POST): three calls.
        let adjust = "/admin/usage/adjust?tenant=alpha&delta=3";
        let (status, body) = send(addr, "POST", adjust, Some(&host), &auth, "");
        assert_eq!(status, 200, "{body}");
        assert_eq!(state_of(addr, &auth), (3, 0.0));

        let attack = "/admin/usage/adjust?tenant=alpha&delta=-1000000000";
        let other_port = format!("http://127.0.0.1:{}", addr.port() + 1);
        let cross: [(&str, &[(&str, &str)]); 11] = [
            ("a foreign Origin", &[("Origin", "http://evil.example")]),
            (
                "a foreign Origin on HTTPS",
                &[("Origin", "https://evil.example")],
            ),
            ("the opaque Origin", &[("Origin", "null")]),
            ("another port's Origin", &[("Origin", other_port.as_str())]),
            (
                "Sec-Fetch-Site: cross-site",
                &[("Sec-Fetch-Site", "cross-site")],
            ),
            (
                "Sec-Fetch-Site: same-site",
                &[("Sec-Fetch-Site", "same-site")],
            ),
            ("a text/plain form", &[("Content-Type", "text/plain")]),
            (
                "a urlencoded form",
                &[("Content-Type", "application/x-www-form-urlencoded")],
            ),
            (
                "a multipart form",
                &[("Content-Type", "multipart/form-data; boundary=x")],
            ),
            (
                "text/plain in capitals with a charset",
                &[("Content-Type", "TEXT/Plain; charset=UTF-8")],
            ),
            (
                "a navigation (a form's POST)",
                &[
                    ("Sec-Fetch-Site", "cross-site"),
                    ("Sec-Fetch-Mode", "navigate"),
                ],
            ),
        ];
        let mut refused = Vec::new();
        for (case, headers) in cross {
            let headers: Vec<(&str, &str)> = headers.iter().copied().chain(auth.clone()).collect();
            for (method, path) in [
                ("POST", attack),
                ("POST", "/admin/reload"),
                ("DELETE", "/admin/cache"),
            ] {
                let (status, body) = send(addr, method, path, Some(&host), &headers, "x=y");
                refused.push((case, method, path.to_string(), status, json_code(&body)));
            }
        }
        // The name a rebinding page was loaded from, in every place a request can carry it.
        let evil = format!("evil.example:{}", addr.port());
        let rebound: [(&str, String, &str); 4] = [
            ("a rebound Host", evil.clone(), attack),
            (
                "a rebound Host without a port",
                "evil.example".into(),
                attack,
            ),
            (
                "a name ending in localhost",
                format!("localhost.evil.example:{}", addr.port()),
                "/admin/reload",
            ),
            (
                "the absolute form",
                evil.clone(),
                "http://evil.example:PORT/admin/reload",
            ),
        ];
        for (case, h, path) in &rebound {
            let path = path.replace("PORT", &addr.port().to_string());
            let (status, body) = send(addr, "POST", &path, Some(h), &auth, "");
            refused.push((*case, "POST", path, status, json_code(&body)));
        }
        let (status, body) = send(
            addr,
            "POST",
            &format!("http://{evil}/admin/reload"),
            None,
            &auth,
            "",
        );
        refused.push((
            "the absolute form without Host",
            "POST",
            "/admin/reload".into(),
            status,
            json_code(&body),
        ));
        // Ambiguous names, which Pingora's HTTP/1 reader refuses before any service sees them
        // (the connection is closed).
        let ambiguous: [(&str, String, &str); 3] = [
            (
                "a Host with user info",
                format!("evil.example@127.0.0.1:{}", addr.port()),
                "/admin/reload",
            ),
            (
                "two Host lines",
                format!("{host}\r\nHost: {evil}"),
                "/admin/reload",
            ),
            (
                "an absolute target naming another host than Host",
                host.clone(),
                "http://evil.example/admin/reload",
            ),
        ];
        for (case, h, path) in &ambiguous {
            let (status, body) = send(addr, "POST", path, Some(h), &auth, "");
            refused.push((*case, "POST", path.to_string(), status, json_code(&body)));
        }
        let wrong: Vec<_> = refused
            .iter()
            .filter(|(case, .., status, code)| {
                if ambiguous.iter().any(|(c, ..)| c == case) {
                    return *status != 0 && *status != 400;
                }
                let want = if rebound.iter().any(|(c, ..)| c == case)
                    || *case == "the absolute form without Host"
                {
                    (421, "admin_host_not_allowed")
                } else {
                    (403, "admin_cross_site")
                };
                (*status, code.as_str()) != want
            })
            .collect();
        let after = state_of(addr, &auth);
        assert!(
            wrong.is_empty() && after == (3, 0.0),
            "token {token}: {} of {} requests a page can send were not refused: {wrong:#?}; \
             alpha's calls and the reloads after them: {after:?} (before: (3, 0.0))",
            wrong.len(),
            refused.len()
        );
    }
}

/// Reads answer only the listener's own addresses and configured names: a page whose name was
/// rebound to the admin listener reads nothing, and neither does a cross-site fetch. Probes
/// answer any `Host` (they tell nothing).
#[test]
fn reads_refuse_a_rebound_host_and_cross_site_fetches() {
    let dir = tempfile::tempdir().expect("dir");
    let gw = gateway(TestGateway::new("http://127.0.0.1:1"), dir.path(), false);
    let addr = gw.admin_addr;
    let rebound = format!("rebound.example:{}", addr.port());
    let mut seen = Vec::new();
    for path in [
        "/admin/usage",
        "/admin/usage?from=2026-01-01&to=2026-01-02",
        "/admin/subjects?tenant=alpha",
        "/admin/cache",
        "/metrics",
        "/nowhere",
    ] {
        let (status, body) = send(addr, "GET", path, Some(&rebound), &[], "");
        seen.push((path, "rebound Host", status, json_code(&body), body.len()));
        let (status, body) = send(
            addr,
            "GET",
            path,
            Some(&addr.to_string()),
            &[
                ("Sec-Fetch-Site", "cross-site"),
                ("Sec-Fetch-Mode", "no-cors"),
            ],
            "",
        );
        seen.push((
            path,
            "cross-site fetch",
            status,
            json_code(&body),
            body.len(),
        ));
    }
    let leaked: Vec<_> = seen
        .iter()
        .filter(|(_, case, status, code, _)| {
            let want = if *case == "rebound Host" {
                (421, "admin_host_not_allowed")
            } else {
                (403, "admin_cross_site")
            };
            (*status, code.as_str()) != want
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "{} of {} reads answered: {leaked:#?}",
        leaked.len(),
        seen.len()
    );
    for path in ["/healthz", "/readyz"] {
        let (status, _) = send(addr, "GET", path, Some(&rebound), &[], "");
        assert_eq!(status, 200, "{path}");
    }
}

/// What operators and their tools send keeps working: curl (no `Origin`, no body or a JSON
/// one), a browser tab on the listener itself (same origin, or a typed address), HTTP/1.0
/// without `Host`, `localhost` and any IP address (a port forward, a pod or service IP), a
/// cross-site link opened in a tab (a navigation reads, it changes nothing).
#[test]
fn operators_tools_keep_working() {
    let dir = tempfile::tempdir().expect("dir");
    let gw = gateway(TestGateway::new("http://127.0.0.1:1"), dir.path(), false);
    let addr = gw.admin_addr;
    let (host, port) = (addr.to_string(), addr.port());
    let origin = format!("http://{host}");
    let localhost = format!("localhost:{port}");
    let forwarded = format!("localhost:{}", port + 7);
    let pod = format!("10.1.2.3:{port}");
    let v6 = format!("[::1]:{port}");
    let adjust = "/admin/usage/adjust?tenant=alpha&delta=1";
    // What the operator's tool is, its `Host`, its other headers, its body.
    type Case<'a> = (&'a str, Option<&'a str>, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 11] = [
        ("curl -X POST", Some(&host), &[], ""),
        (
            "a JSON body",
            Some(&host),
            &[("Content-Type", "application/json")],
            "{}",
        ),
        (
            "the listener's own page",
            Some(&host),
            &[("Origin", &origin), ("Sec-Fetch-Site", "same-origin")],
            "",
        ),
        (
            "a typed address",
            Some(&host),
            &[("Sec-Fetch-Site", "none")],
            "",
        ),
        ("localhost", Some(&localhost), &[], ""),
        ("a port forward", Some(&forwarded), &[], ""),
        ("a pod address", Some(&pod), &[], ""),
        ("IPv6 loopback", Some(&v6), &[], ""),
        ("a name in capitals", Some("LOCALHOST"), &[], ""),
        ("no Host at all", None, &[], ""),
        ("the absolute form", Some(&host), &[], ""),
    ];
    let mut failed = Vec::new();
    for (n, (case, h, headers, body)) in cases.iter().enumerate() {
        let target = match *case {
            "no Host at all" => format!("{adjust} HTTP/1.0"),
            "the absolute form" => format!("http://{host}{adjust}"),
            _ => adjust.to_string(),
        };
        let (status, answer) = send(addr, "POST", &target, *h, headers, body);
        if status != 200 {
            failed.push((case, status, answer));
        }
        let (used, _) = state_of(addr, &[]);
        assert_eq!(used, n as i64 + 1, "{case}");
    }
    assert!(failed.is_empty(), "refused: {failed:#?}");
    let (status, body) = send(
        addr,
        "GET",
        "/admin/usage",
        Some(&host),
        &[
            ("Sec-Fetch-Site", "cross-site"),
            ("Sec-Fetch-Mode", "navigate"),
        ],
        "",
    );
    assert_eq!(status, 200, "a link followed in a tab: {body}");
    for probe in ["/healthz", "/readyz"] {
        let (status, _) = send(
            addr,
            "GET",
            probe,
            Some("anything.example"),
            &[("Sec-Fetch-Site", "cross-site")],
            "",
        );
        assert_eq!(status, 200, "{probe}");
    }
}

/// The names of `server.admin_hosts` are answered (any case), others are not, and the setting
/// reloads; the shipped compose setup (Prometheus scraping each replica by its service name,
/// with the token) and the Kubernetes one (the ServiceMonitor scrapes pod addresses; the
/// kubelet probes) are answered by their own configs' settings.
#[test]
fn configured_names_and_the_shipped_setups_are_answered() {
    let repo = |p: &str| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(p);
    let compose: toml::Table = std::fs::read_to_string(repo("deploy/compose/gateway.toml"))
        .expect("compose gateway.toml")
        .parse()
        .expect("toml");
    let names = compose["server"]
        .get("admin_hosts")
        .cloned()
        .unwrap_or(toml::Value::Array(Vec::new()));
    let dir = tempfile::tempdir().expect("dir");
    let builder =
        TestGateway::new("http://127.0.0.1:1").set("server.admin_hosts", &names.to_string());
    let gw = gateway(builder.clone(), dir.path(), true);
    let addr = gw.admin_addr;
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    // Each target of the compose Prometheus, as Prometheus sends it: the target is the Host.
    let scrape = std::fs::read_to_string(repo("deploy/compose/prometheus.yml")).expect("yml");
    let targets: Vec<String> = scrape
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- targets: ["))
        .flat_map(|l| {
            l.trim_end_matches(']')
                .split(',')
                .map(|t| t.trim().trim_matches('"').to_string())
        })
        .filter(|t| !t.starts_with("alertmanager"))
        .collect();
    assert!(targets.len() >= 2, "{targets:?}");
    for target in &targets {
        let (status, body) = send(addr, "GET", "/metrics", Some(target), &auth, "");
        assert_eq!(status, 200, "Prometheus scraping {target}: {body}");
    }
    // The compose healthcheck and the image's HEALTHCHECK: `liveness-gateway healthcheck`.
    for ready in [false, true] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_liveness-gateway"));
        cmd.args(["healthcheck", "--admin", &addr.to_string()]);
        if ready {
            cmd.arg("--ready");
        }
        let out = cmd.output().expect("healthcheck");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Kubernetes: the ServiceMonitor's scrape comes by the pod's address; probes by any.
    let pod = format!("10.244.1.17:{}", addr.port());
    assert_eq!(send(addr, "GET", "/metrics", Some(&pod), &auth, "").0, 200);
    // A configured name in capitals is the same name; one not configured is refused.
    let first = targets[0].to_uppercase();
    assert_eq!(
        send(addr, "GET", "/metrics", Some(&first), &auth, "").0,
        200
    );
    let (status, body) = send(addr, "GET", "/metrics", Some("gateway-z:9464"), &auth, "");
    assert_eq!(
        (status, json_code(&body).as_str()),
        (421, "admin_host_not_allowed")
    );

    // Reloadable: a name added to the file is answered after a reload.
    let more = builder
        .set("server.admin_hosts", "[\"gateway-z\"]")
        .set("server.admin_token_env", &format!("\"{ADMIN_TOKEN_ENV}\""));
    std::fs::write(dir.path().join("gateway.toml"), more.toml()).expect("write");
    let (status, body) = send(
        addr,
        "POST",
        "/admin/reload",
        Some(&addr.to_string()),
        &auth,
        "",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        send(addr, "GET", "/metrics", Some("gateway-z:9464"), &auth, "").0,
        200
    );
    assert_eq!(
        send(addr, "GET", "/metrics", Some(&targets[0]), &auth, "").0,
        421
    );
}

/// `check-config` refuses a name that cannot be a host, with its path.
#[test]
fn check_config_refuses_admin_hosts_that_are_not_names() {
    let dir = tempfile::tempdir().expect("dir");
    for bad in [
        "\"*.svc.cluster.local\"",
        "\"gateway-a:9464\"",
        "\"http://gateway-a\"",
        "\"\"",
    ] {
        let path = dir.path().join("gateway.toml");
        let builder =
            TestGateway::new("http://127.0.0.1:1").set("server.admin_hosts", &format!("[{bad}]"));
        std::fs::write(&path, builder.toml()).expect("write");
        let (ok, out) = check_config(&path, true);
        assert!(!ok && out.contains("server.admin_hosts[0]"), "{bad}: {out}");
    }
}
