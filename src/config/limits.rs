//! `[limits]`: the tenants' default rate and burst, and the protection of the upstream.

use std::time::Duration;

use serde::Deserialize;

use super::{Issues, Rate};

#[derive(Debug, Deserialize)]
#[serde(default)]
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

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub max_concurrent_upstream: usize,
    pub upstream_queue_timeout: Duration,
    pub global_upstream_rate_per_second: Option<u32>,
}

/// What a tenant gets when it names no rate or burst of its own.
#[derive(Debug, Clone, Copy)]
pub struct TenantDefaults {
    pub rate: Rate,
    pub burst: u32,
}

/// Check `[limits]`.
pub fn check(raw: &RawLimits, issues: &mut Issues) -> (LimitsConfig, TenantDefaults) {
    let mut issue = |path: &str, message: String| issues.add(path, message);
    let l = raw;
    if l.default_rate_per_second == 0 || l.default_burst == 0 {
        issue(
            "limits",
            "default_rate_per_second and default_burst must be at least 1".into(),
        );
    }
    let default_rate = match &l.default_rate {
        Some(text) => Rate::parse(text).unwrap_or_else(|m| {
            issue("limits.default_rate", m);
            Rate::per_second(1)
        }),
        None => Rate::per_second(l.default_rate_per_second.max(1)),
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
    let limits = LimitsConfig {
        max_concurrent_upstream: l.max_concurrent_upstream,
        upstream_queue_timeout: l.upstream_queue_timeout,
        global_upstream_rate_per_second: l.global_upstream_rate_per_second,
    };
    let defaults = TenantDefaults {
        rate: default_rate,
        burst: l.default_burst,
    };
    (limits, defaults)
}
