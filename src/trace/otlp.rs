//! Spans written as OTLP protobuf (`opentelemetry/proto/trace/v1/trace.proto` and the collector's
//! `ExportTraceServiceRequest`), field by field with prost's wire-format helpers.
//!
//! Written by hand rather than through the SDK's `SpanData` and opentelemetry-otlp: that path
//! built every span twice (the SDK's value, then the generated protobuf type, each with its own
//! strings and vectors) and cost a cache hit 10% of its throughput with every trace kept; a
//! request's spans written once, straight into the bytes that are sent, cost it a few percent
//! (benches/load/traces.sh, side by side with tracing off).

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use prost::encoding::{encode_key, encode_varint, WireType};

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
        bytes(out, 1, &s.trace_id.to_bytes());
        bytes(out, 2, &s.span_id.to_bytes());
        if !s.trace_state.is_empty() {
            bytes(out, 3, s.trace_state.as_bytes());
        }
        if let Some((parent, _)) = s.parent {
            bytes(out, 4, &parent.to_bytes());
        }
        bytes(out, 5, s.name.as_bytes());
        varint(out, 6, kind(s.kind));
        fixed64(out, 7, unix_nanos(s.start));
        fixed64(out, 8, unix_nanos(s.end));
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

/// The body of one export: the resource (`service.name`), the instrumentation scope, and the
/// spans written by `span`.
pub(super) fn request(service_name: &str, scope_version: &str, spans: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(spans.len() + 128);
    // ExportTraceServiceRequest.resource_spans
    nested(&mut out, 1, |out| {
        // ResourceSpans.resource: Resource.attributes
        nested(out, 1, |out| {
            key_value(out, 1, "service.name", &Value::Str(service_name.into()));
        });
        // ResourceSpans.scope_spans
        nested(out, 2, |out| {
            nested(out, 1, |out| {
                bytes(out, 1, b"liveness-gateway");
                bytes(out, 2, scope_version.as_bytes());
            });
            out.extend_from_slice(spans);
        });
    });
    out
}

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

fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    encode_key(field, WireType::SixtyFourBit, out);
    out.extend_from_slice(&v.to_le_bytes());
}

/// A `KeyValue { key, value: AnyValue }` as field `field`.
fn key_value(out: &mut Vec<u8>, field: u32, key: &str, value: &Value<'_>) {
    nested(out, field, |out| {
        bytes(out, 1, key.as_bytes());
        nested(out, 2, |out| any_value(out, value));
    });
}

/// The body of an `AnyValue`.
fn any_value(out: &mut Vec<u8>, value: &Value<'_>) {
    match value {
        Value::Str(s) => bytes(out, 1, s.as_bytes()),
        Value::Int(i) => varint(out, 3, *i as u64),
    }
}

fn kind(kind: &SpanKind) -> u64 {
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
