//! Fleet mode: several real gateway processes share rate limits, budgets, usage history and the
//! verdict cache through a real Redis, started by the test on a loopback port.

mod support;

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use support::*;

fn fleet_gateway(emu: &liveness_gateway_dev::emulator::EmulatorHandle, redis: &str) -> TestGateway {
    TestGateway::for_emulator(emu)
        .set("store.backend", "\"redis\"")
        .set("store.url", &format!("\"{redis}\""))
        // A loaded 2-core machine runs three gateways and the test: give Redis room.
        .set("store.timeout", "\"250ms\"")
}

struct Fleet {
    procs: Vec<GatewayProcess>,
    urls: Vec<String>,
    admins: Vec<String>,
    /// Each replica's config, as written to `dir/gw<i>.toml`.
    configs: Vec<TestGateway>,
    dir: tempfile::TempDir,
}

async fn start_fleet(builder: &TestGateway, n: usize) -> Fleet {
    let mut fleet = Fleet {
        procs: Vec::new(),
        urls: Vec::new(),
        admins: Vec::new(),
        configs: Vec::new(),
        dir: tempfile::tempdir().expect("dir"),
    };
    for i in 0..n {
        let replica = builder.replica();
        let (p, cfg) =
            GatewayProcess::start_named(&replica, fleet.dir.path(), &format!("gw{i}"), &[]).await;
        fleet.procs.push(p);
        fleet.urls.push(format!("http://{}", cfg.listen));
        fleet.admins.push(format!("http://{}", cfg.admin_listen));
        fleet.configs.push(replica);
    }
    fleet
}

impl Fleet {
    /// Set `path` to `value` in every replica's config file, and have each reload it.
    async fn reload_with(&mut self, path: &str, value: &str) {
        for (i, cfg) in self.configs.iter_mut().enumerate() {
            *cfg = cfg.clone().set(path, value);
            let file = self.dir.path().join(format!("gw{i}.toml"));
            std::fs::write(&file, cfg.toml()).expect("config");
            assert_eq!(admin_reload(&self.admins[i]).await, 200, "reload of gw{i}");
        }
    }
}

/// `n` distinct uploads at once, spread over the replicas; the answers' statuses and codes.
async fn spread(urls: &[String], key: &str, n: usize, seed: u64) -> Vec<(u16, String)> {
    let base = fixture("face.jpg");
    let tasks = (0..n).map(|i| {
        let url = urls[i % urls.len()].clone();
        let img = variant(&base, seed + i as u64);
        let key = key.to_string();
        tokio::spawn(async move {
            let a = post_image(&url, &key, "face.jpg", &img).await;
            let code = if a.status == 200 {
                String::new()
            } else {
                a.code()
            };
            (a.status, code)
        })
    });
    join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect()
}

fn count(answers: &[(u16, String)], status: u16, code: &str) -> usize {
    answers
        .iter()
        .filter(|(s, c)| *s == status && c == code)
        .count()
}

/// Post new images as `alpha` to `url`, from image `n` on, until one is served: every answer
/// before it is refused with `code`, and one is served within `within`.
async fn served_within(url: &str, code: &str, mut n: u64, within: Duration) {
    let base = fixture("face.jpg");
    let until = Instant::now() + within;
    loop {
        let a = post_image(url, "alpha-key", "face.jpg", &variant(&base, n)).await;
        n += 1;
        if a.status == 200 {
            return;
        }
        assert_eq!(a.code(), code, "{}", a.text());
        assert!(
            Instant::now() < until,
            "not served within {within:?}: {}",
            a.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The tenant's calls used today as a replica reports them, once they reach `want` or 2 s have
/// passed: a commit is written just after its answer is sent.
async fn used_soon(admin: &str, tenant: &str, want: u64) -> u64 {
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        let u = admin_json(admin, &format!("/admin/usage?tenant={tenant}")).await;
        let used = u["tenants"][0]["daily"]["used"].as_u64().unwrap_or(0);
        if used >= want || Instant::now() > until {
            return used;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every key the gateway wrote expires by itself.
fn assert_every_key_expires(redis: &RedisServer) {
    let keys = redis.keys("lg:*");
    assert!(!keys.is_empty(), "the gateway wrote nothing to Redis");
    for k in keys {
        let ttl: i64 = redis.cli(&["PTTL", &k]).parse().expect("pttl");
        // -1: no expiry. 0: it expires within the millisecond (Redis rounds down); -2: it expired
        // between the scan and now. Both are fine.
        assert!(ttl >= 0 || ttl == -2, "{k} has no expiry (PTTL {ttl})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_holds_across_three_replicas_and_released_calls_give_it_back() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url())
        .set("cache.enabled", "false")
        .tenant_set("alpha", "daily_budget", "30");
    let fleet = start_fleet(&gw, 3).await;

    // First the provider refuses every call (a documented, unbilled refusal): each reservation
    // is released, so none of them may use the budget up. In rounds of 15: 30 holds in flight
    // at once would (rightly) leave no room for more.
    emu.set_fault(liveness_gateway_dev::emulator::Fault::NoSubscription);
    for round in 0..3 {
        let refused = spread(&fleet.urls, "alpha-key", 15, round * 100).await;
        assert_eq!(
            count(&refused, 400, "upstream_no_subscription"),
            15,
            "{refused:?}"
        );
    }
    emu.set_fault(liveness_gateway_dev::emulator::Fault::None);
    emu.reset_stats();

    let answers = spread(&fleet.urls, "alpha-key", 90, 1_000).await;
    assert_eq!(count(&answers, 200, ""), 30, "{answers:?}");
    assert_eq!(count(&answers, 429, "budget_exhausted"), 60, "{answers:?}");
    assert_eq!(
        emu.stats().billable,
        30,
        "the provider saw exactly the budget"
    );

    // Every replica reports the fleet's count, and the history has the day.
    for admin in &fleet.admins {
        assert_eq!(used_soon(admin, "alpha", 30).await, 30);
    }
    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let h = admin_json(
        &fleet.admins[0],
        &format!("/admin/usage?tenant=alpha&from={day}&to={day}"),
    )
    .await;
    assert_eq!(h["days"][0]["billable_calls"], 30, "{h}");
    assert_every_key_expires(&redis);

    // However many requests it served, a replica holds one connection to the store per runtime
    // that talks to it: the proxy's, the admin's, the maintenance task's.
    let clients = redis.cli(&["CLIENT", "LIST"]);
    let held = clients
        .lines()
        .filter(|l| l.contains("id=") && !l.contains("cmd=client"))
        .count();
    assert!((3..=9).contains(&held), "{held} connections: {clients}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_new_image_is_paid_once_across_the_fleet() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    // The provider takes its time, so every upload arrives while the first call is running.
    emu.set_latency(Duration::from_millis(600));
    let fleet = start_fleet(&fleet_gateway(&emu, &redis.url()), 3).await;
    let img = variant(&fixture("face.jpg"), 77);
    let tasks = (0..9).map(|i| {
        let url = fleet.urls[i % 3].clone();
        let img = img.clone();
        tokio::spawn(async move { post_image(&url, "alpha-key", "face.jpg", &img).await })
    });
    let answers: Vec<_> = join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.body, answers[0].body, "everyone gets the one verdict");
    }
    assert_eq!(emu.stats().billable, 1, "one paid call for the whole fleet");
    // A later upload to any replica is a hit, from its own memory or the fleet's.
    for url in &fleet.urls {
        let a = post_image(url, "alpha-key", "face.jpg", &img).await;
        assert_eq!(a.header("x-cache").as_deref(), Some("HIT"));
    }
    assert_eq!(emu.stats().billable, 1);
    assert_every_key_expires(&redis);
}

/// A shared verdict this version cannot serve (not JSON, another shape, a provider error, a body
/// that is no verdict: another program's value under the prefix, or a rolling upgrade's) is
/// neither served nor a reason to refuse the request, not even for a tenant with a budget: the
/// next call pays once and replaces it, and the fleet serves the new verdict from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_shared_verdict_is_replaced_not_served_nor_refused() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url()).tenant_set("alpha", "daily_budget", "100");
    let fleet = start_fleet(&gw, 3).await;
    let unreadable = [
        "",
        "not json",
        r#"{"status":200}"#,
        r#"{"status":500,"content_type":"application/json","body":"{\"detail\":\"down\"}","created_ms":0}"#,
        r#"{"status":200,"content_type":"text/html","body":"<html>maintenance</html>","created_ms":0}"#,
    ];
    let base = fixture("face.jpg");
    for (n, bad) in unreadable.iter().enumerate() {
        let img = variant(&base, 300 + n as u64);
        let before = redis.keys("lg:*v:*");
        let first = post_image(&fleet.urls[0], "alpha-key", "face.jpg", &img).await;
        assert_eq!(first.status, 200, "{}", first.text());
        let paid = emu.stats().billable;
        // The verdict's key is the one the first call added (a settle is written just after its
        // answer).
        let until = Instant::now() + Duration::from_secs(2);
        let key = loop {
            let new: Vec<String> = redis
                .keys("lg:*v:*")
                .into_iter()
                .filter(|k| !before.contains(k) && !k.contains("lock"))
                .collect();
            if new.len() == 1 || Instant::now() > until {
                assert_eq!(new.len(), 1, "one new verdict key: {new:?}");
                break new[0].clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        redis.cli(&["SET", &key, bad, "PX", "600000"]);

        // A replica without it in memory finds the bad value: it pays once and replaces it.
        let second = post_image(&fleet.urls[1], "alpha-key", "face.jpg", &img).await;
        assert_eq!(second.status, 200, "{bad:?}: {}", second.text());
        assert_eq!(second.header("x-cache").as_deref(), Some("MISS"), "{bad:?}");
        // The provider's new verdict (each call gets its own session id).
        assert_ne!(second.body, first.body, "{bad:?}");
        assert_eq!(
            emu.stats().billable,
            paid + 1,
            "{bad:?}: one call replaces it"
        );
        // The settle that stores it runs just after the answer.
        let until = Instant::now() + Duration::from_secs(2);
        let stored = loop {
            let stored = redis.cli(&["GET", &key]);
            let v = serde_json::from_str::<serde_json::Value>(&stored).unwrap_or_default();
            if v["status"] == 200 && v["body"] == second.text() || Instant::now() > until {
                break stored;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_ne!(stored, *bad, "replaced");
        let v: serde_json::Value = serde_json::from_str(&stored).expect("a verdict");
        assert_eq!(v["status"], 200, "{bad:?} was replaced: {stored}");
        assert_eq!(v["body"], second.text(), "{bad:?} was replaced: {stored}");

        // The third replica is served the new verdict from the fleet: no call.
        let third = post_image(&fleet.urls[2], "alpha-key", "face.jpg", &img).await;
        assert_eq!(third.header("x-cache").as_deref(), Some("HIT"), "{bad:?}");
        assert_eq!(third.body, second.body);
        assert_eq!(emu.stats().billable, paid + 1);
    }
    let m = metrics_text(&fleet.admins[1]).await;
    assert_eq!(
        sample(
            &m,
            "liveness_gateway_store_fallbacks_total{what=\"verdict_replaced\"}"
        ),
        unreadable.len() as f64
    );
    assert_eq!(
        sample(
            &m,
            "liveness_gateway_store_fallbacks_total{what=\"budget_refused\"}"
        ),
        0.0
    );
    assert_eq!(
        used_soon(&fleet.admins[0], "alpha", 2 * unreadable.len() as u64).await,
        2 * unreadable.len() as u64
    );
    assert!(fleet.procs[1]
        .log()
        .contains("a shared verdict could not be read"));
}

/// Burst 5 goes cell by cell; burst 40 is taken in leases (2 cells at a time): neither lets three
/// replicas accept more than the one quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_holds_across_three_replicas() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url())
        .tenant_set("alpha", "rate_per_second", "5")
        .tenant_set("alpha", "burst", "5")
        .tenant_set("beta", "rate_per_second", "20")
        .tenant_set("beta", "burst", "40");
    let fleet = start_fleet(&gw, 3).await;
    for (key, rate, burst) in [("alpha-key", 5.0, 5.0), ("beta-key", 20.0, 40.0)] {
        let (accepted, limited, elapsed) = hammer(&fleet.urls, key, Duration::from_secs(2)).await;
        // Three separate limiters would have let about three times this through.
        let allowed = burst + rate * elapsed + 1.0;
        assert!(
            f64::from(accepted) <= allowed,
            "{key}: {accepted} accepted in {elapsed:.2}s (at most {allowed:.0}), {limited} limited"
        );
        assert!(
            f64::from(accepted) >= burst,
            "{key}: the burst is served: {accepted}"
        );
        assert!(limited > 0);
    }
}

/// The global upstream pace is the fleet's: 15 new images spread over three replicas at 5 calls
/// a second (burst 5) take two seconds in all, as through one process. Three paces of their own
/// would have let each replica's five go at once, and all 15 in well under a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_global_upstream_pace_holds_across_replicas() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url())
        .set("limits.global_upstream_rate_per_second", "5")
        .set("limits.upstream_queue_timeout", "\"10s\"");
    let fleet = start_fleet(&gw, 3).await;
    let started = Instant::now();
    let answers = spread(&fleet.urls, "alpha-key", 15, 9_000).await;
    let took = started.elapsed();
    assert_eq!(
        count(&answers, 200, ""),
        15,
        "paced, not refused: {answers:?}"
    );
    assert_eq!(emu.stats().calls, 15);
    assert!(took >= Duration::from_millis(1900), "15 calls in {took:?}");
}

/// Requests as fast as 6 at a time allow, spread over the replicas, for `secs`: (accepted,
/// limited, seconds taken). One image: after its first call every allowed request is a cache
/// hit, so this measures the limiter, not the provider.
async fn hammer(urls: &[String], key: &str, secs: Duration) -> (u32, u32, f64) {
    let img = fixture("face.jpg");
    let started = Instant::now();
    let (mut accepted, mut limited, mut i) = (0, 0, 0);
    while started.elapsed() < secs {
        let batch = (0..6).map(|k| {
            let url = urls[(i + k) % urls.len()].clone();
            let (img, key) = (img.clone(), key.to_string());
            tokio::spawn(async move { post_image(&url, &key, "face.jpg", &img).await })
        });
        for a in join_all(batch).await {
            let a = a.expect("task");
            match a.status {
                200 => accepted += 1,
                429 => {
                    assert_eq!(a.code(), "rate_limited");
                    assert!(a.header("retry-after").is_some());
                    limited += 1;
                }
                s => panic!("unexpected {s}: {}", a.text()),
            }
        }
        i += 6;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (accepted, limited, started.elapsed().as_secs_f64())
}

/// The shared GCRA answers as the local `governor` limiter does for the same quota and the same
/// sequence of requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_limiter_answers_like_the_local_one() {
    use liveness_gateway::config::Rate;
    use liveness_gateway::limits::Limits;
    use liveness_gateway::store::{RedisStore, Store};
    let redis = RedisServer::start();
    let emu = start_emulator();
    let cfg = fleet_gateway(&emu, &redis.url())
        .tenant_set("alpha", "rate", "\"10/s\"")
        .tenant_set("alpha", "burst", "3")
        .config();
    let metrics = liveness_gateway::metrics::Metrics::new().expect("metrics");
    let store = RedisStore::new(
        cfg.store.clone(),
        Duration::from_secs(5),
        cfg.budgets.calendar,
        &metrics,
    );
    let shared = Limits::new(&cfg.tenants, &cfg.limits).sharing(store.fleet().map(|f| f.rates()));
    let local = Limits::new(&cfg.tenants, &cfg.limits);
    let t = cfg.tenants.iter().find(|t| t.id == "alpha").expect("alpha");
    assert_eq!(t.rate, Rate::parse("10/s").expect("rate"));
    // Requests in bursts, with pauses that earn back part of the quota (100 ms each).
    let mut theirs = Vec::new();
    let mut ours = Vec::new();
    for (burst, pause_ms) in [(5, 150), (3, 420), (6, 0)] {
        for _ in 0..burst {
            let a = local.check_tenant("alpha");
            let b = shared.check_tenant_shared("alpha").await;
            theirs.push(a.map(|s| s.remaining).map_err(|(e, _)| e));
            ours.push(b.map(|s| s.remaining).map_err(|(e, _)| e));
        }
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    }
    assert_eq!(
        ours, theirs,
        "shared (left) and local (right) decisions differ"
    );
    assert_eq!(
        metrics
            .store_fallbacks
            .with_label_values(&["rate_limit"])
            .get(),
        0,
        "every shared decision came from Redis"
    );
    assert!(ours.iter().any(|d| d.is_err()) && ours.iter().any(|d| d.is_ok()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_budgets_fail_closed_the_rest_is_served_and_recovery_is_automatic() {
    let mut redis = RedisServer::start();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url())
        .set("store.timeout", "\"100ms\"")
        .tenant_set("alpha", "daily_budget", "100");
    let one = start_fleet(&gw, 1).await;
    let (url, admin) = (one.urls[0].clone(), one.admins[0].clone());
    let base = fixture("face.jpg");
    for n in 0..3 {
        let a = post_image(&url, "alpha-key", "face.jpg", &variant(&base, n)).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }

    redis.kill();
    for n in 10..14 {
        let started = Instant::now();
        let a = post_image(&url, "alpha-key", "face.jpg", &variant(&base, n)).await;
        assert_eq!(
            (a.status, a.code().as_str()),
            (503, "store_unavailable"),
            "a tenant with a budget is never served without it"
        );
        assert!(a.header("retry-after").is_some());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "no hang: {:?}",
            started.elapsed()
        );
        // A tenant without a budget is served, rate-limited and cached by this replica alone.
        let b = post_image(&url, "beta-key", "face.jpg", &variant(&base, n)).await;
        assert_eq!(b.status, 200, "{}", b.text());
    }
    // A crowd through the outage: each request has its access line, but the warnings that
    // each would write come once, then once every 10 s with how many were left out.
    for n in 20..60 {
        let a = post_image(&url, "alpha-key", "face.jpg", &variant(&base, n)).await;
        assert_eq!(a.status, 503);
    }
    // An access line is written once its answer is out and the rest of the refused upload is
    // drained: the last ones can come a moment after their answers.
    let until = Instant::now() + Duration::from_secs(5);
    let mut log = one.procs[0].log();
    while log.lines().filter(|l| l.contains("status=503")).count() < 44 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        log = one.procs[0].log();
    }
    for said in ["budget refused", "rate limited by this replica alone"] {
        let lines = log.lines().filter(|l| l.contains(said)).count();
        assert!(
            (1..=2).contains(&lines),
            "{lines} lines of {said:?} for 44 requests\n{log}"
        );
    }
    // An access line is written once its answer is out: the last one may come just after it.
    let until = Instant::now() + Duration::from_secs(5);
    let refused = |log: &str| log.lines().filter(|l| l.contains("status=503")).count();
    while refused(&one.procs[0].log()) < 44 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused(&one.procs[0].log()) >= 44);
    let m = metrics_text(&admin).await;
    assert_eq!(sample(&m, "liveness_gateway_store_up"), 0.0);
    assert!(
        sample(
            &m,
            "liveness_gateway_store_fallbacks_total{what=\"budget_refused\"}"
        ) >= 4.0
    );
    assert!(
        sample(
            &m,
            "liveness_gateway_store_fallbacks_total{what=\"rate_limit\"}"
        ) >= 4.0
    );
    assert_eq!(
        client()
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .expect("readyz")
            .status()
            .as_u16(),
        200,
        "readiness stays green while the store is down"
    );

    redis.restart();
    served_within(&url, "store_unavailable", 99, Duration::from_secs(5)).await;
    // The counts written before the outage survived it (AOF): 3 before, 1 after.
    assert_eq!(used_soon(&admin, "alpha", 4).await, 4);
    let m = metrics_text(&admin).await;
    assert_eq!(sample(&m, "liveness_gateway_store_up"), 1.0);
}

/// A store that stops answering for longer than the timeout, then answers again: the commands
/// that timed out may have run, and none is applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_store_applies_no_count_twice() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url())
        .set("store.timeout", "\"50ms\"")
        .set("cache.enabled", "false")
        .tenant_set("alpha", "daily_budget", "1000");
    let one = start_fleet(&gw, 1).await;
    let (url, admin) = (one.urls[0].clone(), one.admins[0].clone());
    let base = fixture("face.jpg");
    // The provider answers slowly, so the pause falls between reserve and commit too.
    emu.set_latency(Duration::from_millis(150));
    let load = {
        let url = url.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for round in 0..10u64 {
                let batch = (0..4).map(|k| {
                    let (url, img) = (url.clone(), variant(&base, round * 10 + k));
                    tokio::spawn(
                        async move { post_image(&url, "alpha-key", "face.jpg", &img).await },
                    )
                });
                for a in join_all(batch).await {
                    statuses.push(a.expect("task").status);
                }
            }
            statuses
        })
    };
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        redis.cli(&["CLIENT", "PAUSE", "400", "ALL"]);
    }
    let statuses = load.await.expect("load");
    assert!(
        statuses.iter().all(|s| [200, 503].contains(s)),
        "{statuses:?}"
    );
    // Background retries of commits land within a few seconds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let billable = emu.stats().billable;
    let u = admin_json(&admin, "/admin/usage?tenant=alpha").await;
    assert_eq!(
        u["tenants"][0]["daily"]["used"].as_u64(),
        Some(billable),
        "every billable call counted exactly once: {u}"
    );
    assert!(statuses.contains(&200));
}

/// Redis forgets its scripts (`SCRIPT FLUSH`, a restart, a failover to a replica that never
/// loaded them) while calls are in flight: the next `EVALSHA` gets `NOSCRIPT`, which runs
/// nothing, so the script is loaded and sent again, and no request fails or counts twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forgotten_scripts_are_loaded_again_and_count_once() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url())
        .set("cache.enabled", "false")
        // A rate low enough to be checked by a script on every request.
        .tenant_set("alpha", "rate_per_second", "1000")
        .tenant_set("alpha", "burst", "10")
        .tenant_set("alpha", "daily_budget", "1000");
    let one = start_fleet(&gw, 1).await;
    let (url, admin) = (one.urls[0].clone(), one.admins[0].clone());
    let base = fixture("face.jpg");
    // The provider answers slowly: flushes fall between claims and settlements.
    emu.set_latency(Duration::from_millis(100));
    let mut statuses = Vec::new();
    for round in 0..6u64 {
        if round > 0 {
            assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]), "OK");
        }
        let batch = (0..4).map(|k| {
            let (url, img) = (url.clone(), variant(&base, 700 + round * 10 + k));
            tokio::spawn(async move { post_image(&url, "alpha-key", "face.jpg", &img).await })
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]), "OK");
        for a in join_all(batch).await {
            let a = a.expect("task");
            statuses.push(a.status);
            assert_eq!(a.status, 200, "{}", a.text());
        }
    }
    assert_eq!(statuses.len(), 24);
    assert_eq!(emu.stats().billable, 24);
    assert_eq!(
        used_soon(&admin, "alpha", 24).await,
        24,
        "each call counted once"
    );
    let m = metrics_text(&admin).await;
    assert_eq!(sample(&m, "liveness_gateway_store_up"), 1.0);
}

/// A replica that dies between reserve and commit cannot pin the budget: its hold expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replica_gives_its_hold_back_when_it_expires() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url())
        .set("upstream.total_timeout", "\"1s\"")
        .set("limits.upstream_queue_timeout", "\"100ms\"")
        .set("cache.enabled", "false")
        .tenant_set("alpha", "daily_budget", "1");
    let fleet = start_fleet(&gw, 2).await;
    let base = fixture("face.jpg");
    emu.set_fault(liveness_gateway_dev::emulator::Fault::Hang);
    let doomed = {
        let url = fleet.urls[0].clone();
        let img = variant(&base, 1);
        tokio::spawn(async move {
            let _ = client()
                .post(format!("{url}{ROUTE}"))
                .header("Authorization", "Bearer alpha-key")
                .header("Content-Type", multipart_ct())
                .body(multipart(&[Part::image("face.jpg", &img)]))
                .send()
                .await;
        })
    };
    // The first replica holds the one call of the budget while its call hangs; kill it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut procs = fleet.procs;
    let first = procs.remove(0);
    drop(first);
    doomed.abort();
    emu.set_fault(liveness_gateway_dev::emulator::Fault::None);
    let a = post_image(&fleet.urls[1], "alpha-key", "face.jpg", &variant(&base, 2)).await;
    assert_eq!(a.code(), "budget_exhausted", "the hold is still there");
    // A lease (6 s) from the hold's last renewal, before the replica was killed.
    served_within(
        &fleet.urls[1],
        "budget_exhausted",
        3,
        Duration::from_secs(10),
    )
    .await;
}

/// A replica killed while it calls for an image leaves the image's lock behind: the replicas
/// waiting for its verdict do not wait forever, nor call beside it while the lock holds; when
/// the lock lapses, one of them takes over and pays once, and the others get its verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_callers_image_lock_lapses_and_one_replica_takes_over() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url())
        .set("upstream.total_timeout", "\"1s\"")
        .set("limits.upstream_queue_timeout", "\"100ms\"");
    let fleet = start_fleet(&gw, 3).await;
    let img = variant(&fixture("face.jpg"), 4242);
    emu.set_fault(liveness_gateway_dev::emulator::Fault::Hang);
    let doomed = {
        let (url, img) = (fleet.urls[0].clone(), img.clone());
        tokio::spawn(async move { post_image(&url, "alpha-key", "face.jpg", &img).await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(emu.stats().in_flight, 1, "the first replica is calling");
    let mut procs = fleet.procs;
    drop(procs.remove(0));
    doomed.abort();
    emu.set_fault(liveness_gateway_dev::emulator::Fault::None);
    let calls_before = emu.stats().billable;

    let started = Instant::now();
    let waiting: Vec<_> = (0..4)
        .map(|i| {
            let (url, img) = (fleet.urls[1 + i % 2].clone(), img.clone());
            tokio::spawn(async move { post_image(&url, "alpha-key", "face.jpg", &img).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        emu.stats().billable,
        calls_before,
        "nobody calls beside a lock that still holds"
    );
    let answers: Vec<_> = join_all(waiting)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    // The lock lapses a lease (6 s) after its last renewal, before the replica was killed.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "waited {:?}",
        started.elapsed()
    );
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.body, answers[0].body, "one verdict for everyone");
    }
    assert_eq!(
        emu.stats().billable,
        calls_before + 1,
        "one replica took over, once"
    );
    drop(procs);
}

/// The history for chargeback, as JSON and as CSV with a cost column.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_history_exports_csv_with_costs() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url())
        .set("budgets.price_per_call", "0.05")
        .tenant_set("beta", "price_per_call", "0.5");
    let fleet = start_fleet(&gw, 2).await;
    let base = fixture("face.jpg");
    for n in 0..3 {
        let a = post_image(
            &fleet.urls[n % 2],
            "alpha-key",
            "face.jpg",
            &variant(&base, n as u64),
        )
        .await;
        assert_eq!(a.status, 200);
    }
    // A hit (the same image again) and a refusal (not an image).
    let hit = post_image(&fleet.urls[1], "alpha-key", "face.jpg", &variant(&base, 0)).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    let bad = post_image(
        &fleet.urls[0],
        "alpha-key",
        "face.jpg",
        b"not an image at all",
    )
    .await;
    assert_eq!(bad.status, 400);
    let b = post_image(&fleet.urls[0], "beta-key", "face.jpg", &variant(&base, 50)).await;
    assert_eq!(b.status, 200);
    // A refund of one of alpha's calls, made on one replica, is the fleet's.
    let r = client()
        .post(format!(
            "{}/admin/usage/adjust?tenant=alpha&delta=-1&reason=refund",
            fleet.admins[1]
        ))
        .send()
        .await
        .expect("adjust");
    assert_eq!(r.status(), 200);
    assert_eq!(used_soon(&fleet.admins[0], "alpha", 2).await, 2);
    // Hits and refusals reach the store in batches, every flush interval (1 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let csv = client()
        .get(format!(
            "{}/admin/usage?from={day}&to={day}",
            fleet.admins[0]
        ))
        .header("Accept", "text/csv")
        .send()
        .await
        .expect("csv");
    assert_eq!(
        csv.headers()["content-type"].to_str().expect("ct"),
        "text/csv; charset=utf-8"
    );
    let text = csv.text().await.expect("text");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "tenant,day,billable_calls,cache_hits_saved,rejected,cost,uncertain_calls"
    );
    assert!(
        lines.contains(&format!("beta,{day},1,0,0,0.5,0").as_str()),
        "{text}"
    );
    let alpha = lines
        .iter()
        .find(|l| l.starts_with("alpha,"))
        .expect("alpha row");
    assert_eq!(*alpha, format!("alpha,{day},2,1,1,0.1,0"), "{text}");
    // Bad ranges are named.
    let r = client()
        .get(format!("{}/admin/usage?from=2026-13-01", fleet.admins[0]))
        .send()
        .await
        .expect("bad");
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.expect("t").contains("invalid_range"));
}

/// Three masters, started by the test: the budget and the fleet-wide cache work on a cluster
/// too (every key of a script in one slot, by the tenant's hash tag; the shared cache scope's
/// keys live in other slots and go in a call of their own).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_budget_and_the_shared_cache_hold_on_a_redis_cluster() {
    let nodes: Vec<RedisServer> = (0..3)
        .map(|_| {
            RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ])
        })
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let out = std::process::Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli --cluster create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let until = Instant::now() + Duration::from_secs(20);
    while !nodes
        .iter()
        .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
    {
        assert!(Instant::now() < until, "the cluster did not form");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let urls: Vec<String> = nodes.iter().map(RedisServer::url).collect();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &urls.join(","))
        .set("store.cluster", "true")
        .set("cache.scope", "\"shared\"")
        .set("upstream.total_timeout", "\"10s\"")
        .tenant_set("alpha", "daily_budget", "30");
    let fleet = start_fleet(&gw, 3).await;

    let answers = spread(&fleet.urls, "alpha-key", 90, 5_000).await;
    assert_eq!(count(&answers, 200, ""), 30, "{answers:?}");
    assert_eq!(count(&answers, 429, "budget_exhausted"), 60, "{answers:?}");
    assert_eq!(emu.stats().billable, 30);

    // Shared scope on a cluster: the image's keys are in another slot than the budget's.
    emu.reset_stats();
    emu.set_latency(Duration::from_millis(500));
    let img = variant(&fixture("face.jpg"), 4_242);
    // beta's uploads first (one of them calls); alpha's arrive while that call runs.
    let tasks = (0..6).map(|i| {
        let url = fleet.urls[i % 3].clone();
        let (img, key) = (img.clone(), if i < 3 { "beta-key" } else { "alpha-key" });
        tokio::spawn(async move {
            if i >= 3 {
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            post_image(&url, key, "face.jpg", &img).await
        })
    });
    for a in join_all(tasks).await {
        let a = a.expect("task");
        // alpha's budget is used up; a shared verdict is free for it all the same.
        assert_eq!(a.status, 200, "{}", a.text());
    }
    assert_eq!(
        emu.stats().billable,
        1,
        "one paid call for the cluster-backed fleet"
    );
    // A call longer than a lock's lease: its replica renews the lock in the image's own slot,
    // so another replica waits for the verdict instead of paying again.
    emu.set_latency(Duration::from_secs(8));
    let long = variant(&fixture("face.jpg"), 4_343);
    let first = {
        let (url, long) = (fleet.urls[0].clone(), long.clone());
        tokio::spawn(async move { post_image(&url, "beta-key", "face.jpg", &long).await })
    };
    tokio::time::sleep(Duration::from_millis(7_000)).await;
    let second = post_image(&fleet.urls[1], "beta-key", "face.jpg", &long).await;
    let first = first.await.expect("task");
    assert_eq!(
        (first.status, second.status),
        (200, 200),
        "{}",
        second.text()
    );
    assert_eq!(second.body, first.body, "one verdict, paid once");
    assert_eq!(emu.stats().billable, 2);
    for n in &nodes {
        assert_every_key_expires_on(n);
    }

    // Every node is asked whether it may evict keys, and the worst one decides.
    assert_eq!(
        may_evict_soon(&fleet.admins[0], 0.0, Duration::from_secs(5)).await,
        0.0
    );
    nodes[1].cli(&["CONFIG", "SET", "maxmemory", "64mb"]);
    nodes[1].cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    assert_eq!(
        may_evict_soon(&fleet.admins[0], 1.0, Duration::from_secs(15)).await,
        1.0,
        "one node of three that may evict is enough"
    );
}

/// Like `assert_every_key_expires`, for one node of a cluster (it may hold no key).
fn assert_every_key_expires_on(redis: &RedisServer) {
    for k in redis.keys("lg:*") {
        let ttl: i64 = redis.cli(&["PTTL", &k]).parse().expect("pttl");
        assert!(ttl > 0 || ttl == -2, "{k} has no expiry (PTTL {ttl})");
    }
}

/// Billable calls per organization key reach the shared usage history too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_per_organization_key_is_shared() {
    let redis = RedisServer::start();
    let emu =
        liveness_gateway_dev::emulator::spawn(liveness_gateway_dev::emulator::EmulatorConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            api_key: ORG_KEY.into(),
            more_keys: vec![("retail".into(), "RETAIL-KEY-fleet-never-print-me".into())],
            latency: Duration::ZERO,
            fault: liveness_gateway_dev::emulator::Fault::None,
            tls: None,
        })
        .expect("emulator");
    let keys = tempfile::tempdir().expect("dir");
    let retail = keys.path().join("retail.key");
    std::fs::write(&retail, "RETAIL-KEY-fleet-never-print-me\n").expect("key");
    let gw = fleet_gateway(&emu, &redis.url())
        .set(
            "upstream.keys",
            &format!(
                "[{{ id = \"retail\", api_key_file = {:?} }}]",
                retail.display().to_string()
            ),
        )
        .tenant_set("alpha", "org_key", "\"retail\"");
    let fleet = start_fleet(&gw, 2).await;
    let base = fixture("face.jpg");
    for n in 0..3u64 {
        let a = post_image(
            &fleet.urls[n as usize % 2],
            "alpha-key",
            "a.jpg",
            &variant(&base, n),
        )
        .await;
        assert_eq!(a.status, 200);
    }
    let b = post_image(&fleet.urls[0], "beta-key", "a.jpg", &variant(&base, 9)).await;
    assert_eq!(b.status, 200);
    assert_eq!(used_soon(&fleet.admins[1], "alpha", 3).await, 3);
    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let usage = admin_json(
            &fleet.admins[1],
            &format!("/admin/usage?from={day}&to={day}"),
        )
        .await;
        let totals: Vec<(String, u64)> = usage["org_keys"]
            .as_array()
            .expect("org_keys")
            .iter()
            .map(|r| {
                (
                    r["org_key"].as_str().unwrap_or_default().to_string(),
                    r["billable_calls"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        if totals == vec![("default".to_string(), 1), ("retail".to_string(), 3)] {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "per-key usage: {totals:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_every_key_expires(&redis);
}

/// The value of `store_may_evict` once it is `want`, or what it was after `within`.
async fn may_evict_soon(admin: &str, want: f64, within: Duration) -> f64 {
    let until = Instant::now() + within;
    loop {
        let v = sample(
            &metrics_text(admin).await,
            "liveness_gateway_store_may_evict",
        );
        if v == want || Instant::now() > until {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A Redis that may evict keys when its memory is full could drop a budget's counts, holds or
/// locks without any error: the gateway says so (`store_may_evict` and a warning), follows a
/// policy changed at run time, and says "not known" when `INFO` is refused to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_may_evict_keys_is_reported() {
    // volatile-lru: every key the gateway writes has an expiry, so it is fair game too.
    let redis =
        RedisServer::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"]);
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url()).tenant_set("alpha", "daily_budget", "100");
    let one = start_fleet(&gw, 1).await;
    let (url, admin) = (one.urls[0].clone(), one.admins[0].clone());
    let log = || one.procs[0].log();

    assert_eq!(
        may_evict_soon(&admin, 1.0, Duration::from_secs(5)).await,
        1.0
    );
    let warned = |needle: &str| {
        one.procs[0]
            .log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains(needle))
    };
    assert!(
        warned("volatile-lru") && warned("maxmemory-policy noeviction"),
        "no warning naming the policy and the fix:\n{}",
        log()
    );
    // A warning, not an outage: budgeted tenants are still served.
    let a = post_image(&url, "alpha-key", "face.jpg", &fixture("face.jpg")).await;
    assert_eq!(a.status, 200, "{}", a.text());

    // Fixed at run time: seen at the next check, said once.
    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    assert_eq!(
        may_evict_soon(&admin, 0.0, Duration::from_secs(15)).await,
        0.0
    );
    assert!(log().contains("the store evicts no keys"));
    let warnings = log()
        .lines()
        .filter(|l| l.contains("may evict keys"))
        .count();
    assert_eq!(warnings, 1, "the warning is said once, not at every check");

    // An ACL that refuses INFO: not known, and said so; the store is still up.
    redis.cli(&["ACL", "SETUSER", "default", "-info"]);
    assert_eq!(
        may_evict_soon(&admin, -1.0, Duration::from_secs(15)).await,
        -1.0
    );
    assert!(warned("INFO memory refused"), "{}", log());
    let m = metrics_text(&admin).await;
    assert_eq!(sample(&m, "liveness_gateway_store_up"), 1.0);
    let b = post_image(
        &url,
        "alpha-key",
        "face.jpg",
        &variant(&fixture("face.jpg"), 7),
    )
    .await;
    assert_eq!(b.status, 200, "{}", b.text());
}

/// A store reached over TLS (`rediss://`, TLS only on the Redis side) with a password in a
/// variable: with the store's CA in `store.ca_file` the fleet works through it; without it (the
/// public roots) the store's certificate is refused, and budgets fail closed rather than
/// anything going in clear. The password appears in no log line and no metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_over_tls_is_verified_and_its_password_stays_hidden() {
    const PASSWORD: &str = "redis-pass-7f3a-never-print-me";
    let dir = tempfile::tempdir().expect("dir");
    let pki = support::pki::TestPki::new();
    let (cert, key, _) = pki.leaf_for(dir.path(), "redis", "127.0.0.1");
    let ca = pki.ca_file(dir.path());
    let redis = RedisServer::start_tls(&cert, &key, &ca, PASSWORD);
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:{}/0", redis.port);
    let emu = start_emulator();
    let fleet = |ca: Option<&std::path::Path>| {
        let mut g = TestGateway::for_emulator(&emu)
            .set("store.backend", "\"redis\"")
            .set("store.url_env", "\"LG_TEST_REDIS_URL\"")
            .set("store.timeout", "\"250ms\"")
            .tenant_set("alpha", "daily_budget", "10");
        if let Some(ca) = ca {
            g = g.set("store.ca_file", &format!("{:?}", ca.display().to_string()));
        }
        g
    };
    let env = [("LG_TEST_REDIS_URL", url.as_str())];

    let (trusting, cfg) =
        GatewayProcess::start_named(&fleet(Some(&ca)), dir.path(), "trusting", &env).await;
    let a = post_image(
        &format!("http://{}", cfg.listen),
        "alpha-key",
        "face.jpg",
        &fixture("face.jpg"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let admin = format!("http://{}", cfg.admin_listen);
    assert_eq!(used_soon(&admin, "alpha", 1).await, 1);
    assert!(
        !redis.keys("lg:*").is_empty(),
        "the counts are in the TLS Redis"
    );
    assert_eq!(
        sample(&metrics_text(&admin).await, "liveness_gateway_store_up"),
        1.0
    );

    let (refusing, cfg2) =
        GatewayProcess::start_named(&fleet(None), dir.path(), "refusing", &env).await;
    let b = post_image(
        &format!("http://{}", cfg2.listen),
        "alpha-key",
        "face.jpg",
        &variant(&fixture("face.jpg"), 3),
    )
    .await;
    assert_eq!(
        (b.status, b.code().as_str()),
        (503, "store_unavailable"),
        "an untrusted store is no store: {}",
        b.text()
    );
    assert!(
        refusing.log().to_lowercase().contains("certificate"),
        "the refusal names the certificate:\n{}",
        refusing.log()
    );

    for (name, text) in [
        ("trusting log", trusting.log()),
        ("refusing log", refusing.log()),
        ("metrics", metrics_text(&admin).await),
        (
            "refusing metrics",
            metrics_text(&format!("http://{}", cfg2.admin_listen)).await,
        ),
        ("answer", b.text()),
    ] {
        assert!(
            !text.contains(PASSWORD),
            "the store's password in the {name}"
        );
    }
}

/// A Redis whose memory is full and that evicts nothing (`noeviction`, as it should run)
/// refuses writes: a tenant with a budget gets `503 store_unavailable`, never an unchecked
/// call; a tenant without one is served from this replica's cache and single-flight. Once Redis
/// has room again, service and counts carry on where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_store_fails_closed_and_recovers_with_its_counts() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url()).tenant_set("alpha", "daily_budget", "100");
    let one = start_fleet(&gw, 1).await;
    let (url, admin) = (one.urls[0].clone(), one.admins[0].clone());
    let base = fixture("face.jpg");
    for n in 0..2 {
        let a = post_image(&url, "alpha-key", "face.jpg", &variant(&base, 900 + n)).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    assert_eq!(used_soon(&admin, "alpha", 2).await, 2);

    // Full: more data than the limit, and a policy that evicts nothing.
    redis.cli(&["DEBUG", "POPULATE", "20000", "filler", "100"]);
    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis.cli(&["CONFIG", "SET", "maxmemory", "1mb"]);
    let calls = emu.stats().calls;
    for n in 0..3 {
        let a = post_image(&url, "alpha-key", "face.jpg", &variant(&base, 910 + n)).await;
        assert_eq!(
            (a.status, a.code().as_str()),
            (503, "store_unavailable"),
            "{}",
            a.text()
        );
        let b = post_image(&url, "beta-key", "face.jpg", &variant(&base, 910 + n)).await;
        assert_eq!(b.status, 200, "{}", b.text());
    }
    assert_eq!(
        emu.stats().calls,
        calls + 3,
        "only the unbudgeted tenant's calls"
    );
    let m = metrics_text(&admin).await;
    assert!(
        sample(
            &m,
            "liveness_gateway_store_fallbacks_total{what=\"budget_refused\"}"
        ) >= 3.0
    );

    // Room again: served, and the counts from before are all there.
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    let a = post_image(&url, "alpha-key", "face.jpg", &variant(&base, 920)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(used_soon(&admin, "alpha", 3).await, 3);
}

/// The preload library of Debian's `faketime`: a replica started with it sees another time.
fn libfaketime() -> String {
    std::fs::read_dir("/usr/lib")
        .expect("/usr/lib")
        .filter_map(Result::ok)
        .map(|d| d.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
        .expect("libfaketime (apt-get install faketime)")
        .display()
        .to_string()
}

/// The replica's measured clock offset to the store, once near `want` (within 5 s of waiting:
/// the maintenance task measures it as it starts, then every 10 s).
async fn offset_soon(admin: &str, want: f64) -> f64 {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let offset = sample(
            &metrics_text(admin).await,
            "liveness_gateway_store_clock_offset_seconds",
        );
        if (offset - want).abs() < 5.0 || Instant::now() > until {
            return offset;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A replica whose clock is a day ahead (its time sync broken) still counts in the fleet's
/// day: days and months follow Redis's clock, so one day's budget holds across replicas
/// whatever their clocks say. The gap is measured, exported and said in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_with_a_wrong_clock_counts_in_the_fleets_day() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url()).tenant_set("alpha", "daily_budget", "5");
    let dir = tempfile::tempdir().expect("dir");
    let (_right, right) =
        GatewayProcess::start_named(&gw.replica(), dir.path(), "right", &[]).await;
    let lib = libfaketime();
    let wrong_clock = [
        ("LD_PRELOAD", lib.as_str()),
        ("FAKETIME", "+1d"),
        // Timers and timeouts keep the real pace.
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let (ahead, ahead_cfg) =
        GatewayProcess::start_named(&gw.replica(), dir.path(), "ahead", &wrong_clock).await;
    let (right_admin, ahead_admin) = (
        format!("http://{}", right.admin_listen),
        format!("http://{}", ahead_cfg.admin_listen),
    );
    let base = fixture("face.jpg");
    let post = |url: String, n: u64| {
        let img = variant(&base, n);
        async move {
            let a = post_image(&url, "alpha-key", "face.jpg", &img).await;
            (
                a.status,
                if a.status == 200 {
                    String::new()
                } else {
                    a.code()
                },
            )
        }
    };
    let ok = (200, String::new());
    let exhausted = (429, "budget_exhausted".to_string());
    // The replica a day ahead serves its first calls at once, before its maintenance task
    // measures the store's clock: they are counted in the fleet's day all the same.
    let ahead_url = format!("http://{}", ahead_cfg.listen);
    for n in 0..2 {
        assert_eq!(post(ahead_url.clone(), 960 + n).await, ok);
    }
    let right_url = format!("http://{}", right.listen);
    for n in 0..3 {
        assert_eq!(post(right_url.clone(), 950 + n).await, ok);
    }
    for n in 2..4 {
        assert_eq!(
            post(ahead_url.clone(), 960 + n).await,
            exhausted,
            "the day's budget of 5, whichever replica counts"
        );
    }
    assert_eq!(post(right_url.clone(), 953).await, exhausted);

    // The gap is measured, exported and said in the log.
    let offset = offset_soon(&ahead_admin, -86_400.0).await;
    assert!(
        (offset + 86_400.0).abs() < 5.0,
        "the store is a day behind this replica's clock: {offset}"
    );
    assert!(
        ahead
            .log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("from the store's")),
        "{}",
        ahead.log()
    );
    // Its refusals say when the fleet's day ends, by the store's clock, not its own.
    let late = post_image(&ahead_url, "alpha-key", "face.jpg", &variant(&base, 970)).await;
    assert_eq!(late.code(), "budget_exhausted");
    let retry: i64 = late
        .header("retry-after")
        .and_then(|r| r.parse().ok())
        .expect("Retry-After");
    let next_day = (chrono::Utc::now() + chrono::Duration::seconds(retry + 30))
        .format("%Y-%m-%d 00:00 UTC")
        .to_string();
    let hint = late.json()["hint"].as_str().unwrap_or_default().to_string();
    assert!(
        hint.ends_with(&format!("it resets at {next_day}")),
        "{hint}"
    );
    let right_offset = offset_soon(&right_admin, 0.0).await;
    assert!(right_offset.abs() < 1.0, "{right_offset}");
    assert_eq!(emu.stats().billable, 5);
    let day = |u: serde_json::Value| u["tenants"][0]["daily"].clone();
    let (r, a) = (
        day(admin_json(&right_admin, "/admin/usage?tenant=alpha").await),
        day(admin_json(&ahead_admin, "/admin/usage?tenant=alpha").await),
    );
    assert_eq!(
        (r["period"].clone(), r["used"].clone()),
        (a["period"].clone(), a["used"].clone()),
        "{r} {a}"
    );
    assert_eq!(a["used"], 5);
}

/// Redis's clock steps back an hour (a clock stepped by hand, a host restored from a snapshot):
/// the shared rate limit's state is then an hour ahead of Redis's time, which the test writes
/// as such a step leaves it (`redis-server` does not run under a fake clock). The tenant is
/// limited as if its quota were drained, for about one interval, not refused for the hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_clock_stepped_back_does_not_lock_tenants_out() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url())
        .tenant_set("alpha", "rate_per_second", "5")
        .tenant_set("alpha", "burst", "5");
    let fleet = start_fleet(&gw, 1).await;
    let img = fixture("face.jpg");
    let first = post_image(&fleet.urls[0], "alpha-key", "face.jpg", &img).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let key = redis.keys("lg:*alpha*:rate");
    assert_eq!(key.len(), 1, "the tenant's quota in Redis: {key:?}");

    // The state as a step back of the clock leaves it: an hour ahead of Redis's time.
    let time = redis.cli(&["TIME"]);
    let mut parts = time.lines().map(|l| l.trim().parse::<i64>().unwrap_or(0));
    let now_us = parts.next().unwrap_or(0) * 1_000_000 + parts.next().unwrap_or(0);
    let ahead = (now_us + 3_600_000_000).to_string();
    redis.cli(&["SET", &key[0], &ahead, "PX", "3700000"]);

    let until = Instant::now() + Duration::from_secs(3);
    let served = loop {
        let a = post_image(&fleet.urls[0], "alpha-key", "face.jpg", &img).await;
        if a.status == 200 {
            break a;
        }
        assert_eq!(a.code(), "rate_limited", "{}", a.text());
        let wait: u64 = a
            .header("retry-after")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        assert!(
            wait <= 1,
            "told to wait {wait} s after the store's clock went back"
        );
        assert!(
            Instant::now() < until,
            "still refused 3 s after the step: {}",
            a.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(served.header("x-cache").as_deref(), Some("HIT"));
    // Drained, not reset: the step gives no extra burst either. A reset quota would take all
    // five at once; a drained one only what its 5/s brings back while they are sent.
    let started = Instant::now();
    let mut accepted = 1;
    for _ in 0..5 {
        if post_image(&fleet.urls[0], "alpha-key", "face.jpg", &img)
            .await
            .status
            == 200
        {
            accepted += 1;
        }
    }
    let refilled = (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        accepted <= 2 + refilled.min(3),
        "{accepted} accepted right after a drained quota"
    );
}

/// A fast stop (SIGINT) of a replica with a budget's calls at the provider: they are settled in
/// Redis before the process goes (their clients get their verdicts), no new call starts
/// meanwhile, and the other replica finds the budget spent. (Stopped with the runtime, the
/// holds would lapse after a lease and give the budget back while the provider billed them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fast_stop_settles_a_replicas_calls_in_the_store_first() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    emu.set_latency(Duration::from_millis(2500));
    let gw = fleet_gateway(&emu, &redis.url())
        .set("cache.enabled", "false")
        .set("upstream.total_timeout", "\"10s\"")
        .tenant_set("alpha", "daily_budget", "3");
    let mut fleet = start_fleet(&gw, 2).await;
    let (url, other) = (fleet.urls[0].clone(), fleet.urls[1].clone());
    let base = fixture("face.jpg");
    let calls: Vec<_> = (0..3)
        .map(|n| {
            let (url, img) = (url.clone(), variant(&base, n));
            tokio::spawn(
                async move { post_image(&url, "alpha-key", "face.jpg", &img).await.status },
            )
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(5);
    while emu.stats().in_flight < 3 {
        assert!(
            Instant::now() < until,
            "the calls never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fleet.procs[0].signal("INT");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Sent while the stop waits: refused (or the listener is gone), never called.
    let late = {
        let (url, img) = (url.clone(), variant(&base, 100));
        tokio::spawn(async move { post_image(&url, "beta-key", "face.jpg", &img).await.status })
            .await
    };
    assert!(matches!(late, Ok(503) | Err(_)), "{late:?}");
    let status = fleet.procs[0].wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.expect("task"));
    }
    assert_eq!(
        answers,
        [200, 200, 200],
        "the calls at the provider are answered"
    );
    assert_eq!(emu.stats().billable, 3, "no call after the signal");
    let day = redis.keys("lg:*alpha*:day:*");
    assert_eq!(day.len(), 1, "the day's count: {day:?}");
    assert_eq!(redis.cli(&["GET", &day[0]]), "3");

    emu.set_latency(Duration::ZERO);
    let a = post_image(&other, "alpha-key", "face.jpg", &variant(&base, 10)).await;
    assert_eq!(a.code(), "budget_exhausted", "{}", a.text());
    assert_eq!(
        emu.stats().billable,
        3,
        "the budget of 3 holds across the stop"
    );
}

/// A replica stopped (SIGTERM) while the store is slow still records the call it answered last:
/// the call was billed, so its commit must reach Redis before the process goes, or the hold
/// would expire and give the budget back. The replica waits for its settlements, within its
/// grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_replica_records_its_last_calls_before_it_exits() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    emu.set_latency(Duration::from_millis(600));
    let gw = fleet_gateway(&emu, &redis.url())
        .set("cache.enabled", "false")
        .set("server.grace_period", "\"10s\"")
        .tenant_set("alpha", "daily_budget", "100");
    let mut fleet = start_fleet(&gw, 1).await;
    let url = fleet.urls[0].clone();
    let call = tokio::spawn(async move {
        post_image(&url, "alpha-key", "face.jpg", &fixture("face.jpg")).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(emu.stats().in_flight, 1, "the call is at the provider");
    // Writes wait in Redis for 3 s: the commit cannot land until then.
    redis.cli(&["CLIENT", "PAUSE", "3000", "WRITE"]);
    let a = call.await.expect("task");
    assert_eq!(a.status, 200, "{}", a.text());
    let stopped = Instant::now();
    fleet.procs[0].signal("TERM");
    let status = fleet.procs[0].wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let log = fleet.procs[0].log();
    assert!(
        stopped.elapsed() >= Duration::from_millis(2000),
        "it left after {:?}, before the store took the commit: {log}",
        stopped.elapsed()
    );
    let day = redis.keys("lg:*alpha*:day:*");
    assert_eq!(day.len(), 1, "the day's count: {day:?}\n{log}");
    assert_eq!(redis.cli(&["GET", &day[0]]), "1", "{log}");
    assert_eq!(emu.stats().billable, 1);

    // A store that stays away longer than the grace period: the replica goes at its end, and
    // says how many settlements it could not hand over.
    let mut fleet = start_fleet(&gw.set("server.grace_period", "\"2s\""), 1).await;
    let url = fleet.urls[0].clone();
    let call = tokio::spawn(async move {
        post_image(
            &url,
            "alpha-key",
            "face.jpg",
            &variant(&fixture("face.jpg"), 1),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.cli(&["CLIENT", "PAUSE", "8000", "WRITE"]);
    assert_eq!(call.await.expect("task").status, 200);
    let stopped = Instant::now();
    fleet.procs[0].signal("TERM");
    let status = fleet.procs[0].wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    assert!(
        stopped.elapsed() < Duration::from_secs(6),
        "it stayed {:?}, past its grace period",
        stopped.elapsed()
    );
    let log = fleet.procs[0].log();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("did not take these settlements")),
        "{log}"
    );
}

/// One replica, its store reached through `endpoint`, that has served a first call of the
/// budgeted tenant `alpha` (cache off: every call goes through the store's budget).
async fn served_through(
    endpoint: &TcpSwitch,
) -> (Fleet, liveness_gateway_dev::emulator::EmulatorHandle) {
    let emu = start_emulator();
    let url = format!("redis://127.0.0.1:{}/0", endpoint.port);
    let gw = fleet_gateway(&emu, &url)
        .set("cache.enabled", "false")
        .tenant_set("alpha", "daily_budget", "100");
    let fleet = start_fleet(&gw, 1).await;
    let a = post_image(
        &fleet.urls[0],
        "alpha-key",
        "face.jpg",
        &variant(&fixture("face.jpg"), 1),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    (fleet, emu)
}

/// Redis fails over behind one address (a managed Redis's endpoint, a Service, a virtual IP):
/// the old primary, now a replica, answers every write on the gateway's open connection with
/// READONLY, which means nothing was written. The gateway connects again and sends it once
/// more, through the same address, to the new primary: no request is refused, and the counts
/// made before the failover are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_behind_one_address_is_followed() {
    let primary = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    let endpoint = TcpSwitch::start(primary.port).await;
    let (fleet, _emu) = served_through(&endpoint).await;
    let base = fixture("face.jpg");
    assert_eq!(used_soon(&fleet.admins[0], "alpha", 1).await, 1);
    // The replica has the count before the failover.
    let until = Instant::now() + Duration::from_secs(5);
    while replica.keys("lg:*alpha*:day:*").is_empty() {
        assert!(Instant::now() < until, "the replica never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Failover: the replica is promoted, the old primary follows it, the address moves.
    replica.cli(&["REPLICAOF", "NO", "ONE"]);
    primary.cli(&["REPLICAOF", "127.0.0.1", &replica.port.to_string()]);
    endpoint.switch(replica.port);

    for n in 2..5 {
        let a = post_image(&fleet.urls[0], "alpha-key", "face.jpg", &variant(&base, n)).await;
        assert_eq!(a.status, 200, "{}\n{}", a.text(), fleet.procs[0].log());
    }
    let day = replica.keys("lg:*alpha*:day:*");
    assert_eq!(day.len(), 1);
    let until = Instant::now() + Duration::from_secs(2);
    while replica.cli(&["GET", &day[0]]) != "4" && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        replica.cli(&["GET", &day[0]]),
        "4",
        "the count from before the failover, and the three after"
    );
    let log = fleet.procs[0].log();
    assert!(log.contains("READONLY"), "{log}");
    let m = metrics_text(&fleet.admins[0]).await;
    assert_eq!(
        sample(
            &m,
            "liveness_gateway_store_fallbacks_total{what=\"budget_refused\"}"
        ),
        0.0
    );
}

/// Two deployments share one Redis and the default key prefix, each with its own provider
/// endpoint (a staging on the emulator, a production on the provider): neither is served the
/// other's verdicts, and neither waits on the other's image lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deployments_with_other_providers_never_share_verdicts() {
    let redis = RedisServer::start();
    let (staging_emu, prod_emu) = (start_emulator(), start_emulator());
    let staging = start_fleet(&fleet_gateway(&staging_emu, &redis.url()), 1).await;
    let prod = start_fleet(&fleet_gateway(&prod_emu, &redis.url()), 1).await;
    let img = variant(&fixture("face.jpg"), 777);
    let a = post_image(&staging.urls[0], "alpha-key", "face.jpg", &img).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(staging_emu.stats().billable, 1);
    // Its verdict is in Redis (stored just after the answer).
    let until = Instant::now() + Duration::from_secs(2);
    while redis.keys("lg:*:v:*").is_empty() {
        assert!(Instant::now() < until, "no shared verdict stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = post_image(&prod.urls[0], "alpha-key", "face.jpg", &img).await;
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(b.header("x-cache").as_deref(), Some("MISS"));
    assert_eq!(
        prod_emu.stats().billable,
        1,
        "production asked its own provider"
    );
    assert_ne!(a.body, b.body, "each its own provider's verdict");
    // Within one deployment the fleet still shares: a second production replica hits.
    let prod2 = start_fleet(&fleet_gateway(&prod_emu, &redis.url()), 1).await;
    let c = post_image(&prod2.urls[0], "alpha-key", "face.jpg", &img).await;
    assert_eq!(c.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(c.body, b.body);
    assert_eq!(prod_emu.stats().billable, 1);

    // Budgets and rate limits are shared through the prefix, though: production says so, and
    // names the other endpoint; its own second replica does not count.
    let until = Instant::now() + Duration::from_secs(3);
    let shared = |m: &str| sample(m, "liveness_gateway_store_prefix_shared");
    while shared(&metrics_text(&prod2.admins[0]).await) != 1.0 {
        assert!(Instant::now() < until, "{}", prod2.procs[0].log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = prod2.procs[0].log();
    let staging_endpoint = format!("http://127.0.0.1:{}", staging_emu.addr.port());
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("uses this key prefix")
            && l.contains(&staging_endpoint)),
        "{log}"
    );
}

/// A replica started while Redis is not there yet (a cold start of the whole stack, Redis
/// slower to come up) starts and is ready: tenants without a budget are served, tenants with
/// one get `503 store_unavailable` until Redis answers, and then are served without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_started_before_redis_serves_and_follows_it_up() {
    let port = free_port();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &format!("redis://127.0.0.1:{port}/0")).tenant_set(
        "alpha",
        "daily_budget",
        "100",
    );
    let fleet = start_fleet(&gw, 1).await;
    assert_eq!(
        get_status(&format!("{}/readyz", fleet.admins[0])).await,
        200
    );
    let base = fixture("face.jpg");
    let refused = post_image(&fleet.urls[0], "alpha-key", "face.jpg", &variant(&base, 1)).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.code(), "store_unavailable");
    assert!(refused.header("retry-after").is_some());
    let served = post_image(&fleet.urls[0], "beta-key", "face.jpg", &variant(&base, 2)).await;
    assert_eq!(served.status, 200, "{}", served.text());
    assert_eq!(emu.stats().billable, 1, "the refused call was not made");

    let redis = RedisServer::start_on(port);
    served_within(
        &fleet.urls[0],
        "store_unavailable",
        3,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(used_soon(&fleet.admins[0], "alpha", 1).await, 1);
    assert!(!redis.keys("lg:*alpha*:day:*").is_empty());
}

/// The store's host goes silent without closing anything (it died, its network drops packets,
/// the address moved to a new Redis): the open connection never fails on its own, commands
/// only time out. After a second of nothing but timeouts the gateway connects again, reaches
/// the Redis now behind the address, and budgeted tenants are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_gone_silent_is_left_for_a_new_connection() {
    let old = RedisServer::start();
    let new = RedisServer::start();
    let endpoint = TcpSwitch::start(old.port).await;
    let (fleet, _emu) = served_through(&endpoint).await;

    endpoint.silence();
    endpoint.switch(new.port);
    served_within(
        &fleet.urls[0],
        "store_unavailable",
        2,
        Duration::from_secs(6),
    )
    .await;
    assert!(
        !new.keys("lg:*alpha*:day:*").is_empty(),
        "counted in the Redis now behind the address"
    );
    assert!(
        fleet.procs[0]
            .log()
            .contains("no command has been answered"),
        "{}",
        fleet.procs[0].log()
    );
}

/// One of a replica's connections to the store goes silent (a NAT or a firewall dropped it
/// without a word) while its others go on answering: the silent one is judged by its own
/// answers, dropped after a second of nothing, and made again. Answers on another connection
/// (the replica's maintenance, which reads the fleet clock twice a second) must not keep it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_connection_is_replaced_while_another_answers() {
    let redis = RedisServer::start();
    let endpoint = TcpSwitch::start(redis.port).await;
    let emu = start_emulator();
    let url = format!("redis://127.0.0.1:{}/0", endpoint.port);
    let gw = fleet_gateway(&emu, &url)
        .set("cache.enabled", "false")
        .tenant_set("alpha", "daily_budget", "100");
    let fleet = start_fleet(&gw, 1).await;
    // The maintenance task connects as the replica starts; requests connect at the first one.
    let until = Instant::now() + Duration::from_secs(5);
    while endpoint.accepted() < 1 {
        assert!(Instant::now() < until, "the replica never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = endpoint.accepted();
    let a = post_image(
        &fleet.urls[0],
        "alpha-key",
        "face.jpg",
        &variant(&fixture("face.jpg"), 1),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        endpoint.accepted(),
        first + 1,
        "the requests' own connection"
    );
    endpoint.silence_one(first);
    served_within(
        &fleet.urls[0],
        "store_unavailable",
        2,
        Duration::from_secs(6),
    )
    .await;
    assert!(endpoint.accepted() > first + 1, "connected again");
}

/// `check-config` (online) asks the shared store what a deployment should know before relying
/// on it: whether it answers, may evict keys, keeps an append-only file, and whether another
/// deployment writes under the same key prefix. Warnings, not errors: the file itself is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_config_asks_the_store() {
    let dir = tempfile::tempdir().expect("dir");
    let check = |gw: &TestGateway, name: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, gw.toml()).expect("config");
        let (ok, out) = check_config(&path, false);
        assert!(ok, "{out}");
        out
    };
    let store_lines = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| l.contains("warning: store:"))
            .map(str::to_string)
            .collect()
    };
    let (staging_emu, prod_emu) = (start_emulator(), start_emulator());

    // As a Redis should run (AOF, noeviction), nobody else under the prefix: nothing to say.
    let good = RedisServer::start();
    let out = check(&fleet_gateway(&prod_emu, &good.url()), "good");
    assert!(store_lines(&out).is_empty(), "{out}");

    // Evicting, without AOF, and a staging writing under the same prefix.
    let risky = RedisServer::start_with(&[
        "--maxmemory",
        "64mb",
        "--maxmemory-policy",
        "allkeys-lru",
        "--appendonly",
        "no",
    ]);
    let _staging = start_fleet(&fleet_gateway(&staging_emu, &risky.url()), 1).await;
    let until = Instant::now() + Duration::from_secs(3);
    while risky.cli(&["HLEN", "lg:{deployments}"]) != "1" {
        assert!(Instant::now() < until, "the staging never noted itself");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = check(&fleet_gateway(&prod_emu, &risky.url()), "risky");
    let lines = store_lines(&out);
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].contains("may evict keys") && lines[0].contains("allkeys-lru"),
        "{out}"
    );
    assert!(lines[1].contains("no append-only file"), "{out}");
    let staging_endpoint = format!("http://127.0.0.1:{}", staging_emu.addr.port());
    assert!(
        lines[2].contains("another deployment") && lines[2].contains(&staging_endpoint),
        "{out}"
    );
    assert_eq!(
        risky.cli(&["HLEN", "lg:{deployments}"]),
        "1",
        "check-config writes nothing"
    );

    // Nothing listening.
    let out = check(
        &fleet_gateway(&prod_emu, &format!("redis://127.0.0.1:{}/0", free_port())),
        "down",
    );
    let lines = store_lines(&out);
    assert_eq!(lines.len(), 1, "{out}");
    assert!(lines[0].contains("does not answer"), "{out}");
}

/// A pass read from Redis by another replica lives as long as it had left, not a new
/// `pass_ttl`: replica B never answers HIT after `pass_ttl` from the provider's answer, and its
/// `Age` is the time since the provider answered, whether B found it in Redis or in its own
/// memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shared_pass_ends_at_its_pass_ttl_on_every_replica_with_a_true_age() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url()).set("cache.pass_ttl", "\"6s\"");
    let fleet = start_fleet(&gw, 2).await;
    let (image, _) = image_with_verdict(true, 51_000);
    let paid = post_image(&fleet.urls[0], "alpha-key", "face.jpg", &image).await;
    // The provider answered just before this.
    let answered = Instant::now();
    assert_eq!(paid.status, 200, "{}", paid.text());
    assert_eq!(paid.header("x-cache").as_deref(), Some("MISS"));
    let age = |a: &Answer| a.header("age").and_then(|v| v.parse::<u64>().ok());
    let at =
        |secs: f64| tokio::time::sleep_until((answered + Duration::from_secs_f64(secs)).into());

    at(3.0).await;
    let from_redis = post_image(&fleet.urls[1], "alpha-key", "face.jpg", &image).await;
    assert_eq!(from_redis.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(from_redis.body, paid.body);
    let seen = age(&from_redis);
    assert!(
        matches!(seen, Some(3..=4)),
        "Age {seen:?} 3 s after the answer"
    );

    at(5.0).await;
    let from_memory = post_image(&fleet.urls[1], "alpha-key", "face.jpg", &image).await;
    assert_eq!(from_memory.header("x-cache").as_deref(), Some("HIT"));
    let seen = age(&from_memory);
    assert!(matches!(seen, Some(5)), "Age {seen:?} 5 s after the answer");

    at(6.3).await;
    let expired = post_image(&fleet.urls[1], "alpha-key", "face.jpg", &image).await;
    assert_eq!(expired.status, 200, "{}", expired.text());
    assert_ne!(
        expired.header("x-cache").as_deref(),
        Some("HIT"),
        "a pass served {:?} after the provider's answer (Age {:?}), past pass_ttl (6 s)",
        answered.elapsed(),
        age(&expired)
    );
    assert_eq!(emu.stats().billable, 2);
}

/// 90 uploads at once over three replicas on one healthy local Redis, five times, with the
/// default `store.timeout`: a loaded machine delays answers, but `store_unavailable` must mean
/// the store is down, so none is answered with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_healthy_store_never_reads_as_an_outage_under_a_burst() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("store.backend", "\"redis\"")
        .set("store.url", &format!("\"{}\"", redis.url()))
        .tenant_set("alpha", "daily_budget", "10000");
    let fleet = start_fleet(&gw, 3).await;
    let mut refused = Vec::new();
    for round in 0..5 {
        let answers = spread(&fleet.urls, "alpha-key", 90, 60_000 + round * 100).await;
        refused.push(count(&answers, 503, "store_unavailable"));
        assert!(
            answers
                .iter()
                .all(|(s, c)| *s == 200 || c == "store_unavailable"),
            "{answers:?}"
        );
    }
    assert_eq!(
        refused,
        vec![0; 5],
        "store_unavailable answers in each round of 90"
    );
}

/// A store that stops answering (its connections go silent, and its address leads to a listener
/// that never answers) is an outage: budgeted tenants get `503 store_unavailable`, and once no
/// command has been answered for a second, at once rather than after a timeout each. The
/// timeout is 1 s here, so that a wait for it stands out on a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_stops_answering_is_refused_promptly() {
    let redis = RedisServer::start();
    let endpoint = TcpSwitch::start(redis.port).await;
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("store.backend", "\"redis\"")
        .set(
            "store.url",
            &format!("\"redis://127.0.0.1:{}/0\"", endpoint.port),
        )
        .set("store.timeout", "\"1s\"")
        .set("cache.enabled", "false")
        .tenant_set("alpha", "daily_budget", "100");
    let fleet = start_fleet(&gw, 1).await;
    let base = fixture("face.jpg");
    let a = post_image(&fleet.urls[0], "alpha-key", "face.jpg", &variant(&base, 1)).await;
    assert_eq!(a.status, 200, "{}", a.text());

    // A listener that takes connections and never answers: a hung Redis.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hung_port = hung.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hung.incoming().flatten() {
            held.push(s);
        }
    });
    endpoint.silence();
    endpoint.switch(hung_port);
    let mut took = Vec::new();
    for n in 0..20 {
        let t = Instant::now();
        let a = post_image(
            &fleet.urls[0],
            "alpha-key",
            "face.jpg",
            &variant(&base, 10 + n),
        )
        .await;
        took.push(t.elapsed());
        assert_eq!(
            (a.status, a.code().as_str()),
            (503, "store_unavailable"),
            "{}",
            a.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The first requests wait for their timeouts: they find the store down.
    let waited = took[2..]
        .iter()
        .filter(|t| **t >= Duration::from_millis(300))
        .count();
    assert!(
        waited == 0,
        "{waited} refusals after the first two waited for the store: {took:?}"
    );
    assert_eq!(emu.stats().billable, 1);
    assert!(fleet.procs[0].log().contains("the store counts as down"));
}

/// The calls a replica committed after their hold had lapsed (`budget_late_commits_total`).
async fn late_commits(admin: &str) -> f64 {
    sample(
        &metrics_text(admin).await,
        "liveness_gateway_budget_late_commits_total",
    )
}

/// Redis is killed (`kill -9`) while three calls are at the provider, and stays away for longer
/// than a hold lived before (the longest call and 5 s, measured on Redis's clock, which runs on
/// through the outage), then comes back from its AOF. The calls in flight were billed: their
/// holds still count when Redis is back, so the uploads that come then find the budget used up,
/// and the three commits land, none of them late.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_outage_longer_than_a_hold_never_overshoots_a_budget() {
    let mut redis = RedisServer::start();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url())
        .set("cache.enabled", "false")
        .set("upstream.total_timeout", "\"4s\"")
        .set("limits.upstream_queue_timeout", "\"100ms\"")
        .tenant_set("alpha", "daily_budget", "3");
    let fleet = start_fleet(&gw, 2).await;
    emu.set_latency(Duration::from_secs(2));
    let in_flight = {
        let urls = fleet.urls.clone();
        tokio::spawn(async move { spread(&urls, "alpha-key", 3, 31_000).await })
    };
    let until = Instant::now() + Duration::from_secs(5);
    while emu.stats().in_flight < 3 {
        assert!(
            Instant::now() < until,
            "the three calls never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.kill();
    // Longer than a hold lived before: the longest call (4.2 s) and 5 s.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let answered = in_flight.await.expect("task");
    assert_eq!(count(&answered, 200, ""), 3, "{answered:?}");
    emu.set_latency(Duration::ZERO);
    redis.restart();

    // New uploads to both replicas for 5 s once Redis is back: none is paid for.
    let until = Instant::now() + Duration::from_secs(5);
    let mut after = Vec::new();
    let mut seed = 32_000;
    while Instant::now() < until {
        after.extend(spread(&fleet.urls, "alpha-key", 4, seed).await);
        seed += 10;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let served = count(&after, 200, "");
    let billable = emu.stats().billable;
    let late = late_commits(&fleet.admins[0]).await + late_commits(&fleet.admins[1]).await;
    assert_eq!(
        (billable, served, late),
        (3, 0, 0.0),
        "billed calls, uploads served after the outage, late commits: {after:?}"
    );
    assert!(
        after
            .iter()
            .all(|(s, c)| (*s, c.as_str()) == (429, "budget_exhausted")
                || (*s, c.as_str()) == (503, "store_unavailable")),
        "{after:?}"
    );
    for admin in &fleet.admins {
        assert_eq!(
            used_soon(admin, "alpha", 3).await,
            3,
            "the three calls are committed"
        );
    }
}

/// A reload raises `limits.upstream_queue_timeout`; calls then wait in the queue for longer than
/// a hold or an image lock lived under the start-up config (holds: the longest call, 2.9 s, and
/// 5 s; locks: and 2 s). Their owner is alive: its holds keep counting, so the other replica
/// finds the budget used up, and its lock holds, so the other replica waits for the verdict of
/// an image instead of paying for it a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_that_lengthens_the_queue_keeps_holds_and_locks_alive() {
    let redis = RedisServer::start();
    let emu = start_emulator();
    let gw = fleet_gateway(&emu, &redis.url())
        .set("upstream.total_timeout", "\"2500ms\"")
        .set("limits.upstream_queue_timeout", "\"200ms\"")
        .set("limits.max_concurrent_upstream", "1")
        .tenant_set("alpha", "daily_budget", "5");
    let mut fleet = start_fleet(&gw, 2).await;
    fleet
        .reload_with("limits.upstream_queue_timeout", "\"30s\"")
        .await;
    emu.set_latency(Duration::from_secs(2));
    let started = Instant::now();
    // Replica 0 calls one at a time: alpha's five new images (the budget), then one of beta's
    // (no budget), from 0 to 12 s.
    let first = {
        let url = fleet.urls[..1].to_vec();
        tokio::spawn(async move { spread(&url, "alpha-key", 5, 41_000).await })
    };
    let image = variant(&fixture("face.jpg"), 41_100);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let beta_first = {
        let (url, image) = (fleet.urls[0].clone(), image.clone());
        tokio::spawn(async move { post_image(&url, "beta-key", "face.jpg", &image).await })
    };
    // Past the old lifetimes of the last calls' holds (7.9 s) and of beta's lock (4.9 s), while
    // alpha's fifth call is at the provider and beta's still waits for its turn.
    tokio::time::sleep_until((started + Duration::from_millis(8_500)).into()).await;
    let second = spread(&fleet.urls[1..], "alpha-key", 3, 41_200).await;
    let beta_second = post_image(&fleet.urls[1], "beta-key", "face.jpg", &image).await;
    let first = first.await.expect("task");
    let beta_first = beta_first.await.expect("task");
    assert_eq!(count(&first, 200, ""), 5, "{first:?}");
    assert_eq!(beta_first.status, 200, "{}", beta_first.text());
    assert_eq!(beta_second.status, 200, "{}", beta_second.text());
    let billable = emu.stats().billable;
    let late = late_commits(&fleet.admins[0]).await;
    assert_eq!(
        (count(&second, 429, "budget_exhausted"), billable, late),
        (3, 6, 0.0),
        "refused on the second replica, billed calls (5 of alpha, 1 of beta), late commits: {second:?}"
    );
    assert_eq!(
        beta_second.body, beta_first.body,
        "one paid call for beta's image: the second replica waited for its verdict"
    );
    assert_eq!(used_soon(&fleet.admins[1], "alpha", 5).await, 5);
}
