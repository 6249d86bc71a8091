//! Property tests on the multipart parser and the image validator.

use bytes::Bytes;
use liveness_gateway::config::RawIntake;
use liveness_gateway::intake::{self, ImagePart};
use proptest::prelude::*;

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Parse and, when that succeeds, validate: the whole intake path on one body.
fn intake_path(body: Vec<u8>, content_type: &str) {
    let cfg = RawIntake::default();
    if let Ok(form) = intake::parse_bytes(Bytes::from(body), content_type, &cfg) {
        let _ = intake::validate_image(&form.image, &cfg);
    }
}

fn boundary_strategy() -> impl Strategy<Value = String> {
    // RFC 2046 boundary characters, 1 to 70 of them, not ending in a space.
    proptest::string::string_regex("[0-9A-Za-z'()+_,./:=?-]{1,69}[0-9A-Za-z]").expect("regex")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..4096), boundary in boundary_strategy()) {
        intake_path(body, &format!("multipart/form-data; boundary={boundary}"));
    }

    #[test]
    fn arbitrary_content_types_never_panic(ct in ".{0,200}", body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = intake::boundary(Some(&ct));
        intake_path(body, &ct);
    }

    #[test]
    fn mutated_valid_forms_never_panic(
        boundary in boundary_strategy(),
        payload in proptest::collection::vec(any::<u8>(), 0..2048),
        cut in 0usize..4096,
        flip in proptest::collection::vec((0usize..4096, any::<u8>()), 0..8),
    ) {
        let mut body = form(&boundary, "a.jpg", &[b"\xff\xd8\xff".as_slice(), &payload].concat());
        for (at, byte) in flip {
            if let Some(b) = body.get_mut(at) { *b = byte; }
        }
        body.truncate(cut.min(body.len()));
        intake_path(body, &format!("multipart/form-data; boundary={boundary}"));
    }

    #[test]
    fn valid_forms_round_trip_the_image(
        boundary in boundary_strategy(),
        png in any::<bool>(),
        payload in proptest::collection::vec(any::<u8>(), 0..20_000),
    ) {
        let magic: &[u8] = if png { b"\x89PNG\r\n\x1a\n" } else { b"\xff\xd8\xff\xe0" };
        let image = [magic, &payload].concat();
        let name = if png { "x.PNG" } else { "x.jpeg" };
        let body = form(&boundary, name, &image);
        prop_assume!(!image.windows(boundary.len() + 4).any(|w| w == format!("\r\n--{boundary}").as_bytes()));
        let form = intake::parse_bytes(Bytes::from(body), &format!("multipart/form-data; boundary=\"{boundary}\""), &RawIntake::default()).expect("valid form parses");
        let ImagePart { bytes, extension, .. } = &form.image;
        prop_assert_eq!(&bytes.bytes()[..], &image[..]);
        prop_assert_eq!(bytes.digest(), <[u8; 32]>::from(blake3::hash(&image)));
        prop_assert_eq!(extension.as_str(), if png { ".png" } else { ".jpeg" });
        prop_assert_eq!(form.api_key, Some(liveness_gateway::config::TenantKey::new("tenant-key")));
    }
}

/// A part as (name, filename, data).
type PartView = (String, Option<String>, Vec<u8>);

/// Parts as multer sees them.
fn multer_parts(body: Vec<u8>, boundary: &str) -> Option<Vec<PartView>> {
    block_on(async {
        let mut m = multer::Multipart::new(
            futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(body))]),
            boundary,
        );
        let mut out = Vec::new();
        while let Some(field) = m.next_field().await.ok()? {
            let name = field.name()?.to_string();
            let filename = field.file_name().map(str::to_string);
            out.push((name, filename, field.bytes().await.ok()?.to_vec()));
        }
        Some(out)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// The gateway's parser and multer agree on every well-formed form.
    #[test]
    fn the_parser_agrees_with_multer(
        boundary in boundary_strategy(),
        fields in proptest::collection::vec(("[a-z_]{1,12}", proptest::option::of("[A-Za-z0-9 ._;()-]{1,20}"), proptest::collection::vec(any::<u8>(), 0..512)), 1..6),
    ) {
        let mut body = Vec::new();
        for (name, filename, data) in &fields {
            body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes());
            if let Some(f) = filename {
                body.extend_from_slice(format!("; filename=\"{f}\"").as_bytes());
            }
            body.extend_from_slice(b"\r\nContent-Type: application/octet-stream\r\n\r\n");
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        prop_assume!(!fields.iter().any(|(_, _, d)| d.windows(boundary.len() + 2).any(|w| w == format!("--{boundary}").as_bytes())));
        let limits = liveness_gateway::multipart::Limits { max_parts: 100, max_part_header_bytes: 4096 };
        let ours: Vec<_> = liveness_gateway::multipart::parse(&Bytes::from(body.clone()), &boundary, limits)
            .expect("a well-formed form parses")
            .into_iter()
            .map(|p| (p.name, p.filename, p.data.to_vec()))
            .collect();
        prop_assert_eq!(Some(ours), multer_parts(body, &boundary));
    }
}

fn form(boundary: &str, filename: &str, image: &[u8]) -> Vec<u8> {
    let mut v = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").into_bytes();
    v.extend_from_slice(image);
    v.extend_from_slice(format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"api_key\"\r\n\r\ntenant-key\r\n--{boundary}--\r\n").as_bytes());
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// The completeness walk takes any bytes after a JPEG's or PNG's signature without
    /// panicking, and accepts no photo cut anywhere before its end.
    #[test]
    fn the_completeness_walk_never_panics_and_never_passes_a_cut_photo(
        tail in proptest::collection::vec(any::<u8>(), 0..4096),
        png in any::<bool>(),
        cut in 0.0f64..1.0,
    ) {
        use liveness_gateway::image::{check_complete, ImageKind};
        let (kind, magic): (_, &[u8]) = if png {
            (ImageKind::Png, b"\x89PNG\r\n\x1a\n")
        } else {
            (ImageKind::Jpeg, b"\xff\xd8\xff")
        };
        let _ = check_complete(kind, &[magic, &tail].concat());
        let name = if png { "face.png" } else { "face.jpg" };
        let photo = std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture");
        prop_assert!(check_complete(kind, &photo).is_ok());
        let at = (photo.len() as f64 * cut) as usize;
        prop_assert!(check_complete(kind, &photo[..at]).is_err(), "cut at {} of {}", at, photo.len());
    }
}
