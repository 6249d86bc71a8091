//! `[upstream]`: where the provider is, the organization key's source, and the deadlines.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigIssue, EnvLookup, Issues, NamedKey, OrgApiKey, OrgKeys, DEFAULT_KEY_ID, MIB};

#[derive(Debug, Deserialize)]
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
    /// More organization keys, each with its id (`[[upstream.keys]]`); a tenant names its own
    /// with `org_key`. The key of `api_key_env` / `api_key_file`, if set, is the one named
    /// `default`.
    #[serde(default)]
    pub keys: Vec<RawOrgKey>,
    /// The key of the tenants that name none, when `api_key_env` / `api_key_file` is not set.
    pub default_key: Option<String>,
    /// How often a lapsed key (the provider refused its subscription) is tried again by one
    /// request of a tenant that has a fallback.
    #[serde(default = "d_60s", with = "humantime_serde")]
    pub key_probe_interval: Duration,
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

#[derive(Debug, Deserialize)]
pub struct RawOrgKey {
    /// The key's name in logs, metrics and the usage history (never the key).
    pub id: String,
    pub api_key_env: Option<String>,
    pub api_key_file: Option<PathBuf>,
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

/// Where the upstream is and how to reach it.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
    /// The organization keys, by id.
    pub keys: OrgKeys,
    pub key_probe_interval: Duration,
    pub ca_file: Option<PathBuf>,
    pub connect_address: Option<std::net::IpAddr>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub total_timeout: Duration,
    pub max_response_bytes: usize,
    pub resolve_interval: Duration,
    pub pool_idle_timeout: Duration,
    /// The provider endpoint as a URL: scheme, host, port and path (no key).
    pub endpoint: String,
    /// A short name of `endpoint`: the fleet's shared verdicts and image locks are kept apart
    /// by it, so deployments that share a Redis and a key prefix (a staging on the emulator, a
    /// production on the provider) never serve each other's verdicts.
    pub fingerprint: String,
}

/// Check `[upstream]` and read the organization key; `None` when the URL or the key is unusable.
pub fn check(raw: &RawUpstream, env: EnvLookup<'_>, issues: &mut Issues) -> Option<UpstreamConfig> {
    let mut issue = |path: &str, message: String| issues.add(path, message);
    let u = raw;
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
    let keys = check_keys(u, env, issues);
    let mut issue = |path: &str, message: String| issues.add(path, message);
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

    let url_ok = port != 0;
    let endpoint = format!(
        "{}://{host}:{port}{}",
        if tls { "https" } else { "http" },
        u.path
    );
    let fingerprint = hex::encode(&blake3::hash(endpoint.as_bytes()).as_bytes()[..4]);
    Some(UpstreamConfig {
        tls,
        host,
        port,
        path: u.path.clone(),
        keys: keys.filter(|_| url_ok)?,
        key_probe_interval: u.key_probe_interval,
        ca_file: u.ca_file.clone(),
        connect_address,
        connect_timeout,
        read_timeout,
        write_timeout,
        total_timeout: u.total_timeout,
        max_response_bytes: u.max_response_bytes as usize,
        resolve_interval: u.resolve_interval,
        pool_idle_timeout: u.pool_idle_timeout,
        endpoint,
        fingerprint,
    })
}

/// The ids of the organization keys the raw table names, and the default one (even where the
/// keys themselves cannot be read here).
pub(super) fn key_ids(u: &RawUpstream) -> (Vec<String>, Option<String>) {
    let single = u.api_key_env.is_some() || u.api_key_file.is_some();
    let mut ids: Vec<String> = single
        .then(|| DEFAULT_KEY_ID.to_string())
        .into_iter()
        .collect();
    ids.extend(u.keys.iter().map(|k| k.id.clone()));
    let default = if single {
        Some(DEFAULT_KEY_ID.to_string())
    } else {
        u.default_key.clone()
    };
    (ids, default)
}

/// Read one key from its variable or its file; `None` (and why, at `at`) when it cannot be.
fn read_key(
    at: &str,
    var: Option<&str>,
    file: Option<&PathBuf>,
    env: EnvLookup<'_>,
    issues: &mut Issues,
) -> Option<OrgApiKey> {
    match (var, file) {
        (Some(var), _) if env(var).is_some_and(|v| !v.trim().is_empty()) => {
            env(var).map(|v| OrgApiKey::new(v.trim()))
        }
        (Some(var), None) => {
            issues.add(
                &format!("{at}.api_key_env"),
                super::unset_variable(var, "not set or empty"),
            );
            None
        }
        (_, Some(file)) => match std::fs::read_to_string(file) {
            Ok(v) if !v.trim().is_empty() => Some(OrgApiKey::new(v.trim())),
            Ok(_) => {
                issues.add(
                    &format!("{at}.api_key_file"),
                    format!("{} is empty", file.display()),
                );
                None
            }
            Err(e) => {
                issues.add(
                    &format!("{at}.api_key_file"),
                    format!("cannot read {}: {e}", file.display()),
                );
                None
            }
        },
        (None, None) => None,
    }
}

/// Read every organization key: the single one of `api_key_env` / `api_key_file` (named
/// `default`) and those of `[[upstream.keys]]`. `None` when one cannot be read.
fn check_keys(u: &RawUpstream, env: EnvLookup<'_>, issues: &mut Issues) -> Option<OrgKeys> {
    if u.api_key_env.is_some() && u.api_key_file.is_some() {
        let two = two_key_sources();
        issues.add(&two.path, two.message);
    }
    let (ids, default) = key_ids(u);
    if ids.is_empty() {
        // A key written in the file is reported where it is written (an unknown key, saying
        // where it goes), once.
        if !issues.0.iter().any(|i| i.path == "upstream.api_key") {
            issues.add("upstream", "set api_key_env or api_key_file (or [[upstream.keys]]): the organization key never goes in the config text".into());
        }
        return None;
    }
    let single = ids.len() > u.keys.len();
    // Every key's source, the single one (named `default`) first: (where, id, variable, file).
    let sources = single
        .then(|| {
            let at = "upstream".to_string();
            (at, DEFAULT_KEY_ID, &u.api_key_env, &u.api_key_file)
        })
        .into_iter()
        .chain(u.keys.iter().enumerate().map(|(n, k)| {
            let at = format!("upstream.keys[{n}]");
            (at, k.id.as_str(), &k.api_key_env, &k.api_key_file)
        }));
    let mut keys = Vec::new();
    let mut complete = true;
    let mut seen = std::collections::HashSet::new();
    for (at, id, var, file) in sources {
        let named = at != "upstream";
        let id_ok = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !id_ok {
            issues.add(
                &format!("{at}.id"),
                "1 to 64 letters, digits, '-', '_' or '.'".into(),
            );
        } else if !seen.insert(id) {
            let why = if id == DEFAULT_KEY_ID {
                "names the key of upstream.api_key_env / api_key_file".to_string()
            } else {
                format!("{id:?} is used twice")
            };
            issues.add(&format!("{at}.id"), why);
        }
        match (var, file) {
            (Some(_), Some(_)) if named => {
                issues.add(&at, "set api_key_env or api_key_file, not both".into())
            }
            // A key written in the file is reported where it is (an unknown key), once.
            (None, None) if issues.0.iter().any(|i| i.path == format!("{at}.api_key")) => {}
            (None, None) => issues.add(&at, "set api_key_env or api_key_file".into()),
            _ => {}
        }
        let key = read_key(&at, var.as_deref(), file.as_ref(), env, issues);
        complete &= key.is_some();
        keys.extend(key.map(|key| NamedKey {
            id: id.to_string(),
            key,
            // A key from a file is watched and read again; a variable's is fixed.
            file: file.clone().filter(|_| var.is_none()),
        }));
    }
    match &u.default_key {
        Some(_) if single => issues.add(
            "upstream.default_key",
            "the key of api_key_env / api_key_file is the default already".into(),
        ),
        Some(id) if !u.keys.iter().any(|k| &k.id == id) => issues.add(
            "upstream.default_key",
            format!("{id:?} is not the id of one of upstream.keys"),
        ),
        _ => {}
    }
    complete.then_some(OrgKeys { keys, default })
}

pub(super) fn two_key_sources() -> ConfigIssue {
    ConfigIssue {
        path: "upstream".into(),
        message: "set api_key_env or api_key_file, not both (one would silently win)".into(),
    }
}

/// `https://host[:port]` or `http://host[:port]`, nothing after the authority.
pub(super) fn parse_base_url(url: &str) -> Result<(bool, String, u16), String> {
    // A user and password in the URL are a secret: never repeated in a message.
    let shown = match url.split_once('@') {
        Some((before, after)) => {
            let scheme = before.split_once("://").map_or("", |(s, _)| s);
            format!("{scheme}://…@{after}")
        }
        None => url.to_string(),
    };

    if url.contains('@') {
        return Err(format!(
            "{shown:?} has a user or password in it: the organization key goes in api_key_env or api_key_file, never in the URL"
        ));
    }
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
