//! The face check before a paid call (`[intake.face]`), through a running gateway and the
//! emulator: `enforce` refuses a photo without a face with `422` and a stable code, calls
//! nobody, uses no budget and caches nothing; `observe` lets the call go and counts what it
//! found; a tenant's own mode wins; a phone's HEIC is checked once converted, its hold given
//! back when refused; a check that cannot run in time is `503` when enforced, skipped when
//! observed; the access line and the receipt say what the check found.

mod support;

use std::process::Command;

use serde_json::Value;
use support::*;

/// A photo without a face (scikit-image's `coffee`, CC0).
fn no_face() -> Vec<u8> {
    fixture("no-face/coffee.jpg")
}

fn checks(metrics: &str, tenant: &str, outcome: &str) -> f64 {
    sample(
        metrics,
        &format!("liveness_gateway_face_checks_total{{outcome=\"{outcome}\",tenant=\"{tenant}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_refuses_a_photo_without_a_face_before_any_cost() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("intake.face.mode", "\"enforce\"")
        .tenant_set("alpha", "daily_budget", "1")
        .start();
    let admin = format!("http://{}", gw.admin_addr);
    for attempt in 1..=2 {
        let refused = post_image(&gw.url(), "alpha-key", "photo.jpg", &no_face()).await;
        assert_eq!(refused.status, 422, "{}", refused.text());
        assert_eq!(refused.code(), "no_face_detected");
        let hint = refused.json()["hint"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(hint.contains("one face filling the frame"), "{hint}");
        // Nothing cached: the same photo is checked again, and refused again.
        let m = metrics_text(&admin).await;
        assert_eq!(checks(&m, "alpha", "no_face"), f64::from(attempt));
    }
    assert_eq!(emu.stats().calls, 0, "the provider was never called");
    // The day's one call is still there: the refusals used no budget.
    let ok = post_image(&gw.url(), "alpha-key", "photo.jpg", &fixture("face.jpg")).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(emu.stats().calls, 1);
    let m = metrics_text(&admin).await;
    assert_eq!(checks(&m, "alpha", "face"), 1.0);
    // A hit is not checked again.
    let hit = post_image(&gw.url(), "alpha-key", "photo.jpg", &fixture("face.jpg")).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(checks(&metrics_text(&admin).await, "alpha", "face"), 1.0);

    // A photo the check cannot read (here an arithmetic-coded frame) is not waved through.
    let mut arithmetic = no_face();
    let sof = arithmetic
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("a baseline frame");
    arithmetic[sof + 1] = 0xC9;
    let refused = post_image(&gw.url(), "alpha-key", "photo.jpg", &arithmetic).await;
    assert_eq!(refused.status, 422, "{}", refused.text());
    assert_eq!(refused.code(), "photo_not_checkable");
    let m = metrics_text(&admin).await;
    assert_eq!(checks(&m, "alpha", "unreadable"), 1.0);

    // Two faces side by side: several.
    let two = side_by_side(&fixture("face.jpg"));
    let refused = post_image(&gw.url(), "alpha-key", "two.png", &two).await;
    assert_eq!(refused.status, 422, "{}", refused.text());
    assert_eq!(refused.code(), "several_faces");
    assert_eq!(emu.stats().calls, 1);
}

/// Two copies of a JPEG side by side, as a PNG.
fn side_by_side(jpeg: &[u8]) -> Vec<u8> {
    let mut d = zune_jpeg::JpegDecoder::new(jpeg);
    let rgb = d.decode().expect("decodes");
    let (w, h) = d.dimensions().expect("dimensions");
    let mut both = Vec::with_capacity(rgb.len() * 2);
    for row in rgb.chunks_exact(w * 3) {
        both.extend_from_slice(row);
        both.extend_from_slice(row);
    }
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, (w * 2) as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().expect("png");
    writer.write_image_data(&both).expect("png");
    writer.finish().expect("png");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_counts_and_calls_and_a_tenant_may_enforce_for_itself() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("intake.face.mode", "\"observe\"")
        .tenant_set("beta", "face_mode", "\"enforce\"")
        .start();
    let admin = format!("http://{}", gw.admin_addr);
    let observed = post_image(&gw.url(), "alpha-key", "photo.jpg", &no_face()).await;
    assert_eq!(observed.status, 200, "{}", observed.text());
    assert_eq!(emu.stats().calls, 1, "observed: the call went ahead");
    let enforced = post_image(&gw.url(), "beta-key", "photo.jpg", &variant(&no_face(), 1)).await;
    assert_eq!(enforced.code(), "no_face_detected");
    assert_eq!(emu.stats().calls, 1);
    let m = metrics_text(&admin).await;
    assert_eq!(checks(&m, "alpha", "no_face"), 1.0);
    assert_eq!(checks(&m, "beta", "no_face"), 1.0);
    assert_eq!(checks(&m, "alpha", "face"), 0.0, "every series is there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heic_is_checked_once_converted_and_its_hold_given_back() {
    let dir = tempfile::tempdir().expect("dir");
    let heic = |name: &str, out: &str| {
        let src = dir.path().join(out).with_extension("jpg");
        std::fs::write(&src, fixture(name)).expect("write");
        let dst = dir.path().join(out);
        let made = Command::new("heif-enc")
            .args(["-q", "85", "-o"])
            .arg(&dst)
            .arg(&src)
            .output()
            .expect("heif-enc (.ci/install-deps installs it)");
        assert!(made.status.success());
        std::fs::read(&dst).expect("heic")
    };
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("intake.face.mode", "\"enforce\"")
        .tenant_set("alpha", "daily_budget", "1")
        .start();
    let refused = post_image(
        &gw.url(),
        "alpha-key",
        "IMG_0001.HEIC",
        &heic("no-face/coffee.jpg", "coffee.heic"),
    )
    .await;
    assert_eq!(refused.code(), "no_face_detected", "{}", refused.text());
    assert_eq!(emu.stats().calls, 0);
    let ok = post_image(
        &gw.url(),
        "alpha-key",
        "IMG_0002.HEIC",
        &heic("face.jpg", "face.heic"),
    )
    .await;
    assert_eq!(ok.status, 200, "the hold was given back: {}", ok.text());
    assert_eq!(emu.stats().calls, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_cannot_run_in_time_is_refused_when_enforced_and_skipped_when_observed() {
    let emu = start_emulator();
    let slow = |mode: &str| {
        TestGateway::for_emulator(&emu)
            .set("intake.face.mode", &format!("{mode:?}"))
            .set("intake.face.timeout", "\"1ms\"")
            .set("intake.face.workers", "1")
            .start()
    };
    let enforced = slow("enforce");
    let busy = post_image(
        &enforced.url(),
        "alpha-key",
        "photo.jpg",
        &fixture("face-large.jpg"),
    )
    .await;
    assert_eq!(busy.status, 503, "{}", busy.text());
    assert_eq!(busy.code(), "overloaded");
    assert!(busy.text().contains("face checks"), "{}", busy.text());
    assert_eq!(emu.stats().calls, 0);
    drop(enforced);
    let observed = slow("observe");
    let ok = post_image(
        &observed.url(),
        "alpha-key",
        "photo.jpg",
        &fixture("face-large.jpg"),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let m = metrics_text(&format!("http://{}", observed.admin_addr)).await;
    assert_eq!(checks(&m, "alpha", "skipped"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_line_and_the_receipt_say_what_the_check_found() {
    let dir = tempfile::tempdir().expect("dir");
    let key = dir.path().join("receipts.pem");
    tokens_keygen("ES256", "r1", &key);
    let emu = start_emulator();
    let builder = TestGateway::for_emulator(&emu)
        .set("server.log_format", "\"json\"")
        .set("intake.face.mode", "\"observe\"")
        .set("receipts.issuer", "\"https://gateway.example\"")
        .set(
            "receipts.key_file",
            &format!("{:?}", key.display().to_string()),
        );
    let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
    let url = format!("http://{}", cfg.listen);
    let answer = post_image(&url, "alpha-key", "photo.jpg", &no_face()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let receipt = answer.header("liveness-receipt").expect("a receipt");
    assert_eq!(receipt_claims(&receipt)["face"], "no_face");
    // Its line before the next request's (a line is written once its answer is out).
    gw.access_lines_soon(1).await;
    let hit = post_image(&url, "alpha-key", "photo.jpg", &no_face()).await;
    let receipt = hit.header("liveness-receipt").expect("a receipt");
    assert_eq!(
        receipt_claims(&receipt)["face"],
        Value::Null,
        "a hit ran no check"
    );
    let lines = gw.access_lines_soon(2).await;
    assert_eq!(lines[0]["face"], "no_face", "{}", lines[0]);
    assert!(lines[1].get("face").is_none(), "{}", lines[1]);
}
