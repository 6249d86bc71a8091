//! The customer-backend snippets of docs/app-tokens.md (Python with PyJWT, Node with `jose`) run
//! exactly as written, with a key from `tokens keygen`, and their tokens are accepted by a gateway; the
//! demo prints a token it accepts too.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

/// The fenced block of docs/app-tokens.md in `lang` that contains `marker`.
fn docs_block(lang: &str, marker: &str) -> String {
    support::docs_block("docs/app-tokens.md", lang, marker)
}

/// A signing key (`key-1`) and its JWKS in `dir`, made by the binary as docs/app-tokens.md says.
fn keygen(dir: &Path) {
    let jwks = tokens_keygen("ES256", "key-1", &dir.join("signing-key.pem"));
    std::fs::write(dir.join("jwks.json"), jwks).expect("jwks");
}

/// Run a snippet in `dir` and return the last line it printed (the token).
fn run(dir: &Path, program: &str, file: &str) -> String {
    let out = Command::new(program)
        .arg(file)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (.ci/install-deps installs it)"));
    assert!(
        out.status.success(),
        "{program} {file} failed (.ci/install-deps installs what it needs):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_backend_snippets_make_tokens_the_gateway_accepts() {
    let dir = tempfile::tempdir().expect("dir");
    keygen(dir.path());
    let python = docs_block("python", "def liveness_token(");
    std::fs::write(
        dir.path().join("backend.py"),
        format!("{python}\n\nprint(liveness_token(\"user-py\"))\n"),
    )
    .expect("py");
    let node = docs_block("js", "export async function livenessToken(");
    std::fs::write(
        dir.path().join("backend.mjs"),
        format!("{node}\n\nconsole.log(await livenessToken(\"user-js\"));\n"),
    )
    .expect("js");
    // The snippet imports `jose` as an app would: from a node_modules beside it.
    link_node_modules(dir.path());

    let emu = start_emulator();
    let jwks = dir.path().join("jwks.json").display().to_string();
    let gw = TestGateway::for_emulator(&emu)
        .set(
            "auth.issuers",
            &format!(
                "[{{ id = \"customer-backend\", issuer = \"https://auth.example.com\", audiences = [\"liveness-gateway\"], jwks_file = {jwks:?}, algorithms = [\"ES256\"], tenant = \"alpha\", single_use = true }}]"
            ),
        )
        .start();
    for (n, (program, file)) in [("python3", "backend.py"), ("node", "backend.mjs")]
        .into_iter()
        .enumerate()
    {
        let token = run(dir.path(), program, file);
        assert_eq!(token.split('.').count(), 3, "{program}: {token}");
        let a = post_image(
            &gw.url(),
            &token,
            "a.jpg",
            &variant(&fixture("face.jpg"), n as u64),
        )
        .await;
        assert_eq!(a.status, 200, "{program}: {}", a.text());
        // Each carries a jti: a second use of the same token is refused.
        let again = post_image(
            &gw.url(),
            &token,
            "a.jpg",
            &variant(&fixture("face.jpg"), 9),
        )
        .await;
        assert_eq!(again.code(), "token_replayed", "{program}");
    }
    assert_eq!(emu.stats().calls, 2);
}

/// `demo` configures an issuer, prints a ready token, and the gateway it runs accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_prints_a_token_it_accepts() {
    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let earlier = format!(
        r#"{{"version": 2, "tenants": {{"demo": {{"days": {{"{day}": 7}}, "months": {{"{}": 7}}}}}}}}"#,
        &day[..7]
    );
    let demo = Demo::start_with(&[], Some(&earlier));
    let lines = &demo.lines;
    let at = lines
        .iter()
        .position(|l| l.starts_with("An app token"))
        .unwrap_or_else(|| panic!("no token printed:\n{}", lines.join("\n")));
    let token = lines[at + 1].trim().to_string();
    let a = post_image(
        &demo.url,
        &token,
        "a.jpg",
        &variant(&fixture("face.jpg"), 1),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    // The curl line carries the same token.
    assert!(lines[at + 2].contains(&token));
    // Both printed calls, run as printed: each gets a verdict, and neither sets off the demo's
    // own replay alarm (they once sent one photo for two tenants).
    let curls: Vec<&String> = lines
        .iter()
        .filter(|l| l.trim_start().starts_with("curl "))
        .collect();
    assert_eq!(curls.len(), 2, "{lines:?}");
    for curl in curls {
        let out = std::process::Command::new("sh")
            .args(["-c", curl.trim()])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("curl");
        let body: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON verdict");
        assert!(body["result"].is_boolean(), "{curl}: {body}");
    }
    let m = metrics_text(&demo.admin_url).await;
    let replays: f64 = m
        .lines()
        .filter(|l| l.starts_with("liveness_gateway_replay_suspected_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(replays, 0.0, "the demo's own calls look like a replay");
    // A fresh run: its usage is these three calls, whatever ran before.
    let usage = admin_json(&demo.admin_url, "/admin/usage").await;
    let billable: u64 = usage["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .filter_map(|t| t["daily"]["used"].as_u64())
        .sum();
    assert_eq!(billable, 3, "{usage}");
    // Stopped (SIGTERM, as Ctrl-C), it leaves no run folder behind.
    let run = std::path::PathBuf::from(format!(
        "/tmp/liveness-gateway-demo/run-{}",
        demo.child.0.id()
    ));
    assert!(run.exists(), "{run:?}");
    drop(demo);
    assert!(!run.exists(), "{run:?} left behind");
    // Told to, it keeps them.
    let kept = Demo::start_with(&["--keep-state"], Some(&earlier));
    let usage = admin_json(&kept.admin_url, "/admin/usage").await;
    assert_eq!(usage["tenants"][0]["daily"]["used"], 7, "{usage}");
}

/// `demo` and `emulator` on a port that is taken stop at once, non-zero, naming the address and
/// the flag that moves it (they once printed only `Address already in use`, or waited).
#[test]
fn the_demo_and_the_emulator_stop_at_once_on_a_taken_port() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = taken.local_addr().expect("addr").to_string();
    let free = |_: u8| format!("127.0.0.1:{}", free_port());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["emulator".into(), "--listen".into(), busy.clone()],
            "--listen",
        ),
        (
            [
                "demo",
                "--emulator-listen",
                &busy,
                "--listen",
                &free(0),
                "--admin-listen",
                &free(1),
                "--web-listen",
                &free(2),
            ]
            .map(String::from)
            .to_vec(),
            "--emulator-listen",
        ),
        (
            [
                "demo",
                "--listen",
                &busy,
                "--admin-listen",
                &free(1),
                "--emulator-listen",
                &free(2),
                "--web-listen",
                &free(3),
            ]
            .map(String::from)
            .to_vec(),
            "--listen",
        ),
    ];
    // Built (when out of date) before the clock starts: only the binary's own exit is timed.
    let dev = dev_binary();
    for (args, flag) in cases {
        let started = std::time::Instant::now();
        let out = std::process::Command::new(&dev)
            .args(&args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("LIVENESS_ORG_API_KEY", "k")
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{args:?}: {:?}",
            started.elapsed()
        );
        assert!(
            err.contains(&format!("cannot listen on {busy}")) && err.contains(flag),
            "{args:?}: {err}"
        );
    }
}
