//! Reading and checking the client's upload: a bounded body (size, per-read timeout, deadline)
//! read into one buffer, parsed strictly (`multipart`), then the image checks of `image`.
//!
//! The body is copied once, from Pingora's chunks into one buffer. The buffer grows with the bytes
//! that really arrive, not with what `Content-Length` declares: it starts at most at 256 KiB and
//! takes one step to the declared length once the client has sent that much (so a photo is
//! copied at most once more, its first 256 KiB). Every byte of buffer is charged to a global
//! budget (`intake.max_buffered_bytes`), and bodies read before their sender is authenticated
//! (the credential in the form field) also to a smaller one
//! (`intake.max_unauthenticated_buffered_bytes`): a crowd of strangers declaring large bodies
//! and trickling them cannot take the machine's memory.
//! The image is a slice of that buffer from then on: hashed, checked and written upstream in place.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{RawIntake, TenantKey};
use crate::error::GatewayError;
use crate::image::{self, ImageBytes, ImageKind};
use crate::multipart;

/// Longest drop-in `api_key` form value accepted.
const MAX_API_KEY_FIELD: usize = 1024;

/// Buffer to start with when the client sends no `Content-Length` (chunked).
const UNKNOWN_LENGTH_START: usize = 64 * 1024;

/// The most a buffer is given before its bytes have arrived.
const FIRST_STEP: usize = 256 * 1024;

/// How long a body waits for room in the byte budget before `503 overloaded`.
const BUDGET_WAIT: Duration = Duration::from_secs(1);

/// The bytes of request bodies held in memory at once, as permits of 1 KiB.
pub struct BodyBudget {
    all: Arc<Semaphore>,
    unauthenticated: Arc<Semaphore>,
}

/// Room taken in the budget by one body; given back when dropped.
#[derive(Default)]
pub struct BodyCharge {
    permits: Vec<OwnedSemaphorePermit>,
}

fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

impl BodyBudget {
    pub fn new(max_bytes: u64, max_unauthenticated_bytes: u64) -> BodyBudget {
        let permits = |b: u64| kib(usize::try_from(b).unwrap_or(usize::MAX)) as usize;
        BodyBudget {
            all: Arc::new(Semaphore::new(permits(max_bytes))),
            unauthenticated: Arc::new(Semaphore::new(permits(max_unauthenticated_bytes))),
        }
    }

    /// Bytes of budget free now (for the metrics).
    pub fn available(&self) -> (u64, u64) {
        (
            self.all.available_permits() as u64 * 1024,
            self.unauthenticated.available_permits() as u64 * 1024,
        )
    }

    /// Room for `bytes` now, or `None` when the budget has none (no waiting).
    pub fn try_charge(&self, bytes: usize, authenticated: bool) -> Option<BodyCharge> {
        let n = kib(bytes);
        let pools: &[&Arc<Semaphore>] = if authenticated {
            &[&self.all]
        } else {
            &[&self.unauthenticated, &self.all]
        };
        let mut charge = BodyCharge::default();
        for pool in pools {
            charge
                .permits
                .push((*pool).clone().try_acquire_many_owned(n).ok()?);
        }
        Some(charge)
    }

    /// Take room for `bytes` more, waiting briefly for it.
    async fn charge(
        &self,
        bytes: usize,
        authenticated: bool,
        charge: &mut BodyCharge,
    ) -> Result<(), GatewayError> {
        let n = kib(bytes);
        let pools: &[&Arc<Semaphore>] = if authenticated {
            &[&self.all]
        } else {
            &[&self.unauthenticated, &self.all]
        };
        for pool in pools {
            let permit = tokio::time::timeout(BUDGET_WAIT, (*pool).clone().acquire_many_owned(n))
                .await
                .map_err(|_| GatewayError::Overloaded(crate::error::Busy::Bodies))?
                .map_err(|_| GatewayError::Overloaded(crate::error::Busy::Bodies))?;
            charge.permits.push(permit);
        }
        Ok(())
    }
}

/// The image part of a parsed form.
#[derive(Debug, Clone)]
pub struct ImagePart {
    pub filename: String,
    /// Lower-case extension, already checked against the allow-list.
    pub extension: String,
    pub bytes: ImageBytes,
}

/// What the gateway keeps of a client's form.
#[derive(Debug, Clone)]
pub struct Form {
    pub image: ImagePart,
    /// The drop-in credential: the tenant key in the provider's `api_key` field.
    pub api_key: Option<TenantKey>,
    /// The attempt's nonce, for its receipt (the `nonce` field; checked by `receipt`).
    pub nonce: Option<String>,
}

/// The boundary of a `multipart/form-data` Content-Type, or the precise reason there is none.
pub fn boundary(content_type: Option<&str>) -> Result<String, GatewayError> {
    let ct = content_type.ok_or(GatewayError::NotMultipart)?;
    let essence = ct.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("multipart/form-data") {
        return Err(GatewayError::NotMultipart);
    }
    multer::parse_boundary(ct).map_err(|_| GatewayError::MissingBoundary)
}

/// The form in a whole body: exactly one `image` file part with an allowed extension, at most
/// one `api_key` field and at most one `nonce`; other fields are dropped (only the image is ever forwarded).
pub fn parse_body(body: &Bytes, boundary: &str, intake: &RawIntake) -> Result<Form, GatewayError> {
    let limits = multipart::Limits {
        max_parts: intake.max_parts,
        max_part_header_bytes: intake.max_part_header_bytes,
    };
    let mut image: Option<ImagePart> = None;
    let mut api_key: Option<TenantKey> = None;
    let mut nonce: Option<String> = None;
    for part in multipart::parse(body, boundary, limits)? {
        match part.name.as_str() {
            "image" => {
                if image.is_some() {
                    return Err(GatewayError::MultipleImages);
                }
                let filename = match part.filename {
                    Some(f) if !f.trim().is_empty() => f,
                    _ => return Err(GatewayError::MissingFilename),
                };
                let extension = image::check_extension(&filename, intake)?;
                if part.data.len() > intake.max_image_bytes {
                    return Err(GatewayError::ImageTooLarge {
                        max: intake.max_image_bytes,
                    });
                }
                image = Some(ImagePart {
                    filename,
                    extension,
                    bytes: ImageBytes::new(part.data),
                });
            }
            "api_key" => {
                if api_key.is_some() {
                    return Err(GatewayError::MalformedMultipart(
                        "more than one api_key field".into(),
                    ));
                }
                if part.data.len() > MAX_API_KEY_FIELD {
                    return Err(GatewayError::InvalidCredentials);
                }
                api_key = Some(TenantKey::new(String::from_utf8_lossy(&part.data).trim()));
            }
            "nonce" => {
                if nonce.is_some() {
                    return Err(GatewayError::NonceMismatch);
                }
                nonce = Some(
                    std::str::from_utf8(&part.data)
                        .map_err(|_| GatewayError::InvalidNonce)?
                        .to_string(),
                );
            }
            _ => {}
        }
    }
    let image = image.ok_or(GatewayError::MissingImage)?;
    Ok(Form {
        image,
        api_key,
        nonce,
    })
}

/// Parse a whole body held in memory (tests, benchmarks, fuzzing).
pub fn parse_bytes(
    body: Bytes,
    content_type: &str,
    intake: &RawIntake,
) -> Result<Form, GatewayError> {
    parse_body(&body, &boundary(Some(content_type))?, intake)
}

/// The checks after parsing (the extension and the maximum size were checked in parsing):
/// minimum size, magic bytes, dimensions from the header, completeness.
///
/// The minimum size comes before the magic bytes so that an empty or few-byte file is called
/// what it is (400 `image_too_small`) rather than "not an image".
pub fn validate_image(part: &ImagePart, intake: &RawIntake) -> Result<ImageKind, GatewayError> {
    let data = part.bytes.bytes();
    image::check_size(data.len(), intake)?;
    let kind = image::check_magic(&part.extension, data, intake)?;
    // imagesize reads a PNG's size at a fixed offset; make sure the IHDR chunk is really there.
    if kind == ImageKind::Png && data.get(12..16) != Some(b"IHDR".as_slice()) {
        return Err(GatewayError::ImageUnreadable);
    }
    match imagesize::blob_size(data) {
        Ok(size) if kind.converted_from().is_some() => {
            image::check_converted_dimensions(size.width, size.height, intake)?
        }
        Ok(size) => image::check_dimensions(size.width, size.height, intake)?,
        // A HEIC's boxes are read by its decoder, which checks the dimensions again before it
        // decodes (`crate::convert`): a property this header reader does not know (a rotation
        // written at another length) is not a reason to refuse a photo libheif reads.
        Err(_) if kind == ImageKind::Heic => {}
        Err(_) => return Err(GatewayError::ImageUnreadable),
    }
    // A cut-off upload (a weak mobile connection) has a readable header but no end.
    image::check_complete(kind, data)?;
    Ok(kind)
}

/// The length a `Content-Length` sent as a list of equal values means (`5, 5`, or the field
/// twice, as some intermediaries merge or repeat it): Pingora frames the body by that one
/// length, and so must every reader of the header here. `None` for a single value, or for
/// anything else (differing values never get here: Pingora and the `h2` crate refuse them).
pub fn listed_length(headers: &http::HeaderMap) -> Option<u64> {
    let mut n = None;
    let mut values = 0;
    for field in headers.get_all(http::header::CONTENT_LENGTH) {
        for v in field.to_str().ok()?.split(',') {
            let m = v.trim().parse::<u64>().ok()?;
            if n.is_some_and(|n| n != m) {
                return None;
            }
            n = Some(m);
            values += 1;
        }
    }
    n.filter(|_| values > 1)
}

fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// Refuse a declared body size over the limit before reading a byte of it.
pub fn check_content_length(
    headers: &http::HeaderMap,
    intake: &RawIntake,
) -> Result<(), GatewayError> {
    match declared_length(headers) {
        Some(n) if n > intake.max_body_bytes => Err(GatewayError::BodyTooLarge {
            limit: intake.max_body_bytes,
        }),
        _ => Ok(()),
    }
}

/// Read the whole body from the client's connection, bounded in size, per read and in total
/// time, into one buffer charged to the byte budget; then parse it. A body that never arrives
/// in full is refused, not billed. The charge is held by the caller for as long as the body is.
pub async fn read_form(
    session: &mut Session,
    boundary: String,
    intake: &RawIntake,
    budget: &BodyBudget,
    authenticated: bool,
) -> Result<(Form, BodyCharge), GatewayError> {
    session.set_read_timeout(Some(intake.body_read_timeout));
    let limit = intake.max_body_bytes as usize;
    let declared = declared_length(&session.req_header().headers)
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX).min(limit));
    let mut charge = BodyCharge::default();
    let read = async {
        let first = declared.unwrap_or(UNKNOWN_LENGTH_START).min(FIRST_STEP);
        budget.charge(first, authenticated, &mut charge).await?;
        let mut buf = BytesMut::with_capacity(first);
        while let Some(chunk) = next_chunk(session, limit as u64, intake.body_read_timeout).await? {
            let needed = buf.len() + chunk.len();
            if needed > buf.capacity() {
                // The client really sends: one step to the declared length, or doubling when
                // there is none. A new buffer of exactly that size, so the charge is exact.
                let target = match declared {
                    Some(n) => n.max(needed),
                    None => needed.max(buf.capacity() * 2).min(limit),
                };
                budget
                    .charge(target - buf.capacity(), authenticated, &mut charge)
                    .await?;
                let mut bigger = BytesMut::with_capacity(target);
                bigger.extend_from_slice(&buf);
                buf = bigger;
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    };
    let body = with_deadline(intake.body_deadline, read).await?;
    Ok((parse_body(&body, &boundary, intake)?, charge))
}

/// The next piece of the body, with the size limit and Pingora's errors mapped to ours.
/// Pingora applies the read timeout to HTTP/1 only (`set_read_timeout` does nothing on an
/// HTTP/2 stream), so an HTTP/2 read gets its own, the same.
async fn next_chunk(
    session: &mut Session,
    limit: u64,
    read_timeout: Duration,
) -> Result<Option<Bytes>, GatewayError> {
    let read = if session.is_http2() {
        match tokio::time::timeout(read_timeout, session.read_request_body()).await {
            Ok(r) => r,
            Err(_) => return Err(GatewayError::BodyTimeout),
        }
    } else {
        session.read_request_body().await
    };
    match read {
        Ok(Some(_)) if session.body_bytes_read() as u64 > limit => {
            Err(GatewayError::BodyTooLarge { limit })
        }
        Ok(chunk) => Ok(chunk),
        Err(e) => Err(match e.etype() {
            pingora::ErrorType::ReadTimedout => GatewayError::BodyTimeout,
            _ => {
                GatewayError::MalformedMultipart("the body ended before its declared length".into())
            }
        }),
    }
}

async fn with_deadline<T>(
    deadline: Duration,
    fut: impl std::future::Future<Output = Result<T, GatewayError>>,
) -> Result<T, GatewayError> {
    tokio::time::timeout(deadline, fut)
        .await
        .unwrap_or(Err(GatewayError::BodyTimeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut v = Vec::new();
        for (name, filename, data) in parts {
            v.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            match filename {
                Some(f) => v.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/jpeg\r\n\r\n").as_bytes(),
                ),
                None => v.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
            }
            v.extend_from_slice(data);
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        v
    }

    fn parse(body: Vec<u8>) -> Result<Form, GatewayError> {
        parse_bytes(
            Bytes::from(body),
            "multipart/form-data; boundary=XyZ",
            &RawIntake::default(),
        )
    }

    #[test]
    fn boundary_reasons() {
        assert_eq!(boundary(None), Err(GatewayError::NotMultipart));
        assert_eq!(
            boundary(Some("application/json")),
            Err(GatewayError::NotMultipart)
        );
        assert_eq!(
            boundary(Some("multipart/form-data")),
            Err(GatewayError::MissingBoundary)
        );
        assert_eq!(
            boundary(Some("Multipart/Form-Data; boundary=\"a b\"")).expect("ok"),
            "a b"
        );
    }

    #[test]
    fn parses_image_and_key() {
        let body = form(
            "XyZ",
            &[
                ("api_key", None, b"tenant-key"),
                ("image", Some("Face.JPG"), b"\xff\xd8\xffabc"),
            ],
        );
        let f = parse(body).expect("form");
        assert_eq!(f.api_key, Some(TenantKey::new("tenant-key")));
        assert_eq!(f.image.extension, ".jpg");
        assert_eq!(&f.image.bytes.bytes()[..], b"\xff\xd8\xffabc");
    }

    #[test]
    fn structural_errors() {
        assert_eq!(
            parse(form("XyZ", &[("api_key", None, b"k")])).expect_err("e"),
            GatewayError::MissingImage
        );
        assert_eq!(
            parse(form(
                "XyZ",
                &[
                    ("image", Some("a.jpg"), b"x"),
                    ("image", Some("b.jpg"), b"y")
                ]
            ))
            .expect_err("e"),
            GatewayError::MultipleImages
        );
        assert_eq!(
            parse(form("XyZ", &[("image", None, b"x")])).expect_err("e"),
            GatewayError::MissingFilename
        );
        assert_eq!(
            parse(form("XyZ", &[("image", Some("a.gif"), b"x")])).expect_err("e"),
            GatewayError::ExtensionNotAllowed
        );
        let mut truncated = form("XyZ", &[("image", Some("a.jpg"), b"xxxxxxxx")]);
        truncated.truncate(truncated.len() - 10);
        assert!(matches!(
            parse(truncated).expect_err("e"),
            GatewayError::MalformedMultipart(_)
        ));
    }

    #[test]
    fn the_digest_is_blake3_of_the_image() {
        let img = ImageBytes::new(Bytes::from_static(b"\xff\xd8\xff....\xff\xd9trailing"));
        assert_eq!(
            img.digest(),
            <[u8; 32]>::from(blake3::hash(b"\xff\xd8\xff....\xff\xd9trailing"))
        );
    }
}
