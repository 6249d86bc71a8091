//! `[server]`: the listeners, the admin token, threads, logs, the stop, and the edge guards.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{AdminToken, EdgeConfig, EnvLookup, ForwardedHeader, Issues, TrustedProxies};

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawServer {
    /// Client-facing listener.
    pub listen: String,
    /// Admin listener (health, metrics, usage, cache). Keep it on loopback unless `admin_token_env` is set.
    pub admin_listen: String,
    /// Environment variable holding a bearer token required on the admin listener (optional).
    pub admin_token_env: Option<String>,
    /// DNS names the admin listener answers besides its addresses and `localhost` (a
    /// Kubernetes service name, a compose service name that Prometheus scrapes).
    pub admin_hosts: Vec<String>,
    /// Worker threads of the client-facing service.
    pub threads: usize,
    /// `text` or `json` log lines.
    pub log_format: LogFormat,
    /// How long a graceful shutdown (SIGTERM) waits for in-flight requests. Keep it at least as
    /// long as the longest upstream call (`upstream.total_timeout` + 2 × `limits.upstream_queue_timeout`),
    /// or a stop cuts calls the provider may bill; `check-config` warns otherwise. The process
    /// exits as soon as nothing is in flight, so a long grace period costs nothing when idle.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    /// After SIGTERM, how long the gateway keeps accepting and serving while `/readyz` answers
    /// 503, so that load balancers take it out of rotation before it stops accepting.
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
    /// Reload when the config file or the organization key file changes (a Kubernetes
    /// ConfigMap or Secret update, an edit), with the same all-or-nothing rule as SIGHUP.
    pub watch_config: bool,
    /// Longest time to receive a request head: from the accept (or, on a kept-alive connection,
    /// from its first byte) to the blank line that ends it. Past it: 408 `header_timeout`.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Longest idle time between requests on a kept-alive connection.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Largest request head (request line and headers). Past it: 431 `header_too_large`.
    pub max_header_bytes: usize,
    /// Most client connections open at once; more are closed at once, before a byte is read.
    pub max_connections: usize,
    /// Most connections open at once from one address (trusted proxies are exempt; behind them
    /// it caps the requests in flight per client address, as `X-Forwarded-For` names it).
    pub max_connections_per_ip: usize,
    /// Addresses and networks of the proxies in front of the gateway (`10.0.0.0/8`); only their
    /// `forwarded_header` is believed.
    pub trusted_proxies: Vec<String>,
    /// The header the trusted proxies write the client's address into: `x-forwarded-for`, or
    /// `forwarded` (RFC 7239). The other one is not believed.
    pub forwarded_header: ForwardedHeader,
    /// Most connections open at once on the admin listener, and from one address there.
    pub admin_max_connections: usize,
    pub admin_max_connections_per_ip: usize,
    /// A TLS listener (HTTP/1.1 and HTTP/2 by ALPN), beside the plain one.
    pub tls: Option<RawTls>,
    /// Accept HTTP/2 with prior knowledge (h2c) on the plain listener, for a load balancer
    /// that speaks HTTP/2 to its backends; HTTP/1.1 clients are served as before.
    pub h2c: bool,
    /// Most requests (streams) in flight on one HTTP/2 connection. A client's streams also count
    /// against `max_connections_per_ip`, so one connection cannot carry more than its address may.
    pub h2_max_streams: u32,
}

#[derive(Debug, Deserialize)]
pub struct RawTls {
    pub listen: String,
    /// PEM certificate chain (leaf first), RSA or ECDSA.
    pub cert_file: PathBuf,
    /// PEM private key of the leaf certificate.
    pub key_file: PathBuf,
}

/// The checked `[server.tls]`: the certificate files are read where the gateway runs (see
/// `Config::process_issues`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9464".into(),
            admin_token_env: None,
            admin_hosts: Vec::new(),
            threads: 2,
            log_format: LogFormat::Text,
            grace_period: Duration::from_secs(50),
            shutdown_delay: Duration::from_secs(5),
            watch_config: true,
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            max_header_bytes: 16 * 1024,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::XForwardedFor,
            admin_max_connections: 64,
            admin_max_connections_per_ip: 16,
            tls: None,
            h2c: false,
            h2_max_streams: 100,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The checked listeners and edge settings.
pub struct Server {
    pub listen: SocketAddr,
    /// Whether the plain listener is opened (`listen = "none"`: TLS only).
    pub plain: bool,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<AdminToken>,
    /// `admin_hosts`, each as `url` writes a host (lower case).
    pub admin_hosts: Vec<String>,
    pub edge: EdgeConfig,
    pub admin_edge: EdgeConfig,
    pub tls: Option<TlsConfig>,
}

/// Check `[server]`; `None` when a listener address is unusable.
pub fn check(raw: &RawServer, env: EnvLookup<'_>, issues: &mut Issues) -> Option<Server> {
    let (plain, listen, admin_listen, tls) = check_listeners(raw, issues);
    let (admin_token, admin_hosts) = check_admin(raw, env, &admin_listen, issues);
    let edge = check_edge(raw, issues);
    // No proxy is trusted there, and it speaks HTTP/1 only.
    let admin_edge = EdgeConfig {
        max_connections: raw.admin_max_connections,
        max_connections_per_ip: raw.admin_max_connections_per_ip,
        trusted_proxies: Default::default(),
        h2c: false,
        ..edge.clone()
    };
    Some(Server {
        plain,
        listen: listen.ok()?,
        admin_listen: admin_listen.ok()?,
        admin_token,
        admin_hosts,
        edge,
        admin_edge,
        tls,
    })
}

type Addr = Result<SocketAddr, std::net::AddrParseError>;

/// The listeners' addresses, none on another's port: the plain one (or "none", for a TLS-only
/// deployment: an address nothing binds stands in), the admin one, the TLS one.
fn check_listeners(raw: &RawServer, issues: &mut Issues) -> (bool, Addr, Addr, Option<TlsConfig>) {
    let mut issue = |path: &str, message: String| issues.add(path, message);
    let plain = raw.listen != "none";
    if !plain && raw.tls.is_none() {
        issue(
            "server.listen",
            "\"none\" leaves no listener: add [server.tls]".into(),
        );
    }
    let listen = if plain {
        raw.listen.parse::<SocketAddr>()
    } else {
        "0.0.0.0:0".parse::<SocketAddr>()
    };
    if let Err(e) = &listen {
        issue(
            "server.listen",
            format!("not an address like 127.0.0.1:8080 ({e})"),
        );
    }
    let admin_listen = raw.admin_listen.parse::<SocketAddr>();
    if let Err(e) = &admin_listen {
        issue(
            "server.admin_listen",
            format!("not an address like 127.0.0.1:9464 ({e})"),
        );
    }
    if let (Ok(l), Ok(a), true) = (&listen, &admin_listen, plain) {
        if clash(l, a) {
            issue(
                "server.admin_listen",
                format!("{a} clashes with server.listen ({l}): they need different ports"),
            );
        }
    }
    let tls = raw
        .tls
        .as_ref()
        .and_then(|t| match t.listen.parse::<SocketAddr>() {
            Err(e) => {
                issue(
                    "server.tls.listen",
                    format!("not an address like 0.0.0.0:8443 ({e})"),
                );
                None
            }
            Ok(a) => {
                for (name, other) in [
                    ("server.listen", &listen),
                    ("server.admin_listen", &admin_listen),
                ] {
                    if let Some(o) = other.as_ref().ok().filter(|o| clash(&a, o)) {
                        issue(
                            "server.tls.listen",
                            format!("{a} clashes with {name} ({o}): they need different ports"),
                        );
                    }
                }
                Some(TlsConfig {
                    listen: a,
                    cert_file: t.cert_file.clone(),
                    key_file: t.key_file.clone(),
                })
            }
        });
    (plain, listen, admin_listen, tls)
}

/// Whether two listeners would take the same port.
fn clash(a: &SocketAddr, b: &SocketAddr) -> bool {
    let overlap = a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
    a.port() == b.port() && overlap
}

/// The admin token (required for a non-loopback admin listener) and the host names the admin
/// listener answers besides its addresses.
fn check_admin(
    raw: &RawServer,
    env: EnvLookup<'_>,
    admin_listen: &Addr,
    issues: &mut Issues,
) -> (Option<AdminToken>, Vec<String>) {
    let mut issue = |path: &str, message: String| issues.add(path, message);
    let admin_token = match &raw.admin_token_env {
        Some(var) => match env(var) {
            Some(t) if !t.trim().is_empty() => Some(AdminToken::new(t.trim())),
            _ => {
                issue(
                    "server.admin_token_env",
                    super::unset_variable(var, "not set"),
                );
                None
            }
        },
        None => None,
    };
    if let Ok(a) = admin_listen {
        if !a.ip().is_loopback() && admin_token.is_none() {
            issue(
                "server.admin_listen",
                "a non-loopback admin listener needs server.admin_token_env".into(),
            );
        }
    }
    let mut admin_hosts = Vec::new();
    for (n, name) in raw.admin_hosts.iter().enumerate() {
        match url::Host::parse(name) {
            Ok(host) if !name.contains('*') => admin_hosts.push(host.to_string()),
            _ => issue(
                &format!("server.admin_hosts[{n}]"),
                format!("{name:?} is not a host name: write the name alone, like \"liveness-gateway.monitoring.svc\" (no scheme, port or wildcard)"),
            ),
        }
    }
    (admin_token, admin_hosts)
}

/// The edge's bounds (threads, timeouts, head size, connection caps, HTTP/2 streams) and the
/// proxies trusted to name the client.
fn check_edge(sv: &RawServer, issues: &mut Issues) -> EdgeConfig {
    let mut issue = |path: &str, message: String| issues.add(path, message);
    if sv.threads == 0 {
        issue("server.threads", "must be at least 1".into());
    }
    if sv.header_timeout.is_zero() || sv.keepalive_timeout.is_zero() {
        issue(
            "server",
            "header_timeout and keepalive_timeout must be more than zero".into(),
        );
    }
    if !(1024..=1 << 20).contains(&sv.max_header_bytes) {
        issue(
            "server.max_header_bytes",
            "must be from 1024 to 1048576 (Pingora's own limit)".into(),
        );
    }
    if sv.max_connections == 0 || sv.max_connections_per_ip == 0 {
        issue(
            "server",
            "max_connections and max_connections_per_ip must be at least 1".into(),
        );
    }
    if sv.admin_max_connections == 0 || sv.admin_max_connections_per_ip == 0 {
        issue(
            "server",
            "admin_max_connections and admin_max_connections_per_ip must be at least 1".into(),
        );
    }
    if !(1..=1000).contains(&sv.h2_max_streams) {
        issue("server.h2_max_streams", "must be from 1 to 1000".into());
    }
    let trusted_proxies = match TrustedProxies::parse(&sv.trusted_proxies) {
        Ok(t) => t,
        Err(m) => {
            issue("server.trusted_proxies", m);
            Default::default()
        }
    };
    EdgeConfig {
        header_timeout: sv.header_timeout,
        keepalive_timeout: sv.keepalive_timeout,
        max_header_bytes: sv.max_header_bytes,
        max_connections: sv.max_connections,
        max_connections_per_ip: sv.max_connections_per_ip,
        trusted_proxies,
        forwarded_header: sv.forwarded_header,
        h2c: sv.h2c,
        h2_max_streams: sv.h2_max_streams,
    }
}
