//! Reading and parsing the client's upload: a bounded body (size, per-read timeout, deadline)
//! streamed straight into `multer`, then the image checks of `image`.
//!
//! The body chunks go from the socket into multer's buffer and nowhere else: the image part
//! comes back as `Bytes` slices of that buffer, which are hashed, checked and written upstream
//! without another copy. (Collecting the body first and handing it to multer as one piece
//! would copy every image twice more: once into multer's buffer, once in `Field::bytes`.)

use std::io::{BufRead, Read, Seek, SeekFrom};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use pingora::proxy::Session;
use sha2::{Digest, Sha256};

use crate::config::RawIntake;
use crate::error::GatewayError;
use crate::image::{self, ImageFacts, ImageKind};

/// Longest drop-in `api_key` form value accepted.
const MAX_API_KEY_FIELD: usize = 1024;

/// The image as it arrived: slices of the receive buffer, in order.
#[derive(Debug, Clone, Default)]
pub struct ImageBytes {
    chunks: Vec<Bytes>,
    len: usize,
}

impl ImageBytes {
    pub fn from_chunks(chunks: Vec<Bytes>) -> Self {
        let len = chunks.iter().map(Bytes::len).sum();
        ImageBytes { chunks, len }
    }

    fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        if !chunk.is_empty() {
            self.chunks.push(chunk);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// The first bytes (up to 16), gathered across chunks.
    pub fn head(&self) -> Vec<u8> {
        let mut head = Vec::with_capacity(16);
        for c in &self.chunks {
            let take = (16 - head.len()).min(c.len());
            head.extend_from_slice(&c[..take]);
            if head.len() == 16 {
                break;
            }
        }
        head
    }

    pub fn sha256(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for c in &self.chunks {
            h.update(c);
        }
        h.finalize().into()
    }

    /// Whether `pattern` occurs anywhere, searching from the end (where end markers live).
    pub fn contains_from_end(&self, pattern: &[u8]) -> bool {
        let n = self.chunks.len();
        for i in (0..n).rev() {
            if memchr::memmem::rfind(&self.chunks[i], pattern).is_some() {
                return true;
            }
            // A match may straddle this chunk and the next one.
            if i + 1 < n && pattern.len() > 1 {
                let a = &self.chunks[i];
                let b = &self.chunks[i + 1];
                let mut seam = a[a.len().saturating_sub(pattern.len() - 1)..].to_vec();
                seam.extend_from_slice(&b[..b.len().min(pattern.len() - 1)]);
                if memchr::memmem::find(&seam, pattern).is_some() {
                    return true;
                }
            }
        }
        false
    }

    /// A reader over the chunks, for header parsers that need to seek.
    pub fn reader(&self) -> ChunkReader<'_> {
        ChunkReader {
            image: self,
            pos: 0,
        }
    }
}

/// `Read + BufRead + Seek` over `ImageBytes` without joining the chunks.
pub struct ChunkReader<'a> {
    image: &'a ImageBytes,
    pos: usize,
}

impl ChunkReader<'_> {
    fn current(&self) -> &[u8] {
        let mut start = 0;
        for c in &self.image.chunks {
            if self.pos < start + c.len() {
                return &c[self.pos - start..];
            }
            start += c.len();
        }
        &[]
    }
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let cur = self.current();
        let n = cur.len().min(buf.len());
        buf[..n].copy_from_slice(&cur[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl BufRead for ChunkReader<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        let pos = self.pos;
        let mut start = 0;
        for c in &self.image.chunks {
            if pos < start + c.len() {
                return Ok(&c[pos - start..]);
            }
            start += c.len();
        }
        Ok(&[])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.image.len);
    }
}

impl Seek for ChunkReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let len = self.image.len as i128;
        let target = match to {
            SeekFrom::Start(n) => n as i128,
            SeekFrom::End(d) => len + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if target < 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before start",
            ));
        }
        self.pos = target.min(len) as usize;
        Ok(self.pos as u64)
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
    pub api_key: Option<String>,
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

fn multipart_error(e: multer::Error) -> GatewayError {
    match e {
        multer::Error::StreamReadFailed(inner) => match inner.downcast::<GatewayError>() {
            Ok(g) => *g,
            Err(other) => GatewayError::MalformedMultipart(other.to_string()),
        },
        multer::Error::StreamSizeExceeded { limit } => GatewayError::BodyTooLarge { limit },
        multer::Error::IncompleteFieldData { .. } | multer::Error::IncompleteStream => {
            GatewayError::MalformedMultipart("the body ended before the closing boundary".into())
        }
        multer::Error::IncompleteHeaders => {
            GatewayError::MalformedMultipart("a part's headers are incomplete".into())
        }
        other => GatewayError::MalformedMultipart(other.to_string()),
    }
}

/// Parse a form from a stream of body chunks. Errors carried by the stream (size, timeouts)
/// come back as themselves.
pub async fn parse_form<S>(
    body: S,
    boundary: String,
    intake: &RawIntake,
) -> Result<Form, GatewayError>
where
    S: Stream<Item = Result<Bytes, GatewayError>> + Send,
{
    let constraints = multer::Constraints::new()
        .size_limit(multer::SizeLimit::new().whole_stream(intake.max_body_bytes));
    let mut multipart = multer::Multipart::with_constraints(body, boundary, constraints);
    let mut image: Option<ImagePart> = None;
    let mut api_key: Option<String> = None;
    let mut parts = 0usize;

    while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
        parts += 1;
        if parts > intake.max_parts {
            return Err(GatewayError::TooManyParts {
                limit: intake.max_parts,
            });
        }
        let header_bytes: usize = field
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        if header_bytes > intake.max_part_header_bytes {
            return Err(GatewayError::PartHeaderTooLarge {
                limit: intake.max_part_header_bytes,
            });
        }
        match field.name() {
            Some("image") => {
                if image.is_some() {
                    return Err(GatewayError::MultipleImages);
                }
                let filename = match field.file_name() {
                    Some(f) if !f.trim().is_empty() => f.to_string(),
                    _ => return Err(GatewayError::MissingFilename),
                };
                // The extension is known from the part header: refuse before reading the file.
                let extension = image::check_extension(&filename, intake)?;
                let mut bytes = ImageBytes::default();
                while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                    bytes.push(chunk);
                    if bytes.len() > intake.max_image_bytes {
                        return Err(GatewayError::ImageTooLarge {
                            max: intake.max_image_bytes,
                        });
                    }
                }
                image = Some(ImagePart {
                    filename,
                    extension,
                    bytes,
                });
            }
            Some("api_key") => {
                if api_key.is_some() {
                    return Err(GatewayError::MalformedMultipart(
                        "more than one api_key field".into(),
                    ));
                }
                let mut value = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                    value.extend_from_slice(&chunk);
                    if value.len() > MAX_API_KEY_FIELD {
                        return Err(GatewayError::InvalidCredentials);
                    }
                }
                api_key = Some(String::from_utf8_lossy(&value).trim().to_string());
            }
            // Other fields are read past and dropped: only the image is ever forwarded.
            _ => while field.chunk().await.map_err(multipart_error)?.is_some() {},
        }
    }
    let image = image.ok_or(GatewayError::MissingImage)?;
    Ok(Form { image, api_key })
}

/// Parse a whole body held in memory (tests, benchmarks, fuzzing).
pub async fn parse_bytes(
    body: Bytes,
    content_type: &str,
    intake: &RawIntake,
) -> Result<Form, GatewayError> {
    let boundary = boundary(Some(content_type))?;
    parse_form(
        futures_util::stream::iter([Ok::<_, GatewayError>(body)]),
        boundary,
        intake,
    )
    .await
}

/// The checks after parsing (the extension was checked when the part began, the maximum size
/// while it streamed in): minimum size, magic bytes, dimensions from the header, completeness.
///
/// The minimum size comes before the magic bytes so that an empty or few-byte file is called
/// what it is (400 `image_too_small`) rather than "not an image".
pub fn validate_image(part: &ImagePart, intake: &RawIntake) -> Result<ImageFacts, GatewayError> {
    image::check_size(part.bytes.len(), intake)?;
    let head = part.bytes.head();
    let kind = image::check_magic(&part.extension, &head)?;
    // imagesize reads a PNG's size at a fixed offset; make sure the IHDR chunk is really there.
    if kind == ImageKind::Png && head.get(12..16) != Some(b"IHDR".as_slice()) {
        return Err(GatewayError::ImageUnreadable);
    }
    let size =
        imagesize::reader_size(part.bytes.reader()).map_err(|_| GatewayError::ImageUnreadable)?;
    let (width, height) = image::check_dimension_values(size.width, size.height, intake)?;
    // A cut-off upload (a weak mobile connection) has a readable header but no end: the provider
    // would still be paid to reject it.
    let end_marker: &[u8] = match kind {
        ImageKind::Jpeg => &[0xFF, 0xD9],
        ImageKind::Png => b"IEND",
    };
    if !part.bytes.contains_from_end(end_marker) {
        return Err(GatewayError::ImageTruncated);
    }
    Ok(ImageFacts {
        kind,
        extension: part.extension.clone(),
        width,
        height,
    })
}

/// Refuse a declared body size over the limit before reading a byte of it.
pub fn check_content_length(
    headers: &http::HeaderMap,
    intake: &RawIntake,
) -> Result<(), GatewayError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > intake.max_body_bytes => Err(GatewayError::BodyTooLarge {
            limit: intake.max_body_bytes,
        }),
        _ => Ok(()),
    }
}

/// Read the form from the client's connection, bounded in size, per read and in total time.
/// The body is read to its declared end even after the closing boundary: a body that never
/// arrives in full is refused, not billed.
pub async fn read_form(
    session: &mut Session,
    boundary: String,
    intake: &RawIntake,
) -> Result<Form, GatewayError> {
    session.set_read_timeout(Some(intake.body_read_timeout));
    let limit = intake.max_body_bytes;
    let work = async move {
        let body = futures_util::stream::unfold(
            (&mut *session, false),
            move |(session, done)| async move {
                if done {
                    return None;
                }
                match next_chunk(session, limit).await {
                    Ok(Some(chunk)) => Some((Ok(chunk), (session, false))),
                    Ok(None) => None,
                    Err(e) => Some((Err(e), (session, true))),
                }
            },
        )
        .boxed();
        let form = parse_form(body, boundary, intake).await?;
        while next_chunk(session, limit).await?.is_some() {}
        Ok(form)
    };
    with_deadline(intake.body_deadline, work).await
}

/// The next piece of the body, with the size limit and Pingora's errors mapped to ours.
async fn next_chunk(session: &mut Session, limit: u64) -> Result<Option<Bytes>, GatewayError> {
    match session.read_request_body().await {
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

    pub fn form(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut v = Vec::new();
        for (name, filename, data) in parts {
            v.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            match filename {
                Some(f) => v.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/jpeg\r\n\r\n").as_bytes()),
                None => v.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
            }
            v.extend_from_slice(data);
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        v
    }

    fn parse(body: Vec<u8>) -> Result<Form, GatewayError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        rt.block_on(parse_bytes(
            Bytes::from(body),
            "multipart/form-data; boundary=XyZ",
            &RawIntake::default(),
        ))
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
        assert_eq!(f.api_key.as_deref(), Some("tenant-key"));
        assert_eq!(f.image.extension, ".jpg");
        assert_eq!(f.image.bytes.len(), 6);
        assert_eq!(f.image.bytes.head(), b"\xff\xd8\xffabc");
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
    fn chunk_reader_seeks_across_chunks() {
        let img = ImageBytes::from_chunks(vec![
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"defg"),
            Bytes::from_static(b"h"),
        ]);
        let mut r = img.reader();
        let mut s = String::new();
        r.read_to_string(&mut s).expect("read");
        assert_eq!(s, "abcdefgh");
        r.seek(SeekFrom::Start(2)).expect("seek");
        let mut two = [0u8; 2];
        r.read_exact(&mut two).expect("read");
        assert_eq!(&two, b"cd");
        r.seek(SeekFrom::End(-1)).expect("seek");
        assert_eq!(r.fill_buf().expect("fill"), b"h");
        assert_eq!(img.sha256(), <[u8; 32]>::from(Sha256::digest(b"abcdefgh")));
    }
}
