//! The face check before a paid call (`[intake.face]`): an upload that passed validation and
//! missed the cache is looked at for a face on the gateway's own CPU, before any budget is
//! held. `observe` counts what it finds (`face_checks_total`, the access line, the receipt) and
//! lets the call go; `enforce` refuses a photo without exactly one large enough face with
//! `422` (`no_face_detected`, `several_faces`, `face_too_small`): no call, no budget, nothing
//! cached.
//!
//! The check is cheap because it never decodes a photo in full: a JPEG is decoded at 1/2 to
//! 1/8 of its size by libjpeg's scaled DCT (mozjpeg), straight to the few thousand pixels the
//! detector needs (`max_pixels`, 160 x 160 by default), turned upright by its Exif orientation,
//! and handed to libfacedetection's CNN (`liveness-facedetect`). A PNG, which has no such
//! shortcut, is brought down block by block as its rows are read (an interlaced one is decoded
//! in full up to `PNG_MAX_PIXELS`, and skipped above it). A phone's HEIC or
//! WebP is checked once converted (`crate::convert`), before the call. Checks run in a pool of
//! their own (`crate::pool`), never on the threads that serve requests.

use std::sync::Arc;

use crate::config::{FaceMode, RawFace};
use crate::error::{Busy, GatewayError};
use crate::image::{ImageBytes, ImageKind};
use crate::metrics::Metrics;
use crate::pool::{Pool, Refused};

/// A JPEG whose DCT coefficients libjpeg must hold for the whole picture (a progressive one, or
/// one with its components in scans of their own) is checked when they take at most this: a
/// progressive photo of 16 megapixels in 4:4:4 (24 in 4:2:0). Past it, the check would need
/// hundreds of megabytes; the photo is not checked (`Unreadable`).
pub const BUFFERED_MAX_BYTES: u64 = 96 << 20;

/// Scans a JPEG may have to be checked: libjpeg's progressive scripts make about 10, encoders
/// that tune them some 20.
pub const MAX_SCANS: usize = 64;

/// What decoding a buffered JPEG may cost, counted as its scans times its buffered
/// coefficients' bytes: each scan is a pass over them (libjpeg decodes a repeated refinement
/// scan again, so a small file of many scans of a large picture would hold a worker for
/// seconds). About 0.4 s of a core per GB here: a check of at most 0.6 s, which a 12-megapixel
/// 4:4:4 progressive photo of 20 scans still passes.
pub const BUFFERED_MAX_WORK: u64 = 1536 << 20;

/// An interlaced PNG is decoded in full to be checked (up to 4 bytes a pixel while it runs);
/// above this it is skipped, so that a check never holds more than about 16 MB. Any other PNG
/// is read row by row, whatever its size.
pub const PNG_MAX_PIXELS: u64 = 4_000_000;

/// What a check found (`face_checks_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// One face, large enough.
    Face,
    NoFace,
    SeveralFaces {
        found: usize,
    },
    /// One face, its shorter side `px` pixels of the upload.
    FaceTooSmall {
        px: u32,
    },
    /// Not checked, and the call goes ahead: in `observe`, its queue was full or it ran past
    /// its timeout.
    Skipped,
    /// A picture the check does not read: a JPEG that is not 8-bit Huffman-coded (baseline,
    /// extended or progressive), of more than `MAX_SCANS` scans or `BUFFERED_MAX_BYTES` of
    /// buffered coefficients, one libjpeg fails on; an interlaced PNG above `PNG_MAX_PIXELS`.
    /// `observe` lets the call go; `enforce` refuses it (`photo_not_checkable`).
    Unreadable,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Face => "face",
            Outcome::NoFace => "no_face",
            Outcome::SeveralFaces { .. } => "several_faces",
            Outcome::FaceTooSmall { .. } => "face_too_small",
            Outcome::Skipped => "skipped",
            Outcome::Unreadable => "unreadable",
        }
    }

    /// The refusal `enforce` gives for it (none: the call goes ahead).
    pub fn refusal(self, cfg: &RawFace) -> Option<GatewayError> {
        match self {
            Outcome::Face | Outcome::Skipped => None,
            Outcome::NoFace => Some(GatewayError::NoFaceDetected),
            Outcome::Unreadable => Some(GatewayError::PhotoNotCheckable),
            Outcome::SeveralFaces { found } => Some(GatewayError::SeveralFaces {
                found,
                max: cfg.max_faces,
            }),
            Outcome::FaceTooSmall { px } => Some(GatewayError::FaceTooSmall {
                px,
                min: cfg.min_face_px,
            }),
        }
    }
}

/// The face check of a process (`[intake]` is restart-only; a tenant's mode is read per call).
pub struct FaceCheck {
    pool: Pool,
    cfg: Arc<RawFace>,
}

impl FaceCheck {
    pub fn new(cfg: &RawFace) -> FaceCheck {
        FaceCheck {
            pool: Pool::new(cfg.workers(), cfg.queue, cfg.timeout),
            cfg: Arc::new(cfg.clone()),
        }
    }

    /// Check `image` for `tenant` in `mode`, counted in `face_checks_total`: the outcome (none
    /// when the mode is `off`), and the refusal `enforce` gives, if any.
    pub async fn check(
        &self,
        mode: FaceMode,
        kind: ImageKind,
        image: &ImageBytes,
        tenant: &str,
        metrics: &Metrics,
    ) -> (Option<Outcome>, Result<(), GatewayError>) {
        if mode == FaceMode::Off {
            return (None, Ok(()));
        }
        let (bytes, cfg) = (image.bytes().clone(), self.cfg.clone());
        let ran = self.pool.run(move || examine(kind, &bytes, &cfg)).await;
        let outcome = ran.unwrap_or(Outcome::Skipped);
        metrics
            .face_checks
            .with_label_values(&[tenant, outcome.as_str()])
            .inc();
        let verdict = match (mode, ran) {
            (FaceMode::Enforce, Ok(outcome)) => outcome.refusal(&self.cfg).map_or(Ok(()), Err),
            // An enforced check that could not run now (its queue full, past its timeout) is
            // not waved through.
            (FaceMode::Enforce, Err(Refused::Full | Refused::TimedOut)) => {
                Err(GatewayError::Overloaded(Busy::FaceChecks))
            }
            (FaceMode::Enforce, Err(Refused::Failed)) => Err(GatewayError::Internal),
            _ => Ok(()),
        };
        (Some(outcome), verdict)
    }
}

/// Pixels as 8-bit RGB, row after row.
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// What the detector finds in the upload `data` of `kind`, judged by `cfg` (the check itself,
/// on the calling thread: the pool's worker, a benchmark, a test).
pub fn examine(kind: ImageKind, data: &[u8], cfg: &RawFace) -> Outcome {
    let Some((small, scale)) = small_picture(kind, data, cfg.max_pixels) else {
        return Outcome::Unreadable;
    };
    let Rgb {
        width,
        height,
        data: mut pixels,
    } = small;
    // The detector reads blue first.
    for p in pixels.chunks_exact_mut(3) {
        p.swap(0, 2);
    }
    let Ok(found) = liveness_facedetect::detect(&mut pixels, width, height) else {
        return Outcome::Unreadable;
    };
    let faces: Vec<_> = found
        .iter()
        .filter(|f| f.confidence >= cfg.min_confidence)
        .collect();
    match faces.as_slice() {
        [] => Outcome::NoFace,
        many if many.len() > cfg.max_faces => Outcome::SeveralFaces { found: many.len() },
        faces => {
            let side = faces
                .iter()
                .map(|f| f.width.min(f.height))
                .max()
                .unwrap_or(0);
            let px = (f64::from(side) * scale).round() as u32;
            match px < cfg.min_face_px {
                true => Outcome::FaceTooSmall { px },
                false => Outcome::Face,
            }
        }
    }
}

/// The upload brought down to at most `max_pixels`, upright, and the scale from its pixels to
/// the upload's; none for a picture not checked.
pub fn small_picture(kind: ImageKind, data: &[u8], max_pixels: u64) -> Option<(Rgb, f64)> {
    let (rgb, full_width, orientation) = match kind {
        ImageKind::Jpeg => {
            let (rgb, width) = jpeg_scaled(data, max_pixels)?;
            (rgb, width, crate::image::jpeg_orientation(data))
        }
        ImageKind::Png => {
            let (rgb, width) = png_scaled(data, max_pixels)?;
            (rgb, width, None)
        }
        _ => return None,
    };
    let small = fit(rgb, max_pixels)?;
    let scale = full_width as f64 / small.width as f64;
    let upright = upright(small, orientation)?;
    Some((upright, scale))
}

/// A JPEG decoded at the smallest of 1/1, 1/2, 1/4 and 1/8 of its size that still has
/// `max_pixels` (all of it when it is smaller), and its full width. libjpeg reports a broken
/// file by unwinding; that is caught here.
fn jpeg_scaled(data: &[u8], max_pixels: u64) -> Option<(Rgb, usize)> {
    if !decodes_in_bounds(data) {
        return None;
    }
    let decoded = std::panic::catch_unwind(|| {
        let mut d = mozjpeg::Decompress::new_mem(data).ok()?;
        let (w, h) = d.size();
        let mut denominator = 1;
        while denominator < 8
            && ((w / (denominator * 2)) as u64) * ((h / (denominator * 2)) as u64) >= max_pixels
        {
            denominator *= 2;
        }
        d.scale((8 / denominator) as u8);
        // libjpeg turns YCbCr and grey into RGB itself; CMYK (and YCCK) only into CMYK.
        let cmyk = matches!(
            d.color_space(),
            mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK
        );
        let (data, width, height) = if cmyk {
            let mut started = d.to_colorspace(mozjpeg::ColorSpace::JCS_CMYK).ok()?;
            let (width, height) = (started.width(), started.height());
            let pixels: Vec<[u8; 4]> = started.read_scanlines().ok()?;
            started.finish().ok()?;
            (cmyk_to_rgb(&pixels), width, height)
        } else {
            let mut started = d.rgb().ok()?;
            let (width, height) = (started.width(), started.height());
            let rows: Vec<[u8; 3]> = started.read_scanlines().ok()?;
            started.finish().ok()?;
            (rows.into_iter().flatten().collect(), width, height)
        };
        (data.len() == width * height * 3).then_some((
            Rgb {
                width,
                height,
                data,
            },
            w,
        ))
    });
    decoded.ok().flatten()
}

/// A PNG brought down, as it is read row by row, to a picture of at most about 4 x
/// `max_pixels` (each pixel the mean of a block of the PNG's), and the PNG's width: its memory
/// is the small picture's whatever the PNG's size (an interlaced PNG, whose rows come in seven
/// passes, is decoded in full up to `PNG_MAX_PIXELS`, and not checked above).
fn png_scaled(data: &[u8], max_pixels: u64) -> Option<(Rgb, usize)> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(data));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().ok()?;
    let (w, h) = (reader.info().width as usize, reader.info().height as usize);
    let channels = reader.output_color_type().0.samples();
    let mut blocks = Blocks::new(w, h, 4 * max_pixels);
    if reader.info().interlaced {
        if (w as u64).saturating_mul(h as u64) > PNG_MAX_PIXELS {
            return None;
        }
        let mut all = vec![0; reader.output_buffer_size()?];
        let frame = reader.next_frame(&mut all).ok()?;
        for row in all.chunks_exact(frame.line_size).take(h) {
            blocks.add(row, channels);
        }
    } else {
        while let Some(row) = reader.next_row().ok()? {
            blocks.add(row.data(), channels);
        }
    }
    Some((blocks.finish()?, w))
}

/// A picture made smaller by whole blocks of k x k pixels, each the mean of its block, fed one
/// row at a time.
struct Blocks {
    k: usize,
    width: usize,
    height: usize,
    /// The sums of the block row being read.
    sums: Vec<u32>,
    rows: usize,
    out: Vec<u8>,
}

impl Blocks {
    /// For a picture of `w` x `h`, made at most `most` pixels.
    fn new(w: usize, h: usize, most: u64) -> Blocks {
        let mut k = 1;
        while ((w / k) as u64) * ((h / k) as u64) > most {
            k += 1;
        }
        let (width, height) = ((w / k).max(1), (h / k).max(1));
        Blocks {
            k,
            width,
            height,
            sums: vec![0; width * 3],
            rows: 0,
            out: Vec::with_capacity(width * height * 3),
        }
    }

    /// A row of 8-bit pixels of `channels` samples (grey, grey and alpha, RGB, RGBA).
    fn add(&mut self, row: &[u8], channels: usize) {
        if self.rows / self.k >= self.height {
            return;
        }
        for (x, p) in row
            .chunks_exact(channels)
            .take(self.width * self.k)
            .enumerate()
        {
            let (r, g, b) = match channels {
                1 | 2 => (p[0], p[0], p[0]),
                _ => (p[0], p[1], p[2]),
            };
            let s = &mut self.sums[(x / self.k) * 3..][..3];
            s[0] += u32::from(r);
            s[1] += u32::from(g);
            s[2] += u32::from(b);
        }
        self.rows += 1;
        if self.rows.is_multiple_of(self.k) {
            let n = (self.k * self.k) as u32;
            self.out.extend(self.sums.iter().map(|s| (s / n) as u8));
            self.sums.fill(0);
        }
    }

    fn finish(self) -> Option<Rgb> {
        (self.out.len() == self.width * self.height * 3).then_some(Rgb {
            width: self.width,
            height: self.height,
            data: self.out,
        })
    }
}

/// CMYK pixels as RGB. A CMYK JPEG is almost always Adobe's, whose values are stored inverted
/// (255: no ink), as libjpeg hands them over.
fn cmyk_to_rgb(cmyk: &[[u8; 4]]) -> Vec<u8> {
    cmyk.iter()
        .flat_map(|&[c, m, y, k]| {
            let ink = |v: u8| (u16::from(v) * u16::from(k) / 255) as u8;
            [ink(c), ink(m), ink(y)]
        })
        .collect()
}

/// Whether libjpeg decodes `data` within the check's bounds of time and memory, read from its
/// layout before a byte is decoded: 8 bits a sample, Huffman-coded (baseline, extended or
/// progressive; libjpeg here has no arithmetic decoding), at most `MAX_SCANS` scans, and, when
/// its coefficients are buffered (a progressive frame, several scans, or a first scan that
/// codes fewer components than the frame has), at most `BUFFERED_MAX_BYTES` of them and
/// `BUFFERED_MAX_WORK` of passes over them.
fn decodes_in_bounds(data: &[u8]) -> bool {
    let Ok(layout) = crate::image::jpeg_layout(data) else {
        return false;
    };
    let Some(frame) = layout.frame else {
        return false;
    };
    let buffered = frame.marker == 0xC2
        || layout.scans > 1
        || layout.first_scan_components != Some(frame.sampling.len());
    let bytes = frame.coefficient_bytes();
    matches!(frame.marker, 0xC0..=0xC2)
        && frame.precision == 8
        && layout.scans <= MAX_SCANS
        && !(buffered
            && (bytes > BUFFERED_MAX_BYTES
                || bytes.saturating_mul(layout.scans as u64) > BUFFERED_MAX_WORK))
}

/// `rgb` brought to about `max_pixels`, its proportions kept: down from a larger picture, and
/// up from a smaller one, so that a small photo's face is as many pixels to the detector as a
/// large photo's (a 128-pixel photo's face of 20 pixels is near the least the detector finds).
fn fit(rgb: Rgb, max_pixels: u64) -> Option<Rgb> {
    let pixels = (rgb.width * rgb.height) as u64;
    let ratio = (max_pixels as f64 / pixels as f64).sqrt();
    let width = ((rgb.width as f64 * ratio) as u32).max(1);
    let height = ((rgb.height as f64 * ratio) as u32).max(1);
    if (width as usize, height as usize) == (rgb.width, rgb.height) {
        return Some(rgb);
    }
    let buffer = image::RgbImage::from_raw(rgb.width as u32, rgb.height as u32, rgb.data)?;
    let resized = match ratio < 1.0 {
        true => image::imageops::thumbnail(&buffer, width, height),
        false => image::imageops::resize(&buffer, width, height, image::imageops::Triangle),
    };
    Some(Rgb {
        width: resized.width() as usize,
        height: resized.height() as usize,
        data: resized.into_raw(),
    })
}

/// `rgb` turned as its Exif orientation says (2 to 8; 1 or none: as it is).
fn upright(rgb: Rgb, orientation: Option<u16>) -> Option<Rgb> {
    let Some(o @ 2..=8) = orientation else {
        return Some(rgb);
    };
    let img = image::RgbImage::from_raw(rgb.width as u32, rgb.height as u32, rgb.data)?;
    use image::imageops::{flip_horizontal, flip_vertical, rotate180, rotate270, rotate90};
    let turned = match o {
        2 => flip_horizontal(&img),
        3 => rotate180(&img),
        4 => flip_vertical(&img),
        5 => flip_horizontal(&rotate90(&img)),
        6 => rotate90(&img),
        7 => flip_horizontal(&rotate270(&img)),
        _ => rotate270(&img),
    };
    Some(Rgb {
        width: turned.width() as usize,
        height: turned.height() as usize,
        data: turned.into_raw(),
    })
}
