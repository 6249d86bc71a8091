//! The store: where the counts that must hold across replicas live. Its seam is a few traits,
//! each for what it serves:
//!
//! - `Claims`: a call's claim and settlement: its budget hold (reserve, then commit or release)
//!   and, in a fleet, the image's lock and the shared verdict;
//! - `Usage`: the counts and the usage history, and what the admin API does with them;
//! - `Replays`: single-use ids (app tokens' `jti`);
//! - `Records`: what the admin API issues at runtime (tenant keys, grants), as versioned
//!   documents every replica reads;
//! - `Fleet`: what only a store that replicas share has: shared rate limits (`SharedRates`), the
//!   purge of the shared verdicts, and its upkeep.
//!
//! Two backends implement them with one set of rules (`tests/store_conformance.rs` runs the
//! same cases against both):
//!
//! - `local`: this process alone, with the budget state file (the default);
//! - `redis`: every replica through Redis (or Valkey), so a budget of 1,000 is 1,000 paid calls
//!   however many replicas serve it, and an image is paid for once across the fleet.
//!
//! A claim asks for the cache entry, the cache lock and the budget hold in **one** round trip,
//! and a settlement stores the verdict, frees the lock and commits or releases the hold in one
//! more: a cache miss costs two round trips to Redis, whatever it finds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::cache;
use crate::config::{Calendar, Periods};
use crate::egress::{self, Egress, ProviderAnswer};
use crate::error::GatewayError;
use crate::upstream::Exchange;
use crate::verdict;

pub mod eviction;
pub mod local;
pub mod redis;
mod turn;

pub use local::LocalStore;
pub use redis::RedisStore;
pub use turn::{take_turn, Reservation, Turn};

/// A tenant's budget: billable calls per day and per month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetLimits {
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
}

/// A tenant's calls in the current day and month, as `/admin/usage` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub day: String,
    pub day_used: u64,
    pub month: String,
    pub month_used: u64,
}

/// What an adjustment did: the counts after it, and what it added to the day and the month
/// (less than asked when a count would have gone below zero).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adjusted {
    pub counts: Counts,
    pub day_applied: i64,
    pub month_applied: i64,
}

/// How long a budget hold or an image lock lasts past its owner's last renewal, on the fleet
/// clock (see `redis`): a replica renews what it owns twice a second, so a replica that dies
/// frees its holds and images within this long.
pub const LEASE: Duration = Duration::from_secs(6);

/// How long a replica waits at most for another's lock on an image: the longest call, and a
/// lease for the lock of a replica that died during it to lapse.
pub fn lock_wait(longest_call: Duration) -> Duration {
    longest_call + LEASE
}

/// A verdict as the fleet shares it: what the cache holds, without the parsed verdict (the reader
/// parses the body again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedVerdict {
    pub status: u16,
    /// Always `application/json`; written for replicas of older versions, which serve it.
    pub content_type: Option<String>,
    pub body: String,
    /// When the provider answered, in Unix milliseconds (for `Age`).
    pub created_ms: i64,
    /// The tenant whose call it was (a replay is a pass served to another); absent in what
    /// older versions wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Where a verdict another replica has came from: when the provider answered (Unix
/// milliseconds, for `Age`) and the tenant whose call it was, when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub created_ms: i64,
    pub owner: Option<String>,
}

impl SharedVerdict {
    pub fn of(answer: &ProviderAnswer, created_ms: i64, owner: &str) -> SharedVerdict {
        SharedVerdict {
            status: answer.status(),
            content_type: Some(egress::CONTENT_TYPE.into()),
            body: String::from_utf8_lossy(answer.body()).into_owned(),
            created_ms,
            owner: Some(owner.to_string()),
        }
    }

    /// A stored value as this replica serves it: the same exchange as the replica that paid for
    /// it had, with no upstream time. `None` unless it is what a replica stores, a final verdict
    /// the provider answered with 200, and it passes the egress check of this replica's secrets:
    /// a value another program wrote under the prefix, one in a shape this version does not
    /// read (a rolling upgrade), or one that carries a secret, is never served.
    pub fn read(raw: &str, egress: &Egress) -> Option<(Exchange, Origin)> {
        let v: SharedVerdict = serde_json::from_str(raw).ok()?;
        let answer = egress
            .check_stored(v.status, v.body.as_bytes(), egress::Source::Store)
            .ok()?;
        let c = verdict::classify(answer.status(), answer.body());
        let exchange = Exchange {
            upstream_status: Some(answer.status()),
            outcome: Ok(answer),
            class: c.class,
            verdict: c.verdict,
            session_id: c.session_id,
            upstream_ms: 0,
            sent_bytes: 0,
            received_bytes: 0,
        };
        let origin = Origin {
            created_ms: v.created_ms,
            owner: v.owner,
        };
        cache::shareable(&exchange)
            .is_some()
            .then_some((exchange, origin))
    }
}

/// The fleet-wide name of a cache entry: its scope (a tenant, or shared) and the image digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedKey {
    /// The tenant whose keys it lives beside, or `None` for the shared scope.
    pub tenant: Option<String>,
    pub digest_hex: String,
    /// The provider endpoint's fingerprint (`UpstreamConfig::fingerprint`).
    pub upstream: String,
}

/// One upstream call's claim: its budget hold (when the tenant has a budget) and, when the cache
/// is on, the fleet-wide lock on its image.
#[derive(Debug, Clone)]
pub struct Hold {
    /// Unique per claim: makes every script call about it idempotent.
    pub id: String,
    pub tenant: String,
    pub limits: BudgetLimits,
    /// The periods it counts in, fixed when it was taken (a call settled after midnight counts
    /// in the day it was reserved in).
    pub periods: Periods,
    pub taken: DateTime<Utc>,
    pub shared: Option<SharedKey>,
    /// The app token's subject, when its tenant limits subjects' calls or failed attempts:
    /// held, committed and released with the tenant's, in the tenant's day.
    pub subject: Option<SubjectHold>,
}

/// What a call holds of one app-token subject's day: a call of its budget, and a chance at a
/// failed attempt (counted only when the verdict is a fail the provider judged). A subject's
/// calls in flight count against both, so concurrent calls cannot overshoot either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectHold {
    /// The subject's keyed hash.
    pub name: String,
    /// Its billable calls a day, when limited.
    pub daily_budget: Option<u64>,
    /// Its failed verdicts a day, when limited.
    pub max_failed: Option<u64>,
}

impl SubjectHold {
    pub fn new(name: &str, daily_budget: Option<u64>, max_failed: Option<u64>) -> SubjectHold {
        SubjectHold {
            name: name.to_string(),
            daily_budget,
            max_failed,
        }
    }
}

impl Hold {
    /// A hold taken now, in the periods of `store`'s calendar and clock.
    pub fn new(
        tenant: &str,
        limits: BudgetLimits,
        shared: Option<SharedKey>,
        store: &dyn Clock,
    ) -> Hold {
        let now = store.now();
        Hold {
            id: uuid::Uuid::new_v4().simple().to_string(),
            tenant: tenant.to_string(),
            limits,
            periods: store.calendar().periods(now),
            taken: now,
            shared,
            subject: None,
        }
    }

    /// The same hold, with a subject's part as well.
    pub fn with_subject(mut self, subject: Option<SubjectHold>) -> Hold {
        self.subject = subject;
        self
    }

    pub fn has_budget(&self) -> bool {
        self.limits.daily.is_some() || self.limits.monthly.is_some() || self.subject.is_some()
    }
}

/// What the store replied to one claim.
#[derive(Debug)]
pub enum ClaimReply {
    /// The call may go: the budget is held and the image locked for this request.
    Go,
    /// Another replica answered this image already: its exchange, and where it came from.
    Hit(Exchange, Origin),
    /// Another replica is calling for this image: ask again after this long.
    Wait(Duration),
}

/// What to do with a hold once the call is over.
#[derive(Debug, Clone)]
pub enum Settle {
    /// The provider may have billed the call: count it (once, whatever retries happen), for
    /// the tenant and for the organization key (its id) the call went out with. `uncertain`:
    /// no answer tells whether it did (`upstream::UpstreamError::outcome_unknown`); the call
    /// counts all the same (the budget is never overshot), and apart as uncertain. `failed`:
    /// its verdict was a fail the provider judged, one of the subject's failed attempts.
    Commit {
        org_key: String,
        uncertain: bool,
        failed: bool,
    },
    /// Nothing was billed: give the hold back.
    Release,
}

/// One tenant's day in the usage history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DayUsage {
    pub tenant: String,
    pub day: String,
    /// Calls the provider may bill: those counted against the budget.
    pub billable: u64,
    /// The part of `billable` whose outcome the gateway cannot know (the whole request was
    /// written, no answer told whether it was billed). The others were answered: the provider
    /// bills `billable - uncertain` calls and some of these.
    pub uncertain: u64,
    /// Requests answered from the cache or a shared flight: paid calls saved.
    pub cache_hits: u64,
    /// Requests the gateway refused after authenticating the tenant (input, limits, budget).
    pub rejected: u64,
    /// `billable` by the id of the organization key the calls went out with (adjustments are
    /// the tenant's only).
    pub billable_by_key: std::collections::BTreeMap<String, u64>,
    /// `uncertain` by organization key, none zero.
    pub uncertain_by_key: std::collections::BTreeMap<String, u64>,
}

/// One subject's day, as `/admin/subjects` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectDay {
    /// Its keyed hash.
    pub subject: String,
    pub billable: u64,
    /// Its failed verdicts (`result: false`, `CALC_RESULT`).
    pub failed: u64,
}

/// Counted on the side of a request and written in batches: never worth a round trip of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Noted {
    CacheHit,
    Rejected,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// Where days and months end: the store's calendar, and the clock it tells them by.
#[async_trait]
pub trait Clock: Send + Sync {
    /// The calendar its days and months are counted in.
    fn calendar(&self) -> Calendar;
    /// The time its days and months are told by: this host's clock for the local store; for
    /// the fleet, Redis's (every replica then agrees where a day ends, whatever its own clock
    /// says).
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
    /// Make `now` the store's time before its first use: the fleet asks Redis for its clock
    /// once, when no answer has measured it yet (a replica starts serving before its maintenance
    /// task first measures it, and a day-off clock would count those first calls in its own day).
    async fn clock_known(&self) {}
}

/// A call's claim: its budget hold and, in a fleet, the image's lock and the shared verdict.
/// Holds are named by their id: a settlement sent twice, or after the hold was given back,
/// counts once and never frees another call's hold.
#[async_trait]
pub trait Claims: Clock {
    /// Look for the verdict, take the image's lock and hold one call of the budget, in one step.
    /// `BudgetExhausted` when the budget has no room; `StoreUnavailable` when it cannot be
    /// checked.
    /// A verdict found is served only if it passes `egress`.
    async fn claim(&self, hold: &Hold, egress: &Egress) -> Result<ClaimReply, GatewayError>;
    /// Commit or release the hold, store the verdict (if there is one to share, with its time
    /// to live from `created_ms`) and free the image's lock.
    async fn settle(&self, hold: &Hold, how: Settle, verdict: Option<(&SharedVerdict, Duration)>);
    /// Give a claim back without waiting (a request that stopped before its call).
    fn abandon(&self, hold: &Hold);
}

/// The counts and the usage history, and what the admin API does with them.
#[async_trait]
pub trait Usage: Clock {
    /// A tenant's used calls in the current day and month.
    async fn counts(&self, tenant: &str, now: DateTime<Utc>) -> Result<Counts, StoreError>;
    /// Add `delta` billable calls (negative: a refund or a mistake undone) to the tenant's
    /// current day and month and its usage history, never below zero; the counts after, and
    /// what was added to each.
    async fn adjust(
        &self,
        tenant: &str,
        now: DateTime<Utc>,
        delta: i64,
    ) -> Result<Adjusted, StoreError>;
    /// The usage history of these tenants, day by day from `from` to `to` (both included).
    async fn history(
        &self,
        tenants: &[String],
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<DayUsage>, StoreError>;
    /// The tenant's subjects (their keyed hashes) with the most billable calls in the day of
    /// `now`, most first, at most `limit`.
    async fn top_subjects(
        &self,
        tenant: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<SubjectDay>, StoreError>;
    /// Forget a subject's failed attempts of the day of `now` (an admin's reset); how many it
    /// had.
    async fn reset_failed(
        &self,
        tenant: &str,
        subject: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError>;
    /// Count a cache hit or a refusal for the tenant's day (written at the next flush).
    fn note(&self, tenant: &str, what: Noted);
    /// Write what is kept in memory only. On failure nothing is lost: a later flush writes it.
    async fn flush(&self) -> Result<(), StoreError>;
    /// The last flush of a stopping process, outside any runtime (the local state file).
    fn flush_at_exit(&self) -> Result<(), StoreError>;
    /// This process hands its sockets over to a new one (the upgrade signal): make what it
    /// counts visible to the new one before that one takes its first request. Called before
    /// the hand-over.
    fn upgrading(&self) {}
}

/// Single-use ids (an app token's `jti`), each usable once.
#[async_trait]
pub trait Replays: Send + Sync {
    /// Record the first use of a single-use id in `scope` (its issuer), remembered until
    /// `until_ms` (Unix milliseconds): true the first time, false for a replay. An error when
    /// it cannot be told (a replay must not pass).
    async fn first_use(&self, scope: &str, id: &str, until_ms: i64) -> Result<bool, StoreError>;
    /// Undo `first_use`: the request it was recorded for was refused before it got an answer,
    /// so the id may be used again. When the store cannot be reached the id stays used (a retry
    /// is then refused, never a replay let through).
    async fn forget_use(&self, scope: &str, id: &str) -> Result<(), StoreError>;
}

/// Which GCRA quota a shared rate check takes from.
#[derive(Debug, Clone, Copy)]
pub enum RateKey<'a> {
    Tenant(&'a str),
    /// A tenant's subject (its hash): in the tenant's hash slot.
    Subject(&'a str, &'a str),
    /// The global upstream pace.
    Pace,
}

/// What a shared GCRA quota granted: one request or none, the burst left, and how long until
/// one would be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cells {
    pub granted: bool,
    pub remaining: u32,
    pub wait: Duration,
}

/// Rate limits kept in the store, shared by every replica: the same GCRA as `governor`'s.
#[async_trait]
pub trait SharedRates: Send + Sync {
    /// Take one request from the quota `key` (a request earned back every `interval`, up to
    /// `burst`).
    async fn take(
        &self,
        key: RateKey<'_>,
        interval: Duration,
        burst: u32,
    ) -> Result<Cells, StoreError>;
    /// Count what this replica did instead while the store did not answer
    /// (`store_fallbacks_total`).
    fn fell_back(&self, what: &str);
}

/// What only a store that replicas share has.
#[async_trait]
pub trait Fleet: Send + Sync {
    /// The rate limits it keeps.
    fn rates(&self) -> Arc<dyn SharedRates>;
    /// Drop the shared verdicts of one tenant, or all; the count removed.
    async fn purge_verdicts(&self, tenant: Option<&str>) -> Result<u64, StoreError>;
    /// What keeps this replica's part of the fleet alive, for as long as the process runs.
    async fn keep_alive(&self);
    /// The periodic checks of the store: whether it answers, may evict keys, or is shared with
    /// another deployment (`fingerprint` and `endpoint`: this one's provider endpoint).
    async fn check(&self, fingerprint: &str, endpoint: &str);
}

/// What the admin API issues at runtime (tenant keys, grants): documents named by an id, and a
/// version that every change moves, so that a replica polls one number to learn that it must
/// read them again. A write names the value it replaces: two admins changing one record at
/// once cannot lose either's change unnoticed.
#[async_trait]
pub trait Records: Send + Sync {
    /// The version of the records: any change moves it.
    async fn version(&self) -> Result<u64, StoreError>;
    /// Every record, with the version they are at (read before them: a change made meanwhile
    /// leaves a version that the next poll finds moved).
    async fn records(&self) -> Result<(u64, BTreeMap<String, String>), StoreError>;
    /// Write `value` under `id` (`None`: remove it) if what is there now is `expected` (`None`:
    /// nothing). False, and nothing written, when it is not.
    async fn swap(
        &self,
        id: &str,
        expected: Option<&str>,
        value: Option<&str>,
    ) -> Result<bool, StoreError>;
    /// Note when records were last used (Unix seconds, by id): kept apart from the records,
    /// and never moving their version.
    async fn touch(&self, used: &[(String, i64)]) -> Result<(), StoreError>;
    /// When each record was last used, as `touch` noted it.
    async fn touched(&self) -> Result<BTreeMap<String, i64>, StoreError>;
    /// Whether the records outlive this process (false: a local store with no state file).
    fn durable(&self) -> bool {
        true
    }
}

/// The whole store: one value behind every trait of the seam.
pub trait Store: Claims + Usage + Replays + Records {
    /// What only a store that replicas share has: `None` for this process's own store.
    fn fleet(&self) -> Option<&dyn Fleet> {
        None
    }
}

/// Every day from `from` to `to`, as `YYYY-MM-DD`.
pub fn days(from: NaiveDate, to: NaiveDate) -> impl Iterator<Item = NaiveDate> {
    from.iter_days().take_while(move |d| *d <= to)
}
