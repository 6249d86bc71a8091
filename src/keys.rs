//! The organization keys: several subscriptions with the provider, each named by an `id` that
//! logs, metrics and the usage history carry (never the key). A tenant's calls go out with its
//! own key (`tenants[].org_key`, or the default key); with `tenants[].org_key_fallback`, an
//! upload the provider refused for the key's subscription is sent once more with the next key.
//!
//! A key whose subscription the provider refused is **lapsed**: tenants with a fallback skip it,
//! except for one request per `upstream.key_probe_interval`, which tries it again (its answer
//! clears the lapse, or renews it). Tenants without a fallback keep calling with it: the
//! provider's refusal is their answer, and it costs nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prometheus::IntGaugeVec;

use crate::config::UpstreamConfig;
use crate::egress::Egress;
use crate::image::{ImageBytes, ImageKind};
use crate::metrics::Metrics;
use crate::upstream::{self, Charge, Exchange, UpstreamClient};

/// The lapse of one key, kept across reloads.
#[derive(Debug, Default)]
struct Lapse {
    lapsed: AtomicBool,
    /// When a request may try the lapsed key again, in milliseconds since `KeyStates::origin`.
    next_probe_ms: AtomicU64,
    /// Answers that showed it working.
    worked: AtomicU64,
}

/// Which keys are lapsed (the gauge `liveness_gateway_org_key_lapsed` shows it).
pub struct KeyStates {
    origin: Instant,
    lapses: RwLock<HashMap<String, Arc<Lapse>>>,
    gauge: IntGaugeVec,
}

impl KeyStates {
    pub fn new(gauge: IntGaugeVec) -> Self {
        KeyStates {
            origin: Instant::now(),
            lapses: RwLock::new(HashMap::new()),
            gauge,
        }
    }

    /// Show every configured key in the gauge (0 until one lapses), and only those: a key a
    /// reload removed leaves the gauge (and its lapse is forgotten), so no alert stays on it.
    pub fn register<'a>(&self, ids: impl Iterator<Item = &'a str>) {
        let ids: Vec<&str> = ids.collect();
        let mut lapses = self.lapses.write().unwrap_or_else(|p| p.into_inner());
        lapses.retain(|id, _| {
            let keep = ids.contains(&id.as_str());
            if !keep {
                let _ = self.gauge.remove_label_values(&[id]);
            }
            keep
        });
        for id in ids {
            let lapsed = lapses
                .entry(id.to_string())
                .or_default()
                .lapsed
                .load(Ordering::Relaxed);
            self.gauge.with_label_values(&[id]).set(i64::from(lapsed));
        }
    }

    /// How many answers showed the key working since the process started (the notifier's
    /// evidence that it works, beside a lapse this process never saw).
    pub fn worked(&self, id: &str) -> u64 {
        self.lapse(id).worked.load(Ordering::Relaxed)
    }

    /// The keys lapsed now.
    pub fn lapsed(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .lapses
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, l)| l.lapsed.load(Ordering::Relaxed))
            .map(|(id, _)| id.clone())
            .collect();
        out.sort();
        out
    }

    fn lapse(&self, id: &str) -> Arc<Lapse> {
        if let Some(l) = self
            .lapses
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return l.clone();
        }
        self.lapses
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Whether a request may use this key now: it is not lapsed, or this request is the one
    /// probe of the interval.
    pub fn usable(&self, id: &str, probe_interval: Duration) -> bool {
        let l = self.lapse(id);
        if !l.lapsed.load(Ordering::Relaxed) {
            return true;
        }
        let now = self.now_ms();
        let due = l.next_probe_ms.load(Ordering::Relaxed);
        now >= due
            && l.next_probe_ms
                .compare_exchange(
                    due,
                    now + probe_interval.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// The provider refused the key's subscription.
    pub fn mark_lapsed(&self, id: &str, probe_interval: Duration) {
        let l = self.lapse(id);
        if !l.lapsed.swap(true, Ordering::AcqRel) {
            tracing::error!(org_key = %id, "the provider refused the subscription of organization key {id}: marked lapsed");
        }
        l.next_probe_ms.store(
            self.now_ms() + probe_interval.as_millis() as u64,
            Ordering::Relaxed,
        );
        self.gauge.with_label_values(&[id]).set(1);
    }

    /// The provider answered a call with the key as a working subscription does.
    pub fn mark_working(&self, id: &str) {
        let l = self.lapse(id);
        l.worked.fetch_add(1, Ordering::Relaxed);
        if l.lapsed.swap(false, Ordering::AcqRel) {
            tracing::warn!(org_key = %id, "organization key {id} works again");
        }
        self.gauge.with_label_values(&[id]).set(0);
    }
}

/// What goes to the provider, whichever organization key it goes with.
pub struct Upload {
    pub extension: String,
    pub kind: ImageKind,
    pub image: ImageBytes,
    /// The W3C trace context the call carries (`traceparent`, and the client's `tracestate`),
    /// when the request is traced.
    pub trace: Option<(String, Option<String>)>,
}

/// The call with a tenant's chain of organization keys: its own, then, after a refusal of that
/// key's subscription, each fallback in turn (one key is never used twice for one upload). A
/// tenant with fallbacks skips a lapsed key, but for one probe per `upstream.key_probe_interval`;
/// the last key of the chain is tried when no other was. Returns the exchange, its charge (a
/// refused subscription is never billed, so an upload is billed at most once), and the id of
/// the key of the exchange.
pub async fn call_with_keys(
    states: &KeyStates,
    cfg: &UpstreamConfig,
    client: &UpstreamClient,
    egress: &Egress,
    metrics: &Metrics,
    chain: &[String],
    upload: &Upload,
) -> (Exchange, Charge, String) {
    let interval = cfg.key_probe_interval;
    // Every tenant has a chain of known keys (checked when the config was loaded); were one
    // empty or unknown, no call would go out and the request would end in an internal error.
    // Every key of the chain within one `total_timeout`: the followers' wait, the fleet's lock
    // and the shutdown grace are sized for one call. A fallback starts only with half of it
    // left, so that it is not cut off after its request was sent (and billed without an answer).
    let total = client.total_timeout();
    let deadline = Instant::now() + total;
    let mut refused: Option<(Exchange, Charge, String)> = None;
    for (i, id) in chain.iter().enumerate() {
        if refused.is_some() && deadline.saturating_duration_since(Instant::now()) < total / 2 {
            break;
        }
        let last = i + 1 == chain.len();
        let must_try = last && refused.is_none();
        if chain.len() > 1 && !must_try && !states.usable(id, interval) {
            continue;
        }
        let Some(named) = cfg.keys.get(id) else {
            break;
        };
        if let Some((_, _, from)) = &refused {
            // The upload goes again, with this key, because `from` was refused.
            metrics.org_key_failovers.with_label_values(&[from]).inc();
        }
        let mut body =
            upstream::build_body(&named.key, &upload.extension, upload.kind, &upload.image);
        body.trace = upload.trace.clone();
        let (exchange, charge) =
            upstream::call(client, egress, metrics, &body, &named.id, deadline).await;
        if exchange.class.is_subscription_error() {
            states.mark_lapsed(&named.id, interval);
            if !last {
                refused = Some((exchange, charge, named.id.clone()));
                continue;
            }
        } else if exchange.upstream_status.is_some() {
            states.mark_working(&named.id);
        }
        return (exchange, charge, named.id.clone());
    }
    refused.unwrap_or_else(|| (Exchange::none(), Charge::Free, String::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states() -> KeyStates {
        let gauge = IntGaugeVec::new(prometheus::Opts::new("g", "g"), &["org_key"]).expect("g");
        KeyStates::new(gauge)
    }

    #[test]
    fn a_lapsed_key_is_probed_once_per_interval() {
        let s = states();
        let every = Duration::from_millis(50);
        assert!(s.usable("a", every));
        s.mark_lapsed("a", every);
        assert!(!s.usable("a", every));
        std::thread::sleep(Duration::from_millis(60));
        // One request probes; the others still skip it.
        assert!(s.usable("a", every));
        assert!(!s.usable("a", every));
        s.mark_working("a");
        assert!(s.usable("a", every));
        assert!(s.usable("b", every));
    }

    #[test]
    fn a_key_a_reload_removed_leaves_the_gauge() {
        let s = states();
        s.register(["a", "b"].into_iter());
        s.mark_lapsed("b", Duration::from_secs(60));
        assert_eq!(s.gauge.with_label_values(&["b"]).get(), 1);
        s.register(["a"].into_iter());
        let families = {
            let r = prometheus::Registry::new();
            r.register(Box::new(s.gauge.clone())).expect("register");
            r.gather()
        };
        let labels: Vec<String> = families[0]
            .get_metric()
            .iter()
            .map(|m| m.get_label()[0].value().to_string())
            .collect();
        assert_eq!(labels, vec!["a".to_string()]);
        // Back again later: not lapsed.
        s.register(["a", "b"].into_iter());
        assert!(s.usable("b", Duration::from_secs(60)));
    }
}
