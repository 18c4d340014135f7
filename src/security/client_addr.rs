//! The real client address and the forwarding headers sent upstream. Incoming forwarding
//! headers are believed only from `trusted_proxies`; from anyone else they are replaced.

use ipnet::IpNet;
use std::net::IpAddr;

/// Forwarding headers a client might send; never passed upstream as received.
pub const FORWARDING_HEADERS: [&str; 5] = [
    "x-forwarded-for",
    "x-real-ip",
    "forwarded",
    "x-forwarded-proto",
    "x-forwarded-host",
];

fn trusted(ip: IpAddr, nets: &[IpNet]) -> bool {
    let ip = canonical(ip);
    nets.iter().any(|n| n.contains(&ip))
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the right-most
/// address of `X-Forwarded-For` that is not itself a trusted proxy (then `X-Real-IP`).
pub fn real_client(peer: IpAddr, headers: &http::HeaderMap, nets: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    if !trusted(peer, nets) {
        return peer;
    }
    let chain: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse::<IpAddr>().ok())
        .collect();
    if let Some(ip) = chain.iter().rev().find(|ip| !trusted(**ip, nets)) {
        return canonical(*ip);
    }
    if let Some(ip) = chain.first() {
        return canonical(*ip);
    }
    headers
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<IpAddr>().ok())
        .map(canonical)
        .unwrap_or(peer)
}

/// `X-Forwarded-For`, `X-Real-IP`, `X-Forwarded-Proto` and `Forwarded` values to send upstream.
pub fn upstream_headers(
    peer: IpAddr,
    client: IpAddr,
    headers: &http::HeaderMap,
    nets: &[IpNet],
    tls: bool,
) -> [(&'static str, String); 4] {
    let peer = canonical(peer);
    let from_trusted = trusted(peer, nets);
    let joined = |name: &str| -> Option<String> {
        let parts: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    };
    let xff = match joined("x-forwarded-for").filter(|_| from_trusted) {
        Some(prev) => format!("{prev}, {peer}"),
        None => peer.to_string(),
    };
    let proto = if tls { "https" } else { "http" };
    let node = match peer {
        IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto={proto}"),
        IpAddr::V4(v4) => format!("for={v4};proto={proto}"),
    };
    let forwarded = match joined("forwarded").filter(|_| from_trusted) {
        Some(prev) => format!("{prev}, {node}"),
        None => node,
    };
    [
        ("x-forwarded-for", xff),
        ("x-real-ip", client.to_string()),
        ("x-forwarded-proto", proto.to_string()),
        ("forwarded", forwarded),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(xff: &str) -> http::HeaderMap {
        let mut m = http::HeaderMap::new();
        m.insert("x-forwarded-for", xff.parse().unwrap());
        m
    }

    #[test]
    fn untrusted_peer_headers_are_ignored() {
        let nets = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(real_client(peer, &h("1.2.3.4"), &nets), peer);
        let out = upstream_headers(peer, peer, &h("1.2.3.4"), &nets, false);
        assert_eq!(out[0].1, "203.0.113.9");
        assert_eq!(out[3].1, "for=203.0.113.9;proto=http");
    }

    #[test]
    fn trusted_peer_chain_is_walked_from_the_right() {
        let nets = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let hdr = h("198.51.100.7, 192.0.2.1, 10.0.0.1");
        let client = real_client(peer, &hdr, &nets);
        assert_eq!(client, "192.0.2.1".parse::<IpAddr>().unwrap());
        let out = upstream_headers(peer, client, &hdr, &nets, true);
        assert_eq!(out[0].1, "198.51.100.7, 192.0.2.1, 10.0.0.1, 10.0.0.2");
        assert_eq!(out[1].1, "192.0.2.1");
        assert_eq!(out[2].1, "https");
    }

    #[test]
    fn mapped_v6_peer_is_v4() {
        let nets = vec!["127.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(
            real_client(peer, &h("192.0.2.5"), &nets),
            "192.0.2.5".parse::<IpAddr>().unwrap()
        );
    }
}
