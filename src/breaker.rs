//! The circuit breaker in front of the provider. When it keeps failing (consecutive 5xx,
//! timeouts, lost or refused connections, unusable answers), calling it again only burns budget
//! and holds clients for a deadline each: the circuit opens and requests that would call get
//! `503 upstream_circuit_open` with `Retry-After` at once, before any budget is reserved. After
//! the cool-down one probe goes through (half-open); its success closes the circuit, its
//! failure opens it again. A subscription error fails every call until a person acts, so it
//! opens the circuit at once, for a shorter time. Cache hits are answered whatever the state.
//!
//! Each process (each replica in a fleet) keeps its own breaker.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, IntGaugeVec};

use crate::config::BreakerConfig;
use crate::error::{CircuitCause, GatewayError};
use crate::verdict::UpstreamClass;

/// What one upstream exchange says about the provider's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// It answered as a working service does (a verdict, a documented refusal of the input).
    Up,
    /// It failed: 5xx, timeout, refused or lost connection, an unusable answer.
    Failing,
    /// It refused the organization's subscription: nothing will work until a person acts.
    SubscriptionBroken,
}

impl Health {
    pub fn of(class: UpstreamClass) -> Health {
        match class {
            c if c.is_subscription_error() => Health::SubscriptionBroken,
            UpstreamClass::ServerError
            | UpstreamClass::Timeout
            | UpstreamClass::Connect
            | UpstreamClass::ConnectionLost
            | UpstreamClass::InvalidResponse
            | UpstreamClass::ServiceUnavailable => Health::Failing,
            _ => Health::Up,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Closed,
    Open { until: Instant, cause: CircuitCause },
    HalfOpen { probing: bool },
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Closed => "closed",
            Mode::Open { .. } => "open",
            Mode::HalfOpen { .. } => "half_open",
        }
    }
}

pub const STATES: [&str; 3] = ["closed", "open", "half_open"];

struct Inner {
    mode: Mode,
    /// Why it last opened: what a refusal says, also while one probe is out.
    cause: CircuitCause,
    consecutive: u32,
    last_failure: Option<Instant>,
}

pub struct Breaker {
    cfg: BreakerConfig,
    inner: Mutex<Inner>,
    state_gauge: IntGaugeVec,
    transitions: IntCounterVec,
}

/// Leave to call the provider. A probe (the one call of a half-open circuit) that is dropped
/// without a verdict on the provider's health (its request gave up before calling) lets the next
/// request probe instead.
pub struct Permit {
    breaker: Arc<Breaker>,
    probe: bool,
    recorded: bool,
}

impl Permit {
    pub fn record(self, health: Health) {
        self.record_at(health, Instant::now());
    }

    fn record_at(mut self, health: Health, now: Instant) {
        self.recorded = true;
        self.breaker.record(self.probe, health, now);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            let mut g = self.breaker.lock();
            if g.mode == (Mode::HalfOpen { probing: true }) {
                g.mode = Mode::HalfOpen { probing: false };
            }
        }
    }
}

fn ceil_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

impl Breaker {
    pub fn new(cfg: BreakerConfig, state_gauge: IntGaugeVec, transitions: IntCounterVec) -> Self {
        let b = Breaker {
            cfg,
            inner: Mutex::new(Inner {
                mode: Mode::Closed,
                cause: CircuitCause::Failures,
                consecutive: 0,
                last_failure: None,
            }),
            state_gauge,
            transitions,
        };
        for s in STATES {
            b.transitions.with_label_values(&[s]);
        }
        b.publish(Mode::Closed);
        b
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, mode: Mode) {
        for s in STATES {
            self.state_gauge
                .with_label_values(&[s])
                .set(i64::from(s == mode.label()));
        }
    }

    fn enter(&self, g: &mut Inner, mode: Mode) {
        if g.mode.label() != mode.label() {
            self.transitions.with_label_values(&[mode.label()]).inc();
            match mode {
                Mode::Open { until, cause } => tracing::warn!(
                    open_for_secs = ceil_secs(until.saturating_duration_since(Instant::now())),
                    "circuit open: {cause}; calls are paused"
                ),
                Mode::HalfOpen { .. } => tracing::info!("circuit half-open: one probe call"),
                Mode::Closed => tracing::info!("circuit closed: the provider answers again"),
            }
        }
        g.mode = mode;
        self.publish(mode);
    }

    /// Whether a request may call the provider now.
    pub fn admit(self: &Arc<Self>) -> Result<Permit, GatewayError> {
        self.admit_at(Instant::now())
    }

    fn admit_at(self: &Arc<Self>, now: Instant) -> Result<Permit, GatewayError> {
        if !self.cfg.enabled {
            return Ok(self.permit(false));
        }
        let mut g = self.lock();
        match g.mode {
            Mode::Closed => Ok(self.permit(false)),
            Mode::Open { until, cause } if now < until => Err(GatewayError::CircuitOpen {
                retry_after_secs: ceil_secs(until - now),
                cause,
            }),
            Mode::Open { .. } | Mode::HalfOpen { probing: false } => {
                self.enter(&mut g, Mode::HalfOpen { probing: true });
                Ok(self.permit(true))
            }
            Mode::HalfOpen { probing: true } => Err(GatewayError::CircuitOpen {
                retry_after_secs: 1,
                cause: g.cause,
            }),
        }
    }

    fn permit(self: &Arc<Self>, probe: bool) -> Permit {
        Permit {
            breaker: self.clone(),
            probe,
            recorded: false,
        }
    }

    fn record(&self, probe: bool, health: Health, now: Instant) {
        if !self.cfg.enabled {
            return;
        }
        let mut g = self.lock();
        match health {
            Health::Up => {
                g.consecutive = 0;
                if g.mode != Mode::Closed {
                    self.enter(&mut g, Mode::Closed);
                }
            }
            Health::SubscriptionBroken => {
                g.consecutive = 0;
                let until = now + self.cfg.subscription_open_for;
                let cause = CircuitCause::Subscription;
                g.cause = cause;
                self.enter(&mut g, Mode::Open { until, cause });
            }
            Health::Failing => {
                let recent = g
                    .last_failure
                    .is_some_and(|t| now.saturating_duration_since(t) <= self.cfg.window);
                g.consecutive = if recent { g.consecutive + 1 } else { 1 };
                g.last_failure = Some(now);
                let half_open = matches!(g.mode, Mode::HalfOpen { .. });
                if probe || half_open || g.consecutive >= self.cfg.failures {
                    let until = now + self.cfg.open_for;
                    let cause = match probe || half_open {
                        true => CircuitCause::Probe,
                        false => CircuitCause::Failures,
                    };
                    g.cause = cause;
                    self.enter(&mut g, Mode::Open { until, cause });
                }
            }
        }
    }

    pub fn state(&self) -> &'static str {
        self.lock().mode.label()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Arc<Breaker> {
        let g = IntGaugeVec::new(prometheus::Opts::new("s", "s"), &["state"]).expect("g");
        let c = IntCounterVec::new(prometheus::Opts::new("t", "t"), &["to"]).expect("c");
        Arc::new(Breaker::new(
            BreakerConfig {
                enabled: true,
                failures: 3,
                window: Duration::from_secs(60),
                open_for: Duration::from_secs(30),
                subscription_open_for: Duration::from_secs(10),
            },
            g,
            c,
        ))
    }

    #[test]
    fn opens_after_consecutive_failures_probes_once_and_closes() {
        let b = breaker();
        let t0 = Instant::now();
        for _ in 0..2 {
            b.admit_at(t0)
                .expect("closed")
                .record_at(Health::Failing, t0);
        }
        // A success in between starts the count again.
        b.admit_at(t0).expect("closed").record_at(Health::Up, t0);
        for _ in 0..3 {
            b.admit_at(t0)
                .expect("closed")
                .record_at(Health::Failing, t0);
        }
        assert_eq!(b.state(), "open");
        let refused = b.admit_at(t0 + Duration::from_secs(1)).err();
        assert!(matches!(
            refused,
            Some(GatewayError::CircuitOpen { retry_after_secs, cause: CircuitCause::Failures }) if (29..=30).contains(&retry_after_secs)
        ));
        let later = t0 + Duration::from_secs(31);
        let probe = b.admit_at(later).expect("the probe");
        assert_eq!(b.state(), "half_open");
        assert!(b.admit_at(later).is_err(), "one probe at a time");
        probe.record_at(Health::Up, later);
        assert_eq!(b.state(), "closed");
        assert!(b.admit_at(later).is_ok());
    }

    #[test]
    fn a_failed_probe_opens_again_and_an_abandoned_probe_lets_another_through() {
        let b = breaker();
        let t0 = Instant::now();
        for _ in 0..3 {
            b.admit_at(t0)
                .expect("closed")
                .record_at(Health::Failing, t0);
        }
        let later = t0 + Duration::from_secs(31);
        drop(b.admit_at(later).expect("probe, abandoned"));
        let probe = b.admit_at(later).expect("another probe");
        probe.record_at(Health::Failing, later);
        assert_eq!(b.state(), "open");
        // The refusal says what happened: the probe failed.
        let refused = b.admit_at(later).err().expect("open");
        assert!(
            refused
                .to_string()
                .starts_with("the liveness provider failed again when tried after a pause"),
            "{refused}"
        );
    }

    #[test]
    fn a_subscription_error_opens_at_once_for_the_shorter_time() {
        let b = breaker();
        let t0 = Instant::now();
        b.admit_at(t0)
            .expect("closed")
            .record_at(Health::SubscriptionBroken, t0);
        match b.admit_at(t0).err() {
            Some(
                e @ GatewayError::CircuitOpen {
                    retry_after_secs,
                    cause: CircuitCause::Subscription,
                },
            ) => {
                // One refused subscription reads as that, not as a provider that keeps failing.
                assert!(e
                    .to_string()
                    .contains("refused the organization's subscription"));
                assert!(e.hint().contains("subscription"));
                assert!(retry_after_secs <= 10)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failures_far_apart_do_not_add_up() {
        let b = breaker();
        let t0 = Instant::now();
        for n in 0..5 {
            let t = t0 + Duration::from_secs(61 * n);
            b.admit_at(t).expect("closed").record_at(Health::Failing, t);
        }
        assert_eq!(b.state(), "closed");
    }
}
