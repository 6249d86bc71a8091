//! Who the client is: the peer address, or, when the peer is a trusted proxy (a load balancer),
//! the address it names in `X-Forwarded-For`. Never the header of an untrusted peer: anyone
//! can write one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

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
        let ip = canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client's address: the peer's, unless the peer is trusted and `X-Forwarded-For`
    /// names one; then the rightmost address in it that is not a trusted proxy itself (each
    /// proxy appends the address it received from, so the entries left of an untrusted one
    /// could have been written by anyone).
    pub fn client_address(&self, peer: Option<IpAddr>, forwarded_for: &[&str]) -> Option<IpAddr> {
        let peer = peer.map(canonical)?;
        if !self.contains(peer) {
            return Some(peer);
        }
        let mut client = peer;
        for entry in forwarded_for
            .iter()
            .rev()
            .flat_map(|h| h.rsplit(','))
            .map(str::trim)
        {
            match entry.parse::<IpAddr>() {
                Ok(ip) => {
                    client = canonical(ip);
                    if !self.contains(client) {
                        break;
                    }
                }
                // A malformed entry ends what can be believed.
                Err(_) => break,
            }
        }
        Some(client)
    }
}

/// Requests in flight per client address, for clients behind trusted proxies: the proxy's one
/// address carries them all, so the per-address connection cap cannot tell them apart.
#[derive(Default)]
pub struct ClientSlots {
    in_flight: Mutex<HashMap<IpAddr, usize>>,
}

/// One request in flight from a client; its place is given back when dropped.
pub struct ClientSlot {
    slots: Arc<ClientSlots>,
    ip: IpAddr,
}

impl ClientSlots {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for one more request from `ip`, unless it has `cap` in flight already.
    pub fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<ClientSlot> {
        let mut m = self.lock();
        let n = m.entry(ip).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            slots: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut m = self.slots.lock();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
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
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    ctx.client = edge.trusted_proxies.client_address(peer, &forwarded);
    let behind_proxy = peer.is_some_and(|p| edge.trusted_proxies.contains(p));
    if let (true, Some(client)) = (behind_proxy || session.is_http2(), ctx.client) {
        ctx.client_slot = Some(
            state
                .client_slots
                .take(client, edge.max_connections_per_ip)
                .ok_or(crate::error::GatewayError::TooManyConnections)?,
        );
    }
    Ok(())
}

/// IPv4 peers on a dual-stack socket arrive as `::ffff:a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".into(), "192.0.2.7".into()]).expect("ok");
        // An untrusted peer's header is ignored.
        assert_eq!(
            t.client_address(Some(ip("203.0.113.5")), &["198.51.100.1"]),
            Some(ip("203.0.113.5"))
        );
        // Through two trusted proxies: the rightmost untrusted entry.
        assert_eq!(
            t.client_address(
                Some(ip("10.1.2.3")),
                &["6.6.6.6, 198.51.100.1", "192.0.2.7"]
            ),
            Some(ip("198.51.100.1"))
        );
        // A trusted proxy without the header: the proxy itself.
        assert_eq!(
            t.client_address(Some(ip("10.1.2.3")), &[]),
            Some(ip("10.1.2.3"))
        );
        assert_eq!(
            t.client_address(Some(ip("::ffff:10.1.2.3")), &["198.51.100.9"]),
            Some(ip("198.51.100.9"))
        );
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TrustedProxies::parse(&["nowhere".into()]).is_err());
    }
}
