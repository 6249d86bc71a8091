//! Gateway core, end to end over loopback sockets: the real emulator and the real gateway.

mod support;

use std::time::{Duration, Instant};

use liveness_gateway_dev::emulator::{self, EmulatorConfig, Fault};
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn pass_and_fail_verdicts_pass_through_unchanged() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let (pass_img, _) = image_with_verdict(true, 0);
    let (fail_img, _) = image_with_verdict(false, 0);

    let pass = post_image(&gw.url(), "alpha-key", "face.jpg", &pass_img).await;
    assert_eq!(pass.status, 200, "{}", pass.text());
    let v = pass.json();
    assert_eq!(v["result"], true);
    assert!(v["failure_reason"].is_null());
    let prediction = v["prediction"].as_str().expect("prediction is a string");
    assert_eq!(
        prediction.split('.').nth(1).map(str::len),
        Some(6),
        "six decimals: {prediction}"
    );
    assert!(prediction.parse::<f64>().expect("number") >= 0.5);
    assert!(uuid::Uuid::parse_str(v["backend_session_id"].as_str().expect("id")).is_ok());
    // The provider's field order is kept.
    let keys: Vec<_> = v.as_object().expect("object").keys().cloned().collect();
    assert_eq!(
        keys,
        [
            "backend_session_id",
            "result",
            "prediction",
            "created_at",
            "failure_reason"
        ]
    );
    assert!(pass.header("x-request-id").is_some());
    assert_eq!(
        pass.header("content-type").as_deref(),
        Some("application/json")
    );

    let fail = post_image(&gw.url(), "alpha-key", "face.jpg", &fail_img).await;
    assert_eq!(fail.status, 200);
    let v = fail.json();
    assert_eq!(v["result"], false);
    assert_eq!(v["failure_reason"]["type"], "CALC_RESULT");
    assert!(
        v["prediction"]
            .as_str()
            .expect("p")
            .parse::<f64>()
            .expect("n")
            < 0.5
    );

    let stats = emu.stats();
    assert_eq!(stats.calls, 2);
    assert_eq!(stats.wrong_key_calls, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_credential_form_authenticates() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("cache.enabled", "false")
        .start();
    let img = fixture("face.jpg");

    let bearer = post(
        &gw.url(),
        &[("Authorization", "Bearer alpha-key")],
        multipart(&[Part::image("a.jpg", &img)]),
    )
    .await;
    assert_eq!(bearer.status, 200, "{}", bearer.text());
    let header = post(
        &gw.url(),
        &[("X-Api-Key", "beta-key")],
        multipart(&[Part::image("a.jpg", &img)]),
    )
    .await;
    assert_eq!(header.status, 200, "{}", header.text());
    // Drop-in: the tenant key where the provider expects the organization key, after the image.
    let form = post(
        &gw.url(),
        &[],
        multipart(&[
            Part::image("a.jpg", &img),
            Part::text("api_key", "alpha-key"),
        ]),
    )
    .await;
    assert_eq!(form.status, 200, "{}", form.text());

    let stats = emu.stats();
    assert_eq!(stats.calls, 3);
    assert_eq!(
        stats.wrong_key_calls, 0,
        "the organization key was injected every time"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unauthenticated_requests_never_reach_the_provider() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let img = fixture("face.jpg");
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<Part>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![],
            vec![Part::image("a.jpg", &img)],
            "missing_credentials",
        ),
        (
            vec![("Authorization", "Bearer nope")],
            vec![Part::image("a.jpg", &img)],
            "invalid_credentials",
        ),
        (
            vec![("X-Api-Key", "nope")],
            vec![Part::image("a.jpg", &img)],
            "invalid_credentials",
        ),
        (
            vec![("Authorization", "Bearer off-key")],
            vec![Part::image("a.jpg", &img)],
            "tenant_disabled",
        ),
        (
            vec![],
            vec![Part::image("a.jpg", &img), Part::text("api_key", "nope")],
            "invalid_credentials",
        ),
        (
            vec![],
            vec![Part::image("a.jpg", &img), Part::text("api_key", "off-key")],
            "tenant_disabled",
        ),
        (
            vec![],
            vec![Part::image("a.jpg", &img), Part::text("api_key", "")],
            "missing_credentials",
        ),
        // The organization key itself is not a tenant key.
        (
            vec![],
            vec![Part::image("a.jpg", &img), Part::text("api_key", ORG_KEY)],
            "invalid_credentials",
        ),
    ];
    for (headers, parts, code) in cases {
        let a = post(&gw.url(), &headers, multipart(&parts)).await;
        assert_eq!(
            (a.status, a.code().as_str()),
            (401, code),
            "{headers:?}: {}",
            a.text()
        );
        assert!(!a.json()["detail"].as_str().unwrap_or("").is_empty());
    }
    assert_eq!(emu.stats().calls, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_header_credential_is_checked_before_the_body_is_read() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    // Announce 5 MB, send none of it: the refusal must come at once, not after a body timeout.
    let req = format!(
        "POST {ROUTE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nContent-Type: {}\r\nContent-Length: 5000000\r\n\r\n",
        multipart_ct()
    );
    let started = Instant::now();
    let (status, body) = raw(gw.addr, req.as_bytes(), Duration::from_secs(10));
    assert_eq!(
        (status, json_code(&body).as_str()),
        (401, "invalid_credentials"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "answered without waiting for the body"
    );
    assert_eq!(emu.stats().calls, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_supplied_api_key_is_never_forwarded() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let body = multipart(&[
        Part::text("api_key", "client-supplied-value"),
        Part::text("note", "x"),
        Part::image("face.jpg", &fixture("face.jpg")),
    ]);
    let a = post(&gw.url(), &[("Authorization", "Bearer alpha-key")], body).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let s = emu.stats();
    assert_eq!(s.wrong_key_calls, 0);
    assert_eq!(s.duplicate_key_calls, 0);
    assert_eq!(
        s.last_fields,
        ["api_key", "image"],
        "only the organization key and the image go upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_image_arrives_intact() {
    let emu = start_emulator();
    // The bytes as sent, to check the body's way through (face.png has a comment and a time
    // chunk, which `strip_metadata` takes out: tests/intake.rs checks that).
    let gw = TestGateway::for_emulator(&emu)
        .set("intake.strip_metadata", "false")
        .start();
    let big = fixture("face-large.jpg");
    assert!(big.len() > 1_500_000);
    let a = post_image(&gw.url(), "alpha-key", "face-large.JPG", &big).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let s = emu.stats();
    assert_eq!(s.last_image_len, Some(big.len() as u64));
    assert_eq!(
        s.last_image_sha256.as_deref(),
        Some(sha256_hex(&big).as_str())
    );
    // PNG too.
    let png = fixture("face.png");
    let a = post(
        &gw.url(),
        &[("X-Api-Key", "alpha-key")],
        multipart(&[Part::file("image", "face.png", "image/png", &png)]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        emu.stats().last_image_sha256.as_deref(),
        Some(sha256_hex(&png).as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_providers_curl_command_works_with_the_url_changed() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let photo =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/face.jpg");
    // The provider's own example, with the gateway's URL and the tenant key as `api_key`.
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-X", "POST", &format!("{}{ROUTE}", gw.url())])
        .args([
            "-H",
            "accept: application/json",
            "-H",
            "Content-Type: multipart/form-data",
        ])
        .args([
            "-F",
            &format!("image=@{};type=image/jpeg", photo.display()),
            "-F",
            "api_key=alpha-key",
        ])
        .args(["-w", "\n%{http_code}"])
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').expect("status line");
    assert_eq!(code, "200", "{text}");
    let v: serde_json::Value = serde_json::from_str(body).expect("json");
    assert!(v["result"].is_boolean());
    assert_eq!(emu.stats().wrong_key_calls, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_providers_python_example_works_with_the_url_changed() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let photo =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/face.jpg");
    let script = format!(
        r#"
import requests
url = '{url}{ROUTE}'
headers = {{'accept': 'application/json'}}
face_photo_path = '{photo}'
files = {{'image': ('face.jpg', open(face_photo_path, 'rb'), 'image/jpeg')}}
data = {{'api_key': 'alpha-key'}}
response = requests.post(url, headers=headers, files=files, data=data)
print(response.status_code)
print(response.json()['result'])
"#,
        url = gw.url(),
        photo = photo.display()
    );
    let out = tokio::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed (is `requests` installed? .ci/run installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("200"));
    assert!(matches!(lines.next(), Some("True" | "False")));
}

#[tokio::test(flavor = "multi_thread")]
async fn routing_errors_are_json() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let c = client();
    let r = c
        .get(format!("{}/nope", gw.url()))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["code"], "not_found");
    assert!(
        v["hint"]
            .as_str()
            .is_some_and(|h| h.contains("POST /api/v1/backend/liveness/short/")),
        "the route it was meant for: {v}"
    );
    let r = c
        .get(format!("{}/nope", gw.admin_url()))
        .send()
        .await
        .expect("req");
    let v: serde_json::Value = r.json().await.expect("json");
    assert!(
        v["hint"]
            .as_str()
            .is_some_and(|h| h.contains("GET /healthz") && h.contains("/admin/reload")),
        "the admin routes: {v}"
    );
    let r = c
        .get(format!("{}{ROUTE}", gw.url()))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.headers().get("allow").and_then(|v| v.to_str().ok()),
        Some("POST")
    );
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["code"], "method_not_allowed");
    assert!(
        v["hint"].as_str().is_some_and(|h| h.contains("Allow")),
        "{v}"
    );
    // The trailing slash is optional.
    let no_slash = c
        .post(format!("{}{}", gw.url(), ROUTE.trim_end_matches('/')))
        .header("Authorization", "Bearer alpha-key")
        .header("Content-Type", multipart_ct())
        .body(multipart(&[Part::image("a.jpg", &fixture("face.jpg"))]))
        .send()
        .await
        .expect("req");
    assert_eq!(no_slash.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_refusing_connections_is_a_502() {
    let closed = free_port();
    let gw = TestGateway::new(&format!("http://127.0.0.1:{closed}")).start();
    let a = post_image(&gw.url(), "alpha-key", "face.jpg", &fixture("face.jpg")).await;
    assert_eq!(
        (a.status, a.code().as_str()),
        (502, "upstream_unreachable"),
        "{}",
        a.text()
    );
}

/// One photo through a gateway (with `settings`) in front of a provider that never answers:
/// the answer must be a 504 `upstream_timeout`, sent once upstream. Returns how long it took.
async fn time_to_504(settings: &[(&str, &str)]) -> Duration {
    let emu = start_emulator();
    emu.set_fault(Fault::Hang);
    let gw = settings
        .iter()
        .fold(TestGateway::for_emulator(&emu), |b, (k, v)| b.set(k, v))
        .start();
    let started = Instant::now();
    let a = post_image(&gw.url(), "alpha-key", "face.jpg", &fixture("face.jpg")).await;
    let took = started.elapsed();
    assert_eq!(
        (a.status, a.code().as_str()),
        (504, "upstream_timeout"),
        "{}",
        a.text()
    );
    assert_eq!(
        emu.stats().calls,
        1,
        "a request that was sent is not sent again"
    );
    took
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_upstream_is_a_504_within_the_deadline() {
    let took = time_to_504(&[("upstream.total_timeout", "\"1s\"")]).await;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "answered after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_read_timeout_bounds_the_wait_for_an_answer() {
    let took = time_to_504(&[
        ("upstream.read_timeout", "\"500ms\""),
        ("upstream.total_timeout", "\"30s\""),
    ])
    .await;
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(10),
        "answered after {took:?}: the read timeout, not the 30 s deadline, should end the wait"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_errors_pass_through_or_become_gateway_errors() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let img = fixture("face.jpg");
    for (fault, status, expect, code) in [
        (
            Fault::NoSubscription,
            400,
            "Client does not have subscription",
            "upstream_no_subscription",
        ),
        (
            Fault::SubscriptionNotStarted,
            400,
            "Subscription has not started",
            "upstream_subscription_not_started",
        ),
        (
            Fault::NoActiveSubscription,
            400,
            "No active or future subscription for technology",
            "upstream_no_active_subscription",
        ),
        (
            Fault::NoAccess,
            400,
            "Client does not have access to Liveness technology",
            "upstream_no_access",
        ),
        (
            Fault::ServiceUnavailable,
            400,
            "Could not send image to liveness service",
            "upstream_service_unavailable",
        ),
    ] {
        emu.set_fault(fault);
        let a = post_image(&gw.url(), "alpha-key", "face.jpg", &img).await;
        assert_eq!(a.status, status, "{fault:?}");
        assert_eq!(
            a.json()["detail"],
            expect,
            "the provider's own words pass through"
        );
        // With a stable code beside them: it is the organization's subscription, not the
        // tenant's request, and clients can switch on it.
        assert_eq!(a.code(), code, "{fault:?}");
    }
    for (fault, code) in [
        (Fault::ServerError, "upstream_error"),
        (Fault::InvalidJson, "upstream_invalid_response"),
        (Fault::Reset, "upstream_invalid_response"),
    ] {
        emu.set_fault(fault);
        let a = post_image(&gw.url(), "alpha-key", "face.jpg", &img).await;
        assert_eq!(
            (a.status, a.code().as_str()),
            (502, code),
            "{fault:?}: {}",
            a.text()
        );
    }
    emu.set_fault(Fault::None);
    let a = post_image(&gw.url(), "alpha-key", "face.jpg", &img).await;
    assert_eq!(a.status, 200, "the gateway recovers once the provider does");
}

fn test_ca(
    dir: &std::path::Path,
    host: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let leaf_key = KeyPair::generate().expect("key");
    let mut leaf_params = CertificateParams::new(vec![host.to_string()]).expect("params");
    leaf_params.is_ca = IsCa::ExplicitNoCa;
    let leaf = leaf_params
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf");
    let (ca_path, cert_path, key_path) = (
        dir.join("ca.pem"),
        dir.join("leaf.pem"),
        dir.join("leaf.key"),
    );
    std::fs::write(&ca_path, ca.pem()).expect("write");
    std::fs::write(&cert_path, leaf.pem()).expect("write");
    std::fs::write(&key_path, leaf_key.serialize_pem()).expect("write");
    (ca_path, cert_path, key_path)
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_to_the_upstream_with_a_test_ca_and_sni() {
    let dir = tempfile::tempdir().expect("dir");
    let host = "liveness-upstream.test";
    let (ca, cert, key) = test_ca(dir.path(), host);
    let emu = emulator::spawn(EmulatorConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        api_key: ORG_KEY.into(),
        more_keys: Vec::new(),
        latency: Duration::ZERO,
        fault: Fault::None,
        tls: Some((cert, key)),
    })
    .expect("tls emulator");
    let url = format!("https://{host}:{}", emu.addr.port());
    let gw = TestGateway::new(&url)
        .set("upstream.connect_address", "\"127.0.0.1\"")
        .set(
            "upstream.ca_file",
            &format!("{:?}", ca.display().to_string()),
        )
        .start();
    let a = post_image(
        &gw.url(),
        "alpha-key",
        "face.jpg",
        &fixture("face-selfie.jpg"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let s = emu.stats();
    assert_eq!(
        s.last_sni.as_deref(),
        Some(host),
        "SNI names the upstream host"
    );
    assert_eq!(s.wrong_key_calls, 0);

    // Without the test CA the certificate is not trusted: no call is made in the clear.
    let untrusted = TestGateway::new(&url)
        .set("upstream.connect_address", "\"127.0.0.1\"")
        .start();
    let a = post_image(
        &untrusted.url(),
        "alpha-key",
        "face.jpg",
        &fixture("face-small.jpg"),
    )
    .await;
    assert_eq!(a.status, 502, "{}", a.text());
    assert_eq!(emu.stats().calls, 1);
}

/// A credential header that is there but malformed is named as such, not as a missing one.
#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_authorization_header_is_named() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let img = fixture("face.jpg");
    for header in ["alpha-key", "Basic YWxwaGE6a2V5", "Bearer "] {
        let a = post(
            &gw.url(),
            &[("Authorization", header)],
            multipart(&[Part::image("a.jpg", &img)]),
        )
        .await;
        assert_eq!(
            (a.status, a.code().as_str()),
            (401, "malformed_credentials"),
            "{header}"
        );
        assert!(
            a.text().contains("Bearer"),
            "the detail says the expected form"
        );
    }
    assert_eq!(emu.stats().calls, 0);
}

/// An early refusal (here a 401) reaches a client that goes on sending its body: the gateway
/// reads and throws away the rest of the body (up to `intake.drain_max_bytes`) before it closes,
/// so the client reads the answer instead of a reset connection.
#[tokio::test(flavor = "multi_thread")]
async fn an_early_refusal_reaches_a_client_still_sending_its_body() {
    use std::io::{Read, Write};
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let body = multipart(&[Part::image("face.jpg", &fixture("face-large.jpg"))]);
    let addr = gw.url().trim_start_matches("http://").to_string();
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let head = format!(
            "POST {ROUTE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-key\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
            multipart_ct(),
            body.len()
        );
        s.write_all(head.as_bytes()).expect("head");
        // The answer is written now; the body follows after it.
        std::thread::sleep(std::time::Duration::from_millis(200));
        // A client library stops at a failed write, and never reads the answer.
        let sent = s.write_all(&body);
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        (sent.is_ok(), String::from_utf8_lossy(&got).to_string())
    })
    .await
    .expect("client");
    let (sent, answer) = answer;
    assert!(sent, "the body could not be sent: the connection was reset");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");
    assert!(answer.contains("invalid_credentials"), "{answer}");
}
