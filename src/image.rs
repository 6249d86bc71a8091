//! Image checks, in the order clients are told about them: extension, magic bytes, size, then
//! pixel dimensions read from the header alone (nothing is decoded).

use crate::config::RawIntake;
use crate::error::GatewayError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Jpeg,
    Png,
}

impl ImageKind {
    pub fn mime(self) -> &'static str {
        match self {
            ImageKind::Jpeg => "image/jpeg",
            ImageKind::Png => "image/png",
        }
    }

    fn from_extension(ext: &str) -> Option<ImageKind> {
        match ext {
            ".jpg" | ".jpeg" => Some(ImageKind::Jpeg),
            ".png" => Some(ImageKind::Png),
            _ => None,
        }
    }

    /// The type the content really is, from its first bytes.
    pub fn sniff(head: &[u8]) -> Option<ImageKind> {
        if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageKind::Jpeg)
        } else if head.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(ImageKind::Png)
        } else {
            None
        }
    }
}

/// The lower-case extension of a file name (`.jpg`), if it is on the allow-list.
pub fn check_extension(filename: &str, intake: &RawIntake) -> Result<String, GatewayError> {
    let name = filename.rsplit(['/', '\\']).next().unwrap_or(filename);
    let ext = match name.rfind('.') {
        Some(dot) if dot > 0 || name.len() > 1 => name[dot..].to_ascii_lowercase(),
        _ => return Err(GatewayError::ExtensionNotAllowed),
    };
    if intake
        .allowed_extensions
        .iter()
        .any(|a| a.eq_ignore_ascii_case(&ext))
    {
        Ok(ext)
    } else {
        Err(GatewayError::ExtensionNotAllowed)
    }
}

/// Magic bytes must be JPEG or PNG and agree with the extension.
pub fn check_magic(extension: &str, head: &[u8]) -> Result<ImageKind, GatewayError> {
    match (ImageKind::sniff(head), ImageKind::from_extension(extension)) {
        (Some(real), Some(claimed)) if real == claimed => Ok(real),
        _ => Err(GatewayError::NotAnImage),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn intake() -> RawIntake {
        RawIntake::default()
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
        assert_eq!(
            check_magic(".jpg", &[0xFF, 0xD8, 0xFF, 0xE0]),
            Ok(ImageKind::Jpeg)
        );
        assert_eq!(
            check_magic(".png", &[0xFF, 0xD8, 0xFF, 0xE0]),
            Err(GatewayError::NotAnImage)
        );
        assert_eq!(
            check_magic(".jpg", b"GIF89a"),
            Err(GatewayError::NotAnImage)
        );
        assert_eq!(check_magic(".jpg", b""), Err(GatewayError::NotAnImage));
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
