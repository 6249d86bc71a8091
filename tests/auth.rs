//! App tokens against the real gateway: keys generated here (ES256 and EdDSA with rcgen, RS256
//! with openssl), a JWKS file, tokens minted with jsonwebtoken, and every way a token can be
//! wrong. None of the refused ones reaches the provider.

mod support;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::*;

const ISS: &str = "https://auth.example.test";
const AUD: &str = "liveness-gateway";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// The signing keys of the test issuer, and its JWKS.
struct Keys {
    es256: EncodingKey,
    eddsa: EncodingKey,
    rs256: EncodingKey,
    rsa_public_pem: Vec<u8>,
    jwks: Value,
}

fn keys(dir: &Path) -> Keys {
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ec");
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed");
    let point = ec.public_key_raw();
    assert_eq!(point.len(), 65);
    let rsa = dir.join("rsa.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&rsa)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(ok.success());
    let modulus = std::process::Command::new("openssl")
        .args(["rsa", "-noout", "-modulus", "-in"])
        .arg(&rsa)
        .output()
        .expect("modulus");
    let hex_n = String::from_utf8_lossy(&modulus.stdout)
        .trim()
        .trim_start_matches("Modulus=")
        .to_string();
    let n = hex::decode(hex_n).expect("hex");
    let public = std::process::Command::new("openssl")
        .args(["rsa", "-pubout", "-in"])
        .arg(&rsa)
        .output()
        .expect("pubout");
    let rsa_pem = std::fs::read(&rsa).expect("rsa");
    Keys {
        es256: EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).expect("es"),
        eddsa: EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).expect("ed"),
        rs256: EncodingKey::from_rsa_pem(&rsa_pem).expect("rs"),
        rsa_public_pem: public.stdout,
        jwks: json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "ec-1", "use": "sig",
             "x": b64(&point[1..33]), "y": b64(&point[33..])},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "use": "sig",
             "x": b64(ed.public_key_raw())},
            {"kty": "RSA", "kid": "rsa-1", "use": "sig", "n": b64(&n), "e": "AQAB"},
        ]}),
    }
}

/// The keys' JWKS in a file of `dir`: its path.
fn jwks_file(dir: &Path, k: &Keys) -> String {
    let path = dir.join("jwks.json");
    std::fs::write(&path, k.jwks.to_string()).expect("jwks");
    path.display().to_string()
}

/// A valid ES256 token of the test issuer for `sub`.
fn user_token(k: &Keys, sub: &str) -> String {
    let mut c = claims();
    c["sub"] = json!(sub);
    mint(&k.es256, Algorithm::ES256, "ec-1", &c)
}

fn mint(key: &EncodingKey, alg: Algorithm, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, key).expect("token")
}

fn claims() -> Value {
    let t = now();
    json!({"iss": ISS, "aud": AUD, "sub": "user-42", "iat": t, "exp": t + 300})
}

/// A gateway whose issuer `app` (ES256, EdDSA, RS256) acts for tenant alpha, and an issuer
/// `rsa-only` with the same keys that allows RS256 only and acts for beta.
fn gateway(
    dir: &Path,
    keys: &Keys,
    emu: &liveness_gateway_dev::emulator::EmulatorHandle,
) -> TestGateway {
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, keys.jwks.to_string()).expect("jwks");
    let jwks = jwks.display().to_string();
    TestGateway::for_emulator(emu).set(
        "auth.issuers",
        &format!(
            "[{{ id = \"app\", issuer = \"{ISS}\", audiences = [\"{AUD}\"], jwks_file = {jwks:?}, algorithms = [\"ES256\", \"EdDSA\", \"RS256\"], tenant = \"alpha\", leeway = \"5s\", max_lifetime = \"1h\" }}, \
              {{ id = \"rsa-only\", issuer = \"{ISS}/rsa\", audiences = [\"{AUD}\"], jwks_file = {jwks:?}, algorithms = [\"RS256\"], tenant = \"beta\" }}]"
        ),
    )
}

async fn post_with_token(url: &str, token: &str, n: u64) -> Answer {
    post_image(url, token, "a.jpg", &variant(&fixture("face.jpg"), n)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_verified_and_every_bad_one_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let k = keys(dir.path());
    let emu = start_emulator();
    let gw = gateway(dir.path(), &k, &emu).start();
    let url = gw.url();

    // Good tokens, each algorithm: served, as the issuer's tenant.
    let mut n = 0;
    for (key, alg, kid) in [
        (&k.es256, Algorithm::ES256, "ec-1"),
        (&k.eddsa, Algorithm::EdDSA, "ed-1"),
        (&k.rs256, Algorithm::RS256, "rsa-1"),
    ] {
        n += 1;
        let a = post_with_token(&url, &mint(key, alg, kid, &claims()), n).await;
        assert_eq!(
            a.status,
            200,
            "{alg:?}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    // A token without a kid: any key of the right type.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = None;
    let no_kid = jsonwebtoken::encode(&header, &claims(), &k.es256).expect("token");
    n += 1;
    assert_eq!(post_with_token(&url, &no_kid, n).await.status, 200);
    let calls = emu.stats().calls;
    assert_eq!(calls, 4);
    let m = metrics_text(&gw.admin_url()).await;
    assert_eq!(
        sample(
            &m,
            r#"liveness_gateway_auth_tokens_verified_total{issuer="app"}"#
        ),
        4.0
    );
    assert_eq!(
        sample(
            &m,
            r#"liveness_gateway_requests_total{outcome="pass",tenant="alpha"}"#
        ) + sample(
            &m,
            r#"liveness_gateway_requests_total{outcome="fail",tenant="alpha"}"#
        ),
        4.0
    );

    let t = now();
    // A good token's claims, with some set (`Value::Null`: left out), signed ES256.
    let with = |changes: &[(&str, Value)]| {
        let mut c = claims();
        let map = c.as_object_mut().expect("object");
        for (name, value) in changes {
            match value {
                Value::Null => map.remove(*name),
                v => map.insert(name.to_string(), v.clone()),
            };
        }
        mint(&k.es256, Algorithm::ES256, "ec-1", &c)
    };
    let without = |name: &str| with(&[(name, Value::Null)]);
    let tampered = {
        let good = mint(&k.es256, Algorithm::ES256, "ec-1", &claims());
        let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
        let mut payload = claims();
        payload["sub"] = json!("someone-else");
        parts[1] = b64(payload.to_string().as_bytes());
        parts.join(".")
    };
    let alg_none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims().to_string().as_bytes())
    );
    // HS256 "signed" with the RSA public key as the secret: the classic confusion.
    let hs256 = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rsa-1".into());
        jsonwebtoken::encode(
            &header,
            &claims(),
            &EncodingKey::from_secret(&k.rsa_public_pem),
        )
        .expect("hs")
    };
    let es_for_rsa_only = {
        let mut c = claims();
        c["iss"] = json!(format!("{ISS}/rsa"));
        mint(&k.es256, Algorithm::ES256, "ec-1", &c)
    };
    let long = format!(
        "{}.{}.{}",
        "e".repeat(4000),
        "e".repeat(4000),
        "e".repeat(4000)
    );
    let cases: Vec<(&str, String, &str)> = vec![
        ("tampered payload", tampered, "signature"),
        ("alg none", alg_none, "malformed"),
        ("HS256 with the RSA public key", hs256, "algorithm"),
        ("ES256 where RS256 only", es_for_rsa_only, "algorithm"),
        ("no iss", without("iss"), "malformed"),
        (
            "wrong iss",
            with(&[("iss", json!("https://evil.example"))]),
            "issuer",
        ),
        ("no aud", without("aud"), "malformed"),
        (
            "wrong aud",
            with(&[("aud", json!("someone-else"))]),
            "audience",
        ),
        ("no sub", without("sub"), "malformed"),
        ("empty sub", with(&[("sub", json!(" "))]), "malformed"),
        ("no exp", without("exp"), "malformed"),
        (
            "expired past the leeway by 1 s",
            with(&[("exp", json!(t - 5 - 1))]),
            "expired",
        ),
        (
            "nbf in the future",
            with(&[("nbf", json!(t + 60))]),
            "not_yet_valid",
        ),
        (
            "iat in the future",
            with(&[("iat", json!(t + 60)), ("exp", json!(t + 120))]),
            "not_yet_valid",
        ),
        (
            "lifetime over the cap",
            with(&[("exp", json!(t + 7200))]),
            "lifetime",
        ),
        (
            "unknown kid",
            mint(&k.es256, Algorithm::ES256, "ec-9", &claims()),
            "unknown_kid",
        ),
        ("12 KB", long, "malformed"),
    ];
    for (name, token, reason) in &cases {
        n += 1;
        let a = post_with_token(&url, token, n).await;
        assert_eq!(
            a.status,
            401,
            "{name}: {}",
            String::from_utf8_lossy(&a.body)
        );
        assert_eq!(a.code(), "invalid_token", "{name}");
        let detail = a.json()["detail"].as_str().unwrap_or_default().to_string();
        assert!(detail.ends_with(reason), "{name}: {detail}");
    }
    // Within the leeway: still good.
    n += 1;
    let edge = with(&[("exp", json!(t - 5 + 1))]);
    assert_eq!(post_with_token(&url, &edge, n).await.status, 200);
    assert_eq!(
        emu.stats().calls,
        calls + 1,
        "a refused token reached the provider"
    );
    let m = metrics_text(&gw.admin_url()).await;
    assert_eq!(
        sample(
            &m,
            r#"liveness_gateway_auth_token_failures_total{reason="malformed"}"#
        ),
        7.0
    );
    assert_eq!(
        sample(
            &m,
            r#"liveness_gateway_auth_token_failures_total{reason="algorithm"}"#
        ),
        2.0
    );
}

/// A tenant whose apps use tokens can turn its static keys off; two credentials in one request
/// are refused, not merged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_keys_can_be_turned_off_and_two_credentials_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let k = keys(dir.path());
    let emu = start_emulator();
    let gw = gateway(dir.path(), &k, &emu)
        .tenant_set("alpha", "allow_static_keys", "false")
        .start();
    let url = gw.url();
    let a = post_image(&url, "alpha-key", "a.jpg", &fixture("face.jpg")).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.code(), "static_keys_disabled");
    // Its own usage too: the key is not taken anywhere, and an app token never reads usage.
    let usage = |credential: String| {
        let url = format!("{url}/api/v1/usage");
        async move {
            let r = client()
                .get(url)
                .header("Authorization", format!("Bearer {credential}"))
                .send()
                .await
                .expect("usage");
            (
                r.status().as_u16(),
                json_code(&r.text().await.unwrap_or_default()),
            )
        }
    };
    assert_eq!(
        usage("alpha-key".into()).await,
        (401, "static_keys_disabled".into())
    );
    let token = mint(&k.es256, Algorithm::ES256, "ec-1", &claims());
    assert_eq!(
        usage(token.clone()).await.0,
        401,
        "an app token reads no usage"
    );
    assert_eq!(post_with_token(&url, &token, 1).await.status, 200);
    // Other tenants' keys still work.
    assert_eq!(
        post_image(&url, "beta-key", "a.jpg", &variant(&fixture("face.jpg"), 2))
            .await
            .status,
        200
    );

    let r = client()
        .post(format!("{url}{ROUTE}"))
        .header("Authorization", format!("Bearer {token}"))
        .header("X-Api-Key", "beta-key")
        .header("Content-Type", multipart_ct())
        .body(multipart(&[Part::image(
            "a.jpg",
            &variant(&fixture("face.jpg"), 3),
        )]))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        json_code(&r.text().await.expect("body")),
        "malformed_credentials"
    );
}

/// What `check-config` says of a config it must refuse, saying each of `expected`.
fn refused(dir: &Path, builder: &TestGateway, offline: bool, expected: &[&str]) -> String {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, builder.toml()).expect("config");
    let (ok, text) = check_config(&path, offline);
    assert!(!ok, "accepted:\n{text}");
    for e in expected {
        assert!(text.contains(e), "missing {e:?} in:\n{text}");
    }
    text
}

/// `check-config` reads the JWKS (not with `--offline`), and refuses shared-secret algorithms, an
/// unknown tenant and a JWKS URL that is not http(s).
#[test]
fn check_config_checks_the_issuers() {
    let dir = tempfile::tempdir().expect("dir");
    let emu = start_emulator();
    std::fs::write(dir.path().join("empty.json"), r#"{"keys": []}"#).expect("jwks");
    let empty = dir.path().join("empty.json").display().to_string();
    let builder = TestGateway::for_emulator(&emu).set(
        "auth.issuers",
        &format!(
            "[{{ id = \"a\", issuer = \"{ISS}\", audiences = [\"{AUD}\"], jwks_file = {empty:?}, algorithms = [\"ES256\"], tenant = \"alpha\" }}, \
              {{ id = \"b\", issuer = \"{ISS}/b\", audiences = [\"{AUD}\"], jwks_url = \"ftp://x/jwks\", algorithms = [\"HS256\"], tenant = \"nobody\" }}]"
        ),
    );
    refused(
        dir.path(),
        &builder,
        false,
        &[
            "auth.issuers[0].jwks_file",
            "no RSA, P-256, P-384 or Ed25519 public key",
            "auth.issuers[1].algorithms",
            "shared-secret algorithms are never accepted",
            "auth.issuers[1].tenant",
            "auth.issuers[1].jwks_url",
        ],
    );
    let offline = refused(dir.path(), &builder, true, &["auth.issuers[1].algorithms"]);
    assert!(!offline.contains("auth.issuers[0].jwks_file"), "{offline}");
}

/// A JWKS server on loopback whose document, status and `Cache-Control` the test sets, and which
/// counts its fetches.
struct JwksServer {
    addr: std::net::SocketAddr,
    state: std::sync::Arc<std::sync::Mutex<(u16, String, u64)>>,
    _task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(doc: &Value) -> JwksServer {
        use hyper::service::service_fn;
        let state = std::sync::Arc::new(std::sync::Mutex::new((200u16, doc.to_string(), 0u64)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        let shared = shared.clone();
                        async move {
                            let (status, body) = {
                                let mut s = shared.lock().expect("lock");
                                s.2 += 1;
                                (s.0, s.1.clone())
                            };
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .header("cache-control", "public, max-age=3600")
                                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        JwksServer {
            addr,
            state,
            _task: task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    fn fetches(&self) -> u64 {
        self.state.lock().expect("lock").2
    }

    fn serve(&self, status: u16, doc: &Value) {
        let mut s = self.state.lock().expect("lock");
        s.0 = status;
        s.1 = doc.to_string();
    }
}

fn url_issuer(url: &str) -> String {
    format!(
        "[{{ id = \"app\", issuer = \"{ISS}\", audiences = [\"{AUD}\"], jwks_url = \"{url}\", algorithms = [\"ES256\", \"EdDSA\", \"RS256\"], tenant = \"alpha\", jwks_refetch_cooldown = \"1s\" }}]"
    )
}

/// A JWKS URL: fetched at start, one refetch per cooldown however many unknown `kid`s arrive, a
/// rotated key accepted after one refetch, and the last good keys kept through an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_is_fetched_rotated_and_outlived() {
    let dir = tempfile::tempdir().expect("dir");
    let k = keys(dir.path());
    let ec_only = json!({"keys": [k.jwks["keys"][0].clone()]});
    let server = JwksServer::start(&ec_only).await;
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("auth.issuers", &url_issuer(&server.url()))
        .start();
    let url = gw.url();
    let token = mint(&k.es256, Algorithm::ES256, "ec-1", &claims());
    assert_eq!(post_with_token(&url, &token, 1).await.status, 200);
    let after_start = server.fetches();
    assert_eq!(after_start, 1, "fetched once at start");

    // 1,000 tokens with random kids, 50 at a time: at most one fetch per cooldown (1 s here).
    let started = std::time::Instant::now();
    let mut refused = 0;
    for batch in 0..20u64 {
        let answers = futures_util::future::join_all((0..50u64).map(|i| {
            let token = mint(
                &k.es256,
                Algorithm::ES256,
                &format!("random-{batch}-{i}"),
                &claims(),
            );
            let url = url.clone();
            async move { post_with_token(&url, &token, 1000 + batch * 50 + i).await }
        }))
        .await;
        for a in answers {
            assert_eq!(a.status, 401);
            assert!(a.json()["detail"]
                .as_str()
                .unwrap_or_default()
                .ends_with("unknown_kid"));
            refused += 1;
        }
    }
    assert_eq!(refused, 1000);
    let windows = started.elapsed().as_secs() + 1;
    let fetched = server.fetches() - after_start;
    assert!(
        fetched <= windows,
        "{fetched} fetches in {windows} cooldown windows for 1,000 unknown kids"
    );

    // Rotation: a new key appears; after the cooldown its first token brings one refetch.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    server.serve(200, &k.jwks);
    let rotated = mint(&k.eddsa, Algorithm::EdDSA, "ed-1", &claims());
    let before = server.fetches();
    assert_eq!(post_with_token(&url, &rotated, 2).await.status, 200);
    assert_eq!(server.fetches(), before + 1);

    // The JWKS goes down: the last good keys still verify, and nothing asks it again for them.
    server.serve(500, &json!({}));
    assert_eq!(post_with_token(&url, &token, 3).await.status, 200);
    assert_eq!(post_with_token(&url, &rotated, 4).await.status, 200);
    assert_eq!(
        emu.stats().calls,
        4,
        "no refused token reached the provider"
    );
    let m = metrics_text(&gw.admin_url()).await;
    assert!(
        sample(
            &m,
            r#"liveness_gateway_auth_jwks_fetches_total{issuer="app",outcome="ok"}"#
        ) >= 2.0
    );
}

/// The JWKS is down when the gateway starts: its tokens get 503 `auth_unavailable` with
/// `Retry-After` (not 401: they may be good), and once the JWKS answers they are served, with no
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_down_at_start_means_503_then_recovery() {
    let dir = tempfile::tempdir().expect("dir");
    let k = keys(dir.path());
    let server = JwksServer::start(&json!({})).await;
    server.serve(503, &json!({}));
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("auth.issuers", &url_issuer(&server.url()))
        .start();
    let url = gw.url();
    let token = mint(&k.es256, Algorithm::ES256, "ec-1", &claims());
    let a = post_with_token(&url, &token, 1).await;
    assert_eq!(a.status, 503, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.code(), "auth_unavailable");
    assert!(a.header("retry-after").is_some());
    // Static keys are not affected.
    assert_eq!(
        post_image(&url, "beta-key", "a.jpg", &fixture("face.jpg"))
            .await
            .status,
        200
    );

    server.serve(200, &k.jwks);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let a = post_with_token(&url, &token, 2).await;
        if a.status == 200 {
            break;
        }
        assert_eq!(a.status, 503);
        assert!(std::time::Instant::now() < until, "never recovered");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    assert_eq!(emu.stats().calls, 2);
}

fn single_use_issuer(jwks: &str) -> String {
    format!(
        "[{{ id = \"app\", issuer = \"{ISS}\", audiences = [\"{AUD}\"], jwks_file = {jwks:?}, algorithms = [\"ES256\"], tenant = \"alpha\", single_use = true }}]"
    )
}

/// A single-use token pays for one request; a second use is `401 token_replayed`, on the same
/// replica or another one sharing the store (Redis); a single-use token needs a `jti`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_token_is_never_accepted_twice() {
    let dir = tempfile::tempdir().expect("dir");
    let k = keys(dir.path());
    let jwks = jwks_file(dir.path(), &k);
    let emu = start_emulator();
    let with_jti = |jti: &str| {
        let mut c = claims();
        c["jti"] = json!(jti);
        mint(&k.es256, Algorithm::ES256, "ec-1", &c)
    };

    // One process, the local store.
    let gw = TestGateway::for_emulator(&emu)
        .set("auth.issuers", &single_use_issuer(&jwks))
        .start();
    let token = with_jti("once-1");
    assert_eq!(post_with_token(&gw.url(), &token, 1).await.status, 200);
    let again = post_with_token(&gw.url(), &token, 2).await;
    assert_eq!(again.status, 401);
    assert_eq!(again.code(), "token_replayed");
    let no_jti = mint(&k.es256, Algorithm::ES256, "ec-1", &claims());
    let a = post_with_token(&gw.url(), &no_jti, 3).await;
    assert_eq!((a.status, a.code()), (401, "invalid_token".to_string()));
    assert_eq!(emu.stats().calls, 1);
    drop(gw);

    // Two replicas on one Redis: used on one, refused on the other.
    let redis = RedisServer::start();
    let builder = TestGateway::for_emulator(&emu)
        .set("auth.issuers", &single_use_issuer(&jwks))
        .set("store.backend", "\"redis\"")
        .set("store.url", &format!("\"{}\"", redis.url()))
        .set("store.timeout", "\"250ms\"");
    let procs = tempfile::tempdir().expect("dir");
    let (_a, a) = GatewayProcess::start_named(&builder.replica(), procs.path(), "a", &[]).await;
    let (_b, b) = GatewayProcess::start_named(&builder.replica(), procs.path(), "b", &[]).await;
    let token = with_jti("once-2");
    let first = post_with_token(&format!("http://{}", a.listen), &token, 4).await;
    assert_eq!(first.status, 200);
    let second = post_with_token(&format!("http://{}", b.listen), &token, 5).await;
    assert_eq!(
        (second.status, second.code()),
        (401, "token_replayed".to_string())
    );
    assert_eq!(emu.stats().calls, 2);
    // What Redis keeps of it expires with the token (its 300 s, the 60 s leeway, a minute's
    // margin), and holds no token.
    let keys = redis.keys("lg:{j:app}:*");
    assert_eq!(keys.len(), 1, "{keys:?}");
    let ttl: i64 = redis.cli(&["PTTL", &keys[0]]).parse().expect("pttl");
    assert!(ttl > 360_000 && ttl <= 420_000, "PTTL {ttl}");
    assert!(!keys[0].contains("once-2"));
}

/// Through a zero-downtime upgrade on one host (the local state file), a single-use token spent
/// in the old process is refused by the new one, and a user's daily budget held by calls the old
/// one has at the provider is not given a second time by the new one; a user with room is
/// served. The provider is slow (7 s): the old process's calls are still in flight once it has
/// stopped accepting (5 s after SIGQUIT), when every new connection reaches the new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_use_tokens_and_users_budgets_hold_across_an_upgrade() {
    let dir = tempfile::tempdir().expect("dir");
    let k = keys(dir.path());
    let jwks = jwks_file(dir.path(), &k);
    let emu = start_emulator();
    emu.set_latency(std::time::Duration::from_millis(7000));
    let state = dir.path().join("budgets.json");
    let builder = TestGateway::for_emulator(&emu)
        .set("auth.issuers", &single_use_issuer(&jwks))
        .set("server.grace_period", "\"15s\"")
        .set("upstream.total_timeout", "\"10s\"")
        .set(
            "budgets.state_file",
            &format!("{:?}", state.display().to_string()),
        )
        .tenant_set(
            "alpha",
            "per_subject",
            "{ rate = \"100/s\", burst = 100, daily_budget = 2 }",
        );
    let cfg = builder.config();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, builder.toml()).expect("write");
    let mut old = GatewayProcess::spawn(&path, dir.path(), "old", false, &[]);
    wait_listening(&cfg).await;
    let url = format!("http://{}", cfg.listen);
    let token = |sub: &str, jti: &str| {
        let mut c = claims();
        c["sub"] = json!(sub);
        c["jti"] = json!(jti);
        mint(&k.es256, Algorithm::ES256, "ec-1", &c)
    };
    let send = |token: String, n: u64| {
        let url = url.clone();
        tokio::spawn(async move { post_with_token(&url, &token, n).await })
    };
    // Ana's two calls of the day, and Bo's first, at the provider through the old process.
    let bo_once = token("bo", "bo-1");
    let first = [
        send(token("ana", "ana-1"), 1),
        send(token("ana", "ana-2"), 2),
        send(bo_once.clone(), 3),
    ];
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while emu.stats().in_flight < 3 {
        assert!(std::time::Instant::now() < until, "never at the provider");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let new = GatewayProcess::spawn(&path, dir.path(), "new", true, &[]);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    old.signal("QUIT");
    tokio::time::sleep(std::time::Duration::from_millis(6000)).await;
    // The new process alone accepts now; the old one's calls are still in flight.
    let ana_third = send(token("ana", "ana-3"), 4);
    let bo_replayed = send(bo_once.clone(), 5);
    let bo_second = send(token("bo", "bo-2"), 6);
    let mut seen = Vec::new();
    for t in first {
        seen.push(t.await.expect("task").status);
    }
    let ana_third = ana_third.await.expect("task");
    let bo_replayed = bo_replayed.await.expect("task");
    let bo_second = bo_second.await.expect("task");
    let code = |a: &Answer| (a.status, a.code());
    assert_eq!(seen, [200, 200, 200]);
    // Ana's budget of 2 is held by the old process's calls; Bo's token was spent there, and
    // Bo has room for one more call.
    assert_eq!(
        [
            code(&ana_third),
            code(&bo_replayed),
            (bo_second.status, String::new())
        ],
        [
            (429, "subject_budget_exhausted".to_string()),
            (401, "token_replayed".to_string()),
            (200, String::new())
        ]
    );
    assert!(old.wait_exit(std::time::Duration::from_secs(20)).success());
    assert_eq!(emu.stats().billable, 4);
    // Once the old process is gone, the new one still knows both.
    emu.set_latency(std::time::Duration::ZERO);
    assert_eq!(
        post_with_token(&url, &bo_once, 7).await.code(),
        "token_replayed"
    );
    assert_eq!(
        post_with_token(&url, &token("ana", "ana-4"), 8)
            .await
            .code(),
        "subject_budget_exhausted"
    );
    assert_eq!(emu.stats().billable, 4);
    drop(new);
}

/// `tokens keygen` makes a key and its JWKS; `tokens mint` signs a token the gateway accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tokens_command_makes_keys_and_tokens_the_gateway_accepts() {
    let dir = tempfile::tempdir().expect("dir");
    let bin = env!("CARGO_BIN_EXE_liveness-gateway");
    let mut jwks_files = Vec::new();
    for alg in ["ES256", "EdDSA"] {
        let key = dir.path().join(format!("{alg}.pem"));
        let out = std::process::Command::new(bin)
            .args(["tokens", "keygen", "--alg", alg, "--kid", alg, "--key-file"])
            .arg(&key)
            .output()
            .expect("keygen");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let jwks: Value = serde_json::from_slice(&out.stdout).expect("a JWKS on stdout");
        let text = std::fs::read_to_string(&key).expect("key");
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("PRIVATE"));
        let path = dir.path().join(format!("{alg}.jwks.json"));
        std::fs::write(&path, jwks.to_string()).expect("jwks");
        jwks_files.push((alg, key, path.display().to_string()));
    }
    let emu = start_emulator();
    let issuers: Vec<String> = jwks_files
        .iter()
        .map(|(alg, _, jwks)| {
            format!("{{ id = \"{alg}\", issuer = \"{ISS}/{alg}\", audiences = [\"{AUD}\"], jwks_file = {jwks:?}, algorithms = [\"{alg}\"], tenant = \"alpha\" }}")
        })
        .collect();
    let gw = TestGateway::for_emulator(&emu)
        .set("auth.issuers", &format!("[{}]", issuers.join(", ")))
        .start();
    for (n, (alg, key, _)) in jwks_files.iter().enumerate() {
        let out = std::process::Command::new(bin)
            .args(["tokens", "mint", "--alg", alg, "--kid", alg, "--key-file"])
            .arg(key)
            .args([
                "--iss",
                &format!("{ISS}/{alg}"),
                "--aud",
                AUD,
                "--sub",
                "user-7",
                "--ttl",
                "2m",
            ])
            .output()
            .expect("mint");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let a = post_with_token(&gw.url(), &token, n as u64).await;
        assert_eq!(a.status, 200, "{alg}: {}", String::from_utf8_lossy(&a.body));
    }
    assert_eq!(emu.stats().calls, 2);
}

const PROJECT: &str = "123456789012";
const APP_ID: &str = "1:123456789012:android:0123456789abcdef";

/// An App Check token as Firebase signs one: RS256 with a `kid`, `typ: JWT`, `sub` the app id,
/// `aud` the project by number and by id, a `provider`, one hour of life.
fn app_check_token(k: &Keys, sub: &str, project: &str) -> String {
    let t = now();
    let c = json!({
        "sub": sub,
        "aud": [format!("projects/{project}"), "projects/liveness-demo"],
        "provider": "play_integrity",
        "iss": format!("https://firebaseappcheck.googleapis.com/{project}"),
        "exp": t + 3600,
        "iat": t,
        "jti": format!("ac-{sub}-{t}"),
    });
    mint(&k.rs256, Algorithm::RS256, "rsa-1", &c)
}

fn app_check_issuer(jwks_url: &str) -> String {
    format!(
        "{{ id = \"app-check\", kind = \"firebase-app-check\", project_number = \"{PROJECT}\", app_ids = [\"{APP_ID}\"], jwks_url = \"{jwks_url}\", tenant = \"alpha\" }}"
    )
}

fn backend_issuer(jwks: &str) -> String {
    format!(
        "{{ id = \"backend\", issuer = \"{ISS}\", audiences = [\"{AUD}\"], jwks_file = {jwks:?}, algorithms = [\"ES256\"], tenant = \"alpha\" }}"
    )
}

async fn post_with_headers(url: &str, headers: &[(&str, &str)], n: u64) -> Answer {
    post(
        url,
        headers,
        multipart(&[Part::image("a.jpg", &variant(&fixture("face.jpg"), n))]),
    )
    .await
}

/// The Firebase App Check preset: tokens shaped like Firebase's, in `X-Firebase-AppCheck`, with
/// the keys from a JWKS URL; every field the preset implies is checked, and a browser may send
/// the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firebase_app_check_tokens_are_verified_in_their_header() {
    let dir = tempfile::tempdir().expect("dir");
    let k = keys(dir.path());
    let server = JwksServer::start(&k.jwks).await;
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set(
            "auth.issuers",
            &format!("[{}]", app_check_issuer(&server.url())),
        )
        .set("cors.allowed_origins", "[\"https://app.example.test\"]")
        .start();
    let url = gw.url();
    let good = app_check_token(&k, APP_ID, PROJECT);
    let h = "X-Firebase-AppCheck";
    let a = post_with_headers(&url, &[(h, &good)], 1).await;
    assert_eq!(a.status, 200, "{}", a.text());

    let refused = |reason: &str| (401, "invalid_token".to_string(), reason.to_string());
    let other_app = app_check_token(&k, "1:123456789012:ios:ffff", PROJECT);
    let other_project = app_check_token(&k, APP_ID, "999");
    let mut es = serde_json::from_str::<Value>(&String::from_utf8_lossy(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(good.split('.').nth(1).expect("payload"))
            .expect("b64"),
    ))
    .expect("claims");
    es["jti"] = json!("es");
    let es256 = mint(&k.es256, Algorithm::ES256, "ec-1", &es);
    for (token, want, n) in [
        (&other_app, refused("subject"), 2),
        (&other_project, refused("issuer"), 3),
        (&es256, refused("algorithm"), 4),
    ] {
        let a = post_with_headers(&url, &[(h, token)], n).await;
        let detail = a.json()["detail"].as_str().unwrap_or_default().to_string();
        assert_eq!(
            (
                a.status,
                a.code(),
                detail.rsplit(' ').next().unwrap_or_default().to_string()
            ),
            want
        );
    }
    // Its tokens are read from its header only: in Authorization no issuer takes it.
    let a = post_with_headers(&url, &[("Authorization", &format!("Bearer {good}"))], 5).await;
    assert_eq!((a.status, a.code()), (401, "invalid_token".to_string()));
    // The header twice, or empty: malformed. A tenant key beside it: refused, not merged.
    for headers in [
        vec![(h, good.as_str()), (h, good.as_str())],
        vec![(h, "")],
        vec![(h, good.as_str()), ("X-Api-Key", "alpha-key")],
    ] {
        let a = post_with_headers(&url, &headers, 6).await;
        assert_eq!(
            (a.status, a.code()),
            (401, "malformed_credentials".to_string()),
            "{headers:?}"
        );
    }
    assert_eq!(emu.stats().calls, 1);
    // A browser's preflight may send the header.
    let pre = client()
        .request(reqwest::Method::OPTIONS, format!("{url}{ROUTE}"))
        .header("Origin", "https://app.example.test")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "x-firebase-appcheck")
        .send()
        .await
        .expect("preflight");
    assert_eq!(pre.status().as_u16(), 204);
    let allow = pre
        .headers()
        .get("access-control-allow-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(allow.contains("x-firebase-appcheck"), "{allow}");
}

/// `check-config` on the preset: a project number and app ids are required, and the fields it
/// sets itself may not be set by hand.
#[test]
fn check_config_checks_the_app_check_preset() {
    let dir = tempfile::tempdir().expect("dir");
    let emu = start_emulator();
    let builder = TestGateway::for_emulator(&emu).set(
        "auth.issuers",
        "[{ id = \"a\", kind = \"firebase-app-check\", project_number = \"my-project\", tenant = \"alpha\" }, \
          { id = \"b\", kind = \"firebase-app-check\", project_number = \"1\", app_ids = [\"x\"], algorithms = [\"ES256\"], tenant = \"alpha\" }, \
          { id = \"c\", kind = \"oidc\", issuer = \"x\", audiences = [\"y\"], jwks_url = \"https://x/j\", algorithms = [\"ES256\"], tenant = \"alpha\", header = \"X-Api-Key\" }]",
    )
    .tenant_set("alpha", "require_tokens", "[\"a\", \"nobody\"]")
    .tenant_set("beta", "require_tokens", "[\"a\"]")
    .tenant_set("alpha", "per_subject", "{ burst = 3 }")
    .tenant_set("beta", "per_subject", "{ max_failed_attempts = 0 }");
    refused(
        dir.path(),
        &builder,
        true,
        &[
            "auth.issuers[0].project_number",
            "auth.issuers[0].app_ids",
            "leave them out",
            "auth.issuers[2].kind",
            "auth.issuers[2].header",
            "\"nobody\" is not an issuer id",
            "acts for another tenant",
            "a burst needs a rate",
            "per_subject.max_failed_attempts: 0 would refuse every call",
        ],
    );
}

/// A tenant can require two tokens (the user's and App Check's): either alone is refused with
/// `token_required`, and the subject is the user's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tokens_can_be_required() {
    let dir = tempfile::tempdir().expect("dir");
    let k = keys(dir.path());
    let jwks = jwks_file(dir.path(), &k);
    let server = JwksServer::start(&k.jwks).await;
    let emu = start_emulator();
    let procs = tempfile::tempdir().expect("dir");
    let builder = TestGateway::for_emulator(&emu)
        .set(
            "auth.issuers",
            &format!(
                "[{}, {}]",
                backend_issuer(&jwks),
                app_check_issuer(&server.url())
            ),
        )
        .set("server.log_format", "\"json\"")
        .tenant_set("alpha", "require_tokens", "[\"backend\", \"app-check\"]")
        .tenant_set("alpha", "per_subject", "{ daily_budget = 1 }");
    let (gw, cfg) = GatewayProcess::start(&builder, procs.path(), &[]).await;
    let url = format!("http://{}", cfg.listen);
    let app = app_check_token(&k, APP_ID, PROJECT);
    let user = |sub: &str| format!("Bearer {}", user_token(&k, sub));
    let ac = "X-Firebase-AppCheck";
    let a = post_with_headers(&url, &[("Authorization", &user("ana@example.test"))], 1).await;
    assert_eq!((a.status, a.code()), (401, "token_required".to_string()));
    assert!(a.text().contains("app-check"), "{}", a.text());
    let a = post_with_headers(&url, &[(ac, &app)], 2).await;
    assert_eq!((a.status, a.code()), (401, "token_required".to_string()));
    assert!(a.text().contains("backend"), "{}", a.text());
    let both = |sub: &str| vec![("Authorization", user(sub)), (ac, app.clone())];
    let pairs = |v: &[(&'static str, String)]| -> Vec<(&'static str, String)> { v.to_vec() };
    let send = |v: Vec<(&'static str, String)>, n: u64| {
        let url = url.clone();
        async move {
            let h: Vec<(&str, &str)> = v.iter().map(|(k, v)| (*k, v.as_str())).collect();
            post_with_headers(&url, &h, n).await
        }
    };
    assert_eq!(send(pairs(&both("ana@example.test")), 3).await.status, 200);
    // Each line before the next request's (a line is written once its answer is out): the
    // subjects below are compared in order.
    gw.access_lines_soon(3).await;
    // The subject is the user's (one call a day each), not the app's (shared by all).
    let again = send(pairs(&both("ana@example.test")), 4).await;
    assert_eq!(
        (again.status, again.code()),
        (429, "subject_budget_exhausted".to_string())
    );
    assert!(again.header("retry-after").is_some());
    gw.access_lines_soon(4).await;
    assert_eq!(send(pairs(&both("bo@example.test")), 5).await.status, 200);
    assert_eq!(emu.stats().calls, 2);
    // Logs name the subject by its keyed hash, never by itself.
    let log = gw.log();
    assert!(!log.contains("ana@example.test"), "a subject in the log");
    // Five answers: two refusals without a token, then three with a subject.
    let subjects: Vec<String> = gw
        .access_lines_soon(5)
        .await
        .iter()
        .filter_map(|l| l["subject"].as_str().map(str::to_string))
        .collect();
    assert_eq!(subjects.len(), 3, "{subjects:?}");
    assert_eq!(subjects[0], subjects[1]);
    assert_ne!(subjects[0], subjects[2]);
    assert!(subjects.iter().all(|s| s.len() == 32));
    // Metrics carry no subject, hashed or not.
    let m = metrics_text(&format!("http://{}", cfg.admin_listen)).await;
    assert!(
        !m.contains(&subjects[0]) && !m.contains("ana@"),
        "a subject in the metrics"
    );
    // The provider got the organization's form (its key and the image), no token.
    assert_eq!(emu.stats().last_fields, vec!["api_key", "image"]);
}

fn per_subject_gateway(
    emu: &liveness_gateway_dev::emulator::EmulatorHandle,
    jwks: &str,
) -> TestGateway {
    TestGateway::for_emulator(emu)
        .set("auth.issuers", &format!("[{}]", backend_issuer(jwks)))
        .tenant_set(
            "alpha",
            "per_subject",
            "{ rate = \"1/min\", burst = 4, daily_budget = 2 }",
        )
}

/// Per-subject limits, in one process and across two replicas on Redis: a subject's third
/// billable call of the day is refused while another subject is served; its rate is its own;
/// a cache hit costs no budget; none of the refusals reaches the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_subject_limits_hold_in_one_process_and_across_replicas() {
    let dir = tempfile::tempdir().expect("dir");
    let k = keys(dir.path());
    let jwks = jwks_file(dir.path(), &k);
    let token = |sub: &str| user_token(&k, sub);
    let emu = start_emulator();

    let gw = per_subject_gateway(&emu, &jwks).start();
    let url = gw.url();
    let ana = token("ana");
    assert_eq!(post_with_token(&url, &ana, 1).await.status, 200);
    assert_eq!(post_with_token(&url, &ana, 2).await.status, 200);
    // The same photo again: a cache hit, free, whatever the budget.
    assert_eq!(post_with_token(&url, &ana, 2).await.status, 200);
    let third = post_with_token(&url, &ana, 3).await;
    assert_eq!(
        (third.status, third.code()),
        (429, "subject_budget_exhausted".to_string())
    );
    // Ana's burst of 4 is used up now (every request took one): her rate refuses her.
    let fourth = post_with_token(&url, &ana, 4).await;
    assert_eq!(
        (fourth.status, fourth.code()),
        (429, "subject_rate_limited".to_string())
    );
    assert!(fourth.header("retry-after").is_some_and(|s| s != "0"));
    assert_eq!(post_with_token(&url, &token("bo"), 5).await.status, 200);
    assert_eq!(emu.stats().calls, 3);
    // The operator's view: today's subjects by keyed hash, most calls first.
    let top = admin_json(&gw.admin_url(), "/admin/subjects?tenant=alpha").await;
    assert_eq!(top["daily_budget"], 2);
    let listed: Vec<u64> = top["subjects"]
        .as_array()
        .expect("subjects")
        .iter()
        .map(|s| s["billable_calls"].as_u64().expect("n"))
        .collect();
    assert_eq!(listed, vec![2, 1], "{top}");
    assert!(!top.to_string().contains("\"ana\""), "{top}");
    for (query, status, code) in [
        ("", 400, "invalid_query"),
        ("?tenant=nobody", 404, "unknown_tenant"),
        ("?tenant=alpha&limit=0", 400, "invalid_query"),
        ("?tenant=alpha&limit=x", 400, "invalid_query"),
    ] {
        let r = client()
            .get(format!("{}/admin/subjects{query}", gw.admin_url()))
            .send()
            .await
            .expect("admin");
        assert_eq!(r.status().as_u16(), status, "{query}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["code"], code, "{query}: {body}");
    }
    // The tenant's own key has no subject: the tenant's limits only.
    assert_eq!(
        post_image(
            &url,
            "alpha-key",
            "a.jpg",
            &variant(&fixture("face.jpg"), 6)
        )
        .await
        .status,
        200
    );
    drop(gw);

    // Two replicas on one Redis: the counts are the fleet's.
    let redis = RedisServer::start();
    let builder = per_subject_gateway(&emu, &jwks)
        .set("store.backend", "\"redis\"")
        .set("store.url", &format!("\"{}\"", redis.url()))
        .set("store.timeout", "\"250ms\"");
    let procs = tempfile::tempdir().expect("dir");
    let (_a, a) = GatewayProcess::start_named(&builder.replica(), procs.path(), "a", &[]).await;
    let (_b, bcfg) = GatewayProcess::start_named(&builder.replica(), procs.path(), "b", &[]).await;
    let (a, b) = (
        format!("http://{}", a.listen),
        format!("http://{}", bcfg.listen),
    );
    let cy = token("cy");
    let before = emu.stats().calls;
    assert_eq!(post_with_token(&a, &cy, 10).await.status, 200);
    assert_eq!(post_with_token(&b, &cy, 11).await.status, 200);
    let third = post_with_token(&a, &cy, 12).await;
    assert_eq!(
        (third.status, third.code()),
        (429, "subject_budget_exhausted".to_string())
    );
    assert_eq!(
        post_with_token(&b, &cy, 13).await.code(),
        "subject_budget_exhausted"
    );
    let fourth = post_with_token(&b, &cy, 14).await;
    assert_eq!(
        (fourth.status, fourth.code()),
        (429, "subject_rate_limited".to_string())
    );
    assert_eq!(post_with_token(&b, &token("dee"), 15).await.status, 200);
    assert_eq!(emu.stats().calls, before + 3);
    // Either replica shows the fleet's subjects of the day (each settled just after its answer).
    let admin = format!("http://{}", bcfg.admin_listen);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let listed = loop {
        let top = admin_json(&admin, "/admin/subjects?tenant=alpha").await;
        let listed: Vec<u64> = top["subjects"]
            .as_array()
            .expect("subjects")
            .iter()
            .map(|s| s["billable_calls"].as_u64().expect("n"))
            .collect();
        if listed == [2, 1] || std::time::Instant::now() > until {
            break listed;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(listed, vec![2, 1]);
    // Redis holds subjects by their keyed hash, and every key expires by itself.
    let keys = redis.keys("lg:*");
    assert!(keys.iter().any(|k| k.contains(":s:")), "{keys:?}");
    for key in keys {
        assert!(
            !key.contains("cy") || key.contains(":s:") && !key.contains(":s:cy"),
            "{key}"
        );
        let ttl: i64 = redis.cli(&["PTTL", &key]).parse().expect("pttl");
        assert!(ttl >= 0 || ttl == -2, "{key} has no expiry (PTTL {ttl})");
    }
}

/// The tenant each request was counted for, from the metrics: `(alpha, beta)` requests answered.
async fn answered_by_tenant(admin: &str) -> (f64, f64) {
    let m = metrics_text(admin).await;
    let count = |tenant: &str| {
        ["pass", "fail"]
            .iter()
            .map(|o| {
                sample(
                    &m,
                    &format!(
                        "liveness_gateway_requests_total{{outcome=\"{o}\",tenant=\"{tenant}\"}}"
                    ),
                )
            })
            .sum::<f64>()
    };
    (count("alpha"), count("beta"))
}

/// One authorization server signs for two apps (one `iss`, an audience each, the keys of each
/// app in its own JWKS), and two App Check tenants share one Firebase project (same `iss` and
/// audience, their own app ids): each token is admitted for its own tenant, not refused because
/// another issuer with that `iss` came first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuers_may_share_an_iss() {
    let dir = tempfile::tempdir().expect("dir");
    let k = keys(dir.path());
    // App A's JWKS holds the EC key only, app B's the RSA key only.
    let jwks_a = dir.path().join("a.json");
    std::fs::write(
        &jwks_a,
        json!({"keys": [k.jwks["keys"][0].clone()]}).to_string(),
    )
    .expect("a");
    let jwks_b = dir.path().join("b.json");
    std::fs::write(
        &jwks_b,
        json!({"keys": [k.jwks["keys"][2].clone()]}).to_string(),
    )
    .expect("b");
    let server = JwksServer::start(&k.jwks).await;
    let other_app = "1:123456789012:ios:fedcba9876543210";
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set(
            "auth.issuers",
            &format!(
                "[{{ id = \"app-a\", issuer = \"{ISS}\", audiences = [\"app-a\"], jwks_file = {:?}, algorithms = [\"ES256\", \"RS256\"], tenant = \"alpha\" }}, \
                  {{ id = \"app-b\", issuer = \"{ISS}\", audiences = [\"app-b\"], jwks_file = {:?}, algorithms = [\"ES256\", \"RS256\"], tenant = \"beta\" }}, \
                  {{ id = \"check-a\", kind = \"firebase-app-check\", project_number = \"{PROJECT}\", app_ids = [\"{APP_ID}\"], jwks_url = \"{}\", tenant = \"alpha\" }}, \
                  {{ id = \"check-b\", kind = \"firebase-app-check\", project_number = \"{PROJECT}\", app_ids = [\"{other_app}\"], jwks_url = \"{}\", tenant = \"beta\" }}]",
                jwks_a.display().to_string(),
                jwks_b.display().to_string(),
                server.url(),
                server.url(),
            ),
        )
        .start();
    let (url, admin) = (gw.url(), gw.admin_url());
    let for_app = |aud: &str, rsa: bool| {
        let mut c = claims();
        c["aud"] = json!(aud);
        if rsa {
            mint(&k.rs256, Algorithm::RS256, "rsa-1", &c)
        } else {
            mint(&k.es256, Algorithm::ES256, "ec-1", &c)
        }
    };
    let a = post_with_token(&url, &for_app("app-a", false), 1).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(answered_by_tenant(&admin).await, (1.0, 0.0));
    let b = post_with_token(&url, &for_app("app-b", true), 2).await;
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(answered_by_tenant(&admin).await, (1.0, 1.0));
    // Each app's token verifies with its own keys only, and names its own audience only; one
    // naming both apps (two tenants) cannot be placed.
    let both = {
        let mut c = claims();
        c["aud"] = json!(["app-a", "app-b"]);
        mint(&k.es256, Algorithm::ES256, "ec-1", &c)
    };
    for (token, reason) in [
        (for_app("app-b", false), "unknown_kid"),
        (for_app("app-c", false), "audience"),
        (both, "audience"),
    ] {
        let r = post_with_token(&url, &token, 3).await;
        let detail = r.json()["detail"].as_str().unwrap_or_default().to_string();
        assert_eq!((r.status, r.code()), (401, "invalid_token".to_string()));
        assert!(detail.ends_with(reason), "{detail}");
    }

    let h = "X-Firebase-AppCheck";
    let ac = post_with_headers(&url, &[(h, &app_check_token(&k, other_app, PROJECT))], 4).await;
    assert_eq!(ac.status, 200, "{}", ac.text());
    assert_eq!(answered_by_tenant(&admin).await, (1.0, 2.0));
    let ac = post_with_headers(&url, &[(h, &app_check_token(&k, APP_ID, PROJECT))], 5).await;
    assert_eq!(ac.status, 200, "{}", ac.text());
    assert_eq!(answered_by_tenant(&admin).await, (2.0, 2.0));
    let m = metrics_text(&admin).await;
    for id in ["app-a", "app-b", "check-a", "check-b"] {
        assert_eq!(
            sample(
                &m,
                &format!("liveness_gateway_auth_tokens_verified_total{{issuer=\"{id}\"}}")
            ),
            1.0,
            "{id}"
        );
    }
    assert_eq!(emu.stats().calls, 4);
}

/// Two issuers whose tokens cannot be told apart (the same `iss`, an audience in common, and
/// no app ids to separate them) are refused by `check-config`, naming both.
#[test]
fn check_config_refuses_issuers_that_cannot_be_told_apart() {
    let dir = tempfile::tempdir().expect("dir");
    let emu = start_emulator();
    let builder = TestGateway::for_emulator(&emu).set(
        "auth.issuers",
        &format!(
            "[{{ id = \"first\", issuer = \"{ISS}\", audiences = [\"{AUD}\", \"x\"], jwks_url = \"https://a.test/jwks\", algorithms = [\"ES256\"], tenant = \"alpha\" }}, \
              {{ id = \"second\", issuer = \"{ISS}\", audiences = [\"y\", \"{AUD}\"], jwks_url = \"https://b.test/jwks\", algorithms = [\"ES256\"], tenant = \"beta\", header = \"X-App-Token\" }}, \
              {{ id = \"ac-one\", kind = \"firebase-app-check\", project_number = \"{PROJECT}\", app_ids = [\"{APP_ID}\"], jwks_url = \"https://a.test/jwks\", tenant = \"alpha\" }}, \
              {{ id = \"ac-two\", kind = \"firebase-app-check\", project_number = \"{PROJECT}\", app_ids = [\"1:1:web:1\", \"{APP_ID}\"], jwks_url = \"https://a.test/jwks\", tenant = \"beta\" }}]"
        ),
    );
    let text = refused(
        dir.path(),
        &builder,
        true,
        &[
            "auth.issuers[1]",
            "\"first\"",
            "\"second\"",
            "auth.issuers[3]",
            "\"ac-one\"",
            "\"ac-two\"",
        ],
    );
    // Different audiences, or app ids of their own: nothing to refuse.
    let fine = TestGateway::for_emulator(&emu).set(
        "auth.issuers",
        &format!(
            "[{{ id = \"first\", issuer = \"{ISS}\", audiences = [\"a\"], jwks_url = \"https://a.test/jwks\", algorithms = [\"ES256\"], tenant = \"alpha\" }}, \
              {{ id = \"second\", issuer = \"{ISS}\", audiences = [\"b\"], jwks_url = \"https://b.test/jwks\", algorithms = [\"ES256\"], tenant = \"beta\" }}, \
              {{ id = \"ac-one\", kind = \"firebase-app-check\", project_number = \"{PROJECT}\", app_ids = [\"{APP_ID}\"], jwks_url = \"https://a.test/jwks\", tenant = \"alpha\" }}, \
              {{ id = \"ac-two\", kind = \"firebase-app-check\", project_number = \"{PROJECT}\", app_ids = [\"1:1:web:1\"], jwks_url = \"https://a.test/jwks\", tenant = \"beta\" }}]"
        ),
    );
    let path = dir.path().join("fine.toml");
    std::fs::write(&path, fine.toml()).expect("config");
    let (ok, out) = check_config(&path, true);
    assert!(ok, "{out}\n(the refused one said: {text})");
}

/// A JWKS URL that streams a valid key set padded with whitespace, chunked (no length said), up
/// to `cap` bytes; it counts what it managed to write, over every connection.
async fn padded_jwks_server(
    doc: &Value,
    cap: usize,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/jwks", listener.local_addr().expect("addr"));
    let written = std::sync::Arc::new(AtomicUsize::new(0));
    let text = doc.to_string();
    let open = text[..text.len() - 1].to_string();
    let counter = written.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (open, counter) = (open.clone(), counter.clone());
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                let _ = s.read(&mut head).await;
                let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                let piece = |data: &[u8]| {
                    [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat()
                };
                out.extend(piece(open.as_bytes()));
                if s.write_all(&out).await.is_err() {
                    return;
                }
                let pad = piece(&[b' '; 64 * 1024]);
                let mut sent = 0;
                while sent < cap {
                    if s.write_all(&pad).await.is_err() {
                        return;
                    }
                    sent += pad.len();
                    counter.fetch_add(pad.len(), Ordering::Relaxed);
                }
                let _ = s
                    .write_all(&[piece(b"}"), b"0\r\n\r\n".to_vec()].concat())
                    .await;
            });
        }
    });
    (url, written)
}

/// A JWKS response is read up to 256 KiB: a key set padded to 64 MiB (as a broken or hostile
/// URL streaming without end) is refused as a failed fetch, counted as `too_large`, and the
/// gateway stops reading it; a token of that issuer gets 503 `auth_unavailable`, not a 200 on
/// keys read from 64 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_response_is_read_up_to_its_limit() {
    let dir = tempfile::tempdir().expect("dir");
    let k = keys(dir.path());
    let (jwks_url, written) = padded_jwks_server(&k.jwks, 64 << 20).await;
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("auth.issuers", &url_issuer(&jwks_url))
        .start();
    let token = mint(&k.es256, Algorithm::ES256, "ec-1", &claims());
    let a = post_with_token(&gw.url(), &token, 1).await;
    assert_eq!(
        (a.status, a.code()),
        (503, "auth_unavailable".to_string()),
        "{}",
        a.text()
    );
    let m = metrics_text(&gw.admin_url()).await;
    assert!(
        sample(
            &m,
            r#"liveness_gateway_auth_jwks_fetches_total{issuer="app",outcome="too_large"}"#
        ) >= 1.0,
        "{}",
        m.lines()
            .filter(|l| l.contains("jwks"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // What the server got out before the gateway hung up: the limit and the sockets' buffers
    // (3.7 MiB measured).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let sent = written.load(std::sync::atomic::Ordering::Relaxed);
    assert!(sent < 16 << 20, "{sent} bytes of the JWKS were taken");
    assert_eq!(emu.stats().calls, 0);
}

/// A single-use token is spent only by a request admitted for a verdict (valid, within its
/// limits): one refused for a bad image, its rate or the budget can be sent again and then
/// works, once. A cache hit spends it; so does a call to the provider, whatever the provider
/// answers. In the fleet, a refusal after the token was recorded gives it back in Redis too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_token_is_spent_only_when_its_request_is_admitted() {
    let dir = tempfile::tempdir().expect("dir");
    let k = keys(dir.path());
    let jwks = jwks_file(dir.path(), &k);
    let emu = start_emulator();
    let once = |jti: &str| {
        let mut c = claims();
        c["jti"] = json!(jti);
        mint(&k.es256, Algorithm::ES256, "ec-1", &c)
    };
    let code = |a: &Answer| (a.status, a.code());
    let replayed = (401, "token_replayed".to_string());
    let pause = || tokio::time::sleep(std::time::Duration::from_millis(1100));

    // Refused by the tenant's rate (one a second): the same token works a second later.
    let gw = TestGateway::for_emulator(&emu)
        .set("auth.issuers", &single_use_issuer(&jwks))
        .tenant_set("alpha", "rate_per_second", "1")
        .tenant_set("alpha", "burst", "1")
        .start();
    let url = gw.url();
    assert_eq!(post_with_token(&url, &once("r-1"), 1).await.status, 200);
    let limited = post_with_token(&url, &once("r-2"), 2).await;
    assert_eq!(code(&limited), (429, "rate_limited".to_string()));
    pause().await;
    assert_eq!(post_with_token(&url, &once("r-2"), 2).await.status, 200);
    pause().await;
    assert_eq!(
        code(&post_with_token(&url, &once("r-2"), 3).await),
        replayed
    );
    drop(gw);

    // A bad image, then the budget (one call a day), then the provider failing.
    let gw = TestGateway::for_emulator(&emu)
        .set("auth.issuers", &single_use_issuer(&jwks))
        .tenant_set("alpha", "daily_budget", "2")
        .start();
    let url = gw.url();
    let not_an_image = post_image(&url, &once("b-1"), "a.jpg", &[b'x'; 500]).await;
    assert_eq!(code(&not_an_image), (415, "not_an_image".to_string()));
    assert_eq!(post_with_token(&url, &once("b-1"), 10).await.status, 200);
    assert_eq!(
        code(&post_with_token(&url, &once("b-1"), 11).await),
        replayed
    );
    emu.set_fault(liveness_gateway_dev::emulator::Fault::ServerError);
    let failed = post_with_token(&url, &once("b-2"), 12).await;
    assert_eq!(code(&failed), (502, "upstream_error".to_string()));
    emu.set_fault(liveness_gateway_dev::emulator::Fault::None);
    // The provider had the upload (and may bill it): that token paid for its call.
    assert_eq!(
        code(&post_with_token(&url, &once("b-2"), 12).await),
        replayed
    );
    let over = post_with_token(&url, &once("b-3"), 13).await;
    assert_eq!(code(&over), (429, "budget_exhausted".to_string()));
    // The photo already answered: a cache hit, free of budget, and it spends the token.
    let hit = post_with_token(&url, &once("b-3"), 10).await;
    assert_eq!(
        (hit.status, hit.header("x-cache")),
        (200, Some("HIT".into()))
    );
    assert_eq!(
        code(&post_with_token(&url, &once("b-3"), 10).await),
        replayed
    );
    drop(gw);

    // Two replicas on Redis, one call a day: refused by the budget on one, the token is given
    // back in the store and works on the other (a cache hit there), then never again.
    let redis = RedisServer::start();
    let builder = TestGateway::for_emulator(&emu)
        .set("auth.issuers", &single_use_issuer(&jwks))
        .tenant_set("alpha", "daily_budget", "1")
        .set("store.backend", "\"redis\"")
        .set("store.url", &format!("\"{}\"", redis.url()))
        .set("store.timeout", "\"250ms\"");
    let procs = tempfile::tempdir().expect("dir");
    let (_a, a) = GatewayProcess::start_named(&builder.replica(), procs.path(), "a", &[]).await;
    let (_b, b) = GatewayProcess::start_named(&builder.replica(), procs.path(), "b", &[]).await;
    let (a, b) = (
        format!("http://{}", a.listen),
        format!("http://{}", b.listen),
    );
    assert_eq!(post_with_token(&a, &once("f-1"), 20).await.status, 200);
    let over = post_with_token(&a, &once("f-2"), 21).await;
    assert_eq!(code(&over), (429, "budget_exhausted".to_string()));
    let hit = post_with_token(&b, &once("f-2"), 20).await;
    assert_eq!(
        (hit.status, hit.header("x-cache")),
        (200, Some("HIT".into())),
        "{}",
        hit.text()
    );
    assert_eq!(code(&post_with_token(&a, &once("f-2"), 20).await), replayed);
    assert_eq!(code(&post_with_token(&b, &once("f-1"), 20).await), replayed);
}
