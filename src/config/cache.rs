//! `[cache]`: the verdict cache.

use std::time::Duration;

use serde::Deserialize;

use super::{Issues, MIB};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    /// Each tenant has its own entries: no tenant learns anything about another's images.
    Tenant,
    /// One scope for all tenants: an image verified by one is free for all.
    Shared,
    /// Each app-token subject (end user) has its own entries: a verdict is served only to the
    /// user it was made for. Requests with a tenant key, which name no user, share the
    /// tenant's entries as with `tenant`.
    Subject,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
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

#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub enabled: bool,
    pub scope: CacheScope,
    pub max_bytes: u64,
    pub ttl: Duration,
    pub pass_ttl: Duration,
    pub allow_bypass: bool,
}

impl CacheConfig {
    /// The longest a verdict is kept: a fail's `ttl` or a pass's `pass_ttl`.
    pub fn verdict_life(&self) -> Duration {
        self.ttl.max(self.pass_ttl)
    }
}

/// Check `[cache]`.
pub fn check(raw: &RawCache, issues: &mut Issues) -> CacheConfig {
    let mut issue = |path: &str, message: String| issues.add(path, message);
    if raw.ttl.is_zero() || raw.pass_ttl.is_zero() || raw.max_bytes == 0 {
        issue(
            "cache",
            "ttl, pass_ttl and max_bytes must be more than zero".into(),
        );
    }
    CacheConfig {
        enabled: raw.enabled,
        scope: raw.scope,
        max_bytes: raw.max_bytes,
        ttl: raw.ttl,
        pass_ttl: raw.pass_ttl,
        allow_bypass: raw.allow_bypass,
    }
}
