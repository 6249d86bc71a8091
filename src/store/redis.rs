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
//! | `lg:{t:ID}:holds:day:…`, `…:holds:month:…` | holds in flight: id → when it lapses (the fleet clock's ms) |
//! | `lg:{t:ID}:done:HOLD` | a hold already committed (a retried commit changes nothing) |
//! | `lg:{j:ISSUER}:jti:HASH` | a single-use app token's `jti` (BLAKE3), until the token expires |
//! | `lg:{t:ID}:usage:YYYY-MM` | usage history: `DD:b` billable, `DD:b:KEY` billable with organization key KEY, `DD:h` cache hits, `DD:r` refused |
//! | `lg:{t:ID}:v:DIGEST`, `…:lock:DIGEST` | verdict and lock (`<token> <when it lapses>`), tenant scope |
//! | `lg:{v:DIGEST}:v`, `…:lock` | verdict and lock, shared scope |
//! | `lg:{clock}` | the fleet clock: `up` its time (ms), `at` Redis's time when last advanced |
//! | `lg:{records}:all`, `…:version`, `…:used` | what is issued at runtime (tenant keys, grants) and `notify`'s events, by id; the version every change moves; when each key was last used (kept 400 days past the last use) (`records`) |
//!
//! Every key but the records and their version expires by itself (they exist only once the
//! admin API issued something, or a webhook was told something): periods after they end, holds with the period, the usage history
//! after 14 months, a lock after the longest life of a verdict and an hour. A command that timed
//! out may still have run, so only an idempotent one is sent again: holds carry an id, and every
//! script about a hold is idempotent.
//!
//! **Holds and locks never lapse under a live owner.** A budget hold, or an image lock, counts
//! until its owner settles it, or until `LEASE` has passed on the *fleet clock* since its owner
//! last renewed it, whichever comes first; the claim, renewal and settlement scripts are the
//! only writers, and the claim is the only one that takes a lapsed hold or lock for another
//! call. The fleet clock runs only while the store and a replica meet: every replica advances
//! it every `KEEP_EVERY` by the time since its last advance, and a gap over `CLOCK_GAP` (the
//! store was down, or no replica was up) is not counted. Redis's own clock runs on through an
//! outage, and a key's expiry is absolute, also across a restart from its AOF: measured on it,
//! every hold of the calls in flight lapsed during an outage of a hold's life, and the calls
//! that came next took their place. A replica renews every hold and lock it owns (a call in
//! flight or queued, a commit the store has not taken yet) every `KEEP_EVERY`, so whatever
//! timeouts were in force when one was taken (a reload may lengthen a call's queue) and however
//! long the store is away, its own holds still count when the store is back; a replica that
//! died frees its holds and images within `LEASE` of the store's time up. The only way for a
//! live owner to lose one is to be cut off from the store for `LEASE` while other replicas reach
//! it (a partition of that replica alone): its calls then in flight are committed late
//! (`budget_late_commits_total`). The scripts take the replica's reckoning of the fleet clock (its
//! last reading and the time since, at most `CLOCK_LEAD`, so that it never runs on through an
//! outage; a claim reads the clock again when its reading is older) as an argument, so the
//! clock's key need not share a hash slot with a tenant's keys on a Redis Cluster.
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
use super::{
    Adjusted, ClaimReply, Claims, Clock, Counts, DayUsage, Fleet, Hold, Noted, Replays, Settle,
    SharedKey, SharedRates, SharedVerdict, Store, StoreError, SubjectDay, Usage, LEASE,
};
use crate::config::{Calendar, StoreConfig};
use crate::egress::Egress;
use crate::error::GatewayError;
use crate::metrics::{GaugeGuard, Metrics};
use crate::throttle::warn_throttled;

mod rates;
mod records;

/// Look up the verdict, take the image's lock, hold one call of the budget: each part only when
/// ARGV[1] names it (`c` cache, `b` budget, `s` a subject's part too; `r`: the value
/// ARGV[10] was found unreadable, delete it if it is still there and go on as on a miss).
/// KEYS: [value, lock] then [day, month, day holds, month holds] then [subject day, subject day
/// holds, the tenant's failed attempts of the day (a sorted set by subject)]. ARGV: mode,
/// token, lock ms (Redis's own expiry of the lock key, a backstop), hold id, lease ms, daily
/// limit (-1: none), monthly limit, holds ttl ms, subject daily limit, unreadable value, the
/// fleet clock (ms, as the replica reckons it), the subject's failed-attempt limit, its name.
/// A subject's calls in flight count as failed attempts until they are settled. Holds and locks lapse on
/// the fleet clock (see the module's header): a hold is in its set with the clock's time it
/// lapses at, a lock's value is `<token> <lapses at>`. Idempotent for one token and hold id.
const CLAIM: &str = r"
local mode = ARGV[1]
local up = tonumber(ARGV[11])
local lapses = string.format('%.0f', up + tonumber(ARGV[5]))
local k = 1
local locked = false
if string.find(mode, 'c', 1, true) then
  local v = redis.call('GET', KEYS[1])
  if v and string.find(mode, 'r', 1, true) and v == ARGV[10] then
    redis.call('DEL', KEYS[1])
  elseif v then
    return {'hit', v}
  end
  local lock = redis.call('GET', KEYS[2])
  local owner, due = nil, nil
  if lock then owner, due = string.match(lock, '^(%S+) (%d+)$') end
  if not lock or (due and tonumber(due) <= up and owner ~= ARGV[2]) then
    -- Free, or lapsed: its owner stopped renewing it (it died, or lost the store for a lease).
    redis.call('SET', KEYS[2], ARGV[2] .. ' ' .. lapses, 'PX', ARGV[3])
    locked = true
  elseif owner ~= ARGV[2] and lock ~= ARGV[2] then
    if not due then
      -- A lock of a version before the fleet clock: it holds until Redis drops it.
      return {'wait', tostring(redis.call('PTTL', KEYS[2]))}
    end
    return {'wait', string.format('%.0f', tonumber(due) - up)}
  end
  k = 3
end
if string.find(mode, 'b', 1, true) then
  local id = ARGV[4]
  local hd, hm = KEYS[k + 2], KEYS[k + 3]
  redis.call('ZREMRANGEBYSCORE', hd, '-inf', up)
  redis.call('ZREMRANGEBYSCORE', hm, '-inf', up)
  if redis.call('ZSCORE', hd, id) then return {'go'} end
  local checks = {{tonumber(ARGV[6]), KEYS[k], hd, 'daily'}, {tonumber(ARGV[7]), KEYS[k + 1], hm, 'monthly'}}
  if string.find(mode, 's', 1, true) then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 5], '-inf', up)
    table.insert(checks, 1, {tonumber(ARGV[9]), KEYS[k + 4], KEYS[k + 5], 'subject'})
    local most = tonumber(ARGV[12])
    if most >= 0 then
      local failed = tonumber(redis.call('ZSCORE', KEYS[k + 6], ARGV[13]) or '0')
      if failed + redis.call('ZCARD', KEYS[k + 5]) >= most then
        if locked then redis.call('DEL', KEYS[2]) end
        return {'exhausted', 'failed'}
      end
    end
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
  for _, c in ipairs(checks) do
    redis.call('ZADD', c[3], lapses, id)
    -- The expiry is set once, when the key is new (every write goes to the AOF). A set that
    -- still had holds got its expiry when it was made; an emptied one was deleted.
    if c[5] == 0 or (c[5] == nil and redis.call('PTTL', c[3]) < 0) then
      redis.call('PEXPIRE', c[3], ARGV[8])
    end
  end
end
return {'go'}
";

/// Keep what a replica owns from lapsing: the holds and locks of its calls in flight and of its
/// settlements the store has not taken yet, each only if it is still there and still its own.
/// KEYS: hold sets and locks; ARGV: when they lapse now (the fleet clock's ms), what each key
/// is (`z` a hold set, `l` a lock, one letter per key), then per key the hold id or the lock's
/// token. Never moves a lapse earlier. Idempotent.
const RENEW: &str = r"
local lapses = tonumber(ARGV[1])
local text = string.format('%.0f', lapses)
for i, key in ipairs(KEYS) do
  local id = ARGV[2 + i]
  if string.sub(ARGV[2], i, i) == 'z' then
    if redis.call('ZSCORE', key, id) then redis.call('ZADD', key, 'XX', 'GT', text, id) end
  else
    local lock = redis.call('GET', key)
    local owner, due = nil, nil
    if lock then owner, due = string.match(lock, '^(%S+) (%d+)$') end
    if owner == id and tonumber(due) < lapses then
      redis.call('SET', key, id .. ' ' .. text, 'KEEPTTL')
    end
  end
end
return 0
";

/// Advance the fleet clock (KEYS[1], a hash: `up` its time in ms, `at` Redis's time when it was
/// last advanced) by the time since it was last advanced, unless that is more than ARGV[1] ms
/// (the store was away, or no replica was there to advance it) or negative (Redis's clock went
/// back). A new clock starts at Redis's time. ARGV[2]: how long the key outlives the fleet (ms).
/// Returns the clock's time.
const CLOCK: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local up = tonumber(redis.call('HGET', KEYS[1], 'up') or '-1')
if up < 0 then
  up = now
else
  local gap = now - tonumber(redis.call('HGET', KEYS[1], 'at') or now)
  if gap > 0 and gap <= tonumber(ARGV[1]) then up = up + gap end
end
redis.call('HSET', KEYS[1], 'up', string.format('%.0f', up), 'at', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return up
";

/// Store the verdict and free the lock (`c`); commit or release the hold (`b`, and `s` for the
/// subject's part). KEYS: [value, lock] then [day, month, day holds, month holds, done marker
/// of this hold, usage] then [subject day, subject day holds, the tenant's subjects of the day
/// (a sorted set of billable calls), its failed attempts of the day (the same by failed
/// verdicts)]. ARGV (the 14th: the subject's hash; the 15th: the usage field of an uncertain
/// commit, '' for a commit the provider's answer settled; the 16th: '1' when the verdict was a
/// fail the provider judged):
/// mode, token, verdict ('' for none), verdict expiry (Unix ms, the store's clock), hold id,
/// commit (1|0), had a hold (1|0), day ttl ms, month ttl ms, usage field, usage ttl ms, done
/// ttl ms, the usage field of the organization key ('' for none). Returns 'ok', 'late'
/// (committed after its hold had expired) or 'duplicate' (committed before: nothing changed).
/// Expiries are set when a key is new: every write goes to the AOF. A count above 1 means the
/// key was there before, with its expiry (every writer sets one), so only a first count looks.
const SETTLE: &str = r"
local mode = ARGV[1]
local k = 1
if string.find(mode, 'c', 1, true) then
  if ARGV[3] ~= '' then redis.call('SET', KEYS[1], ARGV[3], 'PXAT', ARGV[4]) end
  local lock = redis.call('GET', KEYS[2])
  if lock and (lock == ARGV[2] or string.match(lock, '^(%S+) ') == ARGV[2]) then
    redis.call('DEL', KEYS[2])
  end
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
      if ARGV[16] == '1' then
        local failed = tonumber(redis.call('ZINCRBY', KEYS[k + 9], 1, ARGV[14]))
        if failed == 1 and redis.call('PTTL', KEYS[k + 9]) < 0 then redis.call('PEXPIRE', KEYS[k + 9], ARGV[8]) end
      end
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
/// ms. Returns {day, month, added to the day, added to the month}.
const ADJUST: &str = r"
local out = {}
local ttls = {ARGV[2], ARGV[3]}
for i = 1, 2 do
  local old = tonumber(redis.call('GET', KEYS[i]) or '0')
  local v = math.max(0, old + tonumber(ARGV[1]))
  redis.call('SET', KEYS[i], v, 'PX', ttls[i])
  out[i] = v
  out[i + 2] = v - old
end
local b = math.max(0, tonumber(redis.call('HGET', KEYS[3], ARGV[4]) or '0') + tonumber(ARGV[1]))
redis.call('HSET', KEYS[3], ARGV[4], b)
if redis.call('PTTL', KEYS[3]) < 0 then redis.call('PEXPIRE', KEYS[3], ARGV[5]) end
return out
";

/// How often a replica advances the fleet clock and renews what it owns.
const KEEP_EVERY: Duration = Duration::from_millis(500);
/// A gap between two advances of the fleet clock longer than this is not counted: the store was
/// away (or every replica was). Four advances missed in a row.
const CLOCK_GAP: Duration = Duration::from_secs(2);
/// How far a replica's reckoning of the fleet clock runs on past its last reading: a little
/// more than the time between two readings, so it never runs on through an outage.
const CLOCK_LEAD: Duration = Duration::from_secs(1);
/// The fleet clock's key outlives the last replica that advanced it by this long.
const CLOCK_KEPT: Duration = Duration::from_secs(30 * 86_400);
/// Redis's own expiry of an image lock (which lapses on the fleet clock) beyond the longest life
/// of a verdict: an outage longer than that may see the lock go, and the image paid again, when
/// the verdict its owner still brings would have expired anyway.
const LOCK_BACKSTOP: Duration = Duration::from_secs(3600);
/// How long the usage history is kept: 14 months, so that 400 days are always there.
const USAGE_TTL: Duration = Duration::from_secs(14 * 31 * 86_400);
/// After a connection attempt fails, requests fail fast for this long instead of each waiting
/// for another attempt.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// The store counts as down when no command has been answered for this long and at least
/// `DOWN_AFTER_FAILURES` have failed: requests that need it then fail at once (see
/// `Inner::silence`). A healthy store under a burst answers something every few milliseconds.
const DOWN_AFTER: Duration = Duration::from_secs(1);
const DOWN_AFTER_FAILURES: u32 = 3;
/// While the store counts as down, one command this often finds out whether it answers again.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// A host clock this far from the store's is said in the log.
const CLOCK_WARNING: Duration = Duration::from_secs(1);
/// Another deployment noted in the prefix's list within this long shares the prefix.
const NEIGHBOUR_SEEN: Duration = Duration::from_secs(60);
/// A deployment not noted for this long is dropped from the list.
const NEIGHBOUR_FORGOTTEN: Duration = Duration::from_secs(86_400);
/// How long a failed settlement is retried (with the same hold id, so it can count only once)
/// when nothing holds the budget for it: a release, or a commit of a tenant without a budget
/// (its usage history). A budgeted commit is retried as long as the process lives, its hold
/// kept meanwhile; past this long, an error line says so. Also how long a hold's done marker
/// is kept: a commit sent again after its answer was lost comes well within it.
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
    /// When the last connection attempt failed, and why.
    failed_at: Mutex<Option<(Instant, String)>>,
    /// How the store has been answering each runtime's connection: down or not (see
    /// `Inner::silence`).
    answering: Mutex<HashMap<Option<tokio::runtime::Id>, Answering>>,
    rate: Script,
    claim: Script,
    settle: Script,
    adjust: Script,
    renew: Script,
    clock_script: Script,
    /// Leases of rate cells, by quota key.
    leases: Mutex<HashMap<String, Arc<rates::LeaseSlot>>>,
    /// Redis's own expiry of an image lock: see `LOCK_BACKSTOP`.
    lock_backstop: Duration,
    /// The fleet clock as last read (ms) and when: see `RedisStore::fleet_clock`.
    clock: Mutex<Option<(i64, Instant)>>,
    /// What this replica keeps from lapsing, by hold id: the holds and image locks of its calls
    /// in flight and of its commits the store has not taken yet.
    owned: Mutex<HashMap<String, Hold>>,
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
    /// A store for `cfg`; nothing connects until the first command. `verdict_life`: the longest
    /// a shared verdict lives (`cache.ttl`, `cache.pass_ttl`).
    pub fn new(
        cfg: StoreConfig,
        verdict_life: Duration,
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
                answering: Mutex::new(HashMap::new()),
                rate: Script::new(rates::RATE),
                claim: Script::new(CLAIM),
                settle: Script::new(SETTLE),
                adjust: Script::new(ADJUST),
                renew: Script::new(RENEW),
                clock_script: Script::new(CLOCK),
                leases: Mutex::new(HashMap::new()),
                lock_backstop: verdict_life + LOCK_BACKSTOP,
                clock: Mutex::new(None),
                owned: Mutex::new(HashMap::new()),
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
    /// the tenant's subjects of the day and their failed attempts.
    fn subject_keys(&self, h: &Hold) -> Option<[String; 4]> {
        let i = &self.inner;
        let name = &h.subject.as_ref()?.name;
        let day = &h.periods.day;
        Some([
            i.tenant_key(&h.tenant, &format!("s:{name}:day:{day}")),
            i.tenant_key(&h.tenant, &format!("s:{name}:holds:day:{day}")),
            i.tenant_key(&h.tenant, &format!("subjects:{day}")),
            self.failures_key(&h.tenant, day),
        ])
    }

    /// The tenant's subjects' failed attempts of a day, by subject.
    fn failures_key(&self, tenant: &str, day: &str) -> String {
        self.inner.tenant_key(tenant, &format!("failures:{day}"))
    }

    /// Whether the cache part and the budget part must go in two calls: on a cluster, when the
    /// cache is shared, its keys live in another slot than the tenant's.
    fn split(&self, h: &Hold) -> bool {
        self.inner.cfg.cluster && h.shared.as_ref().is_some_and(|k| k.tenant.is_none())
    }

    /// A claim the store could not answer: fail closed for a tenant with a budget, call on this
    /// replica's own for one without.
    fn unavailable(&self, h: &Hold, e: &StoreError) -> Result<ClaimReply, GatewayError> {
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
            Ok(ClaimReply::Go)
        }
    }

    /// One claim script call; `unreadable`: a shared value found unreadable before, to replace.
    async fn claim_once(
        &self,
        h: &Hold,
        cache: bool,
        budget: bool,
        unreadable: Option<&str>,
        egress: &Egress,
    ) -> Result<ClaimReply, Refused> {
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
            if let Some([day, holds, _, failures]) = self.subject_keys(h) {
                mode.push('s');
                keys.extend([day, holds, failures]);
            }
        }
        let mut inv = i.claim.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        let limit = |l: Option<u64>| l.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
        let holds_ttl = Duration::from_secs(i.calendar.secs_to_next_month(h.taken)) + LEASE;
        // A hold lapses a lease after the clock it is taken at: a reading the maintenance task
        // could not refresh (a store that was away, a starved runtime) is read again first.
        let clock = match self.fleet_clock() {
            Some((c, true)) => c,
            _ => self.read_clock().await?,
        };
        inv.arg(&mode)
            .arg(&h.id)
            .arg(millis(i.lock_backstop))
            .arg(&h.id)
            .arg(millis(LEASE))
            .arg(limit(h.limits.daily))
            .arg(limit(h.limits.monthly))
            .arg(millis(holds_ttl))
            .arg(limit(h.subject.as_ref().and_then(|s| s.daily_budget)))
            .arg(unreadable.unwrap_or(""))
            .arg(clock)
            .arg(limit(h.subject.as_ref().and_then(|s| s.max_failed)))
            .arg(h.subject.as_ref().map_or("", |s| s.name.as_str()));
        let mut reply: Vec<String> = i.run("claim", &inv, Retry::Once).await?;
        match reply.first().map(String::as_str) {
            Some("go") => Ok(ClaimReply::Go),
            Some("hit") if reply.len() == 2 => {
                let raw = reply.swap_remove(1);
                match SharedVerdict::read(&raw, egress) {
                    Some((exchange, origin)) => Ok(ClaimReply::Hit(exchange, origin)),
                    None => Err(Refused::Unreadable(raw)),
                }
            }
            Some("wait") => {
                let left = reply
                    .get(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                Ok(ClaimReply::Wait(Duration::from_millis(left)))
            }
            Some("exhausted") if reply.get(1).is_some_and(|p| p == "monthly") => {
                Err(Refused::Exhausted("monthly"))
            }
            Some("exhausted") if reply.get(1).is_some_and(|p| p == "subject") => {
                Err(Refused::Exhausted("subject"))
            }
            Some("exhausted") if reply.get(1).is_some_and(|p| p == "failed") => {
                Err(Refused::Exhausted("failed"))
            }
            Some("exhausted") => Err(Refused::Exhausted("daily")),
            _ => Err(StoreError(format!("unexpected claim reply {reply:?}")).into()),
        }
    }

    async fn settle_once(
        &self,
        h: &Hold,
        cache: Option<Option<(&str, i64)>>,
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
        // A verdict whose time to live is over by now (a settlement retried through an outage)
        // is not shared: the lock is freed all the same.
        let (value, expiry_ms) = cache
            .flatten()
            .filter(|(_, until)| *until > self.now().timestamp_millis())
            .unwrap_or(("", 0));
        let (org_key, uncertain, failed) = match budget {
            Some(Settle::Commit {
                org_key,
                uncertain,
                failed,
            }) => (Some(org_key.as_str()), *uncertain, *failed),
            _ => (None, false, false),
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
            .arg(expiry_ms)
            .arg(&h.id)
            .arg(if commit { "1" } else { "0" })
            .arg(if h.has_budget() { "1" } else { "0" })
            .arg(millis(day_ttl))
            .arg(millis(month_ttl))
            .arg(field)
            .arg(millis(USAGE_TTL))
            .arg(millis(SETTLE_RETRY_FOR + LEASE))
            .arg(org_key.map_or(String::new(), |id| {
                format!("{}:b:{id}", &h.periods.day[8..])
            }))
            .arg(h.subject.as_ref().map_or("", |s| s.name.as_str()))
            .arg(match org_key {
                Some(id) if uncertain => format!("{}:u:{id}", &h.periods.day[8..]),
                _ => String::new(),
            })
            .arg(if failed { "1" } else { "0" });
        i.run("settle", &inv, Retry::Once).await
    }

    /// One settlement: one script, or two on a cluster where the shared cache scope's keys live
    /// in another slot than the tenant's.
    async fn settle_all(
        &self,
        h: &Hold,
        how: &Settle,
        value: Option<&(String, i64)>,
    ) -> Result<String, StoreError> {
        let cache = h
            .shared
            .as_ref()
            .map(|_| value.map(|(s, until)| (s.as_str(), *until)));
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
    /// script is idempotent for it), rather than lose a commit. Runs in a task of its own. A
    /// budgeted commit is tried as long as the process lives, and its hold and lock are kept
    /// meanwhile: the call was billed, and a hold that lapsed would let another call take its
    /// place. What gives a hold back (a release) lets it go at once: should the release not
    /// reach the store, the hold lapses by itself.
    async fn settle_until_done(self, h: Hold, how: Settle, value: Option<(String, i64)>) {
        let commit = matches!(how, Settle::Commit { .. });
        if !commit {
            self.disown(&h.id);
        }
        let for_good = commit && h.has_budget();
        let started = Instant::now();
        let mut said_late = false;
        let mut pause = Duration::from_millis(100);
        loop {
            match self.settle_all(&h, &how, value.as_ref()).await {
                Ok(reply) => {
                    self.disown(&h.id);
                    return self.settled(&h, &reply);
                }
                Err(e) if !for_good && started.elapsed() >= SETTLE_RETRY_FOR => {
                    self.disown(&h.id);
                    if commit {
                        self.fell_back("usage_unrecorded");
                        tracing::error!(tenant = %h.tenant, "a billable call could not be recorded in the store within {}: {e}", humantime::format_duration(SETTLE_RETRY_FOR));
                    }
                    return;
                }
                Err(e) => {
                    if pause == Duration::from_millis(100) {
                        warn_throttled!(tenant = %h.tenant, "cannot settle a call in the store, retrying: {e}");
                    } else if for_good && !said_late && started.elapsed() >= SETTLE_RETRY_FOR {
                        said_late = true;
                        tracing::error!(tenant = %h.tenant, "a billable call has waited {} for the store to record it; its hold still counts against the budget, and the commit is still retried: {e}", humantime::format_duration(SETTLE_RETRY_FOR));
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

    /// Keep a claim's hold and lock from lapsing until `disown`.
    fn own(&self, h: &Hold) {
        self.inner
            .owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(h.id.clone(), h.clone());
    }

    fn disown(&self, id: &str) {
        self.inner
            .owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// The fleet clock (ms) as this replica reckons it: its last reading, plus the time since,
    /// at most `CLOCK_LEAD`; and whether that reading is recent (within `CLOCK_LEAD`). `None`
    /// before the first reading.
    fn fleet_clock(&self) -> Option<(i64, bool)> {
        let (up, at) = (*self.inner.clock.lock().unwrap_or_else(|p| p.into_inner()))?;
        let since = at.elapsed();
        let lead = i64::try_from(since.min(CLOCK_LEAD).as_millis()).unwrap_or(0);
        Some((up + lead, since <= CLOCK_LEAD))
    }

    /// Advance the fleet clock (see the module's header) and read it.
    async fn read_clock(&self) -> Result<i64, StoreError> {
        let i = &self.inner;
        let mut inv = i
            .clock_script
            .key(format!("{}:{{clock}}", i.cfg.key_prefix));
        inv.arg(millis(CLOCK_GAP)).arg(millis(CLOCK_KEPT));
        let up: i64 = i.run("clock", &inv, Retry::Once).await?;
        *i.clock.lock().unwrap_or_else(|p| p.into_inner()) = Some((up, Instant::now()));
        Ok(up)
    }

    /// Renew every hold and lock this replica owns: one script per hash slot (one in all on a
    /// single Redis). A failure is left to the next round.
    async fn renew_owned(&self) {
        let i = &self.inner;
        let Some((clock, _)) = self.fleet_clock() else {
            return;
        };
        let owned: Vec<Hold> = i
            .owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        // Keys, their kinds and ids, by the hash tag they live under.
        let mut groups: HashMap<String, (Vec<String>, String, Vec<String>)> = HashMap::new();
        let cluster = i.cfg.cluster;
        for h in &owned {
            let mut add = |tag: String, key: String, kind: char| {
                let g = groups
                    .entry(if cluster { tag } else { String::new() })
                    .or_default();
                g.0.push(key);
                g.1.push(kind);
                g.2.push(h.id.clone());
            };
            if h.has_budget() {
                let [_, _, day, month, ..] = self.budget_keys(h);
                let tenant = format!("t:{}", h.tenant);
                add(tenant.clone(), day, 'z');
                add(tenant.clone(), month, 'z');
                if let Some([_, subject, ..]) = self.subject_keys(h) {
                    add(tenant, subject, 'z');
                }
            }
            if let Some(k) = &h.shared {
                let tag = match &k.tenant {
                    Some(t) => format!("t:{t}"),
                    None => format!("v:{}:{}", k.upstream, k.digest_hex),
                };
                let [_, lock] = i.cache_keys(k);
                add(tag, lock, 'l');
            }
        }
        let lapses = clock + i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX);
        let renewals = groups.into_values().map(|(keys, kinds, ids)| async move {
            let mut inv = i.renew.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            inv.arg(lapses).arg(&kinds);
            for id in &ids {
                inv.arg(id);
            }
            let _: Result<i64, _> = i.run("renew", &inv, Retry::Once).await;
        });
        futures_util::future::join_all(renewals).await;
    }

    /// What keeps this replica's part of the fleet alive, every `KEEP_EVERY` for as long as the
    /// process runs: advance the fleet clock, and renew the holds and locks it owns.
    pub async fn keep_alive(&self) {
        let mut every = tokio::time::interval(KEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let _ = self.read_clock().await;
            self.renew_owned().await;
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
            i.send("check", Request::Pipe(&p), Retry::Never).await
        else {
            return;
        };
        let (others, stale) = neighbours(&all, fingerprint, now);
        if !stale.is_empty() {
            let mut c = ::redis::cmd("HDEL");
            c.arg(&key).arg(&stale);
            let _: Result<i64, _> = i.run_cmd("check", &c, Retry::Once).await;
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
        match i.run_cmd::<Value>("check", &info, Retry::Once).await {
            Ok(answer) if super::eviction::texts(&answer).iter().any(|t| t.contains("aof_enabled:0")) => {
                found.push("it keeps no append-only file (appendonly no): a restart of Redis loses every budget count and hold; run it with appendonly yes".into())
            }
            Ok(_) => {}
            Err(e) => found.push(format!("cannot read its persistence settings ({e})")),
        }
        let mut all = ::redis::cmd("HGETALL");
        all.arg(i.deployments_key());
        if let Ok(all) = i
            .run_cmd::<HashMap<String, String>>("check", &all, Retry::Once)
            .await
        {
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

    /// `probe` for a config, within `limit`, from a runtime of its own (`check-config` has none):
    /// its warnings, or why there are none to tell.
    pub fn probe_config(c: &crate::config::Config, limit: Duration) -> Vec<String> {
        let asked = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                let metrics = Metrics::new().map_err(|e| e.to_string())?;
                let store = RedisStore::new(
                    c.store.clone(),
                    c.cache.verdict_life(),
                    c.budgets.calendar,
                    &metrics,
                );
                rt.block_on(async {
                    tokio::time::timeout(limit, store.probe(&c.upstream.fingerprint))
                        .await
                        .map_err(|_| format!("it did not answer within {} s", limit.as_secs()))
                })
            });
        asked.unwrap_or_else(|e| vec![e])
    }

    /// Check the store answers (for `store_up` when no request does), and measure its clock
    /// against this host's: `TIME`, timed on both sides, the store's time taken as read halfway
    /// through the round trip. A clock more than `CLOCK_WARNING` away is said once in the log
    /// (and when it is back); the fleet's days and months follow the store's clock either way.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let i = &self.inner;
        let before = Utc::now();
        let (secs, micros): (i64, i64) = i
            .run_cmd("usage", &::redis::cmd("TIME"), Retry::Once)
            .await?;
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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Inner {
    fn tenant_key(&self, tenant: &str, rest: &str) -> String {
        format!("{}:{{t:{tenant}}}:{rest}", self.cfg.key_prefix)
    }

    /// The key that records a single-use id: the id hashed, so a key never holds what a client
    /// sent, and its length is fixed.
    fn used_id_key(&self, scope: &str, id: &str) -> String {
        let digest = blake3::hash(id.as_bytes()).to_hex();
        format!("{}:{{j:{scope}}}:jti:{digest}", self.cfg.key_prefix)
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
        // The last attempt's reason, while it is recent: a certificate refused, an address
        // that does not answer.
        let recent = self
            .failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(t, _)| t.elapsed() < RECONNECT_PAUSE)
            .map(|(_, why)| why.clone());
        if let Some(why) = recent {
            return Err(StoreError(why));
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
        // redis-rs errors name the host, never the password.
        let why = format!("cannot connect to the store: {why}");
        *self.failed_at.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), why.clone()));
        self.metrics.errors.with_label_values(&["connect"]).inc();
        self.metrics.up.set(0);
        StoreError(why)
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

    /// Run a script within the command timeout, timing and counting it; `retry`: whether it
    /// may be sent once more when it got no answer.
    async fn run<T: ::redis::FromRedisValue>(
        self: &Arc<Self>,
        op: &'static str,
        inv: &::redis::ScriptInvocation<'_>,
        retry: Retry,
    ) -> Result<T, StoreError> {
        self.send(op, Request::Script(inv), retry).await
    }

    async fn run_cmd<T: ::redis::FromRedisValue>(
        self: &Arc<Self>,
        op: &'static str,
        cmd: &Cmd,
        retry: Retry,
    ) -> Result<T, StoreError> {
        self.send(op, Request::Cmd(cmd), retry).await
    }

    async fn send<T: ::redis::FromRedisValue>(
        self: &Arc<Self>,
        op: &'static str,
        req: Request<'_>,
        retry: Retry,
    ) -> Result<T, StoreError> {
        self.send_or_not(op, req, retry).await.map_err(|(e, _)| e)
    }

    /// `send`, saying on failure whether the command may have run (false: it was never sent).
    async fn send_or_not<T: ::redis::FromRedisValue>(
        self: &Arc<Self>,
        op: &'static str,
        req: Request<'_>,
        retry: Retry,
    ) -> Result<T, (StoreError, bool)> {
        let started = Instant::now();
        if let Some(why) = self.failing_fast() {
            self.metrics.errors.with_label_values(&[op]).inc();
            return Err((StoreError(format!("store {op}: {why}")), false));
        }
        let mut r = self.send_once(&req).await;
        // READONLY: the node was demoted to a replica (a failover), and nothing was written (a
        // script stops at its first write). Sent once more on a new connection, which reaches
        // the new primary through the same address.
        if matches!(&r, Sent::Answer(Err(e)) if e.code() == Some("READONLY")) {
            self.forget_connections("the store answered READONLY (a primary demoted to replica)");
            r = self.send_once(&req).await;
        }
        // A store busy for a moment (a burst, a loaded host, an fsync) misses one timeout, not
        // two in a row: an idempotent command is sent once more before the request is refused.
        if let (Retry::Once, Sent::Silent(why) | Sent::Unsent(why)) = (retry, &r) {
            self.silence(why);
            if self.failing_fast().is_none() {
                r = self.send_once(&req).await;
            }
        }
        self.finish(op, started, r)
    }

    async fn send_once<T: ::redis::FromRedisValue>(&self, req: &Request<'_>) -> Sent<T> {
        let mut conn = match self.connection().await {
            Ok(c) => c,
            Err(e) => return Sent::Unsent(e.0),
        };
        let t = self.cfg.timeout;
        let r = match req {
            // A script unknown to the server costs a SCRIPT LOAD and a second EVALSHA.
            Request::Script(inv) => tokio::time::timeout(t * 3, inv.invoke_async(&mut conn)).await,
            Request::Cmd(cmd) => tokio::time::timeout(t, cmd.query_async(&mut conn)).await,
            Request::Pipe(p) => tokio::time::timeout(t, p.query_async(&mut conn)).await,
        };
        match r {
            Ok(Err(e)) if no_answer(&e) => Sent::Silent(e.to_string()),
            Ok(answer) => Sent::Answer(answer),
            // No answer in time (the client's response timeout, or ours around a script that
            // may load itself first).
            Err(_) => Sent::Silent(format!(
                "no answer within {}",
                humantime::format_duration(t)
            )),
        }
    }

    fn finish<T>(
        &self,
        op: &'static str,
        started: Instant,
        r: Sent<T>,
    ) -> Result<T, (StoreError, bool)> {
        self.metrics
            .duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        let (err, ran) = match r {
            Sent::Answer(Ok(v)) => {
                self.answered();
                self.metrics.up.set(1);
                return Ok(v);
            }
            Sent::Answer(Err(e)) => {
                self.answered();
                (e.to_string(), true)
            }
            Sent::Silent(why) => {
                self.silence(&why);
                (why, true)
            }
            Sent::Unsent(why) => {
                self.silence(&why);
                (why, false)
            }
        };
        self.metrics.errors.with_label_values(&[op]).inc();
        self.metrics.up.set(0);
        Err((StoreError(format!("store {op}: {err}")), ran))
    }

    /// Why a command is refused without being sent: the store counts as down (see
    /// `Inner::silence`). Every `PROBE_EVERY` meanwhile, a `PING` in a task of its own finds
    /// out whether it answers again: no request waits for it.
    fn failing_fast(self: &Arc<Self>) -> Option<String> {
        let mut all = self.answering.lock().unwrap_or_else(|p| p.into_inner());
        let a = all.get_mut(&runtime_id())?;
        let since = a.down?;
        let now = Instant::now();
        if a.probe_at.is_none_or(|at| now >= at) {
            a.probe_at = Some(now + PROBE_EVERY);
            let inner = self.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let started = Instant::now();
                    let r = inner
                        .send_once::<String>(&Request::Cmd(&::redis::cmd("PING")))
                        .await;
                    let _ = inner.finish("probe", started, r);
                });
            }
        }
        Some(format!(
            "the store counts as down, nothing answered for {} (last: {})",
            humantime::format_duration(Duration::from_secs(since.elapsed().as_secs())),
            a.last
        ))
    }

    /// A command was answered: the store is up.
    fn answered(&self) {
        let was = self
            .answering
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&runtime_id());
        if let Some(since) = was.and_then(|a| a.down) {
            tracing::info!(
                down_for = %humantime::format_duration(Duration::from_secs(since.elapsed().as_secs())),
                "the store answers again"
            );
        }
    }

    /// A command got no answer. After `DOWN_AFTER` with nothing answered (and a few commands
    /// failed), the store counts as down: requests fail at once instead of each waiting for its
    /// timeout, and one command every `PROBE_EVERY` finds out whether it is back. The
    /// connections are dropped then, and at every failed probe: a connection whose peer went
    /// away without a word (a host that died, a network that drops packets, a load balancer
    /// that moved) never fails on its own, commands only time out, and the kernel gives up on it
    /// after many minutes. A new connection reaches whatever now answers at the address, or
    /// fails at once. Each runtime's connection is judged by its own answers: one gone silent
    /// while another answers (a NAT that dropped an idle connection) is replaced all the same.
    fn silence(&self, why: &str) {
        let now = Instant::now();
        let runtime = runtime_id();
        let mut all = self.answering.lock().unwrap_or_else(|p| p.into_inner());
        let a = all.entry(runtime).or_default();
        let since = *a.silent_since.get_or_insert(now);
        a.failed = a.failed.saturating_add(1);
        why.clone_into(&mut a.last);
        if a.down.is_none() {
            if a.failed < DOWN_AFTER_FAILURES || now.duration_since(since) < DOWN_AFTER {
                return;
            }
            a.down = Some(since);
            a.probe_at = Some(now + PROBE_EVERY);
            tracing::warn!(last = %a.last, "no command has been answered for a second: the store counts as down, requests that need it are refused at once, and it is connected to again until it answers");
        }
        drop(all);
        if let Some(id) = runtime {
            self.conns
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
    }
}

/// Whether a command may be sent once more when it got no answer: only one whose second run
/// changes nothing (a script about a hold, with its id; a read). A command that timed out may
/// have run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    Once,
    Never,
}

/// What one command got: an answer (a value or an error reply: the store is there), or none (no
/// reply in time, a connection lost: it may have run), or it could not be sent (no connection).
enum Sent<T> {
    Answer(::redis::RedisResult<T>),
    Silent(String),
    Unsent(String),
}

/// The runtime this task runs on: each has its own connection.
fn runtime_id() -> Option<tokio::runtime::Id> {
    tokio::runtime::Handle::try_current().ok().map(|h| h.id())
}

/// An error that is no answer from the store.
fn no_answer(e: &::redis::RedisError) -> bool {
    e.is_timeout()
        || matches!(
            e.kind(),
            ::redis::ErrorKind::Io | ::redis::ErrorKind::ClusterConnectionNotFound
        )
}

/// How the store has been answering: see `Inner::silence`.
#[derive(Debug, Default)]
struct Answering {
    /// Since when no command has been answered, and how many have failed since.
    silent_since: Option<Instant>,
    failed: u32,
    /// Since when the store counts as down (the first command unanswered).
    down: Option<Instant>,
    /// While down: when the next probe goes.
    probe_at: Option<Instant>,
    /// Why the last command got no answer.
    last: String,
}

#[async_trait]
impl Clock for RedisStore {
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
}

#[async_trait]
impl Claims for RedisStore {
    async fn claim(&self, h: &Hold, egress: &Egress) -> Result<ClaimReply, GatewayError> {
        let budget = h.has_budget();
        if !budget && h.shared.is_none() {
            return Ok(ClaimReply::Go);
        }
        // Kept from lapsing from before the script runs: its answer may be lost after it ran.
        self.own(h);
        let mut unreadable: Option<String> = None;
        let result = loop {
            let found = unreadable.as_deref();
            let result = if self.split(h) && budget {
                match self.claim_once(h, true, false, found, egress).await {
                    Ok(ClaimReply::Go) => self.claim_once(h, false, true, None, egress).await,
                    other => other,
                }
            } else {
                self.claim_once(h, true, budget, found, egress).await
            };
            match result {
                // A value this replica cannot serve (unreadable, or carrying a secret: see
                // `SharedVerdict::read`) is not a reason to refuse the request: it is replaced
                // by this call's verdict, as on a miss. Once per claim: a second
                // unreadable value (another writer is at it) is a store fault.
                Err(Refused::Unreadable(raw)) if unreadable.is_none() => {
                    tracing::warn!(tenant = %h.tenant, bytes = raw.len(), "a shared verdict could not be read; this call replaces it");
                    self.fell_back("verdict_replaced");
                    unreadable = Some(raw);
                }
                other => break other,
            }
        };
        if !matches!(result, Ok(ClaimReply::Go)) {
            self.disown(&h.id);
        }
        match result {
            Ok(c) => Ok(c),
            Err(Refused::Exhausted(period)) => {
                // The split path may hold the image's lock: give it back.
                if self.split(h) {
                    self.abandon(h);
                }
                // Until the end of the period the hold was asked in, as the local store says.
                let retry_after_secs = match period {
                    "monthly" => self.inner.calendar.secs_to_next_month(h.taken),
                    _ => self.inner.calendar.secs_to_next_day(h.taken),
                };
                match period {
                    "subject" => {
                        return Err(GatewayError::SubjectBudgetExhausted { retry_after_secs })
                    }
                    "failed" => {
                        return Err(GatewayError::TooManyFailedAttempts { retry_after_secs })
                    }
                    _ => {}
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
        // It expires where it was paid for and everywhere else at once: its time to live counts
        // from the provider's answer, not from when the store takes it.
        let value = verdict.and_then(|(v, ttl)| {
            let until = v
                .created_ms
                .saturating_add(i64::try_from(millis(ttl)).unwrap_or(i64::MAX));
            serde_json::to_string(v).ok().map(|s| (s, until))
        });
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
        self.disown(&h.id);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(
            self.clone()
                .settle_until_done(h.clone(), Settle::Release, None),
        );
    }
}

#[async_trait]
impl Usage for RedisStore {
    async fn counts(&self, tenant: &str, now: DateTime<Utc>) -> Result<Counts, StoreError> {
        let p = self.inner.calendar.periods(now);
        let i = &self.inner;
        let mut cmd = ::redis::cmd("MGET");
        cmd.arg(i.tenant_key(tenant, &format!("day:{}", p.day)))
            .arg(i.tenant_key(tenant, &format!("month:{}", p.month)));
        let (d, m): (Option<u64>, Option<u64>) = i.run_cmd("counts", &cmd, Retry::Once).await?;
        Ok(Counts {
            day: p.day,
            day_used: d.unwrap_or(0),
            month: p.month,
            month_used: m.unwrap_or(0),
        })
    }

    async fn adjust(
        &self,
        tenant: &str,
        now: DateTime<Utc>,
        delta: i64,
    ) -> Result<Adjusted, StoreError> {
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
        let (day_used, month_used, day_applied, month_applied): (u64, u64, i64, i64) =
            i.run("settle", &inv, Retry::Never).await?;
        Ok(Adjusted {
            counts: Counts {
                day: p.day,
                day_used,
                month: p.month,
                month_used,
            },
            day_applied,
            month_applied,
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
                    let fields: HashMap<String, u64> =
                        i.run_cmd("history", &cmd, Retry::Once).await?;
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

    async fn top_subjects(
        &self,
        tenant: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<SubjectDay>, StoreError> {
        let i = &self.inner;
        let day = i.calendar.day(now);
        let mut cmd = ::redis::cmd("ZRANGE");
        cmd.arg(i.tenant_key(tenant, &format!("subjects:{day}")))
            .arg(0)
            .arg(limit.saturating_sub(1).min(i64::MAX as usize) as i64)
            .arg("REV")
            .arg("WITHSCORES");
        let pairs: Vec<(String, f64)> = i.run_cmd("usage", &cmd, Retry::Once).await?;
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let mut scores = ::redis::cmd("ZMSCORE");
        scores.arg(self.failures_key(tenant, &day));
        for (name, _) in &pairs {
            scores.arg(name);
        }
        let failed: Vec<Option<f64>> = i.run_cmd("usage", &scores, Retry::Once).await?;
        Ok(pairs
            .into_iter()
            .zip(failed.into_iter().chain(std::iter::repeat(None)))
            .map(|((subject, n), f)| SubjectDay {
                subject,
                billable: n.max(0.0) as u64,
                failed: f.map_or(0, |f| f.max(0.0) as u64),
            })
            .collect())
    }

    async fn reset_failed(
        &self,
        tenant: &str,
        subject: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let i = &self.inner;
        let key = self.failures_key(tenant, &i.calendar.day(now));
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .cmd("ZSCORE")
            .arg(&key)
            .arg(subject)
            .cmd("ZREM")
            .arg(&key)
            .arg(subject)
            .ignore();
        let (had,): (Option<f64>,) = i.send("usage", Request::Pipe(&pipe), Retry::Once).await?;
        Ok(had.map_or(0, |f| f.max(0.0) as u64))
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
            // A timed-out increment may have been applied: it is not retried (a count is
            // better lost than doubled). One never sent is kept for the next flush.
            if let Err((e, ran)) = i
                .send_or_not::<()>("usage", Request::Pipe(&pipe), Retry::Never)
                .await
            {
                if !ran {
                    left.push(((tenant, day, what), n));
                }
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
}

#[async_trait]
impl Replays for RedisStore {
    async fn first_use(&self, scope: &str, id: &str, until_ms: i64) -> Result<bool, StoreError> {
        let key = self.inner.used_id_key(scope, id);
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(&key)
            .arg("1")
            .arg("NX")
            .arg("PXAT")
            .arg(until_ms.max(Utc::now().timestamp_millis() + 1000));
        let set: Option<String> = self.inner.run_cmd("replay", &cmd, Retry::Never).await?;
        Ok(set.is_some())
    }

    async fn forget_use(&self, scope: &str, id: &str) -> Result<(), StoreError> {
        let mut cmd = ::redis::cmd("DEL");
        cmd.arg(self.inner.used_id_key(scope, id));
        self.inner
            .run_cmd::<i64>("replay", &cmd, Retry::Once)
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl Fleet for RedisStore {
    fn rates(&self) -> Arc<dyn SharedRates> {
        Arc::new(self.clone())
    }

    async fn purge_verdicts(&self, tenant: Option<&str>) -> Result<u64, StoreError> {
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
                let (next, keys): (u64, Vec<String>) =
                    i.run_cmd("usage", &scan, Retry::Once).await?;
                if !keys.is_empty() {
                    let mut del = ::redis::cmd("UNLINK");
                    del.arg(&keys);
                    let n: u64 = i.run_cmd("usage", &del, Retry::Once).await?;
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

    async fn keep_alive(&self) {
        RedisStore::keep_alive(self).await
    }

    /// Down: `store_up` and the requests say so.
    async fn check(&self, fingerprint: &str, endpoint: &str) {
        let _ = self.ping().await;
        self.check_eviction().await;
        self.check_neighbours(fingerprint, endpoint).await;
    }
}

impl Store for RedisStore {
    fn fleet(&self) -> Option<&dyn Fleet> {
        Some(self)
    }
}
