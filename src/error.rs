//! The one error type at the edge: every gateway-made refusal or failure is a `GatewayError`,
//! and `status`/`code`/`detail` below are the only place that turns it into HTTP.

use chrono::{DateTime, Utc};
use http::StatusCode;

use crate::config::Calendar;
use serde::Serialize;

/// The provider's own sentence for a refused extension; the gateway answers it verbatim so a
/// drop-in client sees the same 415 whether the gateway or the provider refused the file.
pub const PROVIDER_EXTENSION_DETAIL: &str = "Not allowed file, valid extensions: .jpg .png .jpeg";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("no route for this path")]
    NotFound,
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    #[error("a tenant credential is required: Authorization: Bearer <key>, X-Api-Key, or the api_key form field")]
    MissingCredentials,
    #[error("the tenant credential is not valid")]
    InvalidCredentials,
    #[error("the credential header is malformed: send Authorization: Bearer <tenant key> or X-Api-Key: <tenant key>")]
    MalformedCredentials,
    #[error("this tenant is disabled")]
    TenantDisabled,
    #[error("this key has expired, or was rotated and its grace has ended")]
    KeyExpired,
    #[error("the token is not valid: {reason}")]
    InvalidToken { reason: &'static str },
    #[error("this tenant needs a token of the issuer {issuer:?} as well")]
    TokenRequired { issuer: String },
    #[error("this tenant accepts app tokens only, not its static keys")]
    StaticKeysDisabled,
    #[error("this single-use token was used before: ask your backend for a new one")]
    TokenReplayed,
    #[error("the keys that verify this token cannot be had right now (the issuer's JWKS); retry after {}", wait(*retry_after_secs))]
    AuthUnavailable { retry_after_secs: u64 },
    #[error("this tenant's key may not be used from this web origin")]
    OriginNotAllowed,
    #[error(
        "this tenant's key is accepted only in a header: Authorization: Bearer <key> or X-Api-Key"
    )]
    HeaderCredentialsRequired,
    #[error("the nonce must be 1 to 128 visible ASCII characters (Liveness-Nonce header or nonce field)")]
    InvalidNonce,
    #[error("the nonce differs between the app token, the Liveness-Nonce header and the nonce field: send the one your backend issued for this attempt")]
    NonceMismatch,
    #[error("the request head did not arrive in time")]
    HeaderTimeout,
    #[error("the request head is larger than the gateway accepts")]
    HeaderTooLarge,
    #[error("too many requests at once from this client address; retry shortly")]
    TooManyConnections,
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("Content-Type must be multipart/form-data")]
    NotMultipart,
    #[error("the multipart Content-Type has no boundary parameter")]
    MissingBoundary,
    #[error("the multipart body is malformed: {0}")]
    MalformedMultipart(String),
    #[error("the form has more than {limit} parts")]
    TooManyParts { limit: usize },
    #[error("a part's headers are larger than {limit} bytes")]
    PartHeaderTooLarge { limit: usize },
    #[error("the form has no image file part")]
    MissingImage,
    #[error("the form has more than one image part")]
    MultipleImages,
    #[error("the image part has no file name")]
    MissingFilename,
    #[error("{}", PROVIDER_EXTENSION_DETAIL)]
    ExtensionNotAllowed,
    #[error("the file content is not a JPEG or PNG image matching its extension")]
    NotAnImage,
    #[error("the image is smaller than {min} bytes")]
    ImageTooSmall { min: usize },
    #[error("the image is larger than {max} bytes")]
    ImageTooLarge { max: usize },
    #[error("the image header cannot be read")]
    ImageUnreadable,
    #[error("the image is cut off: it does not reach its end marker")]
    ImageTruncated,
    #[error("the image is {width}x{height} pixels; each side must be at least {min} pixels")]
    ImageDimensionsTooSmall {
        width: usize,
        height: usize,
        min: usize,
    },
    #[error("the image is {width}x{height} pixels; the limit is {max} pixels a side and {max_pixels} pixels in all")]
    ImageDimensionsTooLarge {
        width: usize,
        height: usize,
        max: usize,
        max_pixels: u64,
    },
    #[error("no face was found in the photo")]
    NoFaceDetected,
    #[error("the photo holds {found} faces; at most {max} may be in it")]
    SeveralFaces { found: usize, max: usize },
    #[error("the face in the photo is {px} pixels across; it must be at least {min}")]
    FaceTooSmall { px: u32, min: u32 },
    #[error("the face check cannot read this photo (a JPEG that is arithmetic-coded, 12-bit, lossless or hierarchical, of more than 64 scans or too large to decode progressively (over 16 megapixels in 4:4:4), or an interlaced PNG over 4 megapixels)")]
    PhotoNotCheckable,
    #[error("too many requests for this tenant; retry after {}", wait(*retry_after_secs))]
    RateLimited { retry_after_secs: u64 },
    #[error("too many requests for this user; retry after {}", wait(*retry_after_secs))]
    SubjectRateLimited { retry_after_secs: u64 },
    #[error(
        "this user's daily budget of billable calls is used up; retry after {}", wait(*retry_after_secs)
    )]
    SubjectBudgetExhausted { retry_after_secs: u64 },
    #[error(
        "this user has had too many failed liveness checks today; retry after {}", wait(*retry_after_secs)
    )]
    TooManyFailedAttempts { retry_after_secs: u64 },
    #[error("the tenant's {period} budget of billable calls is used up; retry after {}", wait(*retry_after_secs))]
    BudgetExhausted {
        period: &'static str,
        retry_after_secs: u64,
    },
    #[error("the gateway is at its limit of {0}; retry shortly")]
    Overloaded(Busy),
    #[error("{cause}, so calls to it are paused; retry after {}", wait(*retry_after_secs))]
    CircuitOpen {
        retry_after_secs: u64,
        cause: CircuitCause,
    },
    #[error("the liveness provider could not be reached")]
    UpstreamUnreachable,
    #[error("the liveness provider failed (HTTP {status})")]
    UpstreamFailed { status: u16 },
    #[error("the liveness provider sent an invalid answer")]
    UpstreamInvalid,
    #[error(
        "the liveness provider's answer gave away a secret of the gateway's, so it was withheld"
    )]
    UpstreamSecretEcho,
    #[error("the liveness provider did not answer in time")]
    UpstreamTimeout,
    #[error("the shared store that keeps this tenant's budget cannot be reached, and a budget is never overshot; retry after {}", wait(*retry_after_secs))]
    StoreUnavailable { retry_after_secs: u64 },
    #[error("the admin listener answers its IP addresses, localhost and the names of server.admin_hosts, not the name this request was sent to")]
    AdminHostNotAllowed,
    #[error("the admin API refuses what a web page can make a browser send: {reason}")]
    AdminCrossSite { reason: &'static str },
    #[error("internal gateway error")]
    Internal,
}

/// What the gateway had no room for, when it answers `503 overloaded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Every upstream slot stayed taken for `limits.upstream_queue_timeout`, or a fast stop
    /// starts no new call.
    Upstream,
    /// The request bodies held in memory (`intake.max_buffered_bytes`).
    Bodies,
    /// Photo conversions (`intake.convert`: its queue was full, or its turn and the conversion
    /// took longer than its timeout).
    Conversions,
    /// Face checks (`intake.face` in `enforce`: its queue was full, or its turn and the check
    /// took longer than its timeout).
    FaceChecks,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Busy::Upstream => "concurrent upstream calls",
            Busy::Bodies => "request bodies held in memory",
            Busy::Conversions => "photo conversions",
            Busy::FaceChecks => "face checks",
        })
    }
}

/// Why the circuit in front of the provider opened, as its refusal says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitCause {
    /// It refused the organization's subscription (expired, not started, no access).
    Subscription,
    /// Several calls in a row failed (5xx, timeouts, lost or refused connections).
    Failures,
    /// The one call let through after a pause failed too.
    Probe,
}

impl std::fmt::Display for CircuitCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CircuitCause::Subscription => {
                "the liveness provider refused the organization's subscription"
            }
            CircuitCause::Failures => {
                "the liveness provider failed several calls in a row (server errors, timeouts or lost connections)"
            }
            CircuitCause::Probe => {
                "the liveness provider failed again when tried after a pause"
            }
        })
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    detail: &'a str,
    code: &'a str,
    hint: &'a str,
}

/// A wait as people read it: `45 s`, `3 min 20 s`, `22 h 51 min` (and the seconds, exact, when
/// they are many).
pub fn wait(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s} s"),
        (0, _) if s == 0 => format!("{m} min"),
        (0, _) => format!("{m} min {s} s"),
        _ => format!("{h} h {m} min ({secs} s)"),
    }
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        use GatewayError::*;
        match self {
            NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            MissingCredentials
            | InvalidCredentials
            | MalformedCredentials
            | TenantDisabled
            | KeyExpired
            | InvalidToken { .. }
            | TokenRequired { .. }
            | StaticKeysDisabled
            | TokenReplayed
            | HeaderCredentialsRequired => StatusCode::UNAUTHORIZED,
            BodyTooLarge { .. } | ImageTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyTimeout | HeaderTimeout => StatusCode::REQUEST_TIMEOUT,
            HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
            NotMultipart | ExtensionNotAllowed | NotAnImage => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            MissingBoundary
            | MalformedMultipart(_)
            | TooManyParts { .. }
            | PartHeaderTooLarge { .. }
            | MissingImage
            | MultipleImages
            | MissingFilename
            | ImageTooSmall { .. }
            | ImageUnreadable
            | ImageTruncated
            | ImageDimensionsTooSmall { .. }
            | ImageDimensionsTooLarge { .. }
            | InvalidNonce
            | NonceMismatch => StatusCode::BAD_REQUEST,
            NoFaceDetected | SeveralFaces { .. } | FaceTooSmall { .. } | PhotoNotCheckable => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            RateLimited { .. }
            | BudgetExhausted { .. }
            | SubjectRateLimited { .. }
            | SubjectBudgetExhausted { .. }
            | TooManyFailedAttempts { .. } => StatusCode::TOO_MANY_REQUESTS,
            Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamUnreachable | UpstreamInvalid | UpstreamSecretEcho | UpstreamFailed { .. } => {
                StatusCode::BAD_GATEWAY
            }
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            CircuitOpen { .. } | StoreUnavailable { .. } | AuthUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            OriginNotAllowed | AdminCrossSite { .. } => StatusCode::FORBIDDEN,
            AdminHostNotAllowed => StatusCode::MISDIRECTED_REQUEST,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable machine-readable code; clients switch on it, so never rename one.
    pub fn code(&self) -> &'static str {
        use GatewayError::*;
        match self {
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            MissingCredentials => "missing_credentials",
            InvalidCredentials => "invalid_credentials",
            MalformedCredentials => "malformed_credentials",
            TenantDisabled => "tenant_disabled",
            KeyExpired => "key_expired",
            InvalidToken { .. } => "invalid_token",
            TokenRequired { .. } => "token_required",
            StaticKeysDisabled => "static_keys_disabled",
            TokenReplayed => "token_replayed",
            AuthUnavailable { .. } => "auth_unavailable",
            HeaderCredentialsRequired => "header_credentials_required",
            InvalidNonce => "invalid_nonce",
            NonceMismatch => "nonce_mismatch",
            HeaderTimeout => "header_timeout",
            HeaderTooLarge => "header_too_large",
            TooManyConnections => "too_many_connections",
            BodyTooLarge { .. } => "body_too_large",
            BodyTimeout => "body_timeout",
            NotMultipart => "not_multipart",
            MissingBoundary => "missing_boundary",
            MalformedMultipart(_) => "malformed_multipart",
            TooManyParts { .. } => "too_many_parts",
            PartHeaderTooLarge { .. } => "part_header_too_large",
            MissingImage => "missing_image",
            MultipleImages => "multiple_images",
            MissingFilename => "missing_filename",
            ExtensionNotAllowed => "extension_not_allowed",
            NotAnImage => "not_an_image",
            ImageTooSmall { .. } => "image_too_small",
            NoFaceDetected => "no_face_detected",
            SeveralFaces { .. } => "several_faces",
            FaceTooSmall { .. } => "face_too_small",
            PhotoNotCheckable => "photo_not_checkable",
            ImageTooLarge { .. } => "image_too_large",
            ImageUnreadable => "image_unreadable",
            ImageTruncated => "image_truncated",
            ImageDimensionsTooSmall { .. } => "image_dimensions_too_small",
            ImageDimensionsTooLarge { .. } => "image_dimensions_too_large",
            RateLimited { .. } => "rate_limited",
            BudgetExhausted { .. } => "budget_exhausted",
            SubjectRateLimited { .. } => "subject_rate_limited",
            SubjectBudgetExhausted { .. } => "subject_budget_exhausted",
            TooManyFailedAttempts { .. } => "too_many_failed_attempts",
            Overloaded(_) => "overloaded",
            UpstreamUnreachable => "upstream_unreachable",
            UpstreamInvalid => "upstream_invalid_response",
            UpstreamSecretEcho => "upstream_secret_echo",
            UpstreamFailed { .. } => "upstream_error",
            UpstreamTimeout => "upstream_timeout",
            CircuitOpen { .. } => "upstream_circuit_open",
            StoreUnavailable { .. } => "store_unavailable",
            OriginNotAllowed => "origin_not_allowed",
            AdminHostNotAllowed => "admin_host_not_allowed",
            AdminCrossSite { .. } => "admin_cross_site",
            Internal => "internal_error",
        }
    }

    /// Seconds a client should wait before retrying, where the error says so.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::RateLimited { retry_after_secs }
            | GatewayError::SubjectRateLimited { retry_after_secs }
            | GatewayError::SubjectBudgetExhausted { retry_after_secs }
            | GatewayError::TooManyFailedAttempts { retry_after_secs }
            | GatewayError::BudgetExhausted {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            GatewayError::Overloaded(_) | GatewayError::TooManyConnections => Some(1),
            GatewayError::CircuitOpen {
                retry_after_secs, ..
            }
            | GatewayError::StoreUnavailable { retry_after_secs }
            | GatewayError::AuthUnavailable { retry_after_secs } => Some(*retry_after_secs),
            _ => None,
        }
    }

    /// True for refusals of the client's input (the `rejected_total` reasons).
    pub fn is_rejection(&self) -> bool {
        matches!(
            self.status(),
            StatusCode::BAD_REQUEST
                | StatusCode::PAYLOAD_TOO_LARGE
                | StatusCode::UNSUPPORTED_MEDIA_TYPE
                | StatusCode::REQUEST_TIMEOUT
        )
    }

    /// What the client (or the person using it) can do about it.
    pub fn hint(&self) -> &'static str {
        use GatewayError::*;
        match self {
            NotFound => "the liveness check is POST /api/v1/backend/liveness/short/ (the receipts' keys: GET /.well-known/jwks.json)",
            MethodNotAllowed => "send one of the methods the Allow header lists; the liveness check is a POST",
            MissingCredentials | MalformedCredentials => "send the tenant key as Authorization: Bearer <key> (or X-Api-Key), or an app token as Authorization: Bearer <token>",
            InvalidCredentials => "check the key: it is the tenant key you were given, not the provider's organization key",
            TenantDisabled => "ask the gateway's operator to enable the tenant",
            KeyExpired => "ask the gateway's operator for a new key (a rotated key's replacement came with the rotation)",
            InvalidToken { .. } => "get a fresh token from your backend; check its issuer, audience and expiry",
            TokenRequired { .. } => "send every token the tenant requires, one per header",
            StaticKeysDisabled => "call with an app token from your backend instead of the tenant key",
            TokenReplayed => "ask your backend for a new single-use token for each attempt",
            CircuitOpen {
                cause: CircuitCause::Subscription,
                ..
            } => "nothing was charged; the operator must renew the organization's subscription at the provider, then calls resume",
            AuthUnavailable { .. } | StoreUnavailable { .. } | CircuitOpen { .. } => "retry after Retry-After; nothing was charged",
            OriginNotAllowed => "ask the operator to add this page's origin to the tenant's allowed_origins",
            HeaderCredentialsRequired => "move the key from the api_key form field to the Authorization header",
            InvalidNonce | NonceMismatch => "send the nonce your backend issued for this attempt, once, as it was issued",
            HeaderTimeout | BodyTimeout => "send the whole request without pausing; on a slow network, retry with a smaller photo",
            HeaderTooLarge => "send fewer or smaller headers",
            TooManyConnections | Overloaded(_) => "retry after Retry-After, with backoff",
            BodyTooLarge { .. } | ImageTooLarge { .. } | ImageDimensionsTooLarge { .. } => "send a smaller photo (a phone photo resized to about 1000 pixels a side is plenty)",
            NotMultipart | MissingBoundary | MalformedMultipart(_) | TooManyParts { .. } | PartHeaderTooLarge { .. } => "send multipart/form-data as a form library builds it, with the photo in a file part named image",
            MissingImage | MultipleImages | MissingFilename | ExtensionNotAllowed => "send one file part named image with a .jpg, .jpeg or .png file name, or a phone's .heic, .heif or .webp where the gateway converts them (a browser Blob needs one: form.append('image', blob, 'photo.jpg'))",
            NotAnImage | ImageUnreadable | ImageTruncated | ImageTooSmall { .. } => "send the photo file itself, whole, as a JPEG or PNG whose content matches its file name (or a phone's HEIC or WebP as it is, where the gateway converts them)",
            ImageDimensionsTooSmall { .. } => "take the photo with the camera at its usual resolution; a thumbnail is too small",
            NoFaceDetected | SeveralFaces { .. } | FaceTooSmall { .. } => "retake the photo with one face filling the frame, in good light; nothing was charged",
            PhotoNotCheckable => "send the camera's own JPEG (baseline or progressive) or a PNG; nothing was charged",
            RateLimited { .. } | SubjectRateLimited { .. } => "retry after Retry-After; the RateLimit header says what is left",
            BudgetExhausted { .. } | SubjectBudgetExhausted { .. } => "retry after Retry-After, when the budget's period ends, or ask the operator to raise the budget",
            TooManyFailedAttempts { .. } => "retry after Retry-After; tell the user to retake the photo in good light, with their own face filling the frame",
            UpstreamUnreachable | UpstreamFailed { .. } | UpstreamInvalid | UpstreamTimeout => "retry with backoff",
            UpstreamSecretEcho => "retry; tell the operator (the request id is in X-Request-Id)",
            AdminHostNotAllowed => "call the admin listener by its address, localhost, or a name in server.admin_hosts",
            AdminCrossSite { .. } => "call the admin API from a script or curl, not from a web page",
            Internal => "retry; tell the operator the request id (X-Request-Id) if it persists",
        }
    }

    /// The JSON body `{"detail": ..., "code": ..., "hint": ...}`.
    pub fn body(&self) -> Vec<u8> {
        self.body_with_hint(self.hint())
    }

    /// The body of a refusal answered at `now`: one that lasts until a budget's day or month
    /// ends says in its hint when that is, as a date and time in the budgets' time zone
    /// (`budgets.timezone`), beside `Retry-After`'s seconds.
    pub fn body_at(&self, calendar: &Calendar, now: DateTime<Utc>) -> Vec<u8> {
        match self.resets_at(calendar, now) {
            Some(at) => self.body_with_hint(&format!("{}; it resets at {at}", self.hint())),
            None => self.body(),
        }
    }

    /// When a refusal until the end of a budget period ends: `2026-12-07 00:00 Asia/Almaty`.
    pub fn resets_at(&self, calendar: &Calendar, now: DateTime<Utc>) -> Option<String> {
        use GatewayError::*;
        let secs = match self {
            BudgetExhausted {
                retry_after_secs, ..
            }
            | SubjectBudgetExhausted { retry_after_secs }
            | TooManyFailedAttempts { retry_after_secs } => *retry_after_secs,
            _ => return None,
        };
        // To the nearest minute: the wait was whole seconds from a moment just before now.
        let at = now + chrono::Duration::seconds(i64::try_from(secs).ok()? + 30);
        let tz = calendar.0;
        Some(format!(
            "{} {}",
            at.with_timezone(&tz).format("%Y-%m-%d %H:%M"),
            tz.name()
        ))
    }

    fn body_with_hint(&self, hint: &str) -> Vec<u8> {
        let detail = self.to_string();
        serde_json::to_vec(&ErrorBody {
            detail: &detail,
            code: self.code(),
            hint,
        })
        .unwrap_or_else(|_| {
            br#"{"detail":"internal gateway error","code":"internal_error"}"#.to_vec()
        })
    }
}

/// Every code with its status, for the error table of docs/clients.md and the OpenAPI spec.
pub fn catalogue() -> Vec<GatewayError> {
    use GatewayError::*;
    vec![
        NotFound,
        MethodNotAllowed,
        MissingCredentials,
        InvalidCredentials,
        MalformedCredentials,
        TenantDisabled,
        KeyExpired,
        InvalidToken {
            reason: "signature",
        },
        TokenRequired {
            issuer: String::new(),
        },
        TokenReplayed,
        StaticKeysDisabled,
        HeaderCredentialsRequired,
        InvalidNonce,
        NonceMismatch,
        HeaderTimeout,
        HeaderTooLarge,
        TooManyConnections,
        BodyTooLarge { limit: 0 },
        BodyTimeout,
        NotMultipart,
        MissingBoundary,
        MalformedMultipart(String::new()),
        TooManyParts { limit: 0 },
        PartHeaderTooLarge { limit: 0 },
        MissingImage,
        MultipleImages,
        MissingFilename,
        ExtensionNotAllowed,
        NotAnImage,
        ImageTooSmall { min: 0 },
        ImageTooLarge { max: 0 },
        ImageUnreadable,
        ImageTruncated,
        NoFaceDetected,
        SeveralFaces { found: 0, max: 0 },
        FaceTooSmall { px: 0, min: 0 },
        PhotoNotCheckable,
        ImageDimensionsTooSmall {
            width: 0,
            height: 0,
            min: 0,
        },
        ImageDimensionsTooLarge {
            width: 0,
            height: 0,
            max: 0,
            max_pixels: 0,
        },
        RateLimited {
            retry_after_secs: 0,
        },
        BudgetExhausted {
            period: "daily",
            retry_after_secs: 0,
        },
        SubjectRateLimited {
            retry_after_secs: 0,
        },
        SubjectBudgetExhausted {
            retry_after_secs: 0,
        },
        TooManyFailedAttempts {
            retry_after_secs: 0,
        },
        Overloaded(Busy::Upstream),
        UpstreamUnreachable,
        UpstreamFailed { status: 500 },
        UpstreamInvalid,
        UpstreamSecretEcho,
        UpstreamTimeout,
        CircuitOpen {
            retry_after_secs: 0,
            cause: CircuitCause::Failures,
        },
        StoreUnavailable {
            retry_after_secs: 0,
        },
        AuthUnavailable {
            retry_after_secs: 0,
        },
        OriginNotAllowed,
        AdminHostNotAllowed,
        AdminCrossSite {
            reason: "a page of another site sent it (Sec-Fetch-Site)",
        },
        Internal,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_bodies_are_json() {
        let all = catalogue();
        let mut codes: Vec<_> = all.iter().map(|e| e.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
        for e in &all {
            let v: serde_json::Value = serde_json::from_slice(&e.body()).expect("json");
            assert_eq!(v["code"], e.code());
            assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()));
            assert!(
                v["hint"].as_str().is_some_and(|h| h.len() > 10),
                "{}: a hint",
                e.code()
            );
        }
    }

    /// A budget's refusal says when the budget resets, as a date and time in its time zone.
    #[test]
    fn a_spent_budget_says_when_it_resets_in_its_time_zone() {
        let almaty = Calendar("Asia/Almaty".parse().expect("tz"));
        // 22:00:10 in Almaty (UTC+5) on the last day of the month.
        let now = chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 11, 30, 17, 0, 10).unwrap();
        let daily = GatewayError::BudgetExhausted {
            period: "daily",
            retry_after_secs: almaty.secs_to_next_day(now),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&daily.body_at(&almaty, now)).expect("json");
        assert!(
            v["hint"]
                .as_str()
                .is_some_and(|h| h.ends_with("it resets at 2026-12-01 00:00 Asia/Almaty")),
            "{v}"
        );
        assert!(
            v["detail"]
                .as_str()
                .is_some_and(|d| d.contains("1 h 59 min")),
            "{v}"
        );
        let later = now + chrono::Duration::milliseconds(900);
        let user = GatewayError::TooManyFailedAttempts {
            retry_after_secs: almaty.secs_to_next_day(now),
        };
        assert_eq!(
            user.resets_at(&almaty, later).as_deref(),
            Some("2026-12-01 00:00 Asia/Almaty")
        );
        let utc = Calendar::default();
        assert_eq!(
            user.resets_at(&utc, now).as_deref(),
            Some("2026-11-30 19:00 UTC"),
            "the same wait read in another zone"
        );
        assert_eq!(
            GatewayError::RateLimited {
                retry_after_secs: 5
            }
            .resets_at(&utc, now),
            None
        );
        assert_eq!(
            GatewayError::NotFound.body_at(&almaty, now),
            GatewayError::NotFound.body()
        );
    }

    /// A long wait reads as hours and minutes (it once read `retry after 82286 s`).
    #[test]
    fn waits_read_as_people_read_them() {
        assert_eq!(wait(0), "0 s");
        assert_eq!(wait(45), "45 s");
        assert_eq!(wait(120), "2 min");
        assert_eq!(wait(200), "3 min 20 s");
        assert_eq!(wait(82_286), "22 h 51 min (82286 s)");
        let e = GatewayError::BudgetExhausted {
            period: "daily",
            retry_after_secs: 82_286,
        };
        assert_eq!(
            e.to_string(),
            "the tenant's daily budget of billable calls is used up; retry after 22 h 51 min (82286 s)"
        );
    }

    #[test]
    fn extension_detail_is_the_providers_sentence() {
        let v: serde_json::Value =
            serde_json::from_slice(&GatewayError::ExtensionNotAllowed.body()).expect("json");
        assert_eq!(v["detail"], PROVIDER_EXTENSION_DETAIL);
        assert_eq!(GatewayError::ExtensionNotAllowed.status(), 415);
    }
}
