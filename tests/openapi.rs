//! The OpenAPI spec against the running gateway: schemathesis generates requests from
//! deploy/openapi.yaml and checks that no answer is a 5xx and that every answer conforms.

mod support;

use support::*;

fn run_schemathesis(url: &str, extra: &[&str]) -> (bool, String) {
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/openapi.yaml");
    // schemathesis keeps a cache in its working folder: give it one of its own.
    let cwd = tempfile::tempdir().expect("dir");
    let out = std::process::Command::new("python3")
        .current_dir(cwd.path())
        .args(["-m", "schemathesis.cli", "run", spec, "--url", url])
        .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance,unsupported_method"])
        .args(["--max-examples", "60", "--seed", "20261125", "--request-timeout", "20", "--continue-on-failure"])
        .args(extra)
        .env("NO_COLOR", "1")
        .output()
        .expect("python3 with schemathesis (PyPI; .ci/install-deps installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_every_answer_conforming() {
    let emu = start_emulator();
    // With receipts, so that the answers carry them and the JWKS is served.
    let dir = tempfile::tempdir().expect("dir");
    let key = dir.path().join("receipt-key.pem");
    tokens_keygen("EdDSA", "k1", &key);
    let gw = TestGateway::for_emulator(&emu)
        .set("receipts.issuer", "\"https://liveness.test\"")
        .set(
            "receipts.key_file",
            &format!("{:?}", key.display().to_string()),
        )
        .start();
    let url = gw.url();
    // With a tenant key (requests reach validation and, when valid, the provider) and without.
    let (ok, text) = tokio::task::spawn_blocking(move || {
        run_schemathesis(&url, &["-H", "Authorization: Bearer alpha-key"])
    })
    .await
    .expect("run");
    assert!(ok, "schemathesis with a tenant key:\n{text}");
    let url = gw.url();
    let (ok, text) = tokio::task::spawn_blocking(move || run_schemathesis(&url, &[]))
        .await
        .expect("run");
    assert!(ok, "schemathesis without a key:\n{text}");
    assert!(
        text.contains("livenessShort") || text.contains("/api/v1/backend/liveness/short/"),
        "{text}"
    );
    let m = metrics_text(&gw.admin_url()).await;
    assert_eq!(
        sample(
            &m,
            r#"liveness_gateway_requests_total{outcome="internal_error",tenant="unknown"}"#
        ),
        0.0
    );

    // Random bytes are never a valid photo, so schemathesis sees only refusals: check real
    // verdicts (a pass and a fail) against the spec's success schema too.
    for want in [true, false] {
        let (img, _) = image_with_verdict(want, 0);
        let a = post_image(&gw.url(), "alpha-key", "face.jpg", &img).await;
        assert_eq!(a.status, 200);
        let check = r#"
import sys, json, yaml, jsonschema
spec = yaml.safe_load(open(sys.argv[1]))
schema = dict(spec["components"]["schemas"]["LivenessResult"], components=spec["components"])
jsonschema.Draft202012Validator(schema).validate(json.load(sys.stdin))
"#;
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                check,
                concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/openapi.yaml"),
            ])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), &a.body).expect("write");
        let out = child.wait_with_output().expect("python3");
        assert!(
            out.status.success(),
            "{} does not conform: {}",
            a.text(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
