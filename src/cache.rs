//! Verdict cache keyed by `(scope, BLAKE3 digest of the image)`, with single-flight: while one call for
//! a key is at the provider, identical requests wait for it instead of calling again.
//!
//! Only final verdicts are stored (the answer as the egress check wrote it, and the time): a pass,
//! or a fail the provider judged (`CALC_RESULT`); never the image. Passes expire sooner
//! (`cache.pass_ttl`): a passing selfie replayed byte for byte is the attack liveness exists to
//! stop, so a pass is reused only long enough to absorb retries. A digest that passed for one tenant and then comes
//! from another is counted as a replay signal.
//! A finished call is inserted into the cache *before* it leaves the in-flight table, so a
//! newcomer always finds one or the other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::{CacheConfig, CacheScope};
use crate::egress::{Egress, ProviderAnswer};
use crate::error::GatewayError;
use crate::replay::ReplayWatch;
use crate::upstream::Exchange;
use crate::verdict::LivenessVerdict;

#[derive(Debug, Clone)]
pub struct CacheKey {
    /// The tenant whose entries it is among, or `SHARED_SCOPE`.
    pub scope: Arc<str>,
    /// With `scope = "subject"`, the app token's subject (its keyed hash) it is for.
    pub subject: Option<Arc<str>>,
    pub digest: [u8; 32],
    /// Who asked, as the replay signal tells parties apart: the tenant, or with `scope =
    /// "subject"` the tenant and its subject (`tenant/hash`). Not part of equality: in the
    /// shared scope two tenants' requests are the same key.
    pub owner: Arc<str>,
}

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.scope == other.scope && self.subject == other.subject && self.digest == other.digest
    }
}

impl Eq for CacheKey {}

impl std::hash::Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.scope.hash(state);
        self.subject.hash(state);
        self.digest.hash(state);
    }
}

pub const SHARED_SCOPE: &str = "*";

/// The key of an image `tenant` sent, for `subject` (an app token's keyed hash) when it has
/// one.
pub fn key(scope: CacheScope, tenant: &str, subject: Option<&str>, digest: [u8; 32]) -> CacheKey {
    let tenant: Arc<str> = Arc::from(tenant);
    let (scope, subject, owner) = match (scope, subject) {
        (CacheScope::Tenant, _) => (tenant.clone(), None, tenant),
        (CacheScope::Shared, _) => (Arc::from(SHARED_SCOPE), None, tenant),
        (CacheScope::Subject, None) => (tenant.clone(), None, tenant),
        (CacheScope::Subject, Some(s)) => {
            let owner = Arc::from(format!("{tenant}/{s}"));
            (tenant, Some(Arc::from(s)), owner)
        }
    };
    CacheKey {
        scope,
        subject,
        digest,
        owner,
    }
}

/// A stored verdict.
#[derive(Debug, Clone)]
pub struct CachedVerdict {
    /// How long this entry lives from `stored`: what is left of `pass_ttl` (a pass) or `ttl` (a
    /// fail) since the provider answered.
    pub ttl: Duration,
    pub answer: ProviderAnswer,
    pub verdict: LivenessVerdict,
    /// When it entered this cache, and how long the provider had answered by then (zero for
    /// this process's own call; a verdict from the fleet's level was answered elsewhere).
    pub stored: Instant,
    pub age_when_stored: Duration,
}

impl CachedVerdict {
    /// The time since the provider answered (`Age`).
    pub fn age(&self) -> Duration {
        self.age_when_stored + self.stored.elapsed()
    }
}

#[derive(Clone)]
enum Flight {
    Done(Arc<Exchange>),
    /// The leader gave up before calling (budget, overload): followers try again themselves.
    Abandoned,
}

pub enum Lookup {
    Hit(Arc<CachedVerdict>),
    Follow(Follower),
    Lead(Leader),
}

pub struct Follower(watch::Receiver<Option<Flight>>);

pub enum Followed {
    Done(Arc<Exchange>),
    /// The leader abandoned: look up again.
    Retry,
}

impl Follower {
    pub async fn wait(mut self, deadline: Duration) -> Result<Followed, GatewayError> {
        let r = tokio::time::timeout(deadline, self.0.wait_for(Option::is_some))
            .await
            .map_err(|_| GatewayError::UpstreamTimeout)?;
        match r.map(|v| v.clone()) {
            Ok(Some(Flight::Done(x))) => Ok(Followed::Done(x)),
            // A sender dropped without a word is a leader that went away: same as abandoned.
            _ => Ok(Followed::Retry),
        }
    }
}

/// The one request that calls the provider for a key. Dropping it unfinished abandons the flight.
pub struct Leader {
    key: Option<CacheKey>,
    tx: watch::Sender<Option<Flight>>,
    cache: Arc<VerdictCache>,
}

impl Leader {
    /// Publish the outcome of this process's call: cache it if it is a final verdict, then wake
    /// the followers.
    pub async fn finish(self, exchange: Arc<Exchange>) {
        self.finish_aged(exchange, Duration::ZERO, None).await;
    }

    /// Publish an outcome the provider gave `age` ago (a verdict from the fleet's level): it is
    /// cached for what is left of its time to live, so it ends on every replica when it ends
    /// where it was paid for. A pass is remembered as `owner`'s (the tenant whose call it was),
    /// this request's when that is not known.
    pub async fn finish_aged(
        mut self,
        exchange: Arc<Exchange>,
        age: Duration,
        owner: Option<&str>,
    ) {
        if let (Some(key), Some((answer, verdict))) = (&self.key, shareable(&exchange)) {
            if verdict.result {
                let owner = owner.unwrap_or(&key.owner);
                self.cache.passes.record(&key.digest, owner);
            }
            let left = self.cache.ttl_for(verdict).saturating_sub(age);
            if !left.is_zero() {
                let entry = CachedVerdict {
                    ttl: left,
                    answer: answer.clone(),
                    verdict: verdict.clone(),
                    stored: Instant::now(),
                    age_when_stored: age,
                };
                self.cache.cache.insert(key.clone(), Arc::new(entry)).await;
            }
        }
        self.cache.leave(self.key.take());
        let _ = self.tx.send(Some(Flight::Done(exchange)));
    }
}

/// The answer and verdict of an exchange worth caching: a final verdict the provider answered
/// with 200 (a pass, or a fail it judged); never an error or an undecided answer.
pub fn shareable(exchange: &Exchange) -> Option<(&ProviderAnswer, &LivenessVerdict)> {
    match (&exchange.outcome, &exchange.verdict) {
        (Ok(answer), Some(v)) if answer.status() == 200 && v.is_final() => Some((answer, v)),
        _ => None,
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if self.key.is_some() {
            self.cache.leave(self.key.take());
            let _ = self.tx.send(Some(Flight::Abandoned));
        }
    }
}

pub struct VerdictCache {
    cache: moka::future::Cache<CacheKey, Arc<CachedVerdict>>,
    /// Which tenant each recent pass was for: the replay signal.
    passes: ReplayWatch,
    ttl: Duration,
    pass_ttl: Duration,
    inflight: Mutex<HashMap<CacheKey, watch::Receiver<Option<Flight>>>>,
    enabled: bool,
    pub scope: CacheScope,
    pub allow_bypass: bool,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Heap bytes an entry holds besides its variable parts: the `CachedVerdict` and its `Arc`, the
/// key's allocations, and moka's own per-entry bookkeeping (hash table slot, entry info,
/// access and write order nodes, and the timer node of its own expiry). Measured, not estimated: `tests/cache_memory.rs` fills a cache
/// and counts live heap bytes; with 128 here a full 64 MiB cache held 148 MiB.
const ENTRY_OVERHEAD: usize = 750;

/// Bytes an entry is charged: what it holds on the heap, so `max_bytes` bounds real memory.
fn weigh(k: &CacheKey, v: &Arc<CachedVerdict>) -> u32 {
    let n = k.scope.len()
        + k.subject.as_ref().map_or(0, |s| s.len())
        + v.answer.body().len()
        + ENTRY_OVERHEAD;
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Each entry lives as long as its own `ttl` says (passes and fails differ).
struct EntryTtl;

impl moka::Expiry<CacheKey, Arc<CachedVerdict>> for EntryTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedVerdict>,
        _now: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The share of `cache.max_bytes` given to the replay signal's table (1/16: the default 64 MiB
/// remembers about 115,000 passes).
const REPLAY_SHARE: u64 = 16;

impl VerdictCache {
    pub fn new(cfg: &CacheConfig) -> Arc<VerdictCache> {
        let passes = ReplayWatch::new(cfg.max_bytes / REPLAY_SHARE, cfg.ttl.max(cfg.pass_ttl));
        let cache = moka::future::Cache::builder()
            .max_capacity(cfg.max_bytes.saturating_sub(passes.bytes()))
            .weigher(weigh)
            .expire_after(EntryTtl)
            .support_invalidation_closures()
            .build();
        Arc::new(VerdictCache {
            cache,
            passes,
            ttl: cfg.ttl,
            pass_ttl: cfg.pass_ttl,
            inflight: Mutex::new(HashMap::new()),
            enabled: cfg.enabled,
            scope: cfg.scope,
            allow_bypass: cfg.allow_bypass,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// How long a verdict is kept: `pass_ttl` for a pass, `ttl` for a fail.
    pub fn ttl_for(&self, verdict: &LivenessVerdict) -> Duration {
        if verdict.result {
            self.pass_ttl
        } else {
            self.ttl
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// A hit, a flight to follow, or the lead. Without a key (the cache is off, so no digest was
    /// taken) every request leads alone.
    pub async fn lookup(self: &Arc<Self>, key: Option<CacheKey>, bypass: bool) -> Lookup {
        let Some(key) = key.filter(|_| self.enabled) else {
            return Lookup::Lead(Leader {
                key: None,
                tx: watch::channel(None).0,
                cache: self.clone(),
            });
        };
        if !bypass {
            if let Some(v) = self.cache.get(&key).await {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Lookup::Hit(v);
            }
        }
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = inflight.get(&key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Lookup::Follow(Follower(rx.clone()));
        }
        // The leader before us may have finished between our `get` and taking the lock.
        if !bypass {
            if let Some(v) = self.cache.get(&key).now_or_never_hit() {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Lookup::Hit(v);
            }
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert(key.clone(), rx);
        self.misses.fetch_add(1, Ordering::Relaxed);
        Lookup::Lead(Leader {
            key: Some(key),
            tx,
            cache: self.clone(),
        })
    }

    /// A hit as it may be served: checked against the secrets in force. One checked against
    /// others (a reload changed them) is checked again, and kept with its new check, or dropped
    /// (`None`: the request leads a new call).
    pub async fn current(
        &self,
        key: &CacheKey,
        entry: Arc<CachedVerdict>,
        egress: &Egress,
    ) -> Option<Arc<CachedVerdict>> {
        match egress.recheck(&entry.answer) {
            Ok(None) => Some(entry),
            Ok(Some(answer)) => {
                let entry = Arc::new(CachedVerdict {
                    answer,
                    ..(*entry).clone()
                });
                // An update keeps the entry's expiry (`EntryTtl` sets it on creation only).
                self.cache.insert(key.clone(), entry.clone()).await;
                Some(entry)
            }
            Err(_) => {
                self.cache.invalidate(key).await;
                None
            }
        }
    }

    /// Whether this image passed recently for another party than `owner` (`CacheKey::owner`:
    /// another tenant, or with `scope = "subject"` another user): a selfie captured from one
    /// app or user and replayed through another, or the same test photo used by two teams.
    pub fn passed_for_another(&self, owner: &str, digest: &[u8; 32]) -> bool {
        self.passes.passed_for_another(digest, owner)
    }

    fn leave(&self, key: Option<CacheKey>) {
        if let Some(k) = key {
            self.inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&k);
        }
    }

    /// Settle pending evictions so the counts below are exact.
    pub async fn sync(&self) {
        self.cache.run_pending_tasks().await;
    }

    pub fn entries(&self) -> u64 {
        self.cache.entry_count()
    }

    /// What the cache holds: its entries' weight plus the replay table.
    pub fn bytes(&self) -> u64 {
        self.cache.weighted_size() + self.passes.bytes()
    }

    pub fn hit_ratio(&self) -> f64 {
        let (h, m) = (
            self.hits.load(Ordering::Relaxed) as f64,
            self.misses.load(Ordering::Relaxed) as f64,
        );
        if h + m == 0.0 {
            0.0
        } else {
            h / (h + m)
        }
    }

    /// Drop every entry, or one tenant's (with tenant scope; shared entries belong to no tenant).
    pub async fn purge(&self, tenant: Option<&str>) -> Result<(), String> {
        match tenant {
            None => self.cache.invalidate_all(),
            Some(t) => {
                let t: Arc<str> = Arc::from(t);
                self.cache
                    .invalidate_entries_if(move |k, _| k.scope == t)
                    .map_err(|e| e.to_string())?;
            }
        }
        self.sync().await;
        Ok(())
    }
}

/// `moka::future::Cache::get` is async; under the in-flight lock we only want an answer that is
/// ready now, so this polls it once.
trait NowOrNever<T> {
    fn now_or_never_hit(self) -> Option<T>;
}

impl<F, T> NowOrNever<T> for F
where
    F: std::future::Future<Output = Option<T>>,
{
    fn now_or_never_hit(self) -> Option<T> {
        futures_util::FutureExt::now_or_never(self).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::UpstreamClass;

    fn cfg(enabled: bool) -> CacheConfig {
        CacheConfig {
            enabled,
            scope: CacheScope::Tenant,
            max_bytes: 1 << 20,
            ttl: Duration::from_secs(60),
            pass_ttl: Duration::from_secs(60),
            allow_bypass: false,
        }
    }

    fn exchange(status: u16) -> Arc<Exchange> {
        Arc::new(Exchange {
            outcome: Ok(ProviderAnswer::for_test(status, b"{}")),
            class: UpstreamClass::Ok,
            upstream_status: Some(status),
            verdict: Some(LivenessVerdict {
                result: true,
                prediction: Some(0.9),
                failure_type: None,
            }),
            session_id: None,
            upstream_ms: 1,
            sent_bytes: 0,
            received_bytes: 0,
        })
    }

    #[tokio::test]
    async fn lead_follow_then_hit() {
        let c = VerdictCache::new(&cfg(true));
        let k = key(CacheScope::Tenant, "a", None, [1; 32]);
        let Lookup::Lead(leader) = c.lookup(Some(k.clone()), false).await else {
            panic!("first must lead")
        };
        let Lookup::Follow(f) = c.lookup(Some(k.clone()), false).await else {
            panic!("second must follow")
        };
        leader.finish(exchange(200)).await;
        assert!(matches!(
            f.wait(Duration::from_secs(1)).await,
            Ok(Followed::Done(_))
        ));
        assert!(matches!(c.lookup(Some(k), false).await, Lookup::Hit(_)));
    }

    #[tokio::test]
    async fn abandoned_and_errors_are_not_cached() {
        let c = VerdictCache::new(&cfg(true));
        let k = key(CacheScope::Tenant, "a", None, [2; 32]);
        let Lookup::Lead(leader) = c.lookup(Some(k.clone()), false).await else {
            panic!("lead")
        };
        let Lookup::Follow(f) = c.lookup(Some(k.clone()), false).await else {
            panic!("follow")
        };
        drop(leader);
        assert!(matches!(
            f.wait(Duration::from_secs(1)).await,
            Ok(Followed::Retry)
        ));
        let Lookup::Lead(leader) = c.lookup(Some(k.clone()), false).await else {
            panic!("lead again")
        };
        let mut x = (*exchange(400)).clone();
        x.verdict = None;
        leader.finish(Arc::new(x)).await;
        assert!(matches!(c.lookup(Some(k), false).await, Lookup::Lead(_)));
    }

    /// A verdict the provider gave elsewhere (the fleet's level) keeps its age, and lives only
    /// what is left of its time to live; one already over it is not cached.
    #[tokio::test]
    async fn a_verdict_from_elsewhere_keeps_its_age_and_what_is_left_of_its_life() {
        let c = VerdictCache::new(&CacheConfig {
            pass_ttl: Duration::from_secs(10),
            ..cfg(true)
        });
        let k = key(CacheScope::Tenant, "a", None, [3; 32]);
        let Lookup::Lead(leader) = c.lookup(Some(k.clone()), false).await else {
            panic!("lead")
        };
        leader
            .finish_aged(exchange(200), Duration::from_secs(7), None)
            .await;
        let Lookup::Hit(entry) = c.lookup(Some(k), false).await else {
            panic!("cached")
        };
        assert_eq!(entry.age().as_secs(), 7);
        assert_eq!(entry.ttl, Duration::from_secs(3));

        let old = key(CacheScope::Tenant, "a", None, [4; 32]);
        let Lookup::Lead(leader) = c.lookup(Some(old.clone()), false).await else {
            panic!("lead")
        };
        leader
            .finish_aged(exchange(200), Duration::from_secs(10), None)
            .await;
        assert!(matches!(c.lookup(Some(old), false).await, Lookup::Lead(_)));
    }

    #[tokio::test]
    async fn scopes_separate_tenants() {
        assert_ne!(
            key(CacheScope::Tenant, "a", None, [0; 32]),
            key(CacheScope::Tenant, "b", None, [0; 32])
        );
        assert_eq!(
            key(CacheScope::Shared, "a", None, [0; 32]),
            key(CacheScope::Shared, "b", None, [0; 32])
        );
    }

    /// With `scope = "subject"`, two users of a tenant have their own entries and are two
    /// parties to the replay signal; a request without a user has the tenant's.
    #[test]
    fn the_subject_scope_separates_users_of_a_tenant() {
        let of = |subject| key(CacheScope::Subject, "a", subject, [0; 32]);
        assert_ne!(of(Some("ana")), of(Some("bo")));
        assert_eq!(of(Some("ana")), of(Some("ana")));
        assert_ne!(of(Some("ana")), of(None));
        assert_eq!(of(None), key(CacheScope::Tenant, "a", None, [0; 32]));
        assert_eq!(&*of(Some("ana")).scope, "a", "purged with its tenant");
        assert_ne!(of(Some("ana")).owner, of(Some("bo")).owner);
        // Other scopes ignore the subject.
        let tenant = |subject| key(CacheScope::Tenant, "a", subject, [0; 32]);
        assert_eq!(tenant(Some("ana")), tenant(Some("bo")));
        let passes = ReplayWatch::new(4096, Duration::from_secs(60));
        passes.record(&[0; 32], &of(Some("ana")).owner);
        assert!(passes.passed_for_another(&[0; 32], &of(Some("bo")).owner));
        assert!(!passes.passed_for_another(&[0; 32], &of(Some("ana")).owner));
    }
}
