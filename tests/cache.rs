//! The verdict cache and single-flight: each distinct image is billed once.

mod support;

use std::io::Write;
use std::time::Duration;

use liveness_gateway_dev::emulator::Fault;
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_same_image_twice_is_one_call() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let img = fixture("face.jpg");
    let first = post_image(&gw.url(), "alpha-key", "a.jpg", &img).await;
    assert_eq!(
        (first.status, first.header("x-cache").as_deref()),
        (200, Some("MISS"))
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The same bytes under another name and another credential form are the same image.
    let second = post(
        &gw.url(),
        &[],
        multipart(&[
            Part::image("other-name.JPG", &img),
            Part::text("api_key", "alpha-key"),
        ]),
    )
    .await;
    assert_eq!(
        (second.status, second.header("x-cache").as_deref()),
        (200, Some("HIT"))
    );
    assert_eq!(second.body, first.body, "byte for byte the first answer");
    assert!(
        second
            .header("age")
            .expect("Age")
            .parse::<u64>()
            .expect("secs")
            >= 1
    );
    assert_eq!(emu.stats().calls, 1);

    let cache = admin_json(&gw.admin_url(), "/admin/cache").await;
    assert_eq!(cache["entries"], 1);
    assert!(cache["bytes"].as_u64().expect("bytes") >= first.body.len() as u64);
    assert_eq!(cache["hit_ratio"], 0.5);
    let usage = admin_json(&gw.admin_url(), "/admin/usage").await;
    assert_eq!(usage["tenants"][0]["cache_hits_saved"], 1);
    assert_eq!(
        usage["tenants"][0]["daily"]["used"], 1,
        "the hit cost nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_uploads_of_a_new_image_make_one_call() {
    let emu = start_emulator();
    emu.set_latency(Duration::from_millis(400));
    let gw = TestGateway::for_emulator(&emu).start();
    let img = fixture("face-selfie.jpg");
    let url = gw.url();
    let answers = futures_util::future::join_all(
        (0..50).map(|_| post_image(&url, "alpha-key", "a.jpg", &img)),
    )
    .await;
    assert_eq!(emu.stats().calls, 1, "exactly one call for fifty uploads");
    let mut labels = std::collections::HashMap::new();
    for a in &answers {
        assert_eq!(a.status, 200);
        assert_eq!(a.body, answers[0].body, "everyone gets the same answer");
        *labels
            .entry(a.header("x-cache").expect("X-Cache"))
            .or_insert(0) += 1;
    }
    assert_eq!(labels.get("MISS"), Some(&1), "{labels:?}");
    assert!(
        labels.get("COALESCED").copied().unwrap_or(0) >= 1,
        "{labels:?}"
    );
    assert_eq!(labels.values().sum::<i32>(), 50);
    assert!(labels
        .keys()
        .all(|k| ["MISS", "HIT", "COALESCED"].contains(&k.as_str())));
}

#[tokio::test(flavor = "multi_thread")]
async fn scope_is_per_tenant_unless_shared() {
    let emu = start_emulator();
    let img = fixture("face.png");
    let png = |key: &'static str, url: String| {
        let img = img.clone();
        async move {
            post(
                &url,
                &[("X-Api-Key", key)],
                multipart(&[Part::file("image", "f.png", "image/png", &img)]),
            )
            .await
        }
    };
    let gw = TestGateway::for_emulator(&emu).start();
    assert_eq!(
        png("alpha-key", gw.url())
            .await
            .header("x-cache")
            .as_deref(),
        Some("MISS")
    );
    assert_eq!(
        png("beta-key", gw.url()).await.header("x-cache").as_deref(),
        Some("MISS")
    );
    assert_eq!(
        emu.stats().calls,
        2,
        "tenant scope: no tenant learns about another's images"
    );
    drop(gw);

    emu.reset_stats();
    let gw = TestGateway::for_emulator(&emu)
        .set("cache.scope", "\"shared\"")
        .start();
    assert_eq!(
        png("alpha-key", gw.url())
            .await
            .header("x-cache")
            .as_deref(),
        Some("MISS")
    );
    assert_eq!(
        png("beta-key", gw.url()).await.header("x-cache").as_deref(),
        Some("HIT")
    );
    assert_eq!(emu.stats().calls, 1, "shared scope: one call for both");
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_and_timeouts_are_not_cached_and_waiters_share_them() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("upstream.total_timeout", "\"1s\"")
        .start();
    let img = fixture("face.jpg");
    let url = gw.url();

    for fault in [
        Fault::NoSubscription,
        Fault::ServerError,
        Fault::InvalidJson,
        Fault::Reset,
    ] {
        emu.set_fault(fault);
        emu.reset_stats();
        let a = post_image(&url, "alpha-key", "a.jpg", &img).await;
        assert_ne!(a.status, 200);
        let b = post_image(&url, "alpha-key", "a.jpg", &img).await;
        assert_eq!(b.status, a.status, "{fault:?}");
        assert_ne!(
            b.header("x-cache").as_deref(),
            Some("HIT"),
            "{fault:?}: an error is never a hit"
        );
        assert_eq!(
            emu.stats().calls,
            2,
            "{fault:?}: not cached, the next attempt calls again"
        );
    }

    // A hanging provider: ten identical uploads wait for one call and all get its 504.
    emu.set_fault(Fault::Hang);
    emu.reset_stats();
    let answers = futures_util::future::join_all(
        (0..10).map(|_| post_image(&url, "alpha-key", "a.jpg", &img)),
    )
    .await;
    assert!(
        answers
            .iter()
            .all(|a| a.status == 504 && a.code() == "upstream_timeout"),
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    assert_eq!(
        emu.stats().calls,
        1,
        "no thundering herd on a sick provider"
    );

    emu.set_fault(Fault::None);
    let ok = post_image(&url, "alpha-key", "a.jpg", &img).await;
    assert_eq!(
        (ok.status, ok.header("x-cache").as_deref()),
        (200, Some("MISS"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_still_gets_a_free_retry() {
    let emu = start_emulator();
    emu.set_latency(Duration::from_millis(800));
    let gw = TestGateway::for_emulator(&emu).start();
    let img = fixture("face-selfie.jpg");
    let body = multipart(&[Part::image("a.jpg", &img)]);
    let mut s = std::net::TcpStream::connect(gw.addr).expect("connect");
    let head = format!("POST {ROUTE} HTTP/1.1\r\nHost: x\r\nX-Api-Key: alpha-key\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n", multipart_ct(), body.len());
    s.write_all(head.as_bytes()).expect("head");
    s.write_all(&body).expect("body");
    std::thread::sleep(Duration::from_millis(200));
    drop(s); // the weak mobile connection drops while the provider works

    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(emu.stats().calls, 1, "the call ran to completion");
    let retry = post_image(&gw.url(), "alpha-key", "a.jpg", &img).await;
    assert_eq!(
        (retry.status, retry.header("x-cache").as_deref()),
        (200, Some("HIT")),
        "{}",
        retry.text()
    );
    assert_eq!(emu.stats().calls, 1, "the retry was not billed");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_is_bounded_in_bytes_and_time() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("cache.max_bytes", "4096")
        .set("cache.ttl", "\"1s\"")
        .set("cache.pass_ttl", "\"1s\"")
        .start();
    let base = fixture("face.jpg");
    for n in 0..40 {
        let a = post_image(&gw.url(), "alpha-key", "a.jpg", &variant(&base, n)).await;
        assert_eq!(a.status, 200);
        let c = admin_json(&gw.admin_url(), "/admin/cache").await;
        assert!(
            c["bytes"].as_u64().expect("bytes") <= 4096,
            "over the bound after {n}: {c}"
        );
    }
    let c = admin_json(&gw.admin_url(), "/admin/cache").await;
    assert!(
        c["entries"].as_u64().expect("n") < 40 && c["entries"].as_u64().expect("n") > 0,
        "{c}"
    );

    emu.reset_stats();
    let img = variant(&base, 999);
    assert_eq!(
        cache_label(&gw.url(), "alpha-key", &img).await.as_deref(),
        Some("MISS")
    );
    assert_eq!(
        cache_label(&gw.url(), "alpha-key", &img).await.as_deref(),
        Some("HIT")
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        cache_label(&gw.url(), "alpha-key", &img).await.as_deref(),
        Some("MISS"),
        "expired"
    );
    assert_eq!(emu.stats().calls, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_purge_and_bypass_policy() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let img = fixture("face.jpg");
    post_image(&gw.url(), "alpha-key", "a.jpg", &img).await;
    post_image(&gw.url(), "beta-key", "a.jpg", &img).await;
    // Without allow_bypass a client cannot force a paid call.
    let forced = post(
        &gw.url(),
        &[("X-Api-Key", "alpha-key"), ("Cache-Control", "no-cache")],
        multipart(&[Part::image("a.jpg", &img)]),
    )
    .await;
    assert_eq!(forced.header("x-cache").as_deref(), Some("HIT"));

    let c = client();
    let r = c
        .delete(format!("{}/admin/cache?tenant=alpha", gw.admin_url()))
        .send()
        .await
        .expect("purge");
    assert_eq!(r.status(), 200);
    assert_eq!(
        admin_json(&gw.admin_url(), "/admin/cache").await["entries"],
        1
    );
    assert_eq!(
        cache_label(&gw.url(), "alpha-key", &img).await.as_deref(),
        Some("MISS")
    );
    assert_eq!(
        cache_label(&gw.url(), "beta-key", &img).await.as_deref(),
        Some("HIT")
    );
    let r = c
        .delete(format!("{}/admin/cache?tenant=nobody", gw.admin_url()))
        .send()
        .await
        .expect("purge");
    assert_eq!(r.status(), 404);
    let r = c
        .delete(format!("{}/admin/cache", gw.admin_url()))
        .send()
        .await
        .expect("purge");
    assert_eq!(r.status(), 200);
    assert_eq!(
        admin_json(&gw.admin_url(), "/admin/cache").await["entries"],
        0
    );

    let open = TestGateway::for_emulator(&emu)
        .set("cache.allow_bypass", "true")
        .start();
    post_image(&open.url(), "alpha-key", "a.jpg", &img).await;
    let forced = post(
        &open.url(),
        &[("X-Api-Key", "alpha-key"), ("Cache-Control", "no-cache")],
        multipart(&[Part::image("a.jpg", &img)]),
    )
    .await;
    assert_eq!(
        forced.header("x-cache").as_deref(),
        Some("MISS"),
        "allowed by config"
    );
}
