//! Micro-benchmarks of the hot pure functions, at the sizes of the test photos.
//! Run: `cargo bench --bench hot_paths`.

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use liveness_gateway::cache::{self, Lookup, VerdictCache};
use liveness_gateway::config::{CacheConfig, CacheScope, LimitsConfig, RawIntake, TenantConfig};
use liveness_gateway::image::ImageKind;
use liveness_gateway::intake;
use liveness_gateway::limits::Limits;
use liveness_gateway::secret::OrgApiKey;
use liveness_gateway::tenant::{key_digest_hex, TenantRegistry};
use liveness_gateway::upstream;
use sha2::{Digest, Sha256};

const PHOTOS: [(&str, &str); 4] = [
    ("6KB", "face-small.jpg"),
    ("68KB", "face.jpg"),
    ("134KB", "face-selfie.jpg"),
    ("1.6MB", "face-large.jpg"),
];
const BOUNDARY: &str = "----benchboundary7MA4YWxkTrZu0gW";

fn photo(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture")
}

fn form(image: &[u8]) -> Bytes {
    let mut v = format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"face.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").into_bytes();
    v.extend_from_slice(image);
    v.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    Bytes::from(v)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn intake_benches(c: &mut Criterion) {
    let cfg = RawIntake::default();
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    let mut parse = c.benchmark_group("parse_multipart");
    for (label, name) in PHOTOS {
        let body = form(&photo(name));
        parse.throughput(Throughput::Bytes(body.len() as u64));
        parse.bench_with_input(BenchmarkId::from_parameter(label), &body, |b, body| {
            b.iter(|| intake::parse_bytes(body.clone(), &ct, &cfg).expect("parse"))
        });
    }
    parse.finish();

    let key = OrgApiKey::new("bench-organization-key-0123456789abcdef0123456789");
    let forms: Vec<_> = PHOTOS
        .iter()
        .map(|(label, name)| {
            (
                *label,
                intake::parse_bytes(form(&photo(name)), &ct, &cfg).expect("parse"),
            )
        })
        .collect();
    let mut validate = c.benchmark_group("validate_image");
    for (label, form) in &forms {
        validate.throughput(Throughput::Bytes(form.image.bytes.len() as u64));
        validate.bench_function(*label, |b| {
            b.iter(|| intake::validate_image(&form.image, &cfg).expect("valid"))
        });
    }
    validate.finish();
    // The cache key's digest (BLAKE3) next to SHA-256, which it replaced.
    let mut hash = c.benchmark_group("image_digest");
    for (label, form) in &forms {
        let image = form.image.bytes.bytes();
        hash.throughput(Throughput::Bytes(image.len() as u64));
        hash.bench_function(BenchmarkId::new("blake3", label), |b| {
            b.iter(|| form.image.bytes.digest())
        });
        hash.bench_function(BenchmarkId::new("sha256", label), |b| {
            b.iter(|| <[u8; 32]>::from(Sha256::digest(image)))
        });
    }
    hash.finish();
    let mut assemble = c.benchmark_group("build_upstream_body");
    for (label, form) in &forms {
        assemble.throughput(Throughput::Bytes(form.image.bytes.len() as u64));
        assemble.bench_function(*label, |b| {
            b.iter(|| upstream::build_body(&key, ".jpg", ImageKind::Jpeg, &form.image.bytes))
        });
    }
    assemble.finish();
}

fn tenants(n: usize) -> Vec<TenantConfig> {
    (0..n)
        .map(|i| {
            let mut d = [0u8; 32];
            hex::decode_to_slice(key_digest_hex(&format!("key-{i}")), &mut d).expect("hex");
            TenantConfig {
                id: format!("t{i}"),
                key_digests: vec![d],
                disabled: false,
                rate: liveness_gateway::limits::Rate::per_second(1_000_000),
                burst: 1_000_000,
                daily_budget: None,
                monthly_budget: None,
                require_header_credentials: false,
                price_per_call: None,
                allowed_origins: Vec::new(),
                org_keys: Vec::new(),
                allow_static_keys: true,
                require_tokens: Vec::new(),
                per_subject: None,
            }
        })
        .collect()
}

fn lookup_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("tenant_lookup");
    for n in [10, 100] {
        let reg = TenantRegistry::new(tenants(n));
        let key = liveness_gateway::secret::TenantKey::new(format!("key-{}", n - 1));
        g.bench_function(format!("{n}_tenants"), |b| {
            b.iter(|| reg.authenticate(&key).expect("found").id.len())
        });
    }
    g.finish();

    let limits = Limits::new(
        &tenants(10),
        &LimitsConfig {
            max_concurrent_upstream: 64,
            upstream_queue_timeout: Duration::from_secs(1),
            global_upstream_rate_per_second: None,
        },
    );
    c.bench_function("limiter_check", |b| {
        b.iter(|| limits.check_tenant("t3").is_ok())
    });

    let rt = rt();
    let cache = VerdictCache::new(&CacheConfig {
        enabled: true,
        scope: CacheScope::Tenant,
        max_bytes: 64 << 20,
        ttl: Duration::from_secs(3600),
        pass_ttl: Duration::from_secs(3600),
        allow_bypass: false,
    });
    let key = cache::key(CacheScope::Tenant, "t3", [7; 32]);
    // Fill the entry through the normal leader path.
    rt.block_on(async {
        if let Lookup::Lead(leader) = cache.lookup(Some(key.clone()), false).await {
            let answer = upstream::UpstreamAnswer {
                status: 200,
                content_type: Some("application/json".into()),
                body: Bytes::from_static(br#"{"result": true}"#),
            };
            let verdict = liveness_gateway::verdict::LivenessVerdict {
                result: true,
                prediction: Some(0.9),
                failure_type: None,
            };
            leader
                .finish(std::sync::Arc::new(cache::Exchange {
                    outcome: Ok(answer),
                    class: liveness_gateway::verdict::UpstreamClass::Ok,
                    upstream_status: Some(200),
                    verdict: Some(verdict),
                    session_id: None,
                    upstream_ms: 1,
                }))
                .await;
        }
    });
    c.bench_function("cache_lookup_hit", |b| {
        b.iter(|| {
            rt.block_on(async {
                matches!(cache.lookup(Some(key.clone()), false).await, Lookup::Hit(_))
            })
        })
    });
}

criterion_group!(benches, intake_benches, lookup_benches);
criterion_main!(benches);
