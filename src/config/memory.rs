//! The most memory a process with a given config may hold, term by term: what `check-config
//! --memory-limit` compares with a container's limit, so that the process sheds load (`503
//! overloaded`, refused connections, cache eviction) before the kernel kills it.

use super::Config;

const MIB: u64 = 1024 * 1024;

/// The process itself and what its allocator keeps: 32 MiB for the idle process (31 MiB
/// measured idle, `make chaos`, tests/README.md) and 64 MiB for freed memory the allocator
/// keeps under load (the chaos run stays 70 to 85 MiB above idle once its load is over, 16 MiB
/// of it a full cache). It is the allowance the chaos test asserts its peak under, with every
/// fault of the provider and a hostile crowd at once.
pub const PROCESS_BYTES: u64 = 96 * MIB;

/// An open connection over HTTP/1: about 40 KiB measured (1,000 connections sending headers
/// slowly, `tests/hostile.rs`), 64 KiB allowed as in the chaos test; 32 KiB more under TLS
/// (its 16 KiB read buffer and rustls's record buffers, an estimate).
const CONNECTION_BYTES: u64 = 64 * 1024;
const TLS_CONNECTION_BYTES: u64 = 32 * 1024;

/// A conversion to JPEG while it runs, per pixel of the picture: its RGB pixels (3), libheif's
/// planes and the JPEG written (about 10 in all, measured: 50 concurrent 9-megapixel HEICs on
/// two workers took 258 MB over the idle process, 70 MB of it their bodies, in
/// `tests/convert.rs`).
const CONVERSION_BYTES_PER_PIXEL: u64 = 10;

/// A face check while it runs, at most: a progressive JPEG's buffered coefficients (up to
/// `face::BUFFERED_MAX_BYTES`, 96 MB), or an interlaced PNG decoded in full (up to
/// `face::PNG_MAX_PIXELS`, 4 megapixels: 16 MB), and the detector's buffers at 160 x 160 (a
/// few MB); a baseline JPEG decoded at 1/8 of its size and any other PNG, read row by row,
/// take far less. An estimate from those sizes, rounded up.
const FACE_CHECK_BYTES: u64 = 112 * MIB;

/// What bounds each part of the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBound {
    /// `intake.max_buffered_bytes`: every request body held at once.
    pub bodies: u64,
    /// `cache.max_bytes` (0 with the cache off).
    pub cache: u64,
    /// `server.max_connections` open connections, each with its buffers and, where HTTP/2 can
    /// be spoken (TLS, h2c), the connection's flow-control window of body bytes it may send
    /// before they are read.
    pub connections: u64,
    /// `intake.convert`: each worker converting a picture of `max_pixels` (0 with conversion
    /// off). With `workers = 0` the cores of the machine that checks are counted: set it where
    /// the gateway runs on another.
    pub conversions: u64,
    /// `intake.face`: each worker checking a picture (0 when no tenant's mode checks).
    pub face_checks: u64,
    pub process: u64,
}

impl MemoryBound {
    pub fn of(c: &Config) -> MemoryBound {
        let http2 = c.tls.is_some() || c.edge.h2c;
        let per_connection = CONNECTION_BYTES
            + if c.tls.is_some() {
                TLS_CONNECTION_BYTES
            } else {
                0
            }
            + if http2 {
                u64::from(super::H2_CONNECTION_WINDOW)
            } else {
                0
            };
        MemoryBound {
            bodies: c.intake.max_buffered_bytes,
            cache: if c.cache.enabled {
                c.cache.max_bytes
            } else {
                0
            },
            connections: c.edge.max_connections as u64 * per_connection,
            conversions: conversions(c),
            face_checks: face_checks(c),
            process: PROCESS_BYTES,
        }
    }

    pub fn total(&self) -> u64 {
        self.bodies
            + self.cache
            + self.connections
            + self.conversions
            + self.face_checks
            + self.process
    }

    /// `up to 604 MiB (bodies 128 + cache 64 + connections 192 + conversions 124 + process 96)`,
    /// with `+ face checks 64` when they run.
    pub fn describe(&self) -> String {
        let m = |b: u64| b.div_ceil(MIB);
        let faces = match self.face_checks {
            0 => String::new(),
            n => format!(" + face checks {}", m(n)),
        };
        format!(
            "up to {} MiB (bodies {} + cache {} + connections {} + conversions {}{faces} + process {})",
            m(self.total()),
            m(self.bodies),
            m(self.cache),
            m(self.connections),
            m(self.conversions),
            m(self.process)
        )
    }
}

fn conversions(c: &Config) -> u64 {
    let convert = &c.intake.convert;
    if convert.formats.is_empty() {
        return 0;
    }
    convert.workers() as u64 * convert.max_pixels * CONVERSION_BYTES_PER_PIXEL
}

fn face_checks(c: &Config) -> u64 {
    let off = super::FaceMode::Off;
    let checks = c.intake.face.mode != off
        || c.tenants
            .iter()
            .any(|t| t.face_mode.is_some_and(|m| m != off));
    match checks {
        true => c.intake.face.workers() as u64 * FACE_CHECK_BYTES,
        false => 0,
    }
}

/// A memory size: bytes, or a number with `Ki`, `Mi`, `Gi` (Kubernetes' binary units; `KiB`,
/// `MiB`, `GiB` too).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n.parse().map_err(|_| format!("{text:?} is not a size"))?;
    let scale = match unit.trim_end_matches('B') {
        "" if !unit.is_empty() => return Err(format!("{text:?} is not a size")),
        "" => 1,
        "Ki" => 1024,
        "Mi" => MIB,
        "Gi" => 1024 * MIB,
        _ => {
            return Err(format!(
                "{text:?}: give bytes or a binary unit (Ki, Mi, Gi)"
            ))
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_bytes_or_binary_units() {
        assert_eq!(parse_size("512Mi"), Ok(512 * MIB));
        assert_eq!(parse_size("1Gi"), Ok(1024 * MIB));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("1048576"), Ok(MIB));
        for bad in ["512M", "1g", "Mi", "", "12B", "-1Mi"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    /// The face checks' memory is counted when any mode checks, the global one or a tenant's.
    #[test]
    fn face_checks_count_when_any_mode_checks() {
        let base = r#"
[upstream]
url = "http://127.0.0.1:8081"
api_key_env = "ORG_KEY"
[intake.face]
workers = 2
mode = "MODE"
[[tenants]]
id = "a"
key_sha256 = ["0000000000000000000000000000000000000000000000000000000000000000"]
"#;
        let env = |_: &str| Some("k".to_string());
        let bound = |text: &str| MemoryBound::of(&Config::from_toml(text, &env).expect("valid"));
        let off = bound(&base.replace("MODE", "off"));
        assert_eq!(off.face_checks, 0);
        assert!(
            !off.describe().contains("face checks"),
            "{}",
            off.describe()
        );
        let observe = bound(&base.replace("MODE", "observe"));
        assert_eq!(observe.face_checks, 2 * FACE_CHECK_BYTES);
        assert!(
            observe.describe().contains(" + face checks 224 + process"),
            "{}",
            observe.describe()
        );
        assert_eq!(observe.total(), off.total() + 224 * MIB);
        let tenant = bound(&(base.replace("MODE", "off") + "face_mode = \"enforce\"\n"));
        assert_eq!(tenant.face_checks, 2 * FACE_CHECK_BYTES);
    }
}
