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

/// A header value assembled on the stack: this runs for every request, so addresses are
/// written without `fmt` and each value costs one allocation.
struct ValueBuf {
    bytes: [u8; 160],
    len: usize,
    /// Where the value moves when it outgrows the stack (a long trusted chain).
    spilled: Option<Vec<u8>>,
}

impl ValueBuf {
    fn new() -> Self {
        Self {
            bytes: [0; 160],
            len: 0,
            spilled: None,
        }
    }

    fn push(&mut self, s: &[u8]) -> &mut Self {
        if let Some(v) = self.spilled.as_mut() {
            v.extend_from_slice(s);
        } else if let Some(dst) = self.bytes.get_mut(self.len..self.len + s.len()) {
            dst.copy_from_slice(s);
            self.len += s.len();
        } else {
            let mut v = Vec::with_capacity((self.len + s.len()) * 2);
            v.extend_from_slice(self.bytes.get(..self.len).unwrap_or_default());
            v.extend_from_slice(s);
            self.spilled = Some(v);
        }
        self
    }

    fn push_ip(&mut self, ip: IpAddr) -> &mut Self {
        match ip {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.push(b".");
                    }
                    let digits = [
                        b'0' + octet / 100,
                        b'0' + octet / 10 % 10,
                        b'0' + octet % 10,
                    ];
                    let skip = if octet >= 100 {
                        0
                    } else if octet >= 10 {
                        1
                    } else {
                        2
                    };
                    self.push(&digits[skip..]);
                }
                self
            }
            IpAddr::V6(v6) => {
                use std::fmt::Write;
                let mut text = String::with_capacity(40);
                // Writing to a String cannot fail.
                let _ = write!(text, "{v6}");
                self.push(text.as_bytes())
            }
        }
    }

    fn value(&self) -> HeaderValue {
        let text = match &self.spilled {
            Some(v) => v.as_slice(),
            None => self.bytes.get(..self.len).unwrap_or_default(),
        };
        // Addresses and the fixed words are always valid header bytes, and so are the values
        // of a trusted proxy's headers joined with them.
        HeaderValue::from_bytes(text).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
    }
}

/// Appends every value of `name` in `headers`, comma-separated, to `out`. False when absent.
fn push_joined(out: &mut ValueBuf, headers: &http::HeaderMap, name: &HeaderName) -> bool {
    let mut any = false;
    for v in headers.get_all(name) {
        if any {
            out.push(b", ");
        }
        out.push(v.as_bytes());
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

    let mut xff = ValueBuf::new();
    if from_trusted && push_joined(&mut xff, headers, &X_FORWARDED_FOR) {
        xff.push(b", ");
    }
    xff.push_ip(peer);

    let mut forwarded = ValueBuf::new();
    if from_trusted && push_joined(&mut forwarded, headers, &FORWARDED) {
        forwarded.push(b", ");
    }
    match peer {
        IpAddr::V6(_) => forwarded.push(b"for=\"[").push_ip(peer).push(b"]\";proto="),
        IpAddr::V4(_) => forwarded.push(b"for=").push_ip(peer).push(b";proto="),
    };
    forwarded.push(proto);

    let real_ip = ValueBuf::new().push_ip(client).value();
    [
        (X_FORWARDED_FOR, xff.value()),
        (X_REAL_IP, real_ip),
        (
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if tls { "https" } else { "http" }),
        ),
        (FORWARDED, forwarded.value()),
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
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut b = ValueBuf::new();
            b.push_ip(ip);
            assert_eq!(b.value(), ip.to_string().as_str());
        }
        // A value longer than the stack buffer moves to the heap, whole.
        let mut b = ValueBuf::new();
        b.push(&[b'a'; 150])
            .push(b", ")
            .push_ip("10.0.0.1".parse().unwrap());
        assert_eq!(b.value().len(), 160);
        assert!(b.value().to_str().unwrap().ends_with("a, 10.0.0.1"));
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
