//! Signed verdict receipts: the gateway's word to a tenant's backend on what the provider said of
//! one upload, for one tenant, one user and one attempt. A backend cannot trust a verdict its app
//! relays (a tampered app sends `{"result": true}`); it can verify a receipt with the gateway's
//! public keys and check its nonce, audience, subject and expiry (docs/receipts.md).
//!
//! A receipt is a compact JWS (ES256 on P-256, or EdDSA on Ed25519) in the answer's
//! `Liveness-Receipt` header; the body stays the provider's. The signing key is parsed once, when
//! the config is loaded (a reload may bring a new one); the public keys, the signing key's and the
//! previous ones an operator lists across a rotation, are served as a JWKS.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::Algorithm;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::{ReceiptKey, ReceiptsConfig};
use crate::error::GatewayError;

/// The header a receipt comes in.
pub const HEADER: &str = "Liveness-Receipt";
/// Where the public keys are served, on the client listeners and the admin listener.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
/// How long a client may keep the JWKS (5 min): a new key is listed at least this long before
/// it signs, when an operator rotates as docs/receipts.md says. Served on both listeners.
pub const JWKS_CACHE_CONTROL: &str = "public, max-age=300";
/// The longest nonce accepted.
pub const MAX_NONCE: usize = 128;

/// The signer of one config: its key, its `kid`, and the JWKS to serve.
pub struct Receipts {
    issuer: String,
    ttl: Duration,
    kid: String,
    /// The JWS header (`alg`, `kid`, `typ`), base64url, made once.
    head: String,
    signer: Signer,
    /// The JWKS document, serialized once.
    jwks: bytes::Bytes,
}

/// The signing key, parsed once. A receipt is signed here with `ring` rather than with
/// `jsonwebtoken::encode`, which parses the PKCS#8 key again for every signature: measured
/// (`cargo bench --bench hot_paths -- receipt_sign`), a receipt took 50.9 µs with EdDSA and
/// 31.3 µs with ES256 that way, 28.4 µs and 19.9 µs this way.
enum Signer {
    Ed25519(Ed25519KeyPair),
    P256(EcdsaKeyPair, SystemRandom),
}

impl Signer {
    fn alg(&self) -> &'static str {
        match self {
            Signer::Ed25519(_) => "EdDSA",
            Signer::P256(..) => "ES256",
        }
    }

    /// The JWS signature of `message` (for ES256, `r || s`, as RFC 7518 3.4 wants).
    fn sign(&self, message: &[u8]) -> Option<Vec<u8>> {
        match self {
            Signer::Ed25519(k) => Some(k.sign(message).as_ref().to_vec()),
            Signer::P256(k, rng) => k.sign(rng, message).ok().map(|s| s.as_ref().to_vec()),
        }
    }
}

/// What a receipt says of one answer.
pub struct Facts<'a> {
    pub tenant: &'a str,
    /// The subject an app token names, as it names it.
    pub subject: Option<&'a str>,
    pub request_id: &'a str,
    /// The provider's answer body (its `result`, `prediction`, `failure_reason.type`,
    /// `backend_session_id` are copied as the provider wrote them).
    pub answer: &'a [u8],
    /// The image's digest, prefixed with its algorithm (`blake3:…`).
    pub image: &'a str,
    /// Answered from a verdict made before this request (a cache hit, or a call it joined).
    pub hit: bool,
    pub replay_suspected: bool,
    pub nonce: Option<&'a str>,
    /// What the face check found before the call (`intake.face`), when one ran.
    pub face: Option<&'a str>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
    iat: u64,
    exp: u64,
    jti: String,
    request_id: &'a str,
    result: bool,
    prediction: Value,
    failure_type: Value,
    session: Value,
    image: &'a str,
    cache: &'static str,
    replay_suspected: bool,
    nonce: Option<&'a str>,
    /// What the face check found before the call (`face`, `no_face`, …; null: none ran, as
    /// for a hit).
    face: Option<&'a str>,
}

impl Receipts {
    /// The signer of `cfg`, its key read from its file or taken from its variable. The error
    /// says what is wrong without the key's text.
    pub fn new(cfg: &ReceiptsConfig) -> Result<Receipts, String> {
        let pem = match &cfg.key {
            ReceiptKey::File(path) => read(path)?,
            ReceiptKey::Pem(pem) => pem.expose().to_string(),
        };
        let (signer, public) = parse_key(&pem)?;
        let kid = cfg.kid.clone().unwrap_or_else(|| thumbprint(&public));
        let signing = jwk(&public, &kid);
        let mut keys = vec![signing.clone()];
        if let Some(path) = &cfg.listed_jwks_file {
            for listed in listed_keys(path)? {
                let kid_of = |k: &Value| k.get("kid").cloned();
                if kid_of(&listed) != Some(kid.clone().into()) {
                    keys.push(listed);
                } else if listed != signing {
                    return Err(format!(
                        "{}: a listed key has the kid {kid:?} of the signing key, and is another key",
                        path.display()
                    ));
                }
                // (The signing key itself, listed before it signed: served once.)
            }
        }
        let header = json!({"alg": signer.alg(), "kid": kid, "typ": "JWT"});
        let head = b64(&serde_json::to_vec(&header).map_err(|e| e.to_string())?);
        let jwks = serde_json::to_vec(&json!({ "keys": keys })).map_err(|e| e.to_string())?;
        Ok(Receipts {
            issuer: cfg.issuer.clone(),
            ttl: cfg.ttl,
            kid,
            head,
            signer,
            jwks: jwks.into(),
        })
    }

    /// The signing key's id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public keys, as a JWKS document.
    pub fn jwks(&self) -> bytes::Bytes {
        self.jwks.clone()
    }

    /// A receipt for one answer, signed at `now` (Unix seconds); `None` when it cannot be
    /// signed (the answer then goes without one, and the caller logs it).
    pub fn sign(&self, facts: &Facts<'_>, now: u64) -> Option<String> {
        let body: Value = serde_json::from_slice(facts.answer).unwrap_or(Value::Null);
        let field = |name: &str| body.get(name).cloned().unwrap_or(Value::Null);
        let claims = Claims {
            iss: &self.issuer,
            aud: facts.tenant,
            sub: facts.subject,
            iat: now,
            exp: now + self.ttl.as_secs(),
            jti: uuid::Uuid::new_v4().simple().to_string(),
            request_id: facts.request_id,
            result: body.get("result").and_then(Value::as_bool).unwrap_or(false),
            prediction: field("prediction"),
            // The provider's `failure_reason.type` (`CALC_RESULT`, `SERVICE_ERROR`, …).
            failure_type: body
                .pointer("/failure_reason/type")
                .filter(|t| t.is_string())
                .cloned()
                .unwrap_or(Value::Null),
            session: field("backend_session_id"),
            image: facts.image,
            cache: if facts.hit { "hit" } else { "miss" },
            replay_suspected: facts.replay_suspected,
            nonce: facts.nonce,
            face: facts.face,
        };
        let payload = serde_json::to_vec(&claims).ok()?;
        let mut jws = format!("{}.{}", self.head, b64(&payload));
        let signature = self.signer.sign(jws.as_bytes())?;
        jws.push('.');
        jws.push_str(&b64(&signature));
        Some(jws)
    }
}

/// The header an app sends the attempt's nonce in (or the form field `nonce`).
pub const NONCE_HEADER: &str = "liveness-nonce";

/// The nonce of the request's `Liveness-Nonce` header; more than one is refused.
pub fn nonce_header(headers: &http::HeaderMap) -> Result<Option<String>, GatewayError> {
    let mut values = headers.get_all(NONCE_HEADER).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(GatewayError::NonceMismatch);
    }
    let nonce = first.to_str().map_err(|_| GatewayError::InvalidNonce)?;
    let mut known = None;
    join_nonce(&mut known, Some(nonce))?;
    Ok(known)
}

/// Join a nonce from one more source (the header, an app token's claim, the form's field) to
/// the attempt's: each must be valid, and all must be the same.
pub fn join_nonce(known: &mut Option<String>, more: Option<&str>) -> Result<(), GatewayError> {
    let Some(more) = more else { return Ok(()) };
    if !nonce_is_valid(more) {
        return Err(GatewayError::InvalidNonce);
    }
    match known {
        Some(k) if k != more => Err(GatewayError::NonceMismatch),
        Some(_) => Ok(()),
        None => {
            *known = Some(more.to_string());
            Ok(())
        }
    }
}

/// Whether a nonce is one a receipt carries as it is: 1 to `MAX_NONCE` visible ASCII characters
/// (a backend's random token, base64url or hex, fits; nothing that needs escaping in a header).
pub fn nonce_is_valid(nonce: &str) -> bool {
    (1..=MAX_NONCE).contains(&nonce.len()) && nonce.bytes().all(|b| b.is_ascii_graphic())
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A public key, as its algorithm and its JWK members (no `kid`).
struct Public {
    alg: Algorithm,
    members: Value,
}

/// The signer and the public key of a PKCS#8 PEM private key: Ed25519, or ECDSA on P-256.
fn parse_key(pem: &str) -> Result<(Signer, Public), String> {
    let der = rustls_pemfile::private_key(&mut pem.as_bytes())
        .ok()
        .flatten()
        .ok_or("the signing key is not a PEM private key (PKCS#8, `BEGIN PRIVATE KEY`)")?;
    let der = der.secret_der();
    if let Ok(pair) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
        let members = json!({"kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key().as_ref())});
        return Ok((
            Signer::Ed25519(pair),
            Public {
                alg: Algorithm::EdDSA,
                members,
            },
        ));
    }
    let rng = SystemRandom::new();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng).map_err(|_| {
            "the signing key is neither Ed25519 nor ECDSA on P-256 (PKCS#8; an ECDSA key with its \
             public key inside, as `tokens keygen` and `openssl genpkey` write it)"
        })?;
    let point = pair.public_key().as_ref();
    let members =
        json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..65])});
    Ok((
        Signer::P256(pair, rng),
        Public {
            alg: Algorithm::ES256,
            members,
        },
    ))
}

/// The JWK of a public key, with its `kid`.
fn jwk(public: &Public, kid: &str) -> Value {
    let mut jwk = public.members.clone();
    let alg = match public.alg {
        Algorithm::ES256 => "ES256",
        _ => "EdDSA",
    };
    if let Value::Object(m) = &mut jwk {
        m.insert("alg".into(), alg.into());
        m.insert("use".into(), "sig".into());
        m.insert("kid".into(), kid.into());
    }
    jwk
}

/// A key's default `kid`: its RFC 7638 thumbprint (SHA-256 of the required members in
/// lexicographic order), base64url: the same key gets the same id on every replica.
fn thumbprint(public: &Public) -> String {
    use sha2::{Digest, Sha256};
    let m = &public.members;
    let s = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or_default();
    let canonical = match public.alg {
        Algorithm::ES256 => format!(
            r#"{{"crv":"{}","kty":"{}","x":"{}","y":"{}"}}"#,
            s("crv"),
            s("kty"),
            s("x"),
            s("y")
        ),
        _ => format!(
            r#"{{"crv":"{}","kty":"{}","x":"{}"}}"#,
            s("crv"),
            s("kty"),
            s("x")
        ),
    };
    b64(&Sha256::digest(canonical.as_bytes()))
}

/// The public keys of a JWKS file of keys listed beside the signing key (the previous key
/// across a rotation, the next one before it signs): each an ES256 or EdDSA public key with a
/// `kid`, and no private member. Only the members a verifier needs are served (`kty`, `crv`,
/// `x`, `y`, `kid`, with `alg` and `use` as they are for that curve): nothing else an operator
/// left in the file is published.
fn listed_keys(path: &Path) -> Result<Vec<Value>, String> {
    let text = read(path)?;
    let doc: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a JWKS (JSON): {e}", path.display()))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{}: a JWKS has a `keys` array", path.display()))?;
    let mut out = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let text = |m: &str| k.get(m).and_then(Value::as_str);
        let private = ["d", "p", "q", "dp", "dq", "qi", "k"];
        if private.iter().any(|m| k.get(*m).is_some()) {
            return Err(format!(
                "{}: keys[{i}] holds a private or secret member: list public keys only",
                path.display()
            ));
        }
        let public = match (text("kty"), text("crv"), text("x"), text("y")) {
            (Some("EC"), Some("P-256"), Some(x), Some(y)) => Some(Public {
                alg: Algorithm::ES256,
                members: json!({"kty": "EC", "crv": "P-256", "x": x, "y": y}),
            }),
            (Some("OKP"), Some("Ed25519"), Some(x), _) => Some(Public {
                alg: Algorithm::EdDSA,
                members: json!({"kty": "OKP", "crv": "Ed25519", "x": x}),
            }),
            _ => None,
        };
        match (public, text("kid")) {
            (Some(public), Some(kid)) if !kid.is_empty() => out.push(jwk(&public, kid)),
            _ => {
                return Err(format!(
                "{}: keys[{i}] is not an ES256 (P-256) or EdDSA (Ed25519) public key with a kid",
                path.display()
            ))
            }
        }
    }
    Ok(out)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SigningPem;

    fn config(pem: String) -> ReceiptsConfig {
        ReceiptsConfig {
            issuer: "https://gateway.example".into(),
            key: ReceiptKey::Pem(SigningPem::new(pem)),
            kid: None,
            ttl: Duration::from_secs(600),
            listed_jwks_file: None,
        }
    }

    fn facts(answer: &[u8]) -> Facts<'_> {
        Facts {
            tenant: "acme",
            subject: Some("user-1"),
            request_id: "r1",
            answer,
            image: "blake3:00",
            hit: false,
            replay_suspected: false,
            nonce: Some("n-1"),
            face: Some("face"),
        }
    }

    /// A receipt verifies with the served JWKS, for both algorithms, and says what the answer
    /// said; a flipped byte anywhere does not verify.
    #[test]
    fn receipts_verify_with_the_served_keys_and_carry_the_answer() {
        for alg in ["ES256", "EdDSA"] {
            let (pem, _) = crate::auth::tools::keygen(alg, "unused").expect("key");
            let r = Receipts::new(&config(pem)).expect("receipts");
            let answer = br#"{"result": false, "prediction": "0.07", "failure_reason": {"type": "CALC_RESULT", "detail": "Low"}, "backend_session_id": "s-1"}"#;
            let token = r.sign(&facts(answer), 1_800_000_000).expect("signed");
            let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&r.jwks()).expect("jwks");
            let key = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).expect("key");
            let algorithm = if alg == "ES256" {
                Algorithm::ES256
            } else {
                Algorithm::EdDSA
            };
            let mut v = jsonwebtoken::Validation::new(algorithm);
            v.set_audience(&["acme"]);
            v.validate_exp = false;
            let data = jsonwebtoken::decode::<Value>(&token, &key, &v).expect("verifies");
            let c = data.claims;
            assert_eq!(c["iss"], "https://gateway.example");
            assert_eq!(c["sub"], "user-1");
            assert_eq!(c["result"], false);
            assert_eq!(c["prediction"], "0.07");
            assert_eq!(c["session"], "s-1");
            assert_eq!(c["failure_type"], "CALC_RESULT");
            assert_eq!(c["nonce"], "n-1");
            assert_eq!(c["cache"], "miss");
            assert_eq!(c["exp"].as_u64(), Some(1_800_000_600));
            assert_eq!(data.header.kid.as_deref(), Some(r.kid()));
            for at in [10, token.len() / 2, token.len() - 3] {
                let mut bytes = token.clone().into_bytes();
                bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
                let flipped = String::from_utf8(bytes).expect("ascii");
                assert!(
                    jsonwebtoken::decode::<Value>(&flipped, &key, &v).is_err(),
                    "{alg}: a receipt with byte {at} flipped verified"
                );
            }
        }
    }

    #[test]
    fn a_key_of_another_kind_and_a_private_previous_key_are_refused_without_their_text() {
        let rsa = "-----BEGIN PRIVATE KEY-----\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8wggE7AgEAAkEA\n-----END PRIVATE KEY-----\n";
        let err = Receipts::new(&config(rsa.into())).err().expect("refused");
        assert!(!err.contains("MIIB"), "{err}");
        let err = Receipts::new(&config("not a key".into()))
            .err()
            .expect("refused");
        assert!(err.contains("PEM"), "{err}");

        let (pem, jwks) = crate::auth::tools::keygen("EdDSA", "old").expect("key");
        let dir = std::env::temp_dir().join(format!("receipts-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("previous.json");
        let mut private = jwks.clone();
        private["keys"][0]["d"] = "secret".into();
        std::fs::write(&file, private.to_string()).expect("write");
        let mut cfg = config(pem.clone());
        cfg.listed_jwks_file = Some(file.clone());
        let err = Receipts::new(&cfg).err().expect("refused");
        assert!(err.contains("private"), "{err}");
        // Members a verifier does not need are not served.
        let mut odd = jwks.clone();
        odd["keys"][0]["alg"] = "HS256".into();
        odd["keys"][0]["note"] = "internal".into();
        std::fs::write(&file, odd.to_string()).expect("write");
        let r = Receipts::new(&cfg).expect("receipts");
        let served: Value = serde_json::from_slice(&r.jwks()).expect("json");
        assert_eq!(served["keys"][1]["alg"], "EdDSA");
        assert!(served["keys"][1].get("note").is_none());
        std::fs::write(&file, jwks.to_string()).expect("write");
        let (new_pem, _) = crate::auth::tools::keygen("ES256", "new").expect("key");
        cfg.key = ReceiptKey::Pem(SigningPem::new(new_pem));
        let r = Receipts::new(&cfg).expect("receipts");
        let served: Value = serde_json::from_slice(&r.jwks()).expect("json");
        let kids: Vec<&str> = served["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .filter_map(|k| k["kid"].as_str())
            .collect();
        assert_eq!(kids, [r.kid(), "old"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_nonce_from_several_sources_must_be_one() {
        let mut known = None;
        join_nonce(&mut known, None).expect("none");
        join_nonce(&mut known, Some("abc")).expect("first");
        join_nonce(&mut known, Some("abc")).expect("the same");
        assert_eq!(known.as_deref(), Some("abc"));
        assert!(matches!(
            join_nonce(&mut known, Some("abd")),
            Err(GatewayError::NonceMismatch)
        ));
        assert!(matches!(
            join_nonce(&mut None, Some("a b")),
            Err(GatewayError::InvalidNonce)
        ));
        let mut headers = http::HeaderMap::new();
        headers.append(NONCE_HEADER, "one".parse().expect("value"));
        assert_eq!(nonce_header(&headers).expect("one").as_deref(), Some("one"));
        headers.append(NONCE_HEADER, "two".parse().expect("value"));
        assert!(nonce_header(&headers).is_err());
    }

    #[test]
    fn nonces_are_short_visible_ascii() {
        assert!(nonce_is_valid("b64url_-9aZ"));
        assert!(!nonce_is_valid(""));
        assert!(!nonce_is_valid("has space"));
        assert!(!nonce_is_valid("é"));
        assert!(!nonce_is_valid(&"a".repeat(MAX_NONCE + 1)));
    }
}
