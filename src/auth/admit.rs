//! A request's app token: remembered verifications, verification, its metrics, and the
//! single-use check.

use crate::error::GatewayError;
use crate::state::AppState;

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
    state: &AppState,
    issuers: &[Issuer],
    header: Option<&http::HeaderName>,
    token: &str,
) -> Result<Verified, GatewayError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let digest = Remembered::key(header, token);
    let verified = match state.verified_tokens.get(&digest, now) {
        Some(v) => v,
        None => {
            let fresh = super::verify(issuers, header, token, now, &state.http, |i, f| {
                state.metrics.jwks_fetched(&i.id, f)
            })
            .await
            .map_err(|refusal| refused(state, refusal))?;
            state.verified_tokens.insert(digest, fresh.clone());
            fresh
        }
    };
    state
        .metrics
        .auth_tokens_verified
        .with_label_values(&[&verified.issuer])
        .inc();
    if let (true, Some(jti)) = (verified.single_use, &verified.jti) {
        // Remembered a minute past its end, whatever the clocks say.
        let until_ms = i64::try_from(verified.usable_until)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000)
            .saturating_add(60_000);
        match state.store.first_use(&verified.issuer, jti, until_ms).await {
            Ok(true) => {}
            Ok(false) => return Err(GatewayError::TokenReplayed),
            // A replay must not pass for want of the store.
            Err(e) => {
                tracing::warn!(issuer = %verified.issuer, "cannot check a single-use token in the store: {e}");
                return Err(GatewayError::StoreUnavailable {
                    retry_after_secs: 1,
                });
            }
        }
    }
    Ok(verified)
}

fn refused(state: &AppState, refusal: Refusal) -> GatewayError {
    match refusal {
        Refusal::Token(e) => {
            state
                .metrics
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
