//! Configuration as plain data, the bottom of the crate: `RawConfig` mirrors the TOML file
//! (unknown keys refused, defaults filled in), and `Config::validate` turns it into checked plain
//! values, reporting every problem at once with its path in the file. Nothing here is live: no
//! lock, no key set, no certificate. The only files read are the config itself and the secrets
//! it names; what else it names (certificates, CAs, JWKS files) is read by the runtime, which
//! checks it with `NamedFiles`. The value types the config speaks in live here too: secrets,
//! rates, the budget calendar, the edge settings, the organization keys, the issuers' settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use upstream::two_key_sources;

mod auth;
mod breaker;
mod budgets;
mod cache;
mod calendar;
mod cors;
mod edge;
mod explain;
mod intake;
mod limits;
pub mod memory;
pub mod notify;
mod org_keys;
mod rate;
mod receipts;
mod secret;
mod server;
pub mod store;
mod tenants;
pub mod tenants_dir;
mod traces;
mod upstream;

pub use auth::{parse_algorithm, Freshness, IssuerConfig, JwksSource, SubjectHashKey};
pub use breaker::{BreakerConfig, RawBreaker};
pub use budgets::{BudgetsConfig, RawBudgets};
pub use cache::{CacheConfig, CacheScope, RawCache};
pub use calendar::{Calendar, Periods};
pub use cors::{CorsConfig, RawCors};
pub use edge::{
    EdgeConfig, ForwardedHeader, TrustedProxies, H2_CONNECTION_WINDOW, H2_SEND_BUFFER,
    H2_STREAM_WINDOW,
};
pub use intake::{ConvertFrom, FaceMode, RawConvert, RawFace, RawIntake};
pub use limits::{LimitsConfig, RawLimits};
pub use notify::{
    signing_key as notify_signing_key, NotifyConfig, RawNotify, Webhook, WebhookFormat,
};
pub use org_keys::{NamedKey, OrgKeys, DEFAULT_KEY_ID};
pub use rate::Rate;
pub use receipts::{RawReceipts, ReceiptKey, ReceiptsConfig, SigningPem};
pub use secret::{print_of, print_seeds, AdminToken, OrgApiKey, Probe, TenantKey, PROBE_BYTES};
pub use server::{LogFormat, RawServer, RawTls, TlsConfig};
pub use store::{StoreBackend, StoreConfig};
pub use tenants::{check_id, key_digest_hex, PerSubject, RawTenant, TenantConfig, UNKNOWN_TENANT};
pub use traces::{RawTracing, TracingConfig};
pub use upstream::{RawUpstream, UpstreamConfig};

const MIB: u64 = 1024 * 1024;

/// What `check-config --offline` puts in place of the store URL's variable.
const OFFLINE_STORE_URL: &str = "redis://offline.invalid:6379/0";

#[derive(Debug, Deserialize)]
pub struct RawConfig {
    /// A folder of `*.toml` files of `[[tenants]]` (one per team, say), read with this file.
    #[serde(default)]
    pub tenants_dir: Option<PathBuf>,
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
    pub cors: RawCors,
    #[serde(default)]
    pub auth: auth::RawAuth,
    /// Signed verdict receipts: off when absent.
    pub receipts: Option<RawReceipts>,
    /// OpenTelemetry traces: off when absent.
    pub tracing: Option<RawTracing>,
    #[serde(default)]
    pub notify: RawNotify,
    #[serde(default)]
    pub tenants: Vec<RawTenant>,
    /// Keys the file has and no section knows (typos): reported with the rest, not alone.
    #[serde(skip)]
    pub unknown: Vec<ConfigIssue>,
    /// Where each of the last tenants was written, when they came from `tenants_dir`: a
    /// problem of theirs is named by its file and line.
    #[serde(skip)]
    pub tenant_origins: Vec<tenants_dir::TenantOrigin>,
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

/// The problems found so far, each with its path; every section adds its own.
#[derive(Debug, Default)]
pub struct Issues(pub Vec<ConfigIssue>);

impl Issues {
    pub fn add(&mut self, path: &str, message: String) {
        self.0.push(ConfigIssue {
            path: path.into(),
            message,
        });
    }
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<AdminToken>,
    /// Names the admin listener answers besides its addresses and `localhost`.
    pub admin_hosts: Vec<String>,
    pub threads: usize,
    pub log_format: LogFormat,
    pub grace_period: Duration,
    pub shutdown_delay: Duration,
    pub watch_config: bool,
    pub edge: EdgeConfig,
    /// The admin listener's edge: the same deadlines and head limit, caps of its own.
    pub admin_edge: EdgeConfig,
    /// The TLS listener, if any (`[server.tls]`).
    pub tls: Option<TlsConfig>,
    /// The plain listener is opened (`server.listen` is not `"none"`).
    pub plain_listener: bool,
    pub upstream: UpstreamConfig,
    pub intake: RawIntake,
    pub limits: LimitsConfig,
    pub cache: CacheConfig,
    pub budgets: BudgetsConfig,
    pub breaker: BreakerConfig,
    pub store: StoreConfig,
    pub cors: CorsConfig,
    pub tenants: Vec<TenantConfig>,
    /// The issuers of app tokens (`[[auth.issuers]]`).
    pub issuers: Vec<IssuerConfig>,
    /// The key of the hash that names an app token's subject wherever it is kept or shown.
    pub subject_hash_key: SubjectHashKey,
    /// Signed verdict receipts, when `[receipts]` is there.
    pub receipts: Option<ReceiptsConfig>,
    /// Traces sent to an OTLP collector, when `[tracing]` is there.
    pub tracing: Option<TracingConfig>,
    /// Webhooks told of budgets, organization keys, the breaker, replays and expiring keys.
    pub notify: NotifyConfig,
    /// The file it came from, for reloads.
    pub source: Option<PathBuf>,
    /// The folder of tenants' files read with it (`tenants_dir`), watched with it.
    pub tenants_dir: Option<PathBuf>,
}

/// Why the environment variable a setting names gives nothing: "environment variable NAME is
/// not set", or, when what is written there is no variable name at all (a secret pasted in
/// place of its variable's name, say), a sentence that does not repeat it.
///
/// A name is repeated only when it reads as variables are named (capitals, digits and `_`,
/// such as `LIVENESS_ORG_API_KEY`): `sk_live_…`, a key pasted where its variable's name goes,
/// has the letters of a name but is not one, and is not printed.
pub fn unset_variable(var: &str, what: &str) -> String {
    let name = !var.is_empty()
        && var.len() <= 64
        && !var.starts_with(|c: char| c.is_ascii_digit())
        && var
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    if name {
        format!("environment variable {var} is {what}")
    } else {
        format!(
            "the environment variable named here is {what}; its name is not repeated, as it is not \
             written as variables are (capitals, digits and `_`) and may be a secret pasted in \
             its place: name the variable that holds the value, never the value itself"
        )
    }
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

    /// The longest a leader can take from its turn in the store to its call's last byte: its
    /// photo's conversion (`intake.convert.timeout`, when photos are converted), then its call.
    /// Followers and other replicas wait for a leader this long.
    pub fn longest_lead(&self) -> Duration {
        let c = &self.intake.convert;
        let converting = if c.formats.is_empty() {
            Duration::ZERO
        } else {
            c.timeout
        };
        self.longest_call() + converting
    }

    /// What a running process needs beyond a valid file: budgets need a place to keep their
    /// counts (`budgets.state_file`), or every restart would give each tenant a new budget.
    /// `serve` refuses to start on it, and `check-config` reports it as an error; what the files
    /// the config names hold is checked where the gateway runs (see `NamedFiles`).
    pub fn process_issues(&self) -> Vec<ConfigIssue> {
        let budgets = self
            .tenants
            .iter()
            .filter(|t| t.daily_budget.is_some() || t.monthly_budget.is_some())
            .count();
        if budgets == 0 || self.budgets.state_file.is_some() || self.store.is_shared() {
            return Vec::new();
        }
        vec![ConfigIssue {
            path: "budgets.state_file".into(),
            message: format!(
                "{budgets} tenant(s) have a budget but no state file keeps the counts: a restart would reset every budget"
            ),
        }]
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
            (
                "server.listen",
                a.listen != b.listen || a.plain_listener != b.plain_listener,
            ),
            ("server.admin_listen", a.admin_listen != b.admin_listen),
            ("server.threads", a.threads != b.threads),
            ("server.log_format", a.log_format != b.log_format),
            (
                "server.tls (listen, cert_file, key_file; the files' contents reload)",
                a.tls != b.tls,
            ),
            ("server.grace_period", a.grace_period != b.grace_period),
            ("server (header_timeout, keepalive_timeout, max_header_bytes, max_connections, max_connections_per_ip, trusted_proxies, forwarded_header, h2c, h2_max_streams)", a.edge != b.edge),
            (
                "server (admin_max_connections, admin_max_connections_per_ip)",
                a.admin_edge != b.admin_edge,
            ),
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
            ("tracing", a.tracing != b.tracing),
            ("cache", a.cache != b.cache),
            ("breaker", a.breaker != b.breaker),
            ("store", a.store != b.store),
            (
                "budgets.state_file",
                a.budgets.state_file != b.budgets.state_file,
            ),
            (
                "budgets.timezone",
                a.budgets.calendar != b.budgets.calendar,
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
        Config::validate_file(RawConfig::read(path)?, path, env)
    }

    /// Validate the tables read from the file at `path` (`RawConfig::read`), which reloads read
    /// again.
    pub fn validate_file(
        raw: RawConfig,
        path: &Path,
        env: EnvLookup<'_>,
    ) -> Result<Config, ConfigErrors> {
        let mut cfg = Config::validate(raw, env)?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Check a file without its secrets: every rule but reading the organization keys (from the
    /// environment or a file) and the store's URL variable, which exist only where the gateway
    /// runs.
    pub fn check_offline(path: &Path) -> Result<Config, ConfigErrors> {
        let mut raw = RawConfig::read(path)?;
        // The store's URL variable exists only where the gateway runs: a well-formed stand-in.
        let url_env = raw.store.url_env.clone();
        let is_url = move |name: &str| url_env.as_deref() == Some(name);
        let single = raw.upstream.api_key_env.is_some() || raw.upstream.api_key_file.is_some();
        let both = raw.upstream.api_key_env.is_some() && raw.upstream.api_key_file.is_some();
        if single {
            raw.upstream.api_key_env = Some("OFFLINE_PLACEHOLDER".into());
            raw.upstream.api_key_file = None;
        }
        // Each named key with one source stands in the same way; one with two or none keeps
        // them, so that the check still says so.
        for k in &mut raw.upstream.keys {
            if k.api_key_env.is_some() != k.api_key_file.is_some() {
                k.api_key_env = Some("OFFLINE_PLACEHOLDER".into());
                k.api_key_file = None;
            }
        }
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
        Config::validate(RawConfig::parse(text)?, env)
    }

    pub fn validate(raw: RawConfig, env: EnvLookup<'_>) -> Result<Config, ConfigErrors> {
        let origins = raw.tenant_origins.clone();
        let first = raw.tenants.len().saturating_sub(origins.len());
        Config::validate_tables(raw, env)
            .map_err(|e| ConfigErrors(tenants_dir::locate(e.0, first, &origins)))
    }

    fn validate_tables(raw: RawConfig, env: EnvLookup<'_>) -> Result<Config, ConfigErrors> {
        // Each section checks its own table; every problem of every section is reported.
        let mut issues = Issues(raw.unknown);
        let server = server::check(&raw.server, env, &mut issues);
        let upstream = upstream::check(&raw.upstream, env, &mut issues);
        intake::check(&raw.intake, &mut issues);
        let (limits, defaults) = limits::check(&raw.limits, &mut issues);
        let cache = cache::check(&raw.cache, &mut issues);
        breaker::check(&raw.breaker, &mut issues);
        let budgets = budgets::check(raw.budgets, &mut issues);
        let mut tenants =
            tenants::check(&raw.tenants, defaults, budgets.price_per_call, &mut issues);
        let (key_ids, default_key) = upstream::key_ids(&raw.upstream);
        tenants::check_org_keys(
            &raw.tenants,
            &mut tenants,
            &key_ids,
            default_key.as_deref(),
            &mut issues,
        );
        let tenant_ids: Vec<String> = raw.tenants.iter().map(|t| t.id.clone()).collect();
        let issuers = auth::check(&raw.auth, &tenant_ids, &mut issues);
        auth::check_required(&raw.tenants, &mut tenants, &raw.auth.issuers, &mut issues);
        let subject_hash_key =
            auth::subject_hash_key(&raw.auth, upstream.as_ref(), env, &mut issues);
        let store = store::check(raw.store, env, &mut issues);
        let org_key_vars: Vec<&str> = (raw.upstream.api_key_env.iter())
            .chain(
                raw.upstream
                    .keys
                    .iter()
                    .filter_map(|k| k.api_key_env.as_ref()),
            )
            .map(String::as_str)
            .collect();
        let receipts = receipts::check(raw.receipts.as_ref(), &org_key_vars, env, &mut issues);
        let tracing = traces::check(raw.tracing.as_ref(), env, &mut issues);
        let notify = notify::check(raw.notify, env, &mut issues);
        let mut cors = cors::check(raw.cors, &mut issues);
        for h in issuers.iter().filter_map(|i| i.header.as_ref()) {
            if !cors.token_headers.iter().any(|t| t == h.as_str()) {
                cors.token_headers.push(h.as_str().to_string());
            }
        }
        match (issues.0.is_empty(), server, upstream) {
            (true, Some(server), Some(upstream)) => Ok(Config {
                listen: server.listen,
                admin_listen: server.admin_listen,
                admin_token: server.admin_token,
                admin_hosts: server.admin_hosts,
                threads: raw.server.threads,
                log_format: raw.server.log_format,
                grace_period: raw.server.grace_period,
                shutdown_delay: raw.server.shutdown_delay,
                watch_config: raw.server.watch_config,
                edge: server.edge,
                admin_edge: server.admin_edge,
                tls: server.tls,
                plain_listener: server.plain,
                upstream,
                intake: raw.intake,
                limits,
                cache,
                budgets,
                breaker: raw.breaker,
                store,
                cors,
                tenants,
                issuers,
                subject_hash_key,
                receipts,
                tracing,
                notify,
                source: None,
                tenants_dir: raw.tenants_dir,
            }),
            _ => Err(ConfigErrors(issues.0)),
        }
    }
}

/// The files a config names that are read where the gateway runs, not with the config: the
/// certificate and its key, the upstream's and the store's CAs, the folder of the budget state
/// file, the issuers' JWKS files. Taken from the file's tables, so that they are known even when
/// other parts of it are invalid, and their problems are reported with the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamedFiles {
    /// `[server.tls]`: the certificate chain and its private key.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub upstream_ca: Option<PathBuf>,
    pub store_ca: Option<PathBuf>,
    pub state_file: Option<PathBuf>,
    /// Each issuer's JWKS file, with where it is written (`auth.issuers[0].jwks_file`).
    pub jwks: Vec<(String, PathBuf)>,
}

impl RawConfig {
    /// Read and parse a config file (see `parse`).
    pub fn read(path: &Path) -> Result<RawConfig, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigIssue {
                path: path.display().to_string(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        let mut raw = RawConfig::parse(&text)?;
        if let Some(folder) = path.parent() {
            raw.resolve_paths(folder);
        }
        if let Some(dir) = &raw.tenants_dir {
            // The folder's files are part of the config: a problem in any of them refuses it
            // whole, with the main file's own unknown keys.
            match tenants_dir::read(dir) {
                Ok((tenants, origins)) => {
                    raw.tenants.extend(tenants);
                    raw.tenant_origins = origins;
                }
                // Reported with every other problem of the config: it is validated all the same,
                // without the folder's tenants.
                Err(found) => raw.unknown.extend(found),
            }
        }
        Ok(raw)
    }

    /// Make every file the tables name relative to `folder` (the config file's), as a relative
    /// `include` or `ssl_certificate` is in nginx: the same file is meant wherever the process
    /// is started from (a systemd unit sets no working directory). Absolute paths stay.
    /// `tests::every_file_setting_is_resolved_against_the_config_folder` keeps this list whole.
    pub fn resolve_paths(&mut self, folder: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = folder.join(&*p);
            }
        };
        let u = &mut self.upstream;
        let keys = u.keys.iter_mut().filter_map(|k| k.api_key_file.as_mut());
        let issuers = self.auth.issuers.iter_mut();
        let receipts = self.receipts.iter_mut();
        let tls = self.server.tls.iter_mut();
        for p in [
            self.tenants_dir.as_mut(),
            u.api_key_file.as_mut(),
            u.ca_file.as_mut(),
            self.store.ca_file.as_mut(),
            self.budgets.state_file.as_mut(),
        ]
        .into_iter()
        .flatten()
        .chain(keys)
        .chain(issuers.filter_map(|i| i.jwks_file.as_mut()))
        .chain(
            receipts
                .flat_map(|r| [r.key_file.as_mut(), r.listed_jwks_file.as_mut()])
                .flatten(),
        )
        .chain(tls.flat_map(|t| [&mut t.cert_file, &mut t.key_file]))
        {
            resolve(p);
        }
    }

    /// Parse a file into its raw tables. Unknown keys do not stop it: they are collected (with
    /// their line) and reported beside every other problem. A value of the wrong type does stop
    /// it; then each section is parsed on its own, so that every section's first such problem
    /// is reported at once, each with its line.
    pub fn parse(text: &str) -> Result<RawConfig, ConfigErrors> {
        parse_raw(text)
    }

    /// The files these tables name beyond their secrets.
    pub fn named_files(&self) -> NamedFiles {
        NamedFiles {
            tls: self
                .server
                .tls
                .as_ref()
                .map(|t| (t.cert_file.clone(), t.key_file.clone())),
            upstream_ca: self.upstream.ca_file.clone(),
            store_ca: self.store.ca_file.clone(),
            state_file: self.budgets.state_file.clone(),
            jwks: (self.auth.issuers.iter().enumerate())
                .filter(|(_, i)| i.jwks_url.is_none())
                .filter_map(|(n, i)| {
                    let at = format!("auth.issuers[{n}].jwks_file");
                    i.jwks_file.clone().map(|f| (at, f))
                })
                .collect(),
        }
    }
}

fn parse_raw(text: &str) -> Result<RawConfig, ConfigErrors> {
    let mut unknown = Vec::new();
    let parsed: Result<RawConfig, _> =
        serde_ignored::deserialize(toml::Deserializer::new(text), |path| {
            unknown.push(path.to_string())
        });
    match parsed {
        Ok(mut raw) => {
            raw.unknown = unknown
                .into_iter()
                .map(|p| {
                    // serde_ignored writes `?` for an `Option`'s inside: not a key.
                    let segments: Vec<&str> = p.split('.').filter(|s| *s != "?").collect();
                    let line = line_of(text, &segments)
                        .map(|n| format!(" (line {n})"))
                        .unwrap_or_default();
                    ConfigIssue {
                        path: dotted(&segments),
                        message: unknown_key(&segments, &line),
                    }
                })
                .collect();
            Ok(raw)
        }
        Err(first) => Err(ConfigErrors(section_errors(text, first))),
    }
}

/// What to say of an unknown key at `segments`: the key it is likely a typo of, and for an
/// organization key written in the file, where it goes instead.
fn unknown_key(segments: &[&str], line: &str) -> String {
    let (key, table) = segments.split_last().unwrap_or((&"", &[]));
    let table: String = table.iter().fold(String::new(), |mut t, s| {
        if s.bytes().all(|b| b.is_ascii_digit()) {
            t.push_str("[]");
        } else {
            if !t.is_empty() {
                t.push('.');
            }
            t.push_str(s);
        }
        t
    });
    if *key == "api_key" && matches!(table.as_str(), "upstream" | "upstream.keys[]") {
        return format!("unknown key{line}: the organization key never goes in the config text; write it in a file named by api_key_file, or a variable named by api_key_env");
    }
    match explain::did_you_mean(&table, key) {
        Some(k) => format!("unknown key{line}; did you mean {k}?"),
        None => format!("unknown key{line}"),
    }
}

/// The admin listener a config file names (`server.admin_listen`, or its default), read from
/// the file alone: whatever else is wrong with it, even its syntax.
pub fn admin_listen_of(text: &str) -> String {
    let from_table = text.parse::<toml::Table>().ok().map(|t| {
        t.get("server")
            .and_then(|s| s.get("admin_listen"))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    });
    let from_lines = || {
        let mut in_server = false;
        text.lines().find_map(|l| {
            let l = l.trim();
            if l.starts_with('[') {
                in_server = l == "[server]";
                return None;
            }
            let (k, v) = l.split_once('=')?;
            (in_server && k.trim() == "admin_listen")
                .then(|| v.trim().trim_matches('"').to_string())
        })
    };
    match from_table {
        Some(listen) => listen,
        None => from_lines(),
    }
    .unwrap_or_else(|| RawServer::default().admin_listen)
}

/// `tenants.0.rate` as the paths of `validate` write it: `tenants[0].rate`.
fn dotted(segments: &[&str]) -> String {
    let mut out = String::new();
    for s in segments {
        if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() {
            out.push_str(&format!("[{s}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(s);
        }
    }
    out
}

use explain::line_of;

/// Every section's first problem, each parsed alone; the first error if that finds none (a
/// syntax error, where nothing after it can be read).
fn section_errors(text: &str, first: toml::de::Error) -> Vec<ConfigIssue> {
    fn message(e: &toml::de::Error, text: &str) -> String {
        unquoted(&e.message().replace('\n', " ")) + &span_hint(text, e.span())
    }
    let one = |e: &toml::de::Error| ConfigIssue {
        path: "(file)".into(),
        message: message(e, text),
    };
    let Ok(parsed) = text.parse::<toml::Table>() else {
        return vec![one(&first)];
    };
    let mut out = Vec::new();
    macro_rules! section {
        ($name:literal, $field:ident, $ty:ty, $default:meta) => {{
            #[derive(Deserialize)]
            struct Only {
                #[$default]
                #[allow(dead_code)]
                $field: $ty,
            }
            // Each wrong key of the section in turn: the one serde names is reported and taken
            // out of a copy of the file, which is read again for the next.
            let mut doc = parsed.clone();
            for round in 0..16 {
                let t = match round {
                    0 => text.to_string(),
                    _ => toml::to_string(&doc).unwrap_or_default(),
                };
                let Err(e) = toml::from_str::<Only>(&t) else {
                    break;
                };
                let at = e.span().and_then(|r| explain::key_at(&t, r.start));
                let Some(segments) = at else {
                    out.push(ConfigIssue {
                        path: $name.into(),
                        message: message(&e, &t),
                    });
                    break;
                };
                let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
                let message = match round {
                    0 => message(&e, text),
                    _ => {
                        let line = line_of(text, &segments)
                            .map(|n| format!(" (line {n})"))
                            .unwrap_or_default();
                        unquoted(&e.message().replace('\n', " ")) + &line
                    }
                };
                out.push(ConfigIssue {
                    path: dotted(&segments),
                    message,
                });
                if !remove_key(&mut doc, &segments) {
                    break;
                }
            }
        }};
    }
    section!("server", server, RawServer, serde(default));
    section!("upstream", upstream, RawUpstream, serde());
    section!("intake", intake, RawIntake, serde(default));
    section!("limits", limits, RawLimits, serde(default));
    section!("cache", cache, RawCache, serde(default));
    section!("budgets", budgets, RawBudgets, serde(default));
    section!("breaker", breaker, RawBreaker, serde(default));
    section!("store", store, store::RawStore, serde(default));
    section!("cors", cors, RawCors, serde(default));
    section!("auth", auth, auth::RawAuth, serde(default));
    section!("receipts", receipts, Option<RawReceipts>, serde(default));
    section!("tracing", tracing, Option<RawTracing>, serde(default));
    section!("notify", notify, RawNotify, serde(default));
    tenant_errors(text, &mut out);
    // Unknown keys too, as a file that deserializes hears of them: a typo beside a wrong type
    // is not left for the next run.
    unknown_key_errors(text, &mut out);
    if out.is_empty() {
        out.push(one(&first));
    }
    out
}

/// The first problem of each `[[tenants]]` table of `text` that does not deserialize, each with
/// the tenant's id and its line.
fn tenant_errors(text: &str, out: &mut Vec<ConfigIssue>) {
    fn message(e: &toml::de::Error, text: &str) -> String {
        unquoted(&e.message().replace('\n', " ")) + &span_hint(text, e.span())
    }
    #[derive(Deserialize)]
    struct Tenants {
        #[serde(default)]
        tenants: Vec<toml::Spanned<toml::Table>>,
    }
    match toml::from_str::<Tenants>(text) {
        Ok(t) => {
            for (n, tenant) in t.tenants.into_iter().enumerate() {
                let line = span_hint(text, Some(tenant.span()));
                let mut table = tenant.into_inner();
                // Each wrong key in turn: the one serde names is found and set aside, then
                // the next (a table has as many at most as it has keys).
                for _ in 0..=table.len() {
                    let Err(e) = toml::Value::Table(table.clone()).try_into::<RawTenant>() else {
                        break;
                    };
                    let (issue, culprit) = tenant_issue(text, n, &table, &line, &e);
                    out.push(issue);
                    match culprit {
                        Some((key, Some(inner))) => {
                            if let Some(toml::Value::Table(t)) = table.get_mut(&key) {
                                t.remove(&inner);
                            }
                        }
                        Some((key, None)) => {
                            table.remove(&key);
                        }
                        None => break,
                    }
                }
            }
        }
        Err(e) => out.push(ConfigIssue {
            path: "tenants".into(),
            message: message(&e, text),
        }),
    }
}

/// Every key of `text` that no table knows, with its line.
fn unknown_key_errors(text: &str, out: &mut Vec<ConfigIssue>) {
    if let Ok(table) = text.parse::<toml::Table>() {
        let mut unknown = Vec::new();
        explain::unknown_keys(&table, &mut Vec::new(), "", &mut unknown);
        for segments in unknown {
            let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
            let line = line_of(text, &segments)
                .map(|n| format!(" (line {n})"))
                .unwrap_or_default();
            out.push(ConfigIssue {
                path: dotted(&segments),
                message: unknown_key(&segments, &line),
            });
        }
    }
}

/// Take the key at `segments` (tables, and arrays by index) out of `doc`; whether it was there.
fn remove_key(doc: &mut toml::Table, segments: &[&str]) -> bool {
    match segments {
        [] => false,
        [last] => doc.remove(*last).is_some(),
        [first, rest @ ..] => doc.get_mut(*first).is_some_and(|v| remove_in(v, rest)),
    }
}

fn remove_in(value: &mut toml::Value, segments: &[&str]) -> bool {
    match (value, segments) {
        (toml::Value::Table(t), _) => remove_key(t, segments),
        (toml::Value::Array(a), [i, rest @ ..]) if !rest.is_empty() => i
            .parse::<usize>()
            .ok()
            .and_then(|i| a.get_mut(i))
            .is_some_and(|v| remove_in(v, rest)),
        _ => false,
    }
}

/// A tenant's table that does not deserialize: which of its keys is wrong (the one whose
/// removal makes the error go, or leaves only a missing field; within a sub-table such as
/// `per_subject`, its own key), named with the tenant's id and the key's line. Serde's own
/// message names neither.
fn tenant_issue(
    text: &str,
    n: usize,
    table: &toml::Table,
    table_line: &str,
    e: &toml::de::Error,
) -> (ConfigIssue, Option<(String, Option<String>)>) {
    let message = unquoted(&e.message().replace('\n', " "));
    // Serde names the first wrong key it meets: without it, the table deserializes or fails on
    // another key (or on a field it lacks), never again on this one.
    let fixes = |without: toml::Table| match toml::Value::Table(without).try_into::<RawTenant>() {
        Ok(_) => true,
        Err(other) => other.message() != e.message(),
    };
    let culprit = table.keys().find(|k| {
        let mut without = table.clone();
        without.remove(k.as_str());
        fixes(without)
    });
    let inner = culprit.and_then(|k| {
        let sub = table.get(k)?.as_table()?;
        sub.keys().find(|ik| {
            let mut without = table.clone();
            if let Some(toml::Value::Table(t)) = without.get_mut(k.as_str()) {
                t.remove(ik.as_str());
            }
            fixes(without)
        })
    });
    let id = table
        .get("id")
        .and_then(|v| v.as_str())
        .map(|id| format!(" (id {id:?})"))
        .unwrap_or_default();
    let index = n.to_string();
    let mut path: Vec<&str> = vec!["tenants", &index];
    path.extend(culprit.map(String::as_str));
    path.extend(inner.map(String::as_str));
    let line = line_of(text, &path)
        .map(|l| format!(" (line {l})"))
        .unwrap_or_else(|| table_line.to_string());
    let field: String = path[2..].iter().map(|k| format!(".{k}")).collect();
    let issue = ConfigIssue {
        path: format!("tenants[{n}]{id}{field}"),
        message: format!("{message}{line}"),
    };
    (issue, culprit.map(|k| (k.clone(), inner.cloned())))
}

/// A deserializer's message without the string value it quotes (`invalid type: string "…"`):
/// a secret written in the wrong place is not repeated.
fn unquoted(message: &str) -> String {
    let mut out = String::new();
    let mut rest = message;
    while let Some(i) = rest.find("string \"") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 8..];
        match after.find("\", expected") {
            Some(end) => {
                out.push_str("a string");
                rest = &after[end + 1..];
            }
            None => {
                out.push_str("a string");
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => format!(
            " (line {})",
            text.as_bytes()[..r.start.min(text.len())]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1
        ),
        None => String::new(),
    }
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

    /// A secret pasted where the name of its variable goes is not repeated by the error (which
    /// `check-config`, the log and `/admin/reload` show).
    #[test]
    fn a_secret_written_in_place_of_a_variable_name_is_not_repeated() {
        let secret = "Zk9y/Secr3t+OrgKey=2024abcXYZ";
        let text = MINIMAL.replace("\"ORG_KEY\"", &format!("\"{secret}\""))
            + &format!("[server]\nadmin_token_env = \"{secret}\"\n");
        let err = Config::from_toml(&text, &|_| None)
            .expect_err("unset")
            .to_string();
        assert!(!err.contains(secret), "{err}");
        assert!(err.contains("upstream.api_key_env"), "{err}");
        assert!(err.contains("server.admin_token_env"), "{err}");
        let err = Config::from_toml(MINIMAL, &|_| None)
            .expect_err("unset")
            .to_string();
        assert!(
            err.contains("environment variable ORG_KEY is not set"),
            "{err}"
        );
    }

    /// Every file setting, written relative, names a file in the config's folder once read;
    /// an absolute one stays. The count of `PathBuf` fields in the `Raw*` tables keeps the list
    /// whole: a new file setting fails here until it is resolved (and written below).
    #[test]
    fn every_file_setting_is_resolved_against_the_config_folder() {
        let text = r#"
tenants_dir = "rel/tenants.d"
[server.tls]
listen = "127.0.0.1:8443"
cert_file = "rel/cert.pem"
key_file = "rel/key.pem"
[upstream]
url = "https://127.0.0.1:8081"
api_key_file = "rel/org.key"
ca_file = "rel/ca.pem"
[[upstream.keys]]
id = "k"
api_key_file = "rel/k.key"
[store]
ca_file = "rel/redis-ca.pem"
[budgets]
state_file = "/abs/budgets.json"
[[auth.issuers]]
id = "i"
jwks_file = "rel/jwks.json"
tenant = "a"
[receipts]
issuer = "x"
key_file = "rel/receipt.pem"
listed_jwks_file = "rel/listed.json"
"#;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).expect("write");
        std::fs::create_dir_all(dir.path().join("rel/tenants.d")).expect("folder");
        let raw = RawConfig::read(&path).expect("read");
        let shown = format!("{raw:?}");
        let set = text.matches("_file = ").count() + text.matches("_dir = ").count();
        let resolved = shown
            .matches(&format!("{}/rel/", dir.path().display()))
            .count();
        assert_eq!(resolved, set - 1, "{shown}");
        assert!(shown.contains("\"/abs/budgets.json\""), "{shown}");
        // Every file setting of the tables is in the text above.
        let mut fields = 0;
        for f in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src/config")).expect("src")
        {
            let source = std::fs::read_to_string(f.expect("entry").path()).expect("read");
            for block in source.split("pub struct ").skip(1) {
                let body = block.split("\n}").next().unwrap_or_default();
                if block.starts_with("Raw") {
                    fields += body
                        .lines()
                        .filter(|l| l.contains("PathBuf") && l.trim_start().starts_with("pub "))
                        .count();
                }
            }
        }
        assert_eq!(
            fields, set,
            "a file setting of the Raw tables is not in this test"
        );
    }

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
        assert_eq!(c.tenants[0].rate, Rate::per_second(20));
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
    fn a_typo_does_not_hide_the_other_problems() {
        let text = format!(
            "{MINIMAL}\n[cache]\nenabeld = true\n\n[[tenants]]\nid = \"bad id!\"\nkey_sha256 = [\"nothex\"]\n"
        );
        let err = Config::from_toml(&text, &env).expect_err("three problems");
        let all: Vec<String> = err.0.iter().map(|i| i.to_string()).collect();
        let line = text
            .lines()
            .position(|l| l.starts_with("enabeld"))
            .expect("line")
            + 1;
        for want in [
            format!("cache.enabeld: unknown key (line {line}); did you mean enabled?"),
            "tenants[1].id".to_string(),
            "tenants[1].key_sha256[0]: must be 64 hex digits".to_string(),
        ] {
            assert!(
                all.iter().any(|i| i.starts_with(&want)),
                "{want} not in {all:?}"
            );
        }
    }

    /// An organization key written in the file is one problem, where it is written, saying
    /// where it goes (it once made five: the key, the missing source, and every tenant).
    #[test]
    fn an_inline_organization_key_is_one_problem() {
        let text = MINIMAL.replace("api_key_env = \"ORG_KEY\"", "api_key = \"s3cr3t-inline\"")
            + "\n[[tenants]]\nid = \"b\"\nkey_sha256 = [\"0000000000000000000000000000000000000000000000000000000000000001\"]\n";
        let err = Config::from_toml(&text, &env).expect_err("an inline key");
        let all: Vec<String> = err.0.iter().map(|i| i.to_string()).collect();
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(
            all[0].starts_with("upstream.api_key: unknown key (line 4)")
                && all[0].contains("api_key_file"),
            "{all:?}"
        );
        assert!(!all[0].contains("s3cr3t"));
    }

    /// Paths as TOML writes them: dotted keys at the top, quoted and spaced headers, arrays of
    /// tables and their sub-tables, the `[auth]` section; no value is repeated.
    #[test]
    fn every_problem_names_its_field_however_the_file_writes_it() {
        let types = r#"server.tls.cert_file = 5
[upstream]
url = "https://x"
api_key_env = "K"
[[upstream.keys]]
id = "a"
api_key_env = 5
[[tenants]]
id = "t1"
key_sha256 = []
[tenants.per_subject]
burst = "s3cr3t"
[ "auth" ]
subject_hash_key_env = 5
"#;
        let all: Vec<String> = Config::from_toml(types, &env)
            .expect_err("types")
            .0
            .iter()
            .map(|i| i.to_string())
            .collect();
        for want in [
            "server.tls.cert_file: invalid type: integer `5`, expected path string (line 1)",
            "upstream.keys[0].api_key_env: invalid type: integer `5`, expected a string (line 7)",
            "auth.subject_hash_key_env: invalid type: integer `5`, expected a string (line 14)",
            "tenants[0] (id \"t1\").per_subject.burst: invalid type: a string, expected u32 (line 12)",
        ] {
            assert!(all.iter().any(|i| i == want), "{want} not in {all:?}");
        }
        assert!(!all.iter().any(|i| i.contains("s3cr3t")), "{all:?}");
        // A typo beside a wrong type is told in the same run, once.
        let both = "[upstream]\nurl = \"https://x\"\napi_key_env = \"K\"\n[intake]\nmax_parts = \"eight\"\n[intake.convert]\nqualty = 90\n[[tenants]]\nid = \"t1\"\nkey_sha256 = []\nrate = 5\ndayly_budget = 3\n[cache]\nttl = \"1h\"\n";
        let all: Vec<String> = Config::from_toml(both, &env)
            .expect_err("both")
            .0
            .iter()
            .map(|i| i.to_string())
            .collect();
        for want in [
            "intake.max_parts: invalid type: a string, expected usize (line 5)",
            "tenants[0] (id \"t1\").rate: invalid type: integer `5`, expected a string (line 11)",
            "intake.convert.qualty: unknown key (line 7); did you mean quality?",
            "tenants[0].dayly_budget: unknown key (line 12); did you mean daily_budget?",
        ] {
            assert!(all.iter().any(|i| i == want), "{want} not in {all:?}");
        }
        assert_eq!(all.len(), 4, "{all:?}");
        // Two wrong types in one section: both told.
        let two = "[upstream]\nurl = \"https://x\"\napi_key_env = \"K\"\n[intake]\nmax_parts = \"x\"\n[intake.convert]\nquality = \"high\"\n";
        let all: Vec<String> = Config::from_toml(two, &env)
            .expect_err("two")
            .0
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(
            all,
            [
                "intake.max_parts: invalid type: a string, expected usize (line 5)",
                "intake.convert.quality: invalid type: a string, expected u8 (line 7)",
            ]
        );
        // Several wrong types in one tenant, beside unknown keys: each named, on its own line.
        let tenant = "[upstream]\nurl = \"https://x\"\napi_key_env = \"K\"\n[[tenants]]\nid = \"a\"\nkey_sha256 = []\ndaily_budget = \"x\"\ndaily_budjet = 3\n[tenants.per_subject]\nburst = \"y\"\nburts = 1\n";
        let all: Vec<String> = Config::from_toml(tenant, &env)
            .expect_err("tenant")
            .0
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(
            all,
            [
                "tenants[0] (id \"a\").daily_budget: invalid type: a string, expected u64 (line 7)",
                "tenants[0] (id \"a\").per_subject.burst: invalid type: a string, expected u32 (line 10)",
                "tenants[0].daily_budjet: unknown key (line 8); did you mean daily_budget?",
                "tenants[0].per_subject.burts: unknown key (line 11); did you mean burst?",
            ]
        );
        // A key pasted where its variable's name goes is not repeated.
        let pasted =
            "[upstream]\nurl = \"https://x\"\napi_key_env = \"sk_live_SUPERSECRET_abc123\"\n";
        let all = Config::from_toml(pasted, &|_| None)
            .expect_err("pasted")
            .to_string();
        assert!(!all.contains("SUPERSECRET"), "{all}");
        assert!(all.contains("upstream.api_key_env"), "{all}");
        let unknown = "[upstream]\nurl = \"https://x\"\napi_key_env = \"K\"\n[[tenants]]\nid = \"t1\"\nkey_sha256 = [\"0000000000000000000000000000000000000000000000000000000000000000\"]\n[tenants.per_subject]\nburts = 3\n[[upstream.keys]]\nid = \"k\"\napi_key = \"zz-inline\"\n";
        let all: Vec<String> = Config::from_toml(unknown, &env)
            .expect_err("unknown")
            .0
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert!(
            all.contains(
                &"tenants[0].per_subject.burts: unknown key (line 8); did you mean burst?"
                    .to_string()
            ),
            "{all:?}"
        );
        assert!(
            all.iter()
                .any(|i| i.starts_with("upstream.keys[0].api_key: unknown key (line 11)")),
            "{all:?}"
        );
        assert!(
            !all.iter().any(|i| i.starts_with("upstream.keys[0]: ")),
            "an inline key is one problem: {all:?}"
        );
    }

    #[test]
    fn wrong_types_are_reported_for_every_section_with_their_lines() {
        let text = format!(
            "{MINIMAL}\n[server]\nthreads = \"two\"\n[cache]\nttl = 5\n[[tenants]]\nid = \"a\"\nkey_sha256 = []\nburst = \"x\"\n"
        );
        let err = Config::from_toml(&text, &env).expect_err("three problems");
        let all: Vec<String> = err.0.iter().map(|i| i.to_string()).collect();
        assert_eq!(all.len(), 3, "{all:?}");
        let line_of = |needle: &str| {
            text.lines()
                .position(|l| l.starts_with(needle))
                .expect("line")
                + 1
        };
        // Each names its field (serde names only the table), a tenant its id too.
        assert!(
            all[0].starts_with("server.threads: ")
                && all[0].contains(&format!("(line {})", line_of("threads"))),
            "{all:?}"
        );
        assert!(
            all[1].starts_with("cache.ttl: ")
                && all[1].contains(&format!("(line {})", line_of("ttl"))),
            "{all:?}"
        );
        assert!(
            all[2].starts_with("tenants[1] (id \"a\").burst: ")
                && all[2].contains(&format!("(line {})", line_of("burst"))),
            "{all:?}"
        );
        assert!(all.iter().all(|i| !i.contains('\n')), "{all:?}");
        // A syntax error stops everything after it: reported alone, on its line.
        let err = Config::from_toml("[server]\nthreads = = 2\n", &env).expect_err("syntax");
        assert_eq!(err.0.len(), 1);
        assert!(err.0[0].message.contains("(line 2)"), "{:?}", err.0);
    }

    #[test]
    fn key_text_in_config_is_refused() {
        let text = MINIMAL.replace("api_key_env = \"ORG_KEY\"", "api_key = \"secret\"");
        assert!(Config::from_toml(&text, &env).is_err());
    }
}
