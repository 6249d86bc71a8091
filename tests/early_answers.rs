//! Answers given before the body was read (a 401, a 429 with `Retry-After`, a 413 from
//! `Content-Length`) reach real clients that are still uploading when the answer comes: curl
//! (Debian 12's libcurl, the one of PHP and many backends), OkHttp 3.x (Android's stack, Debian's
//! `libokhttp-java`; tests/clients/okhttp), Node's http2 client (tests/clients/node), over TLS
//! with HTTP/2 and HTTP/1.1 and over h2c. Every try must get its answer.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use liveness_gateway::server::RunningGateway;
use support::pki::*;
use support::*;

/// The refusals a client meets before its body is read: (key, status, code, has `Retry-After`).
/// The gateway of `start` takes bodies of 32 KiB at most, so the 68 KB photo with a good key is
/// refused by its `Content-Length`; beta's rate allows one request an hour, used up at start.
const REFUSALS: [(&str, u16, &str, bool); 3] = [
    ("wrong-key", 401, "invalid_credentials", false),
    ("beta-key", 429, "rate_limited", true),
    ("alpha-key", 413, "body_too_large", false),
];

struct Early {
    s: TlsSetup,
    gw: RunningGateway,
    ca: PathBuf,
    /// tests/fixtures/face.jpg (68 KB).
    photo: PathBuf,
}

async fn start(builder: impl FnOnce(TestGateway) -> TestGateway) -> Early {
    let s = setup();
    let gw = builder(
        s.builder
            .clone()
            .set("server.h2c", "true")
            .set("intake.max_body_bytes", "32768")
            .set("intake.max_image_bytes", "32768")
            .tenant_set("beta", "rate", "\"1/h\"")
            .tenant_set("beta", "burst", "1"),
    )
    .start();
    let ca = s.pki.ca_file(s.dir.path());
    let photo = s.dir.path().join("face.jpg");
    std::fs::write(&photo, fixture("face.jpg")).expect("photo");
    // beta's one request of the hour.
    let first = post_image(&gw.url(), "beta-key", "face.jpg", &fixture("face.jpg")).await;
    assert_eq!(first.status, 413, "{}", first.text());
    let e = Early { s, gw, ca, photo };
    // Its drain is counted once the client has sent the rest of its body, after the answer.
    assert_eq!(drains_reach(&e, "complete", 1.0).await, 1.0);
    e
}

impl Early {
    fn tls_url(&self) -> String {
        format!("https://localhost:{}{ROUTE}", self.s.tls.port())
    }

    fn plain_url(&self) -> String {
        format!("{}{ROUTE}", self.gw.url())
    }
}

/// What the tries of one kind came to: how many got the expected answer, and what the others
/// got instead.
#[derive(Default)]
struct Tally {
    good: usize,
    bad: Vec<String>,
}

/// Every kind of try of a test, checked together at the end so that a failure shows them all.
#[derive(Default)]
struct Report(Vec<(String, usize, Tally)>);

impl Report {
    fn add(&mut self, what: String, tries: usize, tally: Tally) {
        self.0.push((what, tries, tally));
    }

    /// The connections the edge's guard cut as a too-large request head: after an early answer
    /// over HTTP/1.1 the drained body must pass it as body (none cut).
    async fn edge_cuts(&mut self, e: &Early) {
        let cut = sample(
            &metrics_text(&e.gw.admin_url()).await,
            r#"liveness_gateway_connections_cut_total{reason="header_too_large"}"#,
        ) as usize;
        let tally = Tally {
            good: 0,
            bad: vec!["cut as a too-large request head".into(); cut],
        };
        self.add("connections the edge cut".into(), 0, tally);
    }

    fn check(self) {
        let summary: Vec<String> = self
            .0
            .iter()
            .map(|(what, tries, t)| format!("{what}: {} of {tries}", t.good))
            .collect();
        let failed: Vec<&(String, usize, Tally)> = self
            .0
            .iter()
            .filter(|(_, tries, t)| t.good != *tries || !t.bad.is_empty())
            .collect();
        assert!(
            failed.is_empty(),
            "{}\n\nwhat the others got:\n{}",
            summary.join("\n"),
            failed
                .iter()
                .map(|(what, _, t)| {
                    let mut seen: Vec<(&String, usize)> = Vec::new();
                    for b in &t.bad {
                        match seen.iter_mut().find(|(s, _)| *s == b) {
                            Some((_, n)) => *n += 1,
                            None => seen.push((b, 1)),
                        }
                    }
                    let kinds: Vec<String> =
                        seen.iter().map(|(b, n)| format!("{n} x {b}")).collect();
                    format!("{what}: {}", kinds.join("; "))
                })
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Whether one `ANSWER <protocol> <status> <Retry-After> <body>` line (the clients' format) is
/// the expected answer.
fn judge(line: &str, protocol: &str, status: u16, code: &str, retry_after: bool) -> bool {
    let mut f = line.splitn(5, ' ');
    let (Some("ANSWER"), Some(p), Some(s), Some(r), Some(body)) =
        (f.next(), f.next(), f.next(), f.next(), f.next())
    else {
        return false;
    };
    p.eq_ignore_ascii_case(protocol)
        && s == status.to_string()
        && json_code(body) == code
        && (r != "-") == retry_after
}

/// One curl upload of `photo`: its exit code and what it printed (`-D -`: head, then body).
fn curl(
    proto: &[&str],
    url: &str,
    resolve: Option<SocketAddr>,
    ca: &Path,
    key: &str,
    photo: &Path,
    extra: &[&str],
) -> (i32, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "30", "-D", "-"])
        .args(proto)
        .arg("--cacert")
        .arg(ca)
        .args(["-H", &format!("Authorization: Bearer {key}")])
        .args(extra)
        .arg("-F")
        .arg(format!(
            "image=@{};type=image/jpeg;filename=face.jpg",
            photo.display()
        ))
        .arg(url);
    if let Some(addr) = resolve {
        cmd.args([
            "--resolve",
            &format!("localhost:{}:{}", addr.port(), addr.ip()),
        ]);
    }
    let out = cmd.output().expect("curl (apt-get install curl)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// curl's output as an `ANSWER` line.
fn curl_answer(out: &str) -> String {
    let (head, body) = out.rsplit_once("\r\n\r\n").unwrap_or((out, ""));
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let mut sl = status_line.split_whitespace();
    let protocol = match sl.next() {
        Some("HTTP/2") => "h2".to_string(),
        Some(p) => p.to_ascii_lowercase(),
        None => "-".to_string(),
    };
    let status = sl.next().unwrap_or("0");
    let retry = lines
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or("-".into());
    format!(
        "ANSWER {protocol} {status} {retry} {}",
        body.replace('\n', " ")
    )
}

/// `tries` curl uploads of `photo` with each refusal's key: each must exit 0 with its answer.
async fn curl_tries(
    report: &mut Report,
    e: &Early,
    proto: &'static [&'static str],
    plain: bool,
    photo: &Path,
    extra: &'static [&'static str],
    tries: usize,
) {
    let protocol = match proto {
        ["--http1.1"] => "http/1.1",
        _ => "h2",
    };
    for (key, status, code, retry_after) in REFUSALS {
        let (url, resolve) = if plain {
            (e.plain_url(), None)
        } else {
            (e.tls_url(), Some(e.s.tls))
        };
        let (ca, photo) = (e.ca.clone(), photo.to_path_buf());
        let tally = tokio::task::spawn_blocking(move || {
            let mut tally = Tally::default();
            for _ in 0..tries {
                let (exit, out, err) = curl(proto, &url, resolve, &ca, key, &photo, extra);
                let line = curl_answer(&out);
                if exit == 0 && judge(&line, protocol, status, code, retry_after) {
                    tally.good += 1;
                } else {
                    tally.bad.push(format!("exit {exit} ({err}): {line}"));
                }
            }
            tally
        })
        .await
        .expect("curl");
        report.add(
            format!("curl {proto:?} {extra:?}, {status} {code}"),
            tries,
            tally,
        );
    }
}

/// Run an upload client that prints `ANSWER`/`FAILED` lines, `tries` times for each refusal.
async fn client_tries(
    report: &mut Report,
    what: &str,
    program: &str,
    args: impl Fn(&str) -> Vec<String>,
    protocol: &str,
    tries: usize,
) {
    for (key, status, code, retry_after) in REFUSALS {
        let out = tokio::process::Command::new(program)
            .args(args(key))
            .output()
            .await
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        let mut tally = Tally::default();
        for line in text.lines() {
            if judge(line, protocol, status, code, retry_after) {
                tally.good += 1;
            } else {
                tally.bad.push(line.to_string());
            }
        }
        if tally.good + tally.bad.len() != tries {
            tally.bad.push(format!(
                "{program} printed {} lines: {}",
                text.lines().count(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        report.add(format!("{what}, {status} {code}"), tries, tally);
    }
}

/// An early answer when the body budget has no room for its drain (here the budget of clients
/// not yet authenticated, 32 KiB, less than a drain's 64 KiB read buffer): nothing is read and
/// the connection closes, and the answer still reaches HTTP/1.1 clients that are still sending
/// the 68 KB photo: curl sending slowly (it reads only once it has sent everything) and reqwest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_with_no_room_to_drain_reaches_a_client_still_sending() {
    let e = start(|b| b.set("intake.max_unauthenticated_buffered_bytes", "32768")).await;
    let mut report = Report::default();
    let photo = e.photo.clone();
    // curl sending at 100 KB/s: the answer comes, and the connection ends, while it still sends.
    curl_tries(
        &mut report,
        &e,
        &["--http1.1"],
        true,
        &photo,
        &["-H", "Expect:", "--limit-rate", "100k"],
        5,
    )
    .await;
    let mut tally = Tally::default();
    let body = multipart(&[Part::image("face.jpg", &fixture("face.jpg"))]);
    for _ in 0..10 {
        let sent = reqwest::Client::builder()
            .http1_only()
            .build()
            .expect("client")
            .post(e.plain_url())
            .header("Content-Type", multipart_ct())
            .header("Authorization", "Bearer wrong-key")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 401 => tally.good += 1,
            Ok(r) => tally.bad.push(format!("status {}", r.status())),
            Err(err) => tally.bad.push(format!("{err:?}")),
        }
    }
    report.add(
        "reqwest over HTTP/1.1, 401 invalid_credentials".into(),
        10,
        tally,
    );
    report.check();
    assert_eq!(
        drains_reach(&e, "no_room", 15.0).await,
        15.0,
        "the drains found no room"
    );
}

/// Debian 12's curl over TLS with HTTP/2, 20 uploads of the 68 KB photo for each refusal: every
/// one exits 0 with the JSON answer (and `Retry-After` on the 429); and the same over h2c.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http2_gets_every_early_answer() {
    let e = start(|b| b).await;
    let mut report = Report::default();
    let photo = e.photo.clone();
    curl_tries(&mut report, &e, &["--http2"], false, &photo, &[], 20).await;
    curl_tries(
        &mut report,
        &e,
        &["--http2-prior-knowledge"],
        true,
        &photo,
        &[],
        20,
    )
    .await;
    report.check();
    assert_eq!(e.s.emu.stats().calls, 0);
}

/// A body of 3 MiB, larger than `intake.drain_max_bytes` (2 MiB here), in a file for curl.
fn large_photo(e: &Early) -> PathBuf {
    let large = e.s.dir.path().join("large.jpg");
    let mut bytes = fixture("face.jpg");
    bytes.resize(3 << 20, b'x');
    std::fs::write(&large, bytes).expect("large");
    large
}

/// The same over HTTP/1.1 with TLS, as curl sends by itself: the photo at once, and a body larger
/// than the drain's bound after `Expect: 100-continue` (curl asks it for bodies over 1 MiB), so
/// that the refusal comes before the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http1_gets_every_early_answer() {
    let e = start(|b| b.set("intake.drain_max_bytes", "2097152")).await;
    let mut report = Report::default();
    let photo = e.photo.clone();
    curl_tries(&mut report, &e, &["--http1.1"], false, &photo, &[], 20).await;
    let large = large_photo(&e);
    curl_tries(&mut report, &e, &["--http1.1"], false, &large, &[], 20).await;
    report.check();
    assert_eq!(e.s.emu.stats().calls, 0);
}

/// Over HTTP/1.1, clients that keep sending after the answer: OkHttp 3 (it reads the answer only
/// once the whole body is out), and curl with `Expect` turned off, its 3 MiB body beyond the
/// drain's bound (2 MiB here; curl stops sending once it has read the answer). The drained
/// body passes the edge's connection guard as body, not as the head of a next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_clients_that_keep_sending_get_every_early_answer() {
    let e = start(|b| b.set("intake.drain_max_bytes", "2097152")).await;
    let mut report = Report::default();
    let large = large_photo(&e);
    curl_tries(
        &mut report,
        &e,
        &["--http1.1"],
        false,
        &large,
        &["-H", "Expect:"],
        20,
    )
    .await;
    let cp = okhttp_classpath();
    okhttp_tries(
        &mut report,
        &e,
        &cp,
        "http1",
        "serial",
        &e.tls_url(),
        "http/1.1",
    )
    .await;
    report.edge_cuts(&e).await;
    report.check();
    assert_eq!(e.s.emu.stats().calls, 0);
}

/// Run the OkHttp 3 client for each refusal, 10 uploads of the photo.
async fn okhttp_tries(
    report: &mut Report,
    e: &Early,
    cp: &str,
    protocol: &str,
    mode: &str,
    url: &str,
    wire: &str,
) {
    let args = |key: &str| {
        vec![
            "-cp".to_string(),
            cp.to_string(),
            "EarlyAnswer".into(),
            url.to_string(),
            e.ca.display().to_string(),
            e.photo.display().to_string(),
            key.into(),
            "10".into(),
            protocol.into(),
            mode.into(),
        ]
    };
    client_tries(
        report,
        &format!("OkHttp 3 {protocol} {mode}"),
        "java",
        args,
        wire,
        10,
    )
    .await;
}

/// OkHttp 3.13 (Android's stack) over TLS with HTTP/2, 10 uploads of the photo for each refusal,
/// one after another and then all at once on one connection, and over h2c: every call reads the
/// status, the JSON `code` and `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn okhttp3_over_http2_gets_every_early_answer() {
    let e = start(|b| b).await;
    let mut report = Report::default();
    let cp = okhttp_classpath();
    let (tls, plain) = (e.tls_url(), e.plain_url());
    okhttp_tries(&mut report, &e, &cp, "http2", "serial", &tls, "h2").await;
    okhttp_tries(&mut report, &e, &cp, "http2", "parallel", &tls, "h2").await;
    okhttp_tries(
        &mut report,
        &e,
        &cp,
        "h2c",
        "serial",
        &plain,
        "h2_prior_knowledge",
    )
    .await;
    report.check();
    assert_eq!(e.s.emu.stats().calls, 0);
}

/// Node's http2 client, 10 uploads for each refusal on one connection, one after another and
/// all at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_http2_gets_every_early_answer() {
    let e = start(|b| b).await;
    let mut report = Report::default();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/node/early-h2.js"
    );
    for mode in ["serial", "parallel"] {
        let args = |key: &str| {
            vec![
                script.to_string(),
                e.s.tls.port().to_string(),
                e.ca.display().to_string(),
                e.photo.display().to_string(),
                key.into(),
                "10".into(),
                mode.into(),
            ]
        };
        client_tries(
            &mut report,
            &format!("Node http2 {mode}"),
            "node",
            args,
            "h2",
            10,
        )
        .await;
    }
    report.check();
    assert_eq!(e.s.emu.stats().calls, 0);
}

/// `liveness_gateway_early_answer_drains_total{outcome}`.
async fn drains(e: &Early, outcome: &str) -> f64 {
    sample(
        &metrics_text(&e.gw.admin_url()).await,
        &format!("liveness_gateway_early_answer_drains_total{{outcome=\"{outcome}\"}}"),
    )
}

/// The drains counted with `outcome`, once they are `want` or 5 s have passed: a drain is
/// counted when it ends, which its client may learn before the count is made (and a bounded
/// one lingers a moment after its end, see `proxy::linger_close`).
async fn drains_reach(e: &Early, outcome: &str, want: f64) -> f64 {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let n = drains(e, outcome).await;
        if n >= want || Instant::now() > until {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw HTTP/2 connection to the TLS listener (the `h2` crate's client, driven in the
/// background), to watch each stream for resets.
async fn h2_connect(e: &Early) -> h2::client::SendRequest<Bytes> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(e.s.pki.ca.der().clone()).expect("root");
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(e.s.tls)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("handshake");
    let (client, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Start an upload with `key` (its body declared as `length` bytes, or undeclared) and read the
/// whole answer before sending a byte of the body: its status and JSON code, and the stream to
/// send the body on.
async fn h2_refused(
    client: &h2::client::SendRequest<Bytes>,
    e: &Early,
    key: &str,
    length: Option<usize>,
) -> (u16, String, h2::SendStream<Bytes>) {
    let mut req = http::Request::post(e.tls_url())
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", multipart_ct());
    if let Some(n) = length {
        req = req.header("content-length", n);
    }
    let mut client = client.clone().ready().await.expect("ready");
    let (answer, stream) = client
        .send_request(req.body(()).expect("request"), false)
        .expect("send");
    let answer = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .expect("answered before the body")
        .expect("answer");
    let status = answer.status().as_u16();
    let mut body = answer.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("the whole answer");
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    (status, json_code(&String::from_utf8_lossy(&text)), stream)
}

/// What became of a body sent on a stream already answered.
#[derive(Debug, PartialEq)]
enum Sent {
    /// All of it, END_STREAM included, and no reset.
    All(usize),
    /// The gateway reset the stream: with this reason, after this many bytes, at this time.
    Reset(h2::Reason, usize, Instant),
}

/// Send `total` bytes of body in pieces of `piece`, `pause` apart, as flow control allows,
/// watching for a reset all along.
async fn h2_send(
    stream: &mut h2::SendStream<Bytes>,
    total: usize,
    piece: usize,
    pause: Duration,
) -> Sent {
    use std::task::Poll;
    let mut sent = 0;
    while sent < total {
        let want = piece.min(total - sent);
        stream.reserve_capacity(want);
        let granted = loop {
            let step = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = stream.poll_reset(cx) {
                    return Poll::Ready(Err(r));
                }
                stream.poll_capacity(cx).map(Ok)
            });
            match tokio::time::timeout(Duration::from_secs(15), step)
                .await
                .expect("capacity or a reset")
            {
                Err(Ok(reason)) => return Sent::Reset(reason, sent, Instant::now()),
                Err(Err(e)) => panic!("the stream failed after {sent} bytes: {e}"),
                Ok(Some(Ok(n))) if n > 0 => break n.min(want),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => match e.reason() {
                    Some(reason) => return Sent::Reset(reason, sent, Instant::now()),
                    None => panic!("the stream failed after {sent} bytes: {e}"),
                },
                Ok(None) => panic!("the stream closed after {sent} bytes"),
            }
        };
        let last = sent + granted == total;
        if let Err(e) = stream.send_data(Bytes::from(vec![b'x'; granted]), last) {
            if let Some(reason) = e.reason() {
                return Sent::Reset(reason, sent, Instant::now());
            }
            // Reset between the grant and the send: `h2` then says "inactive stream", and the
            // reset's reason is the stream's.
            let reset = std::future::poll_fn(|cx| stream.poll_reset(cx));
            match tokio::time::timeout(Duration::from_secs(5), reset).await {
                Ok(Ok(reason)) => return Sent::Reset(reason, sent, Instant::now()),
                _ => panic!("sending failed after {sent} bytes: {e}"),
            }
        }
        sent += granted;
        if !last && !pause.is_zero() {
            let reset = std::future::poll_fn(|cx| stream.poll_reset(cx));
            if let Ok(r) = tokio::time::timeout(pause, reset).await {
                let reason = r.expect("a reset");
                return Sent::Reset(reason, sent, Instant::now());
            }
        }
    }
    Sent::All(sent)
}

/// Over HTTP/2, refused streams whose bodies keep coming are read to their end and end normally
/// (no RST_STREAM), several on one connection at once, while another stream on the same
/// connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_drains_end_streams_normally_and_block_nothing() {
    let e = start(|b| b).await;
    let before = drains(&e, "complete").await;
    let client = h2_connect(&e).await;
    let length = fixture("face.jpg").len();
    let mut streams = Vec::new();
    for _ in 0..5 {
        let (status, code, stream) = h2_refused(&client, &e, "wrong-key", Some(length)).await;
        assert_eq!((status, code.as_str()), (401, "invalid_credentials"));
        streams.push(stream);
    }
    // Each body in 4 KiB pieces, 50 ms apart: about a second of draining, all at once.
    let started = Instant::now();
    let sending: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::spawn(
                async move { h2_send(&mut s, length, 4096, Duration::from_millis(50)).await },
            )
        })
        .collect();
    // Meanwhile a good upload on the same connection.
    let body = multipart(&[Part::image("face.jpg", &fixture("face-small.jpg"))]);
    let mut c = client.clone().ready().await.expect("ready");
    let req = http::Request::post(e.tls_url())
        .header("authorization", "Bearer alpha-key")
        .header("content-type", multipart_ct())
        .header("content-length", body.len())
        .body(())
        .expect("request");
    let (answer, mut stream) = c.send_request(req, false).expect("send");
    stream.send_data(Bytes::from(body), true).expect("body");
    let answer = answer.await.expect("answer");
    assert_eq!(answer.status().as_u16(), 200);
    let served = started.elapsed();
    for d in sending {
        assert_eq!(d.await.expect("drain"), Sent::All(length));
    }
    let drained = started.elapsed();
    assert!(
        served < drained,
        "the good upload waited for the drains: served after {served:?}, drained after {drained:?}"
    );
    assert_eq!(
        drains_reach(&e, "complete", before + 5.0).await,
        before + 5.0
    );
    assert_eq!(e.s.emu.stats().calls, 1);
}

/// Over HTTP/2 the drain is bounded: past `intake.drain_max_bytes` (sent, or declared) or
/// `intake.drain_timeout` the stream is reset with NO_ERROR, after the whole answer; each end is
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_drains_are_bounded_in_bytes_and_time() {
    let e = start(|b| {
        b.set("intake.drain_max_bytes", "131072")
            .set("intake.drain_timeout", "\"1s\"")
    })
    .await;
    let client = h2_connect(&e).await;

    // An undeclared body of 4 MiB: read up to the bound, then reset.
    let (status, _, mut stream) = h2_refused(&client, &e, "wrong-key", None).await;
    assert_eq!(status, 401);
    match h2_send(&mut stream, 4 << 20, 16384, Duration::ZERO).await {
        Sent::Reset(reason, sent, _) => {
            assert_eq!(reason, h2::Reason::NO_ERROR);
            // Read up to the bound; what the client could send beyond it is what the stream's
            // window (256 KiB) let it.
            assert!(
                (128 << 10..(128 + 256 + 64) << 10).contains(&sent),
                "reset after {sent} bytes"
            );
        }
        other => panic!("not reset: {other:?}"),
    }

    // A body declared larger than the bound: not read at all, reset at once.
    let (status, _, mut stream) = h2_refused(&client, &e, "wrong-key", Some(1 << 20)).await;
    assert_eq!(status, 401);
    let reset = tokio::time::timeout(
        Duration::from_secs(1),
        std::future::poll_fn(|cx| stream.poll_reset(cx)),
    )
    .await
    .expect("reset at once")
    .expect("a reset");
    assert_eq!(reset, h2::Reason::NO_ERROR);

    // A slow sender: reset when the time is up.
    let (status, _, mut stream) = h2_refused(&client, &e, "wrong-key", None).await;
    assert_eq!(status, 401);
    let answered = Instant::now();
    match h2_send(&mut stream, 1 << 20, 1024, Duration::from_millis(100)).await {
        Sent::Reset(reason, _, at) => {
            assert_eq!(reason, h2::Reason::NO_ERROR);
            let after = at - answered;
            assert!(
                after >= Duration::from_millis(900) && after < Duration::from_secs(3),
                "reset after {after:?}"
            );
        }
        other => panic!("not reset: {other:?}"),
    }
    assert_eq!(drains_reach(&e, "byte_limit", 2.0).await, 2.0);
    assert_eq!(drains_reach(&e, "time_limit", 1.0).await, 1.0);

    // The connection goes on.
    let (status, code, mut stream) = h2_refused(&client, &e, "wrong-key", Some(1000)).await;
    assert_eq!((status, code.as_str()), (401, "invalid_credentials"));
    assert_eq!(
        h2_send(&mut stream, 1000, 1000, Duration::ZERO).await,
        Sent::All(1000)
    );
    assert_eq!(e.s.emu.stats().calls, 0);
}

/// A raw HTTP/1.1 request head to the plain listener, with `key` and these extra header lines:
/// the connection, once its whole answer has been read.
fn http1_refused(e: &Early, key: &str, extra: &str) -> (TcpStream, u16, String) {
    let mut s = TcpStream::connect(e.gw.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "POST {ROUTE} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nContent-Type: {}\r\n{extra}\r\n",
        multipart_ct()
    )
    .expect("head");
    let (status, body) = read_response(&mut s);
    (s, status, json_code(&body))
}

/// When the gateway closes the connection (nothing more may come after the answer).
fn closed_at(s: &mut TcpStream) -> Instant {
    let mut buf = [0u8; 1024];
    match s.read(&mut buf) {
        Ok(0) | Err(_) => Instant::now(),
        Ok(n) => panic!(
            "more after the answer: {}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

/// Over HTTP/1.1 (below the edge's head limit, which the drained bytes must not meet): a body
/// sent to its end is read, and the connection closes after it; past `intake.drain_max_bytes`
/// or `intake.drain_timeout` it closes; a client that asked `Expect: 100-continue` and got no
/// `100` is not waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_drains_are_bounded_and_expect_is_not_waited_for() {
    let e = start(|b| {
        b.set("intake.drain_max_bytes", "4096")
            .set("intake.drain_timeout", "\"1s\"")
    })
    .await;
    let before = drains(&e, "complete").await;
    let e = tokio::task::spawn_blocking(move || {
        // Sent to its end, in three pieces: read, then closed.
        let (mut s, status, code) = http1_refused(&e, "wrong-key", "Content-Length: 3000\r\n");
        assert_eq!((status, code.as_str()), (401, "invalid_credentials"));
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(100));
            s.write_all(&[b'x'; 1000]).expect("the body is taken");
        }
        let sent = Instant::now();
        assert!(closed_at(&mut s) - sent < Duration::from_millis(900));

        // Past the bound in bytes, and more to come: closed.
        let (mut s, status, _) = http1_refused(&e, "wrong-key", "Content-Length: 12000\r\n");
        assert_eq!(status, 401);
        let _ = s.write_all(&[b'x'; 6000]);
        let sent = Instant::now();
        assert!(closed_at(&mut s) - sent < Duration::from_millis(900));

        // A slow sender: closed when the time is up.
        let (mut s, status, _) = http1_refused(&e, "wrong-key", "Content-Length: 12000\r\n");
        assert_eq!(status, 401);
        let answered = Instant::now();
        let mut writer = s.try_clone().expect("clone");
        let trickle = std::thread::spawn(move || {
            for _ in 0..50 {
                if writer.write_all(&[b'x'; 100]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let after = closed_at(&mut s) - answered;
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_secs(3),
            "closed after {after:?}"
        );
        let _ = trickle.join();

        // `Expect: 100-continue`, refused before any `100`: no body comes, closed at once.
        let (mut s, status, _) = http1_refused(
            &e,
            "wrong-key",
            "Content-Length: 3000\r\nExpect: 100-continue\r\n",
        );
        assert_eq!(status, 401);
        let answered = Instant::now();
        assert!(closed_at(&mut s) - answered < Duration::from_millis(500));
        e
    })
    .await
    .expect("raw client");
    assert_eq!(
        drains_reach(&e, "complete", before + 1.0).await,
        before + 1.0
    );
    assert_eq!(drains_reach(&e, "byte_limit", 1.0).await, 1.0);
    assert_eq!(drains_reach(&e, "time_limit", 1.0).await, 1.0);
    assert_eq!(e.s.emu.stats().calls, 0);
}
