//! Notifications: what `[[notify.webhooks]]` are told, once across the fleet, and delivered
//! until they take it.
//!
//! Every replica watches, once a second, what it can see: the budgets of the tenants whose
//! calls it counted (and every tenant's every `FULL_SCAN`), its organization keys, its
//! breaker, its replay signal and the runtime keys' expiries. What it finds is **raised** as an
//! event record in the store (`store::Records`, beside the runtime keys): `event/<name>`, where
//! the name says what happened (`budget:<tenant>:day:<day>:800` for 80 % of a day's budget). A
//! record is only ever created where there is none, so whichever replica finds a crossing
//! first raises it, and no replica (nor a restarted one) raises it again: **one event per
//! tenant, period and threshold across the fleet**. The record lives until its period is over,
//! the marker that keeps it from coming back.
//!
//! The record also holds its deliveries: the webhooks still to be told, their tries and when
//! to try next. A replica takes an event's deliveries for `LEASE` (written into the record,
//! so that two replicas never send one event at once), posts them, and writes back what is
//! left; a receiver that fails is tried again after 1, 2, 4 … seconds, at most an hour apart,
//! for 24 hours, across restarts and by any replica. A delivery that succeeded but could not
//! be written back (the store went away) is sent again: receivers tell a repeat by its
//! `webhook-id`, as the Standard Webhooks spec asks. Nothing here runs on a request's path.
//!
//! States rather than moments (an organization key lapsed, the breaker open) are **latched**:
//! `latch/<name>` holds the fleet's last state and its generation; a replica that sees its own
//! state differ changes the latch (naming the value it replaces) and raises the event of that
//! generation, so a fleet whose replicas all see one key lapse sends one `org_key.lapsed`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{Webhook, WebhookFormat};
use crate::issued::rfc3339;
use crate::state::AppState;

/// How often a replica looks for events and deliveries.
const TICK: Duration = Duration::from_secs(1);

/// How often every tenant's budget is looked at, not only those this replica counted calls of
/// (an adjustment, a grant that ended, another replica's calls).
const FULL_SCAN: Duration = Duration::from_secs(30);

/// How long a replica holds an event's deliveries.
const LEASE: i64 = 60;

/// How long deliveries are tried.
const GIVE_UP_AFTER: i64 = 86_400;

/// How long the longest gap between tries is.
const MAX_BACKOFF: i64 = 3_600;

/// How long an event other than a budget's is kept as a marker once delivered.
const KEPT: i64 = 2 * 86_400;

/// How long before a runtime key expires it is told of.
const EXPIRING: i64 = 7 * 86_400;

/// One webhook's delivery of an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub webhook: String,
    pub attempts: u32,
    /// Unix seconds.
    pub next_at: i64,
}

/// A replica's hold of an event's deliveries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub owner: String,
    pub until: i64,
}

/// An event as the store keeps it (`event/<name>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `webhook-id`: the same for every try of every webhook.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// When it was raised, RFC 3339.
    pub timestamp: String,
    pub data: Value,
    /// Unix seconds.
    pub created: i64,
    /// The deliveries not done yet.
    pub pending: Vec<Delivery>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// Kept (as the marker that it was raised) until then, Unix seconds.
    pub keep_until: i64,
}

impl Event {
    /// The body every signed webhook gets.
    pub fn body(&self) -> String {
        json!({ "type": self.kind, "timestamp": self.timestamp, "data": self.data }).to_string()
    }
}

/// The gap before try `attempts + 1`: 1, 2, 4 … seconds, at most an hour.
fn backoff(attempts: u32) -> i64 {
    1i64.checked_shl(attempts.min(20))
        .unwrap_or(MAX_BACKOFF)
        .min(MAX_BACKOFF)
}

/// `webhook-signature` per the Standard Webhooks spec: `v1,` and the base64 of the
/// HMAC-SHA256 of `<id>.<timestamp>.<body>` with the secret's bytes.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&key, format!("{id}.{timestamp}.{body}").as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    )
}

/// Text as Slack shows it: its three control characters escaped.
fn slack_escaped(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An event as a line of Slack text.
pub fn slack_text(e: &Event) -> String {
    let d = &e.data;
    let s = |k: &str| slack_escaped(d.get(k).and_then(Value::as_str).unwrap_or("?"));
    let n = |k: &str| d.get(k).and_then(Value::as_u64).unwrap_or(0);
    let period = match d.get("period").and_then(Value::as_str) {
        Some("month") => "monthly",
        _ => "daily",
    };
    match e.kind.as_str() {
        "budget.threshold" => format!(
            ":warning: Tenant `{}` has used {} of the {} calls of its {period} budget ({:.0} %).",
            s("tenant"),
            n("used"),
            n("limit"),
            d.get("threshold").and_then(Value::as_f64).unwrap_or(0.0) * 100.0
        ),
        "budget.exhausted" => format!(
            ":no_entry: Tenant `{}` has used its {period} budget: {} of {} calls. Its calls are refused until the period ends.",
            s("tenant"),
            n("used"),
            n("limit")
        ),
        "org_key.lapsed" => format!(
            ":rotating_light: The provider refused the subscription of organization key `{}`: calls go to its fallback, or are refused.",
            s("org_key")
        ),
        "org_key.restored" => format!(
            ":white_check_mark: Organization key `{}` works again.",
            s("org_key")
        ),
        "circuit.opened" => ":rotating_light: The gateway's breaker opened: the provider is failing, and calls are refused for now.".into(),
        "circuit.closed" => ":white_check_mark: The gateway's breaker closed: calls reach the provider again.".into(),
        "replay.suspected" => format!(
            ":eyes: An image that had passed for another party was uploaded again by tenant `{}`.",
            s("tenant")
        ),
        "key.expiring" => format!(
            ":hourglass: Key `{}` of tenant `{}` ({}) expires at {}.",
            s("key_id"),
            s("tenant"),
            s("label"),
            s("expires_at")
        ),
        other => slack_escaped(other),
    }
}

/// A latched state as the store keeps it (`latch/<name>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Latch {
    state: String,
    generation: u64,
}

/// What this replica saw at its last look.
#[derive(Default)]
struct Seen {
    /// Billable calls counted here, by tenant.
    billed: HashMap<String, u64>,
    replays: HashMap<String, u64>,
    /// Each organization key: lapsed at the last look, and its answers that showed it working.
    org_keys: HashMap<String, (bool, u64)>,
    /// The breaker's state at the last look, and the answers that showed any key working.
    circuit: Option<(&'static str, u64)>,
    /// Latches this replica has to move, by name: the state, the event and its data. Kept until
    /// the store took them (or another replica moved the latch there first).
    intents: HashMap<String, (String, &'static str, Value)>,
    /// Events this replica raised, or found raised.
    raised: HashSet<String>,
}

/// The notifier of one replica: what it looks for. Its deliveries run on their own
/// (`Deliveries`), so a slow receiver never holds up finding what happened.
pub struct Notifier {
    state: Arc<AppState>,
    seen: Seen,
    next_full_scan: tokio::time::Instant,
}

/// Raising an event failed: the store did not take it (tried again at the next look).
struct NotRaised;

impl Notifier {
    pub fn new(state: Arc<AppState>) -> Notifier {
        Notifier {
            state,
            seen: Seen::default(),
            next_full_scan: tokio::time::Instant::now(),
        }
    }

    /// Look and deliver every `TICK`, for as long as the process runs.
    pub async fn run(mut self) {
        tokio::spawn(Deliveries::new(self.state.clone()).run());
        loop {
            if !self.state.runtime().config.notify.webhooks.is_empty() {
                self.look().await;
            }
            tokio::time::sleep(TICK).await;
        }
    }

    fn now(&self) -> i64 {
        self.state.store.now().timestamp()
    }

    /// The webhooks that want an event (of a budget: at this threshold).
    fn hooks_for(&self, kind: &str, threshold: Option<f64>) -> Vec<Delivery> {
        let now = self.now();
        self.state
            .runtime()
            .config
            .notify
            .webhooks
            .iter()
            .filter(|w| w.wants(kind))
            .filter(|w| threshold.is_none_or(|t| w.thresholds.contains(&t)))
            .map(|w| Delivery {
                webhook: w.name.clone(),
                attempts: 0,
                next_at: now,
            })
            .collect()
    }

    /// Raise an event under `name`, unless it was raised already (by any replica); whether
    /// this call raised it.
    async fn raise(
        &mut self,
        name: &str,
        kind: &str,
        data: Value,
        threshold: Option<f64>,
        keep_until: i64,
    ) -> Result<bool, NotRaised> {
        let id = format!("event/{name}");
        if self.seen.raised.contains(&id) || self.state.issued.has(&id) {
            return Ok(false);
        }
        let pending = self.hooks_for(kind, threshold);
        if pending.is_empty() {
            return Ok(false);
        }
        let now = self.now();
        let event = Event {
            id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
            kind: kind.to_string(),
            timestamp: rfc3339(now).unwrap_or_default(),
            data,
            created: now,
            pending,
            lease: None,
            keep_until,
        };
        let text = serde_json::to_string(&event).map_err(|_| NotRaised)?;
        match self.state.store.swap(&id, None, Some(&text)).await {
            Ok(raised) => {
                self.seen.raised.insert(id);
                if raised {
                    self.state
                        .metrics
                        .notify_events
                        .with_label_values(&[kind])
                        .inc();
                    tracing::info!(event = kind, id = %event.id, "notify: {kind} raised");
                    let _ = self.state.issued.refresh().await;
                }
                Ok(raised)
            }
            Err(e) => {
                crate::throttle::warn_throttled!(
                    "notify: cannot raise {kind} (tried again in a second): {e}"
                );
                Err(NotRaised)
            }
        }
    }

    /// The state a latch holds (`ok` when it has none).
    fn latched(&self, name: &str) -> (Option<String>, String) {
        let id = format!("latch/{name}");
        let raw = self
            .state
            .issued
            .raw(&id)
            .into_iter()
            .find(|(k, _)| *k == id);
        let state = raw
            .as_ref()
            .and_then(|(_, v)| serde_json::from_str::<Latch>(v).ok())
            .map_or_else(|| "ok".to_string(), |l| l.state);
        (raw.map(|(_, v)| v), state)
    }

    /// Move the latches this replica has seen reason to move, raising each one's event; an
    /// intent the store did not take is kept for the next look.
    async fn move_latches(&mut self) {
        let intents: Vec<(String, (String, &'static str, Value))> =
            self.seen.intents.drain().collect();
        for (name, (to, kind, data)) in intents {
            let (raw, state) = self.latched(&name);
            if state == to {
                continue;
            }
            let generation = raw
                .as_deref()
                .and_then(|v| serde_json::from_str::<Latch>(v).ok())
                .map_or(0, |l| l.generation)
                + 1;
            let next = Latch {
                state: to.clone(),
                generation,
            };
            let Ok(text) = serde_json::to_string(&next) else {
                continue;
            };
            let id = format!("latch/{name}");
            match self
                .state
                .store
                .swap(&id, raw.as_deref(), Some(&text))
                .await
            {
                Ok(true) => {
                    let _ = self.state.issued.refresh().await;
                    let keep = self.now() + KEPT;
                    let event = format!("{name}:{generation}");
                    if self
                        .raise(&event, kind, data.clone(), None, keep)
                        .await
                        .is_err()
                    {
                        // The latch moved but its event is not raised: raised at the next look
                        // under the same name (one event per generation).
                        self.seen.intents.insert(name, (to, kind, data));
                    }
                }
                // Another replica moved it first: looked at again with what it wrote.
                Ok(false) => {
                    let _ = self.state.issued.refresh().await;
                    self.seen.intents.insert(name, (to, kind, data));
                }
                Err(e) => {
                    crate::throttle::warn_throttled!(
                        "notify: cannot record {kind} (tried again in a second): {e}"
                    );
                    self.seen.intents.insert(name, (to, kind, data));
                }
            }
        }
    }

    /// Find what happened since the last look.
    async fn look(&mut self) {
        self.budgets().await;
        let s = self.state.clone();
        let rt = s.runtime();
        // Organization keys. A lapse this replica sees begin moves the latch to lapsed; an
        // answer that shows the key working moves it back (also one another replica's lapse
        // left, that replica gone). A key lapsed here, but long known to the fleet as such,
        // moves nothing.
        let lapsed: HashSet<String> = s.org_keys.lapsed().into_iter().collect();
        let mut worked_any = 0u64;
        for id in rt.config.upstream.keys.ids() {
            let now_lapsed = lapsed.contains(id);
            let worked = s.org_keys.worked(id);
            worked_any += worked;
            let (was_lapsed, worked_before) = self
                .seen
                .org_keys
                .insert(id.to_string(), (now_lapsed, worked))
                .unwrap_or((false, 0));
            let name = format!("org_key:{id}");
            let data = json!({ "org_key": id });
            if now_lapsed && !was_lapsed {
                self.seen
                    .intents
                    .insert(name, ("lapsed".into(), "org_key.lapsed", data));
            } else if !now_lapsed && worked > worked_before {
                self.seen
                    .intents
                    .insert(name, ("ok".into(), "org_key.restored", data));
            }
        }
        // The breaker: opened when this replica's opens; closed when it closes, or when calls
        // work here while the fleet's latch says open. Half-open is neither.
        let state = s.breaker.state();
        let (was, worked_before) = self
            .seen
            .circuit
            .replace((state, worked_any))
            .unwrap_or(("closed", 0));
        let data = json!({ "state": state });
        match state {
            "open" if was != "open" => {
                self.seen
                    .intents
                    .insert("circuit".into(), ("open".into(), "circuit.opened", data));
            }
            "closed" if was != "closed" || worked_any > worked_before => {
                self.seen
                    .intents
                    .insert("circuit".into(), ("ok".into(), "circuit.closed", data));
            }
            _ => {}
        }
        self.move_latches().await;
        // The replay signal: once an hour per tenant at most.
        for t in rt.tenants.ids() {
            let n = s
                .metrics
                .replay_suspected
                .get_metric_with_label_values(&[t])
                .map(|c| c.get())
                .unwrap_or(0);
            let before = self.seen.replays.get(t).copied();
            if before.is_some_and(|b| n > b) {
                let now = self.now();
                let raised = self
                    .raise(
                        &format!("replay:{t}:{}", now / 3_600),
                        "replay.suspected",
                        json!({ "tenant": t }),
                        None,
                        now + KEPT,
                    )
                    .await;
                if raised.is_err() {
                    // Looked at again at the next look.
                    continue;
                }
            }
            self.seen.replays.insert(t.to_string(), n);
        }
        // Runtime keys that expire within a week.
        let now = self.now();
        for k in s.issued.all_keys() {
            let Some(at) = k.expires_at.filter(|e| *e > now && *e - now <= EXPIRING) else {
                continue;
            };
            let _ = self
                .raise(
                    &format!("key.expiring:{}:{at}", k.key_id),
                    "key.expiring",
                    json!({ "tenant": k.tenant, "key_id": k.key_id, "label": k.label, "expires_at": rfc3339(at) }),
                    None,
                    at + KEPT,
                )
                .await;
        }
    }

    /// The budgets' thresholds crossed: of the tenants this replica counted calls of since its
    /// last look, and of every tenant every `FULL_SCAN`.
    async fn budgets(&mut self) {
        let s = self.state.clone();
        let rt = s.runtime();
        let notify = &rt.config.notify;
        // 1.0 is `budget.exhausted`, the thresholds below it `budget.threshold`.
        let thresholds: Vec<f64> = notify
            .thresholds()
            .into_iter()
            .filter(|t| {
                let kind = if *t >= 1.0 {
                    "budget.exhausted"
                } else {
                    "budget.threshold"
                };
                notify
                    .webhooks
                    .iter()
                    .any(|w| w.wants(kind) && w.thresholds.contains(t))
            })
            .collect();
        if thresholds.is_empty() {
            return;
        }
        let full = tokio::time::Instant::now() >= self.next_full_scan;
        if full {
            self.next_full_scan = tokio::time::Instant::now() + FULL_SCAN;
        }
        let calendar = s.store.calendar();
        for id in rt.tenants.ids() {
            let Some(t) = rt.tenants.get(id) else {
                continue;
            };
            if t.daily_budget.is_none() && t.monthly_budget.is_none() {
                continue;
            }
            let billed = s
                .metrics
                .billable_calls
                .get_metric_with_label_values(&[id])
                .map(|c| c.get())
                .unwrap_or(0);
            let before = self.seen.billed.insert(id.to_string(), billed);
            if !full && before == Some(billed) {
                continue;
            }
            let now = s.store.now();
            let Ok(c) = s.store.counts(id, now).await else {
                // Looked at again at the next look.
                self.seen.billed.remove(id);
                continue;
            };
            let budget = s.issued.budget(t);
            for (period, limit, used, key, ends_in) in [
                (
                    "day",
                    budget.daily,
                    c.day_used,
                    &c.day,
                    calendar.secs_to_next_day(now),
                ),
                (
                    "month",
                    budget.monthly,
                    c.month_used,
                    &c.month,
                    calendar.secs_to_next_month(now),
                ),
            ] {
                let Some(limit) = limit.filter(|l| *l > 0) else {
                    continue;
                };
                for &th in &thresholds {
                    // Thresholds are whole thousandths (`config::notify`).
                    let milli = (th * 1000.0).round() as u64;
                    if used.saturating_mul(1000) < milli.saturating_mul(limit) {
                        continue;
                    }
                    let kind = if milli >= 1000 {
                        "budget.exhausted"
                    } else {
                        "budget.threshold"
                    };
                    let raised = self
                        .raise(
                            // Four digits: the names sort in the thresholds' order.
                            &format!("budget:{id}:{period}:{key}:{milli:04}"),
                            kind,
                            json!({ "tenant": id, "period": period, "period_key": key, "threshold": th, "used": used, "limit": limit }),
                            Some(th),
                            now.timestamp() + ends_in as i64 + 86_400,
                        )
                        .await;
                    if raised.is_err() {
                        self.seen.billed.remove(id);
                    }
                }
            }
        }
    }
}

/// What delivers the events of the store, on its own task: any replica, whichever raised
/// them.
struct Deliveries {
    state: Arc<AppState>,
    /// This process, as an event's lease names it.
    me: String,
    client: reqwest::Client,
}

/// Events whose deliveries run at once.
const AT_ONCE: usize = 8;

impl Deliveries {
    fn new(state: Arc<AppState>) -> Deliveries {
        let client = reqwest::Client::builder()
            .user_agent(concat!("liveness-gateway/", env!("CARGO_PKG_VERSION")))
            // A receiver's redirect could carry the signed body elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_millis(500))
            .build()
            .unwrap_or_default();
        Deliveries {
            state,
            me: uuid::Uuid::new_v4().simple().to_string(),
            client,
        }
    }

    async fn run(self) {
        loop {
            if !self.state.runtime().config.notify.webhooks.is_empty()
                || !self.state.issued.raw("event/").is_empty()
            {
                self.deliver().await;
            }
            tokio::time::sleep(TICK).await;
        }
    }

    fn now(&self) -> i64 {
        self.state.store.now().timestamp()
    }

    /// Post the deliveries that are due, of events no other replica holds, several events at
    /// once (one receiver that hangs holds up only its own).
    async fn deliver(&self) {
        use futures_util::StreamExt;
        let events = self.state.issued.raw("event/");
        futures_util::stream::iter(events)
            .for_each_concurrent(AT_ONCE, |(id, raw)| self.deliver_one(id, raw))
            .await;
    }

    async fn deliver_one(&self, id: String, raw: String) {
        let s = &self.state;
        let rt = s.runtime();
        let Ok(ev) = serde_json::from_str::<Event>(&raw) else {
            return;
        };
        let now = self.now();
        if ev.pending.is_empty() {
            if ev.keep_until < now {
                let _ = s.store.swap(&id, Some(&raw), None).await;
            }
            return;
        }
        let held = ev
            .lease
            .as_ref()
            .is_some_and(|l| l.until > now && l.owner != self.me);
        if held || !ev.pending.iter().any(|p| p.next_at <= now) {
            return;
        }
        // Held for as long as its slowest delivery may take, and a margin: the deliveries run
        // at once.
        let slowest = rt
            .config
            .notify
            .webhooks
            .iter()
            .map(|w| w.timeout.as_secs() as i64 + 1)
            .max()
            .unwrap_or(0);
        let mut leased = ev.clone();
        leased.lease = Some(Lease {
            owner: self.me.clone(),
            until: now + slowest + LEASE,
        });
        let Ok(leased_text) = serde_json::to_string(&leased) else {
            return;
        };
        if !matches!(
            s.store.swap(&id, Some(&raw), Some(&leased_text)).await,
            Ok(true)
        ) {
            // Another replica took it, or changed it: seen again at the next look.
            return;
        }
        let tries = leased.pending.iter().map(|d| async {
            let mut d = d.clone();
            if d.next_at > now {
                return Some(d);
            }
            let count = |outcome: &str| {
                s.metrics
                    .webhook_deliveries
                    .with_label_values(&[&d.webhook, &ev.kind, outcome])
                    .inc()
            };
            let Some(hook) = rt.config.notify.webhooks.iter().find(|w| w.name == d.webhook) else {
                count("dropped");
                return None;
            };
            match self.send(hook, &ev).await {
                Ok(()) => {
                    count("delivered");
                    None
                }
                Err(why) if self.now() - ev.created >= GIVE_UP_AFTER => {
                    count("gave_up");
                    tracing::error!(webhook = %d.webhook, event = %ev.kind, id = %ev.id, "notify: gave up after 24 hours of failed deliveries: {why}");
                    None
                }
                Err(why) => {
                    count("failed");
                    let wait = backoff(d.attempts);
                    d.attempts += 1;
                    d.next_at = self.now() + wait;
                    crate::throttle::warn_throttled!(
                        webhook = %d.webhook,
                        "notify: the webhook did not take {} (tried again in {wait} s): {why}",
                        ev.kind
                    );
                    Some(d)
                }
            }
        });
        let left: Vec<Delivery> = futures_util::future::join_all(tries)
            .await
            .into_iter()
            .flatten()
            .collect();
        let mut done = leased.clone();
        done.lease = None;
        done.pending = left;
        if let Ok(text) = serde_json::to_string(&done) {
            // Not written (the store went away): the lease lapses and the deliveries are sent
            // again, with the same webhook-id.
            let _ = s.store.swap(&id, Some(&leased_text), Some(&text)).await;
        }
        let _ = s.issued.refresh().await;
    }

    /// Post one event to one webhook: Ok when it answered 2xx.
    async fn send(&self, hook: &Webhook, ev: &Event) -> Result<(), String> {
        let mut req = self
            .client
            .post(hook.url.clone())
            .timeout(hook.timeout)
            .header("content-type", "application/json");
        let body = match hook.format {
            WebhookFormat::Standard => {
                let body = ev.body();
                let ts = chrono::Utc::now().timestamp();
                req = req
                    .header("webhook-id", &ev.id)
                    .header("webhook-timestamp", ts.to_string());
                if let Some(key) = &hook.secret {
                    req = req.header("webhook-signature", signature(key, &ev.id, ts, &body));
                }
                body
            }
            WebhookFormat::Slack => json!({ "text": slack_text(ev) }).to_string(),
        };
        // The URL is never told (a Slack webhook's URL is its secret).
        match req.body(body).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
            Err(e) if e.is_timeout() => Err(format!(
                "no answer within {}",
                humantime::format_duration(hook.timeout)
            )),
            Err(e) if e.is_connect() => Err("cannot connect".into()),
            Err(e) => Err(e.without_url().to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks spec's reference libraries.
    #[test]
    fn signs_as_the_standard_webhooks_spec_does() {
        let key = crate::config::notify_signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .expect("key");
        let sig = signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn tries_back_off_to_an_hour() {
        assert_eq!(
            (0..5).map(backoff).collect::<Vec<_>>(),
            vec![1, 2, 4, 8, 16]
        );
        assert_eq!(backoff(12), MAX_BACKOFF);
        assert_eq!(backoff(400), MAX_BACKOFF);
    }

    #[test]
    fn slack_text_escapes_what_slack_reads() {
        let e = Event {
            id: "msg_1".into(),
            kind: "key.expiring".into(),
            timestamp: String::new(),
            data: json!({"tenant": "t", "key_id": "k", "label": "<!channel> & co", "expires_at": "2026-12-08T00:00:00Z"}),
            created: 0,
            pending: Vec::new(),
            lease: None,
            keep_until: 0,
        };
        let t = slack_text(&e);
        assert!(t.contains("&lt;!channel&gt; &amp; co"), "{t}");
    }
}
