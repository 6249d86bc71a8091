//! What the floor programs share: Pingora's proxy service with the gateway's HTTP/2 windows
//! (src/server.rs), so that both pay the same for an upload, listening with TLS (HTTP/2 offered
//! through ALPN, the gateway's 16 KiB read buffer under it) when given a certificate and key.
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::ListenerConfig;
use pingora::prelude::*;
use pingora::protocols::l4::stream::{L4BufferSettings, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora::proxy::HttpProxy;
use pingora::services::listening::Service;

pub fn proxy_service<SV>(
    server: &Server,
    name: &str,
    app: SV,
    listen: &str,
    tls: Option<(String, String)>,
) -> Service<HttpProxy<SV>>
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    let mut proxy = pingora::proxy::http_proxy(&server.configuration, app);
    let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
    h2.initial_window_size(256 * 1024);
    h2.initial_connection_window_size(1024 * 1024);
    proxy.h2_options = Some(h2);
    let mut svc = Service::new(name.to_string(), proxy);
    match tls {
        Some((cert, key)) => {
            let mut settings = TlsSettings::intermediate(&cert, &key).expect("certificate");
            settings.enable_h2();
            svc.add_listener(ListenerConfig::tcp(listen).tls(settings).l4_buffer(
                L4BufferSettings::new(16 * 1024, DEFAULT_L4_WRITE_BUFFER_SIZE),
            ));
        }
        None => svc.add_tcp(listen),
    }
    svc
}
