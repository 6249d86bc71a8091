//! A request's app token: remembered verifications, verification, its metrics, and the
//! single-use check.

use crate::error::GatewayError;
use crate::state::AppState;

use super::{Issuer, Refusal, Verified};

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
    // Remembered with the header it came in: the same token in another header is another
    // issuer's business.
    let mut h = blake3::Hasher::new();
    h.update(header.map_or(&b"authorization"[..], |n| n.as_str().as_bytes()));
    h.update(&[0]);
    h.update(token.as_bytes());
    let digest: [u8; 32] = h.finalize().into();
    let remembered = state
        .verified_tokens
        .get(&digest)
        .filter(|v| v.usable_until >= now);
    let verified = match remembered {
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
