//! A bare Pingora pass-through proxy to one upstream: no checks, no log, no metrics, the body
//! streamed as it arrives. The load harness runs it next to nginx and the gateway, so the table
//! shows how much of the gateway's cost is Pingora's own.
//!
//!     cargo run --release --example pingora_floor -- 127.0.0.1:LISTEN 127.0.0.1:UPSTREAM
use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Pass(String);

#[async_trait]
impl ProxyHttp for Pass {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.0.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().expect("listen");
    let upstream = args.next().expect("upstream");
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
    let mut svc = pingora::proxy::http_proxy_service(&server.configuration, Pass(upstream));
    svc.add_tcp(&listen);
    server.add_service(svc);
    server.run_forever();
}
