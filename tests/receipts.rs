//! Verdict receipts (docs/receipts.md) from a live gateway: verified over its JWKS by the
//! backend snippets of the docs, run as written (Python with PyJWT, Node with `jose`); the
//! attempt's nonce from the header, the form and the app token; a key rotation.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use support::*;

/// The docs' two verifiers in a folder, each with a `main` that prints the claims it accepted
/// as JSON, or `REFUSED` and why.
struct Verifiers {
    dir: tempfile::TempDir,
}

impl Verifiers {
    fn new() -> Verifiers {
        let dir = tempfile::tempdir().expect("dir");
        let python = docs_block("docs/receipts.md", "python", "def verify_receipt(");
        std::fs::write(
            dir.path().join("verify.py"),
            format!(
                "{python}\n\nimport json, sys\ntry:\n    print(json.dumps(verify_receipt(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] or None)))\nexcept Exception as e:\n    print('REFUSED ' + type(e).__name__ + ': ' + str(e))\n"
            ),
        )
        .expect("py");
        let node = docs_block(
            "docs/receipts.md",
            "js",
            "export async function verifyReceipt(",
        );
        std::fs::write(
            dir.path().join("verify.mjs"),
            format!(
                "{node}\n\nconst [receipt, nonce, tenant, user] = process.argv.slice(2);\ntry {{\n  console.log(JSON.stringify(await verifyReceipt(receipt, {{ nonce, tenant, user: user || undefined }})));\n}} catch (e) {{\n  console.log('REFUSED ' + e.name + ': ' + e.message);\n}}\n"
            ),
        )
        .expect("js");
        link_node_modules(dir.path());
        Verifiers { dir }
    }

    /// What each verifier makes of a receipt: the claims, or the reason it refused.
    fn check(&self, gw: &str, r: &str, nonce: &str, tenant: &str, user: &str) -> Vec<Verdict> {
        [("python3", "verify.py"), ("node", "verify.mjs")]
            .into_iter()
            .map(|(program, file)| {
                let out = Command::new(program)
                    .arg(file)
                    .args([r, nonce, tenant, user])
                    .env("LIVENESS_GATEWAY_URL", gw)
                    .env("LIVENESS_RECEIPT_ISSUER", ISSUER)
                    .current_dir(self.dir.path())
                    .output()
                    .unwrap_or_else(|e| panic!("{program}: {e} (.ci/install-deps installs it)"));
                let stdout = String::from_utf8_lossy(&out.stdout);
                let line = stdout.lines().last().unwrap_or_default().trim().to_string();
                assert!(
                    out.status.success() && !line.is_empty(),
                    "{program} failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                match line.strip_prefix("REFUSED ") {
                    Some(why) => Verdict::Refused(format!("{program}: {why}")),
                    None => Verdict::Claims(serde_json::from_str(&line).expect("claims")),
                }
            })
            .collect()
    }

    /// Both verifiers accept the receipt: its claims (the same for both).
    fn accept(&self, gw: &str, r: &str, nonce: &str, tenant: &str, user: &str) -> Value {
        let got = self.check(gw, r, nonce, tenant, user);
        let claims: Vec<Value> = got
            .iter()
            .map(|v| match v {
                Verdict::Claims(c) => c.clone(),
                Verdict::Refused(why) => panic!("refused a good receipt: {why}"),
            })
            .collect();
        assert_eq!(claims[0], claims[1], "the two verifiers read it alike");
        claims[0].clone()
    }

    /// Both verifiers refuse the receipt.
    fn refuse(&self, gw: &str, r: &str, nonce: &str, tenant: &str, user: &str) {
        for v in self.check(gw, r, nonce, tenant, user) {
            if let Verdict::Claims(c) = v {
                panic!("accepted a receipt it should refuse: {c}");
            }
        }
    }
}

/// A request that must be refused: its headers, its form, the code.
type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<Part>, &'a str);

enum Verdict {
    Claims(Value),
    Refused(String),
}

const ISSUER: &str = "https://liveness.test";

/// A signing key made by the binary, as docs/receipts.md says: its path and its public JWKS.
fn signing_key(dir: &Path, alg: &str, kid: &str) -> (PathBuf, String) {
    let path = dir.join(format!("{kid}.pem"));
    let jwks = tokens_keygen(alg, kid, &path);
    (path, jwks)
}

/// `[receipts]` with the signing key at `key`, and more settings as `(key, TOML value)`.
fn with_receipts(gw: TestGateway, key: &Path, more: &[(&str, &str)]) -> TestGateway {
    let mut gw = gw.set("receipts.issuer", &format!("{ISSUER:?}")).set(
        "receipts.key_file",
        &format!("{:?}", key.display().to_string()),
    );
    for (k, v) in more {
        gw = gw.set(&format!("receipts.{k}"), v);
    }
    gw
}

fn header_kid(receipt: &str) -> String {
    let part = receipt.split('.').next().expect("a JWS");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url");
    let header: Value = serde_json::from_slice(&bytes).expect("json");
    header["kid"].as_str().unwrap_or_default().to_string()
}

/// A receipt with one byte changed at `at` (of the payload or the signature).
fn flipped(receipt: &str, at: usize) -> String {
    let mut bytes = receipt.as_bytes().to_vec();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).expect("ascii")
}

async fn post_with(url: &str, headers: &[(&str, &str)], parts: &[Part]) -> Answer {
    post(url, headers, multipart(parts)).await
}

/// Two replicas of `builder`, each a process of its own: `a` and `b`.
async fn two_replicas(
    builder: &TestGateway,
    dir: &Path,
) -> [(GatewayProcess, liveness_gateway::config::Config); 2] {
    let a = GatewayProcess::start_named(&builder.replica(), dir, "a", &[]).await;
    let b = GatewayProcess::start_named(&builder.replica(), dir, "b", &[]).await;
    [a, b]
}

/// An app-token issuer `app` for tenant `alpha`, its signing key made by the binary.
struct AppIssuer {
    key: PathBuf,
    jwks: PathBuf,
}

impl AppIssuer {
    fn new(dir: &Path) -> AppIssuer {
        let (key, jwks) = signing_key(dir, "ES256", "t1");
        let path = dir.join("tokens.json");
        std::fs::write(&path, jwks).expect("jwks");
        AppIssuer { key, jwks: path }
    }

    /// The gateway with this issuer.
    fn on(&self, gw: TestGateway) -> TestGateway {
        gw.set(
            "auth.issuers",
            &format!(
                "[{{ id = \"app\", issuer = \"https://auth.test\", audiences = [\"liveness-gateway\"], jwks_file = {:?}, algorithms = [\"ES256\"], tenant = \"alpha\" }}]",
                self.jwks.display().to_string()
            ),
        )
    }

    /// `Bearer <token>` for user `sub`, bound to `nonce` when given (`tokens mint`).
    fn mint(&self, sub: &str, nonce: Option<&str>) -> String {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_liveness-gateway"));
        cmd.args([
            "tokens",
            "mint",
            "--kid",
            "t1",
            "--iss",
            "https://auth.test",
        ])
        .args(["--aud", "liveness-gateway", "--sub", sub, "--key-file"])
        .arg(&self.key);
        if let Some(n) = nonce {
            cmd.args(["--nonce", n]);
        }
        let out = cmd.output().expect("mint");
        assert!(out.status.success());
        format!("Bearer {}", String::from_utf8_lossy(&out.stdout).trim())
    }
}

/// A miss and a hit each get a receipt that the documented verifiers accept, with the verdict,
/// the image's digest, the attempt's nonce and where the verdict came from; a receipt for
/// another attempt or tenant, or with a byte changed, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_of_a_miss_and_a_hit_verify_with_the_documented_snippets() {
    let dir = tempfile::tempdir().expect("dir");
    let (key, _) = signing_key(dir.path(), "EdDSA", "k1");
    let emu = start_emulator();
    let gw = with_receipts(TestGateway::for_emulator(&emu), &key, &[]).start();
    let verifiers = Verifiers::new();
    let (image, _) = image_with_verdict(true, 1);
    let auth = ("Authorization", "Bearer alpha-key");

    let miss = post_with(
        &gw.url(),
        &[auth, ("Liveness-Nonce", "attempt-1")],
        &[Part::image("a.jpg", &image)],
    )
    .await;
    assert_eq!(miss.status, 200, "{}", miss.text());
    assert_eq!(miss.header("x-cache").as_deref(), Some("MISS"));
    let r1 = miss.header("liveness-receipt").expect("a receipt");
    let hit = post_with(
        &gw.url(),
        &[auth, ("Liveness-Nonce", "attempt-2")],
        &[Part::image("a.jpg", &image)],
    )
    .await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    let r2 = hit.header("liveness-receipt").expect("a receipt");
    assert_eq!(emu.stats().calls, 1);

    let url = gw.url();
    let c1 = verifiers.accept(&url, &r1, "attempt-1", "alpha", "");
    let body = miss.json();
    assert_eq!(c1["iss"], ISSUER);
    assert_eq!(c1["aud"], "alpha");
    assert_eq!(c1["sub"], Value::Null, "a tenant key names no user");
    assert_eq!(c1["result"], true);
    assert_eq!(c1["prediction"], body["prediction"]);
    assert_eq!(c1["failure_type"], Value::Null);
    assert_eq!(c1["session"], body["backend_session_id"]);
    assert!(c1["session"].is_string());
    assert_eq!(
        c1["image"],
        format!("blake3:{}", blake3::hash(&image).to_hex())
    );
    assert_eq!(c1["cache"], "miss");
    assert_eq!(c1["replay_suspected"], false);
    assert_eq!(c1["nonce"], "attempt-1");
    assert_eq!(
        c1["request_id"].as_str(),
        miss.header("x-request-id").as_deref()
    );
    let ttl = c1["exp"].as_u64().unwrap_or(0) - c1["iat"].as_u64().unwrap_or(0);
    assert_eq!(ttl, 600, "receipts.ttl defaults to 10 min");

    let c2 = verifiers.accept(&url, &r2, "attempt-2", "alpha", "");
    assert_eq!(c2["cache"], "hit");
    assert_eq!(c2["session"], c1["session"], "the original call's session");
    assert_ne!(c2["jti"], c1["jti"], "a jti of its own");
    assert_eq!(hit.body, miss.body, "the body stays the provider's");

    // Another attempt's receipt, another tenant's, or one with a byte changed: refused.
    verifiers.refuse(&url, &r1, "attempt-2", "alpha", "");
    verifiers.refuse(&url, &r1, "attempt-1", "beta", "");
    let payload_at = r1.find('.').expect("dot") + 8;
    let signature_at = r1.len() - 5;
    verifiers.refuse(&url, &flipped(&r1, payload_at), "attempt-1", "alpha", "");
    verifiers.refuse(&url, &flipped(&r1, signature_at), "attempt-1", "alpha", "");

    // A failed verdict: its type, as the provider wrote it.
    let (failing, _) = image_with_verdict(false, 1);
    let fail = post_with(
        &gw.url(),
        &[auth, ("Liveness-Nonce", "attempt-3")],
        &[Part::image("a.jpg", &failing)],
    )
    .await;
    assert_eq!(fail.json()["result"], false);
    let r3 = fail.header("liveness-receipt").expect("a receipt");
    let c3 = verifiers.accept(&url, &r3, "attempt-3", "alpha", "");
    assert_eq!(c3["result"], false);
    assert_eq!(c3["failure_type"], fail.json()["failure_reason"]["type"]);
    assert_eq!(c3["failure_type"], "CALC_RESULT");

    // A refusal carries no receipt.
    let refused = post_with(&gw.url(), &[auth], &[Part::image("a.gif", &image)]).await;
    assert_eq!(refused.status, 415);
    assert!(refused.header("liveness-receipt").is_none());
}

/// The nonce comes from the `Liveness-Nonce` header, the `nonce` field, or an app token's
/// `nonce` claim, and they must agree; an invalid one is refused. None of these refusals calls
/// the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nonce_comes_from_the_header_the_field_or_the_token_and_they_must_agree() {
    let dir = tempfile::tempdir().expect("dir");
    let (key, _) = signing_key(dir.path(), "ES256", "k1");
    let app = AppIssuer::new(dir.path());
    let emu = start_emulator();
    let gw = app
        .on(with_receipts(TestGateway::for_emulator(&emu), &key, &[]))
        .start();
    let mint = |nonce: Option<&str>| app.mint("user-7", nonce);
    let bound = mint(Some("token-nonce"));
    let key_auth = ("Authorization", "Bearer alpha-key");
    let mut n = 100;
    let mut image = || {
        n += 1;
        Part::image("a.jpg", &variant(&fixture("face.jpg"), n))
    };

    // From the form's field.
    let a = post_with(
        &gw.url(),
        &[key_auth],
        &[Part::text("nonce", "field-nonce"), image()],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let r = a.header("liveness-receipt").expect("receipt");
    assert_eq!(receipt_claims(&r)["nonce"], "field-nonce");

    // From the token, which names the user too; the same nonce in the header is fine.
    for extra in [None, Some("token-nonce")] {
        let mut headers = vec![("Authorization", bound.as_str())];
        headers.extend(extra.map(|n| ("Liveness-Nonce", n)));
        let a = post_with(&gw.url(), &headers, &[image()]).await;
        assert_eq!(a.status, 200, "{}", a.text());
        let claims = receipt_claims(&a.header("liveness-receipt").expect("receipt"));
        assert_eq!(claims["nonce"], "token-nonce");
        assert_eq!(claims["sub"], "user-7");
        assert_eq!(claims["aud"], "alpha");
    }
    // Without any: the receipt says so.
    let unbound = mint(None);
    let a = post_with(
        &gw.url(),
        &[("Authorization", unbound.as_str())],
        &[image()],
    )
    .await;
    assert_eq!(
        receipt_claims(&a.header("liveness-receipt").expect("receipt"))["nonce"],
        Value::Null
    );
    let calls = emu.stats().calls;

    // Disagreements and bad nonces.
    let long = "n".repeat(129);
    let cases: Vec<Case> = vec![
        (
            vec![
                ("Authorization", bound.as_str()),
                ("Liveness-Nonce", "other"),
            ],
            vec![image()],
            "nonce_mismatch",
        ),
        (
            vec![("Authorization", bound.as_str())],
            vec![Part::text("nonce", "other"), image()],
            "nonce_mismatch",
        ),
        (
            vec![key_auth, ("Liveness-Nonce", "one")],
            vec![Part::text("nonce", "two"), image()],
            "nonce_mismatch",
        ),
        (
            vec![key_auth],
            vec![Part::text("nonce", "a"), Part::text("nonce", "a"), image()],
            "nonce_mismatch",
        ),
        (
            vec![key_auth, ("Liveness-Nonce", "has space")],
            vec![image()],
            "invalid_nonce",
        ),
        (
            vec![key_auth],
            vec![Part::text("nonce", &long), image()],
            "invalid_nonce",
        ),
    ];
    for (headers, parts, code) in cases {
        let a = post_with(&gw.url(), &headers, &parts).await;
        assert_eq!(
            (a.status, a.code()),
            (400, code.to_string()),
            "{}",
            a.text()
        );
        assert!(a.header("liveness-receipt").is_none());
    }
    assert_eq!(emu.stats().calls, calls, "no refusal called the provider");
}

/// A pass another tenant's call made is flagged in the receipt as a likely replay (and
/// counted), however it reaches this tenant: a verdict another replica of the fleet had, a call
/// it joined, or this replica's cache. (Before: only the last; the first two said
/// `replay_suspected: false`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_made_for_another_tenant_is_flagged_however_it_arrives() {
    let dir = tempfile::tempdir().expect("dir");
    let (key, _) = signing_key(dir.path(), "EdDSA", "k1");
    let redis = RedisServer::start();
    let emu = start_emulator();
    let fleet = with_receipts(TestGateway::for_emulator(&emu), &key, &[])
        .set("cache.scope", "\"shared\"")
        .set("store.backend", "\"redis\"")
        .set("store.url", &format!("{:?}", redis.url()));
    let a = fleet.replica().start();
    let b = fleet.replica().start();
    let ask = |url: String, key: &'static str, image: Vec<u8>| async move {
        let answer = post_with(
            &url,
            &[("Authorization", key)],
            &[Part::image("a.jpg", &image)],
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let claims = receipt_claims(&answer.header("liveness-receipt").expect("receipt"));
        (answer.header("x-cache").unwrap_or_default(), claims)
    };

    // Another replica's verdict.
    let (first, _) = image_with_verdict(true, 1);
    let (cache, c) = ask(a.url(), "Bearer alpha-key", first.clone()).await;
    assert_eq!(
        (cache.as_str(), c["replay_suspected"].clone()),
        ("MISS", false.into())
    );
    let (cache, c) = ask(b.url(), "Bearer beta-key", first).await;
    assert_eq!(cache, "HIT", "from the fleet's level");
    assert_eq!(c["aud"], "beta");
    assert_eq!(
        c["replay_suspected"], true,
        "another replica's pass for alpha"
    );

    // A call joined while it runs.
    let (second, _) = image_with_verdict(true, 100);
    emu.set_latency(Duration::from_millis(1500));
    let leader = tokio::spawn(ask(a.url(), "Bearer alpha-key", second.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (cache, c) = ask(a.url(), "Bearer beta-key", second).await;
    emu.set_latency(Duration::ZERO);
    let (_, lc) = leader.await.expect("leader");
    assert_eq!(lc["replay_suspected"], false, "the tenant that paid");
    assert_eq!(cache, "COALESCED");
    assert_eq!(c["replay_suspected"], true, "a call for alpha, joined");

    // This replica's cache.
    let (third, _) = image_with_verdict(true, 200);
    ask(a.url(), "Bearer alpha-key", third.clone()).await;
    let (cache, c) = ask(a.url(), "Bearer beta-key", third).await;
    assert_eq!(
        (cache.as_str(), c["replay_suspected"].clone()),
        ("HIT", true.into())
    );

    let counted = |m: &str| {
        sample(
            m,
            r#"liveness_gateway_replay_suspected_total{tenant="beta"}"#,
        )
    };
    let (ma, mb) = (
        metrics_text(&a.admin_url()).await,
        metrics_text(&b.admin_url()).await,
    );
    assert_eq!(
        (counted(&ma), counted(&mb)),
        (2.0, 1.0),
        "each counted once"
    );
}

/// A rotation as docs/receipts.md says: the next key listed first, then signing, with the old
/// key's served entry listed. New receipts carry the new `kid`; old ones still verify while the
/// old key is listed, and no longer once it is dropped. The JWKS is served on the client and
/// admin listeners alike, with caching headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_signs_new_receipts_and_old_ones_verify_while_listed() {
    let dir = tempfile::tempdir().expect("dir");
    let (old_key, _) = signing_key(dir.path(), "ES256", "2026-11");
    let (new_key, new_jwks) = signing_key(dir.path(), "EdDSA", "2026-12");
    let listed_file = dir.path().join("listed.json");
    let listed = format!("{:?}", listed_file.display().to_string());
    let emu = start_emulator();
    let builder = TestGateway::for_emulator(&emu);
    let config = dir.path().join("gateway.toml");
    let gw = with_receipts(builder.clone(), &old_key, &[("kid", "\"2026-11\"")])
        .start_from_file(&config);
    let verifiers = Verifiers::new();
    let url = gw.url();
    let auth = ("Authorization", "Bearer alpha-key");
    let ask = |n: u64, nonce: &'static str| {
        let url = url.clone();
        async move {
            let a = post_with(
                &url,
                &[auth, ("Liveness-Nonce", nonce)],
                &[Part::image("a.jpg", &variant(&fixture("face.jpg"), n))],
            )
            .await;
            assert_eq!(a.status, 200, "{}", a.text());
            a.header("liveness-receipt").expect("receipt")
        }
    };
    let kids = |jwks: &Value| -> Vec<String> {
        jwks["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .filter_map(|k| k["kid"].as_str().map(str::to_string))
            .collect()
    };
    let old = ask(1, "before").await;
    assert_eq!(header_kid(&old), "2026-11");

    let admin = gw.admin_url();
    let reload = |to: TestGateway| {
        std::fs::write(&config, to.toml()).expect("config");
        let admin = admin.clone();
        async move { assert_eq!(admin_reload(&admin).await, 200) }
    };

    // 1. The next key is published before it signs.
    std::fs::write(&listed_file, &new_jwks).expect("listed");
    reload(with_receipts(
        builder.clone(),
        &old_key,
        &[("kid", "\"2026-11\""), ("listed_jwks_file", &listed)],
    ))
    .await;
    let served = admin_json(&gw.admin_url(), "/.well-known/jwks.json").await;
    assert_eq!(kids(&served), ["2026-11", "2026-12"]);
    assert_eq!(header_kid(&ask(3, "between").await), "2026-11");

    // 3. It signs; the old key's entry, as served, is listed (the next key's may stay: it is
    // served once).
    let old_entry = served["keys"][0].clone();
    let new_entry = served["keys"][1].clone();
    std::fs::write(
        &listed_file,
        serde_json::json!({ "keys": [old_entry, new_entry] }).to_string(),
    )
    .expect("listed");
    reload(with_receipts(
        builder.clone(),
        &new_key,
        &[("kid", "\"2026-12\""), ("listed_jwks_file", &listed)],
    ))
    .await;
    let new = ask(2, "after").await;
    assert_eq!(header_kid(&new), "2026-12");
    verifiers.accept(&url, &new, "after", "alpha", "");
    verifiers.accept(&url, &old, "before", "alpha", "");

    for base in [gw.url(), gw.admin_url()] {
        let resp = client()
            .get(format!("{base}/.well-known/jwks.json"))
            .send()
            .await
            .expect("jwks");
        assert_eq!(resp.status(), 200, "{base}");
        let cache = resp
            .headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert_eq!(cache, "public, max-age=300", "{base}");
        let jwks: Value = resp.json().await.expect("json");
        assert_eq!(kids(&jwks), ["2026-12", "2026-11"], "{base}");
        assert!(
            jwks["keys"]
                .as_array()
                .expect("keys")
                .iter()
                .all(|k| k.get("d").is_none()),
            "no private member"
        );
    }

    // 4. The old key dropped: its receipts no longer verify.
    reload(with_receipts(builder, &new_key, &[("kid", "\"2026-12\"")])).await;
    verifiers.refuse(&url, &old, "before", "alpha", "");
    verifiers.accept(&url, &new, "after", "alpha", "");
}

/// Without `[receipts]` an answer has no receipt and the JWKS path is not found; with them, a
/// browser may send the nonce and read the receipt (CORS), and `check-config` reads the key
/// and says what is wrong with it without its text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_off_cors_and_check_config() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let a = post_image(&gw.url(), "alpha-key", "a.jpg", &fixture("face.jpg")).await;
    assert_eq!(a.status, 200);
    assert!(a.header("liveness-receipt").is_none());
    let resp = client()
        .get(format!("{}/.well-known/jwks.json", gw.url()))
        .send()
        .await
        .expect("jwks");
    assert_eq!(resp.status(), 404);
    drop(gw);

    let dir = tempfile::tempdir().expect("dir");
    let (key, _) = signing_key(dir.path(), "EdDSA", "k1");
    let origin = "https://app.example";
    let gw = with_receipts(TestGateway::for_emulator(&emu), &key, &[])
        .set("cors.allowed_origins", &format!("[{origin:?}]"))
        .start();
    let preflight = client()
        .request(reqwest::Method::OPTIONS, format!("{}{ROUTE}", gw.url()))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "liveness-nonce")
        .send()
        .await
        .expect("preflight");
    let allowed = preflight
        .headers()
        .get("access-control-allow-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(allowed.contains("Liveness-Nonce"), "{allowed}");
    let a = post_with(
        &gw.url(),
        &[("Authorization", "Bearer alpha-key"), ("Origin", origin)],
        &[Part::image("a.jpg", &variant(&fixture("face.jpg"), 3))],
    )
    .await;
    assert!(a.header("liveness-receipt").is_some());
    let exposed = a
        .header("access-control-expose-headers")
        .unwrap_or_default();
    assert!(exposed.contains("Liveness-Receipt"), "{exposed}");
    let wrong = client()
        .post(format!("{}/.well-known/jwks.json", gw.url()))
        .send()
        .await
        .expect("post");
    assert_eq!(wrong.status(), 405);
    assert_eq!(
        wrong.headers().get("allow").and_then(|v| v.to_str().ok()),
        Some("GET, HEAD")
    );
    let served = client()
        .get(format!("{}/.well-known/jwks.json", gw.url()))
        .send()
        .await
        .expect("jwks");
    assert_eq!(served.status(), 200);
    let metrics = metrics_text(&gw.admin_url()).await;
    let requests = |outcome: &str| {
        sample(
            &metrics,
            &format!(r#"liveness_gateway_requests_total{{outcome="{outcome}",tenant="unknown"}}"#),
        )
    };
    assert_eq!(requests("keys"), 1.0, "{metrics}");
    assert_eq!(requests("preflight"), 1.0, "{metrics}");
    assert_eq!(
        requests("upstream_error"),
        0.0,
        "a JWKS request or a preflight is no upstream error"
    );

    // check-config: a key that is not one, a private key among the previous ones.
    let bad = dir.path().join("bad.pem");
    std::fs::write(
        &bad,
        "-----BEGIN PRIVATE KEY-----\nTUlJQm9ndXM=\n-----END PRIVATE KEY-----\n",
    )
    .expect("bad");
    let mut private =
        serde_json::from_str::<Value>(&tokens_keygen("EdDSA", "old", &dir.path().join("old.pem")))
            .expect("jwks");
    private["keys"][0]["d"] = "c2VjcmV0".into();
    let previous = dir.path().join("previous.json");
    std::fs::write(&previous, private.to_string()).expect("previous");
    let listed = format!("{:?}", previous.display().to_string());
    for (config, says) in [
        (
            with_receipts(TestGateway::for_emulator(&emu), &bad, &[]),
            "neither Ed25519 nor ECDSA",
        ),
        (
            with_receipts(
                TestGateway::for_emulator(&emu),
                &key,
                &[("listed_jwks_file", &listed)],
            ),
            "holds a private",
        ),
        (
            TestGateway::for_emulator(&emu)
                .set("receipts.issuer", &format!("{ISSUER:?}"))
                .set("receipts.key_env", &format!("{ORG_KEY_ENV:?}")),
            "holds an organization key",
        ),
    ] {
        let path = dir.path().join("check.toml");
        std::fs::write(&path, config.toml()).expect("config");
        let (ok, out) = check_config(&path, false);
        assert!(!ok, "{out}");
        assert!(out.contains("receipts") && out.contains(says), "{out}");
        assert!(
            !out.contains("TUlJQm9ndXM") && !out.contains("c2VjcmV0"),
            "{out}"
        );
    }
}

/// A user's failed attempts across two replicas on one Redis: past `max_failed_attempts` fails
/// the provider judged, the user's next call is refused on either replica with
/// `429 too_many_failed_attempts` and `Retry-After` to the end of the day, without reaching the
/// provider; a verdict already made (a cache hit) is still served, and another user is not
/// touched. Calls in flight count as failed until they are settled, so concurrent uploads
/// cannot overshoot the limit. The admin sees the count and resets it (audited, by hash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_failed_attempts_are_limited_across_replicas() {
    let dir = tempfile::tempdir().expect("dir");
    let app = AppIssuer::new(dir.path());
    let redis = RedisServer::start();
    let emu = start_emulator();
    let builder = app
        .on(TestGateway::for_emulator(&emu))
        .tenant_set("alpha", "per_subject", "{ max_failed_attempts = 2 }")
        .set("store.backend", "\"redis\"")
        .set("store.url", &format!("{:?}", redis.url()))
        .set("store.timeout", "\"250ms\"");
    let procs = tempfile::tempdir().expect("dir");
    let [(a, acfg), (_b, bcfg)] = two_replicas(&builder, procs.path()).await;
    let (a_url, b_url) = (
        format!("http://{}", acfg.listen),
        format!("http://{}", bcfg.listen),
    );
    let (a_admin, b_admin) = (
        format!("http://{}", acfg.admin_listen),
        format!("http://{}", bcfg.admin_listen),
    );
    let send = |url: String, token: String, image: Vec<u8>| async move {
        post_with(
            &url,
            &[("Authorization", token.as_str())],
            &[Part::image("a.jpg", &image)],
        )
        .await
    };
    let ana = app.mint("user-ana-7", None);
    let fail = |n| image_with_verdict(false, n).0;

    let first = send(a_url.clone(), ana.clone(), fail(1)).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.json()["result"], false);
    let second = send(b_url.clone(), ana.clone(), fail(1000)).await;
    assert_eq!(second.json()["result"], false);
    let calls = emu.stats().calls;
    for url in [&a_url, &b_url] {
        for image in [fail(2000), image_with_verdict(true, 1).0] {
            let r = send(url.clone(), ana.clone(), image).await;
            assert_eq!(
                (r.status, r.code()),
                (429, "too_many_failed_attempts".to_string()),
                "{}",
                r.text()
            );
            let retry: u64 = r
                .header("retry-after")
                .and_then(|s| s.parse().ok())
                .expect("retry-after");
            assert!((1..=86_400).contains(&retry), "{retry}");
        }
    }
    assert_eq!(
        emu.stats().calls,
        calls,
        "no refused attempt reached the provider"
    );
    // A verdict already made is not a new attempt.
    let hit = send(a_url.clone(), ana.clone(), fail(1)).await;
    assert_eq!(
        (hit.status, hit.header("x-cache")),
        (200, Some("HIT".into()))
    );
    // Another user of the tenant is not touched.
    let bo = send(b_url.clone(), app.mint("user-bo-8", None), fail(3000)).await;
    assert_eq!(bo.status, 200, "{}", bo.text());

    // Concurrent uploads of a fresh user, on both replicas, while the provider is slow: two
    // reach it, the others are refused.
    emu.set_latency(Duration::from_millis(600));
    let cy = app.mint("user-cy-9", None);
    let before = emu.stats().calls;
    let answers = futures_util::future::join_all((0..6u64).map(|n| {
        let url = if n % 2 == 0 { &a_url } else { &b_url };
        send(url.clone(), cy.clone(), fail(4000 + n * 1000))
    }))
    .await;
    emu.set_latency(Duration::ZERO);
    let served = answers.iter().filter(|r| r.status == 200).count();
    let refused = answers
        .iter()
        .filter(|r| r.code() == "too_many_failed_attempts")
        .count();
    assert_eq!((served, refused), (2, 4), "never more calls than the limit");
    assert_eq!(emu.stats().calls, before + 2);

    // Counted on the replica that refused; the admin sees the failed count on either.
    let refusals = |m: &str| {
        sample(
            m,
            r#"liveness_gateway_failed_attempt_limits_total{tenant="alpha"}"#,
        )
    };
    let (ma, mb) = (metrics_text(&a_admin).await, metrics_text(&b_admin).await);
    assert_eq!(refusals(&ma) + refusals(&mb), 8.0);
    assert!(refusals(&ma) >= 2.0 && refusals(&mb) >= 2.0);
    let top = admin_json(&b_admin, "/admin/subjects?tenant=alpha").await;
    assert_eq!(top["max_failed_attempts"], 2, "{top}");
    let failed: Vec<(u64, u64)> = top["subjects"]
        .as_array()
        .expect("subjects")
        .iter()
        .map(|s| {
            (
                s["billable_calls"].as_u64().expect("n"),
                s["failed_attempts"].as_u64().expect("failed"),
            )
        })
        .collect();
    assert_eq!(failed, vec![(2, 2), (2, 2), (1, 1)], "{top}");

    // The reset: by the token's issuer and subject (hashed by the gateway), on either replica.
    let reset = client()
        .post(format!(
            "{a_admin}/admin/subjects/reset?tenant=alpha&issuer=app&sub=user-ana-7"
        ))
        .send()
        .await
        .expect("reset");
    assert_eq!(reset.status().as_u16(), 200);
    let body: Value = reset.json().await.expect("json");
    assert_eq!(body["failed_attempts_before"], 2, "{body}");
    let hash = body["subject"].as_str().expect("hash").to_string();
    assert_eq!(hash.len(), 32);
    let again = send(b_url.clone(), ana.clone(), fail(2000)).await;
    assert_eq!(again.status, 200, "{}", again.text());
    // Names and values are percent-decoded alike; `+` stays a `+`.
    let body: Value = client()
        .post(format!(
            "{a_admin}/admin/subjects/reset?%74enant=alpha&issuer=app&sub=user%2Dana%2D7"
        ))
        .send()
        .await
        .expect("reset")
        .json()
        .await
        .expect("json");
    assert_eq!(body["subject"], hash.as_str(), "{body}");
    for (query, status, code) in [
        ("?tenant=alpha", 400, "invalid_query"),
        ("?tenant=alpha&subject=xyz", 400, "invalid_query"),
        ("?tenant=alpha&issuer=nobody&sub=u", 400, "invalid_query"),
        ("?tenant=nobody&subject=00", 404, "unknown_tenant"),
        // Every admin query is percent-encoded UTF-8, each parameter once.
        ("?tenant=alpha&issuer=app&sub=%FF%FE", 400, "invalid_query"),
        (
            "?tenant=alpha&issuer=app&sub=user%ZZana",
            400,
            "invalid_query",
        ),
        (
            "?tenant=alpha&tenant=beta&issuer=app&sub=u",
            400,
            "invalid_query",
        ),
    ] {
        let r = client()
            .post(format!("{a_admin}/admin/subjects/reset{query}"))
            .send()
            .await
            .expect("reset");
        assert_eq!(r.status().as_u16(), status, "{query}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["code"], code, "{query}: {body}");
    }
    let log = a.log();
    let audit = log
        .lines()
        .find(|l| l.contains("subject_reset"))
        .expect("an audit line");
    assert!(audit.contains(&hash), "{audit}");
    assert!(!log.contains("user-ana-7"), "the subject in the log");
}

/// With `cache.scope = "subject"`, a pass is served from the cache only to the user it was made
/// for, on this replica and from the fleet's level; the same image from another user of the
/// tenant is called for anew and flagged as a likely replay (receipt, metric, log). A purge of
/// the tenant drops its users' shared entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subject_scope_serves_a_pass_only_to_its_user() {
    let dir = tempfile::tempdir().expect("dir");
    let (key, _) = signing_key(dir.path(), "EdDSA", "k1");
    let app = AppIssuer::new(dir.path());
    let redis = RedisServer::start();
    let emu = start_emulator();
    let builder = app
        .on(with_receipts(TestGateway::for_emulator(&emu), &key, &[]))
        .set("cache.scope", "\"subject\"")
        .set("store.backend", "\"redis\"")
        .set("store.url", &format!("{:?}", redis.url()));
    let procs = tempfile::tempdir().expect("dir");
    let [(a, acfg), (_b, bcfg)] = two_replicas(&builder, procs.path()).await;
    let (a_url, b_url) = (
        format!("http://{}", acfg.listen),
        format!("http://{}", bcfg.listen),
    );
    let ask = |url: String, token: String, image: Vec<u8>| async move {
        let r = post_with(
            &url,
            &[("Authorization", token.as_str())],
            &[Part::image("a.jpg", &image)],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let claims = receipt_claims(&r.header("liveness-receipt").expect("receipt"));
        (r.header("x-cache").unwrap_or_default(), claims)
    };
    let (ana, bo) = (app.mint("user-ana-7", None), app.mint("user-bo-8", None));
    let (selfie, _) = image_with_verdict(true, 1);

    let (cache, c) = ask(a_url.clone(), ana.clone(), selfie.clone()).await;
    assert_eq!(
        (cache.as_str(), &c["replay_suspected"]),
        ("MISS", &false.into())
    );
    let (cache, c) = ask(a_url.clone(), ana.clone(), selfie.clone()).await;
    assert_eq!(
        (cache.as_str(), &c["replay_suspected"]),
        ("HIT", &false.into())
    );
    let (cache, c) = ask(b_url.clone(), ana.clone(), selfie.clone()).await;
    assert_eq!(
        (cache.as_str(), &c["replay_suspected"]),
        ("HIT", &false.into()),
        "her own pass, from the fleet's level"
    );
    assert_eq!(emu.stats().calls, 1);

    // Bo sends Ana's passing selfie: not her verdict, a new call, and a replay signal.
    let (cache, c) = ask(a_url.clone(), bo.clone(), selfie.clone()).await;
    assert_eq!(cache, "MISS");
    assert_eq!(c["sub"], "user-bo-8");
    assert_eq!(c["replay_suspected"], true, "{c}");
    assert_eq!(emu.stats().calls, 2);
    let m = metrics_text(&format!("http://{}", acfg.admin_listen)).await;
    assert_eq!(
        sample(
            &m,
            r#"liveness_gateway_replay_suspected_total{tenant="alpha"}"#
        ),
        1.0
    );
    // Overlapping calls: Bo sends Ana's next selfie while hers is still at the provider.
    let (next, _) = image_with_verdict(true, 100);
    emu.set_latency(Duration::from_millis(1500));
    let hers = tokio::spawn(ask(a_url.clone(), ana.clone(), next.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (cache, c) = ask(a_url.clone(), bo.clone(), next).await;
    emu.set_latency(Duration::ZERO);
    let (_, hc) = hers.await.expect("hers");
    assert_eq!(cache, "MISS");
    assert_eq!(hc["replay_suspected"], false, "hers finished first");
    assert_eq!(c["replay_suspected"], true, "his overlapped hers: {c}");
    let log = a.log();
    assert!(log.contains("possible replay"), "{log}");
    assert!(!log.contains("user-ana-7") && !log.contains("user-bo-8"));

    // The tenant's purge drops its users' entries in Redis too.
    assert!(!redis.keys("lg:*:v:*").is_empty());
    let purge = client()
        .delete(format!(
            "http://{}/admin/cache?tenant=alpha",
            acfg.admin_listen
        ))
        .send()
        .await
        .expect("purge");
    assert_eq!(purge.status().as_u16(), 200);
    assert_eq!(redis.keys("lg:*:v:*"), Vec::<String>::new());
}
