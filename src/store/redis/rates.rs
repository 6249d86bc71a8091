//! Shared rate limits on Redis: the GCRA of `governor`, run as a script on Redis's clock, and
//! the leases a replica takes of a busy quota so that most requests need no round trip.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{RedisStore, Retry, RECONNECT_PAUSE};
use crate::store::{Cells, RateKey, SharedRates, StoreError};

/// GCRA as `governor` computes it, in microseconds of Redis time, taking up to ARGV[3] cells at
/// once (a lease; 1 answers exactly as `governor` does). KEYS: state. ARGV: interval (µs),
/// burst, cells wanted. Returns {cells granted, remaining burst, µs to wait when none}.
/// No grant leaves the state more than a burst and one interval ahead of now: a state further
/// ahead means Redis's clock went back (a clock stepped, a host restored from a snapshot): it
/// is written back as a drained quota instead of refusing everyone for as long as the clock
/// jumped.
pub(super) const RATE: &str = r"
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
pub(super) struct LeaseSlot {
    lease: Mutex<Lease>,
    refill: tokio::sync::Mutex<()>,
    /// A refill ahead of need is running: one at a time.
    topping_up: std::sync::atomic::AtomicBool,
}

impl LeaseSlot {
    fn take(&self, now: Instant) -> Option<u32> {
        self.lease
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(now)
    }
}

#[async_trait]
impl SharedRates for RedisStore {
    /// Take one request from a GCRA quota kept in Redis (`key` names it: a tenant, a subject,
    /// or the global pace). Answers what the local `governor` limiter would, for the same quota.
    async fn take(
        &self,
        key: RateKey<'_>,
        interval: Duration,
        burst: u32,
    ) -> Result<Cells, StoreError> {
        let i = &self.inner;
        let interval_us = u64::try_from(interval.as_micros())
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
        let quota = Quota {
            key: redis_key,
            interval_us,
            burst,
            wanted,
        };
        if wanted == 1 {
            let (granted, remaining, wait) = self.take_cells(&quota, 1).await?;
            return Ok(Cells {
                granted: granted > 0,
                remaining,
                wait,
            });
        }
        self.take_leased(quota).await
    }

    fn fell_back(&self, what: &str) {
        RedisStore::fell_back(self, what);
    }
}

/// One quota as Redis keeps it, and how many cells a lease of it takes.
struct Quota {
    key: String,
    interval_us: u64,
    burst: u32,
    wanted: u32,
}

/// A granted cell out of a lease.
fn from_lease(remaining: u32) -> Cells {
    Cells {
        granted: true,
        remaining,
        wait: Duration::ZERO,
    }
}

impl RedisStore {
    /// One cell of a quota taken in leases: from the lease when it has one (fetching the next
    /// one ahead of need), else from a new lease, one request at a time.
    async fn take_leased(&self, quota: Quota) -> Result<Cells, StoreError> {
        let slot = {
            let mut leases = self.inner.leases.lock().unwrap_or_else(|p| p.into_inner());
            match leases.get(&quota.key) {
                Some(slot) => slot.clone(),
                None => leases.entry(quota.key.clone()).or_default().clone(),
            }
        };
        if let Some(remaining) = slot.take(Instant::now()) {
            self.top_up(&slot, quota);
            return Ok(from_lease(remaining));
        }
        let _refilling = slot.refill.lock().await;
        // Another request may have refilled it while this one waited.
        let now = Instant::now();
        if let Some(remaining) = slot.take(now) {
            return Ok(from_lease(remaining));
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
        let fetched = self.take_cells(&quota, quota.wanted).await;
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
        Ok(Cells {
            granted: granted > 0,
            remaining: remaining + lease.left,
            wait,
        })
    }

    /// Half used: fetch the next lease now, in a task of its own, so that no request waits for
    /// it.
    fn top_up(&self, slot: &Arc<LeaseSlot>, quota: Quota) {
        let left = slot.lease.lock().unwrap_or_else(|p| p.into_inner()).left;
        if left > quota.wanted / 2 || slot.topping_up.swap(true, Ordering::AcqRel) {
            return;
        }
        let (store, slot) = (self.clone(), slot.clone());
        tokio::spawn(async move {
            let fetched = store.take_cells(&quota, quota.wanted).await;
            let mut lease = slot.lease.lock().unwrap_or_else(|p| p.into_inner());
            if let Ok((granted, remaining, _)) = fetched {
                lease.left += granted;
                lease.remaining = remaining;
                lease.until = Some(Instant::now() + LEASE_TTL);
            }
            slot.topping_up.store(false, Ordering::Release);
        });
    }

    /// Up to `wanted` cells of a quota: (granted, remaining burst, wait when none).
    async fn take_cells(
        &self,
        quota: &Quota,
        wanted: u32,
    ) -> Result<(u32, u32, Duration), StoreError> {
        let mut inv = self.inner.rate.key(&quota.key);
        inv.arg(quota.interval_us)
            .arg(quota.burst.max(1))
            .arg(wanted);
        let (granted, remaining, wait_us): (i64, i64, i64) =
            self.inner.run("rate", &inv, Retry::Never).await?;
        Ok((
            u32::try_from(granted).unwrap_or(0),
            u32::try_from(remaining).unwrap_or(0),
            Duration::from_micros(u64::try_from(wait_us).unwrap_or(0)),
        ))
    }
}
