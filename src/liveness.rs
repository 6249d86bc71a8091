//! The liveness route, step by step. Each step is a call into the module that owns it; this file
//! only fixes their order, and the order is the point:
//! authenticate and rate-limit before reading the body (a stranger costs nothing), validate
//! before spending a single-use token (a refused request leaves it usable) and before hashing,
//! look up the cache before reserving budget (a hit is free), reserve before the
//! call (no overshoot), and run the call in its own task (a client that leaves cannot cancel a
//! call that may be billed, and its retry finds the answer cached).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::proxy::Session;

use crate::breaker::Health;
use crate::cache::{self, CacheKey, Followed, Lookup};
use crate::config::{PerSubject, TenantKey};
use crate::egress::ProviderAnswer;
use crate::error::GatewayError;
use crate::intake;
use crate::state::{AppState, RequestCtx, Runtime};
use crate::store::{self, BudgetLimits, Hold, Settle, SharedKey, SharedVerdict, Turn};
use crate::tenant::{self, CredentialSource};
use crate::upstream::{self, Charge, Exchange};
use crate::verdict::{self, UpstreamClass};

pub const ROUTE: &str = "/api/v1/backend/liveness/short/";

/// What to send back for a liveness request that was answered (by the provider or the cache):
/// the answer as the egress check wrote it, and the gateway's own headers.
pub struct Reply {
    pub answer: ProviderAnswer,
    pub headers: Vec<(&'static str, String)>,
}

/// Whether a path is the liveness route (the trailing slash is optional).
pub fn is_route(path: &str) -> bool {
    path == ROUTE || path == &ROUTE[..ROUTE.len() - 1]
}

pub async fn handle(
    state: &Arc<AppState>,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<Reply, GatewayError> {
    let mut spent = None;
    let answer = serve(state, session, ctx, &mut spent).await;
    // Refused before an answer: its single-use tokens are usable again by the time the
    // refusal reaches the app.
    if let (Err(_), Some(spent)) = (&answer, spent) {
        spent.give_back().await;
    }
    answer
}

async fn serve(
    state: &Arc<AppState>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    spent: &mut Option<crate::auth::Spent>,
) -> Result<Reply, GatewayError> {
    let rt = state.runtime();
    let intake_cfg = &rt.config.intake;

    // Authenticate and rate-limit before a byte of the body is read, when the key is in a header.
    let headers = &session.req_header().headers;
    let issuers = &rt.issuers;
    let mut tokens: Vec<(Option<http::HeaderName>, String)> =
        crate::auth::header_tokens(headers, issuers)?
            .into_iter()
            .map(|(h, t)| (Some(h), t))
            .collect();
    let static_key = match tenant::header_credential(headers)? {
        Some((key, CredentialSource::Bearer))
            if !issuers.is_empty() && crate::auth::looks_like_jwt(key.as_str()) =>
        {
            tokens.insert(0, (None, key.as_str().to_string()));
            None
        }
        other => other,
    };
    let header_credential = static_key.is_some() || !tokens.is_empty();
    let mut verified_tokens = Vec::new();
    match (&static_key, tokens.is_empty()) {
        // A tenant key beside a token: refused, not merged.
        (Some(_), false) => return Err(GatewayError::MalformedCredentials),
        (None, false) => verified_tokens = admit_tokens(state, &rt, ctx, &tokens).await?,
        (Some((key, source)), true) => admit(&rt, ctx, key, *source).await?,
        // No tenant takes its key from the form: a stranger's body is never read.
        (None, true) if rt.tenants.all_require_header_credentials() => {
            return Err(GatewayError::MissingCredentials)
        }
        (None, true) => {}
    }
    intake::check_content_length(&session.req_header().headers, intake_cfg)?;
    let content_type = session
        .req_header()
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let boundary = intake::boundary(content_type.as_deref())?;
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects_continue {
        // Pingora does not answer `Expect` when the body is read here; the limits above have passed.
        session
            .write_continue_response()
            .await
            .map_err(|_| GatewayError::BodyTimeout)?;
        // Pingora sends no informational answer over HTTP/2.
        ctx.continued = !session.is_http2();
    }

    // The charge keeps the body's room in the byte budget until the request is answered.
    let (form, _charge) = intake::read_form(
        session,
        boundary,
        intake_cfg,
        &state.body_budget,
        header_credential,
    )
    .await?;
    ctx.body_done = true;
    ctx.image_bytes = form.image.bytes.len();

    // Drop-in clients carry the tenant key in the provider's own `api_key` field.
    if !header_credential {
        let key = form
            .api_key
            .as_ref()
            .filter(|k| !k.is_empty())
            .ok_or(GatewayError::MissingCredentials)?;
        admit(&rt, ctx, key, CredentialSource::FormField).await?;
        if rt
            .tenants
            .get(ctx.tenant.as_deref().unwrap_or_default())
            .is_some_and(|t| t.require_header_credentials)
        {
            return Err(GatewayError::HeaderCredentialsRequired);
        }
    }
    let tenant_id = ctx.tenant.clone().ok_or(GatewayError::Internal)?;
    let tenant_cfg = rt.tenants.get(&tenant_id).ok_or(GatewayError::Internal)?;
    let budget = BudgetLimits {
        daily: tenant_cfg.daily_budget,
        monthly: tenant_cfg.monthly_budget,
    };
    // The subject's own daily budget, held and settled with the tenant's.
    let subject_budget = match (&ctx.subject, tenant_cfg.per_subject) {
        (
            Some(name),
            Some(PerSubject {
                daily_budget: Some(n),
                ..
            }),
        ) => Some((name.clone(), n)),
        _ => None,
    };
    let org_keys = tenant_cfg.org_keys.clone();

    let kind = intake::validate_image(&form.image, intake_cfg)?;
    // Admitted for a verdict: its single-use tokens are spent now, and given back if it is
    // refused before an answer (the budget, the breaker, the queue).
    let spent = spent.insert(crate::auth::spend(state, &verified_tokens).await?);
    // Hash only what passed validation; the key's scope keeps tenants apart unless shared.
    let key = state
        .cache
        .enabled()
        .then(|| cache::key(state.cache.scope, &tenant_id, form.image.bytes.digest()));
    if let Some(k) = &key {
        if state.cache.passed_for_another(&tenant_id, &k.digest) {
            state
                .metrics
                .replay_suspected
                .with_label_values(&[&tenant_id])
                .inc();
            tracing::warn!(tenant = %tenant_id, request_id = %ctx.request_id, "an image that passed for another tenant was uploaded again: possible replay");
        }
    }
    let bypass = state.cache.allow_bypass && wants_bypass(&session.req_header().headers);
    // A follower waits as long as its leader can take, so it never gives up on a call that is
    // still running (and may be billed). In a fleet, the leader may first wait out another
    // replica's lock on the image (see `claim`), then call itself.
    let deadline = rt.config.longest_call();
    let follow_for = match state.store.fleet() {
        Some(_) => store::lock_wait(deadline) + deadline,
        None => deadline,
    };

    for _ in 0..3 {
        match state.cache.lookup(key.clone(), bypass).await {
            Lookup::Hit(entry) => {
                // Checked again only when a reload changed the secrets since it was stored; a
                // verdict that now gives one away is dropped, and this request calls anew.
                let entry = match &key {
                    Some(k) => state.cache.current(k, entry, &rt.egress).await,
                    None => Some(entry),
                };
                let Some(entry) = entry else { continue };
                spent.keep();
                ctx.cache = Some("HIT");
                ctx.verdict = Some(entry.verdict.clone());
                ctx.session_id = verdict::session_id(entry.answer.body());
                let mut headers = vec![
                    ("X-Cache", "HIT".to_string()),
                    ("Age", entry.age().as_secs().to_string()),
                ];
                headers.append(&mut ctx.rate_headers);
                return Ok(Reply {
                    answer: entry.answer.clone(),
                    headers,
                });
            }
            Lookup::Follow(follower) => match follower.wait(follow_for).await? {
                Followed::Done(exchange) => {
                    spent.keep();
                    ctx.cache = Some("COALESCED");
                    return reply(state, ctx, &exchange, "COALESCED");
                }
                Followed::Retry => continue,
            },
            Lookup::Lead(leader) => {
                let label = if key.is_some() { "MISS" } else { "BYPASS" };
                ctx.cache = Some(label);
                // A provider that keeps failing is not called: before any budget is reserved.
                let permit = state.breaker.admit()?;
                // The fleet's turn: its cache level, its lock on the image, the budget hold.
                // (Only the fleet names images beyond this process: no key is built without it.)
                let shared = key
                    .as_ref()
                    .filter(|_| !bypass && state.store.fleet().is_some())
                    .map(|k| shared_key(k, rt.config.upstream.fingerprint.clone()));
                state.store.clock_known().await;
                let hold = Hold::new(&tenant_id, budget, shared, state.store.as_ref())
                    .with_subject(subject_budget.clone());
                let claims: Arc<dyn store::Claims> = state.store.clone();
                let reservation = match store::take_turn(claims, hold, &rt.egress, deadline).await?
                {
                    Turn::Call(r) => r,
                    Turn::Answered(exchange, created_ms) => {
                        spent.keep();
                        let age_ms = (state.store.now().timestamp_millis() - created_ms).max(0);
                        let age = Duration::from_millis(u64::try_from(age_ms).unwrap_or(0));
                        let exchange = Arc::new(exchange);
                        leader.finish_aged(exchange.clone(), age).await;
                        ctx.cache = Some("HIT");
                        let mut r = reply(state, ctx, &exchange, "HIT")?;
                        r.headers.push(("Age", age.as_secs().to_string()));
                        return Ok(r);
                    }
                };
                let slot = rt.limits.upstream_slot().await?;
                let upload = Upload {
                    extension: form.image.extension.clone(),
                    kind,
                    image: form.image.bytes.clone(),
                };
                // A fast stop has begun: no new call (its hold is given back on the way out).
                let unsettled = state.unsettled.start().ok_or(GatewayError::Overloaded)?;
                let (task_state, task_rt) = (state.clone(), rt.clone());
                let task = tokio::spawn(async move {
                    let _slot = slot;
                    let _unsettled = unsettled;
                    // A bug below (a panic) must not lose the call's bill: the hold would be
                    // given back while the provider may have billed it. It is counted as
                    // uncertain, the client gets 500.
                    let called = std::panic::AssertUnwindSafe(call_with_keys(
                        &task_state,
                        &task_rt,
                        &org_keys,
                        &upload,
                    ));
                    let (exchange, charge, org_key) = match futures_util::FutureExt::catch_unwind(
                        called,
                    )
                    .await
                    {
                        Ok(done) => done,
                        Err(_) => {
                            tracing::error!(tenant = %reservation.tenant(), "the upstream call failed on a bug; the call is counted as uncertain");
                            let exchange = Exchange {
                                outcome: Err(GatewayError::Internal),
                                class: UpstreamClass::InvalidResponse,
                                upstream_status: None,
                                verdict: None,
                                session_id: None,
                                upstream_ms: 0,
                            };
                            let key = org_keys.first().cloned().unwrap_or_default();
                            (exchange, Charge::Uncertain, key)
                        }
                    };
                    let exchange = Arc::new(exchange);
                    let share = cache::shareable(&exchange).map(|(answer, verdict)| {
                        let created_ms = task_state.store.now().timestamp_millis();
                        let v = SharedVerdict::of(answer, created_ms);
                        (v, task_state.cache.ttl_for(verdict))
                    });
                    let m = &task_state.metrics;
                    let how = match charge {
                        Charge::Free => Settle::Release,
                        Charge::Billed | Charge::Uncertain => {
                            m.billable_calls
                                .with_label_values(&[reservation.tenant()])
                                .inc();
                            let uncertain = charge == Charge::Uncertain;
                            if uncertain {
                                m.upstream_uncertain.with_label_values(&[&org_key]).inc();
                            }
                            Settle::Commit {
                                org_key: org_key.clone(),
                                uncertain,
                            }
                        }
                    };
                    reservation
                        .settle(how, share.as_ref().map(|(v, ttl)| (v, *ttl)))
                        .await;
                    // With several keys, a refused subscription is one key's lapse (see
                    // `keys`), not the provider's failure: other tenants' keys still work.
                    let several = task_rt.config.upstream.keys.keys.len() > 1;
                    permit.record(if several && exchange.class.is_subscription_error() {
                        Health::Up
                    } else {
                        Health::of(exchange.class)
                    });
                    leader.finish(exchange.clone()).await;
                    (exchange, org_key, charge)
                });
                // The call is under way (and may be billed): the tokens paid for it.
                spent.keep();
                let (exchange, org_key, charge) = task.await.map_err(|_| GatewayError::Internal)?;
                ctx.upstream_called = true;
                ctx.org_key = Some(org_key);
                ctx.billing = Some(charge.as_str());
                return reply(state, ctx, &exchange, label);
            }
        }
    }
    Err(GatewayError::Overloaded)
}

/// A cache key as the fleet names it.
fn shared_key(k: &CacheKey, upstream: String) -> SharedKey {
    SharedKey {
        tenant: (&*k.scope != cache::SHARED_SCOPE).then(|| k.scope.to_string()),
        digest_hex: hex::encode(k.digest),
        upstream,
    }
}

/// Authenticate a credential, record the tenant, and take one request from its rate limit.
async fn admit(
    rt: &Runtime,
    ctx: &mut RequestCtx,
    key: &TenantKey,
    source: CredentialSource,
) -> Result<(), GatewayError> {
    let t = rt.tenants.authenticate(key)?;
    // From now on the egress check finds this key anywhere in an answer, not only as a token.
    rt.egress.learn(key);
    ctx.tenant = Some(t.id.clone());
    ctx.credential = Some(source);
    if !t.allow_static_keys {
        return Err(GatewayError::StaticKeysDisabled);
    }
    admit_tenant(rt, ctx, t).await
}

/// Verify the request's app tokens (one per header), record their tenant and subject, and take
/// one request from their limits. Every token must act for the same tenant, and the tenant's
/// `require_tokens` must all be there; the subject is its first required issuer's, else the
/// `Authorization` token's. Returns the verified tokens (single-use ones are spent later, once
/// the request is admitted for a verdict).
async fn admit_tokens(
    state: &AppState,
    rt: &Runtime,
    ctx: &mut RequestCtx,
    tokens: &[(Option<http::HeaderName>, String)],
) -> Result<Vec<crate::auth::Verified>, GatewayError> {
    let mut verified = Vec::with_capacity(tokens.len());
    for (header, token) in tokens {
        verified.push(crate::auth::admit_token(state, &rt.issuers, header.as_ref(), token).await?);
    }
    let first = verified.first().ok_or(GatewayError::Internal)?;
    if verified.iter().any(|v| v.tenant != first.tenant) {
        return Err(GatewayError::MalformedCredentials);
    }
    let t = rt
        .tenants
        .get(&first.tenant)
        .ok_or(GatewayError::Internal)?;
    ctx.tenant = Some(t.id.clone());
    ctx.credential = Some(CredentialSource::Token);
    if t.disabled {
        return Err(GatewayError::TenantDisabled);
    }
    if let Some(missing) = t
        .require_tokens
        .iter()
        .find(|id| !verified.iter().any(|v| &v.issuer == *id))
    {
        return Err(GatewayError::TokenRequired {
            issuer: missing.clone(),
        });
    }
    let named = t
        .require_tokens
        .first()
        .and_then(|id| verified.iter().find(|v| &v.issuer == id))
        .unwrap_or(first);
    ctx.subject = Some(
        rt.config
            .subject_hash_key
            .name(&named.issuer, &named.subject),
    );
    admit_tenant(rt, ctx, t).await?;
    Ok(verified)
}

/// The checks every authenticated request goes through: its web origin, its rate limit.
async fn admit_tenant(
    rt: &Runtime,
    ctx: &mut RequestCtx,
    t: &crate::config::TenantConfig,
) -> Result<(), GatewayError> {
    if !ctx.cors.permits(&t.allowed_origins) {
        return Err(GatewayError::OriginNotAllowed);
    }
    // A user over their own rate is refused before the tenant's shared quota is touched.
    if let Some(subject) = &ctx.subject {
        rt.limits.check_subject(&t.id, subject).await?;
    }
    match rt.limits.check_tenant_shared(&t.id).await {
        Ok(state) => {
            ctx.rate_headers = state.headers().into_iter().collect();
            Ok(())
        }
        Err((err, state)) => {
            ctx.rate_headers = state.headers().into_iter().collect();
            Err(err)
        }
    }
}

fn wants_bypass(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',').any(|d| {
                let d = d.trim();
                d.eq_ignore_ascii_case("no-cache") || d.eq_ignore_ascii_case("no-store")
            })
        })
}

/// What goes to the provider, whichever organization key it goes with.
struct Upload {
    extension: String,
    kind: crate::image::ImageKind,
    image: crate::image::ImageBytes,
}

/// The call with the tenant's organization keys: its own, then, after a refusal of that key's
/// subscription, each fallback in turn (one key is never used twice for one upload). A tenant
/// with fallbacks skips a lapsed key, but for one probe per `upstream.key_probe_interval`; the
/// last key of the chain is tried when no other was. Returns the exchange, its charge (a
/// refused subscription is never billed, so an upload is billed at most once), and the id of
/// the key of the exchange.
async fn call_with_keys(
    state: &AppState,
    rt: &Runtime,
    chain: &[String],
    upload: &Upload,
) -> (Exchange, Charge, String) {
    let keys = &rt.config.upstream.keys;
    let interval = rt.config.upstream.key_probe_interval;
    // Every tenant has a chain of known keys (checked when the config was loaded); were one
    // empty or unknown, no call would go out and the request would end in an internal error.
    // Every key of the chain within one `total_timeout`: the followers' wait, the fleet's lock and
    // the shutdown grace are sized for one call. A fallback starts only with half of it left, so
    // that it is not cut off after its request was sent (and billed without an answer).
    let total = rt.upstream.total_timeout();
    let deadline = Instant::now() + total;
    let mut refused: Option<(Exchange, Charge, String)> = None;
    for (i, id) in chain.iter().enumerate() {
        if refused.is_some() && deadline.saturating_duration_since(Instant::now()) < total / 2 {
            break;
        }
        let last = i + 1 == chain.len();
        let must_try = last && refused.is_none();
        if chain.len() > 1 && !must_try && !state.org_keys.usable(id, interval) {
            continue;
        }
        let Some(named) = keys.get(id) else {
            break;
        };
        if let Some((_, _, from)) = &refused {
            // The upload goes again, with this key, because `from` was refused.
            state
                .metrics
                .org_key_failovers
                .with_label_values(&[from])
                .inc();
        }
        let body = upstream::build_body(&named.key, &upload.extension, upload.kind, &upload.image);
        let (exchange, charge) = upstream::call(
            &rt.upstream,
            &rt.egress,
            &state.metrics,
            &body,
            &named.id,
            deadline,
        )
        .await;
        if exchange.class.is_subscription_error() {
            state.org_keys.mark_lapsed(&named.id, interval);
            if !last {
                refused = Some((exchange, charge, named.id.clone()));
                continue;
            }
        } else if exchange.upstream_status.is_some() {
            state.org_keys.mark_working(&named.id);
        }
        return (exchange, charge, named.id.clone());
    }
    refused.unwrap_or_else(|| (Exchange::none(), Charge::Free, String::new()))
}

/// The reply for an exchange. Its answer was checked against the secrets of the config the call
/// began under; it leaves checked against those in force now (a comparison, unless a reload
/// changed them meanwhile).
fn reply(
    state: &AppState,
    ctx: &mut RequestCtx,
    exchange: &Exchange,
    cache_label: &'static str,
) -> Result<Reply, GatewayError> {
    ctx.upstream_status = exchange.upstream_status;
    ctx.upstream_class = Some(exchange.class);
    ctx.upstream_ms = Some(exchange.upstream_ms);
    ctx.verdict = exchange.verdict.clone();
    let answer = exchange.outcome.clone()?;
    let answer = state.runtime().egress.recheck(&answer)?.unwrap_or(answer);
    ctx.session_id = exchange.session_id.clone();
    let mut headers = vec![("X-Cache", cache_label.to_string())];
    headers.append(&mut ctx.rate_headers);
    Ok(Reply { answer, headers })
}
