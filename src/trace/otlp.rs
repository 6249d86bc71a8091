//! Spans written as OTLP protobuf (`opentelemetry/proto/trace/v1/trace.proto` and the collector's
//! `ExportTraceServiceRequest`), field by field with prost's wire-format helpers.
//!
//! Written by hand rather than through the SDK's `SpanData` and opentelemetry-otlp: that path
//! built every span twice (the SDK's value, then the generated protobuf type, each with its own
//! strings and vectors) and cost a cache hit 10% of its throughput with every trace kept; a
//! request's spans written once, straight into the bytes that are sent, cost it a few percent
//! (benches/load/traces.sh, side by side with tracing off).

use std::io::Write;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};

use super::{Attribute, Value};

/// One span, as it is written.
pub(super) struct SpanRecord<'a> {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub trace_state: &'a str,
    /// The parent span, and whether it is the client's (remote).
    pub parent: Option<(SpanId, bool)>,
    pub name: &'a str,
    pub kind: &'a SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: &'a [Attribute<'a>],
    pub error: bool,
}

/// `span` as one entry of `ScopeSpans.spans`, appended to `out`.
pub(super) fn span(out: &mut Vec<u8>, s: &SpanRecord<'_>) {
    nested(out, 2, |out| {
        // The ids, the kind and the times have a size of their own: their fields are written
        // with literal tags, each group at once (through prost's helpers, a call for every tag
        // and length: see `key_value`). First trace_id (1) and span_id (2), 16 and 8 bytes.
        let mut ids = [0u8; 28];
        ids[..2].copy_from_slice(&[0x0A, 16]);
        ids[2..18].copy_from_slice(&s.trace_id.to_bytes());
        ids[18..20].copy_from_slice(&[0x12, 8]);
        ids[20..].copy_from_slice(&s.span_id.to_bytes());
        out.extend_from_slice(&ids);
        if !s.trace_state.is_empty() {
            bytes(out, 3, s.trace_state.as_bytes());
        }
        if let Some((parent, _)) = s.parent {
            // parent_span_id (4)
            let mut field = [0u8; 10];
            field[..2].copy_from_slice(&[0x22, 8]);
            field[2..].copy_from_slice(&parent.to_bytes());
            out.extend_from_slice(&field);
        }
        bytes(out, 5, s.name.as_bytes());
        // kind (6, a varint under 128), start_time_unix_nano (7) and end_time_unix_nano (8),
        // fixed64
        let mut times = [0u8; 20];
        times[..3].copy_from_slice(&[0x30, kind(s.kind), 0x39]);
        times[3..11].copy_from_slice(&unix_nanos(s.start).to_le_bytes());
        times[11] = 0x41;
        times[12..].copy_from_slice(&unix_nanos(s.end).to_le_bytes());
        out.extend_from_slice(&times);
        for a in s.attributes {
            key_value(out, 9, a.key, &a.value);
        }
        if s.error {
            // Status { code: STATUS_CODE_ERROR }
            nested(out, 15, |out| varint(out, 3, 2));
        }
        // Span flags: the trace is sampled (0x01), whether the parent is remote is known
        // (0x100), and it is (0x200).
        let remote = match s.parent {
            Some((_, true)) => 0x300,
            _ => 0x100,
        };
        encode_key(16, WireType::ThirtyTwoBit, out);
        out.extend_from_slice(&(0x01u32 | remote).to_le_bytes());
    });
}

/// What comes before the spans in every export of a process: the resource (`service.name`)
/// and the instrumentation scope, written once. A batch's spans are written after room left
/// for it (`room`), and the head goes into that room once the batch is complete (`write`):
/// the batch's buffer is the body sent, without a copy (which cost a traced request about 800
/// instructions and its spans' bytes passed through the cache once more: callgrind,
/// benches/load/traces.sh).
pub(super) struct Envelope {
    /// `ResourceSpans.resource`, as a field.
    resource: Vec<u8>,
    /// `ScopeSpans.scope`, as a field.
    scope: Vec<u8>,
}

impl Envelope {
    pub(super) fn new(service_name: &str, scope_version: &str) -> Envelope {
        let mut resource = Vec::new();
        nested(&mut resource, 1, |out| {
            key_value(out, 1, "service.name", &Value::Str(service_name.into()));
        });
        let mut scope = Vec::new();
        nested(&mut scope, 1, |out| {
            bytes(out, 1, b"liveness-gateway");
            bytes(out, 2, scope_version.as_bytes());
        });
        Envelope { resource, scope }
    }

    /// The room a batch leaves before its spans: the head with its two lengths at their
    /// longest.
    pub(super) fn room(&self) -> usize {
        2 * (1 + MAX_VARINT) + self.resource.len() + self.scope.len()
    }

    /// Write the head of the export of `batch` (`room` bytes, then the spans written by
    /// `span`) at the end of its room; the export is `batch[start..]`, `start` returned.
    pub(super) fn write(&self, batch: &mut [u8]) -> usize {
        let room = self.room();
        let spans = batch.len().saturating_sub(room);
        // ExportTraceServiceRequest.resource_spans { resource, scope_spans { scope, spans } }
        let scope_spans = self.scope.len() + spans;
        let resource_spans =
            self.resource.len() + 1 + encoded_len_varint(scope_spans as u64) + scope_spans;
        let mut head = Vec::with_capacity(room);
        encode_key(1, WireType::LengthDelimited, &mut head);
        encode_varint(resource_spans as u64, &mut head);
        head.extend_from_slice(&self.resource);
        encode_key(2, WireType::LengthDelimited, &mut head);
        encode_varint(scope_spans as u64, &mut head);
        head.extend_from_slice(&self.scope);
        let start = room - head.len();
        batch[start..room].copy_from_slice(&head);
        start
    }
}

/// The most bytes a length takes (a `u64`'s varint).
const MAX_VARINT: usize = 10;

/// A length-delimited field whose body `body` writes: the body is written in place after one
/// byte for its length, which is all a body under 128 bytes needs; a longer one's length takes
/// more, put in front of it (a span is a few hundred bytes: the move is cheap).
fn nested(out: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    encode_key(field, WireType::LengthDelimited, out);
    let at = out.len();
    out.push(0);
    body(out);
    let len = out.len() - at - 1;
    let mut head = [0u8; 10];
    let mut rest = &mut head[..];
    encode_varint(len as u64, &mut rest);
    let n = 10 - rest.len();
    out[at] = head[0];
    if n > 1 {
        // The body moves up by the length's further bytes (a copy within the buffer: a
        // `splice` went through an iterator byte by byte).
        let end = out.len();
        out.resize(end + n - 1, 0);
        out.copy_within(at + 1..end, at + n);
        out[at + 1..at + n].copy_from_slice(&head[1..n]);
    }
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

fn varint(out: &mut Vec<u8>, field: u32, v: u64) {
    encode_key(field, WireType::Varint, out);
    encode_varint(v, out);
}

/// A `KeyValue { key, value: AnyValue }` as field `field`.
fn key_value(out: &mut Vec<u8>, field: u32, key: &str, value: &Value<'_>) {
    // Nearly every attribute is a short text: all its lengths take a byte, and it is written
    // as literal tags and lengths around its two texts. Through prost's helpers (a call for
    // each tag and length) and `nested`, an attribute cost about 260 instructions, the server
    // span's attributes half of all its spans (callgrind, benches/load/traces.sh).
    let mut ip = [0u8; IP_TEXT];
    let text = match value {
        Value::Str(v) => Some(v.as_bytes()),
        Value::Ip(a) => Some(ip_text(*a, &mut ip)),
        Value::Int(_) => None,
    };
    if let Some(v) = text {
        let k = key.as_bytes();
        let any = 2 + v.len();
        let body = 2 + k.len() + 2 + any;
        if body < 128 && field < 16 {
            out.reserve(2 + body);
            out.extend_from_slice(&[short_tag(field), body as u8, 0x0A, k.len() as u8]);
            out.extend_from_slice(k);
            out.extend_from_slice(&[0x12, any as u8, 0x0A, v.len() as u8]);
            out.extend_from_slice(v);
            return;
        }
    }
    nested(out, field, |out| {
        bytes(out, 1, key.as_bytes());
        nested(out, 2, |out| any_value(out, value));
    });
}

/// Room for the longest text of an address: 39 characters (eight groups of four hex digits;
/// the longest with IPv4 digits, `::ffff:255.255.255.255`, is 22).
const IP_TEXT: usize = 48;

/// An address as its text, written in `buf`. An IPv4 one is written digit by digit: through
/// the formatter, and into a `String` of its own, it cost a traced request half as much as
/// writing all its span's attributes (callgrind, benches/load/traces.sh).
fn ip_text(ip: IpAddr, buf: &mut [u8; IP_TEXT]) -> &[u8] {
    let IpAddr::V4(v4) = ip else {
        let mut rest = &mut buf[..];
        let room = rest.len();
        let _ = write!(rest, "{ip}");
        let n = room - rest.len();
        return &buf[..n];
    };
    let mut n = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        for (at_least, digit) in [(100, octet / 100), (10, octet / 10 % 10), (0, octet % 10)] {
            if octet >= at_least {
                buf[n] = b'0' + digit;
                n += 1;
            }
        }
    }
    &buf[..n]
}

/// The tag of length-delimited field `field` (under 16: a byte).
fn short_tag(field: u32) -> u8 {
    ((field << 3) | WireType::LengthDelimited as u32) as u8
}

/// The body of an `AnyValue`.
fn any_value(out: &mut Vec<u8>, value: &Value<'_>) {
    match value {
        Value::Str(s) => bytes(out, 1, s.as_bytes()),
        Value::Int(i) => varint(out, 3, *i as u64),
        Value::Ip(a) => bytes(out, 1, ip_text(*a, &mut [0; IP_TEXT])),
    }
}

fn kind(kind: &SpanKind) -> u8 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const LONG_KEY: &str =
        "liveness.an.attribute.whose.key.is.long.enough.that.any.address.after.it.takes.the.general.path.of.nested.fields";

    #[test]
    fn an_address_reads_as_the_formatter_writes_it() {
        let mut buf = [0; IP_TEXT];
        for o in 0..=255u8 {
            for ip in [Ipv4Addr::new(o, 0, 10, 255), Ipv4Addr::new(127, o, 99, 100)] {
                assert_eq!(ip_text(IpAddr::V4(ip), &mut buf), ip.to_string().as_bytes());
            }
        }
        for v6 in [
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
            Ipv6Addr::new(
                0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff,
            ),
            Ipv4Addr::new(255, 255, 255, 255).to_ipv6_mapped(),
            Ipv6Addr::UNSPECIFIED,
        ] {
            let text = v6.to_string();
            assert_eq!(ip_text(IpAddr::V6(v6), &mut buf), text.as_bytes());
        }
    }

    #[test]
    fn the_head_written_in_a_batch_s_room_makes_the_export_as_nested_fields_would() {
        let envelope = Envelope::new("gateway-a", "1.2.3");
        for n in [0usize, 1, 100, 127, 128, 16_383, 16_384, 300_000] {
            let spans: Vec<u8> = (0..n).map(|i| (i % 253) as u8).collect();
            let mut batch = vec![0xEE; envelope.room()];
            batch.extend_from_slice(&spans);
            let start = envelope.write(&mut batch);
            // The same export, each field's body written before its length.
            let mut expected = Vec::new();
            nested(&mut expected, 1, |out| {
                nested(out, 1, |out| {
                    key_value(out, 1, "service.name", &Value::Str("gateway-a".into()));
                });
                nested(out, 2, |out| {
                    nested(out, 1, |out| {
                        bytes(out, 1, b"liveness-gateway");
                        bytes(out, 2, b"1.2.3");
                    });
                    out.extend_from_slice(&spans);
                });
            });
            assert!(batch[..start].iter().all(|b| *b == 0xEE), "{n}");
            assert_eq!(batch[start..], expected[..], "{n}");
        }
    }

    #[test]
    fn a_span_is_written_as_its_fields_one_by_one_would_be() {
        let t0 = UNIX_EPOCH + std::time::Duration::from_nanos(1_765_000_000_123_456_789);
        let attributes = [
            Attribute::str("url.path", "/api/v1/backend/liveness/short/"),
            Attribute::int("http.response.status_code", 200),
            Attribute::str("long", "x".repeat(300)),
            Attribute::ip("client.address", IpAddr::from([192, 168, 0, 7])),
            Attribute::ip("client.address", IpAddr::from([0xffff_u16; 8])),
            // A key long enough that its attribute takes the general path, an address too.
            Attribute::ip(
                LONG_KEY,
                IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0xffff, 0xc0a8, 1]),
            ),
        ];
        for (parent, state, kind, error) in [
            (None, "", SpanKind::Internal, false),
            (
                Some((SpanId::from_bytes([7; 8]), true)),
                "a=1,b=2",
                SpanKind::Server,
                true,
            ),
            (
                Some((SpanId::from_bytes([9; 8]), false)),
                "",
                SpanKind::Client,
                false,
            ),
        ] {
            let s = SpanRecord {
                trace_id: TraceId::from_bytes([0xAB; 16]),
                span_id: SpanId::from_bytes([0xCD; 8]),
                trace_state: state,
                parent,
                name: "POST /api/v1/backend/liveness/short/",
                kind: &kind,
                start: t0,
                end: t0 + std::time::Duration::from_micros(1500),
                attributes: &attributes,
                error,
            };
            let mut got = Vec::new();
            span(&mut got, &s);
            let mut expected = Vec::new();
            nested(&mut expected, 2, |out| {
                bytes(out, 1, &s.trace_id.to_bytes());
                bytes(out, 2, &s.span_id.to_bytes());
                if !state.is_empty() {
                    bytes(out, 3, state.as_bytes());
                }
                if let Some((p, _)) = parent {
                    bytes(out, 4, &p.to_bytes());
                }
                bytes(out, 5, s.name.as_bytes());
                varint(out, 6, u64::from(super::kind(&kind)));
                for (field, t) in [(7, s.start), (8, s.end)] {
                    encode_key(field, WireType::SixtyFourBit, out);
                    out.extend_from_slice(&unix_nanos(t).to_le_bytes());
                }
                for a in &attributes {
                    // An address is its text, as the formatter writes it.
                    let value = match &a.value {
                        Value::Ip(ip) => Value::Str(ip.to_string().into()),
                        v => v.clone(),
                    };
                    nested(out, 9, |out| {
                        bytes(out, 1, a.key.as_bytes());
                        nested(out, 2, |out| any_value(out, &value));
                    });
                }
                if error {
                    nested(out, 15, |out| varint(out, 3, 2));
                }
                let flags: u32 = if matches!(parent, Some((_, true))) {
                    0x301
                } else {
                    0x101
                };
                encode_key(16, WireType::ThirtyTwoBit, out);
                out.extend_from_slice(&flags.to_le_bytes());
            });
            assert_eq!(got, expected, "{kind:?}");
        }
    }

    #[test]
    fn a_short_attribute_is_written_as_nested_fields_would_write_it() {
        for (k, v) in [
            (0, 0),
            (1, 1),
            (19, 36),
            (60, 61),
            (60, 62),
            (61, 62),
            (3, 200),
            (130, 1),
        ] {
            let key = "k".repeat(k);
            let value = Value::Str("v".repeat(v).into());
            for field in [1, 9, 15, 16] {
                let mut got = vec![0xAA];
                key_value(&mut got, field, &key, &value);
                let mut expected = vec![0xAA];
                nested(&mut expected, field, |out| {
                    bytes(out, 1, key.as_bytes());
                    nested(out, 2, |out| any_value(out, &value));
                });
                assert_eq!(got, expected, "key {k}, value {v}, field {field}");
            }
        }
    }

    #[test]
    fn a_nested_field_s_length_takes_as_many_bytes_as_it_needs() {
        for len in [0usize, 1, 127, 128, 200, 16_383, 16_384, 70_000] {
            let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut out = vec![0xAA];
            nested(&mut out, 2, |out| out.extend_from_slice(&body));
            let mut rest = &out[1..];
            let key = prost::encoding::decode_varint(&mut rest).expect("key");
            assert_eq!(key, (2 << 3) | 2, "field 2, length-delimited");
            let got = prost::encoding::decode_varint(&mut rest).expect("length");
            assert_eq!(got as usize, len);
            assert_eq!(rest, &body[..], "{len}");
            assert_eq!(out[0], 0xAA, "what came before is untouched");
        }
    }
}
