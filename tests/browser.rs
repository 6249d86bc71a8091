//! The browser client (`examples/web/index.html`) in a real headless Chromium, as a person uses
//! it: `liveness-gateway-dev demo` serves the page on an origin of its own, the page calls the
//! gateway on another, and the test chooses files in the page's file input, presses its buttons,
//! takes a photo with a (fake) camera, and reads what the page shows; and a page's own `fetch` of
//! a large upload refused before its body is read. Chromium is a Debian package that
//! `.ci/install-deps` installs; the tests drive it through the DevTools protocol.

mod support;

use std::path::Path;

use serde_json::json;
use support::chromium::Browser;
use support::*;

/// A name that Chromium resolves to 127.0.0.1: the demo's page served from an origin the
/// gateway does not allow.
const OTHER_HOST: &str = "elsewhere.test";
/// Another name Chromium resolves to 127.0.0.1: a DNS-rebinding attacker's name once it points
/// at the admin listener.
const REBOUND_HOST: &str = "rebound.test";

/// One demo at a time: each writes its app-token issuer's JWKS to the same file as it starts.
static ONE_DEMO: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the page shows after a check.
#[derive(Debug)]
struct Shown {
    status: String,
    code: String,
    cache: String,
    request_id: String,
    /// The visible text of the answer's facts (verdict, request id, cache, code).
    facts: String,
}

/// Chromium with a fake camera (a test pattern, allowed without asking), the test's host names,
/// and more command-line switches.
async fn chromium(switches: &[&str]) -> Browser {
    let hosts =
        format!("--host-resolver-rules=MAP {OTHER_HOST} 127.0.0.1, MAP {REBOUND_HOST} 127.0.0.1");
    let mut all = vec![
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        hosts.as_str(),
    ];
    all.extend_from_slice(switches);
    Browser::launch_with(&all).await
}

impl Browser {
    /// Open `url` and wait for the page it leads to (after redirects) to be loaded.
    async fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
        self.until(
            "location.pathname === '/index.html' && document.readyState === 'complete' \
             && !!document.getElementById('photo')",
        )
        .await;
    }

    /// Type into an input as a person would leave it.
    async fn fill(&mut self, id: &str, value: &str) {
        let js = format!(
            "document.getElementById({}).value = {}; true",
            json!(id),
            json!(value)
        );
        self.eval(&js).await;
    }

    /// Choose the test photo (written into the demo's folder); its path.
    async fn choose_photo(&mut self, demo: &Demo) -> std::path::PathBuf {
        let photo = demo.dir.path().join("face.jpg");
        std::fs::write(&photo, fixture("face.jpg")).expect("photo");
        self.choose(&photo).await;
        photo
    }

    /// Press a button and wait for the check it starts to be shown.
    async fn press(&mut self, button: &str) -> Shown {
        let before = self.checks().await;
        self.eval(&format!(
            "document.getElementById('{button}').click(); true"
        ))
        .await;
        self.until(&format!(
            "Number(document.getElementById('result').dataset.checks) > {before}"
        ))
        .await;
        let v = self
            .eval(
                "(() => { const d = document.getElementById('result').dataset; \
                 return { status: d.status, code: d.code, cache: d.cache || '', \
                 requestId: d.requestId || '', facts: document.getElementById('facts').innerText }; })()",
            )
            .await;
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        Shown {
            status: s("status"),
            code: s("code"),
            cache: s("cache"),
            request_id: s("requestId"),
            facts: s("facts"),
        }
    }

    /// With `BROWSER_SCREENSHOTS=DIR` set, a PNG of the page as it is now, to look at.
    async fn screenshot(&mut self, name: &str) {
        let Ok(dir) = std::env::var("BROWSER_SCREENSHOTS") else {
            return;
        };
        let shot = self.call("Page.captureScreenshot", json!({})).await;
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap_or_default())
            .expect("png");
        std::fs::write(Path::new(&dir).join(format!("{name}.png")), png).expect("screenshot");
    }

    async fn checks(&mut self) -> u64 {
        self.eval("Number(document.getElementById('result').dataset.checks)")
            .await
            .as_u64()
            .unwrap_or(0)
    }
}

/// The page from the demo's own origin: a verdict, the same photo from the cache, and every
/// kind of refusal with its code (so the CORS headers are on the errors too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_checks_a_chosen_photo_and_shows_every_answer() {
    let _one = ONE_DEMO.lock().await;
    let demo = Demo::start();
    assert!(
        demo.lines
            .iter()
            .any(|l| l.contains(&format!("web page: {}/", demo.web))),
        "the demo names its page: {:?}",
        demo.lines
    );
    let mut b = chromium(&[]).await;
    b.open(&format!("{}/", demo.web)).await;
    assert_eq!(
        b.eval("document.getElementById('gateway').value").await,
        json!(demo.url),
        "the demo's page knows its gateway"
    );
    b.fill("key", "demo-key").await;
    let photo = b.choose_photo(&demo).await;

    let first = b.press("send").await;
    assert_eq!(
        (first.status.as_str(), first.cache.as_str()),
        ("200", "MISS"),
        "{first:?}"
    );
    assert!(!first.request_id.is_empty(), "{first:?}");
    for shown in ["live", &first.request_id, "MISS"] {
        assert!(first.facts.contains(shown), "{shown} not shown: {first:?}");
    }
    let again = b.press("send").await;
    assert_eq!(again.cache, "HIT", "{again:?}");
    assert_ne!(again.request_id, first.request_id);
    b.screenshot("verdict").await;
    assert_eq!(demo.upstream_calls().await, 1);

    // A text file, by its name and then disguised as a JPEG: refused before any call.
    let text = demo.dir.path().join("notes.txt");
    std::fs::write(&text, "not a photo\n").expect("text");
    b.choose(&text).await;
    let refused = b.press("send").await;
    assert_eq!(
        (refused.status.as_str(), refused.code.as_str()),
        ("415", "extension_not_allowed"),
        "{refused:?}"
    );
    assert!(refused.facts.contains("extension_not_allowed"));
    let disguised = demo.dir.path().join("notes.jpg");
    std::fs::write(
        &disguised,
        "Not a photo, though named like one.\n".repeat(20),
    )
    .expect("text");
    b.choose(&disguised).await;
    let refused = b.press("send").await;
    assert_eq!(
        (refused.status.as_str(), refused.code.as_str()),
        ("415", "not_an_image"),
        "{refused:?}"
    );

    // A wrong key, then a tenant over its rate (2/s, burst 2): the page reads both codes.
    b.choose(&photo).await;
    b.fill("key", "not-a-key").await;
    let denied = b.press("send").await;
    assert_eq!(
        (denied.status.as_str(), denied.code.as_str()),
        ("401", "invalid_credentials"),
        "{denied:?}"
    );
    b.fill("key", "demo-limited-key").await;
    let mut seen = Vec::new();
    let limited = loop {
        let shown = b.press("send").await;
        if shown.status == "429" {
            break shown;
        }
        assert_eq!(shown.status, "200", "{shown:?}");
        seen.push(shown);
        assert!(seen.len() < 20, "never rate-limited: {seen:?}");
    };
    assert_eq!(limited.code, "rate_limited", "{limited:?}");
    b.screenshot("rate-limited").await;
    // demo-limited's own first call: nothing refused above was paid for.
    assert_eq!(demo.upstream_calls().await, 2);
}

/// The camera: the page opens it with `getUserMedia`, takes a frame as a JPEG, and the gateway
/// checks it like any photo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_takes_a_photo_with_the_camera() {
    let _one = ONE_DEMO.lock().await;
    let demo = Demo::start();
    let mut b = chromium(&[]).await;
    b.open(&format!("{}/", demo.web)).await;
    b.fill("key", "demo-key").await;
    b.eval("document.getElementById('camera').click(); true")
        .await;
    b.until("document.getElementById('live').dataset.ready === '1'")
        .await;
    b.screenshot("camera").await;
    let shown = b.press("snap").await;
    assert_eq!(
        (shown.status.as_str(), shown.cache.as_str()),
        ("200", "MISS"),
        "{shown:?}"
    );
    assert_eq!(demo.upstream_calls().await, 1);
    // The camera is closed once the photo is taken.
    assert_eq!(
        b.eval("document.getElementById('video').srcObject === null")
            .await,
        json!(true)
    );
}

/// The same page from an origin the gateway does not allow: the browser refuses the preflight,
/// the page learns nothing, and nothing is sent or paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_from_an_origin_not_allowed_learns_nothing() {
    let _one = ONE_DEMO.lock().await;
    let demo = Demo::start();
    let mut b = chromium(&[]).await;
    let elsewhere = demo.web.replace("127.0.0.1", OTHER_HOST);
    b.open(&format!("{elsewhere}/")).await;
    b.fill("key", "demo-key").await;
    b.choose_photo(&demo).await;
    let shown = b.press("send").await;
    assert_eq!(
        (shown.status.as_str(), shown.code.as_str()),
        ("0", "network_error"),
        "{shown:?}"
    );
    assert_eq!(demo.upstream_calls().await, 0);
}

/// A page that tries to drive the admin API at `admin` (`http://127.0.0.1:PORT`): a text/plain
/// form that takes a billion calls back from alpha's budget, a urlencoded form that reloads,
/// and the same as `fetch` (no-cors, with and without a body). Served on every path, by a
/// server of its own, so that the page's origin is another one than the admin listener's.
async fn serve_attack_page(admin: &str) -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let page = format!(
        r#"<!doctype html><title>cats</title>
<iframe name="sink"></iframe>
<form id="adjust" method="POST" enctype="text/plain" target="sink"
      action="{admin}/admin/usage/adjust?tenant=alpha&amp;delta=-1000000000"><input name="x" value="y"></form>
<form id="reload" method="POST" target="sink" action="{admin}/admin/reload"><input name="x" value="y"></form>
<script>
window.admin = {admin:?};
window.sunk = 0;
document.querySelector('iframe').addEventListener('load', () => window.sunk++);
</script>"#
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let page = page.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    (port, task)
}

/// A page on another origin (another site, and the same host on another port) submits forms
/// and sends fetches to the admin API from a real Chromium, and a page whose name was rebound to
/// the admin listener reads it and posts to it: nothing changes (alpha's calls stay, no reload
/// is counted) and nothing is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_another_origin_cannot_drive_the_admin_api() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let gw = TestGateway::for_emulator(&emu).start_from_file(&dir.path().join("gateway.toml"));
    let admin = gw.admin_url();
    let r = client()
        .post(format!("{admin}/admin/usage/adjust?tenant=alpha&delta=3"))
        .send()
        .await
        .expect("adjust");
    assert_eq!(r.status(), 200, "the operator's own adjustment");
    let (port, _page) = serve_attack_page(&admin).await;
    let mut b = chromium(&[]).await;
    let mut sent = Vec::new();
    for origin in [
        format!("http://{OTHER_HOST}:{port}"),
        format!("http://127.0.0.1:{port}"),
    ] {
        b.call("Page.navigate", json!({ "url": format!("{origin}/") }))
            .await;
        b.until(&format!(
            "location.origin === '{origin}' && document.readyState === 'complete' \
             && !!document.getElementById('adjust')"
        ))
        .await;
        for form in ["adjust", "reload"] {
            let before = b.eval("window.sunk").await;
            b.eval(&format!("document.getElementById('{form}').submit(); true"))
                .await;
            b.until(&format!("window.sunk > {before}")).await;
        }
        for (path, body) in [
            ("/admin/reload", "'x'"),
            (
                "/admin/usage/adjust?tenant=alpha&delta=-1000000000",
                "undefined",
            ),
        ] {
            let outcome = b
                .eval(&format!(
                    "fetch(window.admin + '{path}', {{ method: 'POST', mode: 'no-cors', body: {body} }})\
                     .then(() => 'sent', e => 'failed: ' + e)"
                ))
                .await;
            sent.push((origin.clone(), path, outcome));
        }
    }
    // DNS rebinding: the attacker's name now points at the admin listener, so the page is
    // same-origin with it. Its probe answers (it tells nothing); the rest must not.
    let admin_port = gw.admin_addr.port();
    b.call(
        "Page.navigate",
        json!({ "url": format!("http://{REBOUND_HOST}:{admin_port}/healthz") }),
    )
    .await;
    b.until(&format!(
        "location.host === '{REBOUND_HOST}:{admin_port}' && document.readyState === 'complete'"
    ))
    .await;
    let reads = b
        .eval(
            "Promise.all(['/admin/usage', '/metrics', '/admin/cache'].map(p => fetch(p)\
             .then(async r => [p, r.status, (await r.text()).includes('alpha')])))",
        )
        .await;
    let post = b
        .eval("fetch('/admin/reload', { method: 'POST' }).then(r => r.status)")
        .await;

    let usage = admin_json(&admin, "/admin/usage?tenant=alpha").await;
    let used = usage["tenants"][0]["daily"]["used"].clone();
    let m = metrics_text(&admin).await;
    let reloads = sample(&m, r#"liveness_gateway_reloads_total{outcome="applied"}"#)
        + sample(&m, r#"liveness_gateway_reloads_total{outcome="refused"}"#);
    let read_anything = reads
        .as_array()
        .expect("reads")
        .iter()
        .any(|r| r[1] == 200 || r[2] == true);
    assert!(
        used == 3 && reloads == 0.0 && !read_anything && post != 200,
        "alpha's calls {used} (3 before the page), reloads {reloads}; the rebound page read \
         {reads} and its reload answered {post}; what the pages sent: {sent:?}"
    );
}

/// A page's `fetch` of a 3 MiB upload with a wrong key, refused before its body is read: over
/// `protocol`, five times, the page reads the 401 and its JSON `code` every time.
async fn fetch_refused_before_its_body(switches: &[&str], protocol: &str) {
    let s = support::pki::setup();
    let gw = s.builder.clone().start();
    let mut b = chromium(switches).await;
    // A page of the gateway's own origin (its 404), so the fetch needs no CORS.
    let origin = format!("https://localhost:{}", s.tls.port());
    b.call("Page.navigate", json!({ "url": format!("{origin}/") }))
        .await;
    b.until("document.readyState === 'complete' && location.protocol === 'https:'")
        .await;
    let script = format!(
        "(async () => {{
            const out = [];
            for (let i = 0; i < 5; i++) {{
                const form = new FormData();
                form.append('image', new Blob([new Uint8Array(3 << 20)], {{ type: 'image/jpeg' }}), 'face.jpg');
                try {{
                    const r = await fetch('{ROUTE}', {{ method: 'POST', headers: {{ Authorization: 'Bearer wrong-key' }}, body: form }});
                    out.push(r.status + ' ' + (await r.json()).code);
                }} catch (e) {{
                    out.push('failed: ' + e);
                }}
            }}
            const hops = performance.getEntriesByType('resource')
                .filter(e => e.name.endsWith('{ROUTE}')).map(e => e.nextHopProtocol);
            return {{ out, hops }};
        }})()"
    );
    let r = b
        .call(
            "Runtime.evaluate",
            json!({ "expression": script, "awaitPromise": true, "returnByValue": true }),
        )
        .await;
    let v = &r["result"]["value"];
    // After the answer the body is drained: the edge's head guard must take none of it for the
    // head of a next request.
    let cut = sample(
        &metrics_text(&gw.admin_url()).await,
        r#"liveness_gateway_connections_cut_total{reason="header_too_large"}"#,
    );
    assert_eq!(
        v["out"],
        json!(vec!["401 invalid_credentials"; 5]),
        "over {protocol}: {v}; connections the edge cut as a too-large head: {cut}"
    );
    assert_eq!(cut, 0.0);
    assert_eq!(v["hops"], json!(vec![protocol; 5]), "{v}");
    assert_eq!(s.emu.stats().calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_refused_before_its_body_reads_the_answer_over_http2() {
    fetch_refused_before_its_body(&["--ignore-certificate-errors"], "h2").await;
}

/// The same over HTTP/1.1 (TLS): the drained body passes the edge's connection guard as body,
/// not as the head of a next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_refused_before_its_body_reads_the_answer_over_http1() {
    fetch_refused_before_its_body(
        &["--ignore-certificate-errors", "--disable-http2"],
        "http/1.1",
    )
    .await;
}
