//! Configuration in two layers: `RawConfig` mirrors the TOML file (unknown keys refused, defaults
//! filled in), and `Config::validate` turns it into checked runtime types, reporting every problem
//! at once with its path in the file.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::secret::{AdminToken, OrgApiKey};

pub mod store;
pub use store::{StoreBackend, StoreConfig};

const MIB: u64 = 1024 * 1024;

/// What `check-config --offline` puts in place of the store URL's variable.
const OFFLINE_STORE_URL: &str = "redis://offline.invalid:6379/0";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub upstream: RawUpstream,
    #[serde(default)]
    pub intake: RawIntake,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub cache: RawCache,
    #[serde(default)]
    pub budgets: RawBudgets,
    #[serde(default)]
    pub breaker: RawBreaker,
    #[serde(default)]
    pub store: store::RawStore,
    #[serde(default)]
    pub tenants: Vec<RawTenant>,
}

/// The circuit breaker in front of the provider (see `breaker`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBreaker {
    pub enabled: bool,
    /// Consecutive failures (5xx, timeouts, refused or lost connections, unusable answers) that
    /// open the circuit.
    pub failures: u32,
    /// Failures further apart than this do not add up.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long the circuit stays open before one probe call is let through.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// How long a subscription error (no subscription, not started, none active, no access)
    /// keeps it open.
    #[serde(with = "humantime_serde")]
    pub subscription_open_for: Duration,
}

impl Default for RawBreaker {
    fn default() -> Self {
        RawBreaker {
            enabled: true,
            failures: 5,
            window: Duration::from_secs(60),
            open_for: Duration::from_secs(30),
            subscription_open_for: Duration::from_secs(10),
        }
    }
}

pub type BreakerConfig = RawBreaker;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// Client-facing listener.
    pub listen: String,
    /// Admin listener (health, metrics, usage, cache). Keep it on loopback unless `admin_token_env` is set.
    pub admin_listen: String,
    /// Environment variable holding a bearer token required on the admin listener (optional).
    pub admin_token_env: Option<String>,
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
    /// `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9464".into(),
            admin_token_env: None,
            threads: 2,
            log_format: LogFormat::Text,
            grace_period: Duration::from_secs(50),
            shutdown_delay: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            max_header_bytes: 16 * 1024,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// Base URL of the provider, `https://kyc.biometric.kz`, or `http://127.0.0.1:8081` for the emulator.
    pub url: String,
    /// Path of the liveness endpoint at the provider.
    #[serde(default = "default_upstream_path")]
    pub path: String,
    /// Environment variable holding the organization key.
    pub api_key_env: Option<String>,
    /// File holding the organization key (trailing newline ignored). Used when `api_key_env` is unset.
    pub api_key_file: Option<PathBuf>,
    /// PEM file of CA certificates that replaces the system trust store for the upstream.
    pub ca_file: Option<PathBuf>,
    /// Connect to this IP address instead of resolving the host; the host still names SNI and `Host`.
    pub connect_address: Option<String>,
    /// Longest time to connect (TCP and TLS). Default: 5 s, or `total_timeout` if shorter.
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// Longest wait for each read of the provider's answer. Default: 30 s, or `total_timeout`
    /// if shorter.
    #[serde(default, with = "humantime_serde")]
    pub read_timeout: Option<Duration>,
    /// Longest time to send the whole request (header and body). Default: 30 s, or
    /// `total_timeout` if shorter.
    #[serde(default, with = "humantime_serde")]
    pub write_timeout: Option<Duration>,
    /// Deadline for one whole upstream call, connect to last byte.
    #[serde(default = "d_45s", with = "humantime_serde")]
    pub total_timeout: Duration,
    /// Largest upstream answer accepted; a larger one is an invalid answer (502).
    #[serde(default = "d_1mib")]
    pub max_response_bytes: u64,
    /// How often the upstream host name is resolved again.
    #[serde(default = "d_60s", with = "humantime_serde")]
    pub resolve_interval: Duration,
    /// How long an idle pooled upstream connection is kept.
    #[serde(default = "d_60s", with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
}

fn default_upstream_path() -> String {
    "/api/v1/backend/liveness/short/".into()
}
fn d_5s() -> Duration {
    Duration::from_secs(5)
}
fn d_30s() -> Duration {
    Duration::from_secs(30)
}
fn d_45s() -> Duration {
    Duration::from_secs(45)
}
fn d_60s() -> Duration {
    Duration::from_secs(60)
}
fn d_1mib() -> u64 {
    MIB
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIntake {
    /// Largest request body; a larger `Content-Length` is refused before reading (413).
    pub max_body_bytes: u64,
    /// Longest wait for the next piece of the body (408 after it).
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Deadline for the whole body (408 after it).
    #[serde(with = "humantime_serde")]
    pub body_deadline: Duration,
    /// Most parts a form may have.
    pub max_parts: usize,
    /// Largest total size of one part's headers.
    pub max_part_header_bytes: usize,
    /// File name extensions accepted for the image, compared case-insensitively.
    pub allowed_extensions: Vec<String>,
    /// Smallest image file accepted, in bytes.
    pub min_image_bytes: usize,
    /// Largest image file accepted, in bytes.
    pub max_image_bytes: usize,
    /// Smallest width and height accepted, in pixels.
    pub min_dimension: usize,
    /// Largest width and height accepted, in pixels.
    pub max_dimension: usize,
    /// Largest width x height accepted.
    pub max_pixels: u64,
    /// Bytes of request bodies held in memory at once, all requests together. A body that would
    /// pass it waits up to a second for room, then gets `503 overloaded`.
    pub max_buffered_bytes: u64,
    /// The share of it that bodies read before their sender is authenticated (the credential in
    /// the form field) may take.
    pub max_unauthenticated_buffered_bytes: u64,
}

impl Default for RawIntake {
    fn default() -> Self {
        RawIntake {
            max_body_bytes: 10 * MIB,
            body_read_timeout: Duration::from_secs(10),
            body_deadline: Duration::from_secs(30),
            max_parts: 8,
            max_part_header_bytes: 4096,
            allowed_extensions: vec![".jpg".into(), ".jpeg".into(), ".png".into()],
            min_image_bytes: 100,
            max_image_bytes: (10 * MIB) as usize,
            min_dimension: 64,
            max_dimension: 8192,
            max_pixels: 40_000_000,
            max_buffered_bytes: 256 * MIB,
            max_unauthenticated_buffered_bytes: 32 * MIB,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// Requests per second a tenant may make when its own entry sets none.
    pub default_rate_per_second: u32,
    /// The same as a rate (`"30/min"`, `"500/h"`), for rates below one a second; instead of
    /// `default_rate_per_second`.
    pub default_rate: Option<String>,
    /// Burst a tenant may make when its own entry sets none.
    pub default_burst: u32,
    /// Most upstream calls in flight at once, whatever the tenants do.
    pub max_concurrent_upstream: usize,
    /// How long a request waits for an upstream slot before `503 overloaded`.
    #[serde(with = "humantime_serde")]
    pub upstream_queue_timeout: Duration,
    /// Optional cap on upstream calls per second across all tenants.
    pub global_upstream_rate_per_second: Option<u32>,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            default_rate_per_second: 20,
            default_rate: None,
            default_burst: 40,
            max_concurrent_upstream: 64,
            upstream_queue_timeout: Duration::from_secs(2),
            global_upstream_rate_per_second: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    /// Each tenant has its own entries: no tenant learns anything about another's images.
    Tenant,
    /// One scope for all tenants: an image verified by one is free for all.
    Shared,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    pub enabled: bool,
    pub scope: CacheScope,
    /// Bound on the cached answers' size in bytes.
    pub max_bytes: u64,
    /// How long a failed verdict (`CALC_RESULT`) is answered from the cache.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long a pass is answered from the cache: long enough to absorb a client's retries,
    /// short enough that a captured passing selfie cannot be replayed for long.
    #[serde(with = "humantime_serde")]
    pub pass_ttl: Duration,
    /// Whether a client may skip the cache with `Cache-Control: no-cache`.
    pub allow_bypass: bool,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            enabled: true,
            scope: CacheScope::Tenant,
            max_bytes: 64 * MIB,
            ttl: Duration::from_secs(24 * 3600),
            pass_ttl: Duration::from_secs(10 * 60),
            allow_bypass: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBudgets {
    /// File where billable-call counts survive a restart; none keeps them in memory only.
    pub state_file: Option<PathBuf>,
    /// How often changed counts are written to the state file.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// What one billable call costs (any currency): adds a cost column to the usage export.
    pub price_per_call: Option<f64>,
}

impl Default for RawBudgets {
    fn default() -> Self {
        RawBudgets {
            state_file: None,
            flush_interval: Duration::from_secs(1),
            price_per_call: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    /// Stable id: used in logs, metrics and the usage endpoint, never the key.
    pub id: String,
    /// SHA-256 hex digests of the tenant's keys (several allow rotation); `keys new` prints them.
    pub key_sha256: Vec<String>,
    #[serde(default)]
    pub disabled: bool,
    pub rate_per_second: Option<u32>,
    /// The same as a rate (`"30/min"`, `"500/h"`), for rates below one a second; instead of
    /// `rate_per_second`.
    pub rate: Option<String>,
    pub burst: Option<u32>,
    /// Billable calls per UTC day.
    pub daily_budget: Option<u64>,
    /// Billable calls per UTC month.
    pub monthly_budget: Option<u64>,
    /// Accept this tenant's key only in `Authorization` or `X-Api-Key`, never in the form field.
    /// When every tenant requires it, a request without a header credential is refused before
    /// one byte of its body is read.
    #[serde(default)]
    pub require_header_credentials: bool,
    /// This tenant's price per billable call, instead of `budgets.price_per_call`.
    pub price_per_call: Option<f64>,
}

/// One problem in a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{} problem(s) in the config:\n{}", .0.len(), .0.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigIssue>);

/// Where the upstream is and how to reach it.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
    pub api_key: OrgApiKey,
    pub ca_file: Option<PathBuf>,
    pub connect_address: Option<std::net::IpAddr>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub total_timeout: Duration,
    pub max_response_bytes: usize,
    pub resolve_interval: Duration,
    pub pool_idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub id: String,
    pub key_digests: Vec<[u8; 32]>,
    pub disabled: bool,
    pub rate: crate::limits::Rate,
    pub burst: u32,
    pub daily_budget: Option<u64>,
    pub monthly_budget: Option<u64>,
    pub require_header_credentials: bool,
    /// The price of one billable call for the usage export (the tenant's, or the global one).
    pub price_per_call: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub enabled: bool,
    pub scope: CacheScope,
    pub max_bytes: u64,
    pub ttl: Duration,
    pub pass_ttl: Duration,
    pub allow_bypass: bool,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub max_concurrent_upstream: usize,
    pub upstream_queue_timeout: Duration,
    pub global_upstream_rate_per_second: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct BudgetsConfig {
    pub state_file: Option<PathBuf>,
    pub flush_interval: Duration,
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<AdminToken>,
    pub threads: usize,
    pub log_format: LogFormat,
    pub grace_period: Duration,
    pub shutdown_delay: Duration,
    pub edge: crate::edge::EdgeConfig,
    pub upstream: UpstreamConfig,
    pub intake: RawIntake,
    pub limits: LimitsConfig,
    pub cache: CacheConfig,
    pub budgets: BudgetsConfig,
    pub breaker: BreakerConfig,
    pub store: StoreConfig,
    pub tenants: Vec<TenantConfig>,
    /// The file it came from, for reloads.
    pub source: Option<PathBuf>,
}

/// Reads environment variables; tests and the demo pass their own.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl Config {
    /// The longest a leader's upstream call can take, from asking for a slot to its last byte:
    /// a wait for a concurrency slot and a wait for the global pace (each bounded by the queue
    /// timeout), then the call itself (resolution included) within `total_timeout`.
    pub fn longest_call(&self) -> Duration {
        self.upstream.total_timeout + 2 * self.limits.upstream_queue_timeout
    }

    /// What a running process needs beyond a valid file: budgets need a place to keep their
    /// counts (`budgets.state_file`), or every restart would give each tenant a new budget; and
    /// the state file's folder must exist (unless `offline`: the file may be checked elsewhere).
    /// `serve` refuses to start on any of these, and `check-config` reports them as errors.
    pub fn process_issues(&self, offline: bool) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        let budgets = self
            .tenants
            .iter()
            .filter(|t| t.daily_budget.is_some() || t.monthly_budget.is_some())
            .count();
        match &self.budgets.state_file {
            None if budgets > 0 && !self.store.is_shared() => out.push(ConfigIssue {
                path: "budgets.state_file".into(),
                message: format!(
                    "{budgets} tenant(s) have a budget but no state file keeps the counts: a restart would reset every budget"
                ),
            }),
            Some(f) if !offline => {
                let dir = f
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                if !dir.is_dir() {
                    out.push(ConfigIssue {
                        path: "budgets.state_file".into(),
                        message: format!("the folder {} does not exist", dir.display()),
                    });
                }
            }
            _ => {}
        }
        out
    }

    /// Settings that contradict each other without being invalid: printed by `check-config` and
    /// logged at start-up.
    pub fn warnings(&self) -> Vec<ConfigIssue> {
        let mut w = Vec::new();
        if self.grace_period < self.longest_call() {
            w.push(ConfigIssue {
                path: "server.grace_period".into(),
                message: format!(
                    "{} is shorter than the longest upstream call ({}: upstream.total_timeout + 2 x limits.upstream_queue_timeout); a graceful stop can cut calls the provider may bill",
                    humantime::format_duration(self.grace_period),
                    humantime::format_duration(self.longest_call()),
                ),
            });
        }
        w
    }

    /// The settings of `new` that differ from this config and that a running process cannot
    /// change: listeners and process settings, the upstream endpoint and its timeouts (the
    /// organization key goes only where this process sends it), intake, the cache, the state
    /// file and the concurrency cap. A reload that changes any of them is refused, naming them.
    /// Everything else reloads: tenants, their keys, limits and budgets, the organization key,
    /// the admin token, the queue timeout, the global pace.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let (a, b) = (self, new);
        let (u, v) = (&a.upstream, &b.upstream);
        [
            ("server.listen", a.listen != b.listen),
            ("server.admin_listen", a.admin_listen != b.admin_listen),
            ("server.threads", a.threads != b.threads),
            ("server.log_format", a.log_format != b.log_format),
            ("server.grace_period", a.grace_period != b.grace_period),
            ("server (header_timeout, keepalive_timeout, max_header_bytes, max_connections, max_connections_per_ip, trusted_proxies)", a.edge != b.edge),
            (
                "upstream.url",
                (u.tls, &u.host, u.port) != (v.tls, &v.host, v.port),
            ),
            ("upstream.path", u.path != v.path),
            ("upstream.ca_file", u.ca_file != v.ca_file),
            (
                "upstream.connect_address",
                u.connect_address != v.connect_address,
            ),
            (
                "upstream.connect_timeout",
                u.connect_timeout != v.connect_timeout,
            ),
            ("upstream.read_timeout", u.read_timeout != v.read_timeout),
            ("upstream.write_timeout", u.write_timeout != v.write_timeout),
            ("upstream.total_timeout", u.total_timeout != v.total_timeout),
            (
                "upstream.max_response_bytes",
                u.max_response_bytes != v.max_response_bytes,
            ),
            (
                "upstream.resolve_interval",
                u.resolve_interval != v.resolve_interval,
            ),
            (
                "upstream.pool_idle_timeout",
                u.pool_idle_timeout != v.pool_idle_timeout,
            ),
            ("intake", a.intake != b.intake),
            ("cache", a.cache != b.cache),
            ("breaker", a.breaker != b.breaker),
            ("store", a.store != b.store),
            (
                "budgets.state_file",
                a.budgets.state_file != b.budgets.state_file,
            ),
            (
                "limits.max_concurrent_upstream",
                a.limits.max_concurrent_upstream != b.limits.max_concurrent_upstream,
            ),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// Read, parse and validate a config file.
    pub fn load(path: &Path, env: EnvLookup<'_>) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigIssue {
                path: path.display().to_string(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        let mut cfg = Config::from_toml(&text, env)?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Check a file without its secrets: every rule but reading the organization key (from the
    /// environment or a file) and the CA file, which exist only where the gateway runs.
    pub fn check_offline(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigIssue {
                path: path.display().to_string(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        let mut raw = parse_raw(&text)?;
        // The store's URL variable exists only where the gateway runs: a well-formed stand-in.
        let url_env = raw.store.url_env.clone();
        let is_url = move |name: &str| url_env.as_deref() == Some(name);
        if raw.upstream.api_key_env.is_none() && raw.upstream.api_key_file.is_none() {
            return Config::validate(raw, &|n| is_url(n).then(|| OFFLINE_STORE_URL.into()));
        }
        let both = raw.upstream.api_key_env.is_some() && raw.upstream.api_key_file.is_some();
        raw.upstream.api_key_env = Some("OFFLINE_PLACEHOLDER".into());
        raw.upstream.api_key_file = None;
        raw.upstream.ca_file = None;
        let checked = Config::validate(raw, &|n| {
            Some(
                if is_url(n) {
                    OFFLINE_STORE_URL
                } else {
                    "offline-placeholder"
                }
                .into(),
            )
        });
        if !both {
            return checked;
        }
        // The placeholder stands for one source: the file's two still contradict each other.
        let mut issues = checked.err().map(|e| e.0).unwrap_or_default();
        issues.insert(0, two_key_sources());
        Err(ConfigErrors(issues))
    }

    pub fn from_toml(text: &str, env: EnvLookup<'_>) -> Result<Config, ConfigErrors> {
        let raw = parse_raw(text)?;
        Config::validate(raw, env)
    }

    pub fn validate(mut raw: RawConfig, env: EnvLookup<'_>) -> Result<Config, ConfigErrors> {
        let mut issues = Vec::new();
        let store = store::check(std::mem::take(&mut raw.store), env, &mut issues);
        let mut issue = |path: &str, message: String| {
            issues.push(ConfigIssue {
                path: path.into(),
                message,
            })
        };

        let listen = raw.server.listen.parse::<SocketAddr>();
        if let Err(e) = &listen {
            issue(
                "server.listen",
                format!("not an address like 127.0.0.1:8080 ({e})"),
            );
        }
        let admin_listen = raw.server.admin_listen.parse::<SocketAddr>();
        if let Err(e) = &admin_listen {
            issue(
                "server.admin_listen",
                format!("not an address like 127.0.0.1:9464 ({e})"),
            );
        }
        let admin_token = match &raw.server.admin_token_env {
            Some(var) => match env(var) {
                Some(t) if !t.trim().is_empty() => Some(AdminToken::new(t.trim())),
                _ => {
                    issue(
                        "server.admin_token_env",
                        format!("environment variable {var} is not set"),
                    );
                    None
                }
            },
            None => None,
        };
        if let (Ok(l), Ok(a)) = (&listen, &admin_listen) {
            let overlap = l.ip() == a.ip() || l.ip().is_unspecified() || a.ip().is_unspecified();
            if l.port() == a.port() && overlap {
                issue(
                    "server.admin_listen",
                    format!("{a} clashes with server.listen ({l}): they need different ports"),
                );
            }
        }
        if let Ok(a) = &admin_listen {
            if !a.ip().is_loopback() && admin_token.is_none() {
                issue(
                    "server.admin_listen",
                    "a non-loopback admin listener needs server.admin_token_env".into(),
                );
            }
        }
        if raw.server.threads == 0 {
            issue("server.threads", "must be at least 1".into());
        }
        let sv = &raw.server;
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
        let trusted_proxies = match crate::edge::TrustedProxies::parse(&sv.trusted_proxies) {
            Ok(t) => t,
            Err(m) => {
                issue("server.trusted_proxies", m);
                Default::default()
            }
        };

        let u = &raw.upstream;
        let (tls, host, port) = match parse_base_url(&u.url) {
            Ok(v) => v,
            Err(m) => {
                issue("upstream.url", m);
                (false, String::new(), 0)
            }
        };
        if !u.path.starts_with('/') || u.path.parse::<http::uri::PathAndQuery>().is_err() {
            issue(
                "upstream.path",
                "must start with / and be a valid URI path".into(),
            );
        }
        if u.api_key_env.is_some() && u.api_key_file.is_some() {
            let two = two_key_sources();
            issue(&two.path, two.message);
        }
        let api_key = match (&u.api_key_env, &u.api_key_file) {
            (Some(var), _) if env(var).is_some_and(|v| !v.trim().is_empty()) => {
                env(var).map(|v| OrgApiKey::new(v.trim()))
            }
            (Some(var), None) => {
                issue(
                    "upstream.api_key_env",
                    format!("environment variable {var} is not set or empty"),
                );
                None
            }
            (_, Some(file)) => match std::fs::read_to_string(file) {
                Ok(v) if !v.trim().is_empty() => Some(OrgApiKey::new(v.trim())),
                Ok(_) => {
                    issue(
                        "upstream.api_key_file",
                        format!("{} is empty", file.display()),
                    );
                    None
                }
                Err(e) => {
                    issue(
                        "upstream.api_key_file",
                        format!("cannot read {}: {e}", file.display()),
                    );
                    None
                }
            },
            (None, None) => {
                issue("upstream", "set api_key_env or api_key_file: the organization key never goes in the config text".into());
                None
            }
        };
        let connect_address = match &u.connect_address {
            Some(a) => match a.parse::<std::net::IpAddr>() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    issue(
                        "upstream.connect_address",
                        format!("{a:?} is not an IP address"),
                    );
                    None
                }
            },
            None => None,
        };
        if let Some(ca) = &u.ca_file {
            if !ca.is_file() {
                issue(
                    "upstream.ca_file",
                    format!("{} is not a readable file", ca.display()),
                );
            }
        }
        // A step's timeout left out follows the whole call's when that is shorter; one written
        // out that is longer than the whole call contradicts it.
        let step = |set: Option<Duration>, default: Duration| {
            set.unwrap_or_else(|| default.min(u.total_timeout))
        };
        let connect_timeout = step(u.connect_timeout, d_5s());
        let read_timeout = step(u.read_timeout, d_30s());
        let write_timeout = step(u.write_timeout, d_30s());
        for (name, d) in [
            ("connect_timeout", connect_timeout),
            ("read_timeout", read_timeout),
            ("write_timeout", write_timeout),
            ("total_timeout", u.total_timeout),
            ("resolve_interval", u.resolve_interval),
        ] {
            if d.is_zero() {
                issue(&format!("upstream.{name}"), "must be more than zero".into());
            }
        }
        for (name, d) in [
            ("connect_timeout", connect_timeout),
            ("read_timeout", read_timeout),
            ("write_timeout", write_timeout),
        ] {
            if d > u.total_timeout {
                issue(
                    "upstream.total_timeout",
                    format!(
                        "{} is shorter than upstream.{name} ({}): the whole call ends before one step of it may",
                        humantime::format_duration(u.total_timeout),
                        humantime::format_duration(d)
                    ),
                );
            }
        }
        if u.max_response_bytes == 0 {
            issue(
                "upstream.max_response_bytes",
                "must be more than zero".into(),
            );
        }

        let i = &raw.intake;
        if i.max_body_bytes == 0 {
            issue("intake.max_body_bytes", "must be more than zero".into());
        }
        if i.body_read_timeout.is_zero() || i.body_deadline.is_zero() {
            issue(
                "intake",
                "body_read_timeout and body_deadline must be more than zero".into(),
            );
        }
        if i.max_parts == 0 {
            issue("intake.max_parts", "must be at least 1".into());
        }
        if i.allowed_extensions.is_empty() {
            issue(
                "intake.allowed_extensions",
                "must name at least one extension".into(),
            );
        }
        for (n, ext) in i.allowed_extensions.iter().enumerate() {
            let e = ext.to_ascii_lowercase();
            if ![".jpg", ".jpeg", ".png"].contains(&e.as_str()) {
                issue(
                    &format!("intake.allowed_extensions[{n}]"),
                    format!(
                        "{ext:?} is not one of .jpg .jpeg .png (the types the provider accepts)"
                    ),
                );
            }
        }
        if i.min_image_bytes > i.max_image_bytes {
            issue(
                "intake.min_image_bytes",
                "is larger than max_image_bytes".into(),
            );
        }
        if i.max_image_bytes as u64 > i.max_body_bytes {
            issue(
                "intake.max_image_bytes",
                "is larger than max_body_bytes".into(),
            );
        }
        if i.max_buffered_bytes < i.max_body_bytes {
            issue(
                "intake.max_buffered_bytes",
                "is smaller than max_body_bytes: the largest body could never be read".into(),
            );
        }
        if i.max_unauthenticated_buffered_bytes > i.max_buffered_bytes {
            issue(
                "intake.max_unauthenticated_buffered_bytes",
                "is larger than max_buffered_bytes".into(),
            );
        }
        if i.min_dimension == 0 || i.min_dimension > i.max_dimension {
            issue(
                "intake.min_dimension",
                "must be at least 1 and at most max_dimension".into(),
            );
        }

        let l = &raw.limits;
        if l.default_rate_per_second == 0 || l.default_burst == 0 {
            issue(
                "limits",
                "default_rate_per_second and default_burst must be at least 1".into(),
            );
        }
        let default_rate = match &l.default_rate {
            Some(text) => crate::limits::Rate::parse(text).unwrap_or_else(|m| {
                issue("limits.default_rate", m);
                crate::limits::Rate::per_second(1)
            }),
            None => crate::limits::Rate::per_second(l.default_rate_per_second.max(1)),
        };
        if l.max_concurrent_upstream == 0 {
            issue(
                "limits.max_concurrent_upstream",
                "must be at least 1".into(),
            );
        }
        if l.global_upstream_rate_per_second == Some(0) {
            issue(
                "limits.global_upstream_rate_per_second",
                "must be at least 1 (or left out)".into(),
            );
        }
        if raw.cache.ttl.is_zero() || raw.cache.pass_ttl.is_zero() || raw.cache.max_bytes == 0 {
            issue(
                "cache",
                "ttl, pass_ttl and max_bytes must be more than zero".into(),
            );
        }
        let b = &raw.breaker;
        if b.failures == 0 || b.failures > 100 {
            issue("breaker.failures", "must be from 1 to 100".into());
        }
        if b.window.is_zero() || b.open_for.is_zero() || b.subscription_open_for.is_zero() {
            issue(
                "breaker",
                "window, open_for and subscription_open_for must be more than zero".into(),
            );
        }
        if raw.budgets.flush_interval.is_zero() {
            issue("budgets.flush_interval", "must be more than zero".into());
        }
        let price_ok = |p: Option<f64>| p.is_none_or(|p| p.is_finite() && p >= 0.0);
        if !price_ok(raw.budgets.price_per_call) {
            issue(
                "budgets.price_per_call",
                "must be a number, zero or more".into(),
            );
        }

        let mut tenants = Vec::new();
        let mut ids = HashSet::new();
        let mut digests = HashSet::new();
        for (n, t) in raw.tenants.iter().enumerate() {
            let at = format!("tenants[{n}]");
            if let Err(m) = crate::tenant::check_id(&t.id) {
                issue(&format!("{at}.id"), m);
            } else if !ids.insert(t.id.clone()) {
                issue(&format!("{at}.id"), format!("{:?} is used twice", t.id));
            }
            if t.key_sha256.is_empty() {
                issue(
                    &format!("{at}.key_sha256"),
                    "needs at least one key digest (see `liveness-gateway keys new`)".into(),
                );
            }
            let mut key_digests = Vec::new();
            for (k, d) in t.key_sha256.iter().enumerate() {
                match parse_digest(d) {
                    Some(bytes) => {
                        if !digests.insert(bytes) {
                            issue(
                                &format!("{at}.key_sha256[{k}]"),
                                "this digest is used by another key".into(),
                            );
                        }
                        key_digests.push(bytes);
                    }
                    None => issue(
                        &format!("{at}.key_sha256[{k}]"),
                        "must be 64 hex digits (a SHA-256 digest)".into(),
                    ),
                }
            }
            for (name, budget) in [
                ("daily_budget", t.daily_budget),
                ("monthly_budget", t.monthly_budget),
            ] {
                if budget == Some(0) {
                    issue(
                        &format!("{at}.{name}"),
                        "0 would refuse every call: to stop a tenant set disabled = true; for no limit leave the budget out".into(),
                    );
                }
            }
            if t.rate_per_second == Some(0) || t.burst == Some(0) {
                issue(&at, "rate_per_second and burst must be at least 1".into());
            }
            if t.rate_per_second.is_some() && t.rate.is_some() {
                issue(&at, "set rate_per_second or rate, not both".into());
            }
            let rate = match (&t.rate, t.rate_per_second) {
                (Some(text), _) => crate::limits::Rate::parse(text).unwrap_or_else(|m| {
                    issue(&format!("{at}.rate"), m);
                    default_rate
                }),
                (None, Some(n)) => crate::limits::Rate::per_second(n),
                (None, None) => default_rate,
            };
            if !price_ok(t.price_per_call) {
                issue(
                    &format!("{at}.price_per_call"),
                    "must be a number, zero or more".into(),
                );
            }
            tenants.push(TenantConfig {
                id: t.id.clone(),
                key_digests,
                disabled: t.disabled,
                rate,
                burst: t.burst.unwrap_or(l.default_burst),
                daily_budget: t.daily_budget,
                monthly_budget: t.monthly_budget,
                require_header_credentials: t.require_header_credentials,
                price_per_call: t.price_per_call.or(raw.budgets.price_per_call),
            });
        }

        match (issues.is_empty(), listen, admin_listen, api_key) {
            (true, Ok(listen), Ok(admin_listen), Some(api_key)) => Ok(Config {
                listen,
                admin_listen,
                admin_token,
                threads: raw.server.threads,
                log_format: raw.server.log_format,
                grace_period: raw.server.grace_period,
                shutdown_delay: raw.server.shutdown_delay,
                edge: crate::edge::EdgeConfig {
                    header_timeout: raw.server.header_timeout,
                    keepalive_timeout: raw.server.keepalive_timeout,
                    max_header_bytes: raw.server.max_header_bytes,
                    max_connections: raw.server.max_connections,
                    max_connections_per_ip: raw.server.max_connections_per_ip,
                    trusted_proxies,
                },
                upstream: UpstreamConfig {
                    tls,
                    host,
                    port,
                    path: u.path.clone(),
                    api_key,
                    ca_file: u.ca_file.clone(),
                    connect_address,
                    connect_timeout,
                    read_timeout,
                    write_timeout,
                    total_timeout: u.total_timeout,
                    max_response_bytes: u.max_response_bytes as usize,
                    resolve_interval: u.resolve_interval,
                    pool_idle_timeout: u.pool_idle_timeout,
                },
                intake: raw.intake,
                limits: LimitsConfig {
                    max_concurrent_upstream: l.max_concurrent_upstream,
                    upstream_queue_timeout: l.upstream_queue_timeout,
                    global_upstream_rate_per_second: l.global_upstream_rate_per_second,
                },
                cache: CacheConfig {
                    enabled: raw.cache.enabled,
                    scope: raw.cache.scope,
                    max_bytes: raw.cache.max_bytes,
                    ttl: raw.cache.ttl,
                    pass_ttl: raw.cache.pass_ttl,
                    allow_bypass: raw.cache.allow_bypass,
                },
                budgets: BudgetsConfig {
                    state_file: raw.budgets.state_file,
                    flush_interval: raw.budgets.flush_interval,
                },
                breaker: raw.breaker,
                store,
                tenants,
                source: None,
            }),
            _ => Err(ConfigErrors(issues)),
        }
    }
}

fn two_key_sources() -> ConfigIssue {
    ConfigIssue {
        path: "upstream".into(),
        message: "set api_key_env or api_key_file, not both (one would silently win)".into(),
    }
}

fn parse_raw(text: &str) -> Result<RawConfig, ConfigErrors> {
    toml::from_str(text).map_err(|e| {
        ConfigErrors(vec![ConfigIssue {
            path: "(file)".into(),
            message: e.message().to_string() + &span_hint(text, e.span()),
        }])
    })
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => format!(
            " (line {})",
            text[..r.start.min(text.len())].lines().count().max(1)
        ),
        None => String::new(),
    }
}

fn parse_digest(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out).ok()?;
    Some(out)
}

/// `https://host[:port]` or `http://host[:port]`, nothing after the authority.
fn parse_base_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("{url:?} must start with https:// or http://"));
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') || authority.contains('@') {
        return Err(format!("{url:?} must be a scheme and host only, like https://kyc.biometric.kz (the path goes in upstream.path)"));
    }
    // The host goes into the upstream request's `Host` header as written: it must be a valid
    // authority (no spaces, no line breaks).
    if authority.parse::<http::uri::Authority>().is_err() {
        return Err(format!("{url:?} has an invalid host"));
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(stripped) = authority.strip_prefix('[') {
        let (h, after) = stripped
            .split_once(']')
            .ok_or_else(|| format!("{url:?} has an unclosed IPv6 bracket"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("{url:?} has a bad port"))?,
            None => default_port,
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse().map_err(|_| format!("{url:?} has a bad port"))?,
            ),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok((tls, host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(_: &str) -> Option<String> {
        Some("org-key-for-tests".into())
    }

    const MINIMAL: &str = r#"
[upstream]
url = "http://127.0.0.1:8081"
api_key_env = "ORG_KEY"
[[tenants]]
id = "a"
key_sha256 = ["0000000000000000000000000000000000000000000000000000000000000000"]
"#;

    #[test]
    fn the_upstream_path_must_be_a_valid_uri_path() {
        for bad in ["api/v1", "/a b/", "/a\\r\\nX: y"] {
            let text = MINIMAL.replace("api_key_env", &format!("path = \"{bad}\"\napi_key_env"));
            let err = Config::from_toml(&text, &env).expect_err(bad);
            assert!(err.to_string().contains("upstream.path"), "{bad}: {err}");
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MINIMAL, &env).expect("valid");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.intake.max_body_bytes, 10 * MIB);
        assert!(!c.upstream.tls);
        assert_eq!(c.upstream.port, 8081);
        assert_eq!(c.tenants[0].rate, crate::limits::Rate::per_second(20));
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
[server]
listen = "nowhere"
[upstream]
url = "ftp://x"
[[tenants]]
id = "a b"
key_sha256 = ["zz"]
[[tenants]]
id = "c"
key_sha256 = []
rate_per_second = 0
"#;
        let err = Config::from_toml(text, &|_| None).expect_err("invalid");
        let paths: Vec<_> = err.0.iter().map(|i| i.path.as_str()).collect();
        for p in [
            "server.listen",
            "upstream.url",
            "upstream",
            "tenants[0].id",
            "tenants[0].key_sha256[0]",
            "tenants[1].key_sha256",
            "tenants[1]",
        ] {
            assert!(paths.contains(&p), "missing {p} in {paths:?}");
        }
    }

    #[test]
    fn restart_only_changes_are_named_and_the_rest_reloads() {
        let old = Config::from_toml(MINIMAL, &env).expect("valid");
        let with = |extra: &str, section: &str| {
            let text = MINIMAL.replace(section, &format!("{section}\n{extra}"));
            Config::from_toml(&text, &env).expect("valid")
        };
        for (extra, section, field) in [
            ("listen = \"127.0.0.1:9000\"", "[upstream]", "server.listen"),
            ("url = \"http://127.0.0.1:8082\"", "", "upstream.url"),
            (
                "total_timeout = \"50s\"",
                "[upstream]",
                "upstream.total_timeout",
            ),
            ("[intake]\nmax_parts = 3", "[upstream]", "intake"),
            ("[cache]\npass_ttl = \"1m\"", "[upstream]", "cache"),
            (
                "[limits]\nmax_concurrent_upstream = 3",
                "[upstream]",
                "limits.max_concurrent_upstream",
            ),
        ] {
            let new = match field {
                "server.listen" => {
                    let text = format!("[server]\n{extra}\n{MINIMAL}");
                    Config::from_toml(&text, &env).expect("valid")
                }
                "upstream.url" => Config::from_toml(
                    &MINIMAL.replace("http://127.0.0.1:8081", "http://127.0.0.1:8082"),
                    &env,
                )
                .expect("valid"),
                "upstream.total_timeout" => with(extra, section),
                _ => Config::from_toml(&format!("{extra}\n{MINIMAL}"), &env).expect("valid"),
            };
            assert_eq!(old.restart_only_changes(&new), vec![field], "{extra}");
        }
        // Tenants, limits and the organization key reload.
        let text = MINIMAL.replace(
            "id = \"a\"",
            "id = \"a\"\ndaily_budget = 5\nrate_per_second = 3",
        );
        let new = Config::from_toml(
            &format!("[limits]\nglobal_upstream_rate_per_second = 4\n{text}"),
            &|_| Some("another-org-key".into()),
        )
        .expect("valid");
        assert!(old.restart_only_changes(&new).is_empty());
    }

    #[test]
    fn the_defaults_agree_with_themselves() {
        let c = Config::from_toml(MINIMAL, &env).expect("valid");
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        assert!(c.grace_period >= c.longest_call());
        let short = Config::from_toml(
            &format!("[server]\ngrace_period = \"10s\"\n{MINIMAL}"),
            &env,
        )
        .expect("valid");
        let w = short.warnings();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].path, "server.grace_period");
        assert!(w[0].message.contains("49s"), "{}", w[0].message);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = MINIMAL.replace("[upstream]", "[upstream]\nretries = 3");
        let err = Config::from_toml(&text, &env).expect_err("unknown key");
        assert!(err.to_string().contains("retries"), "{err}");
    }

    #[test]
    fn key_text_in_config_is_refused() {
        let text = MINIMAL.replace("api_key_env = \"ORG_KEY\"", "api_key = \"secret\"");
        assert!(Config::from_toml(&text, &env).is_err());
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            parse_base_url("https://kyc.biometric.kz").expect("ok"),
            (true, "kyc.biometric.kz".into(), 443)
        );
        assert_eq!(
            parse_base_url("http://127.0.0.1:9/").expect("ok"),
            (false, "127.0.0.1".into(), 9)
        );
        assert_eq!(
            parse_base_url("https://[::1]:8443").expect("ok"),
            (true, "::1".into(), 8443)
        );
        assert!(parse_base_url("https://kyc.biometric.kz/api").is_err());
        assert!(parse_base_url("kyc.biometric.kz").is_err());
        for bad in [
            "http://a b",
            "http://a\r\nX: y",
            "https://kyc.biometric.kz:x",
        ] {
            assert!(parse_base_url(bad).is_err(), "{bad:?}");
        }
    }
}
