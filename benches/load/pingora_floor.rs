//! A bare Pingora pass-through proxy to one upstream: no checks, no log, no metrics, the body
//! streamed as it arrives. The load harnesses run it next to nginx and the gateway, so their
//! tables show how much of the gateway's cost is Pingora's own.
//!
//!     cargo run --release --example pingora_floor -- 127.0.0.1:LISTEN 127.0.0.1:UPSTREAM \
//!         [--tls CERT KEY] [--redis URL TRIPS]
//!
//! `--tls` listens with TLS instead (HTTP/2 offered through ALPN), with the gateway's read
//! buffer and HTTP/2 windows. `--redis` makes TRIPS round trips to Redis (`PING`, through the
//! gateway's client, redis-rs' connection manager) before each request goes upstream: the
//! least a proxy that consults a shared store per request can pay for it (benches/README.md,
//! "Fleet mode").
use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

#[path = "floor_service.rs"]
mod floor_service;

struct Pass {
    upstream: String,
    redis: Option<(redis::Client, u32)>,
    conn: OnceCell<ConnectionManager>,
}

#[async_trait]
impl ProxyHttp for Pass {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn request_filter(&self, _s: &mut Session, _c: &mut ()) -> Result<bool> {
        let Some((client, trips)) = &self.redis else {
            return Ok(false);
        };
        let redis_err =
            |e: redis::RedisError| Error::explain(ErrorType::InternalError, e.to_string());
        let mut conn = self
            .conn
            .get_or_try_init(|| ConnectionManager::new(client.clone()))
            .await
            .map_err(redis_err)?
            .clone();
        for _ in 0..*trips {
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map_err(redis_err)?;
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().expect("listen");
    let upstream = args.next().expect("upstream");
    let (mut tls, mut redis) = (None, None);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--tls" => tls = Some((args.next().expect("cert"), args.next().expect("key"))),
            "--redis" => {
                let client = redis::Client::open(args.next().expect("url")).expect("redis url");
                let trips = args.next().expect("trips").parse().expect("trips");
                redis = Some((client, trips));
            }
            other => panic!("unknown option {other}"),
        }
    }
    // A short grace period: the harness stops it with SIGTERM, and Pingora's default (300 s)
    // held `make load` for about 5 minutes at its end.
    let conf = ServerConf {
        threads: 2,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let pass = Pass {
        upstream,
        redis,
        conn: OnceCell::new(),
    };
    let svc = floor_service::proxy_service(&server, "floor", pass, &listen, tls);
    server.add_service(svc);
    server.run_forever();
}
