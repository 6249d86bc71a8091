//! The server side of an HTTP/1 proxy alone: each mode reads the whole upload and answers a
//! fixed JSON, with no upstream. `pingora` goes through `ProxyHttp::request_filter` like the
//! gateway; `hyper` through hyper's HTTP/1 server on a 2-worker tokio runtime. It measures how
//! much of a request's CPU is the HTTP server itself (see benches/README.md).
//!
//!     cargo run --release --example responder_floor -- pingora 127.0.0.1:LISTEN [CERT KEY]
//!     cargo run --release --example responder_floor -- hyper 127.0.0.1:LISTEN
//!
//! With a certificate and key, the Pingora mode listens with TLS (HTTP/2 offered through
//! ALPN) and the gateway's read buffer and HTTP/2 windows: the floor of a cache hit over TLS.
use async_trait::async_trait;
use bytes::Bytes;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

#[path = "floor_service.rs"]
mod floor_service;

const ANSWER: &[u8] = br#"{"backend_session_id": "8c1d2e3f-1c2d-4e5f-8a9b-0c1d2e3f4a5b", "result": true, "prediction": "0.912345", "created_at": "2026-11-25T10:00:00.000Z", "failure_reason": null}"#;

struct Respond;

#[async_trait]
impl ProxyHttp for Respond {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn request_filter(&self, s: &mut Session, _c: &mut ()) -> Result<bool> {
        let mut n = 0;
        while let Some(chunk) = s.read_request_body().await? {
            n += chunk.len();
        }
        std::hint::black_box(n);
        let mut h = pingora::http::ResponseHeader::build(200, Some(2))?;
        h.insert_header("content-type", "application/json")?;
        h.insert_header("content-length", ANSWER.len().to_string())?;
        s.write_response_header(Box::new(h), false).await?;
        s.write_response_body(Some(Bytes::from_static(ANSWER)), true)
            .await?;
        Ok(true)
    }
    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Error::e_explain(ErrorType::InternalError, "no upstream")
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().expect("mode");
    let listen = args.next().expect("listen");
    if mode == "pingora" {
        let conf = ServerConf {
            threads: 2,
            ..Default::default()
        };
        let mut server = Server::new_with_opt_and_conf(None, conf);
        server.bootstrap();
        let tls = args.next().zip(args.next());
        let svc = floor_service::proxy_service(&server, "responder", Respond, &listen, tls);
        server.add_service(svc);
        server.run_forever();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(&listen).await.expect("bind");
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        use http_body_util::BodyExt;
                        let b = req.into_body().collect().await?.to_bytes();
                        std::hint::black_box(b.len());
                        Ok::<_, hyper::Error>(
                            http::Response::builder()
                                .header("content-type", "application/json")
                                .body(http_body_util::Full::new(Bytes::from_static(ANSWER)))
                                .expect("response"),
                        )
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}
