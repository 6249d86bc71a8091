//! Parse and validate arbitrary bodies: the first byte picks a boundary form, the rest is the body.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use liveness_gateway::config::RawIntake;
use liveness_gateway::intake;

const CONTENT_TYPES: [&str; 4] = [
    "multipart/form-data; boundary=X",
    "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",
    "multipart/form-data; boundary=\"quoted boundary\"",
    "multipart/form-data",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let ct = CONTENT_TYPES[pick as usize % CONTENT_TYPES.len()];
    let cfg = RawIntake::default();
    if let Ok(form) = intake::parse_bytes(Bytes::copy_from_slice(body), ct, &cfg) {
        let _ = intake::validate_image(&form.image, &cfg);
    }
});
