//! Micro-benchmarks of the hot pure functions, at the sizes of the test photos.
//! Run: `cargo bench --bench hot_paths`.

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use liveness_gateway::auth::tenant::TenantRegistry;
use liveness_gateway::cache::{self, Lookup, VerdictCache};
use liveness_gateway::config::{
    key_digest_hex, CacheConfig, CacheScope, LimitsConfig, NamedKey, OrgApiKey, OrgKeys, RawIntake,
    TenantConfig,
};
use liveness_gateway::egress::Egress;
use liveness_gateway::image::ImageKind;
use liveness_gateway::intake;
use liveness_gateway::limits::Limits;
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
                rate: liveness_gateway::config::Rate::per_second(1_000_000),
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
                face_mode: None,
            }
        })
        .collect()
}

fn lookup_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("tenant_lookup");
    let issued = liveness_gateway::issued::Registry::new(
        liveness_gateway::store::LocalStore::open(None).expect("store"),
    );
    for n in [10, 100] {
        let reg = TenantRegistry::new(tenants(n));
        let key = liveness_gateway::config::TenantKey::new(format!("key-{}", n - 1));
        g.bench_function(format!("{n}_tenants"), |b| {
            b.iter(|| reg.authenticate(&issued, &key).expect("found").id.len())
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
    let key = cache::key(CacheScope::Tenant, "t3", None, [7; 32]);
    let egress = egress(10);
    // Fill the entry through the normal leader path.
    rt.block_on(async {
        if let Lookup::Lead(leader) = cache.lookup(Some(key.clone()), false).await {
            let answer = egress
                .check(&raw_answer(200, VERDICT))
                .expect("clean")
                .into_answer(None);
            let verdict = liveness_gateway::verdict::LivenessVerdict {
                result: true,
                prediction: Some(0.9),
                failure_type: None,
            };
            leader
                .finish(std::sync::Arc::new(liveness_gateway::upstream::Exchange {
                    outcome: Ok(answer),
                    class: liveness_gateway::verdict::UpstreamClass::Ok,
                    upstream_status: Some(200),
                    verdict: Some(verdict),
                    session_id: None,
                    upstream_ms: 1,
                    sent_bytes: 0,
                    received_bytes: 0,
                }))
                .await;
        }
    });
    // A hit as it is served: the lookup, and the test that its egress check is current.
    c.bench_function("cache_lookup_hit", |b| {
        b.iter(|| {
            rt.block_on(async {
                match cache.lookup(Some(key.clone()), false).await {
                    Lookup::Hit(e) => cache.current(&key, e, &egress).await.is_some(),
                    _ => false,
                }
            })
        })
    });
}

/// A verdict as the provider writes it (see the emulator).
const VERDICT: &str = r#"{"backend_session_id":"3f2a9c1e-7b4d-4e5f-8a9b-0c1d2e3f4a5b","result":false,"prediction":"0.426584","created_at":"2026-11-25T10:00:00.000Z","failure_reason":{"type":"CALC_RESULT","detail":"Low overall prediction"}}"#;

fn raw_answer(status: u16, body: &str) -> liveness_gateway::verdict::UpstreamAnswer {
    let mut head = http::HeaderMap::new();
    head.insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    head.insert("server", http::HeaderValue::from_static("nginx/1.24.0"));
    head.insert(
        "date",
        http::HeaderValue::from_static("Wed, 25 Nov 2026 10:00:00 GMT"),
    );
    liveness_gateway::verdict::UpstreamAnswer {
        status,
        head,
        body: Bytes::from(body.to_string()),
    }
}

/// The egress check with one organization key and `tenants` tenant keys.
fn egress(tenants_n: usize) -> Egress {
    let keys = OrgKeys {
        keys: vec![NamedKey {
            id: "default".into(),
            key: OrgApiKey::new("bench-organization-key-0123456789abcdef0123456789"),
            file: None,
        }],
        default: None,
    };
    let counter = prometheus::IntCounter::new("echoes", "echoes").expect("counter");
    Egress::new(&keys, &tenants(tenants_n), None, counter)
}

/// The egress check of one provider answer (runs once per upstream call, never on a hit).
fn egress_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("egress_check");
    let refusal = r#"{"detail": "Client does not have subscription"}"#;
    let blob = format!(
        r#"{{"result": true, "face": "{}"}}"#,
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            photo("face-small.jpg")
        )
    );
    for n in [10, 100] {
        let e = egress(n);
        for (label, status, body) in [
            ("verdict", 200, VERDICT),
            ("refusal", 400, refusal),
            ("verdict_with_6KB_base64", 200, blob.as_str()),
        ] {
            let raw = raw_answer(status, body);
            g.throughput(Throughput::Bytes(body.len() as u64));
            g.bench_function(format!("{label}/{n}_tenants"), |b| {
                b.iter(|| e.check(&raw).expect("clean").into_answer(None).body().len())
            });
        }
    }
    g.finish();
}

/// An RSA key made by openssl (as the tests make theirs): its private PEM and its JWK.
fn rsa_key(dir: &std::path::Path) -> (Vec<u8>, serde_json::Value) {
    use base64::Engine;
    let pem = dir.join("rsa.pem");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .arg(&pem)
            .output()
            .expect("openssl (.ci/install-deps installs it)");
        assert!(out.status.success());
        out.stdout
    };
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
    ]);
    let modulus = String::from_utf8(run(&["rsa", "-noout", "-modulus", "-in"])).expect("utf8");
    let n = hex::decode(modulus.trim().trim_start_matches("Modulus=")).expect("hex");
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(n);
    (
        std::fs::read(&pem).expect("pem"),
        serde_json::json!({"kty": "RSA", "kid": "rs", "alg": "RS256", "use": "sig", "n": b64, "e": "AQAB"}),
    )
}

/// What one app token costs a request: verified from scratch (cold: signature and claims), or
/// found among the remembered verifications (a token reused for several calls), per algorithm.
fn token_benches(c: &mut Criterion) {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use liveness_gateway::auth::{self, tools, Issuer, KeySet, Remembered};
    use liveness_gateway::config::{IssuerConfig, JwksSource};

    let dir = tempfile::tempdir().expect("dir");
    let (es_pem, es_jwks) = tools::keygen("ES256", "es").expect("es");
    let (ed_pem, ed_jwks) = tools::keygen("EdDSA", "ed").expect("ed");
    let (rs_pem, rs_jwk) = rsa_key(dir.path());
    let jwks = serde_json::json!({"keys": [es_jwks["keys"][0], ed_jwks["keys"][0], rs_jwk]});
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks.to_string()).expect("jwks");
    let settings = IssuerConfig {
        id: "bench".into(),
        issuer: "https://auth.bench.invalid".into(),
        audiences: vec!["liveness-gateway".into()],
        algorithms: vec![Algorithm::ES256, Algorithm::EdDSA, Algorithm::RS256],
        tenant: "t".into(),
        subject_claim: "sub".into(),
        subjects: Vec::new(),
        header: None,
        leeway: Duration::from_secs(60),
        max_lifetime: Duration::from_secs(3600),
        single_use: false,
        jwks: JwksSource::File(path.clone()),
        freshness: Default::default(),
    };
    let issuer = Issuer {
        settings,
        keys: std::sync::Arc::new(KeySet::from_file(path).expect("keys")),
    };
    let issuers = [issuer];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = serde_json::json!({"iss": "https://auth.bench.invalid", "aud": "liveness-gateway",
                                    "sub": "user-1", "iat": now, "exp": now + 600});
    let token = |alg: Algorithm, kid: &str, key: EncodingKey| {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, &key).expect("token")
    };
    let tokens = [
        (
            "ES256",
            token(
                Algorithm::ES256,
                "es",
                EncodingKey::from_ec_pem(es_pem.as_bytes()).expect("es"),
            ),
        ),
        (
            "RS256",
            token(
                Algorithm::RS256,
                "rs",
                EncodingKey::from_rsa_pem(&rs_pem).expect("rs"),
            ),
        ),
        (
            "EdDSA",
            token(
                Algorithm::EdDSA,
                "ed",
                EncodingKey::from_ed_pem(ed_pem.as_bytes()).expect("ed"),
            ),
        ),
    ];
    let rt = rt();
    let client = reqwest::Client::new();
    let remembered = Remembered::default();
    let mut g = c.benchmark_group("token_verify");
    for (alg, t) in &tokens {
        g.bench_with_input(BenchmarkId::new("cold", alg), t, |b, t| {
            b.iter(|| {
                rt.block_on(auth::verify(&issuers, None, t, now, &client, |_, _| {}))
                    .expect("valid")
            })
        });
        let v = rt
            .block_on(auth::verify(&issuers, None, t, now, &client, |_, _| {}))
            .expect("valid");
        remembered.insert(Remembered::key(None, t), v);
        g.bench_with_input(BenchmarkId::new("remembered", alg), t, |b, t| {
            b.iter(|| {
                remembered
                    .get(&Remembered::key(None, t), now)
                    .expect("remembered")
            })
        });
    }
    g.finish();
}

/// Signing one answer's receipt (runs once per answer with a verdict, a hit included), with each
/// algorithm; the key is parsed once, when the config is loaded. Compare with `cache_lookup_hit`.
fn receipt_benches(c: &mut Criterion) {
    use liveness_gateway::config::{ReceiptKey, ReceiptsConfig, SigningPem};
    use liveness_gateway::receipt::{Facts, Receipts};
    let mut g = c.benchmark_group("receipt_sign");
    for alg in ["EdDSA", "ES256"] {
        let (pem, _) = liveness_gateway::auth::tools::keygen(alg, "bench").expect("key");
        let receipts = Receipts::new(&ReceiptsConfig {
            issuer: "https://liveness.example.com".into(),
            key: ReceiptKey::Pem(SigningPem::new(pem)),
            kid: None,
            ttl: std::time::Duration::from_secs(600),
            listed_jwks_file: None,
        })
        .expect("receipts");
        let image = format!("blake3:{}", "ab".repeat(32));
        let facts = Facts {
            tenant: "mobile-app",
            subject: Some("user-1"),
            request_id: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
            answer: VERDICT.as_bytes(),
            image: &image,
            hit: true,
            replay_suspected: false,
            nonce: Some("Qm9vdHN0cmFwIG5vbmNlIDEyMw"),
            face: Some("face"),
        };
        g.bench_function(alg, |b| {
            b.iter(|| receipts.sign(&facts, 1_800_000_000).expect("signed"))
        });
    }
    g.finish();
}

/// A photo converted to JPEG by the conversion pool (HEIC from libheif's `heif-enc`, WebP from
/// `cwebp`, made here from the test photos; `.ci/install-deps test` installs both), decode,
/// encode and the hand-over to its blocking thread included: what one call's conversion costs.
fn conversion_benches(c: &mut Criterion) {
    use liveness_gateway::convert::Converter;
    use liveness_gateway::image::ImageBytes;
    let dir = tempfile::tempdir().expect("dir");
    let intake = RawIntake::default();
    let mut one = intake.clone();
    one.convert.workers = 1;
    let pool = Converter::new(&one);
    let metrics = liveness_gateway::metrics::Metrics::new().expect("metrics");
    let rt = rt();
    let mut g = c.benchmark_group("convert_to_jpeg");
    g.sample_size(10);
    for (label, name) in PHOTOS {
        let src = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        for (kind, ext) in [(ImageKind::Heic, "heic"), (ImageKind::Webp, "webp")] {
            let out = dir.path().join(format!("{name}.{ext}"));
            let o = out.to_string_lossy().to_string();
            let made = match kind {
                ImageKind::Heic => std::process::Command::new("heif-enc")
                    .args(["-q", "85", "-o", &o, &src])
                    .output(),
                _ => std::process::Command::new("cwebp")
                    .args(["-quiet", "-q", "90", &src, "-o", &o])
                    .output(),
            };
            assert!(made.expect("heif-enc / cwebp").status.success());
            let image = ImageBytes::new(std::fs::read(&out).expect("encoded").into());
            g.bench_function(BenchmarkId::new(ext, label), |b| {
                b.iter(|| {
                    rt.block_on(pool.to_jpeg(kind, &image, &metrics))
                        .expect("converted")
                })
            });
        }
    }
    g.finish();
}

/// The face check (`intake.face`) as a worker runs it: decode at reduced scale, bring down to
/// `max_pixels`, detect; one core, so the time is its CPU. Target: 15 ms for every photo size.
fn face_benches(c: &mut Criterion) {
    use liveness_gateway::config::RawFace;
    use liveness_gateway::face::{examine, Outcome};
    let cfg = RawFace::default();
    let mut g = c.benchmark_group("face_check");
    g.sample_size(20);
    for (label, name, kind) in [
        ("128px_6KB", "face-small.jpg", ImageKind::Jpeg),
        ("512px_68KB", "face.jpg", ImageKind::Jpeg),
        ("960px_134KB", "face-selfie.jpg", ImageKind::Jpeg),
        ("3000px_1.6MB", "face-large.jpg", ImageKind::Jpeg),
        ("512px_png_792KB", "face.png", ImageKind::Png),
    ] {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let data = std::fs::read(path).expect("fixture");
        assert_eq!(examine(kind, &data, &cfg), Outcome::Face, "{name}");
        g.bench_function(label, |b| b.iter(|| examine(kind, &data, &cfg)));
    }
    g.finish();
}

criterion_group!(
    benches,
    intake_benches,
    lookup_benches,
    egress_benches,
    token_benches,
    receipt_benches,
    conversion_benches,
    face_benches
);
criterion_main!(benches);
