//! The real client address and the forwarding headers sent upstream. Incoming forwarding
//! headers are believed only from `trusted_proxies`; from anyone else they are replaced.

use http::{HeaderName, HeaderValue};
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

/// `X-Forwarded-For` toward upstreams.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Real-IP` toward upstreams.
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// `X-Forwarded-Proto` toward upstreams.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `Forwarded` (RFC 7239) toward upstreams.
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// A header value formatted on the stack (this runs for every request; one allocation per
/// value instead of a `String` and a copy).
fn value(args: std::fmt::Arguments<'_>) -> HeaderValue {
    struct Buf([u8; 96], usize);
    impl std::fmt::Write for Buf {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let end = self.1 + s.len();
            let dst = self.0.get_mut(self.1..end).ok_or(std::fmt::Error)?;
            dst.copy_from_slice(s.as_bytes());
            self.1 = end;
            Ok(())
        }
    }
    let mut b = Buf([0; 96], 0);
    let text = if std::fmt::write(&mut b, args).is_ok() {
        HeaderValue::from_bytes(&b.0[..b.1])
    } else {
        HeaderValue::from_str(&args.to_string())
    };
    // Addresses and the fixed words are always valid header bytes.
    text.unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// `X-Forwarded-For`, `X-Real-IP`, `X-Forwarded-Proto` and `Forwarded` values to send upstream.
pub fn upstream_headers(
    peer: IpAddr,
    client: IpAddr,
    headers: &http::HeaderMap,
    nets: &[IpNet],
    tls: bool,
) -> [(HeaderName, HeaderValue); 4] {
    let peer = canonical(peer);
    let from_trusted = trusted(peer, nets);
    let joined = |name: &HeaderName| -> Option<String> {
        if !headers.contains_key(name) {
            return None;
        }
        let parts: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    };
    let prev_xff = if from_trusted {
        joined(&X_FORWARDED_FOR)
    } else {
        None
    };
    let xff = match prev_xff {
        Some(prev) => value(format_args!("{prev}, {peer}")),
        None => value(format_args!("{peer}")),
    };
    let proto = if tls { "https" } else { "http" };
    let prev_fwd = if from_trusted {
        joined(&FORWARDED)
    } else {
        None
    };
    let forwarded = match (peer, prev_fwd) {
        (IpAddr::V6(v6), Some(prev)) => value(format_args!("{prev}, for=\"[{v6}]\";proto={proto}")),
        (IpAddr::V6(v6), None) => value(format_args!("for=\"[{v6}]\";proto={proto}")),
        (IpAddr::V4(v4), Some(prev)) => value(format_args!("{prev}, for={v4};proto={proto}")),
        (IpAddr::V4(v4), None) => value(format_args!("for={v4};proto={proto}")),
    };
    [
        (X_FORWARDED_FOR, xff),
        (X_REAL_IP, value(format_args!("{client}"))),
        (X_FORWARDED_PROTO, HeaderValue::from_static(proto)),
        (FORWARDED, forwarded),
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
        let v6 = upstream_headers("2001:db8::1".parse().unwrap(), peer, &h("x"), &nets, false);
        assert_eq!(v6[3].1, "for=\"[2001:db8::1]\";proto=http");
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
