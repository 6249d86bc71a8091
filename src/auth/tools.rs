//! `liveness-gateway tokens`: a signing key and its JWKS for a customer's first integration, and
//! tokens minted with it, for tests and trials. A real deployment signs in the customer's own
//! backend (docs/app-tokens.md shows Python and Node).

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn pem(der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        lines.join("\n")
    )
}

/// A new private key (PKCS#8 PEM) and the JWKS of its public key, for `ES256` or `EdDSA`.
pub fn keygen(alg: &str, kid: &str) -> Result<(String, Value), String> {
    let rng = SystemRandom::new();
    let bad = |e: ring::error::Unspecified| format!("key generation failed: {e}");
    let (der, jwk) = match alg {
        "ES256" => {
            let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(bad)?;
            let pair =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng)
                    .map_err(|e| e.to_string())?;
            let point = pair.public_key().as_ref();
            let jwk = json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                             "x": b64(&point[1..33]), "y": b64(&point[33..65])});
            (doc.as_ref().to_vec(), jwk)
        }
        "EdDSA" => {
            let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(bad)?;
            let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|e| e.to_string())?;
            let jwk = json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid,
                             "x": b64(pair.public_key().as_ref())});
            (doc.as_ref().to_vec(), jwk)
        }
        other => return Err(format!("--alg {other}: ES256 or EdDSA")),
    };
    Ok((pem(&der), json!({ "keys": [jwk] })))
}

/// What a minted token says.
pub struct Mint<'a> {
    pub alg: &'a str,
    pub kid: &'a str,
    pub issuer: &'a str,
    pub audience: &'a str,
    pub subject: &'a str,
    pub ttl: std::time::Duration,
    pub jti: bool,
    /// The `nonce` claim, when the token is for one attempt.
    pub nonce: Option<&'a str>,
}

/// A token signed with a PKCS#8 PEM key made by `keygen`.
pub fn mint(key_pem: &str, m: &Mint<'_>) -> Result<String, String> {
    let (alg, key) = match m.alg {
        "ES256" => (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(key_pem.as_bytes()),
        ),
        "EdDSA" => (
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(key_pem.as_bytes()),
        ),
        other => return Err(format!("--alg {other}: ES256 or EdDSA")),
    };
    let key = key.map_err(|e| format!("not a {} private key: {e}", m.alg))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut claims = json!({"iss": m.issuer, "aud": m.audience, "sub": m.subject,
                            "iat": now, "exp": now + m.ttl.as_secs()});
    if m.jti {
        claims["jti"] = json!(uuid::Uuid::new_v4().to_string());
    }
    if let Some(nonce) = m.nonce {
        claims["nonce"] = json!(nonce);
    }
    let mut header = Header::new(alg);
    header.kid = Some(m.kid.to_string());
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| e.to_string())
}
