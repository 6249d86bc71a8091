//! A request's app token: remembered verifications, verification, its metrics, and the
//! spending of single-use tokens.

use std::sync::Arc;

use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::store::Replays;

use super::{Issuer, Refusal, Verified};

/// Verified tokens, remembered until they expire (by a digest of the token and the header it
/// came in, never the token), so a token reused for several calls is verified once.
pub struct Remembered(moka::sync::Cache<[u8; 32], Verified>);

impl Default for Remembered {
    fn default() -> Self {
        Remembered(
            moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(std::time::Duration::from_secs(3600))
                .build(),
        )
    }
}

impl Remembered {
    /// A token's name here: the same token in another header is another issuer's business.
    pub fn key(header: Option<&http::HeaderName>, token: &str) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(header.map_or(&b"authorization"[..], |n| n.as_str().as_bytes()));
        h.update(&[0]);
        h.update(token.as_bytes());
        h.finalize().into()
    }

    /// The verification of a token still usable at `now` (Unix seconds).
    pub fn get(&self, key: &[u8; 32], now: u64) -> Option<Verified> {
        self.0.get(key).filter(|v| v.usable_until >= now)
    }

    pub fn insert(&self, key: [u8; 32], v: Verified) {
        self.0.insert(key, v);
    }

    /// Forget them all (a reload may change the issuers).
    pub fn clear(&self) {
        self.0.invalidate_all();
    }
}

/// The verified token of a request, or why it is refused.
pub async fn admit_token(
    remembered: &Remembered,
    http: &reqwest::Client,
    metrics: &Metrics,
    issuers: &[Issuer],
    header: Option<&http::HeaderName>,
    token: &str,
) -> Result<Verified, GatewayError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let digest = Remembered::key(header, token);
    let verified = match remembered.get(&digest, now) {
        Some(v) => v,
        None => {
            let fresh = super::verify(issuers, header, token, now, http, |i, f| {
                metrics.jwks_fetched(&i.id, f.as_str())
            })
            .await
            .map_err(|refusal| refused(metrics, refusal))?;
            remembered.insert(digest, fresh.clone());
            fresh
        }
    };
    metrics
        .auth_tokens_verified
        .with_label_values(&[&verified.issuer])
        .inc();
    Ok(verified)
}

/// The single-use tokens a request spent (their `jti`s recorded in the store), until `keep`:
/// a request refused before it got an answer gives them back (`give_back`, before its refusal
/// is sent, so the app's retry finds the token usable; or, dropped unanswered, in a task of its
/// own).
pub struct Spent {
    store: Arc<dyn Replays>,
    ids: Vec<(String, String)>,
}

impl Spent {
    /// The request got its answer (a cache hit, a shared flight, a call to the provider): its
    /// tokens stay spent.
    pub fn keep(&mut self) {
        self.ids.clear();
    }

    /// The request is refused: its tokens may be used again.
    pub async fn give_back(mut self) {
        forget(&self.store, std::mem::take(&mut self.ids)).await;
    }
}

async fn forget(store: &Arc<dyn Replays>, ids: Vec<(String, String)>) {
    for (issuer, jti) in ids {
        if let Err(e) = store.forget_use(&issuer, &jti).await {
            tracing::warn!(issuer = %issuer, "a single-use token refused before its answer stays used: {e}");
        }
    }
}

impl Drop for Spent {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut self.ids);
        if ids.is_empty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let store = self.store.clone();
            rt.spawn(async move { forget(&store, ids).await });
        }
    }
}

/// Spend a request's single-use tokens: called once it is admitted for a verdict (its image
/// valid, its limits passed), just before the cache is asked, so that a refusal before that
/// point (a bad image, a rate limit, a body that never arrived) leaves the token usable. Two
/// requests racing with one token: one of them gets `token_replayed`.
pub async fn spend(store: Arc<dyn Replays>, tokens: &[Verified]) -> Result<Spent, GatewayError> {
    let mut spent = Spent {
        store,
        ids: Vec::new(),
    };
    for v in tokens.iter().filter(|v| v.single_use) {
        let Some(jti) = &v.jti else { continue };
        // Remembered a minute past its end, whatever the clocks say.
        let until_ms = i64::try_from(v.usable_until)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000)
            .saturating_add(60_000);
        match spent.store.first_use(&v.issuer, jti, until_ms).await {
            Ok(true) => spent.ids.push((v.issuer.clone(), jti.clone())),
            Ok(false) => return Err(GatewayError::TokenReplayed),
            // A replay must not pass for want of the store.
            Err(e) => {
                tracing::warn!(issuer = %v.issuer, "cannot check a single-use token in the store: {e}");
                return Err(GatewayError::StoreUnavailable {
                    retry_after_secs: 1,
                });
            }
        }
    }
    Ok(spent)
}

fn refused(metrics: &Metrics, refusal: Refusal) -> GatewayError {
    match refusal {
        Refusal::Token(e) => {
            metrics
                .auth_token_failures
                .with_label_values(&[e.as_str()])
                .inc();
            GatewayError::InvalidToken { reason: e.as_str() }
        }
        Refusal::Unavailable(after) => GatewayError::AuthUnavailable {
            retry_after_secs: after.as_secs().max(1),
        },
    }
}
