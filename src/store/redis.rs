//! The fleet store on Redis (or Valkey): rate limits, budgets, usage history and the second
//! cache level, shared by every replica.
//!
//! Everything that decides is a Lua script, so it runs whole or not at all, and reads the time
//! from Redis `TIME` (integers: a Lua float prints only 14 digits). Every key a script touches is
//! in its `KEYS`, and a tenant's keys share one hash tag (`{t:<id>}`), so the scripts run on a
//! Redis Cluster too. Keys (prefix `lg`):
//!
//! | key | what |
//! |---|---|
//! | `lg:{t:ID}:rate` | the tenant's GCRA state (theoretical arrival time, µs) |
//! | `lg:{global}:pace` | the global upstream pace (GCRA) |
//! | `lg:{t:ID}:day:YYYY-MM-DD`, `…:month:YYYY-MM` | billable calls committed in the period |
//! | `lg:{t:ID}:holds:day:…`, `…:holds:month:…` | holds in flight: id → expiry (ms) |
//! | `lg:{t:ID}:done:HOLD` | a hold already committed (a retried commit changes nothing) |
//! | `lg:{j:ISSUER}:jti:HASH` | a single-use app token's `jti` (BLAKE3), until the token expires |
//! | `lg:{t:ID}:usage:YYYY-MM` | usage history: `DD:b` billable, `DD:b:KEY` billable with organization key KEY, `DD:h` cache hits, `DD:r` refused |
//! | `lg:{t:ID}:v:DIGEST`, `…:lock:DIGEST` | verdict and lock, tenant scope |
//! | `lg:{v:DIGEST}:v`, `…:lock` | verdict and lock, shared scope |
//!
//! Every key expires by itself: periods after they end, holds with the period, the usage history
//! after 14 months. A command that timed out may still have run, so nothing is retried blindly:
//! holds carry an id, and every script about a hold is idempotent.
//!
//! Connections are made lazily from inside a running service, one per runtime: the driver task
//! of redis-rs' multiplexed connection lives on the runtime that created it, and a request whose
//! command went through another runtime's driver waited for that runtime's parked threads to
//! wake, twice per round trip (about 20 µs of CPU per cache miss, benches/README.md). The
//! services' runtimes live as long as the process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::IntoConnectionInfo;
use ::redis::{Cmd, Pipeline, RedisFuture, Script, Value};
use async_trait::async_trait;
use chrono::{DateTime, Datelike, NaiveDate, Utc};

use super::eviction::Eviction;
use super::{Claim, DayUsage, Hold, Noted, Settle, SharedKey, SharedVerdict, Store, StoreError};
use crate::budget::{Calendar, Counts};
use crate::config::StoreConfig;
use crate::error::GatewayError;
use crate::limits::{Rate, RateDecision};
use crate::logging::warn_throttled;
use crate::metrics::{GaugeGuard, Metrics};

/// GCRA as `governor` computes it, in microseconds of Redis time, taking up to ARGV[3] cells at
/// once (a lease; 1 answers exactly as `governor` does). KEYS: state. ARGV: interval (µs),
/// burst, cells wanted. Returns {cells granted, remaining burst, µs to wait when none}.
/// No grant leaves the state more than a burst and one interval ahead of now: a state further
/// ahead means Redis's clock went back (a clock stepped, a host restored from a snapshot): it
/// is written back as a drained quota instead of refusing everyone for as long as the clock
/// jumped.
const RATE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = interval * (tonumber(ARGV[2]) - 1)
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now)
if tat > now + tau + interval then
  tat = now + tau + interval
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
end
local n = math.floor((now + tau - tat) / interval) + 1
if n < 1 then
  return {0, 0, tat - tau - now}
end
n = math.min(n, tonumber(ARGV[3]))
local nxt = tat + n * interval
redis.call('SET', KEYS[1], string.format('%.0f', nxt), 'PX', math.ceil((nxt - now) / 1000) + 1)
local room = math.min(now + tau + interval - nxt, tau + interval)
return {n, math.floor(room / interval), 0}
";

/// How many cells a replica takes from a quota at once. Small bursts go one by one, so a tenant
/// limited to a few calls a second is limited exactly as one process would limit it; a burst of
/// 20 or more is taken in leases of burst/20 (at most 256), which saves the round trip on most
/// requests of a busy tenant. A lease unused after `LEASE_TTL` is dropped: a replica may leave
/// part of a lease unused (fewer requests allowed), never allow more than the quota.
fn lease_size(burst: u32) -> u32 {
    if burst < 20 {
        1
    } else {
        (burst / 20).min(256)
    }
}

const LEASE_TTL: Duration = Duration::from_millis(100);

/// Cells taken from a shared quota and not used yet. One request at a time refills it (the
/// others wait for it and take from what it brought), so concurrent requests never each take a
/// lease of their own.
#[derive(Default)]
struct Lease {
    left: u32,
    /// The quota's remaining burst when the lease was taken.
    remaining: u32,
    until: Option<Instant>,
    /// After a failed refill, the requests queued behind it fall back at once instead of each
    /// waiting for the store in turn.
    failed_until: Option<Instant>,
}

impl Lease {
    /// One cell from the lease, if it has one: the remaining burst to report.
    fn take(&mut self, now: Instant) -> Option<u32> {
        if self.left > 0 && self.until.is_some_and(|u| now < u) {
            self.left -= 1;
            Some(self.remaining + self.left)
        } else {
            None
        }
    }
}

/// A quota's lease: taken from under a plain lock (no await on the fast path), refilled by one
/// request at a time.
#[derive(Default)]
struct LeaseSlot {
    lease: Mutex<Lease>,
    refill: tokio::sync::Mutex<()>,
    /// A refill ahead of need is running: one at a time.
    topping_up: std::sync::atomic::AtomicBool,
}

/// Look up the verdict, take the image's lock, hold one call of the budget: each part only when
/// ARGV[1] names it (`c` cache, `b` budget, `s` a subject's daily budget too; `r`: the value
/// ARGV[10] was found unreadable, delete it if it is still there and go on as on a miss).
/// KEYS: [value, lock] then [day, month, day holds, month holds] then [subject day, subject day
/// holds]. ARGV: mode, token, lock ms, hold id, hold ms, daily limit (-1: none), monthly limit,
/// holds ttl ms, subject daily limit, unreadable value. Idempotent for one token and hold id.
const CLAIM: &str = r"
local mode = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local k = 1
local locked = false
if string.find(mode, 'c', 1, true) then
  local v = redis.call('GET', KEYS[1])
  if v and string.find(mode, 'r', 1, true) and v == ARGV[10] then
    redis.call('DEL', KEYS[1])
  elseif v then
    return {'hit', v}
  end
  if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then
    locked = true
  elseif redis.call('GET', KEYS[2]) ~= ARGV[2] then
    return {'wait', tostring(redis.call('PTTL', KEYS[2]))}
  end
  k = 3
end
if string.find(mode, 'b', 1, true) then
  local id = ARGV[4]
  local hd, hm = KEYS[k + 2], KEYS[k + 3]
  redis.call('ZREMRANGEBYSCORE', hd, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', hm, '-inf', now)
  if redis.call('ZSCORE', hd, id) then return {'go'} end
  local checks = {{tonumber(ARGV[6]), KEYS[k], hd, 'daily'}, {tonumber(ARGV[7]), KEYS[k + 1], hm, 'monthly'}}
  if string.find(mode, 's', 1, true) then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 5], '-inf', now)
    table.insert(checks, 1, {tonumber(ARGV[9]), KEYS[k + 4], KEYS[k + 5], 'subject'})
  end
  for _, c in ipairs(checks) do
    if c[1] >= 0 then
      c[5] = redis.call('ZCARD', c[3])
      if tonumber(redis.call('GET', c[2]) or '0') + c[5] >= c[1] then
        if locked then redis.call('DEL', KEYS[2]) end
        return {'exhausted', c[4]}
      end
    end
  end
  local expiry = string.format('%.0f', now + tonumber(ARGV[5]))
  for _, c in ipairs(checks) do
    redis.call('ZADD', c[3], expiry, id)
    -- The expiry is set once, when the key is new (every write goes to the AOF). A set that
    -- still had holds got its expiry when it was made; an emptied one was deleted.
    if c[5] == 0 or (c[5] == nil and redis.call('PTTL', c[3]) < 0) then
      redis.call('PEXPIRE', c[3], ARGV[8])
    end
  end
end
return {'go'}
";

/// Store the verdict and free the lock (`c`); commit or release the hold (`b`, and `s` for the
/// subject's part). KEYS: [value, lock] then [day, month, day holds, month holds, done marker
/// of this hold, usage] then [subject day, subject day holds, the tenant's subjects of the day
/// (a sorted set of billable calls)]. ARGV (the 14th: the subject's hash; the 15th: the usage
/// field of an uncertain commit, '' for a commit the provider's answer settled):
/// mode, token, verdict ('' for none), verdict ttl ms, hold id, commit (1|0), had a hold (1|0),
/// day ttl ms, month ttl ms, usage field, usage ttl ms, done ttl ms, the usage field of the
/// organization key ('' for none). Returns 'ok', 'late'
/// (committed after its hold had expired) or 'duplicate' (committed before: nothing changed).
/// Expiries are set when a key is new: every write goes to the AOF. A count above 1 means the
/// key was there before, with its expiry (every writer sets one), so only a first count looks.
const SETTLE: &str = r"
local mode = ARGV[1]
local k = 1
if string.find(mode, 'c', 1, true) then
  if ARGV[3] ~= '' then redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4]) end
  if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
  k = 3
end
local out = 'ok'
if string.find(mode, 'b', 1, true) then
  local id = ARGV[5]
  local held = redis.call('ZREM', KEYS[k + 2], id)
  redis.call('ZREM', KEYS[k + 3], id)
  local subject = string.find(mode, 's', 1, true)
  if subject then redis.call('ZREM', KEYS[k + 7], id) end
  if ARGV[6] == '1' then
    if not redis.call('SET', KEYS[k + 4], '1', 'NX', 'PX', ARGV[12]) then return 'duplicate' end
    if subject then
      if redis.call('INCR', KEYS[k + 6]) == 1 then redis.call('PEXPIRE', KEYS[k + 6], ARGV[8]) end
      local calls = tonumber(redis.call('ZINCRBY', KEYS[k + 8], 1, ARGV[14]))
      if calls == 1 and redis.call('PTTL', KEYS[k + 8]) < 0 then redis.call('PEXPIRE', KEYS[k + 8], ARGV[8]) end
    end
    if redis.call('INCR', KEYS[k]) == 1 then redis.call('PEXPIRE', KEYS[k], ARGV[8]) end
    if redis.call('INCR', KEYS[k + 1]) == 1 then redis.call('PEXPIRE', KEYS[k + 1], ARGV[9]) end
    local billed = redis.call('HINCRBY', KEYS[k + 5], ARGV[10], 1)
    if ARGV[13] ~= '' then redis.call('HINCRBY', KEYS[k + 5], ARGV[13], 1) end
    if ARGV[15] ~= '' then redis.call('HINCRBY', KEYS[k + 5], ARGV[15], 1) end
    if billed == 1 and redis.call('PTTL', KEYS[k + 5]) < 0 then redis.call('PEXPIRE', KEYS[k + 5], ARGV[11]) end
    if held == 0 and ARGV[7] == '1' then out = 'late' end
  end
end
return out
";

/// Add ARGV[1] (may be negative) to the day, the month and the usage history, never below
/// zero. KEYS: day, month, usage. ARGV: delta, day ttl ms, month ttl ms, usage field, usage ttl
/// ms. Returns {day, month}.
const ADJUST: &str = r"
local out = {}
local ttls = {ARGV[2], ARGV[3]}
for i = 1, 2 do
  local v = math.max(0, tonumber(redis.call('GET', KEYS[i]) or '0') + tonumber(ARGV[1]))
  redis.call('SET', KEYS[i], v, 'PX', ttls[i])
  out[i] = v
end
local b = math.max(0, tonumber(redis.call('HGET', KEYS[3], ARGV[4]) or '0') + tonumber(ARGV[1]))
redis.call('HSET', KEYS[3], ARGV[4], b)
if redis.call('PTTL', KEYS[3]) < 0 then redis.call('PEXPIRE', KEYS[3], ARGV[5]) end
return out
";

/// How long a hold outlives the longest call: its commit comes right after the call ends, so a
/// few seconds cover it; a replica that died mid-call gives its hold back this long after.
const HOLD_MARGIN: Duration = Duration::from_secs(5);
/// How long the usage history is kept: 14 months, so that 400 days are always there.
const USAGE_TTL: Duration = Duration::from_secs(14 * 31 * 86_400);
/// After a connection attempt fails, requests fail fast for this long instead of each waiting
/// for another attempt.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// When every command has timed out for this long, the connections are dropped and made again.
/// A connection whose peer went away without a word (a host that died, a network that drops
/// packets, a load balancer that moved) never fails on its own: commands only time out, and
/// the kernel gives up on it after many minutes. A new connection reaches whatever now answers
/// at the address, or fails at once.
const STALLED_FOR: Duration = Duration::from_secs(1);
/// A host clock this far from the store's is said in the log.
const CLOCK_WARNING: Duration = Duration::from_secs(1);
/// Another deployment noted in the prefix's list within this long shares the prefix.
const NEIGHBOUR_SEEN: Duration = Duration::from_secs(60);
/// A deployment not noted for this long is dropped from the list.
const NEIGHBOUR_FORGOTTEN: Duration = Duration::from_secs(86_400);
/// How long a failed commit is retried (with the same hold id, so it can count only once).
const SETTLE_RETRY_FOR: Duration = Duration::from_secs(600);

/// The socket options of every store connection. `TCP_NODELAY`: one connection carries every
/// request's commands at once, and with Nagle's algorithm a command written while another is
/// unanswered waits for that answer's acknowledgement before it is sent.
fn tcp_settings() -> ::redis::io::tcp::TcpSettings {
    ::redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// What is sent to the store: a script (loaded first if the server does not know it) or one
/// command.
enum Request<'a> {
    Script(&'a ::redis::ScriptInvocation<'a>),
    Cmd(&'a Cmd),
    Pipe(&'a Pipeline),
}

/// One multiplexed connection to a single Redis, or the cluster client: both reconnect by
/// themselves.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

struct Inner {
    cfg: StoreConfig,
    calendar: Calendar,
    /// One connection per runtime that talks to the store (the proxy's, the admin's, the
    /// maintenance task's).
    conns: RwLock<HashMap<tokio::runtime::Id, Conn>>,
    connecting: tokio::sync::Mutex<()>,
    failed_at: Mutex<Option<Instant>>,
    /// Since when every command has timed out (none answered since): see `STALLED_FOR`.
    stalled_since: Mutex<Option<Instant>>,
    rate: Script,
    claim: Script,
    settle: Script,
    adjust: Script,
    /// Leases of rate cells, by quota key.
    leases: Mutex<HashMap<String, Arc<LeaseSlot>>>,
    /// How long a hold lives without its commit: longer than the longest call.
    hold_ttl: Duration,
    /// How long the image lock lives: just above the longest call.
    lock_ttl: Duration,
    /// Cache hits and refusals not yet written: (tenant, day, what) → count.
    noted: Mutex<HashMap<(String, String, Noted), u64>>,
    /// What the store last said of its eviction policy.
    eviction: Mutex<Option<Eviction>>,
    /// Redis's clock minus this host's, in milliseconds, as last measured: the fleet's days and
    /// months are told by Redis's clock.
    clock_offset_ms: AtomicI64,
    /// Whether the offset was last said to be too large.
    clock_warned: AtomicBool,
    /// Set once the store has answered a clock measurement.
    clock_asked: tokio::sync::OnceCell<()>,
    metrics: StoreMetrics,
}

#[derive(Clone)]
struct StoreMetrics {
    duration: prometheus::HistogramVec,
    errors: prometheus::IntCounterVec,
    up: prometheus::IntGauge,
    may_evict: prometheus::IntGauge,
    clock_offset: prometheus::Gauge,
    fallbacks: prometheus::IntCounterVec,
    late: prometheus::IntCounter,
    settles_pending: prometheus::IntGauge,
    prefix_shared: prometheus::IntGauge,
}

#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

/// Why a claim did not go.
enum Refused {
    Exhausted(&'static str),
    Store(StoreError),
    /// The shared verdict is not one this replica can serve (its raw value).
    Unreadable(String),
}

impl From<StoreError> for Refused {
    fn from(e: StoreError) -> Self {
        Refused::Store(e)
    }
}

impl RedisStore {
    /// A store for `cfg`; nothing connects until the first command. `longest_call` bounds how
    /// long a hold or a lock can be needed.
    pub fn new(
        cfg: StoreConfig,
        longest_call: Duration,
        calendar: Calendar,
        metrics: &Metrics,
    ) -> RedisStore {
        // Not known until the store is asked (`check_eviction`).
        metrics.store_may_evict.set(-1);
        RedisStore {
            inner: Arc::new(Inner {
                cfg,
                calendar,
                conns: RwLock::new(HashMap::new()),
                connecting: tokio::sync::Mutex::new(()),
                failed_at: Mutex::new(None),
                stalled_since: Mutex::new(None),
                rate: Script::new(RATE),
                claim: Script::new(CLAIM),
                settle: Script::new(SETTLE),
                adjust: Script::new(ADJUST),
                leases: Mutex::new(HashMap::new()),
                hold_ttl: longest_call + HOLD_MARGIN,
                lock_ttl: super::lock_ttl(longest_call),
                noted: Mutex::new(HashMap::new()),
                eviction: Mutex::new(None),
                clock_offset_ms: AtomicI64::new(0),
                clock_warned: AtomicBool::new(false),
                clock_asked: tokio::sync::OnceCell::new(),
                metrics: StoreMetrics {
                    duration: metrics.store_duration.clone(),
                    errors: metrics.store_errors.clone(),
                    up: metrics.store_up.clone(),
                    may_evict: metrics.store_may_evict.clone(),
                    clock_offset: metrics.store_clock_offset.clone(),
                    fallbacks: metrics.store_fallbacks.clone(),
                    late: metrics.late_commits.clone(),
                    settles_pending: metrics.store_settles_pending.clone(),
                    prefix_shared: metrics.store_prefix_shared.clone(),
                },
            }),
        }
    }

    /// Count what was done instead while the store was down.
    pub fn fell_back(&self, what: &str) {
        self.inner
            .metrics
            .fallbacks
            .with_label_values(&[what])
            .inc();
    }

    /// Take one request from a GCRA quota kept in Redis (`key` names it: a tenant, or the global
    /// pace). Answers what the local `governor` limiter would, for the same quota.
    pub async fn rate(
        &self,
        key: RateKey<'_>,
        rate: Rate,
        burst: u32,
    ) -> Result<RateDecision, StoreError> {
        let i = &self.inner;
        let interval_us = u64::try_from(rate.interval().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let redis_key = match key {
            RateKey::Tenant(t) => i.tenant_key(t, "rate"),
            RateKey::Subject(t, s) => i.tenant_key(t, &format!("s:{s}:rate")),
            RateKey::Pace => format!("{}:{{global}}:pace", i.cfg.key_prefix),
        };
        // A subject's few requests go one by one: a lease per subject would only pile up.
        let wanted = match key {
            RateKey::Subject(..) => 1,
            _ => lease_size(burst),
        };
        if wanted == 1 {
            let (granted, remaining, wait) =
                self.take_cells(&redis_key, interval_us, burst, 1).await?;
            return Ok(crate::limits::decide(
                rate,
                burst,
                granted > 0,
                remaining,
                wait,
            ));
        }
        let slot = {
            let mut leases = i.leases.lock().unwrap_or_else(|p| p.into_inner());
            match leases.get(&redis_key) {
                Some(slot) => slot.clone(),
                None => leases.entry(redis_key.clone()).or_default().clone(),
            }
        };
        let take = |now| {
            slot.lease
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(now)
        };
        if let Some(remaining) = take(Instant::now()) {
            // Half used: fetch the next lease now, so that no request waits for it.
            let left = slot.lease.lock().unwrap_or_else(|p| p.into_inner()).left;
            if left <= wanted / 2 && !slot.topping_up.swap(true, Ordering::AcqRel) {
                let (store, slot, key) = (self.clone(), slot.clone(), redis_key.clone());
                tokio::spawn(async move {
                    let fetched = store.take_cells(&key, interval_us, burst, wanted).await;
                    let mut lease = slot.lease.lock().unwrap_or_else(|p| p.into_inner());
                    if let Ok((granted, remaining, _)) = fetched {
                        lease.left += granted;
                        lease.remaining = remaining;
                        lease.until = Some(Instant::now() + LEASE_TTL);
                    }
                    slot.topping_up.store(false, Ordering::Release);
                });
            }
            return Ok(crate::limits::decide(
                rate,
                burst,
                true,
                remaining,
                Duration::ZERO,
            ));
        }
        let _refilling = slot.refill.lock().await;
        // Another request may have refilled it while this one waited.
        let now = Instant::now();
        if let Some(remaining) = take(now) {
            return Ok(crate::limits::decide(
                rate,
                burst,
                true,
                remaining,
                Duration::ZERO,
            ));
        }
        let failed = slot
            .lease
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed_until
            .is_some_and(|u| now < u);
        if failed {
            return Err(StoreError("the store did not answer the last lease".into()));
        }
        let fetched = self
            .take_cells(&redis_key, interval_us, burst, wanted)
            .await;
        let mut lease = slot.lease.lock().unwrap_or_else(|p| p.into_inner());
        let (granted, remaining, wait) = match fetched {
            Ok(r) => r,
            Err(e) => {
                lease.failed_until = Some(Instant::now() + RECONNECT_PAUSE);
                return Err(e);
            }
        };
        *lease = Lease {
            left: granted.saturating_sub(1),
            remaining,
            until: Some(Instant::now() + LEASE_TTL),
            failed_until: None,
        };
        Ok(crate::limits::decide(
            rate,
            burst,
            granted > 0,
            remaining + lease.left,
            wait,
        ))
    }

    /// Up to `wanted` cells of a quota: (granted, remaining burst, wait when none).
    async fn take_cells(
        &self,
        key: &str,
        interval_us: u64,
        burst: u32,
        wanted: u32,
    ) -> Result<(u32, u32, Duration), StoreError> {
        let mut inv = self.inner.rate.key(key);
        inv.arg(interval_us).arg(burst.max(1)).arg(wanted);
        let (granted, remaining, wait_us): (i64, i64, i64) = self.inner.run("rate", &inv).await?;
        Ok((
            u32::try_from(granted).unwrap_or(0),
            u32::try_from(remaining).unwrap_or(0),
            Duration::from_micros(u64::try_from(wait_us).unwrap_or(0)),
        ))
    }

    /// The keys of a hold's periods: day, month, their holds, the commit log, the usage month.
    fn budget_keys(&self, h: &Hold) -> [String; 6] {
        let i = &self.inner;
        let t = &h.tenant;
        [
            i.tenant_key(t, &format!("day:{}", h.periods.day)),
            i.tenant_key(t, &format!("month:{}", h.periods.month)),
            i.tenant_key(t, &format!("holds:day:{}", h.periods.day)),
            i.tenant_key(t, &format!("holds:month:{}", h.periods.month)),
            i.tenant_key(t, &format!("done:{}", h.id)),
            i.tenant_key(t, &format!("usage:{}", h.periods.month)),
        ]
    }

    /// The keys of a hold's subject (in the tenant's hash slot): its day, its holds of the day,
    /// and the tenant's subjects of the day.
    fn subject_keys(&self, h: &Hold) -> Option<[String; 3]> {
        let i = &self.inner;
        let (name, _) = h.subject.as_ref()?;
        let day = &h.periods.day;
        Some([
            i.tenant_key(&h.tenant, &format!("s:{name}:day:{day}")),
            i.tenant_key(&h.tenant, &format!("s:{name}:holds:day:{day}")),
            i.tenant_key(&h.tenant, &format!("subjects:{day}")),
        ])
    }

    /// Whether the cache part and the budget part must go in two calls: on a cluster, when the
    /// cache is shared, its keys live in another slot than the tenant's.
    fn split(&self, h: &Hold) -> bool {
        self.inner.cfg.cluster && h.shared.as_ref().is_some_and(|k| k.tenant.is_none())
    }

    /// A claim the store could not answer: fail closed for a tenant with a budget, call on this
    /// replica's own for one without.
    fn unavailable(&self, h: &Hold, e: &StoreError) -> Result<Claim, GatewayError> {
        // The script may have run although its answer was lost: give back what it took.
        self.abandon(h);
        if h.has_budget() {
            warn_throttled!(tenant = %h.tenant, "budget refused: {e}");
            self.fell_back("budget_refused");
            Err(GatewayError::StoreUnavailable {
                retry_after_secs: 2,
            })
        } else {
            warn_throttled!(tenant = %h.tenant, "the shared cache is unreachable, this replica calls on its own: {e}");
            self.fell_back("cache");
            self.fell_back("unbudgeted_served");
            Ok(Claim::Go)
        }
    }

    /// One claim script call; `unreadable`: a shared value found unreadable before, to replace.
    async fn claim_once(
        &self,
        h: &Hold,
        cache: bool,
        budget: bool,
        unreadable: Option<&str>,
    ) -> Result<Claim, Refused> {
        let i = &self.inner;
        let mut mode = String::new();
        let mut keys: Vec<String> = Vec::new();
        if let (true, Some(k)) = (cache, &h.shared) {
            mode.push('c');
            keys.extend(i.cache_keys(k));
            if unreadable.is_some() {
                mode.push('r');
            }
        }
        if budget {
            mode.push('b');
            keys.extend(self.budget_keys(h).into_iter().take(4));
            if let Some(sk) = self.subject_keys(h) {
                mode.push('s');
                keys.extend(sk.into_iter().take(2));
            }
        }
        let mut inv = i.claim.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        let limit = |l: Option<u64>| l.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
        let holds_ttl = Duration::from_secs(i.calendar.secs_to_next_month(h.taken)) + i.hold_ttl;
        inv.arg(&mode)
            .arg(&h.id)
            .arg(millis(i.lock_ttl))
            .arg(&h.id)
            .arg(millis(i.hold_ttl))
            .arg(limit(h.limits.daily))
            .arg(limit(h.limits.monthly))
            .arg(millis(holds_ttl))
            .arg(limit(h.subject.as_ref().map(|(_, n)| *n)))
            .arg(unreadable.unwrap_or(""));
        let mut reply: Vec<String> = i.run("claim", &inv).await?;
        match reply.first().map(String::as_str) {
            Some("go") => Ok(Claim::Go),
            Some("hit") if reply.len() == 2 => {
                let raw = reply.swap_remove(1);
                match SharedVerdict::read(&raw) {
                    Some((exchange, created_ms)) => Ok(Claim::Hit(exchange, created_ms)),
                    None => Err(Refused::Unreadable(raw)),
                }
            }
            Some("wait") => {
                let left = reply
                    .get(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                Ok(Claim::Wait(Duration::from_millis(left)))
            }
            Some("exhausted") if reply.get(1).is_some_and(|p| p == "monthly") => {
                Err(Refused::Exhausted("monthly"))
            }
            Some("exhausted") if reply.get(1).is_some_and(|p| p == "subject") => {
                Err(Refused::Exhausted("subject"))
            }
            Some("exhausted") => Err(Refused::Exhausted("daily")),
            _ => Err(StoreError(format!("unexpected claim reply {reply:?}")).into()),
        }
    }

    async fn settle_once(
        &self,
        h: &Hold,
        cache: Option<Option<(&str, Duration)>>,
        budget: Option<&Settle>,
    ) -> Result<String, StoreError> {
        let i = &self.inner;
        let mut mode = String::new();
        let mut keys: Vec<String> = Vec::new();
        if let (Some(_), Some(k)) = (&cache, &h.shared) {
            mode.push('c');
            keys.extend(i.cache_keys(k));
        }
        if budget.is_some() {
            mode.push('b');
            keys.extend(self.budget_keys(h));
            if let Some(sk) = self.subject_keys(h) {
                mode.push('s');
                keys.extend(sk);
            }
        }
        if mode.is_empty() {
            return Ok("ok".into());
        }
        let mut inv = i.settle.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        let (value, ttl) = cache.flatten().unwrap_or(("", Duration::ZERO));
        let (org_key, uncertain) = match budget {
            Some(Settle::Commit { org_key, uncertain }) => (Some(org_key.as_str()), *uncertain),
            _ => (None, false),
        };
        let commit = org_key.is_some();
        // Counts stay two days past their period's end: a call settled just after midnight
        // still lands in the day it was reserved in.
        let grace = Duration::from_secs(2 * 86_400);
        let day_ttl = Duration::from_secs(self.inner.calendar.secs_to_next_day(h.taken)) + grace;
        let month_ttl =
            Duration::from_secs(self.inner.calendar.secs_to_next_month(h.taken)) + grace;
        let field = format!("{}:b", &h.periods.day[8..]);
        inv.arg(&mode)
            .arg(&h.id)
            .arg(value)
            .arg(millis(ttl).max(1))
            .arg(&h.id)
            .arg(if commit { "1" } else { "0" })
            .arg(if h.has_budget() { "1" } else { "0" })
            .arg(millis(day_ttl))
            .arg(millis(month_ttl))
            .arg(field)
            .arg(millis(USAGE_TTL))
            .arg(millis(SETTLE_RETRY_FOR + i.hold_ttl))
            .arg(org_key.map_or(String::new(), |id| {
                format!("{}:b:{id}", &h.periods.day[8..])
            }))
            .arg(h.subject.as_ref().map_or("", |(name, _)| name.as_str()))
            .arg(match org_key {
                Some(id) if uncertain => format!("{}:u:{id}", &h.periods.day[8..]),
                _ => String::new(),
            });
        i.run("settle", &inv).await
    }

    /// One settlement: one script, or two on a cluster where the shared cache scope's keys live
    /// in another slot than the tenant's.
    async fn settle_all(
        &self,
        h: &Hold,
        how: &Settle,
        value: Option<&(String, Duration)>,
    ) -> Result<String, StoreError> {
        let cache = h
            .shared
            .as_ref()
            .map(|_| value.map(|(s, ttl)| (s.as_str(), *ttl)));
        // Usage history counts every billable call; a hold is released only where one was taken.
        let budget = match how {
            Settle::Release if !h.has_budget() => None,
            _ => Some(how),
        };
        if self.split(h) {
            self.settle_once(h, cache, None).await?;
            self.settle_once(h, None, budget).await
        } else {
            self.settle_once(h, cache, budget).await
        }
    }

    /// Settle, and while the store cannot be reached keep trying, with the same hold id (every
    /// script is idempotent for it), rather than lose a commit. Runs in a task of its own.
    async fn settle_until_done(self, h: Hold, how: Settle, value: Option<(String, Duration)>) {
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match self.settle_all(&h, &how, value.as_ref()).await {
                Ok(reply) => return self.settled(&h, &reply),
                Err(e) if started.elapsed() >= SETTLE_RETRY_FOR => {
                    if matches!(how, Settle::Commit { .. }) {
                        self.fell_back("usage_unrecorded");
                        tracing::error!(tenant = %h.tenant, "a billable call could not be recorded in the store within {}: {e}", humantime::format_duration(SETTLE_RETRY_FOR));
                    }
                    return;
                }
                Err(e) => {
                    if pause == Duration::from_millis(100) {
                        warn_throttled!(tenant = %h.tenant, "cannot settle a call in the store, retrying: {e}");
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn settled(&self, h: &Hold, reply: &str) {
        if reply == "late" {
            self.inner.metrics.late.inc();
            tracing::warn!(tenant = %h.tenant, "a call was committed after its budget hold had expired; it is counted all the same");
        }
    }

    /// Ask the store whether it may evict keys (`INFO memory`), set `store_may_evict`, and say
    /// so in the log when the answer changes. A store that cannot be asked now (down, slow) is
    /// left as it was: `store_up` says that. A refusal (an ACL without `INFO`) is an answer.
    pub async fn check_eviction(&self) {
        let i = &self.inner;
        let Some(found) = self.ask_eviction().await else {
            return;
        };
        let mut last = i.eviction.lock().unwrap_or_else(|p| p.into_inner());
        // Said before the gauge moves: whoever sees the gauge finds the line.
        match &found {
            _ if last.as_ref() == Some(&found) => {}
            Eviction::May { policy, maxmemory } => tracing::warn!(
                policy = %policy,
                maxmemory,
                "the store may evict keys when its memory is full: budget counts, holds and locks could vanish and a budget be overshot; run Redis with maxmemory-policy noeviction"
            ),
            Eviction::Unknown(why) => tracing::warn!(
                "cannot tell whether the store may evict keys ({why}); run Redis with maxmemory-policy noeviction, and allow the gateway's user INFO to have it checked"
            ),
            Eviction::Never if last.is_some() => {
                tracing::info!("the store evicts no keys (noeviction, or no maxmemory)")
            }
            Eviction::Never => {}
        }
        i.metrics.may_evict.set(found.gauge());
        *last = Some(found);
    }

    /// What `INFO memory` says of eviction; `None` when the store cannot be asked now (down,
    /// slow). A refusal (an ACL without `INFO`) is an answer: not known.
    async fn ask_eviction(&self) -> Option<Eviction> {
        let i = &self.inner;
        let mut conn = i.connection().await.ok()?;
        let mut c = ::redis::cmd("INFO");
        c.arg("memory");
        match tokio::time::timeout(i.cfg.timeout, c.query_async::<Value>(&mut conn)).await {
            Ok(Ok(answer)) => Some(Eviction::from_answer(&answer)),
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    ::redis::ErrorKind::Server(_) | ::redis::ErrorKind::Extension
                ) =>
            {
                Some(Eviction::Unknown(format!("INFO memory refused: {e}")))
            }
            _ => None,
        }
    }

    /// Note this deployment's provider endpoint in the prefix's list, and say when another
    /// deployment, with another endpoint, uses the same key prefix on this Redis: budgets,
    /// rate limits and the usage history are then shared with it (verdicts are not, see
    /// `UpstreamConfig::fingerprint`). An endpoint noted in the last minute counts; the list
    /// forgets one after a day. Sets `store_prefix_shared`.
    pub async fn check_neighbours(&self, fingerprint: &str, endpoint: &str) {
        let i = &self.inner;
        let key = i.deployments_key();
        let now = self.now().timestamp_millis();
        let mut p = ::redis::pipe();
        p.hset(&key, fingerprint, format!("{now} {endpoint}"))
            .ignore()
            .pexpire(&key, NEIGHBOUR_FORGOTTEN.as_millis() as i64)
            .ignore()
            .hgetall(&key);
        let Ok((all,)): Result<(HashMap<String, String>,), _> =
            i.send("check", Request::Pipe(&p)).await
        else {
            return;
        };
        let (others, stale) = neighbours(&all, fingerprint, now);
        if !stale.is_empty() {
            let mut c = ::redis::cmd("HDEL");
            c.arg(&key).arg(&stale);
            let _: Result<i64, _> = i.run_cmd("check", &c).await;
        }
        // Said before the gauge moves: whoever sees the gauge finds the line.
        let before = i.metrics.prefix_shared.get();
        if !others.is_empty() && before == 0 {
            tracing::warn!(prefix = %i.cfg.key_prefix, others = ?others, "another deployment, with another provider endpoint, uses this key prefix on this Redis: budgets, rate limits and usage history are shared with it (verdicts are not); give each deployment its own store.key_prefix or Redis database");
        } else if others.is_empty() && before > 0 {
            tracing::info!(prefix = %i.cfg.key_prefix, "no other deployment uses this key prefix any more");
        }
        i.metrics.prefix_shared.set(others.len() as i64);
    }

    /// What `check-config` finds out about the store before a deployment relies on it, as
    /// warnings: whether it answers, may evict keys, keeps an append-only file (without one a
    /// restart loses every count), and whether another deployment writes under this key prefix.
    /// Writes nothing.
    pub async fn probe(&self, fingerprint: &str) -> Vec<String> {
        let i = &self.inner;
        if let Err(e) = self.ping().await {
            return vec![format!(
                "it does not answer ({e}): tenants with a budget would get 503 store_unavailable until it does"
            )];
        }
        let mut found = Vec::new();
        match self.ask_eviction().await {
            Some(Eviction::May { policy, maxmemory }) => found.push(format!(
                "it may evict keys when its memory ({maxmemory} bytes) is full (maxmemory-policy {policy}): budget counts, holds and locks could vanish; run it with noeviction"
            )),
            Some(Eviction::Unknown(why)) => found.push(format!(
                "cannot tell whether it may evict keys ({why})"
            )),
            _ => {}
        }
        let mut info = ::redis::cmd("INFO");
        info.arg("persistence");
        match i.run_cmd::<Value>("check", &info).await {
            Ok(answer) if super::eviction::texts(&answer).iter().any(|t| t.contains("aof_enabled:0")) => {
                found.push("it keeps no append-only file (appendonly no): a restart of Redis loses every budget count and hold; run it with appendonly yes".into())
            }
            Ok(_) => {}
            Err(e) => found.push(format!("cannot read its persistence settings ({e})")),
        }
        let mut all = ::redis::cmd("HGETALL");
        all.arg(i.deployments_key());
        if let Ok(all) = i.run_cmd::<HashMap<String, String>>("check", &all).await {
            let (others, _) = neighbours(&all, fingerprint, self.now().timestamp_millis());
            if !others.is_empty() {
                found.push(format!(
                    "another deployment, with another provider endpoint ({}), writes under the key prefix {:?}: budgets, rate limits and usage history would be shared with it; give each deployment its own store.key_prefix or Redis database",
                    others.join(", "),
                    i.cfg.key_prefix
                ));
            }
        }
        found
    }

    /// Check the store answers (for `store_up` when no request does), and measure its clock
    /// against this host's: `TIME`, timed on both sides, the store's time taken as read halfway
    /// through the round trip. A clock more than `CLOCK_WARNING` away is said once in the log
    /// (and when it is back); the fleet's days and months follow the store's clock either way.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let i = &self.inner;
        let before = Utc::now();
        let (secs, micros): (i64, i64) = i.run_cmd("usage", &::redis::cmd("TIME")).await?;
        let after = Utc::now();
        let _ = i.clock_asked.set(());
        let rtt = (after - before).num_milliseconds();
        // A slow answer says little about when the store read its clock.
        if rtt > 50 {
            return Ok(());
        }
        let local_mid = before.timestamp_millis() + rtt / 2;
        let offset = secs * 1000 + micros / 1000 - local_mid;
        i.clock_offset_ms.store(offset, Ordering::Relaxed);
        let far = offset.unsigned_abs() > CLOCK_WARNING.as_millis() as u64;
        if far != i.clock_warned.swap(far, Ordering::Relaxed) {
            if far {
                tracing::warn!(offset_ms = offset, "this host's clock is {:.1} s from the store's: budget days and months follow the store's clock, the logs and app tokens' exp and nbf this host's; check its time sync", offset as f64 / 1000.0);
            } else {
                tracing::info!(
                    offset_ms = offset,
                    "this host's clock agrees with the store's again"
                );
            }
        }
        // Set once the line is written: whoever sees the gauge finds the line.
        i.metrics.clock_offset.set(offset as f64 / 1000.0);
        Ok(())
    }
}

/// The prefix's list of deployments (provider endpoint fingerprint → "<ms noted> <endpoint>"),
/// read at `now`: the other endpoints noted within `NEIGHBOUR_SEEN` (sorted), and the
/// fingerprints not noted for `NEIGHBOUR_FORGOTTEN`.
fn neighbours<'a>(
    all: &'a HashMap<String, String>,
    fingerprint: &str,
    now: i64,
) -> (Vec<&'a str>, Vec<&'a str>) {
    let seen_since = now - NEIGHBOUR_SEEN.as_millis() as i64;
    let forgotten = now - NEIGHBOUR_FORGOTTEN.as_millis() as i64;
    let mut others = Vec::new();
    let mut stale = Vec::new();
    for (fp, v) in all {
        let (at, url) = v.split_once(' ').unwrap_or((v, ""));
        let at: i64 = at.parse().unwrap_or(0);
        if at < forgotten {
            stale.push(fp.as_str());
        } else if fp != fingerprint && at >= seen_since {
            others.push(url);
        }
    }
    others.sort_unstable();
    (others, stale)
}

/// Which GCRA state a rate check uses.
#[derive(Debug, Clone, Copy)]
pub enum RateKey<'a> {
    Tenant(&'a str),
    /// A tenant's subject (its hash): in the tenant's hash slot.
    Subject(&'a str, &'a str),
    Pace,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Inner {
    fn tenant_key(&self, tenant: &str, rest: &str) -> String {
        format!("{}:{{t:{tenant}}}:{rest}", self.cfg.key_prefix)
    }

    /// The prefix's list of the deployments that write under it (see `check_neighbours`).
    fn deployments_key(&self) -> String {
        format!("{}:{{deployments}}", self.cfg.key_prefix)
    }

    fn cache_keys(&self, k: &SharedKey) -> [String; 2] {
        let (d, u) = (&k.digest_hex, &k.upstream);
        match &k.tenant {
            Some(t) => [
                self.tenant_key(t, &format!("v:{u}:{d}")),
                self.tenant_key(t, &format!("lock:{u}:{d}")),
            ],
            None => [
                format!("{}:{{v:{u}:{d}}}:v", self.cfg.key_prefix),
                format!("{}:{{v:{u}:{d}}}:lock", self.cfg.key_prefix),
            ],
        }
    }

    async fn connection(&self) -> Result<Conn, StoreError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| StoreError("the store is used outside a runtime".into()))?
            .id();
        let known = || {
            self.conns
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&runtime)
                .cloned()
        };
        if let Some(c) = known() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = known() {
            return Ok(c);
        }
        let recent = self
            .failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < RECONNECT_PAUSE);
        if recent {
            return Err(StoreError("the store is unreachable".into()));
        }
        let started = Instant::now();
        let made = tokio::time::timeout(self.cfg.connect_timeout * 2, self.connect()).await;
        self.metrics
            .duration
            .with_label_values(&["connect"])
            .observe(started.elapsed().as_secs_f64());
        let conn = match made {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(self.failed_connect(e.to_string())),
            Err(_) => return Err(self.failed_connect("connection timed out".into())),
        };
        *self.failed_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.conns
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(runtime, conn.clone());
        tracing::info!("connected to the store");
        Ok(conn)
    }

    /// Drop every runtime's connection: the next command connects again. A connection stays
    /// with the node it reached: after a failover (the demoted primary answers READONLY) or a
    /// peer that went silent, only a new one, through the name or address that now leads to the
    /// primary, can answer again.
    fn forget_connections(&self, why: &str) {
        let mut conns = self.conns.write().unwrap_or_else(|p| p.into_inner());
        if !conns.is_empty() {
            conns.clear();
            tracing::warn!("{why}: connecting to the store again");
        }
    }

    fn failed_connect(&self, why: String) -> StoreError {
        *self.failed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.metrics.errors.with_label_values(&["connect"]).inc();
        self.metrics.up.set(0);
        // redis-rs errors name the host, never the password.
        StoreError(format!("cannot connect to the store: {why}"))
    }

    async fn connect(&self) -> ::redis::RedisResult<Conn> {
        let (t, ct) = (self.cfg.timeout, self.cfg.connect_timeout);
        let certs = self.tls_roots().await?;
        if self.cfg.cluster {
            let mut builder = ::redis::cluster::ClusterClientBuilder::new(self.cfg.urls.clone())
                .tcp_settings(tcp_settings())
                .connection_timeout(ct)
                .response_timeout(t)
                // A command is never sent twice on its own: a timed-out script may have run.
                .retries(0);
            if let Some(c) = certs {
                builder = builder.certs(c);
            }
            Ok(Conn::Cluster(
                builder.build()?.get_async_connection().await?,
            ))
        } else {
            let url = self.cfg.urls.first().cloned().unwrap_or_default();
            let info = url
                .as_str()
                .into_connection_info()?
                .set_tcp_settings(tcp_settings());
            let client = match certs {
                Some(c) => ::redis::Client::build_with_tls(info, c)?,
                None => ::redis::Client::open(info)?,
            };
            let cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(ct))
                .set_response_timeout(Some(t))
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_millis(500));
            Ok(Conn::Single(
                ConnectionManager::new_with_config(client, cfg).await?,
            ))
        }
    }

    /// The CA to trust for `rediss://` instead of the public roots, read at each connection so
    /// that a rotated file is taken by the next one.
    async fn tls_roots(&self) -> ::redis::RedisResult<Option<::redis::TlsCertificates>> {
        let Some(path) = &self.cfg.ca_file else {
            return Ok(None);
        };
        let pem = tokio::fs::read(path).await.map_err(|e| {
            ::redis::RedisError::from((
                ::redis::ErrorKind::InvalidClientConfig,
                "cannot read store.ca_file",
                format!("{}: {e}", path.display()),
            ))
        })?;
        Ok(Some(::redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        }))
    }

    /// Run a script within the command timeout, timing and counting it.
    async fn run<T: ::redis::FromRedisValue>(
        &self,
        op: &'static str,
        inv: &::redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.send(op, Request::Script(inv)).await
    }

    async fn run_cmd<T: ::redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &Cmd,
    ) -> Result<T, StoreError> {
        self.send(op, Request::Cmd(cmd)).await
    }

    async fn send<T: ::redis::FromRedisValue>(
        &self,
        op: &'static str,
        req: Request<'_>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let mut r = self.send_once(&req).await?;
        // READONLY: the node was demoted to a replica (a failover), and nothing was written (a
        // script stops at its first write). Sent once more on a new connection, which reaches
        // the new primary through the same address.
        if matches!(&r, Ok(Err(e)) if e.code() == Some("READONLY")) {
            self.forget_connections("the store answered READONLY (a primary demoted to replica)");
            r = self.send_once(&req).await?;
        }
        self.finish(op, started, r)
    }

    async fn send_once<T: ::redis::FromRedisValue>(
        &self,
        req: &Request<'_>,
    ) -> Result<Result<::redis::RedisResult<T>, tokio::time::error::Elapsed>, StoreError> {
        let mut conn = self.connection().await?;
        let t = self.cfg.timeout;
        Ok(match req {
            // A script unknown to the server costs a SCRIPT LOAD and a second EVALSHA.
            Request::Script(inv) => tokio::time::timeout(t * 3, inv.invoke_async(&mut conn)).await,
            Request::Cmd(cmd) => tokio::time::timeout(t, cmd.query_async(&mut conn)).await,
            Request::Pipe(p) => tokio::time::timeout(t, p.query_async(&mut conn)).await,
        })
    }

    fn finish<T>(
        &self,
        op: &'static str,
        started: Instant,
        r: Result<::redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        self.metrics
            .duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        let mut stalled = self.stalled_since.lock().unwrap_or_else(|p| p.into_inner());
        let err = match r {
            Ok(Ok(v)) => {
                *stalled = None;
                self.metrics.up.set(1);
                return Ok(v);
            }
            Ok(Err(e)) if !e.is_timeout() => {
                *stalled = None;
                e.to_string()
            }
            // No answer in time (the client's response timeout, or ours around a script that
            // may load itself first).
            _ => {
                let since = *stalled.get_or_insert_with(Instant::now);
                if since.elapsed() >= STALLED_FOR {
                    *stalled = None;
                    self.forget_connections("no command has been answered for a second");
                }
                format!(
                    "no answer within {}",
                    humantime::format_duration(self.cfg.timeout)
                )
            }
        };
        drop(stalled);
        self.metrics.errors.with_label_values(&[op]).inc();
        self.metrics.up.set(0);
        Err(StoreError(format!("store {op}: {err}")))
    }
}

#[async_trait]
impl Store for RedisStore {
    fn calendar(&self) -> Calendar {
        self.inner.calendar
    }

    fn now(&self) -> DateTime<Utc> {
        Utc::now()
            + chrono::Duration::milliseconds(self.inner.clock_offset_ms.load(Ordering::Relaxed))
    }

    async fn clock_known(&self) {
        // Until the store answers once, each request asks (they wait for one attempt at a
        // time); then never again here: the maintenance task keeps measuring it.
        let _ = self
            .inner
            .clock_asked
            .get_or_try_init(|| async { self.ping().await })
            .await;
    }

    async fn claim(&self, h: &Hold) -> Result<Claim, GatewayError> {
        let budget = h.has_budget();
        if !budget && h.shared.is_none() {
            return Ok(Claim::Go);
        }
        let mut unreadable: Option<String> = None;
        let result = loop {
            let found = unreadable.as_deref();
            let result = if self.split(h) && budget {
                match self.claim_once(h, true, false, found).await {
                    Ok(Claim::Go) => self.claim_once(h, false, true, None).await,
                    other => other,
                }
            } else {
                self.claim_once(h, true, budget, found).await
            };
            match result {
                // A value this replica cannot serve is not a reason to refuse the request: it
                // is replaced by this call's verdict, as on a miss. Once per claim: a second
                // unreadable value (another writer is at it) is a store fault.
                Err(Refused::Unreadable(raw)) if unreadable.is_none() => {
                    tracing::warn!(tenant = %h.tenant, bytes = raw.len(), "a shared verdict could not be read; this call replaces it");
                    self.fell_back("verdict_replaced");
                    unreadable = Some(raw);
                }
                other => break other,
            }
        };
        match result {
            Ok(c) => Ok(c),
            Err(Refused::Exhausted(period)) => {
                // The split path may hold the image's lock: give it back.
                if self.split(h) {
                    self.abandon(h);
                }
                let retry_after_secs = match period {
                    "monthly" => self.inner.calendar.secs_to_next_month(self.now()),
                    _ => self.inner.calendar.secs_to_next_day(self.now()),
                };
                if period == "subject" {
                    return Err(GatewayError::SubjectBudgetExhausted { retry_after_secs });
                }
                Err(GatewayError::BudgetExhausted {
                    period,
                    retry_after_secs,
                })
            }
            Err(Refused::Store(e)) => self.unavailable(h, &e),
            Err(Refused::Unreadable(_)) => {
                self.unavailable(h, &StoreError("a shared verdict could not be read".into()))
            }
        }
    }

    /// In the background: the answer does not wait for the round trip. Nothing can overshoot
    /// meanwhile (the hold counts until the commit replaces it), and a replica asking for the
    /// image waits on the lock until the verdict is stored.
    async fn settle(&self, h: &Hold, how: Settle, verdict: Option<(&SharedVerdict, Duration)>) {
        let value = verdict.and_then(|(v, ttl)| serde_json::to_string(v).ok().map(|s| (s, ttl)));
        let pending = GaugeGuard::new(&self.inner.metrics.settles_pending);
        let store = self.clone();
        let h = h.clone();
        tokio::spawn(async move {
            store.settle_until_done(h, how, value).await;
            drop(pending);
        });
    }

    fn abandon(&self, h: &Hold) {
        if !h.has_budget() && h.shared.is_none() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(
            self.clone()
                .settle_until_done(h.clone(), Settle::Release, None),
        );
    }

    async fn counts(&self, tenant: &str, now: DateTime<Utc>) -> Result<Counts, StoreError> {
        let p = self.inner.calendar.periods(now);
        let i = &self.inner;
        let mut cmd = ::redis::cmd("MGET");
        cmd.arg(i.tenant_key(tenant, &format!("day:{}", p.day)))
            .arg(i.tenant_key(tenant, &format!("month:{}", p.month)));
        let (d, m): (Option<u64>, Option<u64>) = i.run_cmd("counts", &cmd).await?;
        Ok(Counts {
            day: p.day,
            day_used: d.unwrap_or(0),
            month: p.month,
            month_used: m.unwrap_or(0),
        })
    }

    async fn history(
        &self,
        tenants: &[String],
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<DayUsage>, StoreError> {
        let i = &self.inner;
        let mut out = Vec::new();
        for tenant in tenants {
            let mut months: HashMap<String, HashMap<String, u64>> = HashMap::new();
            for d in super::days(from, to) {
                let month = format!("{:04}-{:02}", d.year(), d.month());
                if !months.contains_key(&month) {
                    let mut cmd = ::redis::cmd("HGETALL");
                    cmd.arg(i.tenant_key(tenant, &format!("usage:{month}")));
                    let fields: HashMap<String, u64> = i.run_cmd("history", &cmd).await?;
                    months.insert(month.clone(), fields);
                }
                let fields = &months[&month];
                let day_of = format!("{:02}", d.day());
                let get = |kind: &str| {
                    fields
                        .get(&format!("{day_of}:{kind}"))
                        .copied()
                        .unwrap_or(0)
                };
                let per_key = |kind: &str| -> std::collections::BTreeMap<String, u64> {
                    let prefix = format!("{day_of}:{kind}:");
                    fields
                        .iter()
                        .filter(|(_, n)| **n > 0)
                        .filter_map(|(f, n)| f.strip_prefix(&prefix).map(|id| (id.to_string(), *n)))
                        .collect()
                };
                let uncertain_by_key = per_key("u");
                out.push(DayUsage {
                    tenant: tenant.clone(),
                    day: d.format("%Y-%m-%d").to_string(),
                    billable: get("b"),
                    uncertain: uncertain_by_key.values().sum(),
                    cache_hits: get("h"),
                    rejected: get("r"),
                    billable_by_key: per_key("b"),
                    uncertain_by_key,
                });
            }
        }
        Ok(out)
    }

    fn note(&self, tenant: &str, what: Noted) {
        let day = self.inner.calendar.day(self.now());
        *self
            .inner
            .noted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((tenant.to_string(), day, what))
            .or_default() += 1;
    }

    /// Write the noted cache hits and refusals; what cannot be written is kept for the next try.
    async fn flush(&self) -> Result<(), StoreError> {
        let i = &self.inner;
        let batch: Vec<_> = std::mem::take(&mut *i.noted.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect();
        if batch.is_empty() {
            return self.ping().await;
        }
        let mut failed = None;
        let mut left = Vec::new();
        for ((tenant, day, what), n) in batch {
            if failed.is_some() {
                left.push(((tenant, day, what), n));
                continue;
            }
            let key = i.tenant_key(&tenant, &format!("usage:{}", &day[..7]));
            let kind = match what {
                Noted::CacheHit => "h",
                Noted::Rejected => "r",
            };
            let mut pipe = ::redis::pipe();
            pipe.atomic()
                .hincr(&key, format!("{}:{kind}", &day[8..]), n)
                .ignore()
                .pexpire(&key, i64::try_from(millis(USAGE_TTL)).unwrap_or(i64::MAX))
                .ignore();
            let mut conn = match i.connection().await {
                Ok(c) => c,
                Err(e) => {
                    failed = Some(e);
                    left.push(((tenant, day, what), n));
                    continue;
                }
            };
            let started = Instant::now();
            let r = tokio::time::timeout(i.cfg.timeout, pipe.query_async::<()>(&mut conn)).await;
            // A timed-out increment may have been applied: it is not retried (a count is
            // better lost than doubled).
            if let Err(e) = i.finish("usage", started, r) {
                failed = Some(e);
            }
        }
        if !left.is_empty() {
            let mut noted = i.noted.lock().unwrap_or_else(|p| p.into_inner());
            for (k, n) in left {
                *noted.entry(k).or_default() += n;
            }
        }
        failed.map_or(Ok(()), Err)
    }

    fn flush_at_exit(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn first_use(&self, scope: &str, id: &str, until_ms: i64) -> Result<bool, StoreError> {
        // The id is hashed: a key never holds what a client sent, and its length is fixed.
        let digest = blake3::hash(id.as_bytes()).to_hex();
        let key = format!("{}:{{j:{scope}}}:jti:{digest}", self.inner.cfg.key_prefix);
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(&key)
            .arg("1")
            .arg("NX")
            .arg("PXAT")
            .arg(until_ms.max(Utc::now().timestamp_millis() + 1000));
        let set: Option<String> = self.inner.run_cmd("replay", &cmd).await?;
        Ok(set.is_some())
    }

    async fn adjust(
        &self,
        tenant: &str,
        now: DateTime<Utc>,
        delta: i64,
    ) -> Result<Counts, StoreError> {
        let i = &self.inner;
        let p = self.inner.calendar.periods(now);
        let grace = Duration::from_secs(2 * 86_400);
        let mut inv = i.adjust.prepare_invoke();
        inv.key(i.tenant_key(tenant, &format!("day:{}", p.day)))
            .key(i.tenant_key(tenant, &format!("month:{}", p.month)))
            .key(i.tenant_key(tenant, &format!("usage:{}", p.month)))
            .arg(delta)
            .arg(millis(
                Duration::from_secs(i.calendar.secs_to_next_day(now)) + grace,
            ))
            .arg(millis(
                Duration::from_secs(i.calendar.secs_to_next_month(now)) + grace,
            ))
            .arg(format!("{}:b", &p.day[8..]))
            .arg(millis(USAGE_TTL));
        let (day_used, month_used): (u64, u64) = i.run("settle", &inv).await?;
        Ok(Counts {
            day: p.day,
            day_used,
            month: p.month,
            month_used,
        })
    }

    async fn top_subjects(
        &self,
        tenant: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let i = &self.inner;
        let day = i.calendar.day(now);
        let mut cmd = ::redis::cmd("ZRANGE");
        cmd.arg(i.tenant_key(tenant, &format!("subjects:{day}")))
            .arg(0)
            .arg(limit.saturating_sub(1).min(i64::MAX as usize) as i64)
            .arg("REV")
            .arg("WITHSCORES");
        let pairs: Vec<(String, f64)> = i.run_cmd("usage", &cmd).await?;
        Ok(pairs
            .into_iter()
            .map(|(name, n)| (name, n.max(0.0) as u64))
            .collect())
    }

    async fn purge_shared(&self, tenant: Option<&str>) -> Result<u64, StoreError> {
        let i = &self.inner;
        if i.cfg.cluster {
            return Err(StoreError(
                "a cluster's shared cache level is not purged here: its entries expire with their TTL".into(),
            ));
        }
        let patterns = match tenant {
            Some(t) => vec![i.tenant_key(t, "v:*")],
            None => vec![
                format!("{}:{{t:*}}:v:*", i.cfg.key_prefix),
                format!("{}:{{v:*}}:v", i.cfg.key_prefix),
            ],
        };
        let mut purged = 0;
        for pattern in patterns {
            let mut cursor: u64 = 0;
            loop {
                let mut scan = ::redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let (next, keys): (u64, Vec<String>) = i.run_cmd("usage", &scan).await?;
                if !keys.is_empty() {
                    let mut del = ::redis::cmd("UNLINK");
                    del.arg(&keys);
                    let n: u64 = i.run_cmd("usage", &del).await?;
                    purged += n;
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        Ok(purged)
    }
}
