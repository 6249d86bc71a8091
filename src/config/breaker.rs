//! `[breaker]`: the circuit breaker in front of the provider.

use std::time::Duration;

use serde::Deserialize;

use super::Issues;

/// The circuit breaker in front of the provider (see `breaker`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
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

/// Check `[breaker]` (the raw table is the checked one).
pub fn check(raw: &RawBreaker, issues: &mut Issues) {
    let mut issue = |path: &str, message: String| issues.add(path, message);
    let b = raw;
    if b.failures == 0 || b.failures > 100 {
        issue("breaker.failures", "must be from 1 to 100".into());
    }
    if b.window.is_zero() || b.open_for.is_zero() || b.subscription_open_for.is_zero() {
        issue(
            "breaker",
            "window, open_for and subscription_open_for must be more than zero".into(),
        );
    }
}
