//! What a provider answer means: the answer as it came (`UpstreamAnswer`), classified into a
//! liveness verdict or an error of a known class. Classes and failure types are closed enums, so
//! they are safe metric labels.

use bytes::Bytes;
use serde::Deserialize;

/// An answer the provider gave, whatever its status, as it came: never handed to a client (only
/// what `egress` made of it is).
#[derive(Debug, Clone)]
pub struct UpstreamAnswer {
    pub status: u16,
    pub head: http::HeaderMap,
    pub body: Bytes,
}

/// `failure_reason.type` values the provider documents; anything else is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureType {
    ServiceError,
    RequestError,
    Client,
    CalcResult,
    Other,
    NoCam,
    Timeout,
}

impl FailureType {
    pub const ALL: [FailureType; 7] = [
        FailureType::ServiceError,
        FailureType::RequestError,
        FailureType::Client,
        FailureType::CalcResult,
        FailureType::Other,
        FailureType::NoCam,
        FailureType::Timeout,
    ];

    pub fn parse(s: &str) -> FailureType {
        match s {
            "SERVICE_ERROR" => FailureType::ServiceError,
            "REQUEST_ERROR" => FailureType::RequestError,
            "CLIENT" => FailureType::Client,
            "CALC_RESULT" => FailureType::CalcResult,
            "NO_CAM" => FailureType::NoCam,
            "TIMEOUT" => FailureType::Timeout,
            _ => FailureType::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureType::ServiceError => "SERVICE_ERROR",
            FailureType::RequestError => "REQUEST_ERROR",
            FailureType::Client => "CLIENT",
            FailureType::CalcResult => "CALC_RESULT",
            FailureType::Other => "OTHER",
            FailureType::NoCam => "NO_CAM",
            FailureType::Timeout => "TIMEOUT",
        }
    }
}

/// Class of an upstream exchange, for counting and alerting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamClass {
    /// A liveness verdict.
    Ok,
    NoSubscription,
    SubscriptionNotStarted,
    NoActiveSubscription,
    NoAccess,
    ServiceUnavailable,
    FileType,
    Other4xx,
    ServerError,
    Timeout,
    Connect,
    /// The whole request was sent, then the connection ended before a whole answer.
    ConnectionLost,
    InvalidResponse,
}

impl UpstreamClass {
    pub const ALL: [UpstreamClass; 13] = [
        UpstreamClass::Ok,
        UpstreamClass::NoSubscription,
        UpstreamClass::SubscriptionNotStarted,
        UpstreamClass::NoActiveSubscription,
        UpstreamClass::NoAccess,
        UpstreamClass::ServiceUnavailable,
        UpstreamClass::FileType,
        UpstreamClass::Other4xx,
        UpstreamClass::ServerError,
        UpstreamClass::Timeout,
        UpstreamClass::Connect,
        UpstreamClass::ConnectionLost,
        UpstreamClass::InvalidResponse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamClass::Ok => "none",
            UpstreamClass::NoSubscription => "no_subscription",
            UpstreamClass::SubscriptionNotStarted => "subscription_not_started",
            UpstreamClass::NoActiveSubscription => "no_active_subscription",
            UpstreamClass::NoAccess => "no_access",
            UpstreamClass::ServiceUnavailable => "service_unavailable",
            UpstreamClass::FileType => "file_type",
            UpstreamClass::Other4xx => "other_4xx",
            UpstreamClass::ServerError => "server_error",
            UpstreamClass::Timeout => "timeout",
            UpstreamClass::Connect => "connect",
            UpstreamClass::ConnectionLost => "connection_lost",
            UpstreamClass::InvalidResponse => "invalid_response",
        }
    }

    /// The provider's documented refusals: its answer shows that it did not process the image,
    /// so the call is not billed. Every other answer to a whole request may be.
    pub fn is_unbilled_refusal(self) -> bool {
        self.is_subscription_error()
            || matches!(
                self,
                UpstreamClass::ServiceUnavailable | UpstreamClass::FileType
            )
    }

    /// The subscription behind the organization key is not usable: every call fails until a
    /// person acts.
    pub fn is_subscription_error(self) -> bool {
        matches!(
            self,
            UpstreamClass::NoSubscription
                | UpstreamClass::SubscriptionNotStarted
                | UpstreamClass::NoActiveSubscription
                | UpstreamClass::NoAccess
        )
    }
}

/// A liveness verdict as the provider gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct LivenessVerdict {
    pub result: bool,
    pub prediction: Option<f64>,
    pub failure_type: Option<FailureType>,
}

impl LivenessVerdict {
    /// The provider's actual judgement of the image: a pass, or a fail of type `CALC_RESULT`.
    /// Only these are cached; other failure types (`SERVICE_ERROR`, `TIMEOUT`, …) are the
    /// provider's trouble, not the photo's, and a retry should ask again.
    pub fn is_final(&self) -> bool {
        self.result || self.failure_type == Some(FailureType::CalcResult)
    }
}

/// The provider's `backend_session_id` in a stored answer (a cache hit's), for the access log.
/// A fresh answer's comes with `classify`, from the same parse; the cache keeps only the body,
/// so an entry holds no second copy of it.
pub fn session_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Session {
        backend_session_id: Option<String>,
    }
    plain_session_id(
        serde_json::from_slice::<Session>(body)
            .ok()?
            .backend_session_id?,
    )
}

/// A session id fit for a log line (to match a bill to a request): letters, digits and `-`,
/// at most 64; a log line never carries anything else the provider chose to send.
fn plain_session_id(id: String) -> Option<String> {
    let plain = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    plain.then_some(id)
}

/// The meaning of one upstream answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Classified {
    pub class: UpstreamClass,
    /// Present for status 200 with a boolean `result`; cached only when `is_final`.
    pub verdict: Option<LivenessVerdict>,
    /// The verdict's `backend_session_id`, when it is a plain id.
    pub session_id: Option<String>,
}

#[derive(Deserialize)]
struct RawVerdict {
    backend_session_id: Option<String>,
    result: Option<serde_json::Value>,
    prediction: Option<serde_json::Value>,
    failure_reason: Option<serde_json::Value>,
}

pub fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// The meaning of an answer of the provider (its status and body), or of a stored one.
pub fn classify(status: u16, body: &[u8]) -> Classified {
    if status == 200 {
        let mut session_id = None;
        let verdict = serde_json::from_slice::<RawVerdict>(body)
            .ok()
            .and_then(|raw| {
                let result = raw.result?.as_bool()?;
                session_id = raw.backend_session_id.and_then(plain_session_id);
                let prediction = match raw.prediction {
                    Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
                    Some(serde_json::Value::Number(n)) => n.as_f64(),
                    _ => None,
                };
                let failure_type =
                    raw.failure_reason
                        .as_ref()
                        .and_then(|f| f.get("type"))
                        .map(|t| {
                            t.as_str()
                                .map(FailureType::parse)
                                .unwrap_or(FailureType::Other)
                        });
                Some(LivenessVerdict {
                    result,
                    prediction,
                    failure_type,
                })
            });
        return match verdict {
            Some(v) => Classified {
                class: UpstreamClass::Ok,
                verdict: Some(v),
                session_id,
            },
            None => Classified {
                class: UpstreamClass::InvalidResponse,
                verdict: None,
                session_id: None,
            },
        };
    }
    let class = match status {
        500..=599 => UpstreamClass::ServerError,
        415 => UpstreamClass::FileType,
        400..=499 => classify_message(body),
        _ => UpstreamClass::InvalidResponse,
    };
    Classified {
        class,
        verdict: None,
        session_id: None,
    }
}

/// The documented 400 errors, told apart by their message, whatever shape the body has.
fn classify_message(body: &[u8]) -> UpstreamClass {
    let text = String::from_utf8_lossy(body).to_ascii_lowercase();
    if text.contains("does not have subscription") {
        UpstreamClass::NoSubscription
    } else if text.contains("subscription has not started") {
        UpstreamClass::SubscriptionNotStarted
    } else if text.contains("no active or future subscription") {
        UpstreamClass::NoActiveSubscription
    } else if text.contains("does not have access") {
        UpstreamClass::NoAccess
    } else if text.contains("could not send image") {
        UpstreamClass::ServiceUnavailable
    } else if text.contains("not allowed file") {
        UpstreamClass::FileType
    } else {
        UpstreamClass::Other4xx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(status: u16, body: &str) -> Classified {
        super::classify(status, body.as_bytes())
    }

    #[test]
    fn verdicts() {
        let pass = classify(
            200,
            r#"{"result": true, "prediction": "0.982312", "failure_reason": null}"#,
        );
        assert_eq!(
            pass.verdict,
            Some(LivenessVerdict {
                result: true,
                prediction: Some(0.982312),
                failure_type: None
            })
        );
        let fail = classify(
            200,
            r#"{"result": false, "prediction": "0.2", "failure_reason": {"type": "CALC_RESULT", "detail": "x"}}"#,
        );
        assert_eq!(
            fail.verdict.expect("v").failure_type,
            Some(FailureType::CalcResult)
        );
        let odd = classify(
            200,
            r#"{"result": false, "failure_reason": {"type": "NEW_THING"}}"#,
        );
        assert_eq!(
            odd.verdict.expect("v").failure_type,
            Some(FailureType::Other)
        );
        assert_eq!(
            classify(200, "<html>").class,
            UpstreamClass::InvalidResponse
        );
        assert_eq!(
            classify(200, r#"{"result": "yes"}"#).class,
            UpstreamClass::InvalidResponse
        );
    }

    #[test]
    fn documented_errors() {
        for (msg, class) in [
            (
                "Client does not have subscription",
                UpstreamClass::NoSubscription,
            ),
            (
                "Subscription has not started",
                UpstreamClass::SubscriptionNotStarted,
            ),
            (
                "No active or future subscription for technology",
                UpstreamClass::NoActiveSubscription,
            ),
            (
                "Client does not have access to Liveness technology",
                UpstreamClass::NoAccess,
            ),
            (
                "Could not send image to liveness service",
                UpstreamClass::ServiceUnavailable,
            ),
            ("something new", UpstreamClass::Other4xx),
        ] {
            assert_eq!(
                classify(400, &format!("{{\"detail\": \"{msg}\"}}")).class,
                class,
                "{msg}"
            );
            assert_eq!(classify(400, msg).class, class, "plain {msg}");
        }
        assert_eq!(classify(415, "").class, UpstreamClass::FileType);
        assert_eq!(classify(503, "<html>").class, UpstreamClass::ServerError);
    }
}
