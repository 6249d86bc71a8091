//! Shared test harness: the real emulator and the real gateway on loopback ports, a builder for
//! gateway configs, a multipart builder that can also build broken bodies, and a raw HTTP client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use liveness_gateway::config::Config;
use liveness_gateway::server::RunningGateway;
use liveness_gateway_dev::emulator::{self, EmulatorConfig, EmulatorHandle, Fault};
use sha2::{Digest, Sha256};

pub mod chromium;
pub mod pki;

/// Run `check-config` on a file (with the organization key's variable set): whether it passed,
/// and what it printed.
pub fn check_config(path: &std::path::Path, offline: bool) -> (bool, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_liveness-gateway"));
    cmd.args(["check-config", "--config"])
        .arg(path)
        .env(ORG_KEY_ENV, ORG_KEY);
    if offline {
        cmd.arg("--offline");
    }
    let out = cmd.output().expect("check-config");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The fenced block in `lang` of a page of the repository (`docs/app-tokens.md`) that contains
/// `marker`: a snippet the docs show, to run as written.
pub fn docs_block(page: &str, lang: &str, marker: &str) -> String {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(page))
        .unwrap_or_else(|e| panic!("{page}: {e}"));
    let fence = format!("```{lang}\n");
    text.split(&fence)
        .skip(1)
        .filter_map(|rest| rest.split("\n```").next())
        .find(|block| block.contains(marker))
        .unwrap_or_else(|| panic!("{page} has no {lang} block with {marker:?}"))
        .to_string()
}

/// Give the snippets in `dir` the `jose` package, as an app has it: a node_modules beside them.
pub fn link_node_modules(dir: &Path) {
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snippets/node_modules");
    assert!(
        modules.join("jose").exists(),
        "tests/snippets/node_modules/jose is missing: run .ci/install-deps"
    );
    std::os::unix::fs::symlink(&modules, dir.join("node_modules")).expect("link");
}

/// `liveness-gateway tokens keygen`: a private key written to `key_file`, and its public JWKS.
pub fn tokens_keygen(alg: &str, kid: &str, key_file: &Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_liveness-gateway"))
        .args(["tokens", "keygen", "--alg", alg, "--kid", kid, "--key-file"])
        .arg(key_file)
        .output()
        .expect("tokens keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// A distinctive organization key: the leak test looks for it in every output.
pub const ORG_KEY: &str = "ORG-KEY-d41d8cd98f00b204e9800998ecf8427e-never-print-me";
pub const ORG_KEY_ENV: &str = "LG_TEST_ORG_KEY";

pub const ROUTE: &str = "/api/v1/backend/liveness/short/";

pub fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// The claims of a verdict receipt (a JWS), read without verifying it: to look at what a test
/// was sent (tests/receipts.rs verifies receipts with the backend snippets of docs/receipts.md).
pub fn receipt_claims(receipt: &str) -> serde_json::Value {
    use base64::Engine;
    let part = receipt.split('.').nth(1).expect("a JWS");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("json")
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn digest_of(key: &str) -> String {
    sha256_hex(key.as_bytes())
}

/// A loopback port nothing listens on, never the same one twice in this test process: the
/// kernel may hand a port just released to the next `bind(0)`, and a config would then get one
/// port for two listeners.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A valid JPEG that differs from `base` (bytes after the end-of-image marker), so its digest,
/// and the emulator's verdict, differ too.
/// Another image of the same pixels, the `n`th: its JFIF header's pixel density says `n`. (Bytes
/// after the image's end would not do: the provider never gets them, see
/// `image::without_metadata`.)
pub fn variant(base: &[u8], n: u64) -> Vec<u8> {
    assert_eq!(&base[6..11], b"JFIF\0", "a JPEG that starts with JFIF");
    let n = u32::try_from(n).expect("a variant number below 2^31");
    let mut v = base.to_vec();
    v[14..16].copy_from_slice(&(0x8000 | (n >> 16) as u16).to_be_bytes());
    v[16..18].copy_from_slice(&((n & 0xFFFF) as u16).to_be_bytes());
    v
}

/// A variant of face.jpg that the emulator passes (`want = true`) or fails.
pub fn image_with_verdict(want: bool, start: u64) -> (Vec<u8>, u64) {
    let base = fixture("face.jpg");
    (start..start + 10_000)
        .map(|n| (variant(&base, n), n))
        .find(|(v, _)| emulator::passes(v) == want)
        .expect("a variant with that verdict")
}

pub fn start_emulator() -> EmulatorHandle {
    emulator::spawn(EmulatorConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        api_key: ORG_KEY.into(),
        more_keys: Vec::new(),
        latency: Duration::ZERO,
        fault: Fault::None,
        tls: None,
    })
    .expect("emulator")
}

/// Builds a gateway config as a TOML table; tests change any field with `set`.
#[derive(Clone)]
pub struct TestGateway {
    table: toml::Table,
}

impl TestGateway {
    pub fn new(upstream: &str) -> Self {
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:{}"
admin_listen = "127.0.0.1:{}"
threads = 2
grace_period = "3s"
shutdown_delay = "1s"
# Tests that rewrite the config file reload it when they say so; the watcher's own test turns
# it on.
watch_config = false
# Every test client comes from 127.0.0.1.
max_connections_per_ip = 100000
admin_max_connections_per_ip = 100000

[upstream]
url = "{upstream}"
api_key_env = "{ORG_KEY_ENV}"
total_timeout = "5s"

[intake]
body_read_timeout = "2s"
body_deadline = "4s"

[limits]
default_rate_per_second = 1000
default_burst = 1000

# Tests drive one fault after another through one gateway; the breaker would (rightly) stop
# calling. Its own tests, and the chaos suite, turn it on.
[breaker]
enabled = false

[[tenants]]
id = "alpha"
key_sha256 = ["{}"]

[[tenants]]
id = "beta"
key_sha256 = ["{}"]

[[tenants]]
id = "off"
key_sha256 = ["{}"]
disabled = true
"#,
            free_port(),
            free_port(),
            digest_of("alpha-key"),
            digest_of("beta-key"),
            digest_of("off-key"),
        );
        TestGateway {
            table: text.parse().expect("toml"),
        }
    }

    pub fn for_emulator(emu: &EmulatorHandle) -> Self {
        TestGateway::new(&emu.url())
    }

    /// Set `section.key` (or `section.table.key`) to a TOML value written as text
    /// (`"\"1s\""`, `"5"`, `"true"`).
    pub fn set(mut self, path: &str, value: &str) -> Self {
        let v: toml::Value = format!("v = {value}")
            .parse::<toml::Table>()
            .expect("value")["v"]
            .clone();
        let mut segments: Vec<&str> = path.split('.').collect();
        let key = segments.pop().expect("key");
        assert!(!segments.is_empty(), "section.key");
        let mut t = &mut self.table;
        for s in segments {
            t = t
                .entry(s)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("table");
        }
        t.insert(key.into(), v);
        self
    }

    /// Set a field of tenant `id`.
    pub fn tenant_set(mut self, id: &str, key: &str, value: &str) -> Self {
        let v: toml::Value = format!("v = {value}")
            .parse::<toml::Table>()
            .expect("value")["v"]
            .clone();
        let tenants = self
            .table
            .get_mut("tenants")
            .and_then(|t| t.as_array_mut())
            .expect("tenants");
        let t = tenants
            .iter_mut()
            .find(|t| t.get("id").and_then(|i| i.as_str()) == Some(id))
            .expect("tenant");
        t.as_table_mut().expect("table").insert(key.into(), v);
        self
    }

    pub fn toml(&self) -> String {
        toml::to_string(&self.table).expect("toml")
    }

    pub fn config(&self) -> Config {
        self.config_with(&[])
    }

    /// The config as a process with these environment variables (besides the organization
    /// key's) reads it.
    pub fn config_with(&self, env: &[(&str, &str)]) -> Config {
        Config::from_toml(&self.toml(), &|n| {
            (n == ORG_KEY_ENV).then(|| ORG_KEY.to_string()).or_else(|| {
                env.iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.to_string())
            })
        })
        .expect("valid config")
    }

    pub fn start(self) -> RunningGateway {
        RunningGateway::start(
            self.config(),
            Arc::new(|n: &str| (n == ORG_KEY_ENV).then(|| ORG_KEY.to_string())),
        )
        .expect("gateway")
    }

    /// Start from a config file (so reloads can re-read it).
    pub fn start_from_file(self, path: &std::path::Path) -> RunningGateway {
        std::fs::write(path, self.toml()).expect("write config");
        let cfg = Config::load(path, &|n| (n == ORG_KEY_ENV).then(|| ORG_KEY.to_string()))
            .expect("valid config");
        RunningGateway::start(
            cfg,
            Arc::new(|n: &str| (n == ORG_KEY_ENV).then(|| ORG_KEY.to_string())),
        )
        .expect("gateway")
    }
}

/// One part of a hand-built multipart body.
pub struct Part {
    pub headers: String,
    pub data: Vec<u8>,
}

impl Part {
    pub fn file(name: &str, filename: &str, content_type: &str, data: &[u8]) -> Part {
        Part { headers: format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n"), data: data.to_vec() }
    }

    pub fn image(filename: &str, data: &[u8]) -> Part {
        Part::file("image", filename, "image/jpeg", data)
    }

    pub fn text(name: &str, value: &str) -> Part {
        Part {
            headers: format!("Content-Disposition: form-data; name=\"{name}\"\r\n"),
            data: value.as_bytes().to_vec(),
        }
    }
}

pub const BOUNDARY: &str = "----lgtestboundary7MA4YWxkTrZu0gW";

pub fn multipart_ct() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

pub fn multipart(parts: &[Part]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(format!("--{BOUNDARY}\r\n{}\r\n", p.headers).as_bytes());
        v.extend_from_slice(&p.data);
        v.extend_from_slice(b"\r\n");
    }
    v.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    v
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or("").to_string()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// POST a hand-built multipart body with the given headers.
pub async fn post(url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Answer {
    let mut req = client()
        .post(format!("{url}{ROUTE}"))
        .header("Content-Type", multipart_ct())
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.expect("body").to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

/// POST an image with a bearer key.
pub async fn post_image(url: &str, key: &str, filename: &str, image: &[u8]) -> Answer {
    post(
        url,
        &[("Authorization", &format!("Bearer {key}"))],
        multipart(&[Part::image(filename, image)]),
    )
    .await
}

/// Send raw bytes and read the answer (status and body), for requests a client library will not make.
pub fn raw(addr: SocketAddr, request: &[u8], timeout: Duration) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(timeout)).expect("timeout");
    let _ = s.write_all(request);
    read_response(&mut s)
}

pub fn read_response(s: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Some(complete) = complete_response(&buf) {
                    return complete;
                }
            }
            Err(_) => break,
        }
    }
    complete_response(&buf).unwrap_or((0, String::from_utf8_lossy(&buf).to_string()))
}

fn complete_response(buf: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    (body.len() >= len).then(|| (status, body[..len].to_string()))
}

pub fn json_code(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Read an admin endpoint as JSON.
pub async fn admin_json(admin_url: &str, path: &str) -> serde_json::Value {
    client()
        .get(format!("{admin_url}{path}"))
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("json")
}

/// `POST /admin/reload`: its status.
pub async fn admin_reload(admin_url: &str) -> u16 {
    client()
        .post(format!("{admin_url}/admin/reload"))
        .send()
        .await
        .expect("reload")
        .status()
        .as_u16()
}

pub async fn metrics_text(admin_url: &str) -> String {
    client()
        .get(format!("{admin_url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// The value of one sample line in Prometheus text (`name{labels}` exactly as rendered), or 0.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// The `X-Cache` label of an image upload's answer.
pub async fn cache_label(url: &str, key: &str, image: &[u8]) -> Option<String> {
    post_image(url, key, "a.jpg", image).await.header("x-cache")
}

/// The status of a GET.
pub async fn get_status(url: &str) -> u16 {
    client()
        .get(url)
        .send()
        .await
        .expect("GET")
        .status()
        .as_u16()
}

/// tests/clients/okhttp compiled against Debian's OkHttp 3 (once per test binary): the class
/// path to run its `EarlyAnswer` client with.
pub fn okhttp_classpath() -> String {
    static CLASSES: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let jars = "/usr/share/java/okhttp.jar:/usr/share/java/okio.jar";
    let classes = CLASSES.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("lg-okhttp-{}", std::process::id()));
        let out = std::process::Command::new("javac")
            .args(["-cp", jars, "-d"])
            .arg(&dir)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/clients/okhttp/EarlyAnswer.java"
            ))
            .output()
            .expect("javac (.ci/install-deps installs a JDK and libokhttp-java)");
        assert!(
            out.status.success(),
            "javac: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    });
    format!("{jars}:{}", classes.display())
}

/// A field of `/proc/PID/status` in KiB (`VmRSS:`, `VmHWM:`), 0 when it cannot be read.
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The last image the emulator received, byte for byte.
pub async fn emu_last_image(emu: &EmulatorHandle) -> Vec<u8> {
    client()
        .get(format!("{}/__emulator/last_image", emu.url()))
        .send()
        .await
        .expect("last image")
        .bytes()
        .await
        .expect("bytes")
        .to_vec()
}

/// A Prometheus server on `dir/prometheus.yml`, its data in `dir/data`, with `extra` flags, on
/// a free loopback port (returned).
pub fn start_prometheus(dir: &Path, extra: &[&str]) -> (KillOnDrop, u16) {
    let port = free_port();
    let prom = std::process::Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus (Debian package; .ci/install-deps installs it)");
    (KillOnDrop(prom), port)
}

/// A child process that is killed when the test ends, passing or not.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `liveness-gateway-dev` binary (the demo and the emulator as processes). It is another
/// package's, which cargo does not build for this one's tests: built here, once per test binary
/// (a no-op when it is up to date), with the profile these tests were built with.
pub fn dev_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let mut build = escargot::CargoBuild::new()
                .package("liveness-gateway-dev")
                .bin("liveness-gateway-dev")
                .current_release()
                .manifest_path(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
            // What cargo sets for a test run, so that this cargo sees the environment the one
            // that built the tests saw: some build scripts (ring's) rerun when `CARGO_PKG_NAME`
            // and the like change, and everything above them would be rebuilt, twice a run.
            for (name, _) in std::env::vars_os() {
                let name = name.to_string_lossy();
                let set_by_cargo = name.starts_with("CARGO_PKG_")
                    || name.starts_with("CARGO_BIN_EXE_")
                    || [
                        "CARGO_MANIFEST_DIR",
                        "CARGO_MANIFEST_PATH",
                        "CARGO_CRATE_NAME",
                        "CARGO_BIN_NAME",
                        "CARGO_PRIMARY_PACKAGE",
                        "CARGO_TARGET_TMPDIR",
                        "CARGO_RUSTC_CURRENT_DIR",
                        "OUT_DIR",
                    ]
                    .contains(&name.as_ref());
                if set_by_cargo {
                    build = build.env_remove(name.as_ref());
                }
            }
            build
                .run()
                .expect("build liveness-gateway-dev")
                .path()
                .to_path_buf()
        })
        .clone()
}

/// `liveness-gateway-dev demo` as a user runs it, on free ports, with the demo's own config but its
/// counts in a folder of the test's (a user of the demo has a daily budget that repeated runs
/// would use up). Killed on drop.
pub struct Demo {
    pub child: KillOnDrop,
    /// What it printed up to "Press Ctrl-C to stop."
    pub lines: Vec<String>,
    pub url: String,
    pub admin_url: String,
    pub emulator_url: String,
    /// The web page's origin (`--web-listen`).
    pub web: String,
    pub dir: tempfile::TempDir,
}

/// A demo is stopped as a user stops it (SIGTERM, like Ctrl-C), so that it cleans up its run
/// folder; killed if it has not stopped within 5 s.
impl Drop for Demo {
    fn drop(&mut self) {
        let pid = self.child.0.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < until {
            if let Ok(Some(_)) = self.child.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Demo {
    pub fn start() -> Demo {
        Demo::start_with(&[], None)
    }

    /// The demo with more arguments, its config's state file holding `seed` beforehand.
    pub fn start_with(args: &[&str], seed: Option<&str>) -> Demo {
        use std::io::BufRead;
        let (listen, admin, emulator, web) = (free_port(), free_port(), free_port(), free_port());
        let dir = tempfile::tempdir().expect("dir");
        let demo =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml"))
                .expect("demo.toml");
        let state = dir.path().join("budgets.json").display().to_string();
        let demo = demo.replace("/tmp/liveness-gateway-demo/budgets.json", &state);
        assert!(demo.contains(&state));
        std::fs::write(dir.path().join("demo.toml"), demo).expect("config");
        if let Some(seed) = seed {
            std::fs::write(dir.path().join("budgets.json"), seed).expect("state");
        }
        let mut child = KillOnDrop(
            std::process::Command::new(dev_binary())
                .arg("demo")
                .arg("--config")
                .arg(dir.path().join("demo.toml"))
                .arg("--listen")
                .arg(format!("127.0.0.1:{listen}"))
                .arg("--admin-listen")
                .arg(format!("127.0.0.1:{admin}"))
                .arg("--emulator-listen")
                .arg(format!("127.0.0.1:{emulator}"))
                .arg("--web-listen")
                .arg(format!("127.0.0.1:{web}"))
                .args(args)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("demo"),
        );
        let stdout = child.0.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let until = std::time::Instant::now() + Duration::from_secs(30);
        let mut lines = Vec::new();
        while !lines.iter().any(|l: &String| l.contains("Ctrl-C")) {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => lines.push(l),
                Err(_) => panic!("the demo did not start:\n{}", lines.join("\n")),
            }
        }
        Demo {
            child,
            lines,
            url: format!("http://127.0.0.1:{listen}"),
            admin_url: format!("http://127.0.0.1:{admin}"),
            emulator_url: format!("http://127.0.0.1:{emulator}"),
            web: format!("http://127.0.0.1:{web}"),
            dir,
        }
    }

    /// Calls the demo's emulator has received.
    pub async fn upstream_calls(&self) -> u64 {
        let stats: serde_json::Value = client()
            .get(format!("{}/__emulator/stats", self.emulator_url))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json");
        stats["calls"].as_u64().expect("calls")
    }
}

/// The real binary (`liveness-gateway serve`), its stdout and stderr in files; killed on drop.
pub struct GatewayProcess {
    pub child: KillOnDrop,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl GatewayProcess {
    /// Start the binary on a config file. `name` keeps the files of several processes in one
    /// folder apart; `upgrade` takes the sockets over from a running one (`-u`).
    pub fn spawn(
        config: &std::path::Path,
        dir: &std::path::Path,
        name: &str,
        upgrade: bool,
        env: &[(&str, &str)],
    ) -> Self {
        let (stdout, stderr) = (
            dir.join(format!("{name}.log")),
            dir.join(format!("{name}.err")),
        );
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_liveness-gateway"));
        cmd.args(["serve", "-c"])
            .arg(config)
            .arg("--upgrade-sock")
            .arg(dir.join("upgrade.sock"))
            .arg("--pid-file")
            .arg(dir.join(format!("{name}.pid")));
        if upgrade {
            cmd.arg("-u");
        }
        let child = cmd
            .env(ORG_KEY_ENV, ORG_KEY)
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("gateway binary");
        GatewayProcess {
            child: KillOnDrop(child),
            stdout,
            stderr,
        }
    }

    /// Write a `TestGateway`'s config into `dir`, start the binary on it, and wait until it is
    /// ready.
    pub async fn start(
        builder: &TestGateway,
        dir: &std::path::Path,
        env: &[(&str, &str)],
    ) -> (Self, Config) {
        let cfg = builder.config_with(env);
        let path = dir.join("gateway.toml");
        std::fs::write(&path, builder.toml()).expect("write config");
        let gw = GatewayProcess::spawn(&path, dir, "gw", false, env);
        wait_listening(&cfg).await;
        (gw, cfg)
    }

    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.child.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let until = std::time::Instant::now() + limit;
        loop {
            if let Some(s) = self.child.0.try_wait().expect("wait") {
                return s;
            }
            assert!(
                std::time::Instant::now() < until,
                "the gateway did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What it wrote to stdout so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// The JSON access lines written so far.
    pub fn access_lines(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .collect()
    }

    /// The access lines once there are at least `n`, or whatever there is after 5 s: a line is
    /// written once its answer is out, so a client can read its answer before the line exists.
    pub async fn access_lines_soon(&self, n: usize) -> Vec<serde_json::Value> {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let lines = self.access_lines();
            if lines.len() >= n || std::time::Instant::now() > until {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Wait until a gateway answers on its admin listener, then on its client one (which may come up
/// a moment later).
pub async fn wait_listening(cfg: &Config) {
    wait_ready(cfg.admin_listen).await;
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let plain = cfg.plain_listener.then_some(cfg.listen);
    for addr in plain.into_iter().chain(cfg.tls.as_ref().map(|t| t.listen)) {
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                std::time::Instant::now() < until,
                "the client listener {addr} did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Wait until a gateway's admin listener answers `/healthz`.
pub async fn wait_ready(admin: SocketAddr) {
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while client()
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < until,
            "the gateway did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A real `redis-server` on a free loopback port with its own folder (AOF on, so a restart keeps
/// what was written); killed on drop.
pub struct RedisServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<KillOnDrop>,
    extra: Vec<String>,
    /// What `redis-cli` needs besides the port (TLS, a password).
    cli_extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Start with extra `redis-server` arguments (`--cluster-enabled yes`, …).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        RedisServer::start_for_cli(extra, &[])
    }

    /// Start with extra `redis-server` arguments, and the ones `redis-cli` then needs.
    pub fn start_for_cli(extra: &[&str], cli_extra: &[&str]) -> RedisServer {
        RedisServer::launch(free_port(), extra, cli_extra)
    }

    /// Start on a given port (one a gateway was told of before Redis was there).
    pub fn start_on(port: u16) -> RedisServer {
        RedisServer::launch(port, &[], &[])
    }

    fn launch(port: u16, extra: &[&str], cli_extra: &[&str]) -> RedisServer {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        let mut r = RedisServer {
            port,
            dir: tempfile::tempdir().expect("redis dir"),
            child: None,
            extra: owned(extra),
            cli_extra: owned(cli_extra),
        };
        r.restart();
        r
    }

    /// TLS only (no plain port), with a password: certificate, key and the CA that signs
    /// them, as PEM files.
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path, password: &str) -> RedisServer {
        let port = free_port();
        let (cert, key, ca) = (
            cert.display().to_string(),
            key.display().to_string(),
            ca.display().to_string(),
        );
        let tls_port = port.to_string();
        // The plain port is given to the TLS listener; `--port 0` closes the plain one.
        let extra = [
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
            "--requirepass",
            password,
            "--port",
            "0",
        ];
        let cli = [
            "--tls",
            "--cacert",
            &ca,
            "--no-auth-warning",
            "-a",
            password,
        ];
        RedisServer::launch(port, &extra, &cli)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Start (again) on the same port and folder.
    pub fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--enable-debug-command", "yes"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--logfile", "redis.log"])
            .args(&self.extra)
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(KillOnDrop(child));
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while self.try_cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(std::time::Instant::now() < until, "redis did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no goodbye to clients, as a crash or an OOM kill.
    pub fn kill(&mut self) {
        self.child.take();
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(&self.cli_extra)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `redis-cli` on this server; its output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} failed"))
    }

    /// Every key under `prefix` (`lg` by default), by SCAN.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.cli(&["--scan", "--pattern", pattern])
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect()
    }
}

impl GatewayProcess {
    /// Start the binary on its own config file named after `name` (several in one folder).
    pub async fn start_named(
        builder: &TestGateway,
        dir: &std::path::Path,
        name: &str,
        env: &[(&str, &str)],
    ) -> (Self, Config) {
        let cfg = builder.config_with(env);
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, builder.toml()).expect("write config");
        let gw = GatewayProcess::spawn(&path, dir, name, false, env);
        wait_listening(&cfg).await;
        (gw, cfg)
    }
}

impl TestGateway {
    /// The same config on fresh ports: another replica.
    pub fn replica(&self) -> TestGateway {
        self.clone()
            .set("server.listen", &format!("\"127.0.0.1:{}\"", free_port()))
            .set(
                "server.admin_listen",
                &format!("\"127.0.0.1:{}\"", free_port()),
            )
    }
}

/// A loopback TCP forwarder whose target can be switched, as a DNS name or a virtual address in
/// front of a Redis that fails over: connections made before a switch stay with the old
/// target, as they do behind a name that moved. `silence` makes the connections open so far
/// go quiet both ways without closing, as a peer that died without a word.
pub struct TcpSwitch {
    pub port: u16,
    target: Arc<std::sync::atomic::AtomicU16>,
    /// Connections are numbered as they come; those below this number relay nothing, nor does
    /// the one of `silenced_one`.
    silenced_below: Arc<std::sync::atomic::AtomicU64>,
    silenced_one: Arc<std::sync::atomic::AtomicU64>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpSwitch {
    pub async fn start(target: u16) -> TcpSwitch {
        use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let target = Arc::new(AtomicU16::new(target));
        let silenced_below = Arc::new(AtomicU64::new(0));
        let silenced_one = Arc::new(AtomicU64::new(u64::MAX));
        let accepted = Arc::new(AtomicU64::new(0));
        let (to, silenced, one, count) = (
            target.clone(),
            silenced_below.clone(),
            silenced_one.clone(),
            accepted.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let number = count.fetch_add(1, Ordering::SeqCst);
                let Ok(outbound) =
                    tokio::net::TcpStream::connect(("127.0.0.1", to.load(Ordering::SeqCst))).await
                else {
                    continue;
                };
                let (a_read, a_write) = inbound.into_split();
                let (b_read, b_write) = outbound.into_split();
                for (mut from, mut into) in [(a_read, b_write), (b_read, a_write)] {
                    let (silenced, one) = (silenced.clone(), one.clone());
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            // Silenced: read and dropped, so the sender's kernel sees its bytes
                            // taken, as with a peer whose process hangs.
                            if number >= silenced.load(Ordering::SeqCst)
                                && number != one.load(Ordering::SeqCst)
                                && into.write_all(&buf[..n]).await.is_err()
                            {
                                break;
                            }
                        }
                    });
                }
            }
        });
        TcpSwitch {
            port,
            target,
            silenced_below,
            silenced_one,
            accepted,
            task,
        }
    }

    /// New connections go to `port` from now on.
    pub fn switch(&self, port: u16) {
        self.target.store(port, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many connections it has taken so far (the first is number 0).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connection number `n` relays nothing from now on, and stays open.
    pub fn silence_one(&self, n: u64) {
        self.silenced_one
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// The connections open so far relay nothing from now on, and stay open.
    pub fn silence(&self) {
        use std::sync::atomic::Ordering;
        self.silenced_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for TcpSwitch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every form in which `secret` could be read back from text: as is, JSON-escaped the way serde,
/// PHP (`\/`) and .NET (`\u002B`) write it, every character as `\uXXXX` (either case),
/// percent-encoded (either case) and base64 (standard and URL-safe). A client, a log reader or
/// a person decodes any of them at once.
pub fn secret_forms(secret: &str) -> Vec<String> {
    use base64::Engine;
    let serde = serde_json::to_string(secret).expect("json");
    let serde = serde[1..serde.len() - 1].to_string();
    let unicode = |upper: bool| {
        secret
            .encode_utf16()
            .map(|u| match upper {
                true => format!("\\u{u:04X}"),
                false => format!("\\u{u:04x}"),
            })
            .collect::<String>()
    };
    let percent = |upper: bool| {
        secret
            .bytes()
            .map(|b| match b {
                b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => (b as char).to_string(),
                b if upper => format!("%{b:02X}"),
                b => format!("%{b:02x}"),
            })
            .collect::<String>()
    };
    let dotnet = serde.replace('/', "\\/").replace('+', "\\u002B");
    let mut forms = vec![
        secret.to_string(),
        serde.clone(),
        serde.replace('/', "\\/"),
        dotnet.clone(),
        dotnet.replace("\\u002B", "\\u002b"),
        unicode(true),
        unicode(false),
        percent(true),
        percent(false),
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(secret),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
    ];
    forms.sort();
    forms.dedup();
    forms
}

/// Whether `text` holds `secret` in any of its `secret_forms`.
pub fn holds_secret(text: &str, secret: &str) -> bool {
    secret_forms(secret)
        .iter()
        .any(|f| text.contains(f.as_str()))
}

/// Whether an answer gives `secret` away: in a header, in the body as sent, or in any string
/// (key or value) of the body as a JSON client decodes it.
pub fn answer_holds_secret(a: &Answer, secret: &str) -> bool {
    fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
            serde_json::Value::Object(m) => m.iter().for_each(|(k, v)| {
                out.push(k.clone());
                strings(v, out)
            }),
            _ => {}
        }
    }
    let mut texts = vec![a.text()];
    for (k, v) in a.headers.iter() {
        texts.push(format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())));
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&a.body) {
        strings(&v, &mut texts);
    }
    texts.iter().any(|t| holds_secret(t, secret))
}
