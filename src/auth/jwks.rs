//! An issuer's public keys, from a JWKS file or URL, kept the way the peers' outages taught:
//!
//! - a URL is fetched at start and again before its `Cache-Control: max-age` runs out (clamped to
//!   1 min … 24 h; 1 h when it says nothing; `max_age_cap` lowers the top, 6 h for App Check);
//! - a failed fetch keeps the last good set, up to `max_staleness`; with no usable set, requests
//!   get `503 auth_unavailable`, not 401 (the tokens may be fine);
//! - a token with an unknown `kid` triggers one refetch, shared by every request that waits for
//!   it, and at most one per `cooldown` (30 s) however many random `kid`s arrive.
//!
//! The refreshes are driven by the maintenance loop (`refresh_if_due`), each in a task of its own.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;

use super::VerifyKey;
use crate::config::{Freshness, JwksSource};

const MIN_AGE: Duration = Duration::from_secs(60);
const DEFAULT_AGE: Duration = Duration::from_secs(3600);
/// After a failed fetch, the next try (the unknown-kid path may try sooner, by its cooldown).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);
/// The most of a JWKS response that is read. Real ones are a few KiB (Google's and Firebase's
/// about 2 KiB, Microsoft's with certificate chains about 20 KiB); a larger one is refused as a
/// failed fetch, so that a broken or hostile URL streaming without end cannot fill the memory
/// (the fetch timeout bounds its time, not its bytes).
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

#[derive(Debug)]
struct Loaded {
    keys: Arc<Vec<VerifyKey>>,
    fetched: Instant,
    max_age: Duration,
}

/// The keys of one issuer, and their freshness.
#[derive(Debug)]
pub struct KeySet {
    pub source: JwksSource,
    freshness: Freshness,
    loaded: RwLock<Option<Loaded>>,
    /// When the last fetch was tried, successful or not (`None`: never).
    last_try: RwLock<Option<Instant>>,
    /// One refetch at a time: the requests that need it wait for the same one.
    refetch: tokio::sync::Mutex<()>,
    fetching: AtomicBool,
}

/// Why there are no keys to verify with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// What one fetch did, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    Ok,
    Failed,
    /// The response was over `MAX_JWKS_BYTES` (refused, as a failed fetch).
    TooLarge,
}

impl Fetched {
    pub fn as_str(self) -> &'static str {
        match self {
            Fetched::Ok => "ok",
            Fetched::Failed => "failed",
            Fetched::TooLarge => "too_large",
        }
    }
}

impl KeySet {
    /// Keys from a file: read now (an error names the file).
    pub fn from_file(path: PathBuf) -> Result<KeySet, String> {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let keys = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let set = KeySet::empty(JwksSource::File(path), Freshness::default());
        *set.loaded.write().unwrap_or_else(|p| p.into_inner()) = Some(Loaded {
            keys: Arc::new(keys),
            fetched: Instant::now(),
            max_age: Duration::MAX,
        });
        Ok(set)
    }

    /// Keys from a URL: nothing fetched yet (`refresh_if_due` fetches).
    pub fn from_url(url: String, freshness: Freshness) -> KeySet {
        KeySet::empty(JwksSource::Url(url), freshness)
    }

    fn empty(source: JwksSource, freshness: Freshness) -> KeySet {
        KeySet {
            source,
            freshness,
            loaded: RwLock::new(None),
            last_try: RwLock::new(None),
            refetch: tokio::sync::Mutex::new(()),
            fetching: AtomicBool::new(false),
        }
    }

    /// How long a client should wait before the keys may be there (the refetch cooldown).
    pub fn retry_after(&self) -> Duration {
        self.freshness.cooldown
    }

    fn is_url(&self) -> bool {
        matches!(self.source, JwksSource::Url(_))
    }

    /// The keys to verify with now, if there is a usable set.
    pub fn current(&self) -> Result<Arc<Vec<VerifyKey>>, Unavailable> {
        let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        match loaded.as_ref() {
            Some(l) if !self.is_url() || l.fetched.elapsed() <= self.freshness.max_staleness => {
                Ok(l.keys.clone())
            }
            _ => Err(Unavailable),
        }
    }

    /// Whether a refresh is due: never fetched, the keys' age passed, or (after a failure) the
    /// retry time passed.
    fn due(&self) -> bool {
        if !self.is_url() {
            return false;
        }
        let last_try = *self.last_try.read().unwrap_or_else(|p| p.into_inner());
        let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        let fresh_until = loaded.as_ref().map(|l| l.fetched + l.max_age);
        match (fresh_until, last_try) {
            (_, None) => true,
            (Some(until), Some(tried)) => {
                Instant::now() >= until && tried.elapsed() >= RETRY_AFTER_FAILURE
            }
            (None, Some(tried)) => tried.elapsed() >= RETRY_AFTER_FAILURE,
        }
    }

    /// Fetch in a task of its own when due (called every tick of the maintenance loop).
    pub fn refresh_if_due(
        self: &Arc<Self>,
        client: &reqwest::Client,
        done: impl Fn(Fetched) + Send + 'static,
    ) {
        if !self.due() || self.fetching.swap(true, Ordering::AcqRel) {
            return;
        }
        let (set, client) = (self.clone(), client.clone());
        tokio::spawn(async move {
            let outcome = {
                let _one = set.refetch.lock().await;
                // A request's refetch may have come first.
                if set.due() {
                    Some(set.fetch(&client).await)
                } else {
                    None
                }
            };
            set.fetching.store(false, Ordering::Release);
            if let Some(outcome) = outcome {
                done(outcome);
            }
        });
    }

    /// A token named a `kid` this set lacks: fetch again, unless a fetch was tried within the
    /// cooldown. Requests arriving meanwhile wait for the same fetch. True when the set changed.
    pub async fn refetch_for_unknown_kid(&self, client: &reqwest::Client) -> Option<Fetched> {
        if !self.is_url() {
            return None;
        }
        let before = self.generation();
        let _one = self.refetch.lock().await;
        // Another request's refetch may have brought the keys while this one waited.
        if self.generation() != before {
            return None;
        }
        let last_try = *self.last_try.read().unwrap_or_else(|p| p.into_inner());
        if last_try.is_some_and(|t| t.elapsed() < self.freshness.cooldown) {
            return None;
        }
        Some(self.fetch(client).await)
    }

    /// When the keys in force were fetched (changes with every successful fetch).
    fn generation(&self) -> Option<Instant> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|l| l.fetched)
    }

    async fn fetch(&self, client: &reqwest::Client) -> Fetched {
        let JwksSource::Url(url) = &self.source else {
            return Fetched::Ok;
        };
        *self.last_try.write().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let failed = |m: String| (Fetched::Failed, m);
        let too_large = || {
            (
                Fetched::TooLarge,
                format!("the response is over {} KiB", MAX_JWKS_BYTES / 1024),
            )
        };
        let got = async {
            let mut r = client
                .get(url)
                .timeout(self.freshness.fetch_timeout)
                .send()
                .await
                .map_err(|e| failed(e.without_url().to_string()))?;
            if !r.status().is_success() {
                return Err(failed(format!("status {}", r.status().as_u16())));
            }
            let max_age = r
                .headers()
                .get(http::header::CACHE_CONTROL)
                .and_then(|v| v.to_str().ok())
                .and_then(max_age)
                .unwrap_or(DEFAULT_AGE)
                .clamp(MIN_AGE, self.freshness.max_age_cap.max(MIN_AGE));
            if r.content_length()
                .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
            {
                return Err(too_large());
            }
            let mut body = Vec::new();
            while let Some(chunk) = r
                .chunk()
                .await
                .map_err(|e| failed(e.without_url().to_string()))?
            {
                if body.len() + chunk.len() > MAX_JWKS_BYTES {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            let text = std::str::from_utf8(&body).map_err(|_| failed("not UTF-8".into()))?;
            Ok((parse(text).map_err(failed)?, max_age))
        };
        match got.await {
            Ok((keys, max_age)) => {
                *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Some(Loaded {
                    keys: Arc::new(keys),
                    fetched: Instant::now(),
                    max_age,
                });
                Fetched::Ok
            }
            Err((outcome, e)) => {
                tracing::warn!(url = %url, "cannot fetch the issuer's JWKS; the last good keys stay (if any): {e}");
                outcome
            }
        }
    }
}

/// `max-age=N` of a `Cache-Control` value.
fn max_age(value: &str) -> Option<Duration> {
    value.split(',').find_map(|d| {
        let (k, v) = d.trim().split_once('=')?;
        k.eq_ignore_ascii_case("max-age")
            .then(|| v.trim().trim_matches('"').parse::<u64>().ok())
            .flatten()
            .map(Duration::from_secs)
    })
}

/// The usable public keys of a JWKS document (symmetric and unknown key types are left out).
fn parse(text: &str) -> Result<Vec<VerifyKey>, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS ({e})"))?;
    let keys: Vec<VerifyKey> = set.keys.iter().filter_map(VerifyKey::from_jwk).collect();
    if keys.is_empty() {
        return Err("no RSA, P-256, P-384 or Ed25519 public key in it".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_read_from_cache_control() {
        assert_eq!(
            max_age("public, max-age=21600, must-revalidate"),
            Some(Duration::from_secs(21600))
        );
        assert_eq!(max_age("MAX-AGE=\"60\""), Some(Duration::from_secs(60)));
        assert_eq!(max_age("no-cache"), None);
        assert_eq!(max_age("max-age=soon"), None);
    }
}
