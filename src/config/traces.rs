//! `[tracing]`: OpenTelemetry traces sent over OTLP (HTTP with protobuf). Off when the table is
//! absent. Restart-only.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::{unset_variable, EnvLookup, Issues};

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RawTracing {
    /// The collector's OTLP/HTTP address (`http://collector:4318`); spans go to its
    /// `/v1/traces` unless the address names that path itself.
    pub otlp_endpoint: String,
    /// The traces' `service.name`.
    #[serde(default = "d_service")]
    pub service_name: String,
    /// The share of new traces kept, 0 to 1 (a trace whose client sent a sampled parent is kept
    /// whatever the ratio, one sent unsampled is not: parent-based).
    #[serde(default = "d_ratio")]
    pub sample_ratio: f64,
    /// A variable holding headers for the collector, `name=value` pairs separated by commas (a
    /// vendor's API key): never logged.
    pub headers_env: Option<String>,
    /// Longest wait for the collector to take one batch.
    #[serde(default = "d_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Continue the trace of every client's `traceparent`, not only of clients behind
    /// `server.trusted_proxies`.
    #[serde(default)]
    pub trust_client_context: bool,
    /// Spans waiting for the collector at most; past it a span is dropped (and counted).
    #[serde(default = "d_queue")]
    pub queue: usize,
}

fn d_service() -> String {
    "liveness-gateway".into()
}

fn d_ratio() -> f64 {
    1.0
}

fn d_timeout() -> Duration {
    Duration::from_secs(5)
}

fn d_queue() -> usize {
    4096
}

/// `[tracing]`, checked: the collector's traces URL and its headers read from their variable.
#[derive(Clone, PartialEq)]
pub struct TracingConfig {
    /// Where spans are posted (`…/v1/traces`).
    pub traces_url: String,
    pub service_name: String,
    pub sample_ratio: f64,
    /// The collector's headers, secret values included: never printed.
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub trust_client_context: bool,
    pub queue: usize,
}

impl fmt::Debug for TracingConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TracingConfig")
            .field("traces_url", &self.traces_url)
            .field("service_name", &self.service_name)
            .field("sample_ratio", &self.sample_ratio)
            .field("headers", &self.headers.len())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Check `[tracing]`.
pub fn check(
    raw: Option<&RawTracing>,
    env: EnvLookup,
    issues: &mut Issues,
) -> Option<TracingConfig> {
    let raw = raw?;
    let endpoint = raw.otlp_endpoint.trim_end_matches('/');
    let url = match http::Uri::try_from(endpoint) {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => u,
        _ => {
            issues.add(
                "tracing.otlp_endpoint",
                "must be an http:// or https:// address (http://collector:4318)".into(),
            );
            return None;
        }
    };
    if url.query().is_some() || endpoint.contains('#') {
        issues.add(
            "tracing.otlp_endpoint",
            "must not carry a query or a fragment (the spans go to its /v1/traces)".into(),
        );
    }
    if url.authority().is_some_and(|a| a.as_str().contains('@')) {
        issues.add(
            "tracing.otlp_endpoint",
            "must not carry a user or password: put the collector's credentials in the headers of headers_env".into(),
        );
    }
    let port = url
        .authority()
        .and_then(|a| a.as_str().rsplit_once(':'))
        .map(|(_, p)| p)
        .filter(|p| !p.contains(']'));
    if port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
        issues.add(
            "tracing.otlp_endpoint",
            "has a port that is not 1 to 65535".into(),
        );
    }
    let traces_url = if url.path().ends_with("/v1/traces") {
        endpoint.to_string()
    } else {
        format!("{endpoint}/v1/traces")
    };
    if !(0.0..=1.0).contains(&raw.sample_ratio) {
        issues.add("tracing.sample_ratio", "must be 0 to 1".into());
    }
    if raw.timeout.is_zero() {
        issues.add("tracing.timeout", "must be more than zero".into());
    }
    if raw.queue == 0 {
        issues.add("tracing.queue", "must be at least 1".into());
    }
    let headers = match &raw.headers_env {
        None => Vec::new(),
        Some(var) => match env(var) {
            None => {
                issues.add("tracing.headers_env", unset_variable(var, "not set"));
                Vec::new()
            }
            Some(text) => parse_headers(&text).unwrap_or_else(|| {
                issues.add(
                    "tracing.headers_env",
                    "its variable must hold name=value pairs separated by commas".into(),
                );
                Vec::new()
            }),
        },
    };
    Some(TracingConfig {
        traces_url,
        service_name: raw.service_name.clone(),
        sample_ratio: raw.sample_ratio,
        headers,
        timeout: raw.timeout,
        trust_client_context: raw.trust_client_context,
        queue: raw.queue,
    })
}

/// `name=value,name2=value2` (the `OTEL_EXPORTER_OTLP_HEADERS` form), each a valid header.
fn parse_headers(text: &str) -> Option<Vec<(String, String)>> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=')?;
            let (name, value) = (name.trim(), value.trim());
            http::HeaderName::try_from(name).ok()?;
            http::HeaderValue::try_from(value).ok()?;
            Some((name.to_string(), value.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_pairs() {
        assert_eq!(
            parse_headers("x-honeycomb-team=abc, dataset = d"),
            Some(vec![
                ("x-honeycomb-team".into(), "abc".into()),
                ("dataset".into(), "d".into())
            ])
        );
        assert_eq!(parse_headers("novalue"), None);

        assert_eq!(parse_headers("bad name=v"), None);
    }

    #[test]
    fn an_endpoint_is_a_scheme_a_host_and_a_path() {
        let check_one = |endpoint: &str| {
            let raw = RawTracing {
                otlp_endpoint: endpoint.into(),
                service_name: d_service(),
                sample_ratio: 1.0,
                headers_env: None,
                timeout: d_timeout(),
                trust_client_context: false,
                queue: d_queue(),
            };
            let mut issues = Issues(Vec::new());
            let t = check(Some(&raw), &|_| None, &mut issues);
            (t.map(|t| t.traces_url), issues.0.len())
        };
        assert_eq!(
            check_one("http://collector:4318"),
            (Some("http://collector:4318/v1/traces".into()), 0)
        );
        assert_eq!(
            check_one("https://otlp.example.com/v1/traces"),
            (Some("https://otlp.example.com/v1/traces".into()), 0)
        );
        for bad in [
            "http://127.0.0.1:4318#frag",
            "http://user:pw@127.0.0.1:4318",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:0",
            "http://127.0.0.1:4318?x=1",
            "collector:4318",
            "ftp://collector",
        ] {
            assert!(check_one(bad).1 > 0, "{bad}");
        }
    }
}
