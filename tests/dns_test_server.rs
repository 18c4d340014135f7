//! The loopback DNS server used by the end-to-end tests ([`common::dns::TestDns`]) answers a real
//! hickory resolver the way the proxy's resolver will be set up: only nameserver, record TTLs
//! honoured, so an answer flipped by a test is seen once its TTL has passed.

mod common;

use common::dns::TestDns;
use hickory_resolver::config::{
    NameServerConfig, NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use std::net::IpAddr;
use std::time::Duration;

/// A resolver for `servers`, with its cache on (as in the proxy) so the tests also show that the
/// TTL the server gives is what bounds staleness.
fn resolver(servers: impl Into<NameServerConfigGroup>) -> TokioResolver {
    let config = ResolverConfig::from_parts(None, vec![], servers);
    let mut opts = ResolverOpts::default();
    // Test names must come from the test server, never from /etc/hosts.
    opts.use_hosts_file = ResolveHosts::Never;
    opts.timeout = Duration::from_secs(1);
    opts.attempts = 1;
    TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
        .with_options(opts)
        .build()
}

/// The resolver the end-to-end tests mirror: `dns` is its only nameserver, over UDP.
fn udp_resolver(dns: &TestDns) -> TokioResolver {
    resolver(vec![NameServerConfig::new(dns.addr(), Protocol::Udp)])
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn lookup(r: &TokioResolver, name: &str) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = r
        .lookup_ip(name)
        .await
        .unwrap_or_else(|e| panic!("resolving {name}: {e}"))
        .iter()
        .collect();
    ips.sort();
    ips
}

#[tokio::test]
async fn answers_what_was_set_for_a_and_aaaa() {
    let dns = TestDns::start();
    dns.set("api.llm-edge.test", &[ip("127.0.0.2"), ip("127.0.0.3")]);
    dns.set("v6.llm-edge.test.", &[ip("::1")]);
    let r = udp_resolver(&dns);
    assert_eq!(
        lookup(&r, "api.llm-edge.test").await,
        [ip("127.0.0.2"), ip("127.0.0.3")]
    );
    // Names are case-insensitive, trailing dot or not.
    assert_eq!(lookup(&r, "V6.LLM-Edge.Test.").await, [ip("::1")]);
}

#[tokio::test]
async fn changed_answer_is_seen_after_the_ttl() {
    let dns = TestDns::start();
    let name = "flip.llm-edge.test";
    dns.set(name, &[ip("127.0.0.2")]);
    let r = udp_resolver(&dns);
    let a = |r: &TokioResolver| {
        let r = r.clone();
        async move {
            let answer = r.ipv4_lookup(name).await.expect("A lookup");
            answer.iter().map(|a| IpAddr::V4(a.0)).collect::<Vec<_>>()
        }
    };
    assert_eq!(a(&r).await, [ip("127.0.0.2")]);
    assert_eq!(dns.queries(name), 1);

    dns.set(name, &[ip("127.0.0.9")]);
    // Within the 1 s TTL the cached answer stands and the server is not asked again.
    assert_eq!(a(&r).await, [ip("127.0.0.2")]);
    assert_eq!(dns.queries(name), 1);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(a(&r).await, [ip("127.0.0.9")]);
    assert_eq!(dns.queries(name), 2);
}

#[tokio::test]
async fn unknown_name_is_nxdomain_and_known_name_without_the_type_is_nodata() {
    let dns = TestDns::start();
    dns.set("only-v6.llm-edge.test", &[ip("::1")]);
    let r = udp_resolver(&dns);

    // A-only lookups, so each counts one query (`lookup_ip` would also ask for AAAA).
    let err = r.ipv4_lookup("nope.llm-edge.test").await.unwrap_err();
    assert!(err.is_nx_domain(), "{err}");
    assert_eq!(dns.queries("nope.llm-edge.test"), 1);
    let err = r.ipv4_lookup("nope.llm-edge.test").await.unwrap_err();
    assert!(err.is_nx_domain(), "{err}");
    assert_eq!(
        dns.queries("nope.llm-edge.test"),
        1,
        "NXDOMAIN is cached for the TTL"
    );
    assert!(r.lookup_ip("nope.llm-edge.test").await.is_err());

    let err = r.ipv4_lookup("only-v6.llm-edge.test").await.unwrap_err();
    assert!(err.is_no_records_found() && !err.is_nx_domain(), "{err}");

    dns.remove("only-v6.llm-edge.test");
    let err = r.ipv6_lookup("only-v6.llm-edge.test").await.unwrap_err();
    assert!(err.is_nx_domain(), "{err}");
    assert_eq!(dns.queries("only-v6.llm-edge.test"), 2);
    assert_eq!(dns.queries("never-asked.llm-edge.test"), 0);
}

#[tokio::test]
async fn answers_over_tcp_too() {
    let dns = TestDns::start();
    dns.set("tcp.llm-edge.test", &[ip("127.0.0.4")]);
    let r = resolver(vec![NameServerConfig::new(dns.addr(), Protocol::Tcp)]);
    assert_eq!(lookup(&r, "tcp.llm-edge.test").await, [ip("127.0.0.4")]);
    assert_eq!(dns.queries("tcp.llm-edge.test"), 1);
}

#[tokio::test]
async fn large_udp_answer_is_truncated_and_retried_over_tcp() {
    let dns = TestDns::start();
    let many: Vec<IpAddr> = (1..=60).map(|i| ip(&format!("127.0.1.{i}"))).collect();
    dns.set("many.llm-edge.test", &many);
    // UDP and TCP on the same port, as `from_ips_clear` sets up: hickory only retries a
    // truncated answer when a TCP nameserver is configured.
    let r = resolver(NameServerConfigGroup::from_ips_clear(
        &[dns.addr().ip()],
        dns.addr().port(),
        true,
    ));
    let got = r.ipv4_lookup("many.llm-edge.test").await.expect("A lookup");
    assert_eq!(got.iter().count(), 60);
    assert_eq!(dns.queries("many.llm-edge.test"), 2, "UDP, then TCP");
}
