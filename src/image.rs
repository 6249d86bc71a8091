//! Image checks, in the order clients are told about them: extension, magic bytes, size, then
//! pixel dimensions read from the header alone (nothing is decoded).

use bytes::Bytes;

use crate::config::{ConvertFrom, RawIntake};
use crate::error::GatewayError;

/// The image as it arrived: a slice of the request body.
#[derive(Debug, Clone, Default)]
pub struct ImageBytes(Bytes);

impl ImageBytes {
    pub fn new(bytes: Bytes) -> Self {
        ImageBytes(bytes)
    }

    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The BLAKE3 digest of the image: the cache key. BLAKE3 rather than SHA-256 because it is
    /// as collision-resistant and, measured on the test photos, several times faster (see
    /// benches/README.md); a cache hit is mostly the cost of this digest.
    pub fn digest(&self) -> [u8; 32] {
        blake3::hash(&self.0).into()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Jpeg,
    Png,
    /// HEIC or HEIF (HEVC-coded): converted to JPEG before a call (`crate::convert`).
    Heic,
    /// WebP: converted to JPEG before a call.
    Webp,
}

/// The ISO-BMFF major brands of HEVC-coded HEIF files (ISO/IEC 23008-12, Annex B): a still
/// image, an image sequence, and their 10-bit and multi-layer kinds.
const HEIC_BRANDS: [&[u8; 4]; 6] = [b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"];

impl ImageKind {
    pub fn mime(self) -> &'static str {
        match self {
            ImageKind::Jpeg => "image/jpeg",
            ImageKind::Png => "image/png",
            ImageKind::Heic => "image/heic",
            ImageKind::Webp => "image/webp",
        }
    }

    fn from_extension(ext: &str) -> Option<ImageKind> {
        match ext {
            ".jpg" | ".jpeg" => Some(ImageKind::Jpeg),
            ".png" => Some(ImageKind::Png),
            _ => None,
        }
    }

    /// The format this kind is converted from, for the kinds the provider does not take.
    pub fn converted_from(self) -> Option<ConvertFrom> {
        match self {
            ImageKind::Heic => Some(ConvertFrom::Heic),
            ImageKind::Webp => Some(ConvertFrom::Webp),
            ImageKind::Jpeg | ImageKind::Png => None,
        }
    }

    /// The type the content really is, from its first bytes.
    pub fn sniff(head: &[u8]) -> Option<ImageKind> {
        if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageKind::Jpeg)
        } else if head.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(ImageKind::Png)
        } else if head.starts_with(b"RIFF") && head.get(8..12) == Some(b"WEBP".as_slice()) {
            Some(ImageKind::Webp)
        } else if is_heic(head) {
            Some(ImageKind::Heic)
        } else {
            None
        }
    }
}

/// Whether a file starts with the `ftyp` box of an HEVC-coded HEIF: its major brand is one, or
/// it is the generic `mif1`/`msf1` with one among its compatible brands (an AVIF, also `mif1`,
/// is not).
fn is_heic(head: &[u8]) -> bool {
    let Some(len) = head.get(0..4) else {
        return false;
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if head.get(4..8) != Some(b"ftyp".as_slice()) || len < 16 {
        return false;
    }
    let Some(ftyp) = head.get(8..len) else {
        return false;
    };
    let heic = |brand: &[u8]| HEIC_BRANDS.iter().any(|b| b.as_slice() == brand);
    let major = &ftyp[0..4];
    // Major brand, minor version, then the compatible brands.
    heic(major) || ((major == b"mif1" || major == b"msf1") && ftyp[8..].chunks_exact(4).any(heic))
}

/// Whether a HEIF's primary image is HEVC-coded (item type `hvc1`, or a `grid`, `iden` or
/// `iovl` of such images) and no item is AV1 (`av01`, an AVIF's): read from its `meta` box's
/// `pitm` and `iinf` (ISO/IEC 23008-12). The brands of `ftyp` are only a claim: an AVIF that
/// calls itself `heic` must not reach the AV1 decoder libheif also has. Hand-written: neither
/// libheif 1.15's API nor its Rust binding tells an item's type, and these are three boxes.
pub fn is_hevc_heif(data: &[u8]) -> bool {
    let Some(meta) = boxes(data).find(|(t, _)| t == b"meta").map(|(_, b)| b) else {
        return false;
    };
    // A full box: version and flags before its children.
    let children = || boxes(meta.get(4..).unwrap_or_default());
    let primary = children()
        .find(|(t, _)| t == b"pitm")
        .and_then(|(_, b)| match b.first()? {
            0 => b
                .get(4..6)
                .map(|v| u32::from(u16::from_be_bytes([v[0], v[1]]))),
            _ => b
                .get(4..8)
                .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
        });
    let Some(iinf) = children().find(|(t, _)| t == b"iinf").map(|(_, b)| b) else {
        return false;
    };
    let first = if iinf.first() == Some(&0) { 6 } else { 8 };
    let items: Vec<(u32, [u8; 4])> = boxes(iinf.get(first..).unwrap_or_default())
        .filter(|(t, _)| t == b"infe")
        .filter_map(|(_, e)| {
            let (id, at) = match e.first()? {
                2 => (u32::from(u16::from_be_bytes([*e.get(4)?, *e.get(5)?])), 8),
                3 => (u32::from_be_bytes(e.get(4..8)?.try_into().ok()?), 10),
                _ => return None,
            };
            Some((id, e.get(at..at + 4)?.try_into().ok()?))
        })
        .collect();
    let hevc = |t: &[u8; 4]| matches!(t, b"hvc1" | b"grid" | b"iden" | b"iovl");
    !items.iter().any(|(_, t)| t == b"av01")
        && primary.is_some_and(|p| items.iter().any(|(id, t)| *id == p && hevc(t)))
}

/// The boxes of an ISO-BMFF byte range, as (type, payload), up to the first that does not fit.
fn boxes(mut data: &[u8]) -> impl Iterator<Item = ([u8; 4], &[u8])> {
    std::iter::from_fn(move || {
        let size = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as u64;
        let kind: [u8; 4] = data.get(4..8)?.try_into().ok()?;
        let (head, size) = match size {
            0 => (8, data.len() as u64),
            1 => (16, u64::from_be_bytes(data.get(8..16)?.try_into().ok()?)),
            n => (8, n),
        };
        let size = usize::try_from(size).ok().filter(|s| *s >= head)?;
        let payload = data.get(head..size)?;
        data = &data[size..];
        Some((kind, payload))
    })
}

/// The lower-case extension of a file name (`.jpg`), if it is on the allow-list or names a
/// format that is converted (`.heic`, `.heif`, `.webp`).
pub fn check_extension(filename: &str, intake: &RawIntake) -> Result<String, GatewayError> {
    let name = filename.rsplit(['/', '\\']).next().unwrap_or(filename);
    let ext = match name.rfind('.') {
        Some(dot) if dot > 0 || name.len() > 1 => name[dot..].to_ascii_lowercase(),
        _ => return Err(GatewayError::ExtensionNotAllowed),
    };
    let converted = intake.convert.formats.iter().flat_map(|f| f.extensions());
    if intake
        .allowed_extensions
        .iter()
        .map(String::as_str)
        .chain(converted.copied())
        .any(|a| a.eq_ignore_ascii_case(&ext))
    {
        Ok(ext)
    } else {
        Err(GatewayError::ExtensionNotAllowed)
    }
}

/// Magic bytes must be JPEG or PNG and agree with the extension, or be a format that is
/// converted, whatever the extension (a phone's HEIC is often saved or renamed as `.jpg`); a
/// JPEG or PNG under a converted format's name (`.heic`, `.webp`: a picker that converted the
/// photo and kept its name) is taken for what it is too. A HEIC must be HEVC-coded
/// (`is_hevc_heif`).
pub fn check_magic(
    extension: &str,
    data: &[u8],
    intake: &RawIntake,
) -> Result<ImageKind, GatewayError> {
    let real = ImageKind::sniff(data).ok_or(GatewayError::NotAnImage)?;
    let converted_name = intake
        .convert
        .formats
        .iter()
        .any(|f| f.extensions().contains(&extension));
    let accepted = match real.converted_from() {
        Some(ConvertFrom::Heic) => intake.convert.converts(ConvertFrom::Heic) && is_hevc_heif(data),
        Some(format) => intake.convert.converts(format),
        None => ImageKind::from_extension(extension) == Some(real) || converted_name,
    };
    if accepted {
        Ok(real)
    } else {
        Err(GatewayError::NotAnImage)
    }
}

/// The extension the provider is sent for an image of `kind` named with `extension`: its own
/// when it names the kind, else the kind's (a JPEG named `.heic` goes as `.jpg`).
pub fn provider_extension(kind: ImageKind, extension: &str) -> String {
    match (kind, ImageKind::from_extension(extension)) {
        (k, Some(named)) if k == named => extension.to_string(),
        (ImageKind::Png, _) => ".png".into(),
        _ => ".jpg".into(),
    }
}

pub fn check_size(len: usize, intake: &RawIntake) -> Result<(), GatewayError> {
    if len < intake.min_image_bytes {
        return Err(GatewayError::ImageTooSmall {
            min: intake.min_image_bytes,
        });
    }
    if len > intake.max_image_bytes {
        return Err(GatewayError::ImageTooLarge {
            max: intake.max_image_bytes,
        });
    }
    Ok(())
}

/// Bounds on width and height, whatever read them.
pub fn check_dimensions(
    width: usize,
    height: usize,
    intake: &RawIntake,
) -> Result<(), GatewayError> {
    if width == 0 || height == 0 {
        return Err(GatewayError::ImageUnreadable);
    }
    if width < intake.min_dimension || height < intake.min_dimension {
        return Err(GatewayError::ImageDimensionsTooSmall {
            width,
            height,
            min: intake.min_dimension,
        });
    }
    if width > intake.max_dimension
        || height > intake.max_dimension
        || (width as u64) * (height as u64) > intake.max_pixels
    {
        return Err(GatewayError::ImageDimensionsTooLarge {
            width,
            height,
            max: intake.max_dimension,
            max_pixels: intake.max_pixels,
        });
    }
    Ok(())
}

/// The bounds of a picture that is converted: those of every image, and
/// `intake.convert.max_pixels` (the memory a conversion takes grows with it).
pub fn check_converted_dimensions(
    width: usize,
    height: usize,
    intake: &RawIntake,
) -> Result<(), GatewayError> {
    check_dimensions(width, height, intake)?;
    let max_pixels = intake.convert.max_pixels;
    if (width as u64) * (height as u64) > max_pixels {
        return Err(GatewayError::ImageDimensionsTooLarge {
            width,
            height,
            max: intake.max_dimension,
            max_pixels,
        });
    }
    Ok(())
}

/// Whether the image arrived whole (a cut-off upload has a readable header but no end, and the
/// provider would still be paid to reject it), read from its structure, never by searching for
/// an end marker that an embedded thumbnail or a text chunk may carry too.
///
/// A HEIC's boxes are read by its decoder before any call: a cut one is refused then.
pub fn check_complete(kind: ImageKind, data: &[u8]) -> Result<(), GatewayError> {
    match kind {
        ImageKind::Jpeg => check_jpeg_complete(data),
        ImageKind::Png => check_png_complete(data),
        ImageKind::Webp => check_riff_complete(data),
        ImageKind::Heic => Ok(()),
    }
}

/// Whether a WebP is whole: its RIFF header's length reaches the end of what arrived.
fn check_riff_complete(data: &[u8]) -> Result<(), GatewayError> {
    let len = data.get(4..8).ok_or(GatewayError::ImageTruncated)?;
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len.saturating_add(8) > data.len() {
        return Err(GatewayError::ImageTruncated);
    }
    Ok(())
}

/// Whether a PNG is whole: its chunks walked by their lengths up to `IEND`.
fn check_png_complete(data: &[u8]) -> Result<(), GatewayError> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if !data.starts_with(SIGNATURE) {
        return Err(GatewayError::NotAnImage);
    }
    let mut at = SIGNATURE.len();
    loop {
        let head = data.get(at..at + 8).ok_or(GatewayError::ImageTruncated)?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        // Length, type, data, CRC.
        let end = at
            .checked_add(12)
            .and_then(|n| n.checked_add(len))
            .ok_or(GatewayError::ImageUnreadable)?;
        if end > data.len() {
            return Err(GatewayError::ImageTruncated);
        }
        if &head[4..8] == b"IEND" {
            return Ok(());
        }
        at = end;
    }
}

/// Whether a JPEG is whole: its marker segments walked from the start, each skipped by its
/// length (so nothing inside an APPn segment, such as an Exif thumbnail with its own end marker,
/// is ever read as structure), every entropy-coded scan crossed (byte stuffing `FF 00` and
/// restart markers `FF D0`…`FF D7` inside it; a progressive image has several scans, with
/// tables between them) up to the end-of-image marker `FF D9` that follows the last one. Bytes
/// after that marker are accepted (apps and cameras append data there).
///
/// Hand-written rather than a JPEG crate: the decoders decode the scans (milliseconds for a
/// photo) and the segment parsers copy every segment and do not tell a cut file from a broken
/// one; this walk reads only marker bytes, with `memchr` over the scans.
fn check_jpeg_complete(data: &[u8]) -> Result<(), GatewayError> {
    jpeg_layout(data).map(|_| ())
}

/// What the walk of a whole JPEG (`check_jpeg_complete`) learns on its way: its scans, and its
/// frame header (the first; none before a scan is not a picture libjpeg decodes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JpegLayout {
    pub scans: usize,
    pub frame: Option<JpegFrame>,
    /// The components the first scan codes (a frame's components in scans of their own make
    /// libjpeg buffer the whole picture's coefficients, as a progressive frame does).
    pub first_scan_components: Option<usize>,
}

/// A JPEG's frame header (`SOFn`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JpegFrame {
    /// The `SOFn` marker's code: `C0` baseline, `C1` extended, `C2` progressive; the others
    /// are lossless, hierarchical or arithmetic-coded.
    pub marker: u8,
    /// Bits per sample (8 for nearly every JPEG; 12 for some medical and raw pictures).
    pub precision: u8,
    pub width: usize,
    pub height: usize,
    /// Each component's horizontal and vertical sampling factors.
    pub sampling: Vec<(u8, u8)>,
}

impl JpegFrame {
    /// The bytes libjpeg holds for the whole picture's DCT coefficients when it buffers them
    /// (a progressive JPEG, or one with its components in scans of their own): 2 bytes for each
    /// of the 64 coefficients of every 8 x 8 block of every component.
    pub fn coefficient_bytes(&self) -> u64 {
        let h_max = self.sampling.iter().map(|s| s.0).max().unwrap_or(1).max(1) as usize;
        let v_max = self.sampling.iter().map(|s| s.1).max().unwrap_or(1).max(1) as usize;
        self.sampling
            .iter()
            .map(|&(h, v)| {
                let w = (self.width * h as usize).div_ceil(h_max).div_ceil(8);
                let r = (self.height * v as usize).div_ceil(v_max).div_ceil(8);
                (w * r) as u64 * 128
            })
            .sum()
    }
}

/// A JPEG walked from its start to its end (see `check_jpeg_complete`).
pub fn jpeg_layout(data: &[u8]) -> Result<JpegLayout, GatewayError> {
    if !data.starts_with(&[0xFF, 0xD8]) {
        return Err(GatewayError::NotAnImage);
    }
    let mut at = 2;
    let mut layout = JpegLayout {
        scans: 0,
        frame: None,
        first_scan_components: None,
    };
    loop {
        // A marker: `FF`, any number of `FF` fill bytes, then its code. Stray bytes where a
        // marker belongs are skipped, as libjpeg does (it warns and goes on).
        let ff = memchr::memchr(0xFF, &data[at.min(data.len())..])
            .map(|p| at + p)
            .ok_or(GatewayError::ImageTruncated)?;
        let mut code_at = ff + 1;
        while data.get(code_at) == Some(&0xFF) {
            code_at += 1;
        }
        let code = *data.get(code_at).ok_or(GatewayError::ImageTruncated)?;
        at = code_at + 1;
        match code {
            0xD9 if layout.scans > 0 => return Ok(layout),
            // An end before any scan, a second start, or `FF 00` outside a scan: not a picture.
            0xD9 | 0xD8 | 0x00 => return Err(GatewayError::ImageUnreadable),
            // Markers without a length (TEM, a restart outside a scan).
            0x01 | 0xD0..=0xD7 => {}
            _ => {
                let len = data
                    .get(at..at + 2)
                    .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
                    .ok_or(GatewayError::ImageTruncated)?;
                if len < 2 {
                    return Err(GatewayError::ImageUnreadable);
                }
                let body = data.get(at + 2..at + len);
                at += len;
                if at > data.len() {
                    return Err(GatewayError::ImageTruncated);
                }
                let sof = matches!(code, 0xC0..=0xCF) && !matches!(code, 0xC4 | 0xC8 | 0xCC);
                if sof && layout.frame.is_none() {
                    layout.frame = body.and_then(|b| frame(code, b));
                }
                if code == 0xDA {
                    layout.scans += 1;
                    if layout.first_scan_components.is_none() {
                        layout.first_scan_components =
                            body.and_then(|b| b.first()).map(|n| usize::from(*n));
                    }
                    at = scan_end(data, at)?;
                }
            }
        }
    }
}

/// A frame header's body: precision, height, width, components (id, sampling, table).
fn frame(marker: u8, b: &[u8]) -> Option<JpegFrame> {
    let (&precision, rest) = b.split_first()?;
    let height = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    let width = usize::from(u16::from_be_bytes([*rest.get(2)?, *rest.get(3)?]));
    let n = usize::from(*rest.get(4)?);
    let sampling = rest
        .get(5..5 + 3 * n)?
        .chunks_exact(3)
        .map(|c| (c[1] >> 4, c[1] & 0x0F))
        .collect();
    Some(JpegFrame {
        marker,
        precision,
        width,
        height,
        sampling,
    })
}

/// Where an entropy-coded scan starting at `from` ends: the `FF` of the first marker that is
/// neither stuffing (`FF 00`) nor a restart (`FF D0`…`FF D7`).
fn scan_end(data: &[u8], from: usize) -> Result<usize, GatewayError> {
    let mut at = from;
    loop {
        let ff = memchr::memchr(0xFF, &data[at..])
            .map(|p| at + p)
            .ok_or(GatewayError::ImageTruncated)?;
        let mut next = ff + 1;
        while data.get(next) == Some(&0xFF) {
            next += 1;
        }
        match data.get(next) {
            None => return Err(GatewayError::ImageTruncated),
            Some(0x00 | 0xD0..=0xD7) => at = next + 1,
            Some(_) => return Ok(ff),
        }
    }
}

/// The image without what the liveness check does not need and the client did not mean to
/// send: a phone's JPEG carries Exif (GPS position, device serials, maker notes, a thumbnail),
/// XMP, IPTC, comments, and often more images after its end (a depth map, a gain map, a motion
/// photo, each with its own Exif); a PNG text, Exif and time chunks. Nothing is decoded or
/// re-encoded: the segments that describe the pixels (tables, frames, scans, a JFIF header, a
/// colour profile, Adobe's colour transform) are copied byte for byte, in order, whatever scan
/// they are between. The orientation (what decoders read: the first Exif's) stays, in an Exif
/// of its own. `None` when there is nothing to take out, or the layout is one this does not
/// walk (then the image goes as it came).
pub fn without_metadata(kind: ImageKind, data: &[u8]) -> Option<Vec<u8>> {
    let out = match kind {
        ImageKind::Jpeg => jpeg_without_metadata(data)?,
        ImageKind::Png => png_without_metadata(data)?,
        // Converted to JPEG first, which keeps none.
        ImageKind::Heic | ImageKind::Webp => return None,
    };
    (out != data).then_some(out)
}

/// The JPEG's segments to the end of its image (EOI), each kept or not, and the entropy-coded
/// data after each scan kept as it is. The walk only notes what it keeps: an image with nothing
/// to take out is not copied.
fn jpeg_without_metadata(data: &[u8]) -> Option<Vec<u8>> {
    if !data.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut kept = Kept(Vec::new());
    kept.add(0..2);
    let (mut i, mut orientation, mut exif_at) = (2, None, 2);
    let mut first_exif = true;
    loop {
        if *data.get(i)? != 0xFF {
            return None;
        }
        let mut m = i + 1;
        while *data.get(m)? == 0xFF {
            m += 1;
        }
        let marker = *data.get(m)?;
        if marker == 0xD9 {
            // The image ends here: what follows is not part of it.
            kept.add(i..m + 1);
            break;
        }
        // A marker without a length outside a scan: not a layout this walks.
        if marker == 0x01 || (0xD0..=0xD7).contains(&marker) || marker == 0xD8 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([*data.get(m + 1)?, *data.get(m + 2)?]));
        if len < 2 {
            return None;
        }
        let end = m + 1 + len;
        let body = data.get(m + 3..end)?;
        let keep = match marker {
            0xE0 => body.starts_with(b"JFIF\0"),
            0xEE => body.starts_with(b"Adobe"),
            0xE2 => body.starts_with(b"ICC_PROFILE\0"),
            0xE1 => {
                if let Some(tiff) = body.strip_prefix(b"Exif\0\0") {
                    if first_exif {
                        orientation = exif_orientation(tiff);
                        first_exif = false;
                    }
                }
                false
            }
            0xE3..=0xEF | 0xFE => false,
            _ => true,
        };
        if keep {
            // The orientation goes right after JFIF's APP0, which must come first.
            if marker == 0xE0 && kept.len() == 2 {
                exif_at = 2 + (end - i);
            }
            kept.add(i..end);
        }
        i = end;
        if marker == 0xDA {
            // The scan's data: up to the next marker that is not a stuffed byte or a restart.
            let mut j = i;
            loop {
                let at = j + memchr::memchr(0xFF, data.get(j..)?)?;
                match *data.get(at + 1)? {
                    0x00 | 0xD0..=0xD7 => j = at + 2,
                    _ => {
                        kept.add(i..at);
                        i = at;
                        break;
                    }
                }
            }
        }
    }
    let orientation = orientation.filter(|o| *o != 1);
    if orientation.is_none() && kept.0.len() == 1 && kept.len() == data.len() {
        return None;
    }
    let mut out = Vec::with_capacity(kept.len() + 36);
    for r in &kept.0 {
        out.extend_from_slice(&data[r.clone()]);
    }
    if let Some(o) = orientation {
        out.splice(exif_at..exif_at, orientation_app1(o));
    }
    Some(out)
}

/// The ranges of an image kept so far, adjacent ones as one.
struct Kept(Vec<std::ops::Range<usize>>);

impl Kept {
    fn add(&mut self, r: std::ops::Range<usize>) {
        match self.0.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => self.0.push(r),
        }
    }

    /// The bytes kept so far.
    fn len(&self) -> usize {
        self.0.iter().map(|r| r.len()).sum()
    }
}

/// The orientation (1 to 8) a JPEG's first Exif block gives, as decoders read it; none when it
/// has no Exif before its first scan.
pub fn jpeg_orientation(data: &[u8]) -> Option<u16> {
    if !data.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut i = 2;
    loop {
        if *data.get(i)? != 0xFF {
            return None;
        }
        let marker = *data.get(i + 1)?;
        if marker == 0xFF {
            i += 1;
            continue;
        }
        if marker == 0xDA || marker == 0xD9 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([*data.get(i + 2)?, *data.get(i + 3)?]));
        let body = data.get(i + 4..i + 2 + len.max(2))?;
        if let Some(tiff) = body.strip_prefix(b"Exif\0\0").filter(|_| marker == 0xE1) {
            return exif_orientation(tiff);
        }
        i += 2 + len.max(2);
    }
}

/// The Orientation tag (0x0112) of an Exif block's first IFD, written as a SHORT or a LONG.
fn exif_orientation(tiff: &[u8]) -> Option<u16> {
    let le = match tiff.get(..4)? {
        b"II*\0" => true,
        b"MM\0*" => false,
        _ => return None,
    };
    let u16_at = |o: usize| {
        let b = tiff.get(o..o + 2)?;
        Some(if le {
            u16::from_le_bytes([b[0], b[1]])
        } else {
            u16::from_be_bytes([b[0], b[1]])
        })
    };
    let u32_at = |o: usize| {
        let b: [u8; 4] = tiff.get(o..o + 4)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let ifd = u32_at(4)? as usize;
    let entries = usize::from(u16_at(ifd)?).min(1024);
    let e = (0..entries)
        .map(|k| ifd + 2 + 12 * k)
        .find(|e| u16_at(*e) == Some(0x0112))?;
    let value = match u16_at(e + 2)? {
        3 => u32::from(u16_at(e + 8)?),
        4 => u32_at(e + 8)?,
        _ => return None,
    };
    u16::try_from(value).ok().filter(|o| (1..=8).contains(o))
}

/// An Exif block (TIFF, big-endian) holding only an Orientation.
fn orientation_tiff(orientation: u16) -> Vec<u8> {
    let mut t = b"MM\0*\0\0\0\x08".to_vec();
    t.extend_from_slice(&[0x00, 0x01, 0x01, 0x12, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01]);
    t.extend_from_slice(&orientation.to_be_bytes());
    t.extend_from_slice(&[0x00, 0x00, 0x00, 0x00, 0x00, 0x00]);
    t
}

/// A JPEG APP1 segment holding only an Exif Orientation.
fn orientation_app1(orientation: u16) -> Vec<u8> {
    let mut s = vec![0xFF, 0xE1, 0x00, 0x22];
    s.extend_from_slice(b"Exif\0\0");
    s.extend(orientation_tiff(orientation));
    s
}

/// A PNG to its IEND without its text and time chunks; an Exif chunk is written anew with the
/// orientation alone (none when upright).
fn png_without_metadata(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len());
    out.extend_from_slice(data.get(..8)?);
    let mut i = 8;
    loop {
        let len = u32::from_be_bytes(data.get(i..i + 4)?.try_into().ok()?) as usize;
        let end = i.checked_add(12)?.checked_add(len)?;
        let kind = data.get(i + 4..i + 8)?;
        match kind {
            b"tEXt" | b"zTXt" | b"iTXt" | b"tIME" => {}
            b"eXIf" => {
                let o = exif_orientation(data.get(i + 8..i + 8 + len)?).filter(|o| *o != 1);
                if let Some(o) = o {
                    let tiff = orientation_tiff(o);
                    let mut crc = crc32fast::Hasher::new();
                    crc.update(b"eXIf");
                    crc.update(&tiff);
                    out.extend_from_slice(&(tiff.len() as u32).to_be_bytes());
                    out.extend_from_slice(b"eXIf");
                    out.extend_from_slice(&tiff);
                    out.extend_from_slice(&crc.finalize().to_be_bytes());
                }
            }
            _ => out.extend_from_slice(data.get(i..end)?),
        }
        if kind == b"IEND" {
            // The image ends here: what follows is not part of it.
            break;
        }
        i = end;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intake() -> RawIntake {
        RawIntake::default()
    }

    /// A phone-like APP1: little-endian Exif whose first IFD has Orientation 6, a Make (a
    /// device name) and a GPS IFD pointer, the GPS IFD holding a latitude reference.
    fn phone_exif() -> Vec<u8> {
        let mut t = b"II*\0\x08\0\0\0".to_vec();
        t.extend_from_slice(&3u16.to_le_bytes());
        let entry = |tag: u16, kind: u16, count: u32, value: u32| {
            let mut e = tag.to_le_bytes().to_vec();
            e.extend_from_slice(&kind.to_le_bytes());
            e.extend_from_slice(&count.to_le_bytes());
            e.extend_from_slice(&value.to_le_bytes());
            e
        };
        t.extend(entry(0x010F, 2, 4, u32::from_le_bytes(*b"Cam\0")));
        t.extend(entry(0x0112, 3, 1, 6));
        t.extend(entry(0x8825, 4, 1, 50));
        t.extend_from_slice(&0u32.to_le_bytes());
        t.resize(50, 0);
        t.extend_from_slice(&1u16.to_le_bytes());
        t.extend(entry(0x0001, 2, 2, u32::from_le_bytes(*b"N\0\0\0")));
        t.extend_from_slice(&0u32.to_le_bytes());
        let mut seg = vec![0xFF, 0xE1];
        seg.extend_from_slice(&u16::try_from(t.len() + 8).expect("len").to_be_bytes());
        seg.extend_from_slice(b"Exif\0\0");
        seg.extend(t);
        seg
    }

    fn segment(marker: u8, body: &[u8]) -> Vec<u8> {
        let mut s = vec![0xFF, marker];
        s.extend_from_slice(&u16::try_from(body.len() + 2).expect("len").to_be_bytes());
        s.extend_from_slice(body);
        s
    }

    /// Exif (GPS, device), XMP, IPTC and a comment go; JFIF, the colour profile, the tables,
    /// the frame and the scan stay byte for byte, and the orientation stays in an Exif of its
    /// own right after JFIF.
    #[test]
    fn a_phone_jpeg_loses_its_metadata_and_keeps_its_pixels_and_orientation() {
        let jfif = segment(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
        let icc = segment(0xE2, b"ICC_PROFILE\0\x01\x01profile");
        let rest = [
            segment(0xDB, &[0u8; 65]),
            segment(0xC0, &[8, 0, 16, 0, 16, 1, 1, 0x11, 0]),
            vec![0xFF, 0xDA, 0, 8, 1, 1, 0, 0, 63, 0, 0x12, 0xFF, 0x00, 0x34],
            vec![0xFF, 0xD0, 0x56, 0xFF, 0xD9],
        ]
        .concat();
        let phone = [
            vec![0xFF, 0xD8],
            jfif.clone(),
            phone_exif(),
            segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0<gps/>"),
            segment(0xED, b"Photoshop 3.0\0iptc"),
            icc.clone(),
            segment(0xFE, b"serial 12345"),
            rest.clone(),
            // Another image after the end (a depth map), with its own Exif.
            [vec![0xFF, 0xD8], phone_exif(), vec![0xFF, 0xD9]].concat(),
        ]
        .concat();
        let out = without_metadata(ImageKind::Jpeg, &phone).expect("changed");
        let expected = [vec![0xFF, 0xD8], jfif, orientation_app1(6), icc, rest].concat();
        assert_eq!(out, expected);
        assert_eq!(exif_orientation(&orientation_app1(6)[10..]), Some(6));
        assert_eq!(exif_orientation(&phone_exif()[10..]), Some(6));
        // Nothing to take out: left as it came.
        assert_eq!(without_metadata(ImageKind::Jpeg, &out), None);
        // Upright: no Exif at all.
        let upright = [vec![0xFF, 0xD8], segment(0xFE, b"c"), vec![0xFF, 0xD9]].concat();
        assert_eq!(
            without_metadata(ImageKind::Jpeg, &upright),
            Some(vec![0xFF, 0xD8, 0xFF, 0xD9])
        );
        // A segment that runs past the end: sent as it came.
        assert_eq!(without_metadata(ImageKind::Jpeg, &phone[..30]), None);
    }

    /// What the helper's round found: a restart marker before the scan (walked as if it had a
    /// length, an image was cut); the first Exif is the one decoders read; a LONG orientation;
    /// an APP0 that is not JFIF; metadata between the scans of a progressive JPEG.
    #[test]
    fn odd_jpegs_are_walked_as_decoders_read_them() {
        let jfif = segment(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
        let frame = [
            segment(0xDB, &[0u8; 65]),
            segment(0xC2, &[8, 0, 16, 0, 16, 1, 1, 0x11, 0]),
        ]
        .concat();
        let scan = |n: u8| vec![0xFF, 0xDA, 0, 8, 1, 1, 0, 0, 63, 0, n, n];
        let eoi = vec![0xFF, 0xD9];
        // A restart marker among the header's segments: sent as it came.
        let odd = [
            vec![0xFF, 0xD8],
            jfif.clone(),
            vec![0xFF, 0xD0],
            frame.clone(),
            scan(1),
            eoi.clone(),
        ]
        .concat();
        assert_eq!(without_metadata(ImageKind::Jpeg, &odd), None);
        // The first Exif has no orientation: none is written, whatever a later one says.
        let bare_gps = segment(
            0xE1,
            &[b"Exif\0\0".as_slice(), b"MM\0*\0\0\0\x08\0\0\0\0\0\0"].concat(),
        );
        let two = [
            vec![0xFF, 0xD8],
            jfif.clone(),
            bare_gps,
            phone_exif(),
            frame.clone(),
            scan(1),
            eoi.clone(),
        ]
        .concat();
        let expected = [
            vec![0xFF, 0xD8],
            jfif.clone(),
            frame.clone(),
            scan(1),
            eoi.clone(),
        ]
        .concat();
        assert_eq!(without_metadata(ImageKind::Jpeg, &two), Some(expected));
        // A big-endian LONG orientation is read.
        let long = segment(
            0xE1,
            &[
                b"Exif\0\0".as_slice(),
                b"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x04\0\0\0\x01\0\0\0\x06\0\0\0\0",
            ]
            .concat(),
        );
        let turned = [
            vec![0xFF, 0xD8],
            jfif.clone(),
            long,
            frame.clone(),
            scan(1),
            eoi.clone(),
        ]
        .concat();
        let expected = [
            vec![0xFF, 0xD8],
            jfif.clone(),
            orientation_app1(6),
            frame.clone(),
            scan(1),
            eoi.clone(),
        ]
        .concat();
        assert_eq!(without_metadata(ImageKind::Jpeg, &turned), Some(expected));
        // An APP0 that is not JFIF, and an Exif and a comment between two scans, go.
        let hidden = [
            vec![0xFF, 0xD8],
            jfif.clone(),
            segment(0xE0, b"GPS 43.2389"),
            frame.clone(),
            scan(1),
            segment(0xFE, b"owner"),
            phone_exif(),
            scan(2),
            eoi.clone(),
        ]
        .concat();
        let expected = [
            vec![0xFF, 0xD8],
            jfif,
            orientation_app1(6),
            frame,
            scan(1),
            scan(2),
            eoi,
        ]
        .concat();
        assert_eq!(without_metadata(ImageKind::Jpeg, &hidden), Some(expected));
    }

    #[test]
    fn a_png_loses_its_text_and_exif_chunks() {
        let chunk = |kind: &[u8; 4], data: &[u8]| {
            let mut c = u32::try_from(data.len())
                .expect("len")
                .to_be_bytes()
                .to_vec();
            c.extend_from_slice(kind);
            c.extend_from_slice(data);
            c.extend_from_slice(&[0, 0, 0, 0]);
            c
        };
        let sig = b"\x89PNG\r\n\x1a\n".to_vec();
        let ihdr = chunk(b"IHDR", &[0; 13]);
        let idat = chunk(b"IDAT", &[1, 2, 3]);
        let iend = chunk(b"IEND", &[]);
        let png = [
            sig.clone(),
            ihdr.clone(),
            chunk(b"tEXt", b"GPS\0here"),
            chunk(b"eXIf", b"MM\0*"),
            idat.clone(),
            iend.clone(),
            chunk(b"tEXt", b"after the end"),
        ]
        .concat();
        let out = without_metadata(ImageKind::Png, &png).expect("changed");
        assert_eq!(
            out,
            [sig.clone(), ihdr.clone(), idat.clone(), iend.clone()].concat()
        );
        assert_eq!(without_metadata(ImageKind::Png, &out), None);
        // A turned PNG keeps its orientation, in an Exif chunk of its own with a valid CRC.
        let turned = [
            sig.clone(),
            ihdr.clone(),
            chunk(b"eXIf", &phone_exif()[10..]),
            idat.clone(),
            iend.clone(),
        ]
        .concat();
        let out = without_metadata(ImageKind::Png, &turned).expect("changed");
        let tiff = orientation_tiff(6);
        let mut exif = (tiff.len() as u32).to_be_bytes().to_vec();
        exif.extend_from_slice(b"eXIf");
        exif.extend_from_slice(&tiff);
        exif.extend_from_slice(
            &crc32fast::hash(&[b"eXIf".as_slice(), &tiff].concat()).to_be_bytes(),
        );
        assert_eq!(out, [sig, ihdr, exif, idat, iend].concat());
    }

    #[test]
    fn extensions() {
        let i = intake();
        assert_eq!(check_extension("Face.JPG", &i).expect("ok"), ".jpg");
        assert_eq!(check_extension("a.b.jpeg", &i).expect("ok"), ".jpeg");
        assert_eq!(check_extension("C:\\x\\face.png", &i).expect("ok"), ".png");
        for bad in ["face", "face.gif", "face.jpg.exe", ".", "face."] {
            assert_eq!(
                check_extension(bad, &i),
                Err(GatewayError::ExtensionNotAllowed),
                "{bad}"
            );
        }
    }

    #[test]
    fn magic_must_agree_with_extension() {
        let i = intake();
        assert_eq!(
            check_magic(".jpg", &[0xFF, 0xD8, 0xFF, 0xE0], &i),
            Ok(ImageKind::Jpeg)
        );
        assert_eq!(
            check_magic(".png", &[0xFF, 0xD8, 0xFF, 0xE0], &i),
            Err(GatewayError::NotAnImage)
        );
        assert_eq!(
            check_magic(".jpg", b"GIF89a", &i),
            Err(GatewayError::NotAnImage)
        );
        assert_eq!(check_magic(".jpg", b"", &i), Err(GatewayError::NotAnImage));
    }

    /// An ISO-BMFF box.
    fn bmff(kind: &[u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut v = ((payload.len() + 8) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(kind);
        v.extend_from_slice(payload);
        v
    }

    /// A `meta` box whose primary item (id 1) has type `primary`, beside an item 2 of `other`.
    fn meta(primary: &[u8; 4], other: &[u8; 4]) -> Vec<u8> {
        let pitm = bmff(b"pitm", &[0, 0, 0, 0, 0, 1]);
        let infe =
            |id: u8, t: &[u8; 4]| bmff(b"infe", &[&[2, 0, 0, 0, 0, id, 0, 0][..], t].concat());
        let iinf = bmff(
            b"iinf",
            &[&[0, 0, 0, 0, 0, 2][..], &infe(1, primary), &infe(2, other)].concat(),
        );
        bmff(b"meta", &[&[0, 0, 0, 0][..], &pitm, &iinf].concat())
    }

    /// An `ftyp` box with a major brand and compatible brands, then an HEVC image's `meta`.
    fn ftyp(major: &[u8; 4], compatible: &[&[u8; 4]]) -> Vec<u8> {
        let mut body = [major.as_slice(), &[0, 0, 0, 0]].concat();
        for c in compatible {
            body.extend_from_slice(c.as_slice());
        }
        [bmff(b"ftyp", &body), meta(b"hvc1", b"Exif")].concat()
    }

    #[test]
    fn a_heif_is_hevc_by_its_items_not_its_brands() {
        let head = bmff(b"ftyp", b"heic\0\0\0\0mif1heic");
        for (primary, other, hevc) in [
            (b"hvc1", b"Exif", true),
            (b"grid", b"hvc1", true),
            (b"av01", b"Exif", false),
            (b"grid", b"av01", false),
            (b"jpeg", b"Exif", false),
        ] {
            let file = [head.clone(), meta(primary, other)].concat();
            assert_eq!(is_hevc_heif(&file), hevc, "{primary:?} {other:?}");
        }
        assert!(!is_hevc_heif(&head), "no meta");
        let cut = [head.clone(), meta(b"hvc1", b"Exif")].concat();
        assert!(!is_hevc_heif(&cut[..cut.len() - 3]), "cut inside its meta");
    }

    #[test]
    fn phone_formats_are_known_by_their_content_whatever_their_name() {
        let i = intake();
        let iphone = ftyp(b"heic", &[b"mif1", b"heic"]);
        let generic = ftyp(b"mif1", &[b"mif1", b"heix"]);
        let avif = ftyp(b"avif", &[b"avif", b"mif1", b"miaf"]);
        let avif_generic = ftyp(b"mif1", &[b"avif", b"mif1"]);
        let webp = b"RIFF\x10\0\0\0WEBPVP8 ".to_vec();
        for ext in [".heic", ".heif", ".jpg", ".png"] {
            assert_eq!(check_magic(ext, &iphone, &i), Ok(ImageKind::Heic), "{ext}");
            assert_eq!(check_magic(ext, &generic, &i), Ok(ImageKind::Heic), "{ext}");
            assert_eq!(check_magic(ext, &webp, &i), Ok(ImageKind::Webp), "{ext}");
            for not_heic in [&avif, &avif_generic] {
                assert_eq!(
                    check_magic(ext, not_heic, &i),
                    Err(GatewayError::NotAnImage)
                );
            }
        }
        for ext in [".heic", ".heif", ".webp", ".HEIC"] {
            assert!(check_extension(&format!("photo{ext}"), &i).is_ok(), "{ext}");
        }
        // Cut inside its box: not recognised.
        assert_eq!(ImageKind::sniff(&iphone[..12]), None);
        let mut off = i.clone();
        off.convert.formats.clear();
        assert_eq!(
            check_magic(".jpg", &iphone, &off),
            Err(GatewayError::NotAnImage)
        );
        assert_eq!(
            check_magic(".webp", &webp, &off),
            Err(GatewayError::NotAnImage)
        );
        assert_eq!(
            check_extension("photo.heic", &off),
            Err(GatewayError::ExtensionNotAllowed)
        );
        // A WebP is whole when its RIFF length is all there.
        assert_eq!(
            check_complete(ImageKind::Webp, &webp),
            Err(GatewayError::ImageTruncated)
        );
        let mut whole = webp.clone();
        whole.resize(24, 0);
        assert_eq!(check_complete(ImageKind::Webp, &whole), Ok(()));
    }

    /// A marker segment: `FF`, its code, its length, its payload.
    fn seg(code: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0xFF, code];
        v.extend(
            u16::try_from(payload.len() + 2)
                .expect("short")
                .to_be_bytes(),
        );
        v.extend_from_slice(payload);
        v
    }

    /// Entropy-coded bytes as an encoder writes them: `FF 00` stuffing, and a restart marker
    /// every 64 bytes when `restarts`.
    fn scan(seed: u8, restarts: bool) -> Vec<u8> {
        let mut v = Vec::new();
        for i in 0..600u32 {
            let b = (i as u8).wrapping_mul(37).wrapping_add(seed);
            v.push(b);
            if b == 0xFF {
                v.push(0x00);
            }
            if restarts && i % 64 == 63 {
                v.extend([0xFF, 0xD0 + ((i / 64) % 8) as u8]);
            }
        }
        v
    }

    const SOF: [u8; 15] = [8, 0, 16, 0, 16, 3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1];

    /// SOI, APP0, DQT, SOF, DHT, then each scan with its header (and new tables before every
    /// scan after the first, as progressive encoders write them), then EOI.
    fn jpeg(sof: u8, scans: &[Vec<u8>], app: &[u8]) -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8];
        v.extend(seg(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"));
        v.extend_from_slice(app);
        v.extend(seg(0xDB, &[0; 65]));
        v.extend(seg(sof, &SOF));
        for (n, s) in scans.iter().enumerate() {
            v.extend(seg(0xC4, &[0x10 | n as u8; 20]));
            v.extend(seg(0xDA, &[1, 1, 0, 0, 63, 0]));
            v.extend_from_slice(s);
        }
        v.extend([0xFF, 0xD9]);
        v
    }

    /// Whole: accepted, also with bytes after the end; cut anywhere before its end: refused.
    fn whole_and_every_cut(img: &[u8]) {
        assert_eq!(check_complete(ImageKind::Jpeg, img), Ok(()));
        let mut trailing = img.to_vec();
        trailing.extend(b"\xff\xd8\xff\xe1 an app's trailer \xff\xd9 and more");
        assert_eq!(check_complete(ImageKind::Jpeg, &trailing), Ok(()));
        for cut in 0..img.len() {
            assert!(
                check_complete(ImageKind::Jpeg, &img[..cut]).is_err(),
                "cut at {cut} of {} accepted",
                img.len()
            );
        }
    }

    #[test]
    fn a_baseline_jpeg_is_whole_only_with_its_end() {
        whole_and_every_cut(&jpeg(0xC0, &[scan(1, false)], &[]));
    }

    #[test]
    fn restart_markers_and_stuffing_stay_inside_the_scan() {
        let s = scan(7, true);
        assert!(s.windows(2).any(|w| w == [0xFF, 0x00]));
        assert!(s.windows(2).any(|w| w == [0xFF, 0xD3]));
        whole_and_every_cut(&jpeg(0xC0, &[s], &[]));
        // Fill bytes before a marker.
        let mut filled = jpeg(0xC0, &[scan(3, true)], &[]);
        let end = filled.len() - 2;
        filled.splice(end..end, [0xFF, 0xFF]);
        assert_eq!(check_complete(ImageKind::Jpeg, &filled), Ok(()));
    }

    #[test]
    fn a_progressive_jpeg_needs_all_its_scans() {
        let scans: Vec<Vec<u8>> = (0..5).map(|n| scan(n * 11, n % 2 == 0)).collect();
        let img = jpeg(0xC2, &scans, &[]);
        whole_and_every_cut(&img);
        // Cut between two scans, right after a table segment.
        let third = img
            .windows(2)
            .enumerate()
            .filter(|(_, w)| *w == [0xFF, 0xDA])
            .nth(2)
            .map(|(i, _)| i)
            .expect("a third scan");
        assert_eq!(
            check_complete(ImageKind::Jpeg, &img[..third]),
            Err(GatewayError::ImageTruncated)
        );
    }

    #[test]
    fn an_end_marker_inside_an_app_segment_is_not_the_end() {
        // An Exif thumbnail: a whole JPEG of its own inside APP1, and a comment saying FF D9.
        let thumbnail = jpeg(0xC0, &[scan(9, false)], &[]);
        let mut app = seg(0xE1, &[b"Exif\0\0".as_slice(), &thumbnail].concat());
        app.extend(seg(0xFE, b"\xff\xd9\xff\xd9"));
        let img = jpeg(0xC0, &[scan(1, true)], &app);
        whole_and_every_cut(&img);
        let scan_start = img.len() - 600;
        assert_eq!(
            check_complete(ImageKind::Jpeg, &img[..scan_start + 100]),
            Err(GatewayError::ImageTruncated)
        );
    }

    #[test]
    fn a_jpeg_without_a_scan_or_with_a_broken_length_is_unreadable() {
        let mut no_scan = vec![0xFF, 0xD8];
        no_scan.extend(seg(0xC0, &SOF));
        no_scan.extend([0xFF, 0xD9]);
        assert_eq!(
            check_complete(ImageKind::Jpeg, &no_scan),
            Err(GatewayError::ImageUnreadable)
        );
        let bad_length = [0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x01, 0xFF, 0xD9];
        assert_eq!(
            check_complete(ImageKind::Jpeg, &bad_length),
            Err(GatewayError::ImageUnreadable)
        );
    }

    #[test]
    fn a_png_is_walked_by_its_chunks() {
        fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
            let mut v = u32::try_from(data.len())
                .expect("short")
                .to_be_bytes()
                .to_vec();
            v.extend_from_slice(kind);
            v.extend_from_slice(data);
            v.extend([0; 4]);
            v
        }
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(chunk(b"IHDR", &[0, 0, 0, 16, 0, 0, 0, 16, 8, 2, 0, 0, 0]));
        // A text chunk that says IEND, before the image data.
        png.extend(chunk(b"tEXt", b"Comment\0IEND\xaeB`\x82"));
        png.extend(chunk(b"IDAT", &[0x55; 300]));
        png.extend(chunk(b"IEND", b""));
        assert_eq!(check_complete(ImageKind::Png, &png), Ok(()));
        for cut in 0..png.len() {
            assert!(
                check_complete(ImageKind::Png, &png[..cut]).is_err(),
                "{cut}"
            );
        }
    }

    #[test]
    fn dimension_bounds() {
        let i = intake();
        assert_eq!(check_dimensions(512, 400, &i), Ok(()));
        assert!(matches!(
            check_dimensions(10, 10, &i),
            Err(GatewayError::ImageDimensionsTooSmall { .. })
        ));
        assert!(matches!(
            check_dimensions(100_000, 100_000, &i),
            Err(GatewayError::ImageDimensionsTooLarge { .. })
        ));
        // Each side within bounds, but too many pixels in all.
        assert!(matches!(
            check_dimensions(8000, 8000, &i),
            Err(GatewayError::ImageDimensionsTooLarge { .. })
        ));
        assert_eq!(
            check_dimensions(0, 5, &i),
            Err(GatewayError::ImageUnreadable)
        );
    }
}
