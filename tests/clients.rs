//! The client guides of docs/clients.md ("Calling it from your stack"), exactly as printed there,
//! against a live gateway (the binary, with receipts) and the emulator: the Android sample
//! (Kotlin, OkHttp) compiled by kotlinc against Debian's OkHttp 3 and Android's `org.json`, and
//! run on the JVM; the web sample in headless Chromium, on a page of another origin, with a
//! canvas photo and a file-input photo; the backend samples with Python's `requests` and Node's
//! built-in `fetch`. The Swift sample cannot run here (no Swift toolchain): it is read, and the
//! body its `body.append` lines make is sent with the headers it sets.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::chromium::Browser;
use support::*;

const PAGE: &str = "docs/clients.md";

/// A gateway process with receipts on, in front of the emulator.
struct Live {
    gw: GatewayProcess,
    url: String,
    dir: tempfile::TempDir,
    _emu: liveness_gateway_dev::emulator::EmulatorHandle,
}

impl Live {
    async fn start(more: impl FnOnce(TestGateway) -> TestGateway) -> Live {
        let dir = tempfile::tempdir().expect("dir");
        let key = dir.path().join("receipt-key.pem");
        tokens_keygen("ES256", "r1", &key);
        let emu = start_emulator();
        let builder = more(
            TestGateway::for_emulator(&emu)
                .set("server.log_format", "\"json\"")
                .set("receipts.issuer", "\"https://liveness.test\"")
                .set(
                    "receipts.key_file",
                    &format!("{:?}", key.display().to_string()),
                ),
        );
        let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
        Live {
            gw,
            url: format!("http://{}", cfg.listen),
            dir,
            _emu: emu,
        }
    }

    /// A photo in the gateway's folder that the emulator passes (`live`) or fails; the `n`th.
    fn photo(&self, name: &str, live: bool, n: u64) -> PathBuf {
        let (image, _) = image_with_verdict(live, n * 1000);
        let path = self.dir.path().join(name);
        std::fs::write(&path, image).expect("photo");
        path
    }

    /// The statuses the gateway has logged so far.
    async fn statuses(&self, at_least: usize) -> Vec<u64> {
        self.gw
            .access_lines_soon(at_least)
            .await
            .iter()
            .filter_map(|l| l["status"].as_u64())
            .collect()
    }
}

/// The receipt is the gateway's, for this tenant, attempt, verdict and request.
fn check_receipt(receipt: &str, tenant: &str, nonce: &str, live: bool, request_id: &str) {
    let c = receipt_claims(receipt);
    assert_eq!(c["iss"], "https://liveness.test", "{c}");
    assert_eq!(c["aud"], tenant, "{c}");
    assert_eq!(c["nonce"], nonce, "{c}");
    assert_eq!(c["result"], live, "{c}");
    assert_eq!(c["request_id"], request_id, "{c}");
}

/// Run a program and return what it printed, each line parsed as JSON when it is JSON.
fn run(cmd: &mut Command, what: &str) -> Vec<String> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (.ci/install-deps installs it)"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

// ---------------------------------------------------------------------------------------------
// Android: Kotlin with OkHttp

const OKHTTP: &str = "/usr/share/java/okhttp.jar:/usr/share/java/okio.jar";
/// Android's own `org.json`, as Debian packages it (libandroid-json-java).
const ORG_JSON: &str = "/usr/share/java/com.android.json.jar";
const KOTLIN_STDLIB: &str = "/usr/share/java/kotlin-stdlib.jar";

/// What an app does with the sample's outcome: print it, one JSON line.
const KOTLIN_MAIN: &str = r#"import java.io.File
import org.json.JSONObject

fun main(args: Array<String>) {
    val outcome = LivenessClient(args[0], args[1]).check(File(args[2]).readBytes(), args[3])
    val out = JSONObject()
    when (outcome) {
        is LivenessOutcome.Verdict -> {
            out.put("live", outcome.live)
            out.put("receipt", outcome.receipt ?: JSONObject.NULL)
            out.put("request_id", outcome.requestId ?: JSONObject.NULL)
        }
        is LivenessOutcome.Refused -> {
            out.put("code", outcome.code)
            out.put("retry_after", outcome.retryAfter ?: JSONObject.NULL)
            out.put("request_id", outcome.requestId ?: JSONObject.NULL)
        }
    }
    println(out.toString())
}
"#;

/// The Android sample, compiled with kotlinc and run with `java`: a verdict with its receipt,
/// a failed verdict, a wrong key, and a rate limit's `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_android_sample_runs_with_okhttp_against_a_live_gateway() {
    let live = Live::start(|b| {
        b.tenant_set("beta", "rate", "\"1/h\"")
            .tenant_set("beta", "burst", "1")
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let sample = docs_block(PAGE, "kotlin", "class LivenessClient(");
    std::fs::write(dir.path().join("Liveness.kt"), &sample).expect("kt");
    std::fs::write(dir.path().join("Main.kt"), KOTLIN_MAIN).expect("kt");
    let classes = dir.path().join("classes");
    let started = Instant::now();
    run(
        Command::new("kotlinc")
            .arg(dir.path().join("Liveness.kt"))
            .arg(dir.path().join("Main.kt"))
            .args(["-cp", &format!("{OKHTTP}:{ORG_JSON}"), "-d"])
            .arg(&classes),
        "kotlinc",
    );
    eprintln!("kotlinc: {:?}", started.elapsed());
    let cp = format!("{}:{OKHTTP}:{ORG_JSON}:{KOTLIN_STDLIB}", classes.display());
    let check = |key: &str, photo: &Path, nonce: &str| -> Value {
        let lines = run(
            Command::new("java")
                .args(["-cp", &cp, "MainKt", &live.url, key])
                .arg(photo)
                .arg(nonce),
            "java (the Kotlin sample)",
        );
        parse(lines.last().expect("a line"))
    };

    let passes = live.photo("pass.jpg", true, 1);
    let a = check("alpha-key", &passes, "android-attempt-1");
    assert_eq!(a["live"], true, "{a}");
    let request_id = a["request_id"].as_str().expect("X-Request-Id");
    assert_eq!(request_id.len(), 36, "the sample's own UUID: {a}");
    let receipt = a["receipt"].as_str().expect("a receipt");
    check_receipt(receipt, "alpha", "android-attempt-1", true, request_id);

    let fails = live.photo("fail.jpg", false, 2);
    let b = check("alpha-key", &fails, "android-attempt-2");
    assert_eq!(b["live"], false, "{b}");
    check_receipt(
        b["receipt"].as_str().expect("a receipt"),
        "alpha",
        "android-attempt-2",
        false,
        b["request_id"].as_str().expect("id"),
    );

    let wrong = check("not-a-key", &passes, "android-attempt-3");
    assert_eq!(wrong["code"], "invalid_credentials", "{wrong}");
    assert!(wrong["request_id"].is_string(), "{wrong}");

    assert_eq!(check("beta-key", &passes, "n-4")["live"], true);
    let limited = check("beta-key", &passes, "n-5");
    assert_eq!(limited["code"], "rate_limited", "{limited}");
    assert!(
        limited["retry_after"].as_u64().unwrap_or(0) > 0,
        "{limited}"
    );
}

// ---------------------------------------------------------------------------------------------
// iOS: Swift with URLSession (read, not run)

/// A Swift string literal's text, with `\(name)` interpolations given by `vars`.
fn swift_string(literal: &str, vars: &[(&str, &str)]) -> String {
    let mut s = literal.to_string();
    for (name, value) in vars {
        s = s.replace(&format!("\\({name})"), value);
    }
    assert!(
        !s.contains("\\("),
        "an interpolation this test does not know: {literal}"
    );
    s.replace("\\r", "\r")
        .replace("\\n", "\n")
        .replace("\\\"", "\"")
}

/// The text between the first `"` and the last `"` of a line.
fn quoted(line: &str) -> &str {
    let start = line.find('"').expect("a string") + 1;
    let end = line.rfind('"').expect("a string");
    &line[start..end]
}

/// The Swift sample sends the `image` part with a `.jpg` name, the form's type with its
/// boundary, `Authorization: Bearer`, `X-Request-Id` and `Liveness-Nonce`, and reads the
/// verdict, `Liveness-Receipt`, `Retry-After` and `X-Request-Id`; the body its `body.append`
/// lines make, sent with the headers it sets, gets a verdict and a receipt from a live gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swift_sample_sends_what_the_gateway_reads() {
    let swift = docs_block(PAGE, "swift", "func checkLiveness(");
    for needle in [
        "name=\\\"image\\\"; filename=\\\"face.jpg\\\"",
        "Content-Type: image/jpeg\\r\\n\\r\\n",
        "\"multipart/form-data; boundary=\\(boundary)\", forHTTPHeaderField: \"Content-Type\"",
        "\"Bearer \\(credential)\", forHTTPHeaderField: \"Authorization\"",
        "forHTTPHeaderField: \"X-Request-Id\"",
        "(nonce, forHTTPHeaderField: \"Liveness-Nonce\")",
        "request.httpMethod = \"POST\"",
        "gateway + \"/api/v1/backend/liveness/short/\"",
        "http.value(forHTTPHeaderField: \"Liveness-Receipt\")",
        "http.value(forHTTPHeaderField: \"Retry-After\")",
        "http.value(forHTTPHeaderField: \"X-Request-Id\")",
        "json[\"result\"] as? Bool",
        "json[\"code\"] as? String",
        "\"\\r\\n--\\(boundary)--\\r\\n\"",
    ] {
        assert!(
            swift.contains(needle),
            "{PAGE}: the Swift sample lacks {needle}"
        );
    }
    // No force unwraps or `try!` on the request's path.
    assert!(
        !swift.replace("!=", "").contains('!'),
        "{PAGE}: the Swift sample force-unwraps"
    );

    let live = Live::start(|b| b).await;
    let (image, _) = image_with_verdict(true, 3000);
    let boundary = "liveness-5A1D7C7E-0D3B-4C5E-9E1F-2B8C4D6A7F90";
    let vars = [("boundary", boundary), ("credential", "alpha-key")];
    // The body, line by line as the sample appends it.
    let mut body = Vec::new();
    for line in swift.lines().map(str::trim) {
        let Some(arg) = line.strip_prefix("body.append(") else {
            continue;
        };
        if arg == "jpeg)" {
            body.extend_from_slice(&image);
        } else {
            assert!(arg.ends_with(".utf8))"), "{line}");
            body.extend_from_slice(swift_string(quoted(line), &vars).as_bytes());
        }
    }
    // The headers it sets: a literal, the nonce, or a new UUID.
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in swift.lines().map(str::trim) {
        let Some(args) = line.strip_prefix("request.setValue(") else {
            continue;
        };
        let (value, name) = args
            .split_once(", forHTTPHeaderField: ")
            .expect("setValue(value, forHTTPHeaderField: name)");
        let name = quoted(name).to_string();
        let value = match value {
            "nonce" => "ios-attempt-1".to_string(),
            "UUID().uuidString" => "1F0E2D3C-4B5A-4978-8A6B-5C4D3E2F1A0B".to_string(),
            literal => swift_string(quoted(literal), &vars),
        };
        headers.push((name, value));
    }
    let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "Content-Type",
            "Authorization",
            "X-Request-Id",
            "Liveness-Nonce"
        ]
    );
    let mut request = client().post(format!("{}{ROUTE}", live.url)).body(body);
    for (name, value) in &headers {
        request = request.header(name, value);
    }
    let a = request.send().await.expect("the request");
    let status = a.status().as_u16();
    let header = |name: &str| {
        a.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let request_id = header("x-request-id").expect("X-Request-Id");
    let receipt = header("liveness-receipt");
    let text = a.text().await.expect("body");
    assert_eq!(status, 200, "{text}");
    assert_eq!(parse(&text)["result"], true, "{text}");
    assert_eq!(request_id, "1F0E2D3C-4B5A-4978-8A6B-5C4D3E2F1A0B");
    check_receipt(
        &receipt.expect("a receipt"),
        "alpha",
        "ios-attempt-1",
        true,
        &request_id,
    );
}

// ---------------------------------------------------------------------------------------------
// The web: fetch and FormData in headless Chromium

/// A page server on its own origin (`http://127.0.0.1:<port>`): every request gets `html`.
struct PageServer {
    origin: String,
}

impl PageServer {
    fn start(html: String) -> PageServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let origin = format!("http://{}", listener.local_addr().expect("addr"));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { break };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{html}",
                    html.len()
                );
            }
        });
        PageServer { origin }
    }
}

/// Open the sample's page at `url` and wait for it to load.
async fn open(browser: &mut Browser, url: &str) {
    browser.call("Page.navigate", json!({ "url": url })).await;
    let until = Instant::now() + Duration::from_secs(20);
    while browser
        .eval("document.readyState === 'complete' && typeof checkLiveness === 'function'")
        .await
        != Value::Bool(true)
    {
        assert!(Instant::now() < until, "the page did not load");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The web sample in a page of its own origin, which the gateway allows: a canvas photo and a
/// file-input photo each get a verdict, the request id and the receipt (read across origins); a
/// wrong key's code; and a Blob appended without a file name is refused as the page says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_sample_runs_in_chromium_against_a_live_gateway() {
    let sample = docs_block(PAGE, "js", "async function checkLiveness(gateway");
    let page = PageServer::start(format!(
        "<!doctype html><meta charset=\"utf-8\"><title>liveness</title>\
         <input type=\"file\" id=\"photo\"><canvas id=\"camera\" width=\"640\" height=\"480\"></canvas>\
         <script>\n{sample}\n</script>"
    ));
    let origin = page.origin.clone();
    let live = Live::start(|b| b.set("cors.allowed_origins", &format!("[{origin:?}]"))).await;
    let mut browser = Browser::launch_with(&[]).await;
    open(&mut browser, &format!("{origin}/")).await;
    let gateway = json!(live.url);

    // A camera frame drawn on the canvas (a test pattern with noise, as a camera gives).
    let from_canvas = browser
        .eval(&format!(
            "(async () => {{
               const c = document.getElementById('camera'), g = c.getContext('2d');
               const img = g.createImageData(c.width, c.height);
               for (let i = 0; i < img.data.length; i += 4) {{
                 img.data[i] = (i / 4) % 640 / 3; img.data[i + 1] = Math.random() * 255;
                 img.data[i + 2] = 128; img.data[i + 3] = 255;
               }}
               g.putImageData(img, 0, 0);
               return await checkLiveness({gateway}, 'alpha-key', await canvasPhoto(c), 'web-attempt-1');
             }})()"
        ))
        .await;
    assert_eq!(from_canvas["ok"], true, "{from_canvas}");
    assert!(from_canvas["live"].is_boolean(), "{from_canvas}");
    assert_eq!(from_canvas["code"], Value::Null, "{from_canvas}");
    let request_id = from_canvas["requestId"]
        .as_str()
        .expect("X-Request-Id read");
    assert_eq!(request_id.len(), 36, "the page's own UUID: {from_canvas}");
    let receipt = from_canvas["receipt"].as_str().expect("a receipt read");
    check_receipt(
        receipt,
        "alpha",
        "web-attempt-1",
        from_canvas["live"] == true,
        request_id,
    );

    // A photo from the library whose name says nothing of its type.
    let chosen = live.photo("IMG_0042", true, 4);
    browser.choose(&chosen).await;
    let from_file = browser
        .eval(&format!(
            "checkLiveness({gateway}, 'alpha-key', document.getElementById('photo').files[0], 'web-attempt-2')"
        ))
        .await;
    assert_eq!(from_file["ok"], true, "{from_file}");
    assert_eq!(from_file["live"], true, "{from_file}");
    check_receipt(
        from_file["receipt"].as_str().expect("a receipt"),
        "alpha",
        "web-attempt-2",
        true,
        from_file["requestId"].as_str().expect("id"),
    );

    let wrong = browser
        .eval(&format!(
            "checkLiveness({gateway}, 'not-a-key', document.getElementById('photo').files[0], 'web-attempt-3')"
        ))
        .await;
    assert_eq!(wrong["ok"], false, "{wrong}");
    assert_eq!(wrong["code"], "invalid_credentials", "{wrong}");
    assert_eq!(wrong["receipt"], Value::Null, "{wrong}");

    // What the page warns of: the same photo as a Blob without a file name.
    let unnamed = browser
        .eval(&format!(
            "(async () => {{
               const form = new FormData();
               form.append('image', new Blob([await document.getElementById('photo').files[0].arrayBuffer()], {{ type: 'image/jpeg' }}));
               const res = await fetch({gateway} + '/api/v1/backend/liveness/short/', {{
                 method: 'POST', headers: {{ Authorization: 'Bearer alpha-key' }}, body: form }});
               return {{ status: res.status, code: (await res.json()).code }};
             }})()"
        ))
        .await;
    assert_eq!(
        unnamed,
        json!({ "status": 415, "code": "extension_not_allowed" })
    );
}

// ---------------------------------------------------------------------------------------------
// Backends: Python with requests, Node with fetch

/// What a backend does with the Python sample: one JSON line for each photo and nonce.
const PYTHON_MAIN: &str = r#"
import json
import sys

from liveness import LivenessError, check_liveness

args = sys.argv[1:]
for photo, nonce in zip(args[::2], args[1::2]):
    try:
        verdict, receipt = check_liveness(photo, nonce or None)
        print(json.dumps({"verdict": verdict, "receipt": receipt}))
    except LivenessError as e:
        print(json.dumps({"status": e.status, "code": e.code, "retry_after": e.retry_after, "request_id": e.request_id}))
"#;

/// The Python sample: a verdict with its receipt (JPEG and PNG), a short `Retry-After` waited
/// out once, and a wrong key's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_backend_sample_runs_against_a_live_gateway() {
    let live = Live::start(|b| {
        b.tenant_set("beta", "rate_per_second", "1")
            .tenant_set("beta", "burst", "1")
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let sample = docs_block(PAGE, "python", "def check_liveness(");
    std::fs::write(dir.path().join("liveness.py"), &sample).expect("py");
    std::fs::write(dir.path().join("main.py"), PYTHON_MAIN).expect("py");
    let python = |key: &str, args: &[&str]| -> Vec<Value> {
        run(
            Command::new("python3")
                .arg("main.py")
                .args(args)
                .env("LIVENESS_GATEWAY_URL", &live.url)
                .env("LIVENESS_TENANT_KEY", key)
                .current_dir(dir.path()),
            "python3 (the Python sample)",
        )
        .iter()
        .map(|l| parse(l))
        .collect()
    };
    let passes = live.photo("pass.jpg", true, 5);
    let png = dir.path().join("face.png");
    std::fs::write(&png, fixture("face.png")).expect("png");
    let p = passes.display().to_string();
    let q = png.display().to_string();

    let got = python("alpha-key", &[&p, "py-attempt-1", &q, ""]);
    assert_eq!(got[0]["verdict"]["result"], true, "{}", got[0]);
    let receipt = got[0]["receipt"].as_str().expect("a receipt");
    assert_eq!(receipt_claims(receipt)["nonce"], "py-attempt-1");
    assert_eq!(receipt_claims(receipt)["result"], true);
    assert!(
        got[1]["verdict"]["result"].is_boolean(),
        "the PNG: {}",
        got[1]
    );
    assert_eq!(
        receipt_claims(got[1]["receipt"].as_str().expect("r"))["nonce"],
        Value::Null
    );

    let wrong = python("not-a-key", &[&p, ""]);
    assert_eq!(wrong[0]["code"], "invalid_credentials", "{}", wrong[0]);
    assert_eq!(wrong[0]["status"], 401);
    assert!(wrong[0]["request_id"].is_string());

    // Tenant `beta` may call once a second: the second call is refused for a second, and the
    // sample waits that out and gets its verdict.
    let before = live.statuses(3).await.len();
    let limited = python("beta-key", &[&p, "py-a", &p, "py-b"]);
    assert!(
        limited.iter().all(|v| v["verdict"]["result"] == true),
        "{limited:?}"
    );
    // The first call's line and the refusal's may come in either order (a line is written
    // once its answer is out, and the sample's next request, on a connection of its own, can
    // be logged first); the retry comes a second later, last.
    let statuses = live.statuses(before + 3).await;
    let mut first_two = statuses[before..before + 2].to_vec();
    first_two.sort_unstable();
    assert_eq!(
        (first_two, statuses.get(before + 2)),
        (vec![200, 429], Some(&200)),
        "{statuses:?}"
    );
}

/// What a backend does with the Node sample: one JSON line.
const NODE_MAIN: &str = r#"
import { checkLiveness, LivenessError } from "./liveness.mjs";

const [photo, nonce] = process.argv.slice(2);
try {
  console.log(JSON.stringify(await checkLiveness(photo, { nonce })));
} catch (e) {
  if (!(e instanceof LivenessError)) throw e;
  console.log(JSON.stringify({ status: e.status, code: e.code, retryAfter: e.retryAfter, requestId: e.requestId }));
}
"#;

/// The Node sample: a verdict with its receipt (JPEG and PNG), a wrong key's code, and a rate
/// limit's `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_backend_sample_runs_against_a_live_gateway() {
    let live = Live::start(|b| {
        b.tenant_set("beta", "rate", "\"1/h\"")
            .tenant_set("beta", "burst", "1")
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let sample = docs_block(PAGE, "js", "export async function checkLiveness(photoPath");
    std::fs::write(dir.path().join("liveness.mjs"), &sample).expect("js");
    std::fs::write(dir.path().join("main.mjs"), NODE_MAIN).expect("js");
    let node = |key: &str, photo: &Path, nonce: &str| -> Value {
        let lines = run(
            Command::new("node")
                .arg("main.mjs")
                .arg(photo)
                .arg(nonce)
                .env("LIVENESS_GATEWAY_URL", &live.url)
                .env("LIVENESS_TENANT_KEY", key)
                .current_dir(dir.path()),
            "node (the Node sample)",
        );
        parse(lines.last().expect("a line"))
    };
    let passes = live.photo("pass.jpg", true, 6);
    let got = node("alpha-key", &passes, "node-attempt-1");
    assert_eq!(got["verdict"]["result"], true, "{got}");
    let receipt = got["receipt"].as_str().expect("a receipt");
    assert_eq!(receipt_claims(receipt)["nonce"], "node-attempt-1");
    assert_eq!(receipt_claims(receipt)["result"], true);

    let png = dir.path().join("face.png");
    std::fs::write(&png, fixture("face.png")).expect("png");
    let as_png = node("alpha-key", &png, "node-attempt-2");
    assert!(as_png["verdict"]["result"].is_boolean(), "{as_png}");

    let wrong = node("not-a-key", &passes, "node-attempt-3");
    assert_eq!(wrong["code"], "invalid_credentials", "{wrong}");
    assert_eq!(wrong["status"], 401);
    assert!(wrong["requestId"].is_string(), "{wrong}");

    assert_eq!(node("beta-key", &passes, "n-4")["verdict"]["result"], true);
    let limited = node("beta-key", &passes, "n-5");
    assert_eq!(limited["code"], "rate_limited", "{limited}");
    assert_eq!(limited["status"], 429);
    assert!(limited["retryAfter"].as_u64().unwrap_or(0) > 0, "{limited}");
}
