//! TLS termination against the real gateway: HTTP/1.1 and HTTP/2 (by ALPN) over TLS for every
//! test photo, many streams on one HTTP/2 connection, a renewed certificate taken by a reload
//! without a restart, and `check-config` refusing a key that does not match its certificate.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use futures_util::StreamExt;
use support::pki::*;
use support::*;

async fn post_with(
    client: &reqwest::Client,
    tls: SocketAddr,
    key: &str,
    image: &[u8],
) -> (u16, reqwest::Version, Vec<u8>) {
    post_named(client, tls, key, "face.jpg", image).await
}

async fn post_named(
    client: &reqwest::Client,
    tls: SocketAddr,
    key: &str,
    filename: &str,
    image: &[u8],
) -> (u16, reqwest::Version, Vec<u8>) {
    let r = client
        .post(format!("https://localhost:{}{ROUTE}", tls.port()))
        .header("Authorization", format!("Bearer {key}"))
        .header("Content-Type", multipart_ct())
        .body(multipart(&[Part::image(filename, image)]))
        .send()
        .await
        .expect("request");
    let (status, version) = (r.status().as_u16(), r.version());
    (status, version, r.bytes().await.expect("body").to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_photo_over_http1_and_http2_with_tls() {
    let TlsSetup {
        dir: _dir,
        pki,
        emu: _emu,
        builder,
        tls,
        ..
    } = setup();
    let _gw = builder.start();
    for (http1, want) in [
        (true, reqwest::Version::HTTP_11),
        (false, reqwest::Version::HTTP_2),
    ] {
        let client = pki.client(tls, http1);
        for photo in ["face.jpg", "face-selfie.jpg", "face-large.jpg", "face.png"] {
            let image = fixture(photo);
            let (status, version, body) =
                post_named(&client, tls, "alpha-key", photo, &image).await;
            assert_eq!(
                status,
                200,
                "{photo} over {want:?}: {}",
                String::from_utf8_lossy(&body)
            );
            assert_eq!(version, want, "{photo}");
            assert!(!String::from_utf8_lossy(&body).contains(ORG_KEY));
        }
        // Errors keep their JSON bodies and codes over TLS too.
        let (status, _, body) = post_with(&client, tls, "wrong-key", &fixture("face.jpg")).await;
        assert_eq!(status, 401);
        assert_eq!(
            json_code(&String::from_utf8_lossy(&body)),
            "invalid_credentials"
        );
    }
}

/// Fifty uploads at once share one HTTP/2 connection, each its own stream and verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_streams_on_one_http2_connection() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = TestPki::new();
    let (cert, key, _) = pki.leaf(dir.path(), "leaf");
    let emu = start_emulator();
    emu.set_latency(Duration::from_millis(100));
    let (builder, tls) = tls_gateway(&emu, &cert, &key);
    let gw = builder.start();
    let client = pki.client(tls, false);
    let base = fixture("face.jpg");
    let tasks = (0..50).map(|n| {
        let (client, image) = (client.clone(), variant(&base, n));
        tokio::spawn(async move { post_with(&client, tls, "alpha-key", &image).await })
    });
    for r in join_all(tasks).await {
        let (status, version, _) = r.expect("task");
        assert_eq!((status, version), (200, reqwest::Version::HTTP_2));
    }
    assert_eq!(emu.stats().calls, 50);
    let m = metrics_text(&gw.admin_url()).await;
    assert!(
        sample(&m, "liveness_gateway_connections_open") <= 2.0,
        "one connection carried the streams"
    );
}

/// A renewed certificate is presented to new connections after a reload, with no restart; a
/// broken one is refused and the old one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewed_certificate_is_taken_by_a_reload() {
    let TlsSetup {
        dir,
        pki,
        cert,
        key,
        leaf: first,
        emu: _emu,
        builder,
        tls,
    } = setup();
    let gw = builder.start_from_file(&dir.path().join("gateway.toml"));
    assert_eq!(pki.presented(tls).await, first);

    // Renewal: new files in place of the old ones.
    let (new_cert, new_key, second) = pki.leaf(dir.path(), "renewed");
    std::fs::rename(&new_cert, &cert).expect("cert");
    std::fs::rename(&new_key, &key).expect("key");
    assert_eq!(admin_reload(&gw.admin_url()).await, 200);
    assert_eq!(pki.presented(tls).await, second, "the renewed certificate");

    // A key that does not match: refused, and the renewed certificate stays in use.
    let (_, other_key, _) = pki.leaf(dir.path(), "other");
    std::fs::copy(&other_key, &key).expect("key");
    assert_eq!(admin_reload(&gw.admin_url()).await, 400);
    assert_eq!(pki.presented(tls).await, second);
    let client = pki.client(tls, false);
    let (status, _, _) = post_with(&client, tls, "alpha-key", &fixture("face.jpg")).await;
    assert_eq!(status, 200);
}

/// A renewal written in place, file by file, as certbot does, while `server.watch_config`
/// watches: the certificate alone does not match the old key, so that reload is refused and the
/// old pair stays in use; when the key follows, the renewed pair is presented. No signal, no
/// restart, no handshake without a certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewal_written_file_by_file_is_taken_when_whole() {
    let TlsSetup {
        dir,
        pki,
        cert,
        key,
        leaf: first,
        emu: _emu,
        builder,
        tls,
    } = setup();
    let builder = builder.set("server.watch_config", "true");
    let (gw, cfg) = GatewayProcess::start_named(&builder, dir.path(), "gw", &[]).await;
    let admin = format!("http://{}", cfg.admin_listen);
    assert_eq!(pki.presented(tls).await, first);

    let (new_cert, new_key, second) = pki.leaf(dir.path(), "renewed");
    std::fs::copy(&new_cert, &cert).expect("cert");
    let refused = r#"liveness_gateway_reloads_total{outcome="refused"}"#;
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while sample(&metrics_text(&admin).await, refused) < 1.0 {
        assert!(
            std::time::Instant::now() < until,
            "the half-written renewal was not noticed:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pki.presented(tls).await, first, "the old pair stays whole");

    std::fs::copy(&new_key, &key).expect("key");
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while pki.presented(tls).await != second {
        assert!(
            std::time::Instant::now() < until,
            "the whole renewal was not taken:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _, _) = post_with(
        &pki.client(tls, false),
        tls,
        "alpha-key",
        &fixture("face.jpg"),
    )
    .await;
    assert_eq!(status, 200);
}

/// When the presented chain stops working is exported, its first certificate to expire deciding
/// (an intermediate can go before the leaf). A chain within 14 days of it is warned about when
/// the gateway starts, by `check-config` (a warning: the config is valid), and at the reload that
/// installs it; a renewal moves the gauge.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_chain_expiry_is_exported_and_warned_about() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = TestPki::new();
    let emu = start_emulator();
    let (cert, key, soon) = pki.leaf_expiring(dir.path(), "leaf", 5, "");
    let (builder, tls) = tls_gateway(&emu, &cert, &key);
    let (gw, cfg) = GatewayProcess::start_named(&builder, dir.path(), "gw", &[]).await;
    let admin = format!("http://{}", cfg.admin_listen);
    const GAUGE: &str = "liveness_gateway_tls_certificate_expiry_timestamp_seconds";
    assert_eq!(sample(&metrics_text(&admin).await, GAUGE), soon as f64);
    let warnings = |needle: &str| {
        gw.log()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("server.tls") && l.contains(needle))
            .count()
    };
    assert_eq!(warnings("expires on"), 1, "{}", gw.log());

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_liveness-gateway"))
        .args(["check-config", "-c"])
        .arg(dir.path().join("gw.toml"))
        .env(ORG_KEY_ENV, ORG_KEY)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "a warning, not an error: {stdout}");
    assert!(
        stdout.contains("warning: server.tls") && stdout.contains("expires on"),
        "{stdout}"
    );

    // Renewed for 90 days, but the chain carries an intermediate that ends in 3.
    let (intermediate, ends) = pki.intermediate_expiring("liveness-gateway test intermediate", 3);
    let (c, k, _) = pki.leaf_expiring(dir.path(), "renewed", 90, &intermediate);
    std::fs::rename(&c, &cert).expect("cert");
    std::fs::rename(&k, &key).expect("key");
    assert_eq!(admin_reload(&admin).await, 200);
    assert_eq!(sample(&metrics_text(&admin).await, GAUGE), ends as f64);
    assert_eq!(warnings("test intermediate"), 1, "{}", gw.log());

    // A chain with nothing near its end: the gauge follows, and nothing more is said.
    let (c, k, far) = pki.leaf_expiring(dir.path(), "far", 90, "");
    std::fs::rename(&c, &cert).expect("cert");
    std::fs::rename(&k, &key).expect("key");
    assert_eq!(admin_reload(&admin).await, 200);
    assert_eq!(sample(&metrics_text(&admin).await, GAUGE), far as f64);
    assert_eq!(warnings("expire"), 2, "{}", gw.log());
    let (status, _, _) = post_with(
        &pki.client(tls, false),
        tls,
        "alpha-key",
        &fixture("face.jpg"),
    )
    .await;
    assert_eq!(status, 200);

    // A gateway without a TLS listener exports no expiry at all (an alert on it would fire).
    let plain = TestGateway::for_emulator(&emu).start();
    assert!(!metrics_text(&plain.admin_url()).await.contains(GAUGE));
}

/// `check-config` reads the certificate where it runs: a key of another certificate, a missing
/// file, and a file that is no PEM are named.
#[test]
fn check_config_refuses_a_key_that_does_not_match() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = TestPki::new();
    let (cert, _, _) = pki.leaf(dir.path(), "leaf");
    let (_, other_key, _) = pki.leaf(dir.path(), "other");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").expect("junk");
    for (c, k, want) in [
        (
            cert.clone(),
            other_key.clone(),
            "does not match the certificate",
        ),
        (
            dir.path().join("missing.pem"),
            other_key.clone(),
            "cannot read",
        ),
        (junk.clone(), other_key.clone(), "no certificate"),
    ] {
        let path = dir.path().join("gateway.toml");
        let text = format!(
            "[server.tls]\nlisten = \"127.0.0.1:8443\"\ncert_file = {:?}\nkey_file = {:?}\n[upstream]\nurl = \"http://127.0.0.1:8081\"\napi_key_env = \"K\"\n",
            c.display().to_string(),
            k.display().to_string()
        );
        std::fs::write(&path, text).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_liveness-gateway"))
            .args(["check-config", "-c"])
            .arg(&path)
            .env("K", "some-organization-key")
            .output()
            .expect("run");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{stdout}");
        assert!(
            stdout.contains("server.tls") && stdout.contains(want),
            "{want} not in {stdout}"
        );
    }
}

/// `server.h2c`: a load balancer speaking HTTP/2 with prior knowledge to the plain listener is
/// served over HTTP/2, and HTTP/1.1 clients on the same listener as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2c_on_the_plain_listener() {
    let emu = start_emulator();
    let gw = TestGateway::for_emulator(&emu)
        .set("server.h2c", "true")
        .start();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let base = fixture("face.jpg");
    let tasks = (0..10).map(|n| {
        let (h2, url, image) = (h2.clone(), gw.url(), variant(&base, n));
        tokio::spawn(async move {
            let r = h2
                .post(format!("{url}{ROUTE}"))
                .header("Authorization", "Bearer alpha-key")
                .header("Content-Type", multipart_ct())
                .body(multipart(&[Part::image("face.jpg", &image)]))
                .send()
                .await
                .expect("h2c");
            (r.status().as_u16(), r.version())
        })
    });
    for r in join_all(tasks).await {
        assert_eq!(r.expect("task"), (200, reqwest::Version::HTTP_2));
    }
    let h1 = post_image(&gw.url(), "alpha-key", "face.jpg", &base).await;
    assert_eq!(h1.status, 200);
    // Without the option, prior knowledge is not understood.
    let plain = TestGateway::for_emulator(&emu).start();
    let refused = h2
        .post(format!("{}{ROUTE}", plain.url()))
        .header("Authorization", "Bearer alpha-key")
        .send()
        .await;
    assert!(refused.is_err() || refused.is_ok_and(|r| r.version() != reqwest::Version::HTTP_2));
}

/// Over HTTP/2: a client that resets its stream in the middle of an upload costs nothing and
/// leaves nothing behind, and its connection goes on serving; a declared body over the limit is
/// refused before it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_resets_and_oversized_declarations_cost_nothing() {
    let TlsSetup {
        dir: _dir,
        pki,
        emu,
        builder,
        tls,
        ..
    } = setup();
    let gw = builder.start();
    let client = pki.client(tls, false);
    let url = format!("https://localhost:{}{ROUTE}", tls.port());
    let image = multipart(&[Part::image("face.jpg", &fixture("face-large.jpg"))]);

    // Half the upload, then the stream stalls and the client gives up: RST_STREAM.
    let half = bytes::Bytes::copy_from_slice(&image[..image.len() / 2]);
    let stalled = futures_util::stream::once(async move { Ok::<_, std::io::Error>(half) })
        .chain(futures_util::stream::pending());
    let send = client
        .post(&url)
        .header("Authorization", "Bearer alpha-key")
        .header("Content-Type", multipart_ct())
        .body(reqwest::Body::wrap_stream(stalled))
        .send();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), send)
            .await
            .is_err(),
        "the stalled upload was answered"
    );
    // The same connection goes on.
    let (status, version, _) = post_with(&client, tls, "alpha-key", &fixture("face.jpg")).await;
    assert_eq!((status, version), (200, reqwest::Version::HTTP_2));
    assert_eq!(emu.stats().calls, 1, "only the whole upload was sent on");
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics_text(&gw.admin_url()).await;
        if sample(&m, "liveness_gateway_inflight_requests") == 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the reset request is still in flight"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 10 MiB + 1 declared: refused at once, before a byte of it is read.
    let r = client
        .post(&url)
        .header("Authorization", "Bearer alpha-key")
        .header("Content-Type", multipart_ct())
        .header("Content-Length", (10 * 1024 * 1024 + 1).to_string())
        .body(reqwest::Body::wrap_stream(futures_util::stream::pending::<
            Result<bytes::Bytes, std::io::Error>,
        >()))
        .send();
    let r = tokio::time::timeout(Duration::from_secs(5), r)
        .await
        .expect("answered before the body")
        .expect("response");
    assert_eq!(r.status().as_u16(), 413);
    assert_eq!(json_code(&r.text().await.expect("body")), "body_too_large");
    assert_eq!(emu.stats().calls, 1);
}

/// TLS 1.1 and older are refused (TLS 1.2 and 1.3 only), whatever the client asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_tls_versions_are_refused() {
    let TlsSetup {
        dir: _dir,
        pki: _pki,
        emu: _emu,
        builder,
        tls,
        ..
    } = setup();
    let _gw = builder.start();
    let handshake = |version: &'static str| {
        let addr = tls.to_string();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new("openssl")
                    .args([
                        "s_client",
                        "-connect",
                        &addr,
                        version,
                        "-servername",
                        "localhost",
                    ])
                    // Security level 0: this client can offer the old versions, so a refusal
                    // is the server's.
                    .args(["-cipher", "DEFAULT@SECLEVEL=0"])
                    .stdin(std::process::Stdio::null())
                    .output()
                    .expect("openssl")
            })
            .await
            .expect("openssl")
        }
    };
    let ok = handshake("-tls1_2").await;
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("Protocol  : TLSv1.2")
            || String::from_utf8_lossy(&ok.stdout).contains("TLSv1.2"),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    for old in ["-tls1_1", "-tls1"] {
        let out = handshake(old).await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success() || text.contains("Cipher is (NONE)"),
            "{old} was accepted:\n{text}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("no protocols available"),
            "{old} could not even be offered:\n{err}"
        );
    }
}

/// TLS only: `server.listen = "none"` opens no plain listener; `check-config` refuses it
/// without `[server.tls]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_only_gateway_opens_no_plain_listener() {
    let TlsSetup {
        dir: _dir,
        pki,
        emu: _emu,
        builder,
        tls,
        ..
    } = setup();
    let plain: SocketAddr = builder.config().listen;
    let gw = builder.set("server.listen", "\"none\"");
    let cfg = gw.config();
    assert!(!cfg.plain_listener);
    let _running = gw.start();
    let client = pki.client(tls, false);
    let (status, _, _) = post_with(&client, tls, "alpha-key", &fixture("face.jpg")).await;
    assert_eq!(status, 200);
    assert!(
        tokio::net::TcpStream::connect(plain).await.is_err(),
        "a plain listener was opened"
    );
    let text = "[server]\nlisten = \"none\"\n[upstream]\nurl = \"http://127.0.0.1:8081\"\napi_key_env = \"K\"\n";
    let err = liveness_gateway::config::Config::from_toml(text, &|_| Some("k".into()))
        .expect_err("no listener at all");
    assert!(err.to_string().contains("add [server.tls]"), "{err}");
}

/// Over TLS, on HTTP/1.1 and HTTP/2, at trace level: the organization key appears in no answer
/// and no log line, in no form, provider faults and answers that echo it included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_organization_key_leaks_nowhere_over_tls() {
    use liveness_gateway_dev::emulator::{Escape, Fault};
    let TlsSetup {
        dir,
        pki,
        emu,
        builder,
        tls,
        ..
    } = setup();
    let builder = builder
        .set("server.log_format", "\"json\"")
        .set("upstream.total_timeout", "\"1s\"");
    let (gw, _) = GatewayProcess::start(&builder, dir.path(), &[("RUST_LOG", "trace")]).await;
    let mut seen = String::new();
    for http1 in [true, false] {
        let client = pki.client(tls, http1);
        emu.set_echo(
            if http1 {
                Escape::Serde
            } else {
                Escape::Unicode
            },
            None,
        );
        for fault in [
            Fault::None,
            Fault::EchoKey,
            Fault::EchoKeyVerdict,
            Fault::EchoKeyRefusal,
            Fault::EchoKeyText,
            Fault::EchoKeyHeader,
            Fault::NoSubscription,
            Fault::ServerError,
            Fault::Hang,
        ] {
            emu.set_fault(fault);
            let image = variant(&fixture("face.jpg"), u64::from(http1) * 100 + fault as u64);
            let r = client
                .post(format!("https://localhost:{}{ROUTE}", tls.port()))
                .header("Authorization", "Bearer alpha-key")
                .header("Content-Type", multipart_ct())
                .body(multipart(&[Part::image("face.jpg", &image)]))
                .send()
                .await
                .expect("request");
            for (k, v) in r.headers() {
                seen.push_str(&format!("{k}: {v:?}\n"));
            }
            seen.push_str(&r.text().await.expect("body"));
        }
    }
    emu.set_fault(Fault::None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = format!(
        "{}{}",
        gw.log(),
        std::fs::read_to_string(&gw.stderr).unwrap_or_default()
    );
    assert!(
        logs.contains("\"target\":\"access\""),
        "the access lines were written"
    );
    for (what, text) in [("answers", &seen), ("logs", &logs)] {
        assert!(
            !holds_secret(text, ORG_KEY),
            "the organization key is in the {what}"
        );
        assert!(
            !holds_secret(text, "alpha-key"),
            "a tenant key is in the {what}"
        );
    }
}

/// A client asking for another name (SNI) gets the configured certificate all the same: one
/// certificate, whatever the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_sni_name_gets_the_configured_certificate() {
    let TlsSetup {
        dir: _dir,
        cert,
        emu: _emu,
        builder,
        tls,
        ..
    } = setup();
    let _gw = builder.start();
    let addr = tls.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &addr,
                "-servername",
                "other.example",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl")
    })
    .await
    .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    let pem = std::fs::read_to_string(&cert).expect("cert");
    let ours: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let shown: String = text
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)
        .and_then(|rest| rest.split("-----END CERTIFICATE-----").next())
        .expect("a certificate was shown")
        .lines()
        .collect();
    assert_eq!(shown, ours);
}

/// `Expect: 100-continue` over TLS: the gateway says continue once the credential and the size
/// pass, and a body it would refuse is refused before it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_over_tls() {
    use tokio::io::AsyncWriteExt;
    use tokio_rustls::rustls;
    let TlsSetup {
        dir: _dir,
        pki,
        emu: _emu,
        builder,
        tls,
        ..
    } = setup();
    let _gw = builder.start();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).expect("root");
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(tls).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        connector.connect(name, tcp).await.expect("handshake")
    };
    let body = multipart(&[Part::image("face.jpg", &fixture("face.jpg"))]);
    let head = |key: &str, length: usize| {
        format!(
            "POST {ROUTE} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nContent-Type: {}\r\nContent-Length: {length}\r\nExpect: 100-continue\r\n\r\n",
            multipart_ct()
        )
    };
    // A good credential: 100 Continue, then the verdict.
    let mut s = connect().await;
    s.write_all(head("alpha-key", body.len()).as_bytes())
        .await
        .expect("head");
    let interim = read_some(&mut s).await;
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    s.write_all(&body).await.expect("body");
    let mut answer = String::new();
    while !answer.contains("\"result\"") {
        answer.push_str(&read_some(&mut s).await);
    }
    assert!(answer.contains("HTTP/1.1 200"), "{answer}");
    // A wrong credential: refused at once, the body never sent.
    let mut s = connect().await;
    s.write_all(head("wrong-key", body.len()).as_bytes())
        .await
        .expect("head");
    let refused = read_some(&mut s).await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
}

/// What one read of a TLS stream brings, within 5 s.
async fn read_some(s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer")
        .expect("read");
    String::from_utf8_lossy(&buf[..n]).to_string()
}
