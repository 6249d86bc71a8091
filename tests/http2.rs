//! The edge over TLS and HTTP/2, where a client has more ways to hold the gateway than over
//! HTTP/1.1: a stream's body that stalls or trickles, many streams on one connection, an idle
//! connection, and a TLS connection that never finishes its ClientHello.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use support::pki::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn url(tls: SocketAddr) -> String {
    format!("https://localhost:{}{ROUTE}", tls.port())
}

/// A request whose body is `first`, then whatever `rest` yields.
fn upload(
    client: &reqwest::Client,
    tls: SocketAddr,
    first: Vec<u8>,
    rest: impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Sync + 'static,
) -> reqwest::RequestBuilder {
    let body = futures_util::stream::once(async move { Ok(bytes::Bytes::from(first)) }).chain(rest);
    client
        .post(url(tls))
        .header("Authorization", "Bearer alpha-key")
        .header("Content-Type", multipart_ct())
        .body(reqwest::Body::wrap_stream(body))
}

/// The 1.6 MB photo's multipart body, and its first half.
fn large_upload() -> (Vec<u8>, Vec<u8>) {
    let image = multipart(&[Part::image("face.jpg", &fixture("face-large.jpg"))]);
    let half = image[..image.len() / 2].to_vec();
    (image, half)
}

fn stalled() -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    futures_util::stream::pending()
}

async fn post_photo(client: &reqwest::Client, tls: SocketAddr) -> (u16, reqwest::Version) {
    let r = client
        .post(url(tls))
        .header("Authorization", "Bearer alpha-key")
        .header("Content-Type", multipart_ct())
        .body(multipart(&[Part::image("face.jpg", &fixture("face.jpg"))]))
        .send()
        .await
        .expect("request");
    (r.status().as_u16(), r.version())
}

/// Over HTTP/2 the body's read timeout and its deadline hold as over HTTP/1.1 (Pingora applies
/// its read timeout to HTTP/1 only): a stalled stream and a trickling one get 408 `body_timeout`,
/// cost nothing, and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_bodies_have_their_time_limits() {
    let s = setup();
    let _gw = s
        .builder
        .set("intake.body_read_timeout", "\"1s\"")
        .set("intake.body_deadline", "\"3s\"")
        .start();
    let client = s.pki.client(s.tls, false);
    let (_, half) = large_upload();

    // Half the body, then nothing: cut at the read timeout.
    let started = Instant::now();
    let r = upload(&client, s.tls, half.clone(), stalled())
        .send()
        .await
        .expect("an answer");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status().as_u16(), 408);
    assert_eq!(json_code(&r.text().await.expect("body")), "body_timeout");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "the stalled stream was answered after {waited:?}"
    );

    // A piece every 300 ms, each within the read timeout: cut at the deadline.
    let started = Instant::now();
    let trickle = futures_util::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Some((Ok(bytes::Bytes::from_static(&[b'x'; 512])), ()))
    });
    let r = upload(&client, s.tls, half, trickle)
        .send()
        .await
        .expect("an answer");
    assert_eq!(r.status().as_u16(), 408);
    assert_eq!(json_code(&r.text().await.expect("body")), "body_timeout");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2900) && waited < Duration::from_secs(6),
        "the trickling stream was answered after {waited:?}"
    );

    // The connection is still good, and only the whole upload reached the provider.
    assert_eq!(
        post_photo(&client, s.tls).await,
        (200, reqwest::Version::HTTP_2)
    );
    assert_eq!(s.emu.stats().calls, 1);
}

/// One HTTP/2 connection cannot carry more requests at once than its address may have
/// (`server.max_connections_per_ip`): past it, 429 `too_many_connections`; a reset stream gives
/// its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_count_against_the_address_cap() {
    let s = setup();
    let gw = s
        .builder
        .set("server.max_connections_per_ip", "3")
        .set("intake.body_read_timeout", "\"20s\"")
        .set("intake.body_deadline", "\"30s\"")
        .start();
    let client = s.pki.client(s.tls, false);
    let (image, half) = large_upload();
    let held: Vec<_> = (0..3)
        .map(|_| tokio::spawn(upload(&client, s.tls, half.clone(), stalled()).send()))
        .collect();
    // The three are in, waiting for their bodies.
    let admin = gw.admin_url();
    let until = Instant::now() + Duration::from_secs(5);
    while sample(
        &metrics_text(&admin).await,
        "liveness_gateway_inflight_requests",
    ) < 3.0
    {
        assert!(Instant::now() < until, "the three streams never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = client
        .post(url(s.tls))
        .header("Authorization", "Bearer alpha-key")
        .header("Content-Type", multipart_ct())
        .body(image.clone())
        .send()
        .await
        .expect("an answer");
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(
        json_code(&r.text().await.expect("body")),
        "too_many_connections"
    );

    // The client gives up on them (RST_STREAM): the places come back.
    for h in held {
        h.abort();
    }
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, version) = post_photo(&client, s.tls).await;
        if status == 200 {
            assert_eq!(version, reqwest::Version::HTTP_2);
            break;
        }
        assert_eq!(status, 429);
        assert!(
            Instant::now() < until,
            "the reset streams kept their places"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.emu.stats().calls, 1);
}

/// A raw TLS connection to the gateway offering `alpn`.
async fn raw_tls(
    pki: &TestPki,
    addr: SocketAddr,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).expect("root");
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    connector.connect(name, tcp).await.expect("handshake")
}

/// A gateway with h2c on and these deadlines (`header_timeout`, `keepalive_timeout`).
fn deadlines(
    s: &TlsSetup,
    header: &str,
    keepalive: &str,
) -> liveness_gateway::server::RunningGateway {
    s.builder
        .clone()
        .set("server.header_timeout", &format!("{header:?}"))
        .set("server.keepalive_timeout", &format!("{keepalive:?}"))
        .set("server.h2c", "true")
        .start()
}

/// Read until the peer closes (or 10 s pass): what came, and when the end came.
async fn read_to_close(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> (Vec<u8>, Option<Instant>) {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 16384];
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(until.into(), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (all, Some(Instant::now())),
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => return (all, None),
        }
    }
}

/// HTTP/2 frames as (type, payload), from the start of what a server sent.
fn frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        if bytes.len() < 9 + len {
            break;
        }
        out.push((bytes[3], bytes[9..9 + len].to_vec()));
        bytes = &bytes[9 + len..];
    }
    out
}

/// The server's HTTP/2 settings carry `server.h2_max_streams` and `server.max_header_bytes`,
/// and a connection with no stream open is closed after `server.keepalive_timeout`, as an idle
/// HTTP/1.1 connection is (Pingora closes it without a GOAWAY: no stream was in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_settings_and_idle_connections() {
    let s = setup();
    let _gw = s
        .builder
        .set("server.h2_max_streams", "7")
        .set("server.max_header_bytes", "8192")
        .set("server.keepalive_timeout", "\"1s\"")
        .start();
    let mut conn = raw_tls(&s.pki, s.tls, b"h2").await;
    assert_eq!(conn.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let opened = Instant::now();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    // Our SETTINGS (none), and the ACK of the server's.
    conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .expect("settings");
    conn.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0])
        .await
        .expect("ack");
    let (bytes, closed) = read_to_close(&mut conn).await;
    let frames = frames(&bytes);
    let settings = &frames
        .iter()
        .find(|(t, p)| *t == 4 && !p.is_empty())
        .expect("the server's SETTINGS")
        .1;
    let value = |id: u16| {
        settings.chunks(6).find_map(|c| {
            (u16::from_be_bytes([c[0], c[1]]) == id)
                .then(|| u32::from_be_bytes([c[2], c[3], c[4], c[5]]))
        })
    };
    assert_eq!(value(3), Some(7), "SETTINGS_MAX_CONCURRENT_STREAMS");
    assert_eq!(value(6), Some(8192), "SETTINGS_MAX_HEADER_LIST_SIZE");
    // A 68 KB photo fits the stream's window: no round trip for a WINDOW_UPDATE mid-upload.
    assert_eq!(value(4), Some(256 * 1024), "SETTINGS_INITIAL_WINDOW_SIZE");
    let closed = closed.expect("the idle connection was closed");
    let after = closed - opened;
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(5),
        "closed after {after:?}"
    );
}

/// OkHttp 3 (Android's stack, Debian's `libokhttp-java`; tests/clients/okhttp) uploading
/// accepted photos of every fixture size over HTTP/2, 10 at once, each round on a new
/// connection, over TLS and over h2c: every upload gets its verdict. OkHttp 3 sends on the
/// stream window the gateway's SETTINGS raise before it acknowledges them (square/okhttp#5422,
/// fixed in 4.x), and the `h2` crate holds a client to the protocol's 64 KiB until then: some of
/// these uploads were reset with FLOW_CONTROL_ERROR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn okhttp3_uploads_over_http2_from_a_new_connection() {
    let s = setup();
    let gw = s.builder.clone().set("server.h2c", "true").start();
    let ca = s.pki.ca_file(s.dir.path());
    let cp = okhttp_classpath();
    let tls = url(s.tls);
    let plain = format!("{}{ROUTE}", gw.url());
    let runs = [
        ("face.jpg", &tls, "http2", "h2", 10),
        ("face-selfie.jpg", &tls, "http2", "h2", 10),
        ("face-large.jpg", &tls, "http2", "h2", 3),
        ("face-selfie.jpg", &plain, "h2c", "h2_prior_knowledge", 5),
    ];
    let mut summary = Vec::new();
    let mut failed = Vec::new();
    for (name, url, protocol, wire, rounds) in runs {
        let photo = s.dir.path().join(name);
        std::fs::write(&photo, fixture(name)).expect("photo");
        let out = tokio::process::Command::new("java")
            .arg("-cp")
            .arg(&cp)
            .arg("EarlyAnswer")
            .arg(url.as_str())
            .arg(&ca)
            .arg(&photo)
            .args(["alpha-key", "10", protocol, "parallel"])
            .arg(rounds.to_string())
            .output()
            .await
            .expect("java");
        let text = String::from_utf8_lossy(&out.stdout);
        let verdict = |line: &&str| {
            let mut f = line.splitn(5, ' ');
            let (Some("ANSWER"), Some(p), Some("200"), Some(_), Some(body)) =
                (f.next(), f.next(), f.next(), f.next(), f.next())
            else {
                return false;
            };
            let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            p.eq_ignore_ascii_case(wire) && v["result"].is_boolean()
        };
        let good = text.lines().filter(verdict).count();
        let uploads = 10 * rounds;
        summary.push(format!("{name} over {protocol}: {good} of {uploads}"));
        if good != uploads {
            let others: Vec<&str> = text.lines().filter(|l| !verdict(l)).collect();
            failed.push(format!(
                "{name} over {protocol}: {} x {:?}; stderr: {}",
                others.len(),
                others.first(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{}\n\n{}",
        summary.join("\n"),
        failed.join("\n")
    );
}

/// HTTP/2 frames from a server as (type, flags, stream, payload), from the start of `bytes`.
fn frames_on_streams(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        if bytes.len() < 9 + len {
            break;
        }
        let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
        out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
        bytes = &bytes[9 + len..];
    }
    out
}

/// Read from `conn` into `got` until `done` holds for the frames so far (or 10 s pass).
async fn read_until(
    conn: &mut (impl tokio::io::AsyncRead + Unpin),
    got: &mut Vec<u8>,
    done: impl Fn(&[(u8, u8, u32, Vec<u8>)]) -> bool,
) {
    let until = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 16384];
    while !done(&frames_on_streams(got)) {
        match tokio::time::timeout_at(until.into(), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// An upload as OkHttp 3 sends it on a new connection, in a fixed order: the gateway's SETTINGS
/// (its 256 KiB stream window) and WINDOW_UPDATE are read, the selfie's whole body (134 KB, past
/// the protocol's 65,535 bytes) is sent, and only then the SETTINGS are acknowledged. It gets
/// its verdict, and so does a next request on the same connection (the acknowledgement that
/// came late ended nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_sent_before_the_settings_acknowledgement_gets_its_verdict() {
    let s = setup();
    let _gw = s.builder.clone().start();
    let mut conn = h2_opened(&s).await;
    let mut got = Vec::new();
    read_until(&mut conn, &mut got, |f| {
        f.iter().any(|(t, fl, _, _)| *t == 4 && fl & 1 == 0)
            && f.iter().any(|(t, _, st, _)| *t == 8 && *st == 0)
    })
    .await;
    let mut head = request_head();
    for (name, value) in [
        ("authorization", "Bearer alpha-key".to_string()),
        ("content-type", multipart_ct()),
    ] {
        // A literal header field without indexing, with a new name (RFC 7541, 6.2.2).
        head.push(0);
        head.push(name.len() as u8);
        head.extend_from_slice(name.as_bytes());
        head.push(value.len() as u8);
        head.extend_from_slice(value.as_bytes());
    }
    let mut answered_at = got.len();
    for (stream, photo, ack) in [(1u32, "face-selfie.jpg", true), (3, "face.jpg", false)] {
        let body = multipart(&[Part::image("face.jpg", &fixture(photo))]);
        let mut out = frame(1, 0x4, stream, &head); // HEADERS, END_HEADERS
        let pieces: Vec<&[u8]> = body.chunks(16384).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let end = if i + 1 == pieces.len() { 0x1 } else { 0 };
            out.extend(frame(0, end, stream, piece)); // DATA
        }
        if ack {
            out.extend(frame(4, 0x1, 0, &[])); // SETTINGS, ACK
        }
        conn.write_all(&out).await.expect("upload");
        read_until(&mut conn, &mut got, |f| {
            f.iter().any(|(t, fl, st, _)| {
                *st == stream && ((*t == 0 && fl & 1 != 0) || *t == 3) || *t == 7
            })
        })
        .await;
        let frames = frames_on_streams(&got[answered_at..]);
        answered_at = got.len();
        let ended: Vec<String> = frames
            .iter()
            .filter(|(t, _, st, _)| *t == 7 || (*t == 3 && *st == stream))
            .map(|(t, _, _, p)| {
                let at = if *t == 7 { 4 } else { 0 };
                let code = u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
                format!(
                    "{} with error code {code}",
                    if *t == 7 { "GOAWAY" } else { "RST_STREAM" }
                )
            })
            .collect();
        assert!(ended.is_empty(), "{photo}: {ended:?}");
        let status = frames
            .iter()
            .find(|(t, _, st, _)| *t == 1 && *st == stream)
            .map(|(_, _, _, p)| p.first().copied());
        assert_eq!(status, Some(Some(0x88)), "{photo}: :status 200");
        let answer: Vec<u8> = frames
            .iter()
            .filter(|(t, _, st, _)| *t == 0 && *st == stream)
            .flat_map(|(_, _, _, p)| p.clone())
            .collect();
        let v: serde_json::Value = serde_json::from_slice(&answer).expect("a JSON answer");
        assert!(v["result"].is_boolean(), "{photo}: {v}");
    }
}

/// Before its handshake, a TLS connection must send its whole ClientHello within
/// `server.header_timeout` (Pingora alone waits 60 s); anything but a TLS handshake is closed at
/// once; and a connection that arrives while a cap is reached is closed before any handshake
/// work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_are_bounded_and_admitted() {
    let s = setup();
    let gw = s
        .builder
        .set("server.header_timeout", "\"1s\"")
        .set("server.keepalive_timeout", "\"30s\"")
        .set("server.max_connections", "2")
        .start();
    let admin = gw.admin_url();

    // Silent: cut after a second.
    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(s.tls)
        .await
        .expect("connect");
    let (bytes, closed) = read_to_close(&mut silent).await;
    let after = closed.expect("the silent connection was cut") - started;
    assert!(bytes.is_empty());
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(5),
        "cut after {after:?}"
    );
    // Half a ClientHello record: cut as well.
    let started = Instant::now();
    let mut partial = tokio::net::TcpStream::connect(s.tls)
        .await
        .expect("connect");
    partial
        .write_all(&[22, 3, 1, 2, 0, 1, 0, 1, 252, 3, 3])
        .await
        .expect("write");
    let (_, closed) = read_to_close(&mut partial).await;
    let after = closed.expect("the partial ClientHello was cut") - started;
    assert!(after < Duration::from_secs(5), "cut after {after:?}");
    let m = metrics_text(&admin).await;
    assert_eq!(
        sample(
            &m,
            r#"liveness_gateway_connections_cut_total{reason="tls_handshake_timeout"}"#
        ),
        2.0
    );
    // Plain HTTP on the TLS port: closed at once, nothing answered.
    let started = Instant::now();
    let mut plain = tokio::net::TcpStream::connect(s.tls)
        .await
        .expect("connect");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (bytes, closed) = read_to_close(&mut plain).await;
    assert!(bytes.is_empty(), "{}", String::from_utf8_lossy(&bytes));
    assert!(closed.expect("closed") - started < Duration::from_millis(900));

    // Two connections fill `max_connections`; a third is closed before its handshake.
    let first = raw_tls(&s.pki, s.tls, b"http/1.1").await;
    let second = raw_tls(&s.pki, s.tls, b"http/1.1").await;
    let until = Instant::now() + Duration::from_secs(5);
    while sample(
        &metrics_text(&admin).await,
        "liveness_gateway_connections_open",
    ) < 2.0
    {
        assert!(
            Instant::now() < until,
            "the two connections were never admitted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused_before = sample(
        &metrics_text(&admin).await,
        r#"liveness_gateway_connections_refused_total{reason="max_connections"}"#,
    );
    let third = {
        use tokio_rustls::rustls;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(s.pki.ca.der().clone()).expect("root");
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(s.tls)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
            .await
            .expect("an end to the handshake")
    };
    assert!(third.is_err(), "a third connection was admitted");
    let refused = sample(
        &metrics_text(&admin).await,
        r#"liveness_gateway_connections_refused_total{reason="max_connections"}"#,
    );
    assert_eq!(refused, refused_before + 1.0);
    // With one place free again, a client is served.
    drop(first);
    drop(second);
    let client = s.pki.client(s.tls, false);
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let ok = client
            .post(url(s.tls))
            .header("Authorization", "Bearer alpha-key")
            .header("Content-Type", multipart_ct())
            .body(multipart(&[Part::image("face.jpg", &fixture("face.jpg"))]))
            .send()
            .await
            .map(|r| r.status().as_u16());
        if ok.as_ref().is_ok_and(|s| *s == 200) {
            break;
        }
        assert!(Instant::now() < until, "never served again: {ok:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A TLS connection that has spoken HTTP/2's preface and an empty SETTINGS frame.
async fn h2_opened(s: &TlsSetup) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut conn = raw_tls(&s.pki, s.tls, b"h2").await;
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    conn.write_all(&frame(4, 0, 0, &[]))
        .await
        .expect("settings");
    conn
}

/// One HTTP/2 frame: type, flags, stream, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK for a liveness request: :method POST, :scheme https (static table), :path and
/// :authority as literals.
fn request_head() -> Vec<u8> {
    let mut block = vec![0x83, 0x87];
    for (index, value) in [(4u8, ROUTE), (1, "localhost")] {
        block.push(index);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// What a flood must end in: a GOAWAY with ENHANCE_YOUR_CALM (the flood ended the connection,
/// not a malformed frame of the test), no call upstream, and others served as before.
async fn calmed_and_harmless(s: &TlsSetup, from_server: &[u8], after: &str) {
    let goaway = frames(from_server)
        .into_iter()
        .find(|(t, _)| *t == 7)
        .map(|(_, p)| u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
    assert_eq!(goaway, Some(0xb), "the GOAWAY's error code (after {after})");
    assert_eq!(s.emu.stats().calls, 0);
    let client = s.pki.client(s.tls, false);
    assert_eq!(
        post_photo(&client, s.tls).await,
        (200, reqwest::Version::HTTP_2)
    );
}

/// The "rapid reset" flood: streams opened and reset at once, over and over, end the connection
/// (the `h2` crate's cap on streams reset before they were accepted); none reaches the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_flood_ends_the_connection() {
    let s = setup();
    let gw = s.builder.clone().start();
    let mut conn = h2_opened(&s).await;
    let block = request_head();
    let mut sent = 0;
    let mut burst = Vec::new();
    for i in 0..5000u32 {
        let stream = 2 * i + 1;
        burst.extend(frame(1, 0x4, stream, &block)); // HEADERS, END_HEADERS
        burst.extend(frame(3, 0, stream, &8u32.to_be_bytes())); // RST_STREAM, CANCEL
        if burst.len() > 16 * 1024 {
            if conn.write_all(&burst).await.is_err() {
                break;
            }
            sent = i + 1;
            burst.clear();
        }
    }
    let (bytes, closed) = read_to_close(&mut conn).await;
    assert!(
        closed.is_some(),
        "the connection outlived {sent} reset streams"
    );
    calmed_and_harmless(&s, &bytes, &format!("{sent} reset streams")).await;
    drop(gw);
}

/// The CONTINUATION flood: a request head that never ends, sent as one HEADERS frame without
/// END_HEADERS and then CONTINUATION frames without end, far past `server.max_header_bytes`.
/// The gateway stops it at the limit (it does not buffer the flood), calls no one, and serves
/// others as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_at_the_header_limit() {
    let s = setup();
    let gw = s.builder.clone().start();
    let mut conn = h2_opened(&s).await;
    let block = request_head();
    // A literal header field without indexing, new name "x-pad", a 1,000-byte value (HPACK
    // integers with a 7-bit prefix: 127, then 1000 - 127 = 873 in 7-bit groups).
    let mut pad = vec![0x00, 5];
    pad.extend_from_slice(b"x-pad");
    pad.extend_from_slice(&[0x7f, 0xe9, 0x06]);
    pad.extend(std::iter::repeat_n(b'a', 1000));
    conn.write_all(&frame(1, 0, 1, &block))
        .await
        .expect("headers");
    // 16 MiB of head at most, against a 16 KiB limit (what is sent before the cut mostly
    // waits in the two sockets' buffers).
    let mut sent = 0usize;
    let mut cut = false;
    while sent < 16 << 20 {
        let mut burst = Vec::new();
        for _ in 0..16 {
            burst.extend(frame(9, 0, 1, &pad)); // CONTINUATION, no END_HEADERS
        }
        match tokio::time::timeout(Duration::from_secs(5), conn.write_all(&burst)).await {
            Ok(Ok(())) => sent += burst.len(),
            // Refused (the peer closed) or not read any more (the peer stopped reading).
            _ => {
                cut = true;
                break;
            }
        }
    }
    let (bytes, closed) = read_to_close(&mut conn).await;
    assert!(
        cut && closed.is_some(),
        "the gateway took a {sent}-byte head without ending the connection"
    );
    calmed_and_harmless(&s, &bytes, &format!("{sent} bytes of head")).await;
    drop(gw);
}

/// SIGTERM with an HTTP/2 connection open: its stream in flight gets its answer, and the
/// connection the client keeps alive does not hold the process until the grace period ends
/// (it is told to go away), so the process exits soon after the last answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_finishes_http2_streams_and_closes_their_connections() {
    let s = setup();
    let builder = s
        .builder
        .clone()
        .set("cache.enabled", "false")
        .set("server.grace_period", "\"20s\"");
    let (mut gw, _) = GatewayProcess::start_named(&builder, s.dir.path(), "gw", &[]).await;
    let client = s.pki.client(s.tls, false);
    assert_eq!(
        post_photo(&client, s.tls).await,
        (200, reqwest::Version::HTTP_2)
    );
    s.emu.set_latency(Duration::from_millis(1500));
    let inflight = {
        let (client, tls) = (client.clone(), s.tls);
        tokio::spawn(async move { post_photo(&client, tls).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.emu.stats().in_flight, 1);
    let stopped = Instant::now();
    gw.signal("TERM");
    assert_eq!(
        inflight.await.expect("task"),
        (200, reqwest::Version::HTTP_2),
        "the stream in flight is answered"
    );
    let status = gw.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    // The shutdown delay (1 s), the call's remaining 1.2 s, a moment to drain: far from 20 s.
    assert!(
        stopped.elapsed() < Duration::from_secs(8),
        "the process stayed {:?} (grace period 20 s)\n{}",
        stopped.elapsed(),
        gw.log()
    );
}

/// A client's first TLS flight (its ClientHello), whole, as a client that then stalls sends it.
fn client_hello(pki: &TestPki) -> Vec<u8> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).expect("root");
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("hello");
    hello
}

/// When each of `conns` was closed, counted from `since` (or `None`: still open at `until`).
async fn closing_times(
    conns: Vec<Box<dyn tokio::io::AsyncRead + Unpin + Send>>,
    since: Instant,
    until: Instant,
) -> Vec<Option<Duration>> {
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                loop {
                    match tokio::time::timeout_at(until.into(), c.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
                        Ok(Ok(_)) => {}
                        Err(_) => return None,
                    }
                }
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// A crowd from one address that sends whole ClientHellos and stalls: each connection is
/// counted from its accept, so past `server.max_connections_per_ip` they are closed at once,
/// and the admitted ones are cut at `server.header_timeout`, their handshake included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_crowd_is_counted_capped_and_cut() {
    let s = setup();
    let gw = s
        .builder
        .clone()
        .set("server.header_timeout", "\"2s\"")
        .set("server.max_connections", "20")
        .set("server.max_connections_per_ip", "5")
        .start();
    let admin = gw.admin_url();
    let hello = client_hello(&s.pki);
    let started = Instant::now();
    let mut crowd: Vec<Box<dyn tokio::io::AsyncRead + Unpin + Send>> = Vec::new();
    for _ in 0..100 {
        let mut c = tokio::net::TcpStream::connect(s.tls)
            .await
            .expect("connect");
        let _ = c.write_all(&hello).await;
        crowd.push(Box::new(c));
    }
    let mut open = 0.0f64;
    while started.elapsed() < Duration::from_millis(1500) {
        open = open.max(sample(
            &metrics_text(&admin).await,
            "liveness_gateway_connections_open",
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let times = closing_times(crowd, started, started + Duration::from_secs(8)).await;
    let held = times.iter().filter(|t| t.is_none()).count();
    let last = times.iter().flatten().max().copied();
    let m = metrics_text(&admin).await;
    let refused = sample(
        &m,
        r#"liveness_gateway_connections_refused_total{reason="max_connections_per_ip"}"#,
    );
    let cut = sample(
        &m,
        r#"liveness_gateway_connections_cut_total{reason="tls_handshake_timeout"}"#,
    );
    println!("100 stalled handshakes: {open} open at most, {refused} refused, {cut} cut, {held} still open after 8 s, the last closed after {last:?}");
    assert_eq!(
        open, 5.0,
        "connections counted while their handshake stalls"
    );
    assert_eq!(refused, 95.0);
    assert_eq!(held, 0, "connections held past the deadline");
    assert!(
        last.is_some_and(|l| l < Duration::from_millis(4500)),
        "the last closed after {last:?}"
    );
    assert_eq!(cut, 5.0);
}

/// HTTP/2 follows the same rule as HTTP/1.1: a connection that has sent nothing of a request
/// is idle, cut after `server.keepalive_timeout` (a silent connection after ALPN `h2`, one that
/// sent the preface and SETTINGS and no request, a silent h2c one), and a head once begun (half
/// a preface, a HEADERS frame without its end) is cut at `server.header_timeout`, over TLS and
/// over h2c.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_without_a_request_are_idle_and_a_head_begun_has_the_header_timeout() {
    let s = setup();
    let gw = deadlines(&s, "1s", "3s");
    let mut idle: Vec<Box<dyn tokio::io::AsyncRead + Unpin + Send>> = Vec::new();
    let mut heads: Vec<Box<dyn tokio::io::AsyncRead + Unpin + Send>> = Vec::new();
    let started = Instant::now();
    for _ in 0..4 {
        idle.push(Box::new(raw_tls(&s.pki, s.tls, b"h2").await));
        idle.push(Box::new(h2_opened(&s).await));
        let mut c = h2_opened(&s).await;
        // A HEADERS frame without END_HEADERS, and no CONTINUATION.
        c.write_all(&frame(1, 0, 1, &request_head()))
            .await
            .expect("headers");
        heads.push(Box::new(c));
    }
    for n in 0..4 {
        let mut c = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        if n % 2 == 1 {
            c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .expect("preface");
            c.write_all(&frame(4, 0, 0, &[])).await.expect("settings");
        }
        idle.push(Box::new(c));
        let mut half = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        half.write_all(b"PRI * HTTP/2.0\r\n").await.expect("half");
        heads.push(Box::new(half));
    }
    let until = started + Duration::from_secs(8);
    let (idle_times, head_times) = tokio::join!(
        closing_times(idle, started, until),
        closing_times(heads, started, until)
    );
    println!(
        "idle HTTP/2 connections closed after {idle_times:?}; heads begun after {head_times:?}"
    );
    for t in idle_times {
        let t = t.expect("an idle connection still open after 8 s");
        assert!(
            t >= Duration::from_millis(2900) && t < Duration::from_secs(6),
            "an idle connection closed after {t:?}"
        );
    }
    for t in head_times {
        let t = t.expect("a head begun still open after 8 s");
        assert!(
            t >= Duration::from_millis(900) && t < Duration::from_millis(2800),
            "a head begun closed after {t:?}"
        );
    }
}

/// A header block begun late in the idle window still has its whole `server.header_timeout`,
/// over TLS (ALPN h2) and h2c: it is cut by the gateway's head deadline, and counted so, not by
/// HTTP/2's idle timer at the end of the window. (Before: closed at the idle deadline, half a
/// second after it began, and not counted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_head_begun_at_the_end_of_the_idle_window_has_the_header_timeout() {
    let s = setup();
    let gw = deadlines(&s, "1s", "3s");
    let mut tls = h2_opened(&s).await;
    let mut plain = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    plain
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    plain
        .write_all(&frame(4, 0, 0, &[]))
        .await
        .expect("settings");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // A HEADERS frame without END_HEADERS, half a second before the idle deadline.
    let begun = Instant::now();
    tls.write_all(&frame(1, 0, 1, &request_head()))
        .await
        .expect("headers");
    plain
        .write_all(&frame(1, 0, 1, &request_head()))
        .await
        .expect("headers");
    let conns: Vec<Box<dyn tokio::io::AsyncRead + Unpin + Send>> =
        vec![Box::new(tls), Box::new(plain)];
    let times = closing_times(conns, begun, begun + Duration::from_secs(5)).await;
    println!("heads begun at 2.5 s closed after {times:?}");
    for t in times {
        let t = t.expect("a head begun still open after 5 s");
        assert!(
            t >= Duration::from_millis(900) && t < Duration::from_millis(2500),
            "a head begun 0.5 s before the idle deadline closed after {t:?}"
        );
    }
    let cut = sample(
        &metrics_text(&gw.admin_url()).await,
        r#"liveness_gateway_connections_cut_total{reason="header_timeout"}"#,
    );
    assert_eq!(cut, 2.0, "both heads were cut by their deadline");
}

/// A TLS connection made after `delay`: the TCP connection first, the handshake later.
async fn tls_after(
    pki: &TestPki,
    addr: SocketAddr,
    alpn: &[u8],
    delay: Duration,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).expect("root");
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tokio::time::sleep(delay).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    connector.connect(name, tcp).await.expect("handshake")
}

/// Write `steps` (each after its delay from `since`), then read to the close: when it came.
async fn closed_after<S>(mut c: S, since: Instant, steps: Vec<(u64, Vec<u8>)>) -> Option<Duration>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    for (at, bytes) in steps {
        tokio::time::sleep_until((since + Duration::from_millis(at)).into()).await;
        c.write_all(&bytes).await.ok()?;
    }
    let mut buf = vec![0u8; 16384];
    loop {
        match tokio::time::timeout_at((since + Duration::from_secs(10)).into(), c.read(&mut buf))
            .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}

/// The idle window counts from the accept (a TLS connection's from its handshake), and an
/// HTTP/2 preface does not move it, whole or split over reads, over h2c and TLS alike. (Before:
/// an h2c preface, and a TLS one split over two reads, started a new window, so a connection
/// went without a request for nearly twice as long; a TLS handshake's time came out of it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_window_counts_from_the_accept_and_a_preface_does_not_move_it() {
    let s = setup();
    let gw = deadlines(&s, "2s", "3s");
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let whole = vec![(2000, [preface.clone(), frame(4, 0, 0, &[])].concat())];
    let split = vec![
        (2000, preface[..12].to_vec()),
        (2050, [preface[12..].to_vec(), frame(4, 0, 0, &[])].concat()),
    ];
    let started = Instant::now();
    let mut tasks = Vec::new();
    for steps in [whole.clone(), split.clone()] {
        let plain = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        tasks.push(tokio::spawn(closed_after(plain, started, steps.clone())));
        let tls = raw_tls(&s.pki, s.tls, b"h2").await;
        tasks.push(tokio::spawn(closed_after(tls, started, steps)));
    }
    // A handshake done 0.9 s after the connection: idle for 3 s from then.
    let late = tls_after(&s.pki, s.tls, b"h2", Duration::from_millis(900)).await;
    let late = tokio::spawn(closed_after(late, started, Vec::new()));
    let mut times = Vec::new();
    for t in tasks {
        times.push(t.await.expect("task"));
    }
    let late = late.await.expect("task");
    println!("prefaces at 2 s: closed after {times:?}; a handshake at 0.9 s: {late:?}");
    for t in times {
        let t = t.expect("still open after 10 s");
        assert!(
            t >= Duration::from_millis(2900) && t < Duration::from_millis(3700),
            "a connection with a preface at 2 s closed after {t:?}, not at its idle deadline (3 s)"
        );
    }
    let late = late.expect("still open after 10 s");
    assert!(
        late >= Duration::from_millis(3800) && late < Duration::from_millis(4600),
        "a connection whose handshake ended at 0.9 s closed after {late:?}, not 3 s after it"
    );
}

/// On a listener that takes h2c, an HTTP/1.1 head that begins like HTTP/2's preface (`POST`)
/// has `header_timeout` from its first byte, as any head. (Before: from its second, a head
/// could take nearly twice as long.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_head_that_begins_like_a_preface_has_the_header_timeout_from_its_first_byte() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("server.h2c", "true")
        .set("server.header_timeout", "\"1s\"")
        .start();
    let started = Instant::now();
    let c = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let steps = vec![(0, b"P".to_vec()), (700, b"OST / HTTP/1.1\r\n".to_vec())];
    let t = closed_after(c, started, steps).await.expect("still open");
    assert!(
        t >= Duration::from_millis(950) && t < Duration::from_millis(1500),
        "a head begun at 0 s closed after {t:?}"
    );
}

/// An answer the client never takes (its HTTP/2 window kept at zero) ends its stream after
/// `header_timeout`, and the connection then closes as one with no stream open, over TLS and
/// h2c: it does not keep its place among the connections. (Before: open until the client left.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_client_never_takes_does_not_hold_its_connection() {
    let s = setup();
    let gw = deadlines(&s, "1s", "3s");
    // SETTINGS_INITIAL_WINDOW_SIZE = 0, the gateway's SETTINGS acknowledged, and a whole GET.
    let mut head = vec![0x82, 0x87, 0x04, 5];
    head.extend_from_slice(b"/nope");
    head.extend_from_slice(&[0x01, 9]);
    head.extend_from_slice(b"localhost");
    let opening = [
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        frame(4, 0, 0, &[0, 4, 0, 0, 0, 0]),
        frame(4, 1, 0, &[]),
        frame(1, 0x5, 1, &head),
    ]
    .concat();
    let started = Instant::now();
    let plain = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let tls = raw_tls(&s.pki, s.tls, b"h2").await;
    let a = tokio::spawn(closed_after(plain, started, vec![(0, opening.clone())]));
    let b = tokio::spawn(closed_after(tls, started, vec![(0, opening)]));
    let times = [a.await.expect("task"), b.await.expect("task")];
    println!("connections whose answer was never taken closed after {times:?}");
    let cut = sample(
        &metrics_text(&gw.admin_url()).await,
        r#"liveness_gateway_connections_cut_total{reason="send_timeout"}"#,
    );
    assert_eq!(cut, 2.0, "each answer not taken is counted");
    for t in times {
        let t = t.expect("a connection still open after 10 s");
        // The write's 1 s, then no stream open for keepalive_timeout + header_timeout.
        assert!(t < Duration::from_secs(7), "closed after {t:?}");
    }
    let open = sample(
        &metrics_text(&gw.admin_url()).await,
        "liveness_gateway_connections_open",
    );
    assert_eq!(open, 0.0);
}

/// A client that takes a large answer slowly but steadily gets all of it: the send deadline is
/// on progress (`header_timeout` without a piece of the answer taken), not on the whole answer.
/// (Before: an answer that took longer than `header_timeout` to deliver was cut, a billed
/// verdict lost: 98 KB of 600 KB at 20 KB/s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_taken_slowly_arrives_whole() {
    let emu = start_emulator();
    // A verdict padded past 1 MiB, within the limit here.
    emu.set_fault(liveness_gateway_dev::emulator::Fault::Oversized);
    let gw = TestGateway::for_emulator(&emu)
        .set("server.h2c", "true")
        .set("server.header_timeout", "\"1s\"")
        .set("upstream.max_response_bytes", "4194304")
        .start();
    let tcp = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2c");
    tokio::spawn(connection);
    let body = multipart(&[Part::image("a.jpg", &fixture("face.jpg"))]);
    let req = http::Request::post(format!("http://localhost{ROUTE}"))
        .header("authorization", "Bearer alpha-key")
        .header("content-type", multipart_ct())
        .body(())
        .expect("request");
    let (resp, mut send) = client.send_request(req, false).expect("send");
    send.send_data(body.into(), true).expect("body");
    let resp = resp.await.expect("answer");
    assert_eq!(resp.status(), 200);
    let declared: usize = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("length");
    assert!(declared > 1024 * 1024, "{declared}");
    let mut recv = resp.into_body();
    let (started, mut got) = (Instant::now(), 0usize);
    // About 300 KB/s: the whole answer takes more than three times header_timeout.
    while let Some(chunk) = recv.data().await {
        let Ok(chunk) = chunk else { break };
        got += chunk.len();
        tokio::time::sleep(Duration::from_millis(50 * chunk.len() as u64 / 16_384)).await;
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    println!("{got} of {declared} bytes in {:?}", started.elapsed());
    assert_eq!(got, declared, "the whole answer");
    assert!(started.elapsed() > Duration::from_secs(2));
}

/// A client's pool opens connections ahead of its requests (hyper races a new connection with
/// the wait for a pooled one, and pools the one it did not use) and keeps them as long as those
/// it has used: such a connection, silent for longer than `server.header_timeout`, is idle, not
/// a slow head, and its first request is answered, over HTTP/1.1, TLS, h2 and h2c. (Cut at the
/// head deadline, it was closed under the request a busy client sent on it before it saw the
/// close: requests without an answer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_opened_ahead_of_its_first_request_is_kept_as_an_idle_one() {
    let s = setup();
    let gw = deadlines(&s, "1s", "30s");
    let request = format!("GET {ROUTE} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let mut plain = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let mut tls = raw_tls(&s.pki, s.tls, b"http/1.1").await;
    let h2c = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let h2 = raw_tls(&s.pki, s.tls, b"h2").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let mut answers = Vec::new();
    for conn in [
        &mut plain as &mut (dyn AsyncRw + Unpin + Send),
        &mut tls as &mut (dyn AsyncRw + Unpin + Send),
    ] {
        let _ = conn.write_all(request.as_bytes()).await;
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        answers.push(
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or("(closed)")
                .to_string(),
        );
    }
    for conn in [
        Box::new(h2c) as Box<dyn AsyncRw + Unpin + Send>,
        Box::new(h2) as Box<dyn AsyncRw + Unpin + Send>,
    ] {
        let answer = async {
            let (mut client, connection) = h2::client::handshake(conn).await.ok()?;
            tokio::spawn(connection);
            let req = http::Request::get(format!("https://localhost{ROUTE}"))
                .body(())
                .ok()?;
            let (resp, _) = client.send_request(req, true).ok()?;
            Some(format!("h2 {}", resp.await.ok()?.status().as_u16()))
        };
        let got = tokio::time::timeout(Duration::from_secs(5), answer).await;
        answers.push(got.ok().flatten().unwrap_or("(closed)".into()));
    }
    assert_eq!(
        answers,
        [
            "HTTP/1.1 405 Method Not Allowed",
            "HTTP/1.1 405 Method Not Allowed",
            "h2 405",
            "h2 405"
        ],
        "answers after 2.5 s of silence"
    );
    let idle = sample(
        &metrics_text(&gw.admin_url()).await,
        r#"liveness_gateway_connections_cut_total{reason="idle_timeout"}"#,
    );
    assert_eq!(idle, 0.0, "no connection was cut");
}

/// Both ways of a connection, for the tests that read and write one through a `dyn`.
trait AsyncRw: tokio::io::AsyncRead + tokio::io::AsyncWrite {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite> AsyncRw for T {}

/// With `server.h2c` on, the plain listener tells HTTP/2 from HTTP/1.1 by the first bytes,
/// under the head deadline: a partial HTTP/1.1 head gets its 408, and a whole request shorter
/// than HTTP/2's preface is answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_keeps_the_http1_head_guard() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("server.h2c", "true")
        .set("server.header_timeout", "\"1s\"")
        .start();
    let started = Instant::now();
    let mut partial = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    partial
        .write_all(b"GET / HTTP/1.1\r\n")
        .await
        .expect("write");
    let mut short = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    short
        .write_all(b"GET /x HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let (bytes, closed) = read_to_close(&mut short).await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    let answered = closed.expect("closed") - started;
    assert!(
        answered < Duration::from_millis(800),
        "answered after {answered:?}"
    );
    let (bytes, closed) = read_to_close(&mut partial).await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.starts_with("HTTP/1.1 408") && text.contains("header_timeout"),
        "{text}"
    );
    let after = closed.expect("closed") - started;
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(2500),
        "408 after {after:?}"
    );
}

/// Over TLS the HTTP/1 head guard is the same as on the plain listener: blank lines before a
/// head do not switch it off, an early refusal is the connection's only answer, and clients
/// that leave in the middle of their upload are logged at debug level only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http1_guard_holds_over_tls() {
    let s = setup();
    let builder = s.builder.clone().set("server.header_timeout", "\"1s\"");
    let (gw, _cfg) = GatewayProcess::start(&builder, s.dir.path(), &[]).await;
    let before = gw.log().len();

    let started = Instant::now();
    let (mut r, mut w) = tokio::io::split(raw_tls(&s.pki, s.tls, b"http/1.1").await);
    w.write_all(b"\r\n\r\nGET /nope HTTP/1.1\r\n")
        .await
        .expect("write");
    let trickle = tokio::spawn(async move {
        for i in 0..12 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if w.write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
        w
    });
    let (bytes, closed) = read_to_close(&mut r).await;
    let _ = trickle.await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let after = closed.expect("closed") - started;
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(2500),
        "408 after {after:?}"
    );

    let body = multipart(&[Part::image("face.jpg", &fixture("face.jpg"))]);
    let mut refused = format!(
        "POST {ROUTE} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer alpha-key\r\nContent-Type: multipart/form-data\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    refused.extend_from_slice(&body);
    let mut conn = raw_tls(&s.pki, s.tls, b"http/1.1").await;
    let _ = conn.write_all(&refused).await;
    let (bytes, closed) = read_to_close(&mut conn).await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        closed.is_some() && text.starts_with("HTTP/1.1 400"),
        "{text}"
    );
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");

    let head = format!(
        "POST {ROUTE} HTTP/1.1\r\nHost: {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        "h".repeat(8000),
        multipart_ct(),
        body.len()
    );
    for _ in 0..20 {
        let mut c = raw_tls(&s.pki, s.tls, b"http/1.1").await;
        c.write_all(head.as_bytes()).await.expect("head");
        c.write_all(&body[..body.len() / 2]).await.expect("half");
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Gone without a goodbye: a reset, as when a phone loses its network.
        c.get_ref().0.set_zero_linger().expect("linger");
        drop(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = gw.log();
    let loud: Vec<&str> = log[before..]
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(
        loud.is_empty(),
        "{} lines above INFO, the first: {:?}",
        loud.len(),
        loud.first().map(|l| &l[..l.len().min(300)])
    );
}

/// An answer to HEAD is its headers and no body over every protocol (curl, over HTTP/1.1 and
/// h2c): a body after them is a protocol error on an HTTP/2 stream, which clients fail on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_to_head_has_no_body_over_http2_either() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("server.h2c", "true")
        .start();
    for path in ["/api/v1/usage", "/.well-known/jwks.json", "/nowhere", ROUTE] {
        for proto in ["--http1.1", "--http2-prior-knowledge"] {
            let url = format!("{}{path}", gw.url());
            let out = tokio::task::spawn_blocking(move || {
                std::process::Command::new("curl")
                    .args(["-sS", "-I", "--max-time", "5", proto, &url])
                    .output()
                    .expect("curl")
            })
            .await
            .expect("run");
            let head = String::from_utf8_lossy(&out.stdout).to_string();
            let said = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(out.status.success(), "{path} {proto}: {said}{head}");
            assert!(head.starts_with("HTTP/"), "{path} {proto}: {head}");
            assert!(
                head.to_ascii_lowercase().contains("content-length:"),
                "{head}"
            );
        }
    }
}
