//! Who the client is: the peer address, or, when the peer is a trusted proxy (a load balancer),
//! the address it names in `X-Forwarded-For` (or `Forwarded`, as configured). Never the header
//! of an untrusted peer: anyone can write one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::{ForwardedHeader, TrustedProxies};

/// The client's address: the peer's, unless the peer is a trusted proxy and its forwarding
/// header (`values`, the header's fields in order, of the kind `header`) names one; then the
/// rightmost address in it that is not a trusted proxy itself (each proxy appends the address it
/// received from, so the entries left of an untrusted one could have been written by anyone).
pub fn client_address(
    trusted: &TrustedProxies,
    peer: Option<IpAddr>,
    header: ForwardedHeader,
    values: &[&str],
) -> Option<IpAddr> {
    let peer = peer.map(canonical)?;
    if !trusted.contains(peer) {
        return Some(peer);
    }
    let mut client = peer;
    for entry in values.iter().rev().flat_map(|h| h.rsplit(',')) {
        let address = match header {
            ForwardedHeader::XForwardedFor => node_address(entry),
            ForwardedHeader::Forwarded => forwarded_for(entry),
        };
        match address {
            Some(ip) => {
                client = canonical(ip);
                if !trusted.contains(client) {
                    break;
                }
            }
            // A malformed or hidden entry (`unknown`, `_obfuscated`) ends what can be believed.
            None => break,
        }
    }
    Some(client)
}

/// The address of one node as proxies write it (hand-written: the RFC 7239 parsers on crates.io
/// are small and unmaintained, and none takes X-Forwarded-For's forms): `192.0.2.7`, `192.0.2.7:51234`, `2001:db8::7`,
/// `[2001:db8::7]`, `[2001:db8::7]:4711` (a port, obfuscated or not, is dropped), quoted or not.
fn node_address(entry: &str) -> Option<IpAddr> {
    let node = entry.trim().trim_matches('"');
    let port_ok = |port: &str| !port.is_empty() && !port.contains(':');
    if let Some(rest) = node.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(port_ok)) {
            return None;
        }
        return ip.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    let (ip, port) = node.split_once(':')?;
    port_ok(port)
        .then(|| ip.parse::<Ipv4Addr>().ok().map(IpAddr::V4))
        .flatten()
}

/// The `for` node of one `Forwarded` element (`for=…;proto=…;by=…`).
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then(|| node_address(value))
            .flatten()
    })
}

/// Record who the client is, and hold its place among its requests in flight
/// (`server.max_connections_per_ip`) when its connection does not already stand for one: behind
/// a trusted proxy (the client is the one `X-Forwarded-For` names), and over HTTP/2 (streams
/// share a connection). Past the cap: `429 too_many_connections`.
pub fn admit_request(
    state: &crate::state::AppState,
    session: &pingora::proxy::Session,
    ctx: &mut crate::state::RequestCtx,
) -> Result<(), crate::error::GatewayError> {
    let rt = state.runtime();
    let edge = &rt.config.edge;
    let peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    let forwarded: Vec<&str> = session
        .req_header()
        .headers
        .get_all(edge.forwarded_header.name())
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    ctx.caller.client = client_address(
        &edge.trusted_proxies,
        peer,
        edge.forwarded_header,
        &forwarded,
    );
    let behind_proxy = peer_is_trusted(edge, session);
    if let (true, Some(client)) = (behind_proxy || session.is_http2(), ctx.caller.client) {
        ctx.caller.client_slot = Some(
            state
                .client_slots
                .take(client, edge.max_connections_per_ip)
                .ok_or(crate::error::GatewayError::TooManyConnections)?,
        );
    }
    Ok(())
}

/// Whether the connection's peer is one of `server.trusted_proxies` (its headers about the
/// client are believed).
pub fn peer_is_trusted(
    edge: &crate::config::EdgeConfig,
    session: &pingora::proxy::Session,
) -> bool {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .is_some_and(|a| edge.trusted_proxies.contains(a.ip()))
}

/// IPv4 peers on a dual-stack socket arrive as `::ffff:a.b.c.d`.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XFF: ForwardedHeader = ForwardedHeader::XForwardedFor;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".into(), "192.0.2.7".into()]).expect("ok");
        // An untrusted peer's header is ignored.
        assert_eq!(
            client_address(&t, Some(ip("203.0.113.5")), XFF, &["198.51.100.1"]),
            Some(ip("203.0.113.5"))
        );
        // Through two trusted proxies: the rightmost untrusted entry.
        assert_eq!(
            client_address(
                &t,
                Some(ip("10.1.2.3")),
                XFF,
                &["6.6.6.6, 198.51.100.1", "192.0.2.7"]
            ),
            Some(ip("198.51.100.1"))
        );
        // A trusted proxy without the header: the proxy itself.
        assert_eq!(
            client_address(&t, Some(ip("10.1.2.3")), XFF, &[]),
            Some(ip("10.1.2.3"))
        );
        assert_eq!(
            client_address(&t, Some(ip("::ffff:10.1.2.3")), XFF, &["198.51.100.9"]),
            Some(ip("198.51.100.9"))
        );
    }

    #[test]
    fn forwarded_entries_with_ports_and_brackets_name_their_address() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".into()]).expect("ok");
        let from_proxy =
            |header, values: &[&str]| client_address(&t, Some(ip("10.0.0.1")), header, values);
        for (entry, want) in [
            ("203.0.113.7:51234", "203.0.113.7"),
            (" 203.0.113.7 ", "203.0.113.7"),
            ("[2001:db8::7]:4711", "2001:db8::7"),
            ("[2001:db8::7]", "2001:db8::7"),
            ("2001:db8::7", "2001:db8::7"),
            ("\"[2001:db8::7]:4711\"", "2001:db8::7"),
            ("[::ffff:203.0.113.7]:80", "203.0.113.7"),
        ] {
            assert_eq!(from_proxy(XFF, &[entry]), Some(ip(want)), "{entry}");
        }
        // The rightmost untrusted entry, ports or not; a trusted hop with a port is skipped.
        assert_eq!(
            from_proxy(XFF, &["198.51.100.1:1, 203.0.113.9:2, 10.0.0.9:3"]),
            Some(ip("203.0.113.9"))
        );
        // A malformed entry stops the walk at the hop that wrote it.
        for bad in [
            "[2001:db8::7",
            "[2001:db8::7]x",
            "203.0.113.7:1:2",
            "unknown",
            "",
        ] {
            assert_eq!(from_proxy(XFF, &[bad]), Some(ip("10.0.0.1")), "{bad:?}");
        }
        let fwd = ForwardedHeader::Forwarded;
        assert_eq!(
            from_proxy(fwd, &["for=192.0.2.60;proto=http;by=203.0.113.43"]),
            Some(ip("192.0.2.60"))
        );
        assert_eq!(
            from_proxy(
                fwd,
                &["for=198.51.100.1, For=\"[2001:db8:cafe::17]:4711\";proto=https"]
            ),
            Some(ip("2001:db8:cafe::17"))
        );
        assert_eq!(
            from_proxy(fwd, &["for=203.0.113.5:_hidden", "for=10.1.1.1"]),
            Some(ip("203.0.113.5"))
        );
        // Hidden or missing `for`: nothing past the proxy is believed.
        for bad in [
            "for=unknown",
            "for=_mK9sQ",
            "proto=https",
            "by=203.0.113.43",
        ] {
            assert_eq!(from_proxy(fwd, &[bad]), Some(ip("10.0.0.1")), "{bad}");
        }
        // Each kind reads its own header only.
        assert_eq!(from_proxy(XFF, &["for=192.0.2.60"]), Some(ip("10.0.0.1")));
    }
}
