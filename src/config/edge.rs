//! The edge settings of `[server]` as plain values: each listener's deadlines and caps, the
//! proxies whose forwarding header is believed, and HTTP/2's flow-control windows.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

/// The edge settings of one listener, from `[server]`.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeConfig {
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub trusted_proxies: TrustedProxies,
    /// The header in which the trusted proxies name the client.
    pub forwarded_header: ForwardedHeader,
    /// HTTP/2 with prior knowledge is accepted (`server.h2c`): its preface is not a slow head.
    pub h2c: bool,
    /// Most streams in flight on one HTTP/2 connection (`server.h2_max_streams`).
    pub h2_max_streams: u32,
}

/// Networks whose connections are proxies the operator runs (`server.trusted_proxies`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parse addresses and networks (`10.0.0.0/8`, `192.0.2.7`, `::1`), or say which is bad.
    pub fn parse(items: &[String]) -> Result<TrustedProxies, String> {
        items
            .iter()
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{s:?} is not an address or a network like 10.0.0.0/8"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // IPv4 peers on a dual-stack socket arrive as `::ffff:a.b.c.d`.
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// Which header the trusted proxies write the client's address into
/// (`server.forwarded_header`). Only that one is read: a client can send the other one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    #[default]
    XForwardedFor,
    /// RFC 7239: `Forwarded: for=192.0.2.60;proto=https, for="[2001:db8::17]:4711"`.
    Forwarded,
}

impl ForwardedHeader {
    pub fn name(self) -> &'static str {
        match self {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        }
    }
}

/// HTTP/2 flow-control windows: how much of an upload a client may send before the gateway
/// reads it. With the protocol's 64 KiB (Pingora's default), a 68 KB photo waited a round trip
/// for a WINDOW_UPDATE, and four uploads on one connection shared 64 KiB: measured with
/// benches/load/tls.sh, cache-miss throughput over HTTP/2 was 0.69x nginx's, over HTTP/1.1
/// 0.94x. The connection window bounds what one connection can make the gateway hold unread
/// (bodies of streams not yet authenticated sit there), so the memory bound counts it. The stream
/// window goes out in the SETTINGS, which OkHttp 3 uses before acknowledging them: the edge
/// follows each connection to that acknowledgement (`edge::stream::FrameScan`).
pub const H2_STREAM_WINDOW: u32 = 256 * 1024;
pub const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// What one HTTP/2 stream may have queued for a client and not yet sent (the `h2` crate's
/// default is 400 KiB): an answer's tail, sent after its request has ended.
pub const H2_SEND_BUFFER: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_proxies_are_addresses_or_networks() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".into(), "192.0.2.7".into()]).expect("ok");
        for (ip, trusted) in [
            ("10.1.2.3", true),
            ("::ffff:10.1.2.3", true),
            ("192.0.2.7", true),
            ("192.0.2.8", false),
        ] {
            assert_eq!(t.contains(ip.parse().expect("ip")), trusted, "{ip}");
        }
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TrustedProxies::parse(&["nowhere".into()]).is_err());
    }
}
