//! Photos as phones and browsers make them: a HEIC (made by libheif's own `heif-enc`) or a WebP
//! (made by libwebp's `cwebp`) gets a verdict, the provider (the emulator) receives a JPEG whose
//! pixels a real JPEG decoder reads as the format's own decoder (`heif-convert`, `dwebp`) reads
//! the original, a retry is a hit, what does not decode costs nothing, and a crowd of large
//! HEICs stays within the conversion pool and its memory.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::*;

/// Run a tool of Debian's `libheif-examples` or `webp`, which `.ci/install-deps` installs.
fn tool(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (.ci/install-deps installs it)"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `fixture` encoded by `program` (`heif-enc` or `cwebp`) into `dir/name`.
fn encoded(dir: &Path, fixture_name: &str, name: &str) -> Vec<u8> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture_name);
    let out = dir.join(name);
    let (src, out_s) = (src.to_string_lossy(), out.to_string_lossy());
    if name.ends_with(".webp") {
        tool("cwebp", &["-quiet", "-q", "90", &src, "-o", &out_s]);
    } else {
        tool("heif-enc", &["-q", "85", "-o", &out_s, &src]);
    }
    std::fs::read(&out).expect("encoded")
}

/// 8-bit RGB pixels and their size.
struct Pixels {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

fn decode_jpeg(data: &[u8]) -> Pixels {
    let mut d = zune_jpeg::JpegDecoder::new(data);
    let rgb = d.decode().expect("a JPEG a real decoder reads");
    let (width, height) = d.dimensions().expect("dimensions");
    Pixels { width, height, rgb }
}

fn decode_png(path: &Path) -> Pixels {
    let file = std::io::BufReader::new(std::fs::File::open(path).expect("png"));
    let mut reader = png::Decoder::new(file).read_info().expect("png head");
    let mut buf = vec![0; reader.output_buffer_size().expect("a size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    let channels = info.color_type.samples();
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let rgb = buf[..info.buffer_size()]
        .chunks_exact(channels)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    Pixels {
        width: info.width as usize,
        height: info.height as usize,
        rgb,
    }
}

/// The peak signal-to-noise ratio of `b` against `a`, in dB (same size).
fn psnr(a: &Pixels, b: &Pixels) -> f64 {
    assert_eq!((a.width, a.height), (b.width, b.height), "same size");
    let mse = a
        .rgb
        .iter()
        .zip(&b.rgb)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        / a.rgb.len() as f64;
    10.0 * (255.0f64.powi(2) / mse.max(1e-9)).log10()
}

/// What the provider got, read by a real JPEG decoder, against the original as its format's
/// own decoder reads it (`decoder` writes `original` to a PNG).
fn assert_same_picture(dir: &Path, original: &Path, decoder: &[&str], sent: &[u8]) -> f64 {
    assert!(
        sent.starts_with(&[0xFF, 0xD8, 0xFF]),
        "the provider got a JPEG"
    );
    let reference = dir.join("reference.png");
    let mut args: Vec<&str> = decoder[1..].to_vec();
    let (o, r) = (original.to_string_lossy(), reference.to_string_lossy());
    args.extend([
        o.as_ref(),
        if decoder[0] == "dwebp" { "-o" } else { "" },
        r.as_ref(),
    ]);
    args.retain(|a| !a.is_empty());
    tool(decoder[0], &args);
    let db = psnr(&decode_png(&reference), &decode_jpeg(sent));
    // JPEG at quality 92 over a lossy original: well above 40 dB. A wrong colour conversion,
    // a lost row stride or a shifted channel falls far below.
    assert!(db > 40.0, "{db:.1} dB");
    db
}

/// An iPhone's HEIC, as `IMG_0001.HEIC` and renamed `.jpg`, and a WebP: each gets a verdict,
/// the provider a JPEG of the same picture, and the cache key is the client's bytes (a retry
/// is a hit). A cut HEIC is refused before any call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_and_browser_photos_reach_the_provider_as_jpeg() {
    let dir = tempfile::tempdir().expect("dir");
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let heic = encoded(dir.path(), "face.jpg", "IMG_0001.HEIC");
    assert_eq!(&heic[4..12], b"ftypheic");

    let a = post_image(&gw.url(), "alpha-key", "IMG_0001.HEIC", &heic).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(a.json()["result"].is_boolean(), "a verdict: {}", a.text());
    assert_eq!(a.header("x-cache").as_deref(), Some("MISS"));
    let sent = emu_last_image(&emu).await;
    let db = assert_same_picture(
        dir.path(),
        &dir.path().join("IMG_0001.HEIC"),
        &["heif-convert"],
        &sent,
    );
    eprintln!(
        "HEIC → JPEG: {db:.1} dB, {} → {} bytes",
        heic.len(),
        sent.len()
    );
    assert_eq!(emu.stats().last_fields.len(), 2, "api_key and image only");

    let again = post_image(&gw.url(), "alpha-key", "IMG_0001.HEIC", &heic).await;
    assert_eq!(again.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(emu.stats().calls, 1, "a retry of the same bytes is a hit");

    // Saved or renamed as .jpg by a picker or a share sheet: the content decides.
    let renamed = post_image(&gw.url(), "beta-key", "photo.jpg", &heic).await;
    assert_eq!(renamed.status, 200, "{}", renamed.text());
    assert_eq!(emu.stats().calls, 2);

    let webp = encoded(dir.path(), "face.jpg", "photo.webp");
    let w = post_image(&gw.url(), "alpha-key", "photo.webp", &webp).await;
    assert_eq!(w.status, 200, "{}", w.text());
    let sent = emu_last_image(&emu).await;
    let db = assert_same_picture(
        dir.path(),
        &dir.path().join("photo.webp"),
        &["dwebp", "-quiet"],
        &sent,
    );
    eprintln!("WebP → JPEG: {db:.1} dB");

    // Cut off in the middle: its decoder refuses it, and nothing is called or held.
    let cut = &heic[..heic.len() / 2];
    let c = post_image(&gw.url(), "alpha-key", "IMG_0002.HEIC", cut).await;
    assert_eq!(
        (c.status, c.code()),
        (400, "image_unreadable".into()),
        "{}",
        c.text()
    );
    assert_eq!(emu.stats().calls, 3);

    let m = metrics_text(&gw.admin_url()).await;
    let n = |from: &str, outcome: &str| {
        sample(
            &m,
            &format!(r#"liveness_gateway_conversions_total{{from="{from}",outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(n("heic", "converted"), 2.0, "a hit converts nothing");
    assert_eq!(n("webp", "converted"), 1.0);
    assert_eq!(n("heic", "unreadable"), 1.0);
}

/// With conversion off, a HEIC is refused as before (by its name, or by its content), and a
/// conversion past its timeout is `503 overloaded` that bills nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversion_can_be_turned_off_and_is_bounded_in_time() {
    let dir = tempfile::tempdir().expect("dir");
    let emu = start_emulator();
    let heic = encoded(dir.path(), "face.jpg", "a.heic");
    let off = TestGateway::for_emulator(&emu)
        .set("intake.convert.formats", "[]")
        .start();
    let a = post_image(&off.url(), "alpha-key", "a.heic", &heic).await;
    assert_eq!(a.code(), "extension_not_allowed", "{}", a.text());
    let a = post_image(&off.url(), "alpha-key", "a.jpg", &heic).await;
    assert_eq!(a.code(), "not_an_image", "{}", a.text());
    drop(off);

    let slow = TestGateway::for_emulator(&emu)
        .set("intake.convert.timeout", "\"1ms\"")
        .start();
    let a = post_image(&slow.url(), "alpha-key", "a.heic", &heic).await;
    assert_eq!(
        (a.status, a.code()),
        (503, "overloaded".into()),
        "{}",
        a.text()
    );
    assert!(a.json()["detail"]
        .as_str()
        .is_some_and(|d| d.contains("photo conversions")));
    assert!(a.header("retry-after").is_some());
    let m = metrics_text(&slow.admin_url()).await;
    assert_eq!(
        sample(
            &m,
            r#"liveness_gateway_conversions_total{from="heic",outcome="timeout"}"#
        ),
        1.0
    );
    assert_eq!(emu.stats().calls, 0);
}

/// The peak resident memory of a process, in KiB.
fn peak_kib(pid: u32) -> u64 {
    proc_kib(pid, "VmHWM:")
}

/// 50 clients upload a 9-megapixel HEIC at once (the cache off, so each one converts). A
/// conversion of it takes about 80 MB while it runs: unbounded, 50 would take 4 GB. Two
/// workers and a queue of 8 hold at most 10 at a time; the rest are told `503 overloaded` at
/// once, and the gateway's peak memory stays near two conversions' worth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_of_large_heics_stays_within_the_pool() {
    let dir = tempfile::tempdir().expect("dir");
    let emu = start_emulator();
    let heic = encoded(dir.path(), "face-large.jpg", "large.heic");
    let builder = TestGateway::for_emulator(&emu)
        .set("cache.enabled", "false")
        .set("intake.convert.workers", "2")
        .set("intake.convert.queue", "8")
        .set("intake.convert.timeout", "\"60s\"")
        .set("limits.upstream_queue_timeout", "\"60s\"");
    let (gw, cfg) = GatewayProcess::start(&builder, dir.path(), &[]).await;
    let pid = gw.child.0.id();
    let url = format!("http://{}", cfg.listen);
    let idle = peak_kib(pid);
    let mut calls = Vec::new();
    for n in 0..50 {
        let (url, heic) = (url.clone(), heic.clone());
        calls.push(tokio::spawn(async move {
            let key = if n % 2 == 0 { "alpha-key" } else { "beta-key" };
            post_image(&url, key, "large.heic", &heic).await
        }));
    }
    let (mut ok, mut overloaded) = (0, 0);
    for c in calls {
        let a = tokio::time::timeout(Duration::from_secs(120), c)
            .await
            .expect("answered")
            .expect("task");
        match (a.status, a.code().as_str()) {
            (200, _) => ok += 1,
            (503, "overloaded") => overloaded += 1,
            other => panic!("{other:?}: {}", a.text()),
        }
    }
    let peak = peak_kib(pid);
    let admin = format!("http://{}", cfg.admin_listen);
    let m = metrics_text(&admin).await;
    let converted = sample(
        &m,
        r#"liveness_gateway_conversions_total{from="heic",outcome="converted"}"#,
    );
    let refused = sample(
        &m,
        r#"liveness_gateway_conversions_total{from="heic",outcome="overloaded"}"#,
    );
    eprintln!(
        "{ok} converted, {overloaded} overloaded; peak {} MiB (idle {} MiB)",
        peak / 1024,
        idle / 1024
    );
    assert!(ok >= 10, "the workers and the queue were all used: {ok}");
    assert!(overloaded > 0, "the queue was full for some");
    assert_eq!((converted, refused), (ok as f64, overloaded as f64));
    assert_eq!(
        emu.stats().calls,
        ok as u64,
        "only what was converted was sent"
    );
    // Two conversions (≈ 80 MB each) and 50 bodies of 1.4 MB on top of the idle process; a
    // pool that let every upload convert at once would take gigabytes.
    assert!(
        peak - idle < 400 * 1024,
        "peak {} MiB over idle {} MiB",
        peak / 1024,
        idle / 1024
    );
}

/// A HEIC is sent upright: its rotation (`irot`) and mirroring (`imir`) are applied, as
/// libheif's own `heif-convert` shows it. An AVIF whose `ftyp` claims `heic` is refused before
/// any decoder sees it; a JPEG named `.heic` is taken as the JPEG it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heic_goes_upright_and_an_avif_in_disguise_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut sizes = Vec::new();
    for name in [
        "quadrants.heic",
        "quadrants-rot90.heic",
        "quadrants-mirrored.heic",
    ] {
        let heic = fixture(name);
        let a = post_image(&gw.url(), "alpha-key", name, &heic).await;
        assert_eq!(a.status, 200, "{name}: {}", a.text());
        let sent = emu_last_image(&emu).await;
        assert_same_picture(dir.path(), &fixtures.join(name), &["heif-convert"], &sent);
        let p = decode_jpeg(&sent);
        sizes.push((p.width, p.height));
    }
    assert_eq!(sizes, [(256, 128), (128, 256), (256, 128)]);

    let calls = emu.stats().calls;
    let avif = fixture("face-avif-branded-heic.heic");
    assert_eq!(&avif[8..12], b"heic", "it claims to be a HEIC");
    let a = post_image(&gw.url(), "alpha-key", "face.heic", &avif).await;
    assert_eq!(
        (a.status, a.code()),
        (415, "not_an_image".into()),
        "{}",
        a.text()
    );
    assert_eq!(emu.stats().calls, calls);

    let jpeg = post_image(
        &gw.url(),
        "alpha-key",
        "IMG_0002.HEIC",
        &fixture("face.jpg"),
    )
    .await;
    assert_eq!(jpeg.status, 200, "{}", jpeg.text());
    assert_eq!(emu_last_image(&emu).await, fixture("face.jpg")[..].to_vec());
}

/// A tenant whose budget is spent converts nothing: the budget is held before the photo is
/// prepared, and a refusal costs no conversion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_converts_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .tenant_set("alpha", "daily_budget", "1")
        .start();
    let a = post_image(&gw.url(), "alpha-key", "face.jpg", &fixture("face.jpg")).await;
    assert_eq!(a.status, 200);
    let heic = encoded(dir.path(), "face.jpg", "a.heic");
    let b = post_image(&gw.url(), "alpha-key", "a.heic", &heic).await;
    assert_eq!(b.code(), "budget_exhausted", "{}", b.text());
    let m = metrics_text(&gw.admin_url()).await;
    assert_eq!(
        sample(
            &m,
            r#"liveness_gateway_conversions_total{from="heic",outcome="converted"}"#
        ),
        0.0
    );
}
