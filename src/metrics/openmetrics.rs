//! The registry in the OpenMetrics text format, with exemplars on the latency histograms: the
//! trace of a recent request in each bucket, so that a dashboard leads from a slow bucket to a
//! trace of it. Written here because the `prometheus` crate encodes the Prometheus text format
//! only (no exemplars); Prometheus asks for OpenMetrics when it scrapes, and takes exemplars
//! only there.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::proto::{LabelPair, MetricFamily, MetricType};

/// The content type of this format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A recent traced observation of each bucket of the histograms that carry exemplars, by
/// metric, label value (their one label, or none) and bucket: bounded by their closed label
/// sets. Noted on every traced request, so without a hash or a shared lock: a bucket's slot is
/// found by a scan of a few series under a read lock, and refreshed at most every
/// `REFRESH_MS` (a scrape every few seconds shows one exemplar a bucket). A map under one
/// mutex, hashed with SipHash, cost a traced cache hit about 650 instructions and put its two
/// worker threads in each other's way (callgrind, benches/load/traces.sh).
#[derive(Default)]
pub struct Exemplars(RwLock<Vec<Series>>);

/// The buckets of one metric and label value.
struct Series {
    metric: &'static str,
    label: &'static str,
    buckets: Box<[Slot]>,
}

#[derive(Default)]
struct Slot {
    /// When it was last noted, in milliseconds since the epoch (0: never).
    noted_ms: AtomicU64,
    exemplar: Mutex<Option<Exemplar>>,
}

/// A bucket's exemplar is replaced at most this often.
const REFRESH_MS: u64 = 100;

#[derive(Clone, Copy, Debug)]
struct Exemplar {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    value: f64,
    at: SystemTime,
}

impl Exemplars {
    /// An observation of `value` in `metric` (its full name, the value of its one label, or "")
    /// that belongs to the trace `trace_id` and its span `span_id`.
    pub fn note(
        &self,
        metric: &'static str,
        label: &'static str,
        buckets: &[f64],
        value: f64,
        trace_id: [u8; 16],
        span_id: [u8; 8],
    ) {
        let bucket = buckets
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(buckets.len());
        let e = Exemplar {
            trace_id,
            span_id,
            value,
            at: SystemTime::now(),
        };
        self.put(metric, label, buckets.len() + 1, bucket, e);
    }

    /// `e` as the exemplar of bucket `bucket` (of `count`) of the series, unless the bucket's
    /// own is more recent than `REFRESH_MS` before it.
    fn put(
        &self,
        metric: &'static str,
        label: &'static str,
        count: usize,
        bucket: usize,
        e: Exemplar,
    ) {
        let ms =
            e.at.duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_millis().max(1) as u64);
        let set = |series: &[Series]| {
            let s = series.iter().find(|s| s.is(metric, label))?;
            let slot = s.buckets.get(bucket)?;
            let last = slot.noted_ms.load(Ordering::Relaxed);
            if last != 0 && ms.abs_diff(last) < REFRESH_MS {
                return Some(());
            }
            if slot.noted_ms.swap(ms, Ordering::Relaxed) == last {
                if let Ok(mut x) = slot.exemplar.lock() {
                    *x = Some(e);
                }
            }
            Some(())
        };
        if let Some(()) = self.0.read().ok().and_then(|s| set(&s)) {
            return;
        }
        // The first observation of this series: its buckets, once.
        if let Ok(mut series) = self.0.write() {
            if !series.iter().any(|s| s.is(metric, label)) {
                series.push(Series {
                    metric,
                    label,
                    buckets: (0..count).map(|_| Slot::default()).collect(),
                });
            }
            set(&series);
        }
    }

    fn get(&self, metric: &str, labels: &[String], bucket: usize) -> Option<Exemplar> {
        let label = match labels {
            [] => "",
            [one] => one.as_str(),
            _ => return None,
        };
        let series = self.0.read().ok()?;
        let s = series.iter().find(|s| s.is(metric, label))?;
        let e = *s.buckets.get(bucket)?.exemplar.lock().ok()?;
        e
    }
}

impl Series {
    fn is(&self, metric: &str, label: &str) -> bool {
        // The same static names at every call: their addresses settle it without a compare.
        let same = |a: &str, b: &str| std::ptr::eq(a, b) || a == b;
        same(self.metric, metric) && same(self.label, label)
    }
}

/// Whether an `Accept` header (its fields) prefers OpenMetrics: it is listed with a weight
/// above zero, and no other type weighs more (Prometheus lists it first).
pub fn wants_openmetrics<'a>(fields: impl Iterator<Item = &'a str>) -> bool {
    let (mut om, mut other) = (0.0f32, 0.0f32);
    for item in fields.flat_map(|f| f.split(',')) {
        let mut parts = item.split(';').map(str::trim);
        let kind = parts.next().unwrap_or_default().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        if kind == "application/openmetrics-text" {
            om = om.max(q);
        } else if !kind.is_empty() {
            other = other.max(q);
        }
    }
    om > 0.0 && om >= other
}

/// The families in OpenMetrics text, ending in `# EOF`.
pub fn encode(families: &[MetricFamily], exemplars: &Exemplars) -> Vec<u8> {
    let mut out = String::with_capacity(64 * 1024);
    for f in families {
        let name = f.name();
        let (kind, base) = match f.get_field_type() {
            MetricType::COUNTER => ("counter", name.strip_suffix("_total").unwrap_or(name)),
            MetricType::GAUGE => ("gauge", name),
            MetricType::HISTOGRAM => ("histogram", name),
            MetricType::SUMMARY => ("summary", name),
            MetricType::UNTYPED => ("unknown", name),
        };
        let _ = writeln!(out, "# TYPE {base} {kind}");
        let _ = writeln!(out, "# HELP {base} {}", escape(f.help(), false));
        for m in f.get_metric() {
            let labels = m.get_label();
            let values: Vec<String> = labels.iter().map(|l| l.value().to_string()).collect();
            match f.get_field_type() {
                MetricType::COUNTER => {
                    sample(
                        &mut out,
                        &format!("{base}_total"),
                        labels,
                        None,
                        m.get_counter().get_value(),
                    );
                }
                MetricType::GAUGE => {
                    sample(&mut out, base, labels, None, m.get_gauge().get_value())
                }
                // The gateway registers no untyped metric.
                MetricType::UNTYPED => {}
                MetricType::SUMMARY => {
                    let s = m.get_summary();
                    for q in s.get_quantile() {
                        let le = ("quantile", number(q.quantile()));
                        sample(&mut out, base, labels, Some(le), q.value());
                    }
                    sample(
                        &mut out,
                        &format!("{base}_sum"),
                        labels,
                        None,
                        s.sample_sum(),
                    );
                    let count = s.sample_count() as f64;
                    sample(&mut out, &format!("{base}_count"), labels, None, count);
                }
                MetricType::HISTOGRAM => {
                    let h = m.get_histogram();
                    let bucket_name = format!("{base}_bucket");
                    let buckets = h.get_bucket();
                    for (i, b) in buckets.iter().enumerate() {
                        if b.upper_bound().is_infinite() {
                            continue;
                        }
                        let le = ("le", number(b.upper_bound()));
                        let count = b.cumulative_count() as f64;
                        sample(&mut out, &bucket_name, labels, Some(le), count);
                        exemplar(&mut out, exemplars.get(name, &values, i));
                    }
                    let count = h.get_sample_count() as f64;
                    sample(
                        &mut out,
                        &bucket_name,
                        labels,
                        Some(("le", "+Inf".into())),
                        count,
                    );
                    exemplar(&mut out, exemplars.get(name, &values, buckets.len()));
                    sample(
                        &mut out,
                        &format!("{base}_sum"),
                        labels,
                        None,
                        h.get_sample_sum(),
                    );
                    sample(&mut out, &format!("{base}_count"), labels, None, count);
                }
            }
        }
    }
    out.push_str("# EOF\n");
    out.into_bytes()
}

/// One sample line, without its end when an exemplar may follow (`exemplar` ends it).
fn sample(
    out: &mut String,
    name: &str,
    labels: &[LabelPair],
    extra: Option<(&str, String)>,
    value: f64,
) {
    // A bucket's line is ended by `exemplar`.
    let open = extra.is_some() && name.ends_with("_bucket");
    out.push_str(name);
    let mut pairs: Vec<(&str, String)> = labels
        .iter()
        .map(|l| (l.name(), escape(l.value(), true)))
        .collect();
    if let Some((k, v)) = extra {
        pairs.push((k, v));
    }
    if !pairs.is_empty() {
        out.push('{');
        for (i, (k, v)) in pairs.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{v}\"");
        }
        out.push('}');
    }
    let _ = write!(out, " {}", number(value));
    if !open {
        out.push('\n');
    }
}

/// The end of a bucket's line: its exemplar, if it has one.
fn exemplar(out: &mut String, e: Option<Exemplar>) {
    if let Some(e) = e {
        let at =
            e.at.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
        let _ = write!(
            out,
            " # {{trace_id=\"{}\",span_id=\"{}\"}} {} {at:.3}",
            hex::encode(e.trace_id),
            hex::encode(e.span_id),
            number(e.value)
        );
    }
    out.push('\n');
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

/// A label value (`\`, `"` and newlines escaped) or a help text (`\` and newlines).
fn escape(s: &str, quote: bool) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '"' if quote => o.push_str("\\\""),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_weights_are_read() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics([prometheus].into_iter()));
        assert!(!wants_openmetrics(
            ["text/plain;q=1, application/openmetrics-text;q=0"].into_iter()
        ));
        assert!(!wants_openmetrics(["text/plain"].into_iter()));
        assert!(!wants_openmetrics(std::iter::empty()));
        assert!(wants_openmetrics(
            ["application/openmetrics-text; version=1.0.0"].into_iter()
        ));
    }

    #[test]
    fn each_bucket_keeps_a_recent_exemplar_of_its_own() {
        let e = Exemplars::default();
        let (m, buckets) = ("liveness_gateway_request_duration_seconds", &[0.1, 1.0][..]);
        let id = |i| {
            e.get(m, &["pass".into()], i)
                .map(|x| (x.trace_id[0], x.value))
        };
        assert_eq!(id(0), None);
        e.note(m, "pass", buckets, 0.05, [1; 16], [1; 8]);
        e.note(m, "pass", buckets, 0.5, [2; 16], [2; 8]);
        e.note(m, "pass", buckets, 5.0, [3; 16], [3; 8]);
        e.note(m, "fail", buckets, 0.05, [4; 16], [4; 8]);
        assert_eq!(
            (id(0), id(1), id(2)),
            (Some((1, 0.05)), Some((2, 0.5)), Some((3, 5.0)))
        );
        let fail = e.get(m, &["fail".into()], 0).map(|x| x.trace_id[0]);
        assert_eq!(fail, Some(4));
        // Within `REFRESH_MS` of its own, a bucket keeps its exemplar; after it, the next one
        // replaces it (times given: the test does not depend on how fast it runs).
        let at = |ms| UNIX_EPOCH + std::time::Duration::from_millis(ms);
        let noted = |trace: u8, value, ms| Exemplar {
            trace_id: [trace; 16],
            span_id: [trace; 8],
            value,
            at: at(ms),
        };
        e.put(m, "late", 3, 0, noted(7, 0.01, 1_000_000));
        e.put(m, "late", 3, 0, noted(8, 0.02, 1_000_000 + REFRESH_MS - 1));
        let late = |i| e.get(m, &["late".into()], i).map(|x| x.trace_id[0]);
        assert_eq!(late(0), Some(7));
        e.put(m, "late", 3, 0, noted(9, 0.03, 1_000_000 + REFRESH_MS));
        assert_eq!(late(0), Some(9));
        assert_eq!(e.get("other", &[], 0).map(|x| x.value), None);
    }
}
