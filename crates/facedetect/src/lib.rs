//! Faces in a picture, found by libfacedetection's CNN (Shiqi Yu et al., BSD 3-Clause, vendored
//! in `libfacedetection/` with its weights), for the gateway's check before a paid call.
//!
//! The detector takes 8-bit BGR pixels and answers boxes with a confidence. It is written in
//! C++; this crate is its only door: one call, no exception across it, the model's one-time
//! set-up done before any two threads can race on it, and on x86-64 no call at all on a CPU
//! without the AVX2 and FMA it was built for.

use std::sync::Once;

/// A face: its box in the pixels given, and the detector's confidence (0 to 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Face {
    pub confidence: u8,
    pub x: i32,
    pub y: i32,
    pub width: u32,
    pub height: u32,
}

/// Why no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// This CPU lacks the instructions the detector was built for (AVX2 and FMA on x86-64).
    Unsupported,
    /// The pixels do not fill `width` x `height` x 3 bytes.
    BadPixels,
    /// The detector failed (out of memory).
    Failed,
}

/// Pictures smaller than this on a side hold no face the detector can find (its network
/// divides the picture by 32).
pub const MIN_SIDE: usize = 32;

/// Bytes of the detector's answer (`FACEDETECTION_RESULT_BUFFER_SIZE`).
const RESULT_BYTES: usize = 0x9000;
/// Shorts per face in the answer (`FACEDETECTION_RESULT_STRIDE_SHORTS`).
const STRIDE: usize = 16;
/// Faces the answer holds at most (`FACEDETECTION_RESULT_MAX_FACES`).
const MAX_FACES: usize = 1024;

extern "C" {
    fn liveness_facedetect(
        result: *mut u8,
        bgr: *mut u8,
        width: i32,
        height: i32,
        step: i32,
    ) -> i32;
}

/// Whether this CPU can run the detector.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

/// The faces in `bgr` (`width` x `height` pixels, 3 bytes each, blue first, rows one after the
/// other), most confident first. A picture under `MIN_SIDE` on a side has none.
pub fn detect(bgr: &mut [u8], width: usize, height: usize) -> Result<Vec<Face>, Error> {
    if !available() {
        return Err(Error::Unsupported);
    }
    let size = width
        .checked_mul(height)
        .and_then(|p| p.checked_mul(3))
        .ok_or(Error::BadPixels)?;
    if bgr.len() != size || i32::try_from(width * 3).is_err() || i32::try_from(height).is_err() {
        return Err(Error::BadPixels);
    }
    if width < MIN_SIDE || height < MIN_SIDE {
        return Ok(Vec::new());
    }
    // The model's weights are set up by its first call, unguarded: made here once, on a
    // picture of its own, before any other call can start.
    static SET_UP: Once = Once::new();
    SET_UP.call_once(|| {
        run(&mut vec![0u8; MIN_SIDE * MIN_SIDE * 3], MIN_SIDE, MIN_SIDE);
    });
    let (n, result) = run(bgr, width, height);
    let n = usize::try_from(n)
        .map_err(|_| Error::Failed)?
        .min(MAX_FACES);
    let shorts: Vec<i16> = result[1..]
        .iter()
        .flat_map(|w| {
            let b = w.to_ne_bytes();
            [
                i16::from_ne_bytes([b[0], b[1]]),
                i16::from_ne_bytes([b[2], b[3]]),
            ]
        })
        .take(n * STRIDE)
        .collect();
    let mut faces: Vec<Face> = shorts
        .chunks_exact(STRIDE)
        .map(|p| Face {
            confidence: p[0].clamp(0, 100) as u8,
            x: i32::from(p[1]),
            y: i32::from(p[2]),
            width: u32::try_from(p[3]).unwrap_or(0),
            height: u32::try_from(p[4]).unwrap_or(0),
        })
        .collect();
    faces.sort_by_key(|f| std::cmp::Reverse(f.confidence));
    Ok(faces)
}

/// One call of the detector on `bgr` (checked by the caller to hold `width` x `height` x 3
/// bytes, sides that fit an `i32`): the number of faces (-1: it failed) and its answer, in u32s
/// for the alignment of the count it writes first.
fn run(bgr: &mut [u8], width: usize, height: usize) -> (i32, Vec<u32>) {
    debug_assert_eq!(bgr.len(), width * height * 3);
    let mut result = vec![0u32; RESULT_BYTES / 4];
    // Safety: `result` is RESULT_BYTES long, `bgr` holds width x height x 3 bytes, and the
    // detector only reads it.
    let n = unsafe {
        liveness_facedetect(
            result.as_mut_ptr().cast(),
            bgr.as_mut_ptr(),
            width as i32,
            height as i32,
            (width * 3) as i32,
        )
    };
    (n, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blank_or_tiny_picture_has_no_face_and_bad_sizes_are_refused() {
        let mut blank = vec![0u8; 64 * 64 * 3];
        assert_eq!(detect(&mut blank, 64, 64), Ok(Vec::new()));
        let mut tiny = vec![0u8; 8 * 8 * 3];
        assert_eq!(detect(&mut tiny, 8, 8), Ok(Vec::new()));
        assert_eq!(detect(&mut blank, 65, 64), Err(Error::BadPixels));
        assert_eq!(detect(&mut blank, usize::MAX, 3), Err(Error::BadPixels));
    }
}
