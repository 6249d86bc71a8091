//! The browser client (`examples/web/index.html`) in a real headless Chromium, served from its
//! own origin and calling the gateway on another: CORS proven where it matters. Chromium is a
//! Debian package that `.ci/install-deps` installs.

mod support;

use std::time::Duration;

use support::*;

/// The page and a photo, served by a static file server on a free port: (its origin, the server).
fn serve_page() -> (String, KillOnDrop, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let page = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/web/index.html");
    std::fs::copy(page, dir.path().join("index.html")).expect("page");
    std::fs::write(dir.path().join("face.jpg"), fixture("face.jpg")).expect("photo");
    let port = free_port();
    let server = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 -m http.server");
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < until,
            "the page server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (format!("http://127.0.0.1:{port}"), KillOnDrop(server), dir)
}

/// What the page shows after it ran against `gateway` with `key`: (status, code, cache).
async fn run_page(origin: &str, gateway: &str, key: &str) -> (String, String, String) {
    let url = format!("{origin}/index.html?gateway={gateway}&key={key}&auto=face.jpg");
    let profile = tempfile::tempdir().expect("profile");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(["--dump-dom", "--virtual-time-budget=15000", &url])
            .output()
            .expect("chromium (apt-get install chromium)")
    })
    .await
    .expect("chromium");
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        dom.contains("data-done=\"1\""),
        "the page did not finish:\n{dom}"
    );
    let attr = |name: &str| {
        let key = format!("{name}=\"");
        dom.split_once(&key)
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(v, _)| v.to_string())
            .unwrap_or_default()
    };
    (attr("data-status"), attr("data-code"), attr("data-cache"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_web_client_works_from_an_allowed_origin_and_reads_every_error() {
    let (origin, _server, _dir) = serve_page();
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("cors.allowed_origins", &format!("[\"{origin}\"]"))
        // One call an hour: the second page, however slow Chromium starts, is refused.
        .tenant_set("beta", "rate", "\"1/h\"")
        .tenant_set("beta", "burst", "1")
        .start();
    let url = gw.url();
    // A verdict, then the same photo from the cache: the page reads X-Cache.
    assert_eq!(
        run_page(&origin, &url, "alpha-key").await,
        ("200".into(), String::new(), "MISS".into())
    );
    assert_eq!(run_page(&origin, &url, "alpha-key").await.2, "HIT");
    // Errors reach the page with their codes: CORS headers are on every status.
    let (status, code, _) = run_page(&origin, &url, "not-a-key").await;
    assert_eq!(
        (status.as_str(), code.as_str()),
        ("401", "invalid_credentials")
    );
    run_page(&origin, &url, "beta-key").await;
    let (status, code, _) = run_page(&origin, &url, "beta-key").await;
    assert_eq!((status.as_str(), code.as_str()), ("429", "rate_limited"));
    assert_eq!(emu.stats().calls, 2, "alpha's call and beta's first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_page_from_an_origin_not_allowed_learns_nothing() {
    let (origin, _server, _dir) = serve_page();
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("cors.allowed_origins", "[\"https://app.example.com\"]")
        .start();
    let (status, code, _) = run_page(&origin, &gw.url(), "alpha-key").await;
    assert_eq!((status.as_str(), code.as_str()), ("0", "network_error"));
    // The preflight was refused by the browser itself: nothing was sent, nothing was paid.
    assert_eq!(emu.stats().calls, 0);
}
