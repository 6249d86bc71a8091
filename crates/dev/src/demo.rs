//! The offline demo: the gateway (in-process, on `config/demo.toml`) in front of the emulator,
//! with a made-up organization key given to both, an app-token issuer whose token it prints, and
//! the web page `examples/web/index.html` served from an origin of its own (by default
//! `http://127.0.0.1:8082`) so that a browser calls the gateway across origins, as a web app
//! would, through the gateway's CORS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use liveness_gateway::config::{Config, JwksSource};
use liveness_gateway::server::{self, RunningGateway, SharedEnv};
use liveness_gateway::{auth, auth::tenant, logging};

use crate::emulator::{self, EmulatorConfig, EmulatorHandle, Fault};

/// The page, carried in the binary: the demo runs outside the repository too.
pub const PAGE: &str = include_str!("../../../examples/web/index.html");

/// The demo's config, carried in the binary for the same reason.
pub const CONFIG: &str = include_str!("../../../config/demo.toml");
/// Where `--config` points unless told otherwise (relative to the working directory).
pub const CONFIG_PATH: &str = "config/demo.toml";

/// The variable the demo's config reads the organization key from.
const KEY_ENV: &str = "LIVENESS_DEMO_ORG_KEY";
/// The variable the demo's config reads the receipts' signing key from.
const RECEIPT_KEY_ENV: &str = "LIVENESS_DEMO_RECEIPT_KEY";
/// Where the demo keeps its counts and its app-token JWKS.
const DIR: &str = "/tmp/liveness-gateway-demo";
/// The demo config's app-token issuer.
const ISSUER: &str = "demo-backend";

/// Where each part of the demo listens, and its config.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    /// Instead of the config's `server.listen`.
    pub listen: Option<SocketAddr>,
    /// Instead of the config's `server.admin_listen`.
    pub admin_listen: Option<SocketAddr>,
    pub emulator_listen: SocketAddr,
    pub web_listen: SocketAddr,
    /// Keep the config's state file (budgets and usage of earlier runs) instead of a fresh one.
    pub keep_state: bool,
}

/// Run the demo until Ctrl-C, having printed where each part is and how to call it.
pub fn run(opts: Options) -> anyhow::Result<()> {
    // The demo's organization key is made up here and given to both sides; nothing leaves the machine.
    let org_key =
        std::env::var(KEY_ENV).unwrap_or_else(|_| format!("demo-org-{}", tenant::new_key()));
    // Its receipts' signing key, made now (a deployment keeps its own, see docs/receipts.md).
    let (receipt_key, _) = auth::tools::keygen("EdDSA", "demo").map_err(anyhow::Error::msg)?;
    let env = demo_env(org_key.clone(), receipt_key);
    // The demo's app-token issuer: a signing key made now, its JWKS where the config reads it,
    // and a token printed below.
    let (signing_key, jwks) = auth::tools::keygen("ES256", "demo-1").map_err(anyhow::Error::msg)?;
    // This run's own folder (removed however the demo ends): its JWKS, and unless
    // `--keep-state` its counts. Two demos on other ports never read each other's keys.
    let run = RunDir::make()?;
    let run_jwks = run.0.join("jwks.json");
    std::fs::write(&run_jwks, jwks.to_string())?;
    // The copy the config names (and the docs show).
    std::fs::write(format!("{DIR}/jwks.json"), jwks.to_string())?;
    let mut cfg = load_config(&opts, &env)?;
    for issuer in cfg.issuers.iter_mut().filter(|i| i.id == ISSUER) {
        issuer.jwks = JwksSource::File(run_jwks.clone());
    }
    // A newcomer's first `/admin/usage` shows the calls they made, not an earlier run's.
    if !opts.keep_state {
        cfg.budgets.state_file = Some(run.0.join("budgets.json"));
    }
    server::ensure_ports_free(&cfg)
        .context("the demo's gateway (move it with --listen and --admin-listen)")?;
    logging::init(cfg.log_format);
    let emu = emulator::spawn(EmulatorConfig {
        listen: opts.emulator_listen,
        api_key: org_key,
        more_keys: Vec::new(),
        latency: Duration::from_millis(50),
        fault: Fault::None,
        tls: None,
    })
    .context("the demo's emulator (move it with --emulator-listen)")?;
    cfg.upstream.connect_address = Some(emu.addr.ip());
    cfg.upstream.port = emu.addr.port();
    cfg.upstream.tls = false;
    let page = PageServer::bind(opts.web_listen, &format!("http://{}", cfg.listen))?;
    let page_origin = page.origin()?;
    if !cfg.cors.allowed_origins.contains(&page_origin) {
        cfg.cors.allowed_origins.push(page_origin.clone());
    }
    let gw = RunningGateway::start(cfg, env)?;
    let token = token(&gw.state.runtime().config, &signing_key);
    print_banner(&gw, &emu, &page_origin, token.as_deref());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.map_err(anyhow::Error::from),
            _ = term.recv() => Ok(()),
            r = page.run() => r,
        }
    })?;
    drop(gw);
    drop(emu);
    Ok(())
}

/// This run's folder, removed when it is dropped.
struct RunDir(PathBuf);

impl RunDir {
    fn make() -> anyhow::Result<RunDir> {
        let dir = Path::new(DIR).join(format!("run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(RunDir(dir))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The process environment, with the demo's organization key and receipts' signing key in the
/// variables its config names.
fn demo_env(key: String, receipt_key: String) -> SharedEnv {
    Arc::new(move |n: &str| {
        if n == KEY_ENV {
            Some(key.clone())
        } else if n == RECEIPT_KEY_ENV {
            Some(receipt_key.clone())
        } else {
            std::env::var(n).ok()
        }
    })
}

/// The demo's config with the listeners asked for, and the folder of its counts made.
fn load_config(opts: &Options, env: &SharedEnv) -> anyhow::Result<Config> {
    // Outside the repository the default file is not there: the demo carries its own copy.
    let mut cfg = if opts.config == Path::new(CONFIG_PATH) && !opts.config.exists() {
        Config::from_toml(CONFIG, &|n| env(n))?
    } else {
        liveness_gateway::state::check::load(&opts.config, &|n| env(n))?
    };
    if let Some(dir) = cfg.budgets.state_file.as_ref().and_then(|f| f.parent()) {
        std::fs::create_dir_all(dir)?;
    }
    if let Some(a) = opts.listen {
        cfg.listen = a;
    }
    if let Some(a) = opts.admin_listen {
        cfg.admin_listen = a;
    }
    Ok(cfg)
}

/// A token of the demo's issuer, when its config has it.
fn token(cfg: &Config, key_pem: &str) -> Option<String> {
    let issuer = cfg.issuers.iter().find(|i| i.id == ISSUER)?;
    let m = auth::tools::Mint {
        alg: "ES256",
        kid: "demo-1",
        issuer: &issuer.issuer,
        audience: issuer.audiences.first()?,
        subject: "demo-user",
        ttl: Duration::from_secs(3600),
        jti: false,
        nonce: None,
    };
    auth::tools::mint(key_pem, &m).ok()
}

fn print_banner(gw: &RunningGateway, emu: &EmulatorHandle, page_origin: &str, token: Option<&str>) {
    let (url, admin) = (gw.url(), gw.admin_url());
    println!("liveness-gateway demo");
    println!("  gateway:  {url}/api/v1/backend/liveness/short/");
    println!("  admin:    {admin}/healthz  {admin}/metrics  {admin}/admin/usage");
    println!("  emulator: {} (stats at /__emulator/stats)", emu.url());
    println!(
        "  web page: {page_origin}/ (a browser client: a photo or the camera; tenant key demo-key)"
    );
    println!("Try it (tenant key demo-key; demo-limited-key shows the limits):");
    println!("  curl -s -X POST '{url}/api/v1/backend/liveness/short/' -H 'accept: application/json' -H 'Authorization: Bearer demo-key' -F 'image=@tests/fixtures/face.jpg;type=image/jpeg'");
    if let Some(token) = token {
        println!(
            "An app token (tenant demo-app, user demo-user, valid 1 h; 2 calls a day per user):"
        );
        println!("  {token}");
        // Another photo than the tenant key's line: the same one would (rightly) be flagged as a
        // pass replayed through another tenant.
        println!("  curl -s -X POST '{url}/api/v1/backend/liveness/short/' -H 'Authorization: Bearer {token}' -F 'image=@tests/fixtures/face.png;type=image/png'");
    }
    println!("Press Ctrl-C to stop.");
}

/// A listener for the page, bound before the demo says it is ready.
pub struct PageServer {
    listener: std::net::TcpListener,
    /// Where `/` sends a browser: the page, told which gateway to call.
    start: Arc<str>,
}

impl PageServer {
    pub fn bind(listen: SocketAddr, gateway_url: &str) -> anyhow::Result<PageServer> {
        let listener = std::net::TcpListener::bind(listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (--web-listen): {e}"))?;
        listener.set_nonblocking(true)?;
        // `scheme://host:port` is already valid in a query (RFC 3986 allows `:` and `/` there).
        let start = format!("/index.html?gateway={gateway_url}");
        Ok(PageServer {
            listener,
            start: start.into(),
        })
    }

    /// The page's origin, as a browser sends it in `Origin`.
    pub fn origin(&self) -> anyhow::Result<String> {
        Ok(format!("http://{}", self.listener.local_addr()?))
    }

    /// Serve until the future is dropped.
    pub async fn run(self) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::from_std(self.listener)?;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let start = self.start.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let start = start.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&req, &start)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}

fn answer<B>(req: &Request<B>, start: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body, location) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/") => {
            (StatusCode::SEE_OTHER, "text/plain", "", Some(start))
        }
        (&Method::GET | &Method::HEAD, "/index.html") => {
            (StatusCode::OK, "text/html; charset=utf-8", PAGE, None)
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n", None),
    };
    let mut r = Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .header("x-content-type-options", "nosniff");
    if let Some(l) = location {
        r = r.header("location", l);
    }
    r.body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_sends_the_browser_to_the_page_with_its_gateway() {
        let server = PageServer::bind(
            "127.0.0.1:0".parse().expect("addr"),
            "http://127.0.0.1:8080",
        )
        .expect("bind");
        let req = Request::get("/").body(()).expect("request");
        let r = answer(&req, &server.start);
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(
            r.headers()["location"],
            "/index.html?gateway=http://127.0.0.1:8080"
        );
        let page = answer(&Request::get("/index.html").body(()).expect("request"), "");
        assert_eq!(page.status(), StatusCode::OK);
        let other = answer(
            &Request::get("/../Cargo.toml").body(()).expect("request"),
            "",
        );
        assert_eq!(other.status(), StatusCode::NOT_FOUND);
        let post = answer(&Request::post("/index.html").body(()).expect("request"), "");
        assert_eq!(post.status(), StatusCode::NOT_FOUND);
    }
}
