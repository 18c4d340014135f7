//! Shared support for the end-to-end tests: an in-process llm-edge ([`harness::Proxy`]), a
//! scriptable recording upstream ([`mock::Mock`]) and small helpers.

// Each test crate compiles this module on its own and uses a subset of it.
#![allow(dead_code)]

pub mod dns;
pub mod harness;
pub mod logs;
pub mod mock;
pub mod raw;

use std::future::Future;
use std::time::{Duration, Instant};

/// An HTTP/1.1 client for talking to the proxy: no system proxy, no compression, no redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("reqwest client")
}

/// `n` bytes of `abc…xyzabc…`: a body whose truncation or reordering shows in a comparison.
pub fn letters(n: usize) -> String {
    (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect()
}

/// Polls `cond` every 5 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Awaits `fut`, failing the test if it takes longer than `timeout`.
pub async fn within<T>(timeout: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {timeout:?}"))
}

/// Checks an llm-edge error response: `status`, `Content-Type: application/json`, and a body of
/// exactly `{"error":{"message","type","code"}}` with the given `code`. Returns the body.
pub async fn assert_error(resp: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    assert_eq!(
        resp.headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap()),
        Some("application/json"),
        "content-type"
    );
    let body = resp.bytes().await.expect("error body");
    let v: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body:?}"));
    assert_error_shape(&v, code);
    v
}

/// Checks that `v` is exactly `{"error":{"message":<non-empty>,"type":<non-empty>,"code":code}}`.
pub fn assert_error_shape(v: &serde_json::Value, code: &str) {
    let top = v.as_object().expect("error body is an object");
    assert_eq!(top.len(), 1, "only \"error\" at the top level: {v}");
    let e = v["error"].as_object().expect("\"error\" is an object");
    let mut keys: Vec<&str> = e.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "type"], "error fields: {v}");
    assert!(
        !e["message"]
            .as_str()
            .expect("message is a string")
            .is_empty(),
        "{v}"
    );
    assert!(
        !e["type"].as_str().expect("type is a string").is_empty(),
        "{v}"
    );
    assert_eq!(e["code"], code, "error code: {v}");
}

/// POSTs a JSON body through the proxy.
pub async fn post(
    proxy: &harness::Proxy,
    path: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    client()
        .post(proxy.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request through the proxy")
}

/// Asserts that an SSE body is `sent` followed by one llm-edge error event
/// (`upstream_stream_error`), and that the body failed instead of ending cleanly.
pub fn assert_sent_then_error_event(got: &[u8], failed: Option<reqwest::Error>, sent: &str) {
    let text = String::from_utf8(got.to_vec()).expect("utf-8 stream");
    assert!(
        text.starts_with(sent),
        "the events sent before the break arrive first, intact: {text:?}"
    );
    let event = &text[sent.len()..];
    let json = event
        .strip_prefix("data: ")
        .and_then(|e| e.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("then exactly one SSE error event: {event:?}"));
    let v: serde_json::Value = serde_json::from_str(json).expect("the error event is JSON");
    assert_error_shape(&v, "upstream_stream_error");
    assert!(
        failed.is_some(),
        "the body must not end cleanly after the upstream stream broke: {text:?}"
    );
}

/// Reads a response body until it ends or fails (each piece within 5 s); returns the bytes and
/// the failure, if any.
pub async fn read_until_end(resp: reqwest::Response) -> (Vec<u8>, Option<reqwest::Error>) {
    use futures::StreamExt;
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    while let Some(item) = within(Duration::from_secs(5), "reading the body", body.next()).await {
        match item {
            Ok(c) => got.extend_from_slice(&c),
            Err(e) => return (got, Some(e)),
        }
    }
    (got, None)
}

/// Waits (up to 5 s) until the proxy has logged `n` requests (`llm_edge_requests_total`). The
/// forwarder puts the upstream connection back in its pool before the request is logged, while
/// the client can have the whole body a moment earlier: tests that count upstream connections
/// wait for this before the next request, so a connection still being released does not show
/// as a new one.
pub async fn wait_logged(proxy: &harness::Proxy, n: u64) {
    let url = proxy.admin_url("/metrics");
    let logged = || async {
        let text = client().get(&url).send().await.ok()?.text().await.ok()?;
        let total: f64 = text
            .lines()
            .filter(|l| l.starts_with("llm_edge_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        Some(total as u64)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = logged().await;
        if got == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy logged {got:?} requests, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// After the client dropped a streaming response at `dropped_at`: the upstream's stream must
/// end as dropped within a second, well before the mock ran out of chunks to send.
pub async fn assert_upstream_dropped_soon(log: &mock::StreamLog, dropped_at: Instant) {
    let end = log.wait_end(Duration::from_secs(3)).await;
    let (ended_at, how) = end.expect("the upstream stream ended after the client left");
    assert_eq!(how, mock::StreamEnd::Dropped);
    let after = ended_at.saturating_duration_since(dropped_at);
    assert!(
        after < Duration::from_secs(1),
        "the upstream saw the disconnect {after:?} after the client left"
    );
    assert!(log.emitted().len() < 100);
}
