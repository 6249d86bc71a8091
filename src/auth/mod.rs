//! App tokens: short-lived JWTs that a customer's backend signs for a logged-in user, accepted
//! instead of a long-lived tenant key. Each `[[auth.issuers]]` entry names who signs (`iss`), for
//! whom (`aud`), with which algorithms and keys (a JWKS file), and which tenant its tokens act
//! for. The algorithm is never taken from the token alone: it must be in the issuer's allowlist
//! and match the key that verifies it.

mod admit;
pub mod jwks;
pub mod tenant;
pub mod tools;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::IssuerConfig;

pub use admit::{admit_token, spend, Remembered, Spent};
pub use jwks::{Fetched, KeySet};

/// Longest token accepted; longer ones are refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Why a token was refused: the `reason` of `401 invalid_token` and of the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed")]
    Malformed,
    #[error("signature")]
    Signature,
    #[error("expired")]
    Expired,
    #[error("not_yet_valid")]
    NotYetValid,
    #[error("issuer")]
    Issuer,
    #[error("audience")]
    Audience,
    #[error("algorithm")]
    Algorithm,
    #[error("unknown_kid")]
    UnknownKid,
    #[error("lifetime")]
    Lifetime,
    #[error("subject")]
    Subject,
}

impl TokenError {
    pub const ALL: [TokenError; 10] = [
        TokenError::Malformed,
        TokenError::Signature,
        TokenError::Expired,
        TokenError::NotYetValid,
        TokenError::Issuer,
        TokenError::Audience,
        TokenError::Algorithm,
        TokenError::UnknownKid,
        TokenError::Lifetime,
        TokenError::Subject,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::Signature => "signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::Issuer => "issuer",
            TokenError::Audience => "audience",
            TokenError::Algorithm => "algorithm",
            TokenError::UnknownKid => "unknown_kid",
            TokenError::Lifetime => "lifetime",
            TokenError::Subject => "subject",
        }
    }
}

/// A verification key of an issuer, from its JWKS.
#[derive(Clone)]
pub struct VerifyKey {
    kid: Option<String>,
    /// The algorithms this key can verify (by its type and curve).
    family: &'static [Algorithm],
    key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey").field("kid", &self.kid).finish()
    }
}

const RSA: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

fn family(jwk: &Jwk) -> Option<&'static [Algorithm]> {
    use jsonwebtoken::jwk::EllipticCurve;
    Some(match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => RSA,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
            _ => return None,
        },
        AlgorithmParameters::OctetKey(_) => return None,
    })
}

impl VerifyKey {
    /// A public key of a type and curve it can verify with; `None` for any other.
    fn from_jwk(jwk: &Jwk) -> Option<VerifyKey> {
        Some(VerifyKey {
            kid: jwk.common.key_id.clone(),
            family: family(jwk)?,
            key: DecodingKey::from_jwk(jwk).ok()?,
        })
    }
}

/// An issuer in force: its settings (which `Deref` reaches, as `issuer.audiences`) and its live
/// keys: a file read when the config is, or a URL kept fresh (shared across reloads while the
/// issuer's id and source stay).
#[derive(Debug, Clone)]
pub struct Issuer {
    pub settings: IssuerConfig,
    pub keys: Arc<KeySet>,
}

impl std::ops::Deref for Issuer {
    type Target = IssuerConfig;

    fn deref(&self) -> &IssuerConfig {
        &self.settings
    }
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub issuer: String,
    pub tenant: String,
    pub subject: String,
    /// Its `exp` plus the issuer's leeway, in Unix seconds: when a remembered verification ends.
    pub usable_until: u64,
    /// The token's `jti`, when it has one.
    pub jti: Option<String>,
    /// Its issuer accepts each token once (the `jti` is then there).
    pub single_use: bool,
    /// The `nonce` claim: the attempt it was issued for (its receipt carries it).
    pub nonce: Option<String>,
}

/// Whether a bearer credential has the shape of a JWT (three base64url parts), rather than a
/// tenant key's.
pub fn looks_like_jwt(value: &str) -> bool {
    let parts: Vec<&str> = value.split('.').collect();
    parts.len() == 3
        && parts[..2].iter().all(|p| !p.is_empty())
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The tokens in the headers the issuers name (not `Authorization`, which the tenant-key code
/// reads): `(header, token)`, at most one per header. A header sent twice, empty, or not text
/// is refused as malformed.
pub fn header_tokens(
    headers: &http::HeaderMap,
    issuers: &[Issuer],
) -> Result<Vec<(http::HeaderName, String)>, crate::error::GatewayError> {
    let mut out: Vec<(http::HeaderName, String)> = Vec::new();
    for name in issuers.iter().filter_map(|i| i.header.as_ref()) {
        if out.iter().any(|(n, _)| n == name) {
            continue;
        }
        let Some(v) = crate::auth::tenant::credential_header(headers, name)? else {
            continue;
        };
        let v = v
            .to_str()
            .map(str::trim)
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or(crate::error::GatewayError::MalformedCredentials)?;
        out.push((name.clone(), v.to_string()));
    }
    Ok(out)
}

/// What a token says of itself before it is verified: enough to find its issuers.
#[derive(Deserialize)]
struct Unverified {
    iss: Option<String>,
    #[serde(default)]
    aud: Audiences,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// A token's `aud`: one string or a list.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Audiences {
    #[default]
    None,
    One(String),
    Many(Vec<serde_json::Value>),
}

impl Audiences {
    fn contains_any(&self, wanted: &[String]) -> bool {
        match self {
            Audiences::None => false,
            Audiences::One(a) => wanted.contains(a),
            Audiences::Many(list) => list
                .iter()
                .filter_map(|a| a.as_str())
                .any(|a| wanted.iter().any(|w| w == a)),
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    exp: u64,
    iat: Option<u64>,
    jti: Option<String>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// Why a token is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Token(TokenError),
    /// The issuer's keys cannot be had (its JWKS is down and no good set is left): try again
    /// after this long.
    Unavailable(Duration),
}

/// Verify a token against the issuers; `now` in Unix seconds. The token is tried with each
/// issuer it may be from (see `pick`), in order, and the first that verifies it all wins. A
/// `kid` that none of their keys has (or no keys at all) brings one refetch of each one's JWKS
/// URL, within its cooldown; `fetched` hears of every fetch made.
pub async fn verify(
    issuers: &[Issuer],
    header: Option<&http::HeaderName>,
    token: &str,
    now: u64,
    client: &reqwest::Client,
    fetched: impl Fn(&Issuer, Fetched),
) -> Result<Verified, Refusal> {
    let (candidates, header) = pick(issuers, header, token).map_err(Refusal::Token)?;
    let with_keys = |issuer: &Issuer| match issuer.keys.current() {
        Ok(keys) => check(issuer, &header, &keys, token, now),
        Err(_) => Err(TokenError::UnknownKid),
    };
    let mut errors = Vec::with_capacity(candidates.len());
    for issuer in &candidates {
        match with_keys(issuer) {
            Ok(v) => return Ok(v),
            Err(e) => errors.push(e),
        }
    }
    if errors.contains(&TokenError::UnknownKid) {
        // Their keys may have rotated: the issuers that lacked the `kid` fetch theirs again.
        let mut unavailable = None;
        for (issuer, e) in candidates.iter().zip(errors.iter_mut()) {
            if *e != TokenError::UnknownKid {
                continue;
            }
            if let Some(outcome) = issuer.keys.refetch_for_unknown_kid(client).await {
                fetched(issuer, outcome);
            }
            if issuer.keys.current().is_err() {
                unavailable = Some(issuer.keys.retry_after());
                continue;
            }
            match with_keys(issuer) {
                Ok(v) => return Ok(v),
                Err(again) => *e = again,
            }
        }
        // No keys to tell with, where the token may be from: it may be good.
        if let (Some(after), true) = (
            unavailable,
            errors.iter().all(|e| *e == TokenError::UnknownKid),
        ) {
            return Err(Refusal::Unavailable(after));
        }
    }
    // The reason from the issuer that got furthest with it: a key that verified its signature
    // says more than another issuer's missing `kid`.
    let reason = errors
        .iter()
        .copied()
        .find(|e| *e != TokenError::UnknownKid)
        .unwrap_or(TokenError::UnknownKid);
    Err(Refusal::Token(reason))
}

/// The issuers a token may be from, among those reading `from` (`None`: `Authorization`), and
/// the token's header. They are picked by the token's unverified claims: its `iss`, then its
/// `aud`, then (for issuers that accept only some subjects, as App Check's app ids) its subject;
/// each narrowing is kept only if something is left, so that a token that fits no issuer
/// is refused for the reason its verification gives (`audience`, `subject`). Several issuers
/// may share an `iss` (one server signing for two apps, two App Check tenants on one Firebase
/// project); the config refuses two that a token could not tell apart.
fn pick<'a>(
    issuers: &'a [Issuer],
    from: Option<&http::HeaderName>,
    token: &str,
) -> Result<(Vec<&'a Issuer>, jsonwebtoken::Header), TokenError> {
    if token.len() > MAX_TOKEN_BYTES || !looks_like_jwt(token) {
        return Err(TokenError::Malformed);
    }
    // `alg: none` and unknown algorithms do not even parse.
    let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
    let payload = token.split('.').nth(1).ok_or(TokenError::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed)?;
    let unverified: Unverified =
        serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)?;
    let iss = unverified.iss.as_deref().ok_or(TokenError::Malformed)?;
    let by_iss: Vec<&Issuer> = issuers
        .iter()
        .filter(|i| i.issuer == iss && i.header.as_ref() == from)
        .collect();
    if by_iss.is_empty() {
        return Err(TokenError::Issuer);
    }
    // The issuers that `keep`, and whether there were any (otherwise all of `list`).
    let narrowed = |list: &[&'a Issuer], keep: &dyn Fn(&Issuer) -> bool| {
        let kept: Vec<&Issuer> = list.iter().copied().filter(|i| keep(i)).collect();
        if kept.is_empty() {
            (list.to_vec(), false)
        } else {
            (kept, true)
        }
    };
    let (by_aud, aud_fits) = narrowed(&by_iss, &|i| unverified.aud.contains_any(&i.audiences));
    let (candidates, subject_fits) = narrowed(&by_aud, &|i| {
        i.subjects.is_empty()
            || unverified
                .rest
                .get(&i.subject_claim)
                .and_then(|s| s.as_str())
                .is_some_and(|s| i.subjects.iter().any(|w| w == s))
    });
    // A token that fits issuers of two tenants (its audiences name both) cannot be placed.
    if aud_fits && subject_fits && candidates.iter().any(|i| i.tenant != candidates[0].tenant) {
        return Err(TokenError::Audience);
    }
    let usable: Vec<&Issuer> = candidates
        .iter()
        .copied()
        .filter(|i| i.algorithms.contains(&header.alg))
        .collect();
    if usable.is_empty() {
        return Err(TokenError::Algorithm);
    }
    Ok((usable, header))
}

/// Verify the token with these keys of its issuer.
fn check(
    issuer: &Issuer,
    header: &jsonwebtoken::Header,
    keys: &[VerifyKey],
    token: &str,
    now: u64,
) -> Result<Verified, TokenError> {
    let candidates: Vec<&VerifyKey> = keys
        .iter()
        .filter(|k| k.family.contains(&header.alg))
        .filter(|k| match (&header.kid, &k.kid) {
            (Some(want), Some(have)) => want == have,
            (Some(_), None) => false,
            (None, _) => true,
        })
        .collect();
    if candidates.is_empty() {
        return Err(if header.kid.is_some() {
            TokenError::UnknownKid
        } else {
            TokenError::Algorithm
        });
    }
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[&issuer.issuer]);
    validation.set_audience(&issuer.audiences);
    validation.leeway = issuer.leeway.as_secs();
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let mut last = TokenError::Signature;
    for k in candidates {
        match jsonwebtoken::decode::<Claims>(token, &k.key, &validation) {
            Ok(data) => return accept(issuer, data.claims, now),
            Err(e) => last = reason(e.kind()),
        }
        if last != TokenError::Signature {
            break;
        }
    }
    Err(last)
}

fn accept(issuer: &Issuer, claims: Claims, now: u64) -> Result<Verified, TokenError> {
    let leeway = issuer.leeway.as_secs();
    let max = issuer.max_lifetime.as_secs();
    // An `iat` in the future is a token not yet valid; the lifetime is `exp - iat`, or what is
    // left of it when there is no `iat`.
    if let Some(iat) = claims.iat {
        if iat > now + leeway {
            return Err(TokenError::NotYetValid);
        }
        if claims.exp.saturating_sub(iat) > max {
            return Err(TokenError::Lifetime);
        }
    } else if claims.exp.saturating_sub(now) > max {
        return Err(TokenError::Lifetime);
    }
    let subject = claims
        .rest
        .get(&issuer.subject_claim)
        .and_then(|v| v.as_str())
        .filter(|s| !s.trim().is_empty())
        .ok_or(TokenError::Malformed)?;
    if !issuer.subjects.is_empty() && !issuer.subjects.iter().any(|s| s == subject) {
        return Err(TokenError::Subject);
    }
    let jti = claims.jti.filter(|j| !j.is_empty());
    if issuer.single_use && jti.is_none() {
        return Err(TokenError::Malformed);
    }
    let nonce = match claims.rest.get("nonce") {
        None => None,
        Some(serde_json::Value::String(n)) => Some(n.clone()),
        Some(_) => return Err(TokenError::Malformed),
    };
    Ok(Verified {
        issuer: issuer.id.clone(),
        tenant: issuer.tenant.clone(),
        subject: subject.to_string(),
        usable_until: claims.exp.saturating_add(leeway),
        jti,
        single_use: issuer.single_use,
        nonce,
    })
}

fn reason(kind: &jsonwebtoken::errors::ErrorKind) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::InvalidSignature => TokenError::Signature,
        K::ExpiredSignature => TokenError::Expired,
        K::ImmatureSignature => TokenError::NotYetValid,
        K::InvalidIssuer => TokenError::Issuer,
        K::InvalidAudience => TokenError::Audience,
        K::InvalidAlgorithm
        | K::InvalidAlgorithmName
        | K::InvalidKeyFormat
        | K::InvalidEcdsaKey
        | K::InvalidRsaKey(_) => TokenError::Algorithm,
        _ => TokenError::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shape_of_a_jwt() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(looks_like_jwt("eyJh.eyJz."));
        assert!(!looks_like_jwt("tenant-key-with.dots"));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(!looks_like_jwt("ab+/.cd.ef"));
        assert!(!looks_like_jwt(".eyJz.c2ln"));
    }
}
