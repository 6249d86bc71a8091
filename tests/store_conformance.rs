//! One contract, two stores: every case runs against the local store and against a real
//! `redis-server` that the test starts on a loopback port, through the store's seam (`Claims`,
//! `Usage`, `Replays`, `Fleet`), and expects the same answers of both. A hold is named by its id:
//! it counts once however often it is claimed or committed, and giving it back never frees
//! another call's hold.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use liveness_gateway::egress::Egress;
use liveness_gateway::error::GatewayError;
use liveness_gateway::metrics::Metrics;
use liveness_gateway::store::{
    BudgetLimits, ClaimReply, Claims, Hold, LocalStore, Noted, Records, RedisStore, Reservation,
    Settle, SharedKey, SharedVerdict, Store, SubjectDay, SubjectHold,
};
use support::{RedisServer, TestGateway};

/// One store under test, and what it takes to see its settlements done.
struct Backend {
    name: &'static str,
    store: Arc<dyn Store>,
    /// The Redis store settles in the background: its pending settlements, counted here.
    metrics: Metrics,
    redis: Option<RedisServer>,
}

impl Backend {
    fn local() -> Backend {
        Backend {
            name: "local",
            store: LocalStore::open(None).expect("local store"),
            metrics: Metrics::new().expect("metrics"),
            redis: None,
        }
    }

    /// A Redis store whose commands time out after `timeout`.
    fn redis(timeout: &str) -> Backend {
        let redis = RedisServer::start();
        let cfg = TestGateway::new("http://127.0.0.1:9")
            .set("store.backend", "\"redis\"")
            .set("store.url", &format!("\"{}\"", redis.url()))
            .set("store.timeout", &format!("\"{timeout}\""))
            .config();
        let metrics = Metrics::new().expect("metrics");
        let store = RedisStore::new(
            cfg.store.clone(),
            Duration::from_secs(60),
            cfg.budgets.calendar,
            &metrics,
        );
        Backend {
            name: "redis",
            store: Arc::new(store),
            metrics,
            redis: Some(redis),
        }
    }

    fn both() -> [Backend; 2] {
        [Backend::local(), Backend::redis("2s")]
    }

    /// Wait until every settlement handed to the store has been taken.
    async fn settled(&self) {
        let until = Instant::now() + Duration::from_secs(10);
        while self.metrics.store_settles_pending.get() > 0 {
            assert!(Instant::now() < until, "{}: settlements pending", self.name);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn claim(&self, h: &Hold) -> Result<ClaimReply, GatewayError> {
        self.store.claim(h, &egress()).await
    }

    /// Settle and wait until the store has taken it.
    async fn settle(&self, h: &Hold, how: Settle) {
        self.store.settle(h, how, None).await;
        self.settled().await;
    }

    async fn day_used(&self, tenant: &str, at: DateTime<Utc>) -> u64 {
        self.store
            .counts(tenant, at)
            .await
            .expect("counts")
            .day_used
    }

    async fn month_used(&self, tenant: &str, at: DateTime<Utc>) -> u64 {
        self.store
            .counts(tenant, at)
            .await
            .expect("counts")
            .month_used
    }
}

fn egress() -> Egress {
    Egress::new(
        &liveness_gateway::config::OrgKeys {
            keys: Vec::new(),
            default: None,
        },
        &[],
        None,
        prometheus::IntCounter::new("echoes", "echoes").expect("counter"),
    )
}

fn daily(n: u64) -> BudgetLimits {
    BudgetLimits {
        daily: Some(n),
        monthly: None,
    }
}

/// A hold of tenant `t`, taken at `taken`, in the UTC days and months both stores count in.
fn hold_at(limits: BudgetLimits, taken: DateTime<Utc>) -> Hold {
    Hold {
        id: uuid::Uuid::new_v4().simple().to_string(),
        tenant: "t".into(),
        limits,
        periods: liveness_gateway::config::Calendar::default().periods(taken),
        taken,
        shared: None,
        subject: None,
    }
}

fn hold(limits: BudgetLimits) -> Hold {
    hold_at(limits, Utc::now())
}

fn commit(key: &str) -> Settle {
    Settle::Commit {
        org_key: key.into(),
        uncertain: false,
        failed: false,
    }
}

/// A billed call whose verdict was a fail the provider judged.
fn commit_failed() -> Settle {
    Settle::Commit {
        org_key: "default".into(),
        uncertain: false,
        failed: true,
    }
}

fn is_go(r: &Result<ClaimReply, GatewayError>) -> bool {
    matches!(r, Ok(ClaimReply::Go))
}

/// Today's midnight (UTC), and the instants just before and after it.
fn midnight() -> (DateTime<Utc>, DateTime<Utc>) {
    let m = Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc();
    (
        m - chrono::Duration::seconds(1),
        m + chrono::Duration::seconds(1),
    )
}

/// A daily and a monthly budget each give exactly their number of holds, also to claims made
/// all at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_never_go_over_the_budget() {
    for b in Backend::both() {
        let go = futures_util::future::join_all((0..20).map(|_| b.claim_owned(hold(daily(5)))))
            .await
            .into_iter()
            .filter(is_go)
            .count();
        assert_eq!(
            go, 5,
            "{}: 20 claims at once against a daily budget of 5",
            b.name
        );
        assert!(
            matches!(
                b.claim(&hold(daily(5))).await,
                Err(GatewayError::BudgetExhausted {
                    period: "daily",
                    ..
                })
            ),
            "{}",
            b.name
        );
        let monthly = BudgetLimits {
            daily: None,
            monthly: Some(7),
        };
        let more = [b.claim(&hold(monthly)).await, b.claim(&hold(monthly)).await];
        assert!(more.iter().all(is_go), "{}: {more:?}", b.name);
        assert!(
            matches!(
                b.claim(&hold(monthly)).await,
                Err(GatewayError::BudgetExhausted {
                    period: "monthly",
                    ..
                })
            ),
            "{}: the month's 7 are held",
            b.name
        );
    }
}

impl Backend {
    async fn claim_owned(&self, h: Hold) -> Result<ClaimReply, GatewayError> {
        self.claim(&h).await
    }
}

/// A reservation dropped before it was settled gives its hold back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_dropped_unsettled_gives_its_hold_back() {
    for b in Backend::both() {
        let h = hold(daily(1));
        assert!(is_go(&b.claim(&h).await), "{}", b.name);
        assert!(b.claim(&hold(daily(1))).await.is_err(), "{}", b.name);
        let claims: Arc<dyn Claims> = b.store.clone();
        drop(Reservation::new(claims, h));
        let until = Instant::now() + Duration::from_secs(5);
        let next = hold(daily(1));
        while !is_go(&b.claim(&next).await) {
            assert!(
                Instant::now() < until,
                "{}: the hold was not given back",
                b.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        b.settle(&next, commit("default")).await;
        assert_eq!(b.day_used("t", Utc::now()).await, 1, "{}", b.name);
    }
}

/// A subject's failed attempts: its calls in flight count as failed until settled (concurrent
/// calls cannot overshoot), only a fail the provider judged is counted (once, however often its
/// settlement is sent), a release or a pass gives the chance back, the refusal lasts until the
/// day ends, another subject has its own, and an admin's reset clears the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subjects_failed_attempts_are_limited_with_its_calls_in_flight() {
    for b in Backend::both() {
        let none = BudgetLimits {
            daily: None,
            monthly: None,
        };
        let of = |name: &str| hold(none).with_subject(Some(SubjectHold::new(name, None, Some(2))));
        let refused = |r: &Result<ClaimReply, GatewayError>| match r {
            Err(GatewayError::TooManyFailedAttempts { retry_after_secs }) => {
                assert!(
                    (1..=86_400).contains(retry_after_secs),
                    "{retry_after_secs}"
                );
                true
            }
            _ => false,
        };
        let (one, two) = (of("ana-hash"), of("ana-hash"));
        assert!(is_go(&b.claim(&one).await), "{}", b.name);
        assert!(is_go(&b.claim(&two).await), "{}", b.name);
        assert!(
            refused(&b.claim(&of("ana-hash")).await),
            "{}: two calls in flight may both fail",
            b.name
        );
        let bo = of("bo-hash");
        assert!(is_go(&b.claim(&bo).await), "{}: another subject", b.name);
        b.settle(&one, commit("default")).await;
        let three = of("ana-hash");
        assert!(is_go(&b.claim(&three).await), "{}: a pass", b.name);
        b.settle(&three, Settle::Release).await;
        let four = of("ana-hash");
        assert!(is_go(&b.claim(&four).await), "{}: a release", b.name);
        b.settle(&two, commit_failed()).await;
        b.settle(&two, commit_failed()).await;
        assert!(
            refused(&b.claim(&of("ana-hash")).await),
            "{}: one failed, one in flight",
            b.name
        );
        b.settle(&four, commit_failed()).await;
        b.settle(&bo, commit_failed()).await;
        assert!(refused(&b.claim(&of("ana-hash")).await), "{}", b.name);
        let now = Utc::now();
        let top = b.store.top_subjects("t", now, 10).await.expect("top");
        let day = |subject: &str, billable, failed| SubjectDay {
            subject: subject.into(),
            billable,
            failed,
        };
        assert_eq!(
            top,
            vec![day("ana-hash", 3, 2), day("bo-hash", 1, 1)],
            "{}",
            b.name
        );
        let had = b.store.reset_failed("t", "ana-hash", now).await;
        assert_eq!(had.expect("reset"), 2, "{}", b.name);
        let five = of("ana-hash");
        assert!(is_go(&b.claim(&five).await), "{}: reset", b.name);
        b.settle(&five, Settle::Release).await;
        let again = b.store.reset_failed("t", "ana-hash", now).await;
        assert_eq!(again.expect("reset"), 0, "{}", b.name);
    }
}

/// A subject's daily budget is held, committed and given back with the tenant's; another
/// subject has its own; the day's subjects are ranked by their calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subjects_budget_is_held_with_the_tenants() {
    for b in Backend::both() {
        let none = BudgetLimits {
            daily: None,
            monthly: None,
        };
        let of = |name: &str| hold(none).with_subject(Some(SubjectHold::new(name, Some(1), None)));
        let ana = of("ana-hash");
        assert!(is_go(&b.claim(&ana).await), "{}", b.name);
        assert!(
            matches!(
                b.claim(&of("ana-hash")).await,
                Err(GatewayError::SubjectBudgetExhausted { .. })
            ),
            "{}",
            b.name
        );
        let bo = of("bo-hash");
        assert!(is_go(&b.claim(&bo).await), "{}: another subject", b.name);
        b.settle(&ana, Settle::Release).await;
        let again = of("ana-hash");
        assert!(is_go(&b.claim(&again).await), "{}: given back", b.name);
        b.settle(&again, commit("default")).await;
        b.settle(&bo, Settle::Release).await;
        let top = b
            .store
            .top_subjects("t", Utc::now(), 10)
            .await
            .expect("top");
        assert_eq!(
            top,
            vec![SubjectDay {
                subject: "ana-hash".into(),
                billable: 1,
                failed: 0
            }],
            "{}",
            b.name
        );
        assert!(
            b.claim(&of("ana-hash")).await.is_err(),
            "{}: spent for the day",
            b.name
        );
        assert_eq!(b.day_used("t", Utc::now()).await, 1, "{}", b.name);
    }
}

/// A claim sent twice with the same hold (a retry after a timeout) holds one slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_claim_holds_once() {
    for b in Backend::both() {
        let a = hold(daily(2));
        assert!(is_go(&b.claim(&a).await), "{}", b.name);
        assert!(is_go(&b.claim(&a).await), "{}: claimed again", b.name);
        let other = hold(daily(2));
        let got = b.claim(&other).await;
        assert!(
            is_go(&got),
            "{}: the retried claim took a second slot: {got:?}",
            b.name
        );
        b.settle(&a, Settle::Release).await;
        b.settle(&other, Settle::Release).await;
    }
}

/// A commit sent twice with the same hold (a retry after a timeout) counts once, in the budget
/// and in the usage history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_commit_counts_once() {
    for b in Backend::both() {
        let a = hold(daily(2));
        assert!(is_go(&b.claim(&a).await), "{}", b.name);
        b.settle(&a, commit("default")).await;
        b.settle(&a, commit("default")).await;
        let day = Utc::now().date_naive();
        let rows = b
            .store
            .history(&["t".to_string()], day, day)
            .await
            .expect("history");
        let got = (
            b.day_used("t", Utc::now()).await,
            rows[0].billable,
            rows[0].billable_by_key.get("default").copied(),
        );
        assert_eq!(
            got,
            (1, 1, Some(1)),
            "{}: (day used, billable, billable with `default`) after a commit sent twice",
            b.name
        );
        assert!(
            is_go(&b.claim(&hold(daily(2))).await),
            "{}: one of two used",
            b.name
        );
    }
}

/// A commit that comes after its hold was given back (a replica cut off from the store while
/// its hold lapsed) is counted all the same, and frees no other call's hold: the budget is
/// not overshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_counts_and_frees_no_other_hold() {
    for b in Backend::both() {
        let (late, held) = (hold(daily(2)), hold(daily(2)));
        assert!(is_go(&b.claim(&late).await), "{}", b.name);
        assert!(is_go(&b.claim(&held).await), "{}", b.name);
        b.settle(&late, Settle::Release).await;
        b.settle(&late, commit("default")).await;
        assert_eq!(b.day_used("t", Utc::now()).await, 1, "{}", b.name);
        let third = b.claim(&hold(daily(2))).await;
        assert!(
            matches!(third, Err(GatewayError::BudgetExhausted { .. })),
            "{}: one call counted and one held fill a budget of 2, yet a third was let through: {third:?}",
            b.name
        );
        b.settle(&held, commit("default")).await;
        assert_eq!(b.day_used("t", Utc::now()).await, 2, "{}", b.name);
    }
}

/// A hold taken before midnight is settled in its own day, whether it is committed or given
/// back after midnight: the new day's budget is neither overshot nor freed by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_taken_before_midnight_settles_in_its_day() {
    for b in Backend::both() {
        let (before, after) = midnight();
        let (last, first) = (hold_at(daily(1), before), hold_at(daily(1), after));
        assert!(is_go(&b.claim(&last).await), "{}: the day's last", b.name);
        assert!(
            is_go(&b.claim(&first).await),
            "{}: the new day's first",
            b.name
        );
        b.settle(&last, commit("default")).await;
        assert_eq!(b.day_used("t", before).await, 1, "{}", b.name);
        assert_eq!(b.day_used("t", after).await, 0, "{}", b.name);
        assert!(
            b.claim(&hold_at(daily(1), after)).await.is_err(),
            "{}: the new day's one slot is still held",
            b.name
        );

        // Given back after midnight: the slot returns to the day it came from.
        let (old, new) = (hold_at(daily(2), before), hold_at(daily(2), after));
        let _ = b.claim(&old).await;
        b.settle(&first, commit("default")).await;
        assert!(is_go(&b.claim(&new).await), "{}", b.name);
        b.settle(&old, Settle::Release).await;
        assert!(
            b.claim(&hold_at(daily(2), after)).await.is_err(),
            "{}: a release of the old day freed a slot of the new one",
            b.name
        );
        b.settle(&new, Settle::Release).await;
        let month = if before.format("%m").to_string() == after.format("%m").to_string() {
            2
        } else {
            1
        };
        assert_eq!(b.month_used("t", after).await, month, "{}", b.name);
    }
}

/// Uncertain commits are counted in the budget and apart, per day and organization key, in the
/// day their hold was taken in; a release counts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncertain_commits_are_counted_apart_in_their_day() {
    for b in Backend::both() {
        let (before, now) = (midnight().0, Utc::now());
        settle_a_day_of_calls(&b, before, now).await;
        assert_eq!(two_days(&b, now).await, expected_two_days(), "{}", b.name);
        assert_eq!(b.day_used("t", now).await, 3, "{}", b.name);
    }
}

/// With Redis, a settlement sent again while the store is paused (its first attempts time out,
/// and may have run), then once it answers, counts once, its uncertain part too; and every key
/// it wrote expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_retried_through_a_paused_store_counts_once() {
    let b = Backend::redis("50ms");
    let (before, now) = (midnight().0, Utc::now());
    let holds = settle_a_day_of_calls(&b, before, now).await;
    let redis = b.redis.as_ref().expect("redis");
    redis.cli(&["CLIENT", "PAUSE", "300", "WRITE"]);
    let again = Settle::Commit {
        org_key: "default".into(),
        uncertain: true,
        failed: false,
    };
    b.settle(&holds[2], again.clone()).await;
    b.settle(&holds[2], again).await;
    assert_eq!(two_days(&b, now).await, expected_two_days(), "once");
    assert_eq!(b.day_used("t", now).await, 3);
    for k in redis.keys("lg:*") {
        let ttl: i64 = redis.cli(&["PTTL", &k]).parse().expect("pttl");
        assert!(ttl >= 0 || ttl == -2, "{k} has no expiry (PTTL {ttl})");
    }
}

/// Commit and release what the two cases above expect: one uncertain call in the day before
/// (its hold taken at 23:59:59), today three billable calls of which two uncertain, and a
/// release.
async fn settle_a_day_of_calls(
    b: &Backend,
    before: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Vec<Hold> {
    let uncertain = |key: &str, uncertain: bool| Settle::Commit {
        org_key: key.into(),
        uncertain,
        failed: false,
    };
    let mut holds = Vec::new();
    for (h, how) in [
        (hold_at(daily(10), before), uncertain("default", true)),
        (hold_at(daily(10), now), uncertain("retail", true)),
        (hold_at(daily(10), now), uncertain("default", true)),
        (hold_at(daily(10), now), uncertain("default", false)),
        (hold_at(daily(10), now), Settle::Release),
    ] {
        assert!(is_go(&b.claim(&h).await), "{}", b.name);
        b.settle(&h, how).await;
        holds.push(h);
    }
    holds
}

/// The day before and today in the usage history, as (billable, uncertain, billable by key,
/// uncertain by key).
type DayRow = (u64, u64, BTreeMap<String, u64>, BTreeMap<String, u64>);

async fn two_days(b: &Backend, now: DateTime<Utc>) -> Vec<DayRow> {
    let d = now.date_naive();
    b.store
        .history(&["t".to_string()], d - chrono::Duration::days(1), d)
        .await
        .expect("history")
        .into_iter()
        .map(|r| {
            (
                r.billable,
                r.uncertain,
                r.billable_by_key,
                r.uncertain_by_key,
            )
        })
        .collect()
}

fn expected_two_days() -> Vec<DayRow> {
    let map = |v: &[(&str, u64)]| v.iter().map(|(k, n)| (k.to_string(), *n)).collect();
    vec![
        (1, 1, map(&[("default", 1)]), map(&[("default", 1)])),
        (
            3,
            2,
            map(&[("default", 2), ("retail", 1)]),
            map(&[("default", 1), ("retail", 1)]),
        ),
    ]
}

/// The usage history: billable calls by key, cache hits and refusals noted (written at the
/// flush), an adjustment (never below zero), a tenant without a budget counted too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_history_is_the_same_in_both() {
    let mut rows = Vec::new();
    for b in Backend::both() {
        let unbudgeted = BudgetLimits {
            daily: None,
            monthly: None,
        };
        for (limits, key) in [(daily(10), "default"), (unbudgeted, "retail")] {
            let h = hold(limits);
            assert!(is_go(&b.claim(&h).await), "{}", b.name);
            b.settle(&h, commit(key)).await;
        }
        for what in [Noted::CacheHit, Noted::CacheHit, Noted::Rejected] {
            b.store.note("t", what);
        }
        b.store.flush().await.expect("flush");
        let now = b.store.now();
        let a = b.store.adjust("t", now, 3).await.expect("adjust");
        assert_eq!(
            (a.counts.day_used, a.counts.month_used),
            (5, 5),
            "{}",
            b.name
        );
        assert_eq!((a.day_applied, a.month_applied), (3, 3), "{}", b.name);
        let a = b.store.adjust("t", now, -9).await.expect("adjust");
        assert_eq!(
            (a.counts.day_used, a.counts.month_used),
            (0, 0),
            "{}: never below zero",
            b.name
        );
        assert_eq!(
            (a.day_applied, a.month_applied),
            (-5, -5),
            "{}: what it took back",
            b.name
        );
        b.store.adjust("t", now, 1).await.expect("adjust");
        let day = Utc::now().date_naive();
        let got = b
            .store
            .history(&["t".to_string(), "u".to_string()], day, day)
            .await
            .expect("history");
        rows.push((b.name, format!("{got:?}")));
        let t = &got[0];
        assert_eq!(
            (t.billable, t.cache_hits, t.rejected, got[1].billable),
            (1, 2, 1, 0),
            "{}: {got:?}",
            b.name
        );
        assert_eq!(
            t.billable_by_key,
            BTreeMap::from([("default".to_string(), 1), ("retail".to_string(), 1)]),
            "{}",
            b.name
        );
    }
    assert_eq!(rows[0].1, rows[1].1, "local, then redis");
}

/// Single-use ids: the first use passes, a replay does not, another scope is another id, a
/// forgotten use may be used again, and an id is remembered until its time is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_use_ids_pass_once() {
    for b in Backend::both() {
        let s = &b.store;
        let later = Utc::now().timestamp_millis() + 60_000;
        assert!(
            s.first_use("issuer", "jti-1", later).await.expect("1"),
            "{}",
            b.name
        );
        assert!(
            !s.first_use("issuer", "jti-1", later).await.expect("2"),
            "{}",
            b.name
        );
        assert!(
            s.first_use("other", "jti-1", later).await.expect("3"),
            "{}",
            b.name
        );
        s.forget_use("issuer", "jti-1").await.expect("forget");
        assert!(
            s.first_use("issuer", "jti-1", later).await.expect("4"),
            "{}",
            b.name
        );
        let soon = Utc::now().timestamp_millis() + 1_200;
        assert!(
            s.first_use("issuer", "jti-2", soon).await.expect("5"),
            "{}",
            b.name
        );
        assert!(
            !s.first_use("issuer", "jti-2", soon).await.expect("6"),
            "{}",
            b.name
        );
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert!(
            s.first_use("issuer", "jti-2", later).await.expect("7"),
            "{}: remembered past its time",
            b.name
        );
    }
}

/// The records issued at runtime: a write names the value it replaces (nothing, for a new
/// one), so a stale change is refused; every change moves the version, a use never does; the
/// later of two uses is kept, and a removed record's use goes with it. A local store with a
/// state file keeps them beside it, for the next process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_change_only_from_what_they_were() {
    let dir = tempfile::tempdir().expect("dir");
    let on_file = || LocalStore::open(Some(dir.path().join("state.json"))).expect("local store");
    let backends = Backend::both()
        .into_iter()
        .map(|b| (b.name, b.store.clone(), b))
        .chain(std::iter::once({
            let b = Backend::local();
            let store: Arc<dyn Store> = on_file();
            ("local with a state file", store, b)
        }));
    for (name, s, _keep) in backends {
        let v0 = s.version().await.expect("version");
        assert!(
            s.swap("key/a", None, Some("1")).await.expect("new"),
            "{name}"
        );
        assert!(
            !s.swap("key/a", None, Some("2")).await.expect("taken"),
            "{name}"
        );
        assert!(
            !s.swap("key/a", Some("0"), Some("2")).await.expect("stale"),
            "{name}"
        );
        let v1 = s.version().await.expect("version");
        assert_eq!(v1, v0 + 1, "{name}");
        assert!(
            s.swap("key/a", Some("1"), Some("2")).await.expect("change"),
            "{name}"
        );
        s.touch(&[("key/a".into(), 120), ("config-x".into(), 60)])
            .await
            .expect("touch");
        s.touch(&[("key/a".into(), 60)]).await.expect("touch");
        let (v2, all) = s.records().await.expect("records");
        assert_eq!(v2, v1 + 1, "{name}: a use moves no version");
        assert_eq!(
            all,
            BTreeMap::from([("key/a".to_string(), "2".to_string())]),
            "{name}"
        );
        let used = s.touched().await.expect("touched");
        assert_eq!(used.get("key/a"), Some(&120), "{name}: the later use");
        assert!(
            s.swap("key/a", Some("2"), None).await.expect("remove"),
            "{name}"
        );
        assert!(
            !s.swap("key/a", Some("2"), None).await.expect("gone"),
            "{name}"
        );
        let used = s.touched().await.expect("touched");
        assert_eq!(used.get("key/a"), None, "{name}");
        assert_eq!(used.get("config-x"), Some(&60), "{name}");
        assert!(
            s.swap("key/b", None, Some("3")).await.expect("new"),
            "{name}"
        );
        assert!(s.records().await.expect("records").1.contains_key("key/b"));
    }
    // Read again by the next process on the file.
    let again = on_file();
    let (_, all) = again.records().await.expect("records");
    assert_eq!(all.get("key/b").map(String::as_str), Some("3"));
    assert!(again.durable() && !LocalStore::open(None).expect("memory").durable());
}

/// A shared verdict is found by the next claim of its image, until it is purged. A store of
/// this process alone has no shared level: it never answers a claim with a verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_verdicts_are_found_until_purged() {
    for b in Backend::both() {
        let image = |n: u8| SharedKey {
            tenant: Some("t".into()),
            digest_hex: hex::encode([n; 32]),
            upstream: "fp".into(),
        };
        let with = |k: SharedKey| Hold {
            shared: Some(k),
            ..hold(daily(10))
        };
        let verdict = SharedVerdict {
            status: 200,
            content_type: Some("application/json".into()),
            body: r#"{"backend_session_id":"s-1","result":true,"prediction":"0.9","created_at":"2026-01-01T00:00:00Z","failure_reason":null}"#.into(),
            created_ms: b.store.now().timestamp_millis(),
            owner: Some("t".into()),
        };
        let first = with(image(1));
        assert!(is_go(&b.claim(&first).await), "{}", b.name);
        b.store
            .settle(
                &first,
                commit("default"),
                Some((&verdict, Duration::from_secs(60))),
            )
            .await;
        b.settled().await;
        let found = b.claim(&with(image(1))).await;
        match b.store.fleet() {
            None => {
                assert!(is_go(&found), "{}: {found:?}", b.name);
                assert_eq!(b.name, "local");
            }
            Some(fleet) => {
                match &found {
                    Ok(ClaimReply::Hit(_, origin)) => {
                        assert_eq!(origin.owner.as_deref(), Some("t"), "whose call it was")
                    }
                    other => panic!("{}: {other:?}", b.name),
                }
                assert_eq!(fleet.purge_verdicts(Some("t")).await.expect("purge"), 1);
                let after = with(image(1));
                assert!(is_go(&b.claim(&after).await), "{}: purged", b.name);
                b.settle(&after, Settle::Release).await;
            }
        }
    }
}
