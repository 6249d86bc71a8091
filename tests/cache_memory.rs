//! `cache.max_bytes` bounds real memory: a full cache holds about `max_bytes` of live heap.
//!
//! The cache charges each entry a weight; the bound is only honest if the weight is what the
//! entry really holds. This fills a verdict cache through its public path (lead, then finish) with
//! answers shaped like the provider's, past its capacity so that eviction runs, and counts live
//! heap bytes with a counting allocator around mimalloc (the gateway's allocator). This file is its
//! own test binary, so the count sees only this test.
//!
//!     cargo test --release --test cache_memory -- --nocapture   # prints the numbers
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use liveness_gateway::cache::{self, Lookup, VerdictCache};
use liveness_gateway::config::{CacheConfig, CacheScope, NamedKey, OrgApiKey, OrgKeys};
use liveness_gateway::egress::Egress;
use liveness_gateway::upstream::Exchange;
use liveness_gateway::verdict::UpstreamAnswer;
use liveness_gateway::verdict::{LivenessVerdict, UpstreamClass};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        mimalloc::MiMalloc.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        mimalloc::MiMalloc.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        mimalloc::MiMalloc.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// An answer shaped like the provider's (see the emulator): about 170 bytes of JSON, as the
/// egress check writes it.
fn answer(egress: &Egress, i: u64) -> Arc<Exchange> {
    let body = format!(
        "{{\"backend_session_id\": \"{:08x}-1c2d-4e5f-8a9b-0c1d2e3f4a5b\", \"result\": true, \
         \"prediction\": \"0.{:06}\", \"created_at\": \"2026-11-25T10:00:00.000Z\", \
         \"failure_reason\": null}}",
        i,
        i % 1_000_000
    );
    let raw = UpstreamAnswer {
        status: 200,
        head: Default::default(),
        body: Bytes::from(body),
    };
    let checked = egress.check(&raw).expect("no secret").into_answer(None);
    Arc::new(Exchange {
        outcome: Ok(checked),
        class: UpstreamClass::Ok,
        upstream_status: Some(200),
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

fn digest(i: u64) -> [u8; 32] {
    *blake3::hash(&i.to_le_bytes()).as_bytes()
}

/// Fill a cache of `max_bytes` with `n` distinct verdicts; return the live heap it holds over
/// `max_bytes`.
async fn fill(max_bytes: u64, n: u64) -> f64 {
    let keys = OrgKeys {
        keys: vec![NamedKey {
            id: "default".into(),
            key: OrgApiKey::new("organization-key"),
            file: None,
        }],
        default: None,
    };
    let counter = prometheus::IntCounter::new("echoes", "echoes").expect("counter");
    let egress = Egress::new(&keys, &[], None, counter);
    let (live0, rss0) = (LIVE.load(Ordering::Relaxed), rss_bytes());
    let c = VerdictCache::new(&CacheConfig {
        enabled: true,
        scope: CacheScope::Tenant,
        max_bytes,
        ttl: Duration::from_secs(3600),
        pass_ttl: Duration::from_secs(3600),
        allow_bypass: false,
    });
    for i in 0..n {
        let k = cache::key(CacheScope::Tenant, "mobile-app", None, digest(i));
        if let Lookup::Lead(leader) = c.lookup(Some(k), false).await {
            leader.finish(answer(&egress, i)).await;
        }
        if i % 10_000 == 0 {
            c.sync().await;
        }
    }
    c.sync().await;
    let live = LIVE.load(Ordering::Relaxed).saturating_sub(live0);
    let rss = rss_bytes().saturating_sub(rss0);
    let entries = c.entries().max(1);
    println!(
        "max_bytes {:>4} MiB, {:>7} inserted: {:>7} entries, charged {:>6.1} MiB ({:>3} B/entry), \
         live heap {:>6.1} MiB ({:>3} B/entry, {:.2}x the bound), RSS +{:>6.1} MiB ({:.2}x the bound)",
        max_bytes >> 20,
        n,
        entries,
        c.bytes() as f64 / 1048576.0,
        c.bytes() / entries,
        live as f64 / 1048576.0,
        live as u64 / entries,
        live as f64 / max_bytes as f64,
        rss as f64 / 1048576.0,
        rss as f64 / max_bytes as f64,
    );
    live as f64 / max_bytes as f64
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_cache_holds_about_max_bytes_of_memory() {
    // Twice as many verdicts as each cache can hold, so eviction has run.
    for (mib, n) in [(4u64, 12_000u64), (16, 44_000)] {
        let ratio = fill(mib << 20, n).await;
        assert!(
            (0.85..=1.05).contains(&ratio),
            "a full {mib} MiB cache holds {ratio:.2}x max_bytes of live heap"
        );
    }
}
