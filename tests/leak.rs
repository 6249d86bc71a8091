//! The organization key must never leave the gateway except in the upstream body, and no other
//! secret (tenant keys, the admin token) may appear in an answer or a log line either. This runs the
//! real binary with debug logging, drives every kind of request through it (verdicts, refusals,
//! upstream faults, answers that echo a secret however they escape it, admin endpoints), and
//! searches every response and every log line for every secret, in every form it could be
//! read back in (`secret_forms`).

mod support;

use std::time::Duration;

use liveness_gateway_dev::emulator::{Escape, Fault};
use support::*;

const ADMIN_TOKEN: &str = "admin-token-5f2b9c1e-never-print-me";

#[tokio::test(flavor = "multi_thread")]
async fn the_organization_key_appears_in_no_response_header_or_log_line() {
    let emu = start_emulator();
    let dir = tempfile::tempdir().expect("dir");
    let builder = TestGateway::for_emulator(&emu)
        .set("server.log_format", "\"json\"")
        .set("server.admin_token_env", "\"LG_TEST_ADMIN_TOKEN\"")
        .set("upstream.total_timeout", "\"1s\"");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, builder.toml()).expect("config");
    let cfg = liveness_gateway::config::Config::from_toml(&builder.toml(), &|n| match n {
        ORG_KEY_ENV => Some(ORG_KEY.into()),
        "LG_TEST_ADMIN_TOKEN" => Some(ADMIN_TOKEN.into()),
        _ => None,
    })
    .expect("config");
    let mut gw = GatewayProcess::spawn(
        &path,
        dir.path(),
        "gw",
        false,
        &[("RUST_LOG", "trace"), ("LG_TEST_ADMIN_TOKEN", ADMIN_TOKEN)],
    );
    wait_listening(&cfg).await;
    let (url, admin) = (
        format!("http://{}", cfg.listen),
        format!("http://{}", cfg.admin_listen),
    );

    let mut seen = String::new();
    let mut record = |a: &Answer| {
        for (k, v) in a.headers.iter() {
            seen.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("")));
        }
        seen.push_str(&a.text());
        seen.push('\n');
    };
    let img = fixture("face.jpg");
    let (pass, _) = image_with_verdict(true, 100);
    let (fail, _) = image_with_verdict(false, 100);
    record(&post_image(&url, "alpha-key", "a.jpg", &pass).await);
    record(&post_image(&url, "alpha-key", "a.jpg", &pass).await);
    record(&post_image(&url, "alpha-key", "a.jpg", &fail).await);
    record(&post_image(&url, "nope", "a.jpg", &img).await);
    record(
        &post(
            &url,
            &[],
            multipart(&[Part::image("a.jpg", &img), Part::text("api_key", ORG_KEY)]),
        )
        .await,
    );
    record(
        &post(
            &url,
            &[("X-Api-Key", "alpha-key")],
            multipart(&[Part::image("a.gif", &img)]),
        )
        .await,
    );
    record(
        &post(
            &url,
            &[("X-Api-Key", "alpha-key")],
            multipart(&[Part::image("a.jpg", b"<html>not an image</html>")]),
        )
        .await,
    );
    record(&post(&url, &[("X-Api-Key", "alpha-key")], b"garbage".to_vec()).await);
    for (n, fault) in [
        Fault::NoSubscription,
        Fault::ServerError,
        Fault::InvalidJson,
        Fault::Reset,
        Fault::Hang,
        Fault::NoAccess,
    ]
    .into_iter()
    .enumerate()
    {
        emu.set_fault(fault);
        record(&post_image(&url, "beta-key", "a.jpg", &variant(&img, 500 + n as u64)).await);
    }
    let mut echo_codes = Vec::new();
    // Answers that echo a secret: the key as PHP, .NET, `\uXXXX`, base64 write it, in a refusal,
    // a verdict, a plain-text sentence, a header; a tenant key and the admin token too.
    for (n, (fault, escape, text)) in [
        (Fault::EchoKey, Escape::Php, None),
        (Fault::EchoKeyRefusal, Escape::Mixed, None),
        (Fault::EchoKeyVerdict, Escape::Unicode, None),
        (Fault::EchoKeyText, Escape::Base64, None),
        (Fault::EchoKeyHeader, Escape::Serde, None),
        (Fault::EchoKeyVerdict, Escape::Unicode, Some(ADMIN_TOKEN)),
        (Fault::EchoKeyRefusal, Escape::Percent, Some("beta-key")),
    ]
    .into_iter()
    .enumerate()
    {
        emu.set_fault(fault);
        emu.set_echo(escape, text);
        let image = variant(&img, 600 + n as u64);
        for _ in 0..2 {
            let a = post_image(&url, "alpha-key", "a.jpg", &image).await;
            echo_codes.push(format!("{fault:?}/{escape:?}: {} {}", a.status, a.code()));
            record(&a);
        }
    }
    emu.set_echo(Escape::Serde, None);
    emu.set_fault(Fault::None);
    let c = client();
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/admin/usage",
        "/admin/cache",
    ] {
        let r = c
            .get(format!("{admin}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("admin");
        seen.push_str(&r.text().await.expect("text"));
    }
    // A wrong token and a reload answer too.
    for token in ["wrong-token", ADMIN_TOKEN] {
        let r = c
            .post(format!("{admin}/admin/reload"))
            .bearer_auth(token)
            .send()
            .await
            .expect("reload");
        seen.push_str(&r.text().await.expect("text"));
    }
    let r = c.get(format!("{url}/nope")).send().await.expect("404");
    seen.push_str(&r.text().await.expect("text"));

    // Graceful stop, so every buffered log line is written.
    gw.signal("TERM");
    gw.wait_exit(Duration::from_secs(20));
    let stdout = std::fs::read_to_string(&gw.stdout).expect("stdout");
    let stderr = std::fs::read_to_string(&gw.stderr).expect("stderr");

    // The capture is real: it holds the access lines of the requests above.
    let access_lines = stdout
        .lines()
        .filter(|l| l.contains("\"request_id\""))
        .count();
    assert!(
        access_lines >= 14,
        "expected an access line per request, found {access_lines}:\n{stdout}"
    );
    assert!(emu.stats().calls >= 8, "the key did travel upstream");
    for (name, text) in [
        ("responses", &seen),
        ("stdout", &stdout),
        ("stderr", &stderr),
    ] {
        assert!(
            !holds_secret(text, ORG_KEY),
            "the organization key leaked into {name}"
        );
        assert!(
            !holds_secret(text, &ORG_KEY[..20]),
            "part of the organization key leaked into {name}"
        );
        // Tenant keys and the admin token are secrets too.
        for secret in ["alpha-key", "beta-key", ADMIN_TOKEN] {
            assert!(!holds_secret(text, secret), "{secret} leaked into {name}");
        }
    }
    assert!(
        echo_codes
            .iter()
            .all(|c| c.ends_with(": 502 upstream_secret_echo")),
        "{echo_codes:#?}"
    );
}
