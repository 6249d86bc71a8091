//! The liveness route, step by step. Each step is a call into the module that owns it; this file
//! only fixes their order, and the order is the point:
//! authenticate and rate-limit before reading the body (a stranger costs nothing), validate
//! before spending a single-use token (a refused request leaves it usable) and before hashing,
//! look up the cache before reserving budget (a hit is free), reserve before the
//! call (no overshoot), and run the call in its own task (a client that leaves cannot cancel a
//! call that may be billed, and its retry finds the answer cached).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pingora::proxy::Session;

use crate::auth::tenant::{self, CredentialSource};
use crate::breaker::Health;
use crate::cache::{self, CacheKey, Followed, Lookup};
use crate::config::{FaceMode, TenantKey};
use crate::egress::ProviderAnswer;
use crate::error::GatewayError;
use crate::image::ImageBytes;
use crate::intake;
use crate::keys::{self, Upload};
use crate::receipt;
use crate::state::{AppState, RequestCtx, Runtime};
use crate::store::{self, BudgetLimits, Hold, Settle, SharedKey, SharedVerdict, SubjectHold, Turn};
use crate::upstream::{Charge, Exchange};
use crate::verdict::{self, UpstreamClass};

pub const ROUTE: &str = "/api/v1/backend/liveness/short/";

/// What to send back for a liveness request that was answered (by the provider or the cache):
/// the answer as the egress check wrote it, and the gateway's own headers.
pub struct Reply {
    pub answer: ProviderAnswer,
    pub headers: Vec<(&'static str, String)>,
}

/// A step of the route, noted in the request's trace (when `[tracing]` is set) as a span from
/// its start to its end, failed or not: `step!(ctx, "name", future)` is the future's result.
macro_rules! step {
    ($ctx:expr, $name:literal, $fut:expr) => {{
        // Only a trace that is kept notes its steps (an unsampled one costs no clock reads).
        let start = $ctx
            .trace
            .as_ref()
            .filter(|t| t.sampled)
            .map(|_| std::time::SystemTime::now());
        let result = $fut.await;
        if let (Some(t), Some(start)) = ($ctx.trace.as_mut(), start) {
            t.step($name, start, result.is_err());
        }
        result
    }};
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
    let mut attempt = Attempt::default();
    let answer = serve(state, session, ctx, &mut spent, &mut attempt).await;
    // Refused before an answer: its single-use tokens are usable again by the time the
    // refusal reaches the app.
    if let (Err(_), Some(spent)) = (&answer, spent) {
        spent.give_back().await;
    }
    let mut reply = answer?;
    watch_replay(state, ctx, &mut attempt);
    sign(state, ctx, &attempt, &mut reply);
    Ok(reply)
}

/// After the answer: a pass made by another party's call (another tenant's, or with `cache.scope
/// = "subject"` another user's), one this request joined or one another replica had, is the
/// same replay signal as a cache hit of one (`look_up`), which only sees the passes this
/// process knew of before the request. Counted once a request.
fn watch_replay(state: &AppState, ctx: &RequestCtx, attempt: &mut Attempt) {
    let (Some(owner), Some(image), Some(v)) = (&attempt.owner, &attempt.image, &ctx.answer.verdict)
    else {
        return;
    };
    if v.result && !attempt.replay_suspected && state.cache.passed_for_another(owner, image) {
        attempt.replay_suspected = true;
        note_replay(state, ctx);
    }
}

/// Count and log an image that passed for another tenant or user, uploaded again.
fn note_replay(state: &AppState, ctx: &RequestCtx) {
    let tenant = ctx.caller.tenant.as_deref().unwrap_or_default();
    state
        .metrics
        .replay_suspected
        .with_label_values(&[tenant])
        .inc();
    tracing::warn!(tenant = %tenant, subject = ctx.caller.subject.as_deref().unwrap_or("-"), request_id = %ctx.request_id, "an image that passed for another tenant or user was uploaded again: possible replay");
}

/// What a receipt says of this attempt beyond the answer, as the steps learn it: the nonce the
/// backend issued for it, the app token's subject (as the token names it), the image's digest,
/// and whether the image passed for another party (`owner`: the tenant, or the tenant and its
/// user, as `cache::CacheKey::owner`).
#[derive(Default)]
struct Attempt {
    nonce: Option<String>,
    subject: Option<String>,
    image: Option<[u8; 32]>,
    owner: Option<Arc<str>>,
    replay_suspected: bool,
}

/// The last step: an answer that carries a verdict (a miss or a hit) gets a signed receipt.
fn sign(state: &AppState, ctx: &RequestCtx, attempt: &Attempt, reply: &mut Reply) {
    let rt = state.runtime();
    let (Some(receipts), Some(_), Some(tenant), Some(image)) = (
        &rt.receipts,
        &ctx.answer.verdict,
        &ctx.caller.tenant,
        &attempt.image,
    ) else {
        return;
    };
    let image = format!("blake3:{}", hex::encode(image));
    let facts = receipt::Facts {
        tenant,
        subject: attempt.subject.as_deref(),
        request_id: &ctx.request_id,
        answer: reply.answer.body(),
        image: &image,
        hit: !ctx.call.led,
        replay_suspected: attempt.replay_suspected,
        nonce: attempt.nonce.as_deref(),
        face: ctx.upload.face.filter(|_| ctx.call.led),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match receipts.sign(&facts, now) {
        Some(jws) => reply.headers.push((receipt::HEADER, jws)),
        None => tracing::error!(request_id = %ctx.request_id, "a receipt could not be signed"),
    }
}

/// The route, as the steps a request meets in turn (the diagram in docs/architecture.md): admit,
/// read the upload, validate, look up, lead the call and settle it.
async fn serve(
    state: &Arc<AppState>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    spent: &mut Option<crate::auth::Spent>,
    attempt: &mut Attempt,
) -> Result<Reply, GatewayError> {
    let rt = state.runtime();
    let admitted = admit_by_headers(state, &rt, session, ctx, attempt).await?;
    let in_header = admitted.in_header;
    let form = step!(
        ctx,
        "read_upload",
        read_upload(state, &rt, session, ctx, in_header)
    )?;
    let call = step!(
        ctx,
        "validate",
        validate(state, &rt, ctx, &form, in_header, attempt)
    )?;
    // Admitted for a verdict: its single-use tokens are spent now, and given back if it is
    // refused before an answer (the budget, the breaker, the queue).
    let replays: Arc<dyn store::Replays> = state.store.clone();
    let spent = spent.insert(crate::auth::spend(replays, &admitted.tokens).await?);
    let look = look_up(state, &rt, session, ctx, &call, attempt);
    for _ in 0..3 {
        let found = step!(ctx, "cache_lookup", async {
            Ok::<_, GatewayError>(state.cache.lookup(look.key.clone(), look.bypass).await)
        })?;
        match found {
            Lookup::Hit(entry) => {
                // Checked again only when a reload changed the secrets since it was stored; a
                // verdict that now gives one away is dropped, and this request calls anew.
                let entry = match &look.key {
                    Some(k) => state.cache.current(k, entry, &rt.egress).await,
                    None => Some(entry),
                };
                let Some(entry) = entry else { continue };
                spent.keep();
                return Ok(hit(ctx, &entry));
            }
            Lookup::Follow(follower) => {
                match step!(ctx, "wait_for_leader", follower.wait(look.follow_for))? {
                    Followed::Done(exchange) => {
                        spent.keep();
                        ctx.answer.cache = Some("COALESCED");
                        return reply(state, ctx, &exchange, "COALESCED");
                    }
                    Followed::Retry => continue,
                }
            }
            Lookup::Lead(leader) => return lead(state, &rt, ctx, spent, leader, &look, call).await,
        }
    }
    Err(GatewayError::Overloaded(crate::error::Busy::Upstream))
}

/// What the headers admitted: the verified app tokens (spent once the request is admitted for
/// a verdict), and whether the credential was in a header at all.
struct Admitted {
    tokens: Vec<crate::auth::Verified>,
    in_header: bool,
}

/// Step 1, admit: authenticate and rate-limit before a byte of the body is read, when the
/// credential is in a header (a tenant key, or app tokens, never both).
async fn admit_by_headers(
    state: &AppState,
    rt: &Runtime,
    session: &Session,
    ctx: &mut RequestCtx,
    attempt: &mut Attempt,
) -> Result<Admitted, GatewayError> {
    let headers = &session.req_header().headers;
    attempt.nonce = receipt::nonce_header(headers)?;
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
    let in_header = static_key.is_some() || !tokens.is_empty();
    let tokens = match (&static_key, tokens.is_empty()) {
        // A tenant key beside a token: refused, not merged.
        (Some(_), false) => return Err(GatewayError::MalformedCredentials),
        (None, false) => admit_tokens(state, rt, ctx, &tokens, attempt).await?,
        (Some((key, source)), true) => {
            admit(state, rt, ctx, key, *source).await?;
            Vec::new()
        }
        // No tenant takes its key from the form: a stranger's body is never read.
        (None, true) if rt.tenants.all_require_header_credentials() => {
            return Err(GatewayError::MissingCredentials)
        }
        (None, true) => Vec::new(),
    };
    Ok(Admitted { tokens, in_header })
}

/// Step 2, read the upload: its declared length and type first, then the form, within the
/// body's limits (size, time, and the room in the byte budget).
async fn read_upload(
    state: &AppState,
    rt: &Runtime,
    session: &mut Session,
    ctx: &mut RequestCtx,
    authenticated: bool,
) -> Result<intake::Form, GatewayError> {
    let intake_cfg = &rt.config.intake;
    let headers = &session.req_header().headers;
    intake::check_content_length(headers, intake_cfg)?;
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let boundary = intake::boundary(content_type)?;
    let expects_continue = headers
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
        ctx.upload.continued = !session.is_http2();
    }
    // The charge keeps the body's room in the byte budget until the request is answered.
    let (form, _charge) = intake::read_form(
        session,
        boundary,
        intake_cfg,
        &state.body_budget,
        authenticated,
    )
    .await?;
    ctx.upload.done = true;
    ctx.upload.bytes = form.image.bytes.len();
    Ok(form)
}

/// What an admitted, valid upload may spend, and on what.
struct Call {
    tenant: String,
    budget: BudgetLimits,
    /// The subject's part (its daily budget, its failed attempts), held and settled with the
    /// tenant's.
    subject: Option<SubjectHold>,
    org_keys: Vec<String>,
    /// The digest of the image as the client sent it: the cache key, and the receipt's.
    digest: [u8; 32],
    /// The image as the client sent it; the provider gets it as a JPEG or a PNG without its
    /// metadata (`prepared`).
    upload: Upload,
    /// The tenant's face check (`tenants[].face_mode`, or `intake.face.mode`).
    face_mode: FaceMode,
}

impl Call {
    /// The call as it goes out: a photo in a format the provider does not take converted to
    /// JPEG (`intake.convert`, see `crate::convert`), and the image without the metadata the
    /// check does not need (`intake.strip_metadata`, see `image::without_metadata`). Only a
    /// call that goes out pays for it; the cache key and the receipt keep the client's digest.
    async fn prepared(mut self, state: &AppState, rt: &Runtime) -> Result<Call, GatewayError> {
        let upload = &mut self.upload;
        let converted = state
            .converter
            .to_jpeg(upload.kind, &upload.image, &state.metrics)
            .await?;
        if let Some(jpeg) = converted {
            upload.extension = ".jpg".into();
            upload.kind = crate::image::ImageKind::Jpeg;
            upload.image = jpeg;
        } else if rt.config.intake.strip_metadata {
            if let Some(v) = crate::image::without_metadata(upload.kind, upload.image.bytes()) {
                upload.image = ImageBytes::new(v.into());
            }
        }
        Ok(self)
    }

    /// The face check (`intake.face`, see `crate::face`), noted for the access line, the
    /// metric and the receipt; `enforce` refuses a photo without exactly one large enough face.
    async fn face_check(&self, state: &AppState, ctx: &mut RequestCtx) -> Result<(), GatewayError> {
        let upload = &self.upload;
        let (outcome, verdict) = state
            .faces
            .check(
                self.face_mode,
                upload.kind,
                &upload.image,
                &self.tenant,
                &state.metrics,
            )
            .await;
        ctx.upload.face = outcome.map(crate::face::Outcome::as_str);
        verdict
    }
}

/// Step 3, validate: the drop-in credential of the form when the headers had none, then the
/// image (size, magic bytes, dimensions, truncation).
async fn validate(
    state: &AppState,
    rt: &Runtime,
    ctx: &mut RequestCtx,
    form: &intake::Form,
    in_header: bool,
    attempt: &mut Attempt,
) -> Result<Call, GatewayError> {
    receipt::join_nonce(&mut attempt.nonce, form.nonce.as_deref())?;
    // Drop-in clients carry the tenant key in the provider's own `api_key` field.
    if !in_header {
        let key = form
            .api_key
            .as_ref()
            .filter(|k| !k.is_empty())
            .ok_or(GatewayError::MissingCredentials)?;
        admit(state, rt, ctx, key, CredentialSource::FormField).await?;
        if rt
            .tenants
            .get(ctx.caller.tenant.as_deref().unwrap_or_default())
            .is_some_and(|t| t.require_header_credentials)
        {
            return Err(GatewayError::HeaderCredentialsRequired);
        }
    }
    let tenant = ctx.caller.tenant.clone().ok_or(GatewayError::Internal)?;
    let t = rt.tenants.get(&tenant).ok_or(GatewayError::Internal)?;
    let subject = match (&ctx.caller.subject, t.per_subject) {
        (Some(name), Some(p)) if p.holds() => Some(SubjectHold {
            name: name.clone(),
            daily_budget: p.daily_budget,
            max_failed: p.max_failed_attempts,
        }),
        _ => None,
    };
    let kind = intake::validate_image(&form.image, &rt.config.intake)?;
    Ok(Call {
        // With the calls granted for now (`POST /admin/usage/grant`).
        budget: state.issued.budget(t),
        subject,
        org_keys: t.org_keys.clone(),
        digest: form.image.bytes.digest(),
        upload: Upload {
            extension: crate::image::provider_extension(kind, &form.image.extension),
            kind,
            image: form.image.bytes.clone(),
            trace: None,
        },
        face_mode: t.face_mode.unwrap_or(rt.config.intake.face.mode),
        tenant,
    })
}

/// Where the lookup looks: the cache key (none when the cache is off), whether the client asked
/// to bypass it, and how long a follower waits for its leader.
struct Look {
    key: Option<CacheKey>,
    bypass: bool,
    follow_for: Duration,
}

/// Step 4, look up: hash only what passed validation (the key's scope keeps tenants, or users,
/// apart unless shared), and note an image that passed for another tenant or user.
fn look_up(
    state: &AppState,
    rt: &Runtime,
    session: &Session,
    ctx: &RequestCtx,
    call: &Call,
    attempt: &mut Attempt,
) -> Look {
    let subject = ctx.caller.subject.as_deref();
    let key = state
        .cache
        .enabled()
        .then(|| cache::key(state.cache.scope, &call.tenant, subject, call.digest));
    attempt.image = Some(call.digest);
    if let Some(k) = &key {
        attempt.owner = Some(k.owner.clone());
        if state.cache.passed_for_another(&k.owner, &k.digest) {
            attempt.replay_suspected = true;
            note_replay(state, ctx);
        }
    }
    // A follower waits as long as its leader can take, so it never gives up on a call that is
    // still running (and may be billed). In a fleet, the leader may first wait out another
    // replica's lock on the image (see `store::take_turn`), then call itself.
    let deadline = rt.config.longest_lead();
    Look {
        key,
        bypass: state.cache.allow_bypass && wants_bypass(&session.req_header().headers),
        follow_for: match state.store.fleet() {
            Some(_) => store::lock_wait(deadline) + deadline,
            None => deadline,
        },
    }
}

/// A verdict from this process's cache.
fn hit(ctx: &mut RequestCtx, entry: &cache::CachedVerdict) -> Reply {
    ctx.answer.cache = Some("HIT");
    ctx.answer.verdict = Some(entry.verdict.clone());
    ctx.answer.session_id = verdict::session_id(entry.answer.body());
    let mut headers = vec![
        ("X-Cache", "HIT".to_string()),
        ("Age", entry.age().as_secs().to_string()),
    ];
    headers.append(&mut ctx.answer.rate_headers);
    Reply {
        answer: entry.answer.clone(),
        headers,
    }
}

/// Step 5, lead the call: past the breaker, take the store's turn (the budget hold and, in a
/// fleet, the image's lock, or the verdict another replica has), prepare the photo for the
/// provider (converted, its metadata gone), wait for an upstream slot, and
/// run the call and its settlement in their own task (a client that leaves cannot cancel a call
/// that may be billed, and its retry finds the answer cached).
async fn lead(
    state: &Arc<AppState>,
    rt: &Arc<Runtime>,
    ctx: &mut RequestCtx,
    spent: &mut crate::auth::Spent,
    leader: cache::Leader,
    look: &Look,
    call: Call,
) -> Result<Reply, GatewayError> {
    let label = if look.key.is_some() { "MISS" } else { "BYPASS" };
    ctx.answer.cache = Some(label);
    // A photo without a face costs nothing: checked before the breaker and the budget hold (a
    // phone's HEIC or WebP once converted, below, its hold given back if it is refused).
    let checks = call.face_mode != FaceMode::Off;
    let converts = call.upload.kind.converted_from().is_some();
    if checks && !converts {
        step!(ctx, "face_check", call.face_check(state, ctx))?;
    }
    // A provider that keeps failing is not called: before any budget is reserved.
    let permit = state.breaker.admit()?;
    // (Only the fleet names images beyond this process: no shared key is built without it.)
    let shared = look
        .key
        .as_ref()
        .filter(|_| !look.bypass && state.store.fleet().is_some())
        .map(|k| shared_key(k, rt.config.upstream.fingerprint.clone()));
    state.store.clock_known().await;
    let hold = Hold::new(&call.tenant, call.budget, shared, state.store.as_ref())
        .with_subject(call.subject.clone());
    let claims: Arc<dyn store::Claims> = state.store.clone();
    let longest = rt.config.longest_lead();
    let turn = step!(
        ctx,
        "budget_claim",
        store::take_turn(claims, hold, &rt.egress, longest)
    )?;
    let reservation = match turn {
        Turn::Call(r) => r,
        Turn::Answered(exchange, origin) => {
            spent.keep();
            return answered_elsewhere(state, ctx, leader, exchange, origin).await;
        }
    };
    // Only a call that goes out pays for its photo's preparation: past the breaker and with
    // its budget held (a failed conversion gives the hold back as the reservation drops).
    let mut call = step!(ctx, "prepare_photo", call.prepared(state, rt))?;
    if checks && converts {
        step!(ctx, "face_check", call.face_check(state, ctx))?;
    }
    let slot = step!(ctx, "upstream_slot", rt.limits.upstream_slot())?;
    // A fast stop has begun: no new call (its hold is given back on the way out).
    let unsettled = state
        .unsettled
        .start()
        .ok_or(GatewayError::Overloaded(crate::error::Busy::Upstream))?;
    // The provider is sent the call's own span as its parent, and the client's trace state
    // unless it holds a secret (the caller's key is known to the egress check by now).
    let call_span = state
        .tracer
        .as_ref()
        .zip(ctx.trace.as_mut())
        .map(|(tracer, t)| {
            t.screen_state(|b| rt.egress.holds_secret(b));
            let id = tracer.span_id();
            call.upload.trace = Some((t.traceparent_of(id), t.tracestate()));
            id
        });
    let (task_state, task_rt) = (state.clone(), rt.clone());
    let owner = look.key.as_ref().map(|k| k.owner.clone());
    let serving = crate::trace::current_request();
    // The call's times are only for a kept trace's spans: an unkept one reads no clock.
    let kept = ctx.trace.as_ref().is_some_and(|t| t.sampled);
    let clock = move || kept.then(SystemTime::now);
    let task = tokio::spawn(crate::trace::in_request(serving, async move {
        let _held = (slot, unsettled);
        let called_at = clock();
        let (exchange, charge, org_key) =
            call_guarded(&task_state, &task_rt, &call, reservation.tenant()).await;
        let settle_at = clock();
        let exchange = Arc::new(exchange);
        let paid = Paid {
            charge,
            org_key: &org_key,
            owner: owner.as_deref(),
        };
        settle(&task_state, reservation, &exchange, paid).await;
        permit.record(health(&task_rt, &exchange));
        leader.finish(exchange.clone()).await;
        let times = [called_at, settle_at, clock()];
        (exchange, org_key, charge, times)
    }));
    // The call is under way (and may be billed): the tokens paid for it.
    spent.keep();
    let (exchange, org_key, charge, times) = task.await.map_err(|_| GatewayError::Internal)?;
    if let (Some(t), Some(id), [Some(called), Some(sent), Some(settled)]) =
        (ctx.trace.as_mut(), call_span, times)
    {
        let took = sent.duration_since(called).unwrap_or_default();
        let (trace, span) = (t.trace_id.to_bytes(), id.to_bytes());
        state
            .metrics
            .upstream_exemplar(took.as_secs_f64(), trace, span);
        t.span(provider_span(
            rt,
            &exchange,
            &org_key,
            id,
            [called, sent, settled],
        ));
        t.step_between("settle", sent, settled);
    }
    ctx.call.led = true;
    ctx.call.org_key = Some(org_key);
    ctx.call.billing = Some(charge.as_str());
    reply(state, ctx, &exchange, label)
}

/// The provider call as a client span (`times`: its start, its end).
fn provider_span(
    rt: &Runtime,
    exchange: &Exchange,
    org_key: &str,
    id: opentelemetry::trace::SpanId,
    times: [SystemTime; 3],
) -> crate::trace::Span {
    use crate::trace::Attribute;
    let u = &rt.config.upstream;
    let mut attributes = vec![
        Attribute::str("http.request.method", "POST"),
        Attribute::str("server.address", u.host.clone()),
        Attribute::int("server.port", i64::from(u.port)),
        Attribute::str("url.path", u.path.clone()),
        Attribute::str("liveness.org_key", org_key.to_string()),
        Attribute::str("liveness.upstream_class", exchange.class.as_str()),
        Attribute::int("http.request.body.size", exchange.sent_bytes as i64),
        Attribute::int("http.response.body.size", exchange.received_bytes as i64),
    ];
    if let Some(status) = exchange.upstream_status {
        attributes.push(Attribute::int(
            "http.response.status_code",
            i64::from(status),
        ));
    }
    crate::trace::Span {
        name: "provider_call",
        kind: opentelemetry::trace::SpanKind::Client,
        id,
        start: times[0],
        end: times[1],
        attributes,
        error: exchange.outcome.is_err(),
    }
}

/// Another replica answered this image while this one waited for its lock.
async fn answered_elsewhere(
    state: &AppState,
    ctx: &mut RequestCtx,
    leader: cache::Leader,
    exchange: Exchange,
    origin: store::Origin,
) -> Result<Reply, GatewayError> {
    let age_ms = (state.store.now().timestamp_millis() - origin.created_ms).max(0);
    let age = Duration::from_millis(u64::try_from(age_ms).unwrap_or(0));
    let exchange = Arc::new(exchange);
    leader
        .finish_aged(exchange.clone(), age, origin.owner.as_deref())
        .await;
    ctx.answer.cache = Some("HIT");
    let mut r = reply(state, ctx, &exchange, "HIT")?;
    r.headers.push(("Age", age.as_secs().to_string()));
    Ok(r)
}

/// The call with the tenant's organization keys. A bug below (a panic) must not lose the call's
/// bill: the hold would be given back while the provider may have billed it. It is counted as
/// uncertain, and the client gets 500.
async fn call_guarded(
    state: &AppState,
    rt: &Runtime,
    call: &Call,
    tenant: &str,
) -> (Exchange, Charge, String) {
    let called = std::panic::AssertUnwindSafe(keys::call_with_keys(
        &state.org_keys,
        &rt.config.upstream,
        &rt.upstream,
        &rt.egress,
        &state.metrics,
        &call.org_keys,
        &call.upload,
    ));
    match futures_util::FutureExt::catch_unwind(called).await {
        Ok(done) => done,
        Err(_) => {
            tracing::error!(tenant = %tenant, "the upstream call failed on a bug; the call is counted as uncertain");
            let exchange = Exchange {
                outcome: Err(GatewayError::Internal),
                class: UpstreamClass::InvalidResponse,
                upstream_status: None,
                verdict: None,
                session_id: None,
                upstream_ms: 0,
                sent_bytes: 0,
                received_bytes: 0,
            };
            let key = call.org_keys.first().cloned().unwrap_or_default();
            (exchange, Charge::Uncertain, key)
        }
    }
}

/// How a call went out and for whom: the billing rule's charge, the organization key's id,
/// and the party the verdict is remembered for (`cache::CacheKey::owner`; the tenant when the
/// cache is off).
struct Paid<'a> {
    charge: Charge,
    org_key: &'a str,
    owner: Option<&'a str>,
}

/// Step 6, settle: by the billing rule's charge, commit the hold (counted, and apart when
/// uncertain; a failed attempt when the verdict is a fail) or give it back; share a final
/// verdict with the fleet.
async fn settle(
    state: &AppState,
    reservation: store::Reservation,
    exchange: &Exchange,
    paid: Paid<'_>,
) {
    let Paid {
        charge,
        org_key,
        owner,
    } = paid;
    let share = cache::shareable(exchange).map(|(answer, verdict)| {
        let created_ms = state.store.now().timestamp_millis();
        let owner = owner.unwrap_or(reservation.tenant());
        let v = SharedVerdict::of(answer, created_ms, owner);
        (v, state.cache.ttl_for(verdict))
    });
    let m = &state.metrics;
    let how = match charge {
        Charge::Free => Settle::Release,
        Charge::Billed | Charge::Uncertain => {
            m.billable_calls
                .with_label_values(&[reservation.tenant()])
                .inc();
            let uncertain = charge == Charge::Uncertain;
            if uncertain {
                m.upstream_uncertain.with_label_values(&[org_key]).inc();
            }
            Settle::Commit {
                org_key: org_key.to_string(),
                uncertain,
                // A fail the provider judged: one of the subject's failed attempts.
                failed: exchange
                    .verdict
                    .as_ref()
                    .is_some_and(|v| !v.result && v.is_final()),
            }
        }
    };
    reservation
        .settle(how, share.as_ref().map(|(v, ttl)| (v, *ttl)))
        .await;
}

/// What the call tells the breaker. With several keys, a refused subscription is one key's
/// lapse (see `keys`), not the provider's failure: other tenants' keys still work.
fn health(rt: &Runtime, exchange: &Exchange) -> Health {
    let several = rt.config.upstream.keys.keys.len() > 1;
    if several && exchange.class.is_subscription_error() {
        Health::Up
    } else {
        Health::of(exchange.class)
    }
}

/// A cache key as the fleet names it: a user's entries (`scope = "subject"`) among their
/// tenant's, named by the user's hash and the image's digest.
fn shared_key(k: &CacheKey, upstream: String) -> SharedKey {
    let digest = hex::encode(k.digest);
    SharedKey {
        tenant: (&*k.scope != cache::SHARED_SCOPE).then(|| k.scope.to_string()),
        digest_hex: match &k.subject {
            Some(s) => format!("{s}.{digest}"),
            None => digest,
        },
        upstream,
    }
}

/// Authenticate a credential, record the tenant, and take one request from its rate limit.
async fn admit(
    state: &AppState,
    rt: &Runtime,
    ctx: &mut RequestCtx,
    key: &TenantKey,
    source: CredentialSource,
) -> Result<(), GatewayError> {
    let t = rt.tenants.authenticate(&state.issued, key)?;
    // From now on the egress check finds this key anywhere in an answer, not only as a token.
    rt.egress.learn(key);
    ctx.caller.tenant = Some(t.id.clone());
    ctx.caller.credential = Some(source);
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
    attempt: &mut Attempt,
) -> Result<Vec<crate::auth::Verified>, GatewayError> {
    let mut verified = Vec::with_capacity(tokens.len());
    for (header, token) in tokens {
        let v = crate::auth::admit_token(
            &state.verified_tokens,
            &state.http,
            &state.metrics,
            &rt.issuers,
            header.as_ref(),
            token,
        )
        .await?;
        verified.push(v);
    }
    let first = verified.first().ok_or(GatewayError::Internal)?;
    if verified.iter().any(|v| v.tenant != first.tenant) {
        return Err(GatewayError::MalformedCredentials);
    }
    let t = rt
        .tenants
        .get(&first.tenant)
        .ok_or(GatewayError::Internal)?;
    ctx.caller.tenant = Some(t.id.clone());
    ctx.caller.credential = Some(CredentialSource::Token);
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
    ctx.caller.subject = Some(
        rt.config
            .subject_hash_key
            .name(&named.issuer, &named.subject),
    );
    attempt.subject = Some(named.subject.clone());
    // A nonce an app token carries binds the attempt: a header or a field must say the same.
    for v in &verified {
        receipt::join_nonce(&mut attempt.nonce, v.nonce.as_deref())?;
    }
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
    if let Some(subject) = &ctx.caller.subject {
        rt.limits.check_subject(&t.id, subject).await?;
    }
    match rt.limits.check_tenant_shared(&t.id).await {
        Ok(state) => {
            ctx.answer.rate_headers = state.headers().into_iter().collect();
            Ok(())
        }
        Err((err, state)) => {
            ctx.answer.rate_headers = state.headers().into_iter().collect();
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

/// The reply for an exchange. Its answer was checked against the secrets of the config the call
/// began under; it leaves checked against those in force now (a comparison, unless a reload
/// changed them meanwhile).
fn reply(
    state: &AppState,
    ctx: &mut RequestCtx,
    exchange: &Exchange,
    cache_label: &'static str,
) -> Result<Reply, GatewayError> {
    ctx.call.status = exchange.upstream_status;
    ctx.call.class = Some(exchange.class);
    ctx.call.ms = Some(exchange.upstream_ms);
    ctx.answer.verdict = exchange.verdict.clone();
    let answer = exchange.outcome.clone()?;
    let answer = state.runtime().egress.recheck(&answer)?.unwrap_or(answer);
    ctx.answer.session_id = exchange.session_id.clone();
    let mut headers = vec![("X-Cache", cache_label.to_string())];
    headers.append(&mut ctx.answer.rate_headers);
    Ok(Reply { answer, headers })
}
