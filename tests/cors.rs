//! CORS for browser clients, against the real gateway: preflights answered before anything
//! else, CORS headers on every answer to an allowed origin (errors included), none for other
//! origins, and tenants restricted to their own origins.

mod support;

use support::*;

const APP: &str = "https://app.example.com";
const OTHER: &str = "https://evil.example.net";

fn gateway(emu: &liveness_gateway_dev::emulator::EmulatorHandle) -> TestGateway {
    TestGateway::for_emulator(emu)
        .set(
            "cors.allowed_origins",
            &format!("[\"{APP}\", \"https://web.example.org\"]"),
        )
        .set("cors.max_age", "\"10m\"")
        .tenant_set("beta", "allowed_origins", "[\"https://web.example.org\"]")
        .tenant_set("beta", "rate", "\"1/h\"")
        .tenant_set("beta", "burst", "1")
}

async fn preflight(url: &str, origin: &str) -> reqwest::Response {
    client()
        .request(reqwest::Method::OPTIONS, format!("{url}{ROUTE}"))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization, content-type",
        )
        .send()
        .await
        .expect("preflight")
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_preflight_is_answered_before_anything_else() {
    let emu = start_emulator();
    let gw = gateway(&emu).start();
    let url = gw.url();
    let ok = preflight(&url, APP).await;
    assert_eq!(ok.status().as_u16(), 204);
    assert_eq!(header(&ok, "access-control-allow-origin"), Some(APP));
    assert_eq!(header(&ok, "vary"), Some("Origin"));
    assert_eq!(
        header(&ok, "access-control-allow-methods"),
        Some("POST, OPTIONS")
    );
    let allowed = header(&ok, "access-control-allow-headers").expect("allow-headers");
    for h in ["Authorization", "X-Api-Key", "Content-Type", "X-Request-Id"] {
        assert!(allowed.contains(h), "{h} not in {allowed}");
    }
    assert_eq!(header(&ok, "access-control-max-age"), Some("600"));
    // No credential, no body: a preflight costs nothing and calls nothing.
    assert_eq!(emu.stats().calls, 0);

    let other = preflight(&url, OTHER).await;
    assert_eq!(other.status().as_u16(), 204);
    assert!(header(&other, "access-control-allow-origin").is_none());
    assert!(header(&other, "access-control-allow-methods").is_none());
    assert_eq!(header(&other, "vary"), Some("Origin"));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_to_an_allowed_origin_carries_the_cors_headers() {
    let emu = start_emulator();
    let gw = gateway(&emu).start();
    let url = gw.url();
    let image = fixture("face.jpg");
    let send = |key: &'static str, origin: &'static str, body: Vec<u8>| {
        let url = url.clone();
        async move {
            client()
                .post(format!("{url}{ROUTE}"))
                .header("Authorization", format!("Bearer {key}"))
                .header("Origin", origin)
                .header("Content-Type", multipart_ct())
                .body(body)
                .send()
                .await
                .expect("post")
        }
    };
    let form = |img: &[u8]| multipart(&[Part::image("face.jpg", img)]);
    let verdict = send("alpha-key", APP, form(&image)).await;
    let wrong_key = send("nobody-key", APP, form(&image)).await;
    let not_image = send("alpha-key", APP, form(b"not an image, not at all")).await;
    let cases = [(verdict, 200), (wrong_key, 401), (not_image, 400)];
    for (r, status) in &cases {
        assert_eq!(r.status().as_u16(), *status);
        assert_eq!(
            header(r, "access-control-allow-origin"),
            Some(APP),
            "{status}"
        );
        assert_eq!(header(r, "vary"), Some("Origin"), "{status}");
        let expose = header(r, "access-control-expose-headers").expect("expose");
        for h in [
            "X-Request-Id",
            "X-Cache",
            "Age",
            "RateLimit",
            "RateLimit-Policy",
            "Retry-After",
        ] {
            assert!(expose.contains(h), "{h} not exposed on {status}");
        }
    }
    // A 429 from beta's rate limit (one an hour), from beta's own origin.
    let web = "https://web.example.org";
    let first = send("beta-key", web, form(&variant(&image, 1))).await;
    assert_eq!(first.status().as_u16(), 200);
    let limited = send("beta-key", web, form(&variant(&image, 2))).await;
    assert_eq!(limited.status().as_u16(), 429);
    assert_eq!(header(&limited, "access-control-allow-origin"), Some(web));
    assert!(header(&limited, "retry-after").is_some());
    // Another origin: an answer, but nothing that lets a page read it.
    let other = send("alpha-key", OTHER, form(&image)).await;
    assert_eq!(other.status().as_u16(), 200);
    assert!(header(&other, "access-control-allow-origin").is_none());
    assert_eq!(header(&other, "vary"), Some("Origin"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_restricted_to_its_origins_refuses_others() {
    let emu = start_emulator();
    // Room for every request here, so only the origin decides.
    let gw = gateway(&emu).tenant_set("beta", "burst", "3").start();
    let url = gw.url();
    let image = fixture("face.jpg");
    let from = |origin: Option<&'static str>| {
        let url = url.clone();
        let body = multipart(&[Part::image("face.jpg", &image)]);
        async move {
            let mut req = client()
                .post(format!("{url}{ROUTE}"))
                .header("Authorization", "Bearer beta-key")
                .header("Content-Type", multipart_ct())
                .body(body);
            if let Some(o) = origin {
                req = req.header("Origin", o);
            }
            req.send().await.expect("post")
        }
    };
    let refused = from(Some(APP)).await;
    assert_eq!(refused.status().as_u16(), 403);
    // Allowed by [cors], so the page can read why.
    assert_eq!(header(&refused, "access-control-allow-origin"), Some(APP));
    let body: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(body["code"], "origin_not_allowed");
    assert_eq!(emu.stats().calls, 0, "a refused origin costs nothing");
    // Its own origin, and no Origin at all (an app, a server), are served.
    assert_eq!(
        from(Some("https://web.example.org"))
            .await
            .status()
            .as_u16(),
        200
    );
    assert_eq!(from(None).await.status().as_u16(), 200);
}

/// Without `[cors]`, nothing changes: no CORS header, and OPTIONS is not a route.
#[tokio::test(flavor = "multi_thread")]
async fn without_cors_no_cors_headers() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let r = preflight(&gw.url(), APP).await;
    assert_eq!(r.status().as_u16(), 405);
    assert!(header(&r, "access-control-allow-origin").is_none());
    assert!(header(&r, "vary").is_none());
}
