//! The face check's detector on real photos (in-process: the decision, no socket): every face
//! photo of the fixtures found at each size, turned by ±15° and darker or brighter; photos
//! without a face (scikit-image's sample photos, a black frame, noise) found empty; two faces
//! side by side counted; a face smaller than `min_face_px` refused as such. The rates are
//! printed (`cargo test --test face_detection -- --nocapture`).

mod support;

use liveness_gateway::config::RawFace;
use liveness_gateway::face::{examine, Outcome};
use liveness_gateway::image::ImageKind;
use support::fixture;

/// Decoded pixels (RGB) of a JPEG fixture.
struct Picture {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

fn decode(jpeg: &[u8]) -> Picture {
    let mut d = zune_jpeg::JpegDecoder::new(jpeg);
    let rgb = d.decode().expect("decodes");
    let (width, height) = d.dimensions().expect("dimensions");
    Picture { width, height, rgb }
}

fn jpeg(p: &Picture) -> Vec<u8> {
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 90)
        .encode(
            &p.rgb,
            p.width as u16,
            p.height as u16,
            jpeg_encoder::ColorType::Rgb,
        )
        .expect("encodes");
    out
}

/// `p` turned by `degrees` about its centre (nearest pixel; the corners filled grey).
fn turned(p: &Picture, degrees: f64) -> Picture {
    let (s, c) = degrees.to_radians().sin_cos();
    let (cx, cy) = (p.width as f64 / 2.0, p.height as f64 / 2.0);
    let mut rgb = vec![128u8; p.rgb.len()];
    for y in 0..p.height {
        for x in 0..p.width {
            let (dx, dy) = (x as f64 - cx, y as f64 - cy);
            let sx = (c * dx + s * dy + cx).round();
            let sy = (-s * dx + c * dy + cy).round();
            if sx >= 0.0 && sy >= 0.0 && (sx as usize) < p.width && (sy as usize) < p.height {
                let (from, to) = (
                    (sy as usize * p.width + sx as usize) * 3,
                    (y * p.width + x) * 3,
                );
                rgb[to..to + 3].copy_from_slice(&p.rgb[from..from + 3]);
            }
        }
    }
    Picture { rgb, ..*p }
}

/// `p` with every channel times `factor`.
fn lit(p: &Picture, factor: f64) -> Picture {
    let rgb = p
        .rgb
        .iter()
        .map(|v| (f64::from(*v) * factor).round().min(255.0) as u8)
        .collect();
    Picture { rgb, ..*p }
}

fn outcome(jpeg: &[u8], cfg: &RawFace) -> Outcome {
    examine(ImageKind::Jpeg, jpeg, cfg)
}

#[test]
fn every_face_photo_is_found_at_each_size_turned_darker_and_brighter() {
    let cfg = RawFace::default();
    let mut found = 0;
    let mut tried = Vec::new();
    for name in [
        "face-small.jpg",
        "face.jpg",
        "face-selfie.jpg",
        "face-large.jpg",
    ] {
        let original = fixture(name);
        let p = decode(&original);
        let variants = [
            ("as sent", original.clone()),
            ("turned +15°", jpeg(&turned(&p, 15.0))),
            ("turned -15°", jpeg(&turned(&p, -15.0))),
            ("darker (x0.5)", jpeg(&lit(&p, 0.5))),
            ("brighter (x1.5)", jpeg(&lit(&p, 1.5))),
        ];
        for (how, bytes) in variants {
            let o = outcome(&bytes, &cfg);
            println!("{name} {how}: {o:?}");
            found += usize::from(o == Outcome::Face);
            tried.push(format!("{name} {how}: {o:?}"));
        }
    }
    let png = examine(ImageKind::Png, &fixture("face.png"), &cfg);
    println!("face.png: {png:?}");
    found += usize::from(png == Outcome::Face);
    tried.push(format!("face.png: {png:?}"));
    println!("faces found: {found} of {}", tried.len());
    assert_eq!(found, tried.len(), "the defaults refuse none: {tried:#?}");
}

#[test]
fn photos_without_a_face_have_none() {
    let cfg = RawFace::default();
    let mut photos: Vec<(String, Vec<u8>)> = [
        "coffee",
        "rocket",
        "coins",
        "chelsea",
        "hubble_deep_field",
        "text",
    ]
    .iter()
    .map(|n| (n.to_string(), fixture(&format!("no-face/{n}.jpg"))))
    .collect();
    let (w, h) = (640, 480);
    let black = Picture {
        width: w,
        height: h,
        rgb: vec![0; w * h * 3],
    };
    photos.push(("a black frame".into(), jpeg(&black)));
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let noise = Picture {
        width: w,
        height: h,
        rgb: (0..w * h * 3)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect(),
    };
    photos.push(("noise".into(), jpeg(&noise)));
    let ceiling = Picture {
        width: w,
        height: h,
        rgb: (0..w * h)
            .flat_map(|i| {
                let v = (200 + (i / w) * 40 / h) as u8;
                [v, v, v]
            })
            .collect(),
    };
    photos.push(("a ceiling (a plain gradient)".into(), jpeg(&ceiling)));
    let mut empty = 0;
    for (name, bytes) in &photos {
        let o = outcome(bytes, &cfg);
        println!("{name}: {o:?}");
        empty += usize::from(o == Outcome::NoFace);
    }
    println!("no face found in {empty} of {}", photos.len());
    assert_eq!(empty, photos.len());
}

#[test]
fn two_faces_side_by_side_are_several_and_a_small_face_is_too_small() {
    let cfg = RawFace::default();
    let face = decode(&fixture("face.jpg"));
    let (w, h) = (face.width * 2, face.height);
    let mut rgb = vec![0u8; w * h * 3];
    for y in 0..h {
        for half in 0..2 {
            let to = (y * w + half * face.width) * 3;
            let from = y * face.width * 3;
            rgb[to..to + face.width * 3].copy_from_slice(&face.rgb[from..from + face.width * 3]);
        }
    }
    let two = jpeg(&Picture {
        width: w,
        height: h,
        rgb,
    });
    assert_eq!(outcome(&two, &cfg), Outcome::SeveralFaces { found: 2 });
    let two_allowed = RawFace {
        max_faces: 2,
        ..RawFace::default()
    };
    assert_eq!(outcome(&two, &two_allowed), Outcome::Face);

    // The face of face.jpg is about 80 pixels across in the upload's own pixels.
    let strict = RawFace {
        min_face_px: 300,
        ..RawFace::default()
    };
    match outcome(&fixture("face.jpg"), &strict) {
        Outcome::FaceTooSmall { px } => assert!((40..300).contains(&px), "{px}"),
        other => panic!("{other:?}"),
    }
    // The same photo at 3000 pixels a side: the face's size is counted in the upload's pixels
    // (about 480 here), whatever the detector's.
    match outcome(&fixture("face-large.jpg"), &strict) {
        Outcome::Face => {}
        other => panic!("a large photo's face: {other:?}"),
    }
}

/// `p` as libjpeg writes it in `space` (CMYK as Adobe stores it, inverted: 255 is no ink).
fn jpeg_in(p: &Picture, space: mozjpeg::ColorSpace) -> Vec<u8> {
    let pixels: Vec<u8> = match space {
        mozjpeg::ColorSpace::JCS_CMYK => p
            .rgb
            .chunks_exact(3)
            .flat_map(|c| [c[0], c[1], c[2], 255])
            .collect(),
        mozjpeg::ColorSpace::JCS_GRAYSCALE => p
            .rgb
            .chunks_exact(3)
            .map(|c| ((u16::from(c[0]) + u16::from(c[1]) + u16::from(c[2])) / 3) as u8)
            .collect(),
        _ => p.rgb.clone(),
    };
    let mut c = mozjpeg::Compress::new(space);
    c.set_size(p.width, p.height);
    c.set_quality(90.0);
    let mut started = c.start_compress(Vec::new()).expect("start");
    started.write_scanlines(&pixels).expect("write");
    started.finish().expect("finish")
}

/// `p` as a PNG (RGB, 8 bits).
fn png_of(p: &Picture) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, p.width as u32, p.height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().expect("png");
    writer.write_image_data(&p.rgb).expect("png");
    writer.finish().expect("png");
    out
}

/// `p` made `k` times larger on each side (each pixel a k x k block).
fn enlarged(p: &Picture, k: usize) -> Picture {
    let (width, height) = (p.width * k, p.height * k);
    let mut rgb = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let at = ((y / k) * p.width + x / k) * 3;
            rgb.extend_from_slice(&p.rgb[at..at + 3]);
        }
    }
    Picture { width, height, rgb }
}

/// A PNG is read row by row and brought down as it is read: a large one is checked like a
/// small one (here 4.2 megapixels, over what a PNG decoded in full may be).
#[test]
fn a_large_png_is_checked_as_it_is_read() {
    let cfg = RawFace::default();
    let face = enlarged(&decode(&fixture("face.jpg")), 4);
    assert!((face.width * face.height) as u64 > liveness_gateway::face::PNG_MAX_PIXELS);
    assert_eq!(examine(ImageKind::Png, &png_of(&face), &cfg), Outcome::Face);
    let coffee = enlarged(&decode(&fixture("no-face/coffee.jpg")), 3);
    assert_eq!(
        examine(ImageKind::Png, &png_of(&coffee), &cfg),
        Outcome::NoFace
    );
}

#[test]
fn a_cmyk_or_grey_jpeg_is_judged_like_any_other() {
    let cfg = RawFace::default();
    let face = decode(&fixture("face.jpg"));
    let coffee = decode(&fixture("no-face/coffee.jpg"));
    for space in [
        mozjpeg::ColorSpace::JCS_CMYK,
        mozjpeg::ColorSpace::JCS_GRAYSCALE,
    ] {
        assert_eq!(
            outcome(&jpeg_in(&face, space), &cfg),
            Outcome::Face,
            "{space:?}"
        );
        assert_eq!(
            outcome(&jpeg_in(&coffee, space), &cfg),
            Outcome::NoFace,
            "{space:?}"
        );
    }
}

/// `jpeg` with every `FF C0` (baseline frame) marker made `code`, and its frame's precision,
/// height and width set.
fn reframed(jpeg: &[u8], code: u8, precision: u8, size: Option<(u16, u16)>) -> Vec<u8> {
    let mut out = jpeg.to_vec();
    let sof = out
        .windows(2)
        .position(|w| w[0] == 0xFF && matches!(w[1], 0xC0 | 0xC2))
        .expect("a frame");
    out[sof + 1] = code;
    out[sof + 4] = precision;
    if let Some((w, h)) = size {
        out[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
        out[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    }
    out
}

/// `jpeg` with its one scan repeated `n` times.
fn with_scans(jpeg: &[u8], n: usize) -> Vec<u8> {
    let sos = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xDA])
        .expect("a scan");
    let eoi = jpeg.len() - 2;
    let mut out = jpeg[..sos].to_vec();
    for _ in 0..n {
        out.extend_from_slice(&jpeg[sos..eoi]);
    }
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

/// What the check does not read is `unreadable`, before a byte is decoded when its layout
/// says so: it would cost more than a check may (many scans, a progressive picture's buffered
/// coefficients), or libjpeg here does not decode it (arithmetic coding, 12 bits).
#[test]
fn a_photo_the_check_cannot_read_within_bounds_is_unreadable() {
    let cfg = RawFace::default();
    let face = fixture("face.jpg");
    assert_eq!(outcome(&face, &cfg), Outcome::Face);
    // (A JPEG cut short never gets here: validation refuses it.)
    let mut junk = face[..2].to_vec();
    junk.extend(std::iter::repeat_n(0x5a, 4096));
    assert_eq!(outcome(&junk, &cfg), Outcome::Unreadable);
    assert_eq!(outcome(b"not a jpeg at all", &cfg), Outcome::Unreadable);
    assert_eq!(
        outcome(&reframed(&face, 0xC9, 8, None), &cfg),
        Outcome::Unreadable,
        "arithmetic"
    );
    assert_eq!(
        outcome(&reframed(&face, 0xC0, 12, None), &cfg),
        Outcome::Unreadable,
        "12-bit"
    );
    let many = with_scans(&face, 65);
    let layout = liveness_gateway::image::jpeg_layout(&many).expect("whole");
    assert_eq!(layout.scans, 65);
    assert_eq!(outcome(&many, &cfg), Outcome::Unreadable, "65 scans");
    // A progressive JPEG of 6000 x 6000 (4:2:0) would buffer 108 MB of coefficients.
    let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
    let p = decode(&face);
    c.set_size(p.width, p.height);
    c.set_progressive_mode();
    let mut started = c.start_compress(Vec::new()).expect("start");
    started.write_scanlines(&p.rgb).expect("write");
    let progressive = started.finish().expect("finish");
    assert_eq!(outcome(&progressive, &cfg), Outcome::Face, "progressive");
    let huge = reframed(&progressive, 0xC2, 8, Some((6000, 6000)));
    let started = std::time::Instant::now();
    assert_eq!(
        outcome(&huge, &cfg),
        Outcome::Unreadable,
        "too large to buffer"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "refused before decoding"
    );
    assert_eq!(
        examine(ImageKind::Webp, &face, &cfg),
        Outcome::Unreadable,
        "a WebP is checked once converted"
    );
}

/// `jpeg` with its first scan made to code only the frame's first component (libjpeg then
/// buffers every component's coefficients, as for a progressive frame).
fn first_scan_of_one_component(jpeg: &[u8]) -> Vec<u8> {
    let sos = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xDA])
        .expect("a scan");
    let len = usize::from(u16::from_be_bytes([jpeg[sos + 2], jpeg[sos + 3]]));
    let n = usize::from(jpeg[sos + 4]);
    let mut out = jpeg[..sos].to_vec();
    out.extend_from_slice(&[0xFF, 0xDA]);
    out.extend_from_slice(&((len - 2 * (n - 1)) as u16).to_be_bytes());
    out.push(1);
    out.extend_from_slice(&jpeg[sos + 5..sos + 7]);
    out.extend_from_slice(&jpeg[sos + 5 + 2 * n..]);
    out
}

/// A progressive JPEG of `face.jpg` made by mozjpeg's libjpeg (its script: 6 scans for colour).
fn progressive_face() -> Vec<u8> {
    let p = decode(&fixture("face.jpg"));
    let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
    c.set_size(p.width, p.height);
    c.set_progressive_mode();
    let mut started = c.start_compress(Vec::new()).expect("start");
    started.write_scanlines(&p.rgb).expect("write");
    started.finish().expect("finish")
}

/// What libjpeg would buffer is bounded whatever makes it buffer, and so is the work of its
/// scans; a large progressive photo of the usual script stays within both.
#[test]
fn buffered_coefficients_and_their_passes_are_bounded() {
    let cfg = RawFace::default();
    let face = fixture("face.jpg");
    // One scan coding one of three components, in a frame that says 8192 x 4880 (4:2:0):
    // 120 MB of coefficients for a file of a few kilobytes.
    let one = first_scan_of_one_component(&reframed(&face, 0xC0, 8, Some((8192, 4880))));
    let layout = liveness_gateway::image::jpeg_layout(&one).expect("whole");
    assert_eq!((layout.scans, layout.first_scan_components), (1, Some(1)));
    assert_eq!(outcome(&one, &cfg), Outcome::Unreadable);
    // Some 30 scans (within 64) over 75 MB of coefficients (8192 x 3072, 4:2:0): over 2 GB of
    // passes.
    let progressive = progressive_face();
    let per = liveness_gateway::image::jpeg_layout(&progressive)
        .expect("whole")
        .scans;
    let many = with_scans(
        &reframed(&progressive, 0xC2, 8, Some((8192, 3072))),
        30 / per,
    );
    let scans = liveness_gateway::image::jpeg_layout(&many)
        .expect("whole")
        .scans;
    assert!((28..=64).contains(&scans), "{scans}");
    assert_eq!(outcome(&many, &cfg), Outcome::Unreadable);
    // The same frame with the encoder's own scans is within both bounds: decoded, not refused
    // (its scans, made for 512 x 512, hold no face at that size).
    let usual = reframed(&progressive, 0xC2, 8, Some((8192, 3072)));
    assert_ne!(outcome(&usual, &cfg), Outcome::Unreadable);
}

#[test]
fn bad_face_settings_are_refused_with_their_paths() {
    use liveness_gateway::config::Config;
    let base = r#"
[upstream]
url = "http://127.0.0.1:8081"
api_key_env = "ORG_KEY"
[[tenants]]
id = "a"
key_sha256 = ["0000000000000000000000000000000000000000000000000000000000000000"]
[intake.face]
"#;
    let env = |_: &str| Some("k".to_string());
    for (setting, path) in [
        ("max_faces = 0", "intake.face.max_faces"),
        ("min_confidence = 101", "intake.face.min_confidence"),
        ("max_pixels = 4095", "intake.face.max_pixels"),
        ("max_pixels = 1048577", "intake.face.max_pixels"),
        ("workers = 257", "intake.face.workers"),
        ("timeout = \"0s\"", "intake.face.timeout"),
        ("mode = \"enforced\"", "intake.face.mode"),
    ] {
        let text = format!("{base}{setting}\n");
        let err = Config::from_toml(&text, &env)
            .expect_err(setting)
            .to_string();
        assert!(err.contains(path), "{setting}: {err}");
    }
    let ok = format!("{base}mode = \"enforce\"\nmax_pixels = 1048576\nworkers = 256\n");
    assert!(Config::from_toml(&ok, &env).is_ok());
}
