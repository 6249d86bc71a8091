//! Photos in the formats phones and browsers make that the provider does not take (an iPhone's
//! HEIC, a browser's or an Android gallery's WebP), converted to JPEG before a call
//! (`[intake.convert]`).
//!
//! Only a call that goes out pays for a conversion: it runs after the cache lookup (a retry of
//! the same bytes is a hit), the breaker and the budget hold. Decoding a 12-megapixel HEIC
//! takes a core for a good part of a second, so conversions run in a pool of their own
//! (`crate::pool`: `workers`, one per core by default, `queue` and `timeout`), never on the
//! threads that serve requests.

use std::sync::{Arc, OnceLock};

use libheif_rs::{ColorSpace, HeifContext, LibHeif, RgbChroma};

use crate::config::{ConvertFrom, RawIntake};
use crate::error::{Busy, GatewayError};
use crate::image::{self, ImageBytes, ImageKind};
use crate::metrics::Metrics;
use crate::pool::{Pool, Refused};

/// The conversion pool of a process (`[intake]` is restart-only, and so is this).
pub struct Converter {
    pool: Pool,
    quality: u8,
    intake: Arc<RawIntake>,
}

/// Pixels as 8-bit RGB, row after row.
struct Rgb {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

/// Why a conversion gave no JPEG.
#[derive(Debug)]
enum Failed {
    /// Not a picture the decoder reads (`unreadable`).
    Unreadable,
    /// Decoded larger than `[intake]`'s bounds (`too_large`).
    TooLarge(GatewayError),
}

impl Converter {
    /// The pool for `intake.convert` on this machine.
    pub fn new(intake: &RawIntake) -> Converter {
        let c = &intake.convert;
        let workers = c.workers();
        Converter {
            pool: Pool::new(workers, c.queue, c.timeout),
            quality: c.quality,
            intake: Arc::new(intake.clone()),
        }
    }

    /// The image as a JPEG when it is of a kind the provider does not take, counted in
    /// `conversions_total`; `None` for a JPEG or a PNG, which go as they are.
    pub async fn to_jpeg(
        &self,
        kind: ImageKind,
        image: &ImageBytes,
        metrics: &Metrics,
    ) -> Result<Option<ImageBytes>, GatewayError> {
        let Some(from) = kind.converted_from() else {
            return Ok(None);
        };
        let count = |outcome: &str| {
            metrics
                .conversions
                .with_label_values(&[from.as_str(), outcome])
                .inc()
        };
        let overloaded = GatewayError::Overloaded(Busy::Conversions);
        let (bytes, intake, quality) = (image.bytes().clone(), self.intake.clone(), self.quality);
        match self
            .pool
            .run(move || convert(from, &bytes, &intake, quality))
            .await
        {
            Ok(Ok(jpeg)) => {
                count("converted");
                Ok(Some(ImageBytes::new(jpeg.into())))
            }
            Ok(Err(Failed::Unreadable)) => {
                count("unreadable");
                Err(GatewayError::ImageUnreadable)
            }
            Ok(Err(Failed::TooLarge(e))) => {
                count("too_large");
                Err(e)
            }
            Err(Refused::Full) => {
                count("overloaded");
                Err(overloaded)
            }
            Err(Refused::TimedOut) => {
                count("timeout");
                Err(overloaded)
            }
            // The conversion panicked: a gateway fault, not the client's.
            Err(Refused::Failed) => Err(GatewayError::Internal),
        }
    }
}

/// Decode `data` and write it as a JPEG of `quality`.
fn convert(
    from: ConvertFrom,
    data: &[u8],
    intake: &RawIntake,
    quality: u8,
) -> Result<Vec<u8>, Failed> {
    let rgb = match from {
        ConvertFrom::Heic => heic_pixels(data, intake)?,
        ConvertFrom::Webp => webp_pixels(data, intake)?,
    };
    let width = u16::try_from(rgb.width).map_err(|_| Failed::Unreadable)?;
    let height = u16::try_from(rgb.height).map_err(|_| Failed::Unreadable)?;
    let mut jpeg = Vec::with_capacity(rgb.data.len() / 8);
    jpeg_encoder::Encoder::new(&mut jpeg, quality)
        .encode(&rgb.data, width, height, jpeg_encoder::ColorType::Rgb)
        .map_err(|_| Failed::Unreadable)?;
    Ok(jpeg)
}

/// The bounds of `[intake]` on the picture as decoded (its header may say otherwise), and the
/// conversion's own (`intake.convert.max_pixels`).
fn within_bounds(width: usize, height: usize, intake: &RawIntake) -> Result<(), Failed> {
    image::check_converted_dimensions(width, height, intake).map_err(|e| match e {
        GatewayError::ImageUnreadable => Failed::Unreadable,
        e => Failed::TooLarge(e),
    })
}

/// libheif's library state, set up once for the process.
fn libheif() -> &'static LibHeif {
    static LIB: OnceLock<LibHeif> = OnceLock::new();
    LIB.get_or_init(LibHeif::new)
}

/// The primary image of a HEIC, upright (libheif applies its rotation, mirroring and crop),
/// its alpha dropped and a deeper colour depth brought to 8 bits. One decoding thread: the pool
/// bounds the CPU.
fn heic_pixels(data: &[u8], intake: &RawIntake) -> Result<Rgb, Failed> {
    // The context reads `data` in place; it is dropped at the end of this function, before
    // `data` can be.
    let mut context = HeifContext::read_from_bytes(data).map_err(|_| Failed::Unreadable)?;
    context.set_max_decoding_threads(1);
    let handle = context
        .primary_image_handle()
        .map_err(|_| Failed::Unreadable)?;
    within_bounds(handle.width() as usize, handle.height() as usize, intake)?;
    // libheif's default decoding options: its transformations applied, and 8-bit RGB asked
    // for, whatever the depth coded. (libheif-rs 0.19 frees the options it is given before
    // libheif reads them: none are given.)
    let decoded = libheif()
        .decode(&handle, ColorSpace::Rgb(RgbChroma::Rgb), None)
        .map_err(|_| Failed::Unreadable)?;
    let planes = decoded.planes();
    let plane = planes.interleaved.ok_or(Failed::Unreadable)?;
    let (width, height) = (plane.width as usize, plane.height as usize);
    within_bounds(width, height, intake)?;
    let row = width * 3;
    let mut rgb = Vec::with_capacity(row * height);
    for y in 0..height {
        let start = y * plane.stride;
        rgb.extend_from_slice(
            plane
                .data
                .get(start..start + row)
                .ok_or(Failed::Unreadable)?,
        );
    }
    Ok(Rgb {
        width,
        height,
        data: rgb,
    })
}

/// A WebP's picture (an animation's first frame), its alpha dropped.
fn webp_pixels(data: &[u8], intake: &RawIntake) -> Result<Rgb, Failed> {
    let mut decoder =
        image_webp::WebPDecoder::new(std::io::Cursor::new(data)).map_err(|_| Failed::Unreadable)?;
    let (width, height) = decoder.dimensions();
    let (width, height) = (width as usize, height as usize);
    within_bounds(width, height, intake)?;
    let mut pixels = vec![0; decoder.output_buffer_size().ok_or(Failed::Unreadable)?];
    decoder
        .read_image(&mut pixels)
        .map_err(|_| Failed::Unreadable)?;
    let data = if decoder.has_alpha() {
        pixels
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect()
    } else {
        pixels
    };
    Ok(Rgb {
        width,
        height,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_not_a_picture_is_unreadable() {
        let intake = RawIntake::default();
        for from in [ConvertFrom::Heic, ConvertFrom::Webp] {
            for junk in [
                &b""[..],
                b"RIFF\x10\0\0\0WEBPVP8 junkjunk",
                b"\0\0\0\x18ftypheic\0\0\0\0mif1heic",
            ] {
                assert!(matches!(
                    convert(from, junk, &intake, 90),
                    Err(Failed::Unreadable)
                ));
            }
        }
    }
}
