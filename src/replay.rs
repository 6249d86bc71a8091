//! The replay signal: which parties (tenants, or with `cache.scope = "subject"` a tenant's
//! users) an image passed for lately. An upload whose exact bytes passed recently for another
//! party is a captured selfie replayed through another app or account, or one test photo shared
//! between teams; either way an operator wants to know (a metric and an alert).
//!
//! Hand-written rather than a second `moka` cache: measured in `tests/cache_memory.rs`, moka
//! costs about 600 bytes per entry, this table about 32. Its memory is allocated once, from a
//! share of `cache.max_bytes`, so the cache's bound stays honest. Entries are keyed by the
//! first 8 bytes of the BLAKE3 digest and name each party by a 32-bit hash of its name: a
//! collision could at worst raise a false signal, never change an answer.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes the table takes per slot: the map's bucket (key, two party tags, age, control byte)
/// and the order queue's entry, rounded up.
const SLOT_BYTES: u64 = 32;

pub struct ReplayWatch {
    inner: Mutex<Table>,
    buckets: u64,
    capacity: usize,
    window: Duration,
    started: Instant,
}

/// Who an image passed for lately: the first party, and the latest other one (0: none), and
/// when it last passed (seconds since `started`). Two parties are enough to tell every party
/// whether another had it: the first, or the latest other.
#[derive(Clone, Copy)]
struct Passed {
    first: u32,
    other: u32,
    at: u32,
}

impl Passed {
    fn for_another(&self, party: u32) -> bool {
        self.first != party || (self.other != 0 && self.other != party)
    }
}

struct Table {
    /// Digest prefix → who it passed for.
    owners: HashMap<u64, Passed>,
    /// Digest prefixes in the order they were first recorded: the oldest is forgotten first.
    order: VecDeque<u64>,
}

fn prefix(digest: &[u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(b)
}

/// A party's tag: 32 bits of its hash, never 0 (a collision could at worst raise a false
/// signal).
fn tag(party: &str) -> u32 {
    let h = blake3::hash(party.as_bytes());
    let b = h.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]]).max(1)
}

impl ReplayWatch {
    /// A table that fits in `bytes`, remembering passes for `window`.
    pub fn new(bytes: u64, window: Duration) -> ReplayWatch {
        // A map of 2^k buckets holds 7/8 of them before it grows: preallocate exactly that.
        let slots = (bytes / SLOT_BYTES).max(16);
        let buckets = if slots.is_power_of_two() {
            slots
        } else {
            slots.next_power_of_two() / 2
        };
        let capacity = (buckets / 8 * 7) as usize;
        ReplayWatch {
            inner: Mutex::new(Table {
                owners: HashMap::with_capacity(capacity),
                order: VecDeque::with_capacity(capacity),
            }),
            buckets,
            capacity,
            window,
            started: Instant::now(),
        }
    }

    /// The bytes it holds (allocated up front): the map's buckets and control bytes, the queue.
    pub fn bytes(&self) -> u64 {
        let bucket = std::mem::size_of::<(u64, Passed)>() as u64 + 1;
        self.buckets * bucket + self.capacity as u64 * 8
    }

    fn now(&self) -> u32 {
        u32::try_from(self.started.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    /// `tenant` (a party: a tenant, or a tenant's user) got a pass for this image. Within the
    /// window the first party is kept beside the latest other: when two parties' calls for one
    /// image overlap, the later one to finish still finds the other's pass (a table of the
    /// newest party alone hid each from its own check).
    pub fn record(&self, digest: &[u8; 32], tenant: &str) {
        let (key, now, party) = (prefix(digest), self.now(), tag(tenant));
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let window = self.window.as_secs();
        let fresh = Passed {
            first: party,
            other: 0,
            at: now,
        };
        match t.owners.get_mut(&key) {
            Some(p) if u64::from(now - p.at) <= window => {
                if p.first != party {
                    p.other = party;
                }
                p.at = now;
            }
            Some(p) => *p = fresh,
            None => {
                t.owners.insert(key, fresh);
                t.order.push_back(key);
            }
        }
        while t.order.len() > self.capacity {
            if let Some(old) = t.order.pop_front() {
                t.owners.remove(&old);
            }
        }
    }

    /// Whether this image passed within the window for a tenant other than `tenant`.
    pub fn passed_for_another(&self, digest: &[u8; 32], tenant: &str) -> bool {
        let now = self.now();
        let t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        t.owners.get(&prefix(digest)).is_some_and(|p| {
            p.for_another(tag(tenant)) && u64::from(now - p.at) <= self.window.as_secs()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_tenant_is_a_signal_the_same_tenant_is_not() {
        let w = ReplayWatch::new(4096, Duration::from_secs(60));
        let d = [7u8; 32];
        assert!(!w.passed_for_another(&d, "a"));
        w.record(&d, "a");
        assert!(!w.passed_for_another(&d, "a"), "a retry is not a replay");
        assert!(w.passed_for_another(&d, "b"));
    }

    /// Two parties' overlapping calls for one image: the later to finish records its pass,
    /// then checks, and finds the other's (the table once kept the newest owner, so neither was
    /// ever flagged).
    #[test]
    fn overlapping_passes_of_two_parties_are_a_signal() {
        let w = ReplayWatch::new(4096, Duration::from_secs(60));
        let d = [9u8; 32];
        w.record(&d, "a");
        assert!(!w.passed_for_another(&d, "a"));
        w.record(&d, "b");
        assert!(w.passed_for_another(&d, "b"), "b finished second");
        assert!(
            w.passed_for_another(&d, "a"),
            "and b's pass is another's for a"
        );
        assert!(w.passed_for_another(&d, "c"));
    }

    #[test]
    fn the_oldest_passes_are_forgotten_at_capacity() {
        let w = ReplayWatch::new(1024, Duration::from_secs(60));
        let n = w.capacity;
        for i in 0..=n {
            let mut d = [0u8; 32];
            d[..8].copy_from_slice(&(i as u64).to_le_bytes());
            w.record(&d, "a");
        }
        let first = [0u8; 32];
        let mut last = [0u8; 32];
        last[..8].copy_from_slice(&(n as u64).to_le_bytes());
        assert!(!w.passed_for_another(&first, "b"), "forgotten");
        assert!(w.passed_for_another(&last, "b"));
        assert!(w.bytes() <= 1024);
    }
}
