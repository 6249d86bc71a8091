//! `[[notify.webhooks]]`: where the gateway tells people what they need to act on (a budget
//! running out, an organization key lapsed, the breaker open, a key about to expire), signed
//! per the Standard Webhooks spec, or in Slack's incoming-webhook shape. Reloadable.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

use super::{unset_variable, EnvLookup, Issues};

/// Every event a webhook may ask for.
pub const EVENTS: &[&str] = &[
    "budget.threshold",
    "budget.exhausted",
    "org_key.lapsed",
    "org_key.restored",
    "circuit.opened",
    "circuit.closed",
    "replay.suspected",
    "key.expiring",
];

/// The budget shares a webhook hears of by default; 1.0 is `budget.exhausted`.
const DEFAULT_THRESHOLDS: &[f64] = &[0.5, 0.8, 0.95, 1.0];

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawNotify {
    pub webhooks: Vec<RawWebhook>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// Standard Webhooks: `{"type", "timestamp", "data"}`, signed.
    #[default]
    Standard,
    /// Slack's incoming webhook: `{"text": …}`; its URL is its secret.
    Slack,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    /// A name for logs and metrics (default: derived from the URL).
    #[serde(default)]
    pub name: Option<String>,
    pub url: String,
    /// The variable holding the signing secret (`whsec_<base64>`, or raw text).
    #[serde(default)]
    pub secret_env: Option<String>,
    /// The events to send (default: every one).
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// The shares of a budget to tell of (default 0.5, 0.8, 0.95, 1.0).
    #[serde(default)]
    pub thresholds: Option<Vec<f64>>,
    #[serde(default)]
    pub format: WebhookFormat,
    /// Longest wait for the receiver to answer one delivery.
    #[serde(default = "d_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn d_timeout() -> Duration {
    Duration::from_secs(5)
}

/// A webhook, checked.
#[derive(Clone, PartialEq)]
pub struct Webhook {
    /// Its name: in logs, metrics and the records of deliveries.
    pub name: String,
    pub url: url::Url,
    /// The HMAC key (the bytes of a `whsec_` secret, or the raw text): never printed.
    pub secret: Option<Vec<u8>>,
    pub events: Vec<String>,
    /// Ascending, each in (0, 1]: 1.0 is told as `budget.exhausted`.
    pub thresholds: Vec<f64>,
    pub format: WebhookFormat,
    pub timeout: Duration,
}

impl Webhook {
    pub fn wants(&self, event: &str) -> bool {
        self.events.iter().any(|e| e == event)
    }
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field(
                "url",
                &format_args!("{}", self.url.origin().ascii_serialization()),
            )
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .field("events", &self.events)
            .field("thresholds", &self.thresholds)
            .field("format", &self.format)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `[notify]`, checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NotifyConfig {
    pub webhooks: Vec<Webhook>,
}

impl NotifyConfig {
    /// Every threshold some webhook asks for, ascending, without repeats.
    pub fn thresholds(&self) -> Vec<f64> {
        let mut all: Vec<f64> = self
            .webhooks
            .iter()
            .filter(|w| w.wants("budget.threshold") || w.wants("budget.exhausted"))
            .flat_map(|w| w.thresholds.iter().copied())
            .collect();
        all.sort_by(f64::total_cmp);
        all.dedup();
        all
    }
}

/// The HMAC key of a secret as Standard Webhooks gives it: the bytes after `whsec_`,
/// base64-decoded, or the text itself.
pub fn signing_key(text: &str) -> Option<Vec<u8>> {
    match text.strip_prefix("whsec_") {
        Some(b64) => base64::engine::general_purpose::STANDARD.decode(b64).ok(),
        None => Some(text.as_bytes().to_vec()),
    }
}

/// Check `[notify]`.
pub fn check(raw: RawNotify, env: EnvLookup, issues: &mut Issues) -> NotifyConfig {
    let mut webhooks: Vec<Webhook> = Vec::new();
    for (n, w) in raw.webhooks.into_iter().enumerate() {
        let at = |field: &str| format!("notify.webhooks[{n}].{field}");
        let url = match url::Url::parse(w.url.trim()) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => u,
            _ => {
                issues.add(&at("url"), "must be an http:// or https:// URL".into());
                continue;
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            issues.add(&at("url"), "must not carry a user or password".into());
        }
        let name = w.name.clone().unwrap_or_else(|| {
            let digest = blake3::hash(url.as_str().as_bytes()).to_hex();
            format!("{}-{}", url.host_str().unwrap_or("hook"), &digest[..8])
        });
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            issues.add(
                &at("name"),
                "must be 1 to 64 letters, digits, '-', '_' or '.'".into(),
            );
        }
        if webhooks.iter().any(|o| o.name == name) {
            issues.add(&at("name"), format!("{name:?} names two webhooks"));
        }
        let secret = match (&w.secret_env, w.format) {
            (Some(_), WebhookFormat::Slack) => {
                issues.add(
                    &at("secret_env"),
                    "format = \"slack\" is not signed (the URL is its secret): leave secret_env out".into(),
                );
                None
            }
            (Some(var), WebhookFormat::Standard) => match env(var) {
                Some(text) if !text.trim().is_empty() => match signing_key(text.trim()) {
                    Some(k) if k.len() >= 16 => Some(k),
                    Some(_) => {
                        issues.add(
                            &at("secret_env"),
                            "its secret is shorter than 16 bytes: make one with openssl rand -base64 32, given as whsec_<that>".into(),
                        );
                        None
                    }
                    None => {
                        issues.add(
                            &at("secret_env"),
                            "its secret starts with whsec_ but the rest is not base64".into(),
                        );
                        None
                    }
                },
                Some(_) => {
                    issues.add(&at("secret_env"), unset_variable(var, "empty"));
                    None
                }
                None => {
                    issues.add(&at("secret_env"), unset_variable(var, "not set"));
                    None
                }
            },
            (None, WebhookFormat::Standard) => {
                issues.add(
                    &at("secret_env"),
                    "a signed webhook needs the variable of its secret (format = \"slack\" needs none)".into(),
                );
                None
            }
            (None, WebhookFormat::Slack) => None,
        };
        let events = match w.events {
            None => EVENTS.iter().map(|e| e.to_string()).collect(),
            Some(list) => {
                for e in list.iter().filter(|e| !EVENTS.contains(&e.as_str())) {
                    issues.add(
                        &at("events"),
                        format!("{e:?} is not an event: {}", EVENTS.join(", ")),
                    );
                }
                if list.is_empty() {
                    issues.add(&at("events"), "names no event".into());
                }
                list
            }
        };
        let mut thresholds = w.thresholds.unwrap_or_else(|| DEFAULT_THRESHOLDS.to_vec());
        // Whole thousandths: an event is named by its threshold in thousandths.
        let thousandths = |t: f64| (t * 1000.0 - (t * 1000.0).round()).abs() < 1e-6;
        if thresholds
            .iter()
            .any(|t| !(*t >= 0.001 && *t <= 1.0 && thousandths(*t)))
        {
            issues.add(
                &at("thresholds"),
                "each must be from 0.001 to 1, in whole thousandths (0.5, 0.95, 0.875)".into(),
            );
        }
        if thresholds.is_empty() {
            issues.add(
                &at("thresholds"),
                "names no threshold: leave it out for the default, or leave the budget events out of events".into(),
            );
        }
        thresholds.sort_by(f64::total_cmp);
        thresholds.dedup();
        if w.timeout.is_zero() || w.timeout > Duration::from_secs(60) {
            issues.add(
                &at("timeout"),
                "must be more than zero and at most 60s".into(),
            );
        }
        webhooks.push(Webhook {
            name,
            url,
            secret,
            events,
            thresholds,
            format: w.format,
            timeout: w.timeout,
        });
    }
    NotifyConfig { webhooks }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(raw: RawWebhook, env: &[(&str, &str)]) -> (NotifyConfig, Vec<String>) {
        let mut issues = Issues::default();
        let lookup = |n: &str| {
            env.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_string())
        };
        let c = check(
            RawNotify {
                webhooks: vec![raw],
            },
            &lookup,
            &mut issues,
        );
        (c, issues.0.iter().map(|i| i.to_string()).collect())
    }

    fn raw(url: &str) -> RawWebhook {
        RawWebhook {
            name: None,
            url: url.into(),
            secret_env: Some("S".into()),
            events: None,
            thresholds: None,
            format: WebhookFormat::Standard,
            timeout: d_timeout(),
        }
    }

    #[test]
    fn a_webhook_takes_its_secret_from_a_variable_in_either_form() {
        let (c, issues) = checked(
            raw("https://hooks.example.com/x"),
            &[("S", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")],
        );
        assert!(issues.is_empty(), "{issues:?}");
        let w = &c.webhooks[0];
        assert_eq!(w.secret.as_ref().map(Vec::len), Some(24));
        assert_eq!(w.thresholds, vec![0.5, 0.8, 0.95, 1.0]);
        assert_eq!(w.events.len(), EVENTS.len());
        assert!(!format!("{w:?}").contains("MfKQ"));
        let (c, _) = checked(
            raw("https://h.example/x"),
            &[("S", "a raw secret of some length")],
        );
        assert_eq!(
            c.webhooks[0].secret.as_deref(),
            Some(&b"a raw secret of some length"[..])
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let (_, issues) = checked(
            raw("ftp://x"),
            &[("S", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")],
        );
        assert!(issues[0].contains("notify.webhooks[0].url"), "{issues:?}");
        let (_, issues) = checked(raw("https://x.example/"), &[]);
        assert!(issues[0].contains("secret_env"), "{issues:?}");
        let mut r = raw("https://x.example/");
        r.events = Some(vec!["budget.thresold".into()]);
        r.thresholds = Some(vec![0.0, 1.5]);
        let (_, issues) = checked(r, &[("S", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")]);
        assert_eq!(issues.len(), 2, "{issues:?}");
        for bad in [vec![0.0001], vec![0.8001], vec![]] {
            let mut r = raw("https://x.example/");
            r.thresholds = Some(bad.clone());
            let (_, issues) = checked(r, &[("S", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")]);
            assert_eq!(issues.len(), 1, "{bad:?}: {issues:?}");
        }
        let (_, issues) = checked(raw("https://x.example/"), &[("S", "   ")]);
        assert!(issues[0].contains("empty"), "{issues:?}");
        let mut r = raw("https://x.example/");
        r.format = WebhookFormat::Slack;
        let (_, issues) = checked(
            r.clone(),
            &[("S", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")],
        );
        assert!(issues[0].contains("not signed"), "{issues:?}");
        r.secret_env = None;
        let (_, issues) = checked(r, &[]);
        assert!(issues.is_empty(), "{issues:?}");
    }
}
