//! `[store]`: where rate limits, budgets, usage history and the second cache level live when
//! several replicas must share them.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{EnvLookup, Issues};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// Everything in this process; budgets persist to `budgets.state_file`.
    #[default]
    Local,
    /// Shared by every replica through Redis (or Valkey).
    Redis,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawStore {
    pub backend: StoreBackend,
    /// `redis://host:port/db` or `rediss://` for TLS; several, comma-separated, for a cluster's
    /// seed nodes. No password here: use `url_env`.
    pub url: Option<String>,
    /// The variable holding the URL (where a password may go).
    pub url_env: Option<String>,
    /// A Redis Cluster: keys are spread by slot, every key of one tenant in one slot.
    pub cluster: bool,
    /// For `rediss://`: the PEM certificate(s) of the CA that signs the store's certificate,
    /// trusted instead of the public roots (a private CA, as self-run Redis TLS uses).
    pub ca_file: Option<PathBuf>,
    pub key_prefix: String,
    /// Per command. A command that gets no answer within it is sent once more when a second run
    /// changes nothing; the store counts as down only when nothing has been answered for a
    /// second (`store::redis`).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            backend: StoreBackend::Local,
            url: None,
            url_env: None,
            cluster: false,
            ca_file: None,
            key_prefix: "lg".into(),
            timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_millis(200),
        }
    }
}

/// The checked `[store]` section. The URLs may hold a password: `Debug` hides them.
#[derive(Clone, PartialEq)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    pub urls: Vec<String>,
    pub cluster: bool,
    /// Read at each connection, so a rotated CA file is taken by the next one.
    pub ca_file: Option<PathBuf>,
    pub key_prefix: String,
    pub timeout: Duration,
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("backend", &self.backend)
            .field("urls", &format_args!("[{} hidden]", self.urls.len()))
            .field("cluster", &self.cluster)
            .field("ca_file", &self.ca_file)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl StoreConfig {
    pub fn is_shared(&self) -> bool {
        self.backend == StoreBackend::Redis
    }
}

/// Check `[store]`, adding what is wrong to `issues`.
pub fn check(raw: RawStore, env: EnvLookup<'_>, issues: &mut Issues) -> StoreConfig {
    let mut issue = |path: &str, message: String| issues.add(&format!("store.{path}"), message);
    let mut urls = Vec::new();
    if raw.backend == StoreBackend::Redis {
        let text = match (&raw.url, &raw.url_env) {
            (Some(_), Some(_)) => {
                issue("url", "set url or url_env, not both".into());
                None
            }
            (None, None) => {
                issue("url", "backend = \"redis\" needs url or url_env".into());
                None
            }
            (Some(u), None) => {
                if has_password(u) {
                    issue(
                        "url",
                        "holds a password: put the URL in a variable and name it in url_env".into(),
                    );
                }
                Some(u.clone())
            }
            (None, Some(var)) => match env(var) {
                Some(u) if !u.trim().is_empty() => Some(u.trim().to_string()),
                _ => {
                    issue("url_env", super::unset_variable(var, "not set"));
                    None
                }
            },
        };
        for u in text.iter().flat_map(|t| t.split(',')).map(str::trim) {
            match redis::parse_redis_url(u) {
                // Certificates unchecked: anyone on the path could read the password and the
                // counts, or answer in Redis's place.
                Some(url) if url.scheme() == "rediss" && url.fragment() == Some("insecure") => {
                    issue(
                        "url",
                        "#insecure turns off the check of the store's certificate: name its CA in store.ca_file instead".into(),
                    )
                }
                Some(url) if matches!(url.scheme(), "redis" | "rediss") => urls.push(u.to_string()),
                // The URL itself is never echoed: it may hold a password.
                _ => issue(
                    "url",
                    "not a redis:// or rediss:// URL like redis://127.0.0.1:6379/0".into(),
                ),
            }
        }
        if raw.ca_file.is_some() && urls.iter().any(|u| !u.starts_with("rediss://")) {
            issue(
                "ca_file",
                "is for TLS connections: the URL must be rediss://".into(),
            );
        }
        if urls.len() > 1 && !raw.cluster {
            issue(
                "url",
                "several URLs are the seed nodes of a cluster: set cluster = true".into(),
            );
        }
    }
    if raw.key_prefix.is_empty()
        || !raw
            .key_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        issue(
            "key_prefix",
            "letters, digits, '-', '_', '.' or ':' only, at least one".into(),
        );
    }
    for (name, d) in [
        ("timeout", raw.timeout),
        ("connect_timeout", raw.connect_timeout),
    ] {
        if d.is_zero() || d > Duration::from_secs(5) {
            issue(
                name,
                "between 1ms and 5s: every request that needs the store waits for it".into(),
            );
        }
    }
    StoreConfig {
        backend: raw.backend,
        urls,
        cluster: raw.cluster,
        ca_file: raw.ca_file,
        key_prefix: raw.key_prefix,
        timeout: raw.timeout,
        connect_timeout: raw.connect_timeout,
    }
}

/// Whether a URL carries a password (`redis://:secret@host` or `redis://user:secret@host`).
fn has_password(url: &str) -> bool {
    redis::parse_redis_url(url).is_some_and(|u| u.password().is_some_and(|p| !p.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(raw: RawStore, env: EnvLookup<'_>) -> (StoreConfig, Vec<String>) {
        let mut issues = Issues::default();
        let c = check(raw, env, &mut issues);
        (c, issues.0.into_iter().map(|i| i.to_string()).collect())
    }

    fn redis(url: &str) -> RawStore {
        RawStore {
            backend: StoreBackend::Redis,
            url: Some(url.into()),
            ..RawStore::default()
        }
    }

    #[test]
    fn tls_is_checked_or_refused() {
        let (_, issues) = checked(redis("rediss://127.0.0.1:6380/0#insecure"), &|_| None);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(issues[0].contains("store.ca_file"), "{issues:?}");
        let with_ca = |url: &str| RawStore {
            ca_file: Some("/etc/redis-ca.pem".into()),
            ..redis(url)
        };
        let (c, issues) = checked(with_ca("rediss://127.0.0.1:6380/0"), &|_| None);
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(
            c.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/redis-ca.pem"))
        );
        let (_, issues) = checked(with_ca("redis://127.0.0.1:6379/0"), &|_| None);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(issues[0].contains("rediss://"), "{issues:?}");
    }

    #[test]
    fn a_password_never_goes_in_the_file_nor_in_a_message() {
        let (_, issues) = checked(redis("redis://:hunter2@127.0.0.1:6379/0"), &|_| None);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(issues[0].contains("url_env"));
        let (c, issues) = checked(
            RawStore {
                url: None,
                url_env: Some("R".into()),
                ..redis("")
            },
            &|_| Some("redis://:hunter2@127.0.0.1:6379/0".into()),
        );
        assert!(issues.is_empty(), "{issues:?}");
        assert!(!format!("{c:?}").contains("hunter2"));
        let (_, issues) = checked(redis("http://hunter2@x"), &|_| None);
        assert!(issues.iter().all(|i| !i.contains("hunter2")), "{issues:?}");
    }

    #[test]
    fn bad_values_are_named() {
        let raw = RawStore {
            key_prefix: "a{b}".into(),
            timeout: Duration::ZERO,
            ..redis("redis://127.0.0.1:1,redis://127.0.0.1:2")
        };
        let (_, issues) = checked(raw, &|_| None);
        for needle in ["store.key_prefix", "store.timeout", "cluster = true"] {
            assert!(issues.iter().any(|i| i.contains(needle)), "{issues:?}");
        }
        let (_, issues) = checked(
            RawStore {
                url: None,
                ..redis("")
            },
            &|_| None,
        );
        assert!(issues[0].contains("needs url or url_env"), "{issues:?}");
    }
}
