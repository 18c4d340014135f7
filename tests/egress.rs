//! Egress policy end to end: an upstream written as a hostname, answered by a test DNS server on
//! loopback (`dns.nameservers`). Every address involved is loopback: the tests never dial
//! anything else.

mod common;

use common::dns::TestDns;
use common::harness::Proxy;
use common::mock::{Mock, Reply};
use common::{assert_error, client, wait_until};
use std::net::IpAddr;
use std::time::Duration;

const HOST: &str = "llm.egress.test";

fn config(dns: &TestDns, mock: &Mock, upstream_extra: &str, top_extra: &str) -> String {
    format!(
        r#"
dns: {{nameservers: ["{dns}"], timeout: 1s}}
{top_extra}
upstreams:
  u:
    kind: vllm
    endpoints: ["http://{HOST}:{port}"]
    dns_refresh: 1s
    retries: {{max_attempts: 1}}
    {upstream_extra}
models:
  - {{name: m, upstream: u}}
"#,
        dns = dns.addr(),
        port = mock.addr().port(),
    )
}

async fn chat(proxy: &Proxy) -> reqwest::Response {
    client()
        .post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .await
        .expect("request")
}

fn ok_mock() -> Mock {
    Mock::replying(Reply::json(200, r#"{"id":"x","choices":[]}"#))
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Sum of the samples of `name` whose labels include every one of `labels`.
async fn metric(proxy: &Proxy, name: &str, labels: &[&str]) -> f64 {
    let text = client()
        .get(proxy.admin_url("/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostname_resolving_to_loopback_is_refused_without_allow_private() {
    let dns = TestDns::start();
    dns.set(HOST, &[loopback(1)]);
    let mock = ok_mock();
    let proxy = Proxy::start(&config(&dns, &mock, "", ""));
    // The name was resolved (at least once) and its only address refused.
    assert!(wait_until(Duration::from_secs(5), || dns.queries(HOST) > 0).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resp = chat(&proxy).await;
    assert_error(resp, 502, "egress_refused").await;
    assert_eq!(mock.accepted(), 0, "the refused address was never dialled");
    let refused = metric(
        &proxy,
        "llm_edge_egress_refused_total",
        &["class=\"loopback\"", "upstream=\"u\""],
    )
    .await;
    assert!(refused >= 1.0, "refusal counted: {refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostname_resolving_to_loopback_is_served_with_allow_private() {
    let dns = TestDns::start();
    dns.set(HOST, &[loopback(1)]);
    let mock = ok_mock();
    let proxy = Proxy::start(&config(&dns, &mock, "allow_private: true", ""));
    let mut status = 0;
    for _ in 0..100 {
        status = chat(&proxy).await.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200, "served once resolved");
    assert_eq!(mock.requests().len(), 1);
    assert_eq!(
        mock.requests()[0].header("host"),
        Some(format!("{HOST}:{}", mock.addr().port()).as_str()),
        "Host is the endpoint's name, not the address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_allow_cidrs_admits_a_range_and_a_flipped_answer_is_refused() {
    let dns = TestDns::start();
    dns.set_ttl(1);
    dns.set(HOST, &[loopback(1)]);
    let mock = ok_mock();
    // Only 127.0.0.1/32 is allowed; 127.0.0.2 is loopback outside the allowed range.
    let proxy = Proxy::start(&config(
        &dns,
        &mock,
        "",
        "egress: {allow_cidrs: [\"127.0.0.1/32\"]}",
    ));
    let mut status = 0;
    for _ in 0..100 {
        status = chat(&proxy).await.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status, 200,
        "an address inside egress.allow_cidrs is served"
    );
    let served = mock.requests().len();

    // The answer flips to an address outside the allowed range: the next resolution drops it
    // and the upstream has nothing left to dial.
    dns.set(HOST, &[loopback(2)]);
    let mut refused = false;
    for _ in 0..100 {
        if chat(&proxy).await.status().as_u16() == 502 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "the flipped answer is refused after re-resolution");
    let after_flip = mock.requests().len();
    let resp = chat(&proxy).await;
    assert_error(resp, 502, "egress_refused").await;
    assert_eq!(
        mock.requests().len(),
        after_flip,
        "nothing reaches the old address once the answer changed"
    );
    assert!(after_flip >= served);

    // Flipping back is honoured too.
    dns.set(HOST, &[loopback(1)]);
    let mut back = false;
    for _ in 0..100 {
        if chat(&proxy).await.status().as_u16() == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "the allowed address is served again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn literal_ip_endpoints_are_allowed_without_settings() {
    let mock = ok_mock();
    let proxy = Proxy::start(&format!(
        "upstreams: {{u: {{kind: vllm, endpoints: [\"{}\"]}}}}\nmodels: [{{name: m, upstream: u}}]\n",
        mock.url()
    ));
    assert_eq!(chat(&proxy).await.status(), 200);
}

#[test]
fn config_test_warns_on_metadata_literals() {
    let dir = std::env::temp_dir().join(format!("llm-edge-egress-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("metadata.yaml");
    std::fs::write(
        &file,
        "auth: {mode: open}\nupstreams: {u: {kind: vllm, endpoints: [\"http://169.254.169.254\"]}}\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llm-edge"))
        .args(["-t", "-c"])
        .arg(&file)
        .output()
        .expect("run llm-edge -t");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a literal is allowed: {stderr}");
    assert!(
        stderr.contains("169.254.169.254") && stderr.contains("warn"),
        "-t warns about the metadata address: {stderr}"
    );
}
