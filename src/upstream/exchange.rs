//! One call to the provider and what it means: the answer checked on its way out, classified,
//! and charged by the billing rule (`Charge`). The `Exchange` is what everyone who waited on the
//! call shares: the reply, the cache, the fleet's store.

use std::time::Instant;

use crate::egress::{Egress, ProviderAnswer};
use crate::error::GatewayError;
use crate::metrics::{GaugeGuard, Metrics};
use crate::verdict::{self, LivenessVerdict, UpstreamAnswer, UpstreamClass};

use super::{UpstreamBody, UpstreamClient, UpstreamError};

/// The outcome of one upstream call, shared by everyone who waited on it.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The provider's answer to pass on (a verdict or a provider refusal), or the gateway's error.
    pub outcome: Result<ProviderAnswer, GatewayError>,
    pub class: UpstreamClass,
    pub upstream_status: Option<u16>,
    pub verdict: Option<LivenessVerdict>,
    /// The provider's session id of the verdict, for the access log.
    pub session_id: Option<String>,
    pub upstream_ms: u64,
    /// The request's bytes when it went out whole (0 when it did not), and the answer's body.
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

impl Exchange {
    /// No call went out: the request ends in an internal error.
    pub fn none() -> Exchange {
        Exchange {
            outcome: Err(GatewayError::Internal),
            class: UpstreamClass::Connect,
            upstream_status: None,
            verdict: None,
            session_id: None,
            upstream_ms: 0,
            sent_bytes: 0,
            received_bytes: 0,
        }
    }
}

/// What one finished call costs, by the billing rule (see `call`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// Not billed: the request never reached the provider whole, or the provider's answer is
    /// one of its documented refusals.
    Free,
    /// Billed: the provider answered (its status at least), and not with a documented refusal.
    Billed,
    /// May be billed, and no answer tells (`UpstreamError::outcome_unknown`): the whole request
    /// was written and no answer head came back. Counted as billed, the budget is never
    /// overshot, and apart, as uncertain, for the reconciliation with the provider's invoice.
    Uncertain,
}

impl Charge {
    /// The `billing` field of the access line.
    pub fn as_str(self) -> &'static str {
        match self {
            Charge::Free => "not_billed",
            Charge::Billed => "billed",
            Charge::Uncertain => "uncertain",
        }
    }
}

/// One upstream call and what it means, with the billing rule applied: the call is billable
/// (its reservation is committed) once the whole request was written to the provider, unless the
/// provider's answer is one of its documented refusals; it is not (the reservation is released)
/// when the request never got out whole. A billable call with no answer that tells is
/// `Charge::Uncertain`.
pub async fn call(
    client: &UpstreamClient,
    egress: &Egress,
    metrics: &Metrics,
    body: &UpstreamBody,
    org_key: &str,
    deadline: Instant,
) -> (Exchange, Charge) {
    let _inflight = GaugeGuard::new(&metrics.upstream_inflight);
    let started = Instant::now();
    let result = client.call_until(body, deadline).await;
    let upstream_ms = started.elapsed().as_millis() as u64;
    metrics
        .upstream_duration
        .observe(started.elapsed().as_secs_f64());
    let (mut exchange, charge) = match result {
        Ok(answer) => answered(&answer, egress, upstream_ms),
        Err(e) => unanswered(&e, upstream_ms),
    };
    if charge != Charge::Free || exchange.upstream_status.is_some() {
        exchange.sent_bytes = body.len as u64;
    }
    if charge != Charge::Free && exchange.verdict.is_none() {
        metrics
            .billed_without_verdict
            .with_label_values(&[exchange.class.as_str()])
            .inc();
    }
    let status_class = exchange
        .upstream_status
        .map(verdict::status_class)
        .unwrap_or("none");
    metrics
        .upstream_requests
        .with_label_values(&[status_class, exchange.class.as_str(), org_key])
        .inc();
    (exchange, charge)
}

/// A call the provider answered. Every answer is checked, those that do not reach the client
/// too: an answer that gives a secret away (a validation error that repeats the submitted
/// fields, a debug field, a header) is counted and never forwarded nor cached.
fn answered(answer: &UpstreamAnswer, egress: &Egress, upstream_ms: u64) -> (Exchange, Charge) {
    let c = verdict::classify(answer.status, &answer.body);
    let status = answer.status;
    let charge = if c.class.is_unbilled_refusal() {
        Charge::Free
    } else {
        Charge::Billed
    };
    let (outcome, class, verdict, session_id) = match egress.check(answer) {
        Err(withheld) => {
            let invalid = UpstreamClass::InvalidResponse;
            (Err(GatewayError::from(withheld)), invalid, None, None)
        }
        Ok(checked) => {
            let outcome = match c.class {
                UpstreamClass::Ok => Ok(checked.into_answer(None)),
                UpstreamClass::InvalidResponse => Err(GatewayError::UpstreamInvalid),
                // Only the provider's documented refusals pass through (drop-in clients expect
                // them), with a stable code (`upstream_no_subscription`, …) added so that a
                // client can switch on it and an operator sees at once that it is the
                // organization's subscription, not the tenant's request; any other status
                // becomes a gateway error.
                c if c.is_unbilled_refusal() => {
                    Ok(checked.into_answer(Some(&format!("upstream_{}", c.as_str()))))
                }
                _ => Err(GatewayError::UpstreamFailed { status }),
            };
            (outcome, c.class, c.verdict, c.session_id)
        }
    };
    let exchange = Exchange {
        outcome,
        class,
        upstream_status: Some(status),
        verdict,
        session_id,
        upstream_ms,
        sent_bytes: 0,
        received_bytes: answer.body.len() as u64,
    };
    (exchange, charge)
}

/// A call that brought no usable answer.
fn unanswered(e: &UpstreamError, upstream_ms: u64) -> (Exchange, Charge) {
    tracing::warn!(error = %e, "upstream call failed");
    let err = if e.is_timeout() {
        GatewayError::UpstreamTimeout
    } else if e.may_have_billed() {
        GatewayError::UpstreamInvalid
    } else {
        GatewayError::UpstreamUnreachable
    };
    let exchange = Exchange {
        outcome: Err(err),
        class: e.class(),
        upstream_status: None,
        verdict: None,
        session_id: None,
        upstream_ms,
        sent_bytes: 0,
        received_bytes: 0,
    };
    let charge = if !e.may_have_billed() {
        Charge::Free
    } else if e.outcome_unknown() {
        Charge::Uncertain
    } else {
        Charge::Billed
    };
    (exchange, charge)
}
