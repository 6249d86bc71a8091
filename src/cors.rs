//! CORS for browser clients: the preflight of the liveness route is answered before anything
//! else (authentication, limits, the body), and every answer to an allowed origin carries the
//! CORS headers, errors included: a browser hides the status and body of an answer without
//! them, so the page could not tell a 429 from a network failure.

use crate::config::CorsConfig;

/// Request headers a browser client may send.
pub const ALLOW_HEADERS: &str =
    "Authorization, X-Api-Key, Content-Type, X-Request-Id, Liveness-Nonce";
/// Answer headers a browser client may read.
pub const EXPOSE_HEADERS: &str =
    "X-Request-Id, X-Cache, Age, RateLimit, RateLimit-Policy, Retry-After, Liveness-Receipt, traceparent";

/// What CORS makes of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorsVerdict {
    /// The `Origin` header, when there was one.
    pub origin: Option<String>,
    /// The origin is in `cors.allowed_origins`: echo it.
    pub allowed: bool,
    /// CORS is configured: answers vary by `Origin` whatever it is.
    pub enabled: bool,
}

impl CorsVerdict {
    pub fn of(cfg: &CorsConfig, headers: &http::HeaderMap) -> CorsVerdict {
        let origin = headers
            .get(http::header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let allowed = origin
            .as_ref()
            .is_some_and(|o| cfg.allowed_origins.iter().any(|a| a == o));
        CorsVerdict {
            origin,
            allowed,
            enabled: cfg.enabled(),
        }
    }

    /// The headers every answer to this request carries.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        if self.enabled {
            h.push(("Vary", "Origin".to_string()));
        }
        if let (true, Some(o)) = (self.allowed, &self.origin) {
            h.push(("Access-Control-Allow-Origin", o.clone()));
            h.push(("Access-Control-Expose-Headers", EXPOSE_HEADERS.to_string()));
        }
        h
    }

    /// The headers of a preflight's answer (204): what may be sent, and for how long to keep it.
    pub fn preflight_headers(&self, cfg: &CorsConfig) -> Vec<(&'static str, String)> {
        let mut h = self.headers();
        h.push(("Allow", "POST, OPTIONS".to_string()));
        if self.allowed {
            h.push(("Access-Control-Allow-Methods", "POST, OPTIONS".to_string()));
            let mut allow = ALLOW_HEADERS.to_string();
            for t in &cfg.token_headers {
                allow.push_str(", ");
                allow.push_str(t);
            }
            h.push(("Access-Control-Allow-Headers", allow));
            h.push(("Access-Control-Max-Age", cfg.max_age.as_secs().to_string()));
        }
        h
    }

    /// Whether a tenant restricted to `allowed` may be used from this request: requests without
    /// an `Origin` (apps, servers) are not from a web page, and pass.
    pub fn permits(&self, allowed: &[String]) -> bool {
        match &self.origin {
            Some(o) if !allowed.is_empty() => allowed.iter().any(|a| a == o),
            _ => true,
        }
    }
}
