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

/// `X-Real-IP` toward upstreams.
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// `X-Forwarded-Proto` toward upstreams.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-For` (read from trusted proxies, sent upstream).
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `Forwarded` (RFC 7239, read from trusted proxies, sent upstream).
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// An address as text, written without `fmt` for IPv4 (this runs for every request).
struct IpText {
    buf: [u8; 45],
    len: usize,
}

impl IpText {
    fn new(ip: IpAddr) -> Self {
        let mut t = Self {
            buf: [0; 45],
            len: 0,
        };
        match ip {
            IpAddr::V4(v4) => {
                for (i, o) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        t.push(b'.');
                    }
                    if o >= 100 {
                        t.push(b'0' + o / 100);
                    }
                    if o >= 10 {
                        t.push(b'0' + o / 10 % 10);
                    }
                    t.push(b'0' + o % 10);
                }
            }
            IpAddr::V6(v6) => {
                use std::io::Write;
                // 45 bytes hold the longest IPv6 text.
                let mut w = &mut t.buf[..];
                let _ = write!(w, "{v6}");
                t.len = 45 - w.len();
            }
        }
        t
    }

    fn push(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

/// A header value from bytes assembled for it, without copying them again.
fn value(bytes: Vec<u8>) -> HeaderValue {
    // Addresses and the fixed words are always valid header bytes, and so are the values
    // of a trusted proxy's headers joined with them.
    HeaderValue::from_maybe_shared(bytes::Bytes::from(bytes))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Appends every value of `name` in `headers` and `", "` to `out`. False when absent.
fn push_joined(out: &mut Vec<u8>, headers: &http::HeaderMap, name: &HeaderName) -> bool {
    let mut any = false;
    for v in headers.get_all(name) {
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b", ");
        any = true;
    }
    any
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
    let proto: &[u8] = if tls { b"https" } else { b"http" };
    let ip = IpText::new(peer);
    let ip = ip.as_bytes();

    let mut xff = Vec::with_capacity(ip.len());
    if from_trusted {
        push_joined(&mut xff, headers, &X_FORWARDED_FOR);
    }
    xff.extend_from_slice(ip);

    let mut forwarded = Vec::with_capacity(ip.len() + 24);
    if from_trusted {
        push_joined(&mut forwarded, headers, &FORWARDED);
    }
    match peer {
        IpAddr::V6(_) => {
            forwarded.extend_from_slice(b"for=\"[");
            forwarded.extend_from_slice(ip);
            forwarded.extend_from_slice(b"]\";proto=");
        }
        IpAddr::V4(_) => {
            forwarded.extend_from_slice(b"for=");
            forwarded.extend_from_slice(ip);
            forwarded.extend_from_slice(b";proto=");
        }
    }
    forwarded.extend_from_slice(proto);

    let real_ip = if client == peer {
        value(ip.to_vec())
    } else {
        value(IpText::new(client).as_bytes().to_vec())
    };
    [
        (X_FORWARDED_FOR, value(xff)),
        (X_REAL_IP, real_ip),
        (
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if tls { "https" } else { "http" }),
        ),
        (FORWARDED, value(forwarded)),
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
    fn addresses_are_written_like_display() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "255.255.255.255",
            "192.0.2.1",
            "2001:db8::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
            "1:2:3:4:5:6:7:8",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(IpText::new(ip).as_bytes(), ip.to_string().as_bytes());
        }
    }

    #[test]
    fn a_trusted_proxys_headers_are_extended() {
        let nets = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let mut hdr = h("198.51.100.7");
        hdr.append("x-forwarded-for", "192.0.2.1".parse().unwrap());
        hdr.insert("forwarded", "for=198.51.100.7".parse().unwrap());
        let client = real_client(peer, &hdr, &nets);
        let out = upstream_headers(peer, client, &hdr, &nets, false);
        assert_eq!(out[0].1, "198.51.100.7, 192.0.2.1, 10.0.0.2");
        assert_eq!(out[1].1, "192.0.2.1");
        assert_eq!(out[3].1, "for=198.51.100.7, for=10.0.0.2;proto=http");
        // A long chain is kept whole.
        let long = vec!["203.0.113.1"; 40].join(", ");
        let out = upstream_headers(peer, client, &h(&long), &nets, false);
        assert_eq!(out[0].1.to_str().unwrap(), format!("{long}, 10.0.0.2"));
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
