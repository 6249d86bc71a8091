//! Hostile uploads: every case is refused with its own status and code, before any upstream
//! contact, and the gateway goes on serving.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

/// A minimal JPEG of the given size: SOI, a comment to pass the minimum size, SOF0, EOI.
fn jpeg(w: u16, h: u16) -> Vec<u8> {
    let mut v = vec![0xFF, 0xD8, 0xFF, 0xFE, 0x00, 0xCA];
    v.extend([b'c'; 200]);
    v.extend([0xFF, 0xC0, 0x00, 0x11, 0x08]);
    v.extend(h.to_be_bytes());
    v.extend(w.to_be_bytes());
    v.extend([0x03, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
    v.extend([0xFF, 0xD9]);
    v
}

/// A PNG signature and IHDR claiming the given size, then IEND.
fn png(w: u32, h: u32) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    v.extend(w.to_be_bytes());
    v.extend(h.to_be_bytes());
    v.extend([8, 2, 0, 0, 0, 0, 0, 0, 0]);
    v.extend([0u8; 200]);
    v.extend(b"\0\0\0\0IEND\xae\x42\x60\x82");
    v
}

struct Case {
    name: &'static str,
    content_type: Option<String>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

fn case(name: &'static str, parts: Vec<Part>, status: u16, code: &'static str) -> Case {
    Case {
        name,
        content_type: Some(multipart_ct()),
        body: multipart(&parts),
        status,
        code,
    }
}

fn cases() -> Vec<Case> {
    let face = fixture("face.jpg");
    let img = |f: &str, d: &[u8]| Part::image(f, d);
    let renamed = |name: &'static str, content: &[u8]| {
        case(name, vec![img("photo.jpg", content)], 415, "not_an_image")
    };
    let padded = |head: &[u8]| {
        let mut v = head.to_vec();
        v.resize(300, b' ');
        v
    };
    let mut v = vec![
        case("zero-byte file", vec![img("a.jpg", b"")], 400, "image_too_small"),
        case("one-byte file", vec![img("a.jpg", b"\xff")], 400, "image_too_small"),
        case("SOI only", vec![img("a.jpg", b"\xff\xd8")], 400, "image_too_small"),
        case("JPEG header, nothing readable", vec![img("a.jpg", &padded(b"\xff\xd8\xff\xe0"))], 400, "image_unreadable"),
        case("JPEG cut off after its header", vec![img("a.jpg", &face[..face.len() / 2])], 400, "image_truncated"),
        case("PNG signature then garbage", vec![img("a.png", &padded(b"\x89PNG\r\n\x1a\ngarbage"))], 400, "image_unreadable"),
        renamed("text renamed .jpg", &padded(b"just some text, not a photo")),
        renamed("HTML renamed .jpg", &padded(b"<!DOCTYPE html><html><body>hi</body></html>")),
        renamed("SVG renamed .jpg", &padded(b"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"100\" height=\"100\"></svg>")),
        renamed("PDF renamed .jpg", &padded(b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n")),
        renamed("GIF renamed .jpg", &padded(b"GIF89a\x80\x00\x80\x00")),
        // WebP and HEIC are converted (tests/convert.rs): known by their content, refused when
        // they do not decode, before any call.
        case("WebP cut short (its RIFF length runs past the end)", vec![img("photo.jpg", &padded(b"RIFF\xff\xff\x00\x00WEBPVP8X\x0a\0\0\0\0\0\0\0\xff\x01\x00\xff\x01\x00"))], 400, "image_truncated"),
        case("HEIC brands without an HEVC image", vec![img("photo.heic", &padded(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"))], 415, "not_an_image"),
        renamed("AVIF renamed .jpg", &padded(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf")),
        renamed("ELF renamed .jpg", &padded(b"\x7fELF\x02\x01\x01")),
        case("JPEG bytes named .png", vec![img("a.png", &face)], 415, "not_an_image"),
        case(".exe extension with JPEG bytes", vec![img("face.exe", &face)], 415, "extension_not_allowed"),
        case(".gif extension", vec![img("face.gif", &face)], 415, "extension_not_allowed"),
        case("no extension", vec![img("face", &face)], 415, "extension_not_allowed"),
        case("double extension .jpg.exe", vec![img("face.jpg.exe", &face)], 415, "extension_not_allowed"),
        case("no filename", vec![Part::text("image", "not a file")], 400, "missing_filename"),
        case("empty filename", vec![img("", &face)], 400, "missing_filename"),
        case("two image parts", vec![img("a.jpg", &face), img("b.jpg", &face)], 400, "multiple_images"),
        case("no image part", vec![Part::text("note", "hello")], 400, "missing_image"),
        case("wrong field name", vec![Part::file("file", "a.jpg", "image/jpeg", &face)], 400, "missing_image"),
        case("empty form", vec![], 400, "missing_image"),
        case("two api_key fields", vec![Part::text("api_key", "a"), Part::text("api_key", "b"), img("a.jpg", &face)], 400, "malformed_multipart"),
        case("PNG claiming 100000x100000 pixels", vec![img("bomb.png", &png(100_000, 100_000))], 400, "image_dimensions_too_large"),
        case("PNG of 8000x8000 (too many pixels)", vec![img("big.png", &png(8000, 8000))], 400, "image_dimensions_too_large"),
        case("JPEG of 10x10 pixels", vec![img("tiny.jpg", &jpeg(10, 10))], 400, "image_dimensions_too_small"),
        case("JPEG of 64x20000 pixels", vec![img("tall.jpg", &jpeg(64, 20000))], 400, "image_dimensions_too_large"),
        case(
            "10,000 tiny parts",
            (0..10_000).map(|i| Part::text(&format!("f{i}"), "x")).chain([img("a.jpg", &face)]).collect(),
            400,
            "too_many_parts",
        ),
        case(
            "a 100 KB part header",
            vec![Part { headers: format!("Content-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\nX-Padding: {}\r\n", "p".repeat(100_000)), data: face.clone() }],
            400,
            "part_header_too_large",
        ),
    ];
    let mut unclosed = multipart(&[img("a.jpg", &face)]);
    unclosed.truncate(unclosed.len() - 8);
    v.push(Case {
        name: "boundary never closed",
        content_type: Some(multipart_ct()),
        body: unclosed,
        status: 400,
        code: "malformed_multipart",
    });
    v.push(Case {
        name: "garbage under a multipart type",
        content_type: Some(multipart_ct()),
        body: b"garbage, no boundary anywhere".to_vec(),
        status: 400,
        code: "malformed_multipart",
    });
    v.push(Case {
        name: "missing boundary parameter",
        content_type: Some("multipart/form-data".into()),
        body: multipart(&[img("a.jpg", &face)]),
        status: 400,
        code: "missing_boundary",
    });
    v.push(Case {
        name: "JSON content type",
        content_type: Some("application/json".into()),
        body: br#"{"image": "aGVsbG8="}"#.to_vec(),
        status: 415,
        code: "not_multipart",
    });
    v.push(Case {
        name: "urlencoded content type",
        content_type: Some("application/x-www-form-urlencoded".into()),
        body: b"image=abc".to_vec(),
        status: 415,
        code: "not_multipart",
    });
    v.push(Case {
        name: "no content type",
        content_type: None,
        body: face.clone(),
        status: 415,
        code: "not_multipart",
    });
    v.push(Case {
        name: "image/jpeg body, not a form",
        content_type: Some("image/jpeg".into()),
        body: face.clone(),
        status: 415,
        code: "not_multipart",
    });
    v.push(Case {
        name: "multipart/mixed",
        content_type: Some(format!("multipart/mixed; boundary={BOUNDARY}")),
        body: multipart(&[img("a.jpg", &face)]),
        status: 415,
        code: "not_multipart",
    });
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_uploads_are_refused_before_any_upstream_call() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let all = cases();
    assert!(all.len() >= 30, "the suite has {} cases", all.len());
    for c in all {
        let mut req = client()
            .post(format!("{}{ROUTE}", gw.url()))
            .header("X-Api-Key", "alpha-key")
            .body(c.body);
        if let Some(ct) = &c.content_type {
            req = req.header("Content-Type", ct);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let status = resp.status().as_u16();
        let body = resp.text().await.expect("body");
        assert_eq!(
            (status, json_code(&body).as_str()),
            (c.status, c.code),
            "{}: {body}",
            c.name
        );
        assert!(
            serde_json::from_str::<serde_json::Value>(&body).expect("json")["detail"].is_string(),
            "{}",
            c.name
        );
        assert_eq!(emu.stats().calls, 0, "{} reached the provider", c.name);
    }
    // The provider's own sentence for a refused extension.
    let a = post(
        &gw.url(),
        &[("X-Api-Key", "alpha-key")],
        multipart(&[Part::image("a.bmp", &fixture("face.jpg"))]),
    )
    .await;
    assert_eq!(
        a.json()["detail"],
        "Not allowed file, valid extensions: .jpg .png .jpeg"
    );
    // Refusals are counted by reason.
    let m = metrics_text(&gw.admin_url()).await;
    assert_eq!(
        sample(
            &m,
            r#"liveness_gateway_rejected_total{reason="not_an_image",tenant="alpha"}"#
        ),
        9.0
    );
    // Still serving, on a fresh connection.
    let ok = post_image(&gw.url(), "alpha-key", "face.JPEG", &fixture("face.jpg")).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(emu.stats().calls, 1);
}

fn head(content_length: Option<usize>, extra: &str) -> String {
    let cl = content_length
        .map(|n| format!("Content-Length: {n}\r\n"))
        .unwrap_or_else(|| "Transfer-Encoding: chunked\r\n".into());
    format!("POST {ROUTE} HTTP/1.1\r\nHost: x\r\nX-Api-Key: alpha-key\r\nContent-Type: {}\r\n{cl}{extra}\r\n", multipart_ct())
}

/// Write `body` on a thread (the gateway may answer and close before it is all sent) while the
/// caller reads the answer.
fn send_and_read(
    addr: std::net::SocketAddr,
    head: String,
    body: Vec<u8>,
    pace: Option<Duration>,
    wait: Duration,
) -> (u16, String, Duration) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(wait)).expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let stop = Arc::new(AtomicBool::new(false));
    let stop_w = stop.clone();
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        if w.write_all(head.as_bytes()).is_err() {
            return;
        }
        let step = if pace.is_some() { 1 } else { 64 * 1024 };
        for piece in body.chunks(step) {
            if stop_w.load(Ordering::Relaxed) || w.write_all(piece).is_err() {
                return;
            }
            if let Some(p) = pace {
                std::thread::sleep(p);
            }
        }
    });
    let (status, text) = read_response(&mut s);
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    (status, text, took)
}

fn chunked(data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for c in data.chunks(256 * 1024) {
        v.extend(format!("{:x}\r\n", c.len()).as_bytes());
        v.extend(c);
        v.extend(b"\r\n");
    }
    v.extend(b"0\r\n\r\n");
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_slow_and_short_bodies() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let twenty_mb = multipart(&[Part::image("big.jpg", &vec![0xAB; 20 * 1024 * 1024])]);

    // Refused on the declared length, before reading.
    let (status, body, took) = send_and_read(
        gw.addr,
        head(Some(twenty_mb.len()), ""),
        Vec::new(),
        None,
        Duration::from_secs(10),
    );
    assert_eq!(
        (status, json_code(&body).as_str()),
        (413, "body_too_large"),
        "{body}"
    );
    assert!(took < Duration::from_secs(2));
    // Without a length (chunked): cut off once it streams past the limit.
    let (status, body, _) = send_and_read(
        gw.addr,
        head(None, ""),
        chunked(&twenty_mb),
        None,
        Duration::from_secs(20),
    );
    assert_eq!(
        (status, json_code(&body).as_str()),
        (413, "body_too_large"),
        "{body}"
    );
    // One byte a second: the body deadline (4 s in the test config) ends it.
    let slow = multipart(&[Part::image("a.jpg", &fixture("face-small.jpg"))]);
    let (status, body, took) = send_and_read(
        gw.addr,
        head(Some(slow.len()), ""),
        slow,
        Some(Duration::from_secs(1)),
        Duration::from_secs(15),
    );
    assert_eq!(
        (status, json_code(&body).as_str()),
        (408, "body_timeout"),
        "{body}"
    );
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(8),
        "ended after {took:?}"
    );
    // A Content-Length larger than what is sent: the per-read timeout (2 s) ends it.
    let short = multipart(&[Part::image("a.jpg", &fixture("face-small.jpg"))]);
    let (status, body, took) = send_and_read(
        gw.addr,
        head(Some(short.len() + 1000), ""),
        short,
        None,
        Duration::from_secs(15),
    );
    assert_eq!(
        (status, json_code(&body).as_str()),
        (408, "body_timeout"),
        "{body}"
    );
    assert!(took < Duration::from_secs(6), "ended after {took:?}");

    assert_eq!(emu.stats().calls, 0);
    let ok = post_image(&gw.url(), "alpha-key", "a.jpg", &fixture("face.jpg")).await;
    assert_eq!(ok.status, 200, "still serving: {}", ok.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn expect_100_continue_is_answered_only_after_the_checks() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu).start();
    let body = multipart(&[Part::image("a.jpg", &fixture("face.jpg"))]);

    let mut s = TcpStream::connect(gw.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(head(Some(body.len()), "Expect: 100-continue\r\n").as_bytes())
        .expect("write");
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).expect("100 Continue");
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(&body).expect("body");
    let (status, text) = read_response(&mut s);
    assert_eq!(status, 200, "{text}");

    // A bad key gets its 401 instead of a 100, and the body is never asked for.
    let bad = head(Some(body.len()), "Expect: 100-continue\r\n").replace("alpha-key", "wrong-key");
    let (status, text) = raw(gw.addr, bad.as_bytes(), Duration::from_secs(5));
    assert_eq!(
        (status, json_code(&text).as_str()),
        (401, "invalid_credentials")
    );
    // So does a declared size over the limit.
    let (status, text) = raw(
        gw.addr,
        head(Some(50 << 20), "Expect: 100-continue\r\n").as_bytes(),
        Duration::from_secs(5),
    );
    assert_eq!((status, json_code(&text).as_str()), (413, "body_too_large"));
    assert_eq!(emu.stats().calls, 1);
}

/// `face.jpg` as a phone writes it: an Exif APP1 segment right after SOI, whose IFD1 points at
/// a thumbnail (`face-small.jpg`, a whole JPEG with its own end marker) inside the segment.
fn with_exif_thumbnail() -> Vec<u8> {
    let thumbnail = fixture("face-small.jpg");
    // TIFF header (big-endian), IFD0 with no entries linking to IFD1, IFD1 with the thumbnail's
    // offset and length (offsets from the TIFF header).
    let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec();
    tiff.extend([0, 0, 0, 0, 0, 14]);
    let thumb_at = 14 + 2 + 2 * 12 + 4;
    tiff.extend([0, 2]);
    for (tag, value) in [(0x0201u16, thumb_at), (0x0202, thumbnail.len())] {
        tiff.extend(tag.to_be_bytes());
        tiff.extend([0, 4, 0, 0, 0, 1]);
        tiff.extend(u32::try_from(value).expect("small").to_be_bytes());
    }
    tiff.extend([0, 0, 0, 0]);
    assert_eq!(tiff.len(), thumb_at);
    tiff.extend(&thumbnail);
    let payload = [b"Exif\0\0".as_slice(), &tiff].concat();
    let face = fixture("face.jpg");
    let mut v = face[..2].to_vec();
    v.extend([0xFF, 0xE1]);
    v.extend(
        u16::try_from(payload.len() + 2)
            .expect("fits")
            .to_be_bytes(),
    );
    v.extend(payload);
    v.extend(&face[2..]);
    v
}

/// A photo cut off in transit whose Exif thumbnail carries an end-of-image marker of its own:
/// refused as truncated like any cut photo (over HTTP/1.1 and HTTP/2), and never sent to the
/// provider; the whole photo with its thumbnail is served.
#[tokio::test(flavor = "multi_thread")]
async fn a_cut_photo_with_an_exif_thumbnail_is_not_paid_for() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("server.h2c", "true")
        .start();
    let photo = with_exif_thumbnail();
    let cut = &photo[..photo.len() * 6 / 10];
    // The cut keeps the thumbnail (and its end marker), not the photo's own end.
    assert!(cut.windows(2).any(|w| w == [0xFF, 0xD9]));
    let a = post_image(&gw.url(), "alpha-key", "a.jpg", cut).await;
    assert_eq!(
        (a.status, a.code().as_str(), emu.stats().calls),
        (400, "image_truncated", 0),
        "{}",
        a.text()
    );
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client")
        .post(format!("{}{ROUTE}", gw.url()))
        .header("Content-Type", multipart_ct())
        .header("X-Api-Key", "alpha-key")
        .body(multipart(&[Part::image("a.jpg", cut)]))
        .send()
        .await
        .expect("h2c");
    assert_eq!(h2.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        (
            h2.status().as_u16(),
            json_code(&h2.text().await.expect("body"))
        ),
        (400, "image_truncated".to_string())
    );
    // Without the thumbnail the same cut was refused already.
    let face = fixture("face.jpg");
    let plain = post_image(
        &gw.url(),
        "alpha-key",
        "a.jpg",
        &face[..face.len() * 6 / 10],
    )
    .await;
    assert_eq!(
        (plain.status, plain.code().as_str()),
        (400, "image_truncated")
    );
    let whole = post_image(&gw.url(), "alpha-key", "a.jpg", &photo).await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    assert_eq!(emu.stats().calls, 1);
}

/// A phone photo's JPEG: Exif in little-endian order with the orientation (6: turned), the
/// camera's make and a GPS position, then XMP and a comment, around face.jpg's own segments.
fn phone_photo() -> Vec<u8> {
    let segment = |marker: u8, body: &[u8]| {
        let mut s = vec![0xFF, marker];
        s.extend_from_slice(&u16::try_from(body.len() + 2).expect("len").to_be_bytes());
        s.extend_from_slice(body);
        s
    };
    let entry = |tag: u16, kind: u16, count: u32, value: u32| {
        [
            tag.to_le_bytes().as_slice(),
            &kind.to_le_bytes(),
            &count.to_le_bytes(),
            &value.to_le_bytes(),
        ]
        .concat()
    };
    let mut tiff = b"II*\0\x08\0\0\0\x03\0".to_vec();
    tiff.extend(entry(0x010F, 2, 16, 50));
    tiff.extend(entry(0x0112, 3, 1, 6));
    tiff.extend(entry(0x8825, 4, 1, 66));
    tiff.extend_from_slice(&[0; 4]);
    tiff.extend_from_slice(b"PhoneCam SN-4711");
    tiff.extend_from_slice(&[1, 0]);
    tiff.extend(entry(0x0002, 5, 3, 80));
    tiff.extend_from_slice(&[0; 4]);
    tiff.extend_from_slice(b"GPS-43.2389N-76.8897E---");
    let exif = segment(0xE1, &[b"Exif\0\0".as_slice(), &tiff].concat());
    let face = fixture("face.jpg");
    let app0_end = 4 + usize::from(u16::from_be_bytes([face[4], face[5]]));
    [
        &face[..app0_end],
        &exif,
        &segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0<gps>43.2389</gps>"),
        &segment(0xFE, b"owner: ana@example.test"),
        &face[app0_end..],
    ]
    .concat()
}

/// The provider receives the photo without its metadata (position, device, comment), its
/// pixels byte for byte and its orientation kept; the cache key is still the client's bytes
/// (a retry is a hit); with `intake.strip_metadata = false` the photo goes as it came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_photo_reaches_the_provider_without_its_metadata() {
    let emu = start_emulator();
    let last_image = || emu_last_image(&emu);
    let photo = phone_photo();
    let face = fixture("face.jpg");
    let app0_end = 4 + usize::from(u16::from_be_bytes([face[4], face[5]]));
    let orientation = [
        0xFF, 0xE1, 0x00, 0x22, b'E', b'x', b'i', b'f', 0, 0, b'M', b'M', 0, b'*', 0, 0, 0, 8, 0,
        1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0,
    ];
    let expected = [&face[..app0_end], &orientation, &face[app0_end..]].concat();

    let gw = TestGateway::for_emulator(&emu).start();
    let a = post_image(&gw.url(), "alpha-key", "photo.jpg", &photo).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let got = last_image().await;
    assert_eq!(
        got, expected,
        "the provider got the photo minus its metadata"
    );
    for secret in [&b"GPS-43"[..], b"PhoneCam", b"ana@example", b"43.2389"] {
        assert!(!got.windows(secret.len()).any(|w| w == secret));
    }
    let again = post_image(&gw.url(), "alpha-key", "photo.jpg", &photo).await;
    assert_eq!(again.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(emu.stats().calls, 1);

    // A PNG (face.png was saved with a comment and a time chunk): those go, the rest (its
    // colour profile, its pixels) byte for byte.
    let png = fixture("face.png");
    let a = post_image(&gw.url(), "alpha-key", "face.png", &png).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let chunks = |b: &[u8]| {
        let (mut out, mut i) = (Vec::new(), 8);
        while i + 8 <= b.len() {
            let len = u32::from_be_bytes(b[i..i + 4].try_into().expect("len")) as usize;
            out.push((b[i + 4..i + 8].to_vec(), b[i..i + 12 + len].to_vec()));
            i += 12 + len;
        }
        out
    };
    let kept: Vec<Vec<u8>> = chunks(&png)
        .into_iter()
        .filter(|(kind, _)| kind != b"tEXt" && kind != b"tIME")
        .map(|(_, c)| c)
        .collect();
    assert!(kept.len() < chunks(&png).len(), "face.png has metadata");
    assert_eq!(last_image().await, [&png[..8], &kept.concat()].concat());
    drop(gw);

    let gw = TestGateway::for_emulator(&emu)
        .set("intake.strip_metadata", "false")
        .start();
    let a = post_image(&gw.url(), "alpha-key", "photo.jpg", &photo).await;
    assert_eq!(a.status, 200);
    assert_eq!(last_image().await, photo, "sent as it came");
}
