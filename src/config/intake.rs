//! `[intake]`: how much of an upload is read, how fast, and what an image may be.

use std::time::Duration;

use serde::Deserialize;

use super::{Issues, MIB};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct RawIntake {
    /// Largest request body; a larger `Content-Length` is refused before reading (413).
    pub max_body_bytes: u64,
    /// Longest wait for the next piece of the body (408 after it).
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Deadline for the whole body (408 after it).
    #[serde(with = "humantime_serde")]
    pub body_deadline: Duration,
    /// Most parts a form may have.
    pub max_parts: usize,
    /// Largest total size of one part's headers.
    pub max_part_header_bytes: usize,
    /// File name extensions accepted for the image, compared case-insensitively.
    pub allowed_extensions: Vec<String>,
    /// Smallest image file accepted, in bytes.
    pub min_image_bytes: usize,
    /// Largest image file accepted, in bytes.
    pub max_image_bytes: usize,
    /// Smallest width and height accepted, in pixels.
    pub min_dimension: usize,
    /// Largest width and height accepted, in pixels.
    pub max_dimension: usize,
    /// Largest width x height accepted.
    pub max_pixels: u64,
    /// Bytes of request bodies held in memory at once, all requests together. A body that would
    /// pass it waits up to a second for room, then gets `503 overloaded`.
    pub max_buffered_bytes: u64,
    /// The share of it that bodies read before their sender is authenticated (the credential in
    /// the form field) may take.
    pub max_unauthenticated_buffered_bytes: u64,
    /// After an answer given before the body was read (a 401, a 429, a 413 from
    /// `Content-Length`), the most of the body still read and thrown away, so that the client
    /// can finish sending and read the answer (see `proxy::drain`). 0: none.
    pub drain_max_bytes: u64,
    /// How long that drain may take at most. 0: no drain.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Send the provider the image without its metadata (a JPEG's Exif with GPS position and
    /// device serials, XMP, IPTC, comments; a PNG's text and Exif chunks), pixels untouched and
    /// a JPEG's orientation kept. The cache key and the receipt's digest stay the client's bytes.
    pub strip_metadata: bool,
    /// Photos in the formats phones and browsers make that the provider does not take (HEIC,
    /// WebP), converted to JPEG before the provider sees them.
    pub convert: RawConvert,
    /// The check for a face before a paid call (`[intake.face]`).
    pub face: RawFace,
}

/// `[intake.face]`: a face check on the gateway's own CPU before a paid call (see
/// `crate::face`). Restart-only, like all of `[intake]`; a tenant may set its own mode
/// (`tenants[].face_mode`, reloadable).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct RawFace {
    /// `off`, `observe` (checked and counted, the call goes ahead) or `enforce` (a photo
    /// without exactly one large enough face is refused with `422`, and costs nothing). Off by
    /// default: a check costs 3 to 5 ms of a core for uploads up to a megapixel, but about 19
    /// ms for a 9-megapixel JPEG of 1.6 MB (its entropy decoding alone is 12 ms), over the 15
    /// ms a check on every call may cost (benches/README.md, "Face check").
    pub mode: FaceMode,
    /// The smallest face accepted: the shorter side of its box, in pixels of the upload.
    pub min_face_px: u32,
    /// The most faces a photo may hold.
    pub max_faces: usize,
    /// The detector's confidence, 0 to 100, from which a box counts as a face.
    pub min_confidence: u8,
    /// Pictures are brought to this many pixels before detection (down from a larger one, up
    /// from a smaller one): the detector's cost grows with it (about 2.5 ms at 160 x 160 on
    /// one core), and it finds faces of about 20 of its pixels and more.
    pub max_pixels: u64,
    /// Checks run at once, each on a thread of its own (0: one per core), never on the
    /// threads that serve requests.
    pub workers: usize,
    /// Checks that may wait for a worker; past it the check is skipped (`observe`) or the
    /// request gets `503 overloaded` (`enforce`).
    pub queue: usize,
    /// Longest wait for a check, its turn included; past it, as for a full queue.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// What the face check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaceMode {
    Off,
    Observe,
    Enforce,
}

impl Default for RawFace {
    fn default() -> Self {
        RawFace {
            mode: FaceMode::Off,
            min_face_px: 16,
            max_faces: 1,
            min_confidence: 70,
            max_pixels: 160 * 160,
            workers: 0,
            queue: 32,
            timeout: Duration::from_secs(2),
        }
    }
}

impl RawFace {
    /// The workers a check pool gets on this machine (`workers`, or its cores).
    pub fn workers(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// `[intake.convert]`: which formats are converted to JPEG, how well, and how much of the
/// machine conversions may take. Restart-only, like all of `[intake]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct RawConvert {
    /// `heic` (HEIC and HEIF, an iPhone's photos) and `webp`, recognised by their content
    /// whatever the file's name; `[]` refuses them (`415 not_an_image`).
    pub formats: Vec<ConvertFrom>,
    /// The JPEG's quality, 1 to 100.
    pub quality: u8,
    /// Conversions run at once, each on a thread of its own (0: one per core). A conversion
    /// never runs on the threads that serve requests.
    pub workers: usize,
    /// Conversions that may wait for a worker; past it a request gets `503 overloaded`.
    pub queue: usize,
    /// Longest wait for a conversion, its turn included (`503 overloaded` after it).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Largest width x height converted (a phone's 12 to 24 megapixels): a conversion holds
    /// about 10 bytes a pixel while it runs (see `memory`), so this bounds its memory.
    pub max_pixels: u64,
}

/// A format converted to JPEG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvertFrom {
    Heic,
    Webp,
}

impl ConvertFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            ConvertFrom::Heic => "heic",
            ConvertFrom::Webp => "webp",
        }
    }

    /// The file name extensions of the format, accepted beside `allowed_extensions`.
    pub fn extensions(self) -> &'static [&'static str] {
        match self {
            ConvertFrom::Heic => &[".heic", ".heif"],
            ConvertFrom::Webp => &[".webp"],
        }
    }
}

impl Default for RawConvert {
    fn default() -> Self {
        RawConvert {
            formats: vec![ConvertFrom::Heic, ConvertFrom::Webp],
            quality: 92,
            workers: 0,
            queue: 16,
            timeout: Duration::from_secs(10),
            max_pixels: 25_000_000,
        }
    }
}

impl RawConvert {
    /// Whether `format` is converted.
    pub fn converts(&self, format: ConvertFrom) -> bool {
        self.formats.contains(&format)
    }

    /// The workers a conversion pool gets on this machine (`workers`, or its cores).
    pub fn workers(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for RawIntake {
    fn default() -> Self {
        RawIntake {
            max_body_bytes: 10 * MIB,
            body_read_timeout: Duration::from_secs(10),
            body_deadline: Duration::from_secs(30),
            max_parts: 8,
            max_part_header_bytes: 4096,
            allowed_extensions: vec![".jpg".into(), ".jpeg".into(), ".png".into()],
            min_image_bytes: 100,
            max_image_bytes: (10 * MIB) as usize,
            min_dimension: 64,
            max_dimension: 8192,
            max_pixels: 40_000_000,
            max_buffered_bytes: 256 * MIB,
            max_unauthenticated_buffered_bytes: 32 * MIB,
            drain_max_bytes: 10 * MIB,
            drain_timeout: Duration::from_secs(10),
            strip_metadata: true,
            convert: RawConvert::default(),
            face: RawFace::default(),
        }
    }
}

/// Check `[intake]` (the raw table is the checked one).
pub fn check(raw: &RawIntake, issues: &mut Issues) {
    let mut issue = |path: &str, message: String| issues.add(path, message);
    let i = raw;
    if i.max_body_bytes == 0 {
        issue("intake.max_body_bytes", "must be more than zero".into());
    }
    if i.body_read_timeout.is_zero() || i.body_deadline.is_zero() {
        issue(
            "intake",
            "body_read_timeout and body_deadline must be more than zero".into(),
        );
    }
    if i.max_parts == 0 {
        issue("intake.max_parts", "must be at least 1".into());
    }
    if i.allowed_extensions.is_empty() {
        issue(
            "intake.allowed_extensions",
            "must name at least one extension".into(),
        );
    }
    for (n, ext) in i.allowed_extensions.iter().enumerate() {
        let e = ext.to_ascii_lowercase();
        if ![".jpg", ".jpeg", ".png"].contains(&e.as_str()) {
            issue(
                &format!("intake.allowed_extensions[{n}]"),
                format!("{ext:?} is not one of .jpg .jpeg .png (the types the provider accepts)"),
            );
        }
    }
    if i.min_image_bytes > i.max_image_bytes {
        issue(
            "intake.min_image_bytes",
            "is larger than max_image_bytes".into(),
        );
    }
    if i.max_image_bytes as u64 > i.max_body_bytes {
        issue(
            "intake.max_image_bytes",
            "is larger than max_body_bytes".into(),
        );
    }
    if i.max_buffered_bytes < i.max_body_bytes {
        issue(
            "intake.max_buffered_bytes",
            "is smaller than max_body_bytes: the largest body could never be read".into(),
        );
    }
    if i.max_unauthenticated_buffered_bytes > i.max_buffered_bytes {
        issue(
            "intake.max_unauthenticated_buffered_bytes",
            "is larger than max_buffered_bytes".into(),
        );
    }
    if i.min_dimension == 0 || i.min_dimension > i.max_dimension {
        issue(
            "intake.min_dimension",
            "must be at least 1 and at most max_dimension".into(),
        );
    }
    let c = &i.convert;
    if !(1..=100).contains(&c.quality) {
        issue("intake.convert.quality", "must be 1 to 100".into());
    }
    if c.timeout.is_zero() {
        issue("intake.convert.timeout", "must be more than zero".into());
    }
    if c.max_pixels == 0 {
        issue("intake.convert.max_pixels", "must be more than zero".into());
    }
    let f = &i.face;
    if f.max_faces == 0 {
        issue("intake.face.max_faces", "must be at least 1".into());
    }
    if f.min_confidence > 100 {
        issue("intake.face.min_confidence", "must be 0 to 100".into());
    }
    if !(64 * 64..=1024 * 1024).contains(&f.max_pixels) {
        issue(
            "intake.face.max_pixels",
            "must be 4096 (64 x 64: below it no face is found) to 1048576 (1024 x 1024: a check past it costs a core for a second)".into(),
        );
    }
    if f.workers > 256 {
        issue(
            "intake.face.workers",
            "must be at most 256 (0: one per core)".into(),
        );
    }
    if f.timeout.is_zero() {
        issue("intake.face.timeout", "must be more than zero".into());
    }
    if f.mode != FaceMode::Off {
        face_supported("intake.face.mode", &mut issue);
    }
}

/// The face detector runs on this CPU (on x86-64 it needs AVX2 and FMA, which every x86-64
/// server CPU since 2013 has); a mode that needs it is an issue of `path` where it does not.
pub fn face_supported(path: &str, issue: &mut impl FnMut(&str, String)) {
    if !liveness_facedetect::available() {
        issue(
            path,
            "the face check needs a CPU with AVX2 and FMA, which this one lacks: set it to \"off\""
                .into(),
        );
    }
}
