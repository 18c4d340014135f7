//! Egress policy: may an address that an upstream *hostname* resolved to be dialled?
//!
//! A hostname can be made to resolve anywhere (a hostile or compromised zone, DNS rebinding), so
//! without this check a config naming `api.example.com` could end up talking to the metadata
//! service, the admin port, or the proxy itself. Literal IPs and `localhost` are the operator's
//! explicit choice and are not checked here (see [`literal_warning`] for `-t` hints).
//!
//! Pure functions over addresses: no I/O, so every range is unit-tested.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// What kind of address an IP is, for the egress decision, metric labels and log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrClass {
    /// Globally routable: allowed.
    Public,
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918, IPv6 unique-local fc00::/7, deprecated site-local fec0::/10, local-use NAT64.
    Private,
    /// 100.64.0.0/10 (RFC 6598 shared address space): treated like private.
    Cgnat,
    /// 169.254.0.0/16 (cloud metadata lives here), fe80::/10.
    LinkLocal,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 0.0.0.0/8 ("this network"; 0.0.0.0 itself dials the local host), ::.
    Unspecified,
    /// Never publicly routed: 240.0.0.0/4 (incl. broadcast 255.255.255.255), IETF protocol
    /// assignments, documentation and benchmarking ranges, IPv6 discard-only.
    Reserved,
}

impl AddrClass {
    /// Stable snake_case label for metrics and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            AddrClass::Public => "public",
            AddrClass::Loopback => "loopback",
            AddrClass::Private => "private",
            AddrClass::Cgnat => "cgnat",
            AddrClass::LinkLocal => "link_local",
            AddrClass::Multicast => "multicast",
            AddrClass::Unspecified => "unspecified",
            AddrClass::Reserved => "reserved",
        }
    }

    /// Wording for messages read by operators (labels are for machines).
    fn phrase(self) -> &'static str {
        match self {
            AddrClass::Public => "public",
            AddrClass::Loopback => "loopback",
            AddrClass::Private => "a private-network address",
            AddrClass::Cgnat => "in the CGNAT shared range 100.64.0.0/10",
            AddrClass::LinkLocal => "link-local",
            AddrClass::Multicast => "multicast",
            AddrClass::Unspecified => "unspecified (this host)",
            AddrClass::Reserved => "in a reserved, non-routable range",
        }
    }
}

impl fmt::Display for AddrClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

const fn v6(segments: [u16; 8], len: u8) -> Ipv6Net {
    let [a, b, c, d, e, f, g, h] = segments;
    Ipv6Net::new_assert(Ipv6Addr::new(a, b, c, d, e, f, g, h), len)
}

/// Non-public IPv4 ranges (IANA special-purpose registry, trimmed to what matters for egress).
/// Documentation (TEST-NET-1/2/3) and benchmarking (198.18.0.0/15) ranges are never publicly
/// routed, so a public name resolving there is a mistake or an attack: they are `Reserved`.
/// Fake-IP DNS setups (some VPN clients answer from 198.18.0.0/15) need `egress.allow_cidrs`.
const V4_RANGES: &[(Ipv4Net, AddrClass)] = &[
    (v4(0, 0, 0, 0, 8), AddrClass::Unspecified),
    (v4(10, 0, 0, 0, 8), AddrClass::Private),
    (v4(100, 64, 0, 0, 10), AddrClass::Cgnat),
    (v4(127, 0, 0, 0, 8), AddrClass::Loopback),
    (v4(169, 254, 0, 0, 16), AddrClass::LinkLocal),
    (v4(172, 16, 0, 0, 12), AddrClass::Private),
    (v4(192, 0, 0, 0, 24), AddrClass::Reserved),
    (v4(192, 0, 2, 0, 24), AddrClass::Reserved),
    (v4(192, 168, 0, 0, 16), AddrClass::Private),
    (v4(198, 18, 0, 0, 15), AddrClass::Reserved),
    (v4(198, 51, 100, 0, 24), AddrClass::Reserved),
    (v4(203, 0, 113, 0, 24), AddrClass::Reserved),
    (v4(224, 0, 0, 0, 4), AddrClass::Multicast),
    (v4(240, 0, 0, 0, 4), AddrClass::Reserved),
];

/// Non-public IPv6 ranges. `::` and `::1` are matched before the IPv4-embedding rules, which
/// would otherwise read them as 0.0.0.0 / 0.0.0.1.
const V6_RANGES: &[(Ipv6Net, AddrClass)] = &[
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), AddrClass::Unspecified),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), AddrClass::Loopback),
    // RFC 8215 local-use NAT64: the prefix length varies per site, so the IPv4 part cannot be
    // located reliably; it only exists inside one network.
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), AddrClass::Private),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), AddrClass::Reserved),
    (v6([0x2001, 2, 0, 0, 0, 0, 0, 0], 48), AddrClass::Reserved),
    (
        v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
        AddrClass::Reserved,
    ),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), AddrClass::Reserved),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), AddrClass::Private),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), AddrClass::LinkLocal),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), AddrClass::Private),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), AddrClass::Multicast),
];

const NAT64_WKP: Ipv6Net = v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96);
const SIX_TO_FOUR: Ipv6Net = v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16);

/// The IPv4 host an IPv6 address really reaches: IPv4-mapped, IPv4-compatible, well-known
/// NAT64 and 6to4 forms all end up at the embedded IPv4 address, so an attacker could otherwise
/// write `::ffff:127.0.0.1` to get past an IPv4-only check.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let last32 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0) {
        // `::` and `::1` never get here: V6_RANGES claims them first.
        return Some(last32);
    }
    if NAT64_WKP.contains(&ip) {
        return Some(last32);
    }
    if SIX_TO_FOUR.contains(&ip) {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    V4_RANGES
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map_or(AddrClass::Public, |&(_, class)| class)
}

/// Classifies `ip`; IPv6 forms that embed an IPv4 address are classified by that address.
pub fn classify(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(&(_, class)) = V6_RANGES.iter().find(|(net, _)| net.contains(&v6)) {
                return class;
            }
            embedded_v4(v6).map_or(AddrClass::Public, classify_v4)
        }
    }
}

/// Whether a connection to `ip` stays on this host.
fn is_this_host(ip: IpAddr) -> bool {
    ip.to_canonical().is_unspecified() || classify(ip) == AddrClass::Loopback
}

/// Why a resolved address was not dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The resolved address (with the endpoint's port).
    pub addr: SocketAddr,
    /// Its class.
    pub class: AddrClass,
    /// It is one of this proxy's own listeners: refused whatever the upstream allows.
    pub own_listener: bool,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.own_listener {
            write!(
                f,
                "resolved address {} is one of this proxy's own listeners; refused to avoid a \
                 request loop (allow_private and egress.allow_cidrs do not override this; point \
                 the endpoint at the real upstream)",
                self.addr
            )
        } else {
            write!(
                f,
                "resolved address {} is {}; refused for a hostname endpoint (set \
                 allow_private: true on the upstream or add the range to egress.allow_cidrs)",
                self.addr,
                self.class.phrase()
            )
        }
    }
}

impl std::error::Error for Refusal {}

/// Which resolved addresses hostname endpoints may dial. Built once at config load.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    allow_cidrs: Vec<IpNet>,
    own_listen: Vec<SocketAddr>,
}

impl EgressPolicy {
    /// A policy allowing `allow_cidrs` on top of public addresses, and never `own_listen`.
    pub fn new(allow_cidrs: Vec<IpNet>, own_listen: Vec<SocketAddr>) -> Self {
        Self {
            allow_cidrs,
            own_listen,
        }
    }

    /// Decides whether `addr`, resolved from an upstream hostname, may be dialled.
    /// `allow_private` is the upstream's opt-in to every non-public class.
    pub fn check_resolved(&self, addr: SocketAddr, allow_private: bool) -> Result<(), Refusal> {
        let class = classify(addr.ip());
        let refusal = |own_listener| Refusal {
            addr,
            class,
            own_listener,
        };
        if self.is_own_listener(addr) {
            return Err(refusal(true));
        }
        if class == AddrClass::Public || allow_private || self.in_allowed_cidr(addr.ip()) {
            return Ok(());
        }
        Err(refusal(false))
    }

    /// Without interface enumeration (this module does no I/O), a wildcard listener is only
    /// recognised through loopback/unspecified addresses, not the host's own public IPs.
    fn is_own_listener(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        self.own_listen.iter().any(|l| {
            let lip = l.ip().to_canonical();
            l.port() == addr.port()
                && (lip == ip
                    || (lip.is_unspecified() && is_this_host(ip))
                    // Dialling 0.0.0.0 / :: reaches whatever listens locally on that port.
                    || ip.is_unspecified())
        })
    }

    fn in_allowed_cidr(&self, ip: IpAddr) -> bool {
        let embedded = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.allow_cidrs
            .iter()
            .any(|net| net.contains(&ip) || embedded.is_some_and(|e| net.contains(&e)))
    }
}

const IMDS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
const LINK_LOCAL_V6: Ipv6Net = v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10);

/// A `-t` warning for a *literal* endpoint IP that is probably a mistake or a credential leak;
/// literal endpoints are still allowed (the operator wrote them).
pub fn literal_warning(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V6(v6) if v6 == IMDS_V6 => Some(
            "fd00:ec2::254 is the AWS instance metadata service (IPv6); an upstream here can \
             leak instance credentials",
        ),
        IpAddr::V6(v6) if LINK_LOCAL_V6.contains(&v6) => Some(
            "IPv6 link-local address (fe80::/10): reachable on one interface only and rarely a \
             real upstream",
        ),
        // Any other link-local class is IPv4, written plainly or embedded in IPv6.
        _ if classify(ip) == AddrClass::LinkLocal => Some(
            "link-local address (169.254.0.0/16), where cloud instance metadata services live \
             (169.254.169.254); an upstream here can leak instance credentials",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddrClass::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn check(cases: &[(&str, AddrClass)]) {
        for (addr, want) in cases {
            assert_eq!(classify(ip(addr)), *want, "{addr}");
        }
    }

    #[test]
    fn ipv4_loopback_and_this_network() {
        check(&[
            ("0.0.0.0", Unspecified),
            ("0.255.255.255", Unspecified),
            ("1.0.0.0", Public),
            ("126.255.255.255", Public),
            ("127.0.0.0", Loopback),
            ("127.0.0.1", Loopback),
            ("127.255.255.255", Loopback),
            ("128.0.0.0", Public),
        ]);
    }

    #[test]
    fn ipv4_private_ranges() {
        check(&[
            ("9.255.255.255", Public),
            ("10.0.0.0", Private),
            ("10.255.255.255", Private),
            ("11.0.0.0", Public),
            ("172.15.255.255", Public),
            ("172.16.0.0", Private),
            ("172.31.255.255", Private),
            ("172.32.0.0", Public),
            ("192.167.255.255", Public),
            ("192.168.0.0", Private),
            ("192.168.255.255", Private),
            ("192.169.0.0", Public),
        ]);
    }

    #[test]
    fn ipv4_cgnat() {
        check(&[
            ("100.63.255.255", Public),
            ("100.64.0.0", Cgnat),
            ("100.100.100.200", Cgnat),
            ("100.127.255.255", Cgnat),
            ("100.128.0.0", Public),
        ]);
    }

    #[test]
    fn ipv4_link_local_multicast_reserved() {
        check(&[
            ("169.253.255.255", Public),
            ("169.254.0.0", LinkLocal),
            ("169.254.169.254", LinkLocal),
            ("169.254.255.255", LinkLocal),
            ("169.255.0.0", Public),
            ("223.255.255.255", Public),
            ("224.0.0.0", Multicast),
            ("239.255.255.255", Multicast),
            ("240.0.0.0", Reserved),
            ("255.255.255.254", Reserved),
            ("255.255.255.255", Reserved),
        ]);
    }

    #[test]
    fn ipv4_protocol_documentation_and_benchmark_ranges() {
        check(&[
            ("191.255.255.255", Public),
            ("192.0.0.0", Reserved),
            ("192.0.0.255", Reserved),
            ("192.0.1.0", Public),
            ("192.0.2.0", Reserved),
            ("192.0.2.255", Reserved),
            ("192.0.3.0", Public),
            ("198.17.255.255", Public),
            ("198.18.0.0", Reserved),
            ("198.19.255.255", Reserved),
            ("198.20.0.0", Public),
            ("198.51.99.255", Public),
            ("198.51.100.0", Reserved),
            ("198.51.100.255", Reserved),
            ("198.51.101.0", Public),
            ("203.0.112.255", Public),
            ("203.0.113.0", Reserved),
            ("203.0.113.255", Reserved),
            ("203.0.114.0", Public),
            ("8.8.8.8", Public),
        ]);
    }

    #[test]
    fn ipv6_special_ranges() {
        check(&[
            ("::", Unspecified),
            ("::1", Loopback),
            ("::2", Unspecified), // IPv4-compatible 0.0.0.2, "this network"
            ("2606:4700::1111", Public),
            ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Public),
            ("fc00::", Private),
            ("fd12:3456::1", Private),
            ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Private),
            ("fe00::", Public),
            ("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Public),
            ("fe80::", LinkLocal),
            ("fe80::1", LinkLocal),
            ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", LinkLocal),
            ("fec0::", Private),
            ("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Private),
            ("ff00::", Multicast),
            ("ff02::1", Multicast),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Multicast),
        ]);
    }

    #[test]
    fn ipv6_documentation_benchmark_discard() {
        check(&[
            ("100::", Reserved),
            ("100::ffff:ffff:ffff:ffff", Reserved),
            ("100:0:0:1::", Public),
            ("2001:1:ffff:ffff:ffff:ffff:ffff:ffff", Public),
            ("2001:2::", Reserved),
            ("2001:2:0:ffff::", Reserved),
            ("2001:2:1::", Public),
            ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", Public),
            ("2001:db8::", Reserved),
            ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", Reserved),
            ("2001:db9::", Public),
            ("3ffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Public),
            ("3fff::", Reserved),
            ("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", Reserved),
            ("3fff:1000::", Public),
        ]);
    }

    #[test]
    fn ipv6_embedding_ipv4_is_classified_by_the_ipv4() {
        check(&[
            // IPv4-mapped
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:10.0.0.1", Private),
            ("::ffff:169.254.169.254", LinkLocal),
            ("::ffff:100.64.0.0", Cgnat),
            ("::ffff:0.0.0.0", Unspecified),
            ("::ffff:8.8.8.8", Public),
            ("::ffff:172.32.0.0", Public),
            // IPv4-compatible (deprecated)
            ("::127.0.0.1", Loopback),
            ("::192.168.1.1", Private),
            ("::1.1.1.1", Public),
            // Well-known NAT64 prefix 64:ff9b::/96
            ("64:ff9b::127.0.0.1", Loopback),
            ("64:ff9b::10.1.2.3", Private),
            ("64:ff9b::8.8.8.8", Public),
            ("64:ff9a:ffff:ffff:ffff:ffff:7f00:1", Public),
            ("64:ff9b:0:0:0:1:7f00:1", Public), // outside the /96
            // RFC 8215 local-use NAT64
            ("64:ff9b:1::", Private),
            ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", Private),
            ("64:ff9b:2::", Public),
            // 6to4 2002::/16, IPv4 in bits 16..48
            ("2002:7f00:1::", Loopback),
            ("2002:a9fe:a9fe::1", LinkLocal),
            ("2002:c0a8:101::", Private),
            ("2002:808:808::", Public),
            ("2001:ffff:ffff:ffff:ffff:ffff:7f00:1", Public),
            ("2003:7f00:1::", Public),
        ]);
    }

    #[test]
    fn labels_are_stable() {
        let labels: Vec<&str> = [
            Public,
            Loopback,
            Private,
            Cgnat,
            LinkLocal,
            Multicast,
            Unspecified,
            Reserved,
        ]
        .iter()
        .map(AddrClass::as_str)
        .collect();
        assert_eq!(
            labels,
            [
                "public",
                "loopback",
                "private",
                "cgnat",
                "link_local",
                "multicast",
                "unspecified",
                "reserved"
            ]
        );
        assert_eq!(LinkLocal.to_string(), "link_local");
    }

    #[test]
    fn public_is_allowed_and_non_public_needs_allow_private() {
        let p = EgressPolicy::default();
        assert_eq!(p.check_resolved(sa("8.8.8.8:443"), false), Ok(()));
        assert_eq!(p.check_resolved(sa("[2606:4700::1111]:443"), false), Ok(()));
        for (addr, class) in [
            ("127.0.0.1:8000", Loopback),
            ("10.0.0.5:8000", Private),
            ("100.64.0.1:8000", Cgnat),
            ("169.254.169.254:80", LinkLocal),
            ("224.0.0.1:80", Multicast),
            ("0.0.0.0:80", Unspecified),
            ("255.255.255.255:80", Reserved),
            ("[::1]:8000", Loopback),
            ("[fd00::1]:8000", Private),
            ("[::ffff:127.0.0.1]:8000", Loopback),
        ] {
            let addr = sa(addr);
            assert_eq!(
                p.check_resolved(addr, false),
                Err(Refusal {
                    addr,
                    class,
                    own_listener: false
                }),
                "{addr}"
            );
            assert_eq!(p.check_resolved(addr, true), Ok(()), "{addr}");
        }
    }

    #[test]
    fn allow_cidrs_admit_their_range_only() {
        let p = EgressPolicy::new(
            vec![
                "10.1.0.0/16".parse().unwrap(),
                "fd00:1::/32".parse().unwrap(),
            ],
            vec![],
        );
        assert_eq!(p.check_resolved(sa("10.1.2.3:80"), false), Ok(()));
        assert_eq!(p.check_resolved(sa("10.1.255.255:80"), false), Ok(()));
        assert!(p.check_resolved(sa("10.2.0.0:80"), false).is_err());
        assert!(p.check_resolved(sa("10.0.255.255:80"), false).is_err());
        assert_eq!(p.check_resolved(sa("[fd00:1::5]:80"), false), Ok(()));
        assert_eq!(p.check_resolved(sa("[fd00:1:ffff::1]:80"), false), Ok(()));
        assert!(p.check_resolved(sa("[fd00:2::5]:80"), false).is_err());
        // The mapped form reaches the same IPv4 host, so the IPv4 range covers it.
        assert_eq!(p.check_resolved(sa("[::ffff:10.1.2.3]:80"), false), Ok(()));
        assert!(p.check_resolved(sa("127.0.0.1:80"), false).is_err());
    }

    #[test]
    fn own_listener_is_always_refused() {
        let p = EgressPolicy::new(
            vec!["127.0.0.0/8".parse().unwrap(), "::/0".parse().unwrap()],
            vec![sa("127.0.0.1:8080"), sa("[::1]:9090")],
        );
        let own = |addr: &str| Refusal {
            addr: sa(addr),
            class: Loopback,
            own_listener: true,
        };
        for allow_private in [false, true] {
            assert_eq!(
                p.check_resolved(sa("127.0.0.1:8080"), allow_private),
                Err(own("127.0.0.1:8080"))
            );
            assert_eq!(
                p.check_resolved(sa("[::1]:9090"), allow_private),
                Err(own("[::1]:9090"))
            );
            assert_eq!(
                p.check_resolved(sa("[::ffff:127.0.0.1]:8080"), allow_private),
                Err(own("[::ffff:127.0.0.1]:8080"))
            );
        }
        // Other ports, or another loopback address than the bound one, are not a loop.
        assert_eq!(p.check_resolved(sa("127.0.0.1:8081"), false), Ok(()));
        assert_eq!(p.check_resolved(sa("127.0.0.2:8080"), false), Ok(()));
        assert_eq!(p.check_resolved(sa("[::1]:8080"), false), Ok(()));
        // Dialling 0.0.0.0 reaches the local listener.
        let err = p.check_resolved(sa("0.0.0.0:8080"), true).unwrap_err();
        assert!(err.own_listener);
        assert_eq!(err.class, Unspecified);
    }

    #[test]
    fn own_listener_on_wildcard_ip_catches_local_addresses() {
        let p = EgressPolicy::new(vec![], vec![sa("0.0.0.0:8080"), sa("[::]:9090")]);
        for addr in [
            "127.0.0.1:8080",
            "127.9.9.9:8080",
            "0.0.0.0:8080",
            "[::1]:8080",
            "[::]:8080",
            "127.0.0.1:9090",
            "[::1]:9090",
            "[::ffff:127.0.0.1]:9090",
        ] {
            let err = p.check_resolved(sa(addr), true).unwrap_err();
            assert!(err.own_listener, "{addr}");
        }
        assert_eq!(p.check_resolved(sa("127.0.0.1:8081"), true), Ok(()));
        assert_eq!(p.check_resolved(sa("10.0.0.1:8080"), true), Ok(()));
        assert_eq!(p.check_resolved(sa("8.8.8.8:8080"), false), Ok(()));
    }

    #[test]
    fn refusal_messages_say_what_to_do() {
        let p = EgressPolicy::new(vec![], vec![sa("127.0.0.1:9000")]);
        let err = p.check_resolved(sa("127.0.0.1:8000"), false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "resolved address 127.0.0.1:8000 is loopback; refused for a hostname endpoint \
             (set allow_private: true on the upstream or add the range to egress.allow_cidrs)"
        );
        let err = p.check_resolved(sa("100.64.1.1:80"), false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "resolved address 100.64.1.1:80 is in the CGNAT shared range 100.64.0.0/10; \
             refused for a hostname endpoint (set allow_private: true on the upstream or add \
             the range to egress.allow_cidrs)"
        );
        let err = p.check_resolved(sa("127.0.0.1:9000"), true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "resolved address 127.0.0.1:9000 is one of this proxy's own listeners; refused to \
             avoid a request loop (allow_private and egress.allow_cidrs do not override this; \
             point the endpoint at the real upstream)"
        );
    }

    #[test]
    fn literal_warnings_flag_metadata_and_link_local() {
        for addr in [
            "169.254.169.254",
            "169.254.0.0",
            "169.254.255.255",
            "::ffff:169.254.169.254",
            "2002:a9fe:a9fe::1",
        ] {
            let w = literal_warning(ip(addr)).unwrap_or_else(|| panic!("{addr}"));
            assert!(w.contains("169.254.169.254"), "{addr}: {w}");
        }
        let w = literal_warning(ip("fe80::1")).unwrap();
        assert!(w.contains("fe80::/10"), "{w}");
        let w = literal_warning(ip("fd00:ec2::254")).unwrap();
        assert!(w.contains("metadata"), "{w}");
        for addr in [
            "169.253.255.255",
            "169.255.0.0",
            "127.0.0.1",
            "10.0.0.1",
            "8.8.8.8",
            "::1",
            "fe7f::1",
            "fec0::1",
            "fd00:ec2::253",
        ] {
            assert_eq!(literal_warning(ip(addr)), None, "{addr}");
        }
    }
}
