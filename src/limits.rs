//! Per-tenant rate limits (GCRA, `governor`) and the global protection of the upstream: a cap on
//! concurrent calls and an optional global call rate. With a store that replicas share, the
//! quotas are kept there (`store::SharedRates`), and in this process while it does not answer.
//!
//! Each tenant's limiter is built from the config and lives as long as the tenant does: a limit
//! is never reset by eviction, however many tenants there are.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{LimitsConfig, Rate, TenantConfig};
use crate::error::GatewayError;
use crate::store::{Cells, RateKey, SharedRates};
use crate::throttle::warn_throttled;

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    DefaultClock,
    StateInformationMiddleware,
>;

/// What a rate check decided, with what the RateLimit header fields need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateState {
    pub burst: u32,
    /// Seconds in which a full burst is earned back.
    pub window_secs: u64,
    pub remaining: u32,
    /// Seconds until the quota is full again (or, when refused, until a request is allowed).
    pub reset_secs: u64,
}

impl RateState {
    /// `RateLimit-Policy` and `RateLimit` fields (draft-ietf-httpapi-ratelimit-headers-09).
    pub fn headers(&self) -> [(&'static str, String); 2] {
        [
            (
                "RateLimit-Policy",
                format!("\"tenant\";q={};w={}", self.burst, self.window_secs),
            ),
            (
                "RateLimit",
                format!("\"tenant\";r={};t={}", self.remaining, self.reset_secs),
            ),
        ]
    }
}

/// A rate check's answer: allowed with the state after it, or refused with the error to send.
pub type RateDecision = Result<RateState, (GatewayError, RateState)>;

/// Turn a GCRA decision (the local limiter's or the shared store's) into the answer and its
/// headers, the same way for both.
pub fn decide(
    rate: Rate,
    burst: u32,
    allowed: bool,
    remaining: u32,
    wait: Duration,
) -> RateDecision {
    let interval = rate.interval();
    let window_secs = ceil_secs(interval * burst).max(1);
    if allowed {
        let missing = burst.saturating_sub(remaining);
        Ok(RateState {
            burst,
            window_secs,
            remaining,
            reset_secs: ceil_secs(interval * missing),
        })
    } else {
        let wait = ceil_secs(wait).max(1);
        Err((
            GatewayError::RateLimited {
                retry_after_secs: wait,
            },
            RateState {
                burst,
                window_secs,
                remaining: 0,
                reset_secs: wait,
            },
        ))
    }
}

/// A shared quota's answer, as the local limiter's.
fn of_cells(rate: Rate, burst: u32, c: Cells) -> RateDecision {
    decide(rate, burst, c.granted, c.remaining, c.wait)
}

struct TenantLimiter {
    limiter: Limiter,
    rate: Rate,
    burst: u32,
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// One tenant's limit per subject: a GCRA state per subject (keyed by its hash), dropped once
/// it is back at a full burst (`forget_idle_subjects`).
struct SubjectLimiter {
    limiter: RateLimiter<
        String,
        governor::state::keyed::DefaultKeyedStateStore<String>,
        DefaultClock,
        StateInformationMiddleware,
    >,
    rate: Rate,
    burst: u32,
}

type Pace = RateLimiter<governor::state::NotKeyed, governor::state::InMemoryState, DefaultClock>;

pub struct Limits {
    tenants: HashMap<String, Arc<TenantLimiter>>,
    /// Per-subject limits of the tenants that have one (this process's; the fleet's are in the
    /// store).
    subjects: HashMap<String, Arc<SubjectLimiter>>,
    /// The global upstream pace and the rate it was built for.
    global_rate: Option<(u32, Arc<Pace>)>,
    upstream_slots: Arc<Semaphore>,
    slots_total: usize,
    queue_timeout: Duration,
    clock: DefaultClock,
    /// The quotas the replicas share, when the store keeps them.
    shared: Option<Arc<dyn SharedRates>>,
}

fn tenant_quota(rate: Rate, burst: u32) -> Quota {
    let one = NonZeroU32::MIN;
    Quota::with_period(rate.interval())
        .unwrap_or_else(|| Quota::per_second(one))
        .allow_burst(NonZeroU32::new(burst).unwrap_or(one))
}

fn quota(rate: u32, burst: u32) -> Quota {
    let one = NonZeroU32::MIN;
    Quota::per_second(NonZeroU32::new(rate).unwrap_or(one))
        .allow_burst(NonZeroU32::new(burst).unwrap_or(one))
}

impl Limits {
    pub fn new(tenants: &[TenantConfig], cfg: &LimitsConfig) -> Self {
        Limits::rebuild(tenants, cfg, None)
    }

    /// New limits for a reloaded config. A tenant whose rate and burst did not change keeps its
    /// limiter, so a reload never hands out a fresh burst.
    pub fn rebuild(tenants: &[TenantConfig], cfg: &LimitsConfig, old: Option<&Limits>) -> Self {
        let map = tenants
            .iter()
            .map(|t| {
                let kept = old
                    .and_then(|o| o.tenants.get(&t.id))
                    .filter(|l| l.rate == t.rate && l.burst == t.burst)
                    .cloned();
                let limiter = kept.unwrap_or_else(|| {
                    Arc::new(TenantLimiter {
                        limiter: RateLimiter::direct(tenant_quota(t.rate, t.burst))
                            .with_middleware::<StateInformationMiddleware>(),
                        rate: t.rate,
                        burst: t.burst,
                    })
                });
                (t.id.clone(), limiter)
            })
            .collect();
        let subjects = tenants
            .iter()
            .filter_map(|t| Some((t, t.per_subject?.rate?)))
            .map(|(t, (rate, burst))| {
                let kept = old
                    .and_then(|o| o.subjects.get(&t.id))
                    .filter(|l| l.rate == rate && l.burst == burst)
                    .cloned();
                let limiter = kept.unwrap_or_else(|| {
                    Arc::new(SubjectLimiter {
                        limiter: RateLimiter::keyed(tenant_quota(rate, burst))
                            .with_middleware::<StateInformationMiddleware>(),
                        rate,
                        burst,
                    })
                });
                (t.id.clone(), limiter)
            })
            .collect();
        let same_slots = old.filter(|o| o.slots_total == cfg.max_concurrent_upstream);
        // The pace keeps its state while its rate is unchanged (a new one would start with a
        // full burst).
        let global_rate = cfg.global_upstream_rate_per_second.map(|r| {
            old.and_then(|o| o.global_rate.as_ref())
                .filter(|(rate, _)| *rate == r)
                .cloned()
                .unwrap_or_else(|| (r, Arc::new(RateLimiter::direct(quota(r, r)))))
        });
        Limits {
            tenants: map,
            subjects,
            global_rate,
            upstream_slots: same_slots
                .map(|o| o.upstream_slots.clone())
                .unwrap_or_else(|| Arc::new(Semaphore::new(cfg.max_concurrent_upstream))),
            slots_total: cfg.max_concurrent_upstream,
            queue_timeout: cfg.upstream_queue_timeout,
            clock: DefaultClock::default(),
            shared: old.and_then(|o| o.shared.clone()),
        }
    }

    /// The same limits, with their quotas kept in `shared` (the fleet's store) when there is one.
    pub fn sharing(mut self, shared: Option<Arc<dyn SharedRates>>) -> Self {
        self.shared = shared;
        self
    }

    /// Take one request from the tenant's quota: in the shared store when there is one (the
    /// quota then holds across replicas), else, or while the store is down, in this process.
    pub async fn check_tenant_shared(&self, tenant: &str) -> RateDecision {
        if let (Some(f), Some(t)) = (&self.shared, self.tenants.get(tenant)) {
            match f
                .take(RateKey::Tenant(tenant), t.rate.interval(), t.burst)
                .await
            {
                Ok(cells) => return of_cells(t.rate, t.burst, cells),
                Err(e) => {
                    f.fell_back("rate_limit");
                    warn_throttled!(
                        tenant,
                        "rate limited by this replica alone while the store is down: {e}"
                    );
                }
            }
        }
        self.check_tenant(tenant)
    }

    /// Take one request from the tenant's quota in this process.
    pub fn check_tenant(&self, tenant: &str) -> RateDecision {
        let Some(t) = self.tenants.get(tenant) else {
            return Err((
                GatewayError::Internal,
                RateState {
                    burst: 0,
                    window_secs: 0,
                    remaining: 0,
                    reset_secs: 0,
                },
            ));
        };
        match t.limiter.check() {
            Ok(snapshot) => decide(
                t.rate,
                t.burst,
                true,
                snapshot.remaining_burst_capacity(),
                Duration::ZERO,
            ),
            Err(not_until) => decide(
                t.rate,
                t.burst,
                false,
                0,
                not_until.wait_time_from(self.clock.now()),
            ),
        }
    }

    /// Take one request from a subject's own quota (`subject` is its hash), when its tenant
    /// limits each subject's rate: in the shared store when there is one, else, or while the
    /// store is down, in this process.
    pub async fn check_subject(&self, tenant: &str, subject: &str) -> Result<(), GatewayError> {
        let Some(l) = self.subjects.get(tenant) else {
            return Ok(());
        };
        let as_subject = |e| match e {
            GatewayError::RateLimited { retry_after_secs } => {
                GatewayError::SubjectRateLimited { retry_after_secs }
            }
            other => other,
        };
        if let Some(f) = &self.shared {
            match f
                .take(
                    RateKey::Subject(tenant, subject),
                    l.rate.interval(),
                    l.burst,
                )
                .await
            {
                Ok(cells) => {
                    return of_cells(l.rate, l.burst, cells)
                        .map(|_| ())
                        .map_err(|(e, _)| as_subject(e))
                }
                Err(e) => {
                    f.fell_back("rate_limit");
                    warn_throttled!(
                        tenant,
                        "subjects rate limited by this replica alone while the store is down: {e}"
                    );
                }
            }
        }
        match l.limiter.check_key(&subject.to_string()) {
            Ok(_) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Err(as_subject(GatewayError::RateLimited {
                    retry_after_secs: ceil_secs(wait).max(1),
                }))
            }
        }
    }

    /// Drop the state of subjects back at a full burst: memory stays bounded by the subjects
    /// active within one burst's time.
    pub fn forget_idle_subjects(&self) {
        for l in self.subjects.values() {
            l.limiter.retain_recent();
            l.limiter.shrink_to_fit();
        }
    }

    /// A slot for one upstream call: waits up to the queue timeout, then `overloaded`. The cap
    /// on concurrent calls is this replica's; the global pace is the fleet's when it has a store.
    pub async fn upstream_slot(&self) -> Result<OwnedSemaphorePermit, GatewayError> {
        let permit = tokio::time::timeout(
            self.queue_timeout,
            self.upstream_slots.clone().acquire_owned(),
        )
        .await
        .map_err(|_| GatewayError::Overloaded(crate::error::Busy::Upstream))?
        .map_err(|_| GatewayError::Overloaded(crate::error::Busy::Upstream))?;
        if let Some((rate, global)) = &self.global_rate {
            // The global rate is a pace, not a refusal: wait for it within the queue timeout.
            let shared = match &self.shared {
                Some(f) => {
                    tokio::time::timeout(self.queue_timeout, shared_pace(f.as_ref(), *rate)).await
                }
                None => Ok(false),
            };
            match shared {
                Ok(true) => {}
                Ok(false) => tokio::time::timeout(self.queue_timeout, global.until_ready())
                    .await
                    .map_err(|_| GatewayError::Overloaded(crate::error::Busy::Upstream))?,
                Err(_) => return Err(GatewayError::Overloaded(crate::error::Busy::Upstream)),
            }
        }
        Ok(permit)
    }
}

/// Wait for the fleet's global pace: true once a call may go, false if the store cannot be
/// asked (the local pace then applies).
async fn shared_pace(fleet: &dyn SharedRates, rate: u32) -> bool {
    loop {
        match fleet
            .take(RateKey::Pace, Rate::per_second(rate).interval(), rate)
            .await
        {
            Ok(Cells { granted: true, .. }) => return true,
            Ok(_) => {}
            Err(e) => {
                fleet.fell_back("rate_limit");
                warn_throttled!(
                    "global pace kept by this replica alone while the store is down: {e}"
                );
                return false;
            }
        }
        tokio::time::sleep(Duration::from_millis(1000 / u64::from(rate.max(1)).max(1))).await;
    }
}

/// Requests in flight per client address, for clients behind trusted proxies: the proxy's one
/// address carries them all, so the per-address connection cap cannot tell them apart.
#[derive(Default)]
pub struct ClientSlots {
    in_flight: Mutex<HashMap<IpAddr, usize>>,
}

/// One request in flight from a client; its place is given back when dropped.
pub struct ClientSlot {
    slots: Arc<ClientSlots>,
    ip: IpAddr,
}

impl ClientSlots {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for one more request from `ip`, unless it has `cap` in flight already.
    pub fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<ClientSlot> {
        let mut m = self.lock();
        let n = m.entry(ip).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            slots: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut m = self.slots.lock();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(rate: u32, burst: u32) -> TenantConfig {
        TenantConfig {
            id: "t".into(),
            key_digests: vec![],
            disabled: false,
            rate: Rate::per_second(rate),
            burst,
            daily_budget: None,
            monthly_budget: None,
            require_header_credentials: false,
            price_per_call: None,
            allowed_origins: Vec::new(),
            org_keys: Vec::new(),
            allow_static_keys: true,
            require_tokens: Vec::new(),
            per_subject: None,
            face_mode: None,
        }
    }

    fn cfg() -> LimitsConfig {
        LimitsConfig {
            max_concurrent_upstream: 2,
            upstream_queue_timeout: Duration::from_millis(50),
            global_upstream_rate_per_second: None,
        }
    }

    #[test]
    fn burst_then_refusal_with_retry_after() {
        let l = Limits::new(&[tenant(1, 3)], &cfg());
        for left in [2, 1, 0] {
            let s = l.check_tenant("t").expect("allowed");
            assert_eq!(s.remaining, left);
        }
        let (err, state) = l.check_tenant("t").expect_err("limited");
        assert_eq!(
            err,
            GatewayError::RateLimited {
                retry_after_secs: 1
            }
        );
        assert_eq!(state.remaining, 0);
        assert_eq!(state.headers()[0].1, "\"tenant\";q=3;w=3");
    }

    #[test]
    fn reload_keeps_an_unchanged_limiter() {
        let l = Limits::new(&[tenant(1, 1)], &cfg());
        l.check_tenant("t").expect("allowed");
        let l2 = Limits::rebuild(&[tenant(1, 1)], &cfg(), Some(&l));
        assert!(
            l2.check_tenant("t").is_err(),
            "a reload must not refill the bucket"
        );
    }

    #[test]
    fn rates_below_one_a_second() {
        let mut t = tenant(1, 1);
        t.rate = Rate::parse("30/min").expect("ok");
        let l = Limits::new(&[t], &cfg());
        let s = l.check_tenant("t").expect("the burst of one");
        assert_eq!((s.window_secs, s.reset_secs), (2, 2));
        let (err, _) = l.check_tenant("t").expect_err("limited");
        assert_eq!(
            err,
            GatewayError::RateLimited {
                retry_after_secs: 2
            }
        );
    }

    #[tokio::test]
    async fn reload_keeps_the_global_pace_and_the_slots() {
        let paced = LimitsConfig {
            global_upstream_rate_per_second: Some(1),
            upstream_queue_timeout: Duration::from_millis(50),
            ..cfg()
        };
        let l = Limits::new(&[], &paced);
        let held = l.upstream_slot().await.expect("the one paced call");
        let l2 = Limits::rebuild(&[], &paced, Some(&l));
        // Same pace: its state goes on (no fresh burst); same cap: the held slot still counts.
        let _other = l2.upstream_slot().await;
        assert_eq!(
            l2.upstream_slot().await.expect_err("both slots are held"),
            GatewayError::Overloaded(crate::error::Busy::Upstream)
        );
        drop(held);
        let fresh = Limits::rebuild(&[], &paced, None);
        assert!(
            fresh.upstream_slot().await.is_ok(),
            "a new pace would have allowed it"
        );
        assert!(
            l2.upstream_slot().await.is_err(),
            "the kept pace has no token yet"
        );
    }

    #[tokio::test]
    async fn upstream_slots_are_capped() {
        let l = Limits::new(&[], &cfg());
        let a = l.upstream_slot().await.expect("1");
        let _b = l.upstream_slot().await.expect("2");
        assert_eq!(
            l.upstream_slot().await.expect_err("full"),
            GatewayError::Overloaded(crate::error::Busy::Upstream)
        );
        drop(a);
        assert!(l.upstream_slot().await.is_ok());
    }
}
