//! End-to-end tests of pass-through routes (`routes: - {prefix: /raw/, ...}`): requests with a
//! small body of known length go through llm-edge's own forwarder, everything else through
//! Pingora's proxy path. Each test asserts what the upstream received (method, path, headers,
//! exact body bytes, how many requests and connections) and what the client got back.

mod common;

use bytes::Bytes;
use common::harness::{free_port, Proxy};
use common::mock::{Mock, Recorded, Reply, StreamEnd};
use common::raw::read_response;
use common::{assert_error, client, read_until_end, wait_logged, within};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHAT: &str = "/v1/chat/completions";

/// How long any one exchange with the proxy may take before the test fails.
const EXCHANGE: Duration = Duration::from_secs(5);

/// What the client sends as its own credential; must never reach an upstream.
const CLIENT_SECRET: &str = "client-secret-9f3a";

/// The upstream key of the keyed configs (see [`KEY_ENV`]).
const UPSTREAM_KEY: &str = "upstream-key-vllm-0001";
const KEY_ENV: [(&str, &str); 1] = [("TEST_KEY", UPSTREAM_KEY)];

/// One vLLM upstream `u` over `endpoints`, serving model `m1`, with `/raw/` a pass-through
/// route to it (prefix stripped). `upstream_extra` is added to `u` as is (indented lines).
fn config(endpoints: &[&str], upstream_extra: &str) -> String {
    let list = endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
upstreams:
  u:
    kind: vllm
    endpoints: [{list}]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
{upstream_extra}models:
  - {{name: m1, upstream: u}}
routes:
  - {{prefix: /raw/, upstream: u, strip_prefix: true}}
"#
    )
}

/// `u` with one upstream key, `TEST_KEY` (see [`KEY_ENV`]).
const WITH_KEY: &str = "    keys: [os.environ/TEST_KEY]\n";

fn down_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

/// `n` bytes covering every byte value, in an order a truncation or shift would show.
fn binary(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn assert_no_client_secret(r: &Recorded) {
    for (name, value) in &r.headers {
        assert!(
            !value
                .as_bytes()
                .windows(CLIENT_SECRET.len())
                .any(|w| w == CLIENT_SECRET.as_bytes()),
            "client credential leaked upstream in {name}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Requests as the upstream receives them.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_get_is_forwarded_without_framing_headers_and_with_end_to_end_headers_only() {
    let listing = "{\"object\":\"list\",\"data\":[{\"id\":\"org/upstream-model\"}]}";
    let mock = Mock::replying(
        Reply::json(200, listing)
            .header("x-upstream", "yes")
            .header("cache-control", "max-age=5"),
    );
    let proxy = Proxy::start(&config(&[&mock.url()], ""));

    let resp = client()
        .get(proxy.url("/raw/v1/models?x=1&y=%2F"))
        .header("accept-encoding", "gzip")
        .header("x-llm-edge-inject", "on")
        .header("x-custom", "kept")
        .header("authorization", format!("Bearer {CLIENT_SECRET}"))
        .header("x-api-key", CLIENT_SECRET)
        .header("proxy-authorization", format!("Basic {CLIENT_SECRET}"))
        .header("connection", "x-drop")
        .header("x-drop", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-host", "evil.example")
        .header("x-real-ip", "6.6.6.6")
        .header("forwarded", "for=6.6.6.6")
        .send()
        .await
        .unwrap();

    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-upstream"), Some("yes"));
    assert_eq!(header(&resp, "cache-control"), Some("max-age=5"));
    assert_eq!(header(&resp, "content-type"), Some("application/json"));
    let len = listing.len().to_string();
    assert_eq!(header(&resp, "content-length"), Some(len.as_str()));
    assert_eq!(header(&resp, "transfer-encoding"), None, "not re-chunked");
    let response_id = header(&resp, "x-request-id").map(str::to_string);
    assert_eq!(resp.bytes().await.unwrap(), listing.as_bytes());

    let r = mock.only_request();
    assert_eq!(r.method, "GET");
    assert_eq!(r.uri, "/v1/models?x=1&y=%2F", "prefix stripped, query kept");
    assert_eq!(
        r.header("content-length"),
        None,
        "a bodiless GET gets no Content-Length"
    );
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(r.body.len(), 0);
    let host = mock.addr().to_string();
    assert_eq!(r.header_all("host"), [host.as_str()]);
    // End to end: forwarded as sent.
    assert_eq!(r.header_all("accept-encoding"), ["gzip"]);
    assert_eq!(r.header_all("x-llm-edge-inject"), ["on"]);
    assert_eq!(r.header_all("x-custom"), ["kept"]);
    // Credentials (the upstream has no key), hop-by-hop and nominated headers: dropped.
    for name in [
        "authorization",
        "x-api-key",
        "proxy-authorization",
        "connection",
        "x-drop",
        "keep-alive",
        "te",
        "x-forwarded-host",
    ] {
        assert_eq!(r.header(name), None, "{name} must not be forwarded");
    }
    assert_no_client_secret(&r);
    // Forwarding headers are llm-edge's own (the client is not a trusted proxy).
    assert_eq!(r.header_all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(r.header_all("x-real-ip"), ["127.0.0.1"]);
    assert_eq!(r.header_all("x-forwarded-proto"), ["http"]);
    assert_eq!(r.header_all("forwarded"), ["for=127.0.0.1;proto=http"]);
    let sent_id = r.header_all("x-request-id");
    assert_eq!(sent_id.len(), 1, "one x-request-id upstream: {sent_id:?}");
    assert!(!sent_id[0].is_empty());
    assert_eq!(
        response_id.as_deref(),
        Some(sent_id[0]),
        "the client gets back the id the upstream saw"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_binary_post_arrives_byte_identical_with_its_exact_content_length_and_the_pool_key() {
    let mock = Mock::replying(Reply::json(201, "{\"stored\":true}"));
    let proxy = Proxy::start_with_env(&config(&[&mock.url()], WITH_KEY), &KEY_ENV);
    let sent = binary(3000);

    let resp = client()
        .post(proxy.url("/raw/upload/blob"))
        .header("content-type", "application/octet-stream")
        .header("authorization", format!("Bearer {CLIENT_SECRET}"))
        .body(sent.clone())
        .send()
        .await
        .unwrap();

    assert_eq!(resp.status(), 201);
    assert_eq!(resp.bytes().await.unwrap(), "{\"stored\":true}".as_bytes());
    let r = mock.only_request();
    assert_eq!(r.method, "POST");
    assert_eq!(r.uri, "/upload/blob");
    assert_eq!(r.header_all("content-length"), ["3000"]);
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(r.header_all("content-type"), ["application/octet-stream"]);
    assert_eq!(r.body.len(), sent.len());
    assert!(r.body == sent, "the body arrived byte-identical");
    assert_eq!(
        r.header_all("authorization"),
        [format!("Bearer {UPSTREAM_KEY}").as_str()],
        "the pool key replaces the client's credential"
    );
    assert_no_client_secret(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_at_and_over_the_forwarder_limit_arrive_byte_identical() {
    // 65536 is the largest body the forwarder takes; one byte more and 100000 go through
    // Pingora's proxy path. Either way the upstream gets the body and length as sent.
    let mock = Mock::start(|r| Reply::json(200, format!("{{\"got\":{}}}", r.body.len())));
    let proxy = Proxy::start(&config(&[&mock.url()], ""));
    let c = client();

    for (i, size) in [65_536usize, 65_537, 100_000].into_iter().enumerate() {
        let sent = binary(size);
        let resp = c
            .post(proxy.url(&format!("/raw/upload/{size}")))
            .header("content-type", "application/octet-stream")
            .body(sent.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{size} bytes");
        assert_eq!(
            resp.text().await.unwrap(),
            format!("{{\"got\":{size}}}"),
            "{size} bytes"
        );
        let all = mock.requests();
        assert_eq!(all.len(), i + 1, "one upstream request per client request");
        let r = &all[i];
        assert_eq!(r.method, "POST");
        assert_eq!(r.uri, format!("/upload/{size}"));
        let len = size.to_string();
        assert_eq!(
            r.header_all("content-length"),
            [len.as_str()],
            "{size} bytes"
        );
        assert_eq!(r.header("transfer-encoding"), None, "{size} bytes");
        assert_eq!(r.body.len(), size);
        assert!(r.body == sent, "{size} bytes: not byte-identical");
    }
}

// ---------------------------------------------------------------------------------------------
// Statuses, failover and unreachable upstreams.
// ---------------------------------------------------------------------------------------------

/// What replica `name` answers on `path` in
/// [`error_statuses_are_relayed_unchanged_without_retry_or_key_cooldown`].
fn replica_body(name: &str, path: &str) -> String {
    match path {
        "/busy" => format!("{name} is busy\n"),
        "/limited" => format!("{{\"error\":{{\"message\":\"{name}: rate limited\"}}}}"),
        "/broken" => format!("{name} exploded: \u{2620}\n"),
        _ => format!("{{\"ok\":\"{name}\"}}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_statuses_are_relayed_unchanged_without_retry_or_key_cooldown() {
    // Both replicas answer by path, naming themselves: a retry on the other replica would
    // show as a second upstream request, or as the other replica's body.
    fn replica(name: &'static str) -> Mock {
        Mock::start(move |r| {
            let body = replica_body(name, &r.uri);
            match r.uri.as_str() {
                "/busy" => Reply::status(503)
                    .header("content-type", "text/plain")
                    .header("retry-after", "3")
                    .body(body),
                "/limited" => Reply::json(429, body)
                    .header("retry-after", "7")
                    .header("x-ratelimit-remaining-requests", "0"),
                "/broken" => Reply::status(500)
                    .header("content-type", "text/plain; charset=utf-8")
                    .body(body),
                _ => Reply::json(200, body),
            }
        })
    }
    let a = replica("a");
    let b = replica("b");
    let proxy = Proxy::start_with_env(&config(&[&a.url(), &b.url()], WITH_KEY), &KEY_ENV);
    let c = client();

    // (path, status, retry-after, content-type)
    let cases = [
        ("/busy", 503, Some("3"), "text/plain"),
        ("/limited", 429, Some("7"), "application/json"),
        ("/broken", 500, None, "text/plain; charset=utf-8"),
        ("/ok", 200, None, "application/json"),
    ];
    for (i, (path, status, retry_after, ct)) in cases.into_iter().enumerate() {
        let resp = c
            .get(proxy.url(&format!("/raw{path}")))
            .send()
            .await
            .unwrap();
        let got_status = resp.status().as_u16();
        let got_retry_after = header(&resp, "retry-after").map(str::to_string);
        let got_ct = header(&resp, "content-type").map(str::to_string);
        let got_body = resp.text().await.unwrap();

        let (on_a, on_b) = (a.requests(), b.requests());
        assert_eq!(
            on_a.len() + on_b.len(),
            i + 1,
            "{path}: exactly one upstream request per client request"
        );
        let (name, r) = match (on_a.last(), on_b.last()) {
            (Some(r), _) if r.uri == path => ("a", r.clone()),
            (_, Some(r)) if r.uri == path => ("b", r.clone()),
            _ => panic!("{path}: no replica received it"),
        };
        assert_eq!(got_status, status, "{path}");
        assert_eq!(got_retry_after.as_deref(), retry_after, "{path}");
        assert_eq!(got_ct.as_deref(), Some(ct), "{path}");
        assert_eq!(
            got_body,
            replica_body(name, path),
            "{path}: the body of replica {name}, unchanged"
        );
        // Still the key: a relayed 429 does not put it in cooldown.
        assert_eq!(
            r.header_all("authorization"),
            [format!("Bearer {UPSTREAM_KEY}").as_str()],
            "{path}"
        );
    }

    // Nor did the 429 or the 5xx mark the key.
    let resp = c.get(proxy.admin_url("/admin/keys")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "GET /admin/keys");
    let v: serde_json::Value = resp.json().await.unwrap();
    let keys = v["data"]
        .as_array()
        .and_then(|ups| ups.iter().find(|u| u["upstream"] == "u"))
        .and_then(|u| u["keys"].as_array())
        .unwrap_or_else(|| panic!("upstream u in /admin/keys: {v}"));
    assert_eq!(keys.len(), 1, "{v}");
    assert_eq!(keys[0]["state"], "up", "{v}");
    assert_eq!(keys[0]["cooldown_remaining_ms"], 0, "{v}");
    assert_eq!(keys[0]["last_error"], serde_json::Value::Null, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_refusing_connections_is_skipped_and_the_body_goes_to_the_next() {
    let live = Mock::start(|r| Reply::json(200, format!("{{\"len\":{}}}", r.body.len())));
    let cfg = config(
        &[&down_url(), &live.url()],
        "    retries: {max_attempts: 2}\n",
    );
    let proxy = Proxy::start(&cfg);
    let c = client();

    for i in 0..6usize {
        let sent = binary(1000 + i);
        let req = if i % 2 == 0 {
            c.get(proxy.url(&format!("/raw/get/{i}")))
        } else {
            c.post(proxy.url(&format!("/raw/post/{i}")))
                .body(sent.clone())
        };
        let resp = within(EXCHANGE, "a request", req.send()).await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        let expected = if i % 2 == 0 { 0 } else { sent.len() };
        assert_eq!(
            resp.text().await.unwrap(),
            format!("{{\"len\":{expected}}}"),
            "request {i}"
        );
        let all = live.requests();
        assert_eq!(
            all.len(),
            i + 1,
            "request {i} reached the live replica once"
        );
        let r = &all[i];
        if i % 2 == 0 {
            assert_eq!(
                (r.method.as_str(), r.uri.clone()),
                ("GET", format!("/get/{i}"))
            );
            assert_eq!(r.header("content-length"), None, "request {i}");
        } else {
            assert_eq!(
                (r.method.as_str(), r.uri.clone()),
                ("POST", format!("/post/{i}"))
            );
            assert!(r.body == sent, "request {i}: the body arrived intact");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_down_is_a_502_upstream_unreachable_on_both_paths() {
    let proxy = Proxy::start(&config(&[&down_url(), &down_url()], ""));
    let c = client();

    let get = c.get(proxy.url("/raw/v1/models")).send().await.unwrap();
    assert_error(get, 502, "upstream_unreachable").await;

    let small = c
        .post(proxy.url("/raw/upload"))
        .body(binary(100))
        .send()
        .await
        .unwrap();
    assert_error(small, 502, "upstream_unreachable").await;

    // Over the forwarder limit: Pingora's proxy path, same answer.
    let large = c
        .post(proxy.url("/raw/upload"))
        .body(binary(100_000))
        .send()
        .await
        .unwrap();
    assert_error(large, 502, "upstream_unreachable").await;
}

// ---------------------------------------------------------------------------------------------
// Bodiless responses keep the client connection usable.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_204_and_304_answers_leave_the_client_connection_usable() {
    let mock = Mock::start(|r| match r.uri.as_str() {
        "/head" => Reply::status(200)
            .header("content-type", "text/plain")
            .header("content-length", "10")
            .body("0123456789"),
        "/no-content" => Reply::status(204).header("x-up", "no-content"),
        "/not-modified" => Reply::status(304)
            .header("etag", "\"v1\"")
            .header("x-up", "not-modified"),
        _ => Reply::status(200)
            .header("content-type", "text/plain")
            .body("the final body"),
    });
    let proxy = Proxy::start(&config(&[&mock.url()], ""));
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut buf = Vec::new();

    let exchanges: [(&str, &str, bool); 4] = [
        ("HEAD", "/raw/head", true),
        ("GET", "/raw/no-content", false),
        ("GET", "/raw/not-modified", false),
        ("GET", "/raw/final", false),
    ];
    let mut responses = Vec::new();
    for (method, path, bodiless) in exchanges {
        let req = format!("{method} {path} HTTP/1.1\r\nHost: edge.test\r\nAccept: */*\r\n\r\n");
        conn.write_all(req.as_bytes()).await.unwrap();
        let resp = read_response(&mut conn, &mut buf, bodiless).await;
        assert!(
            buf.is_empty(),
            "{method} {path}: bytes after the response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        assert_ne!(
            resp.header("connection"),
            Some("close"),
            "{method} {path}: {resp:?}"
        );
        responses.push(resp);
    }

    let [head, no_content, not_modified, last] = &responses[..] else {
        unreachable!()
    };
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.header("content-length"), Some("10"), "{head:?}");
    assert_eq!(head.header("transfer-encoding"), None, "{head:?}");
    for (resp, up) in [(no_content, "no-content"), (not_modified, "not-modified")] {
        assert_eq!(resp.header("x-up"), Some(up), "{resp:?}");
        assert_eq!(
            resp.header("transfer-encoding"),
            None,
            "a {} never says Transfer-Encoding: {resp:?}",
            resp.status
        );
    }
    assert_eq!(no_content.status, 204);
    assert_eq!(not_modified.status, 304);
    assert_eq!(not_modified.header("etag"), Some("\"v1\""));
    assert_eq!(last.status, 200, "{last:?}");
    assert_eq!(last.body, b"the final body", "{last:?}");

    // Nothing more arrives, and the proxy keeps the connection open.
    let mut extra = [0u8; 64];
    match tokio::time::timeout(ms(300), conn.read(&mut extra)).await {
        Err(_) => {}
        Ok(Ok(0)) => panic!("the proxy closed the client connection after the last answer"),
        Ok(Ok(n)) => panic!(
            "unexpected bytes: {:?}",
            String::from_utf8_lossy(&extra[..n])
        ),
        Ok(Err(e)) => panic!("the client connection failed: {e}"),
    }

    let methods: Vec<(String, String)> = mock
        .requests()
        .into_iter()
        .map(|r| (r.method, r.uri))
        .collect();
    assert_eq!(
        methods,
        [
            ("HEAD".to_string(), "/head".to_string()),
            ("GET".to_string(), "/no-content".to_string()),
            ("GET".to_string(), "/not-modified".to_string()),
            ("GET".to_string(), "/final".to_string()),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Streams cut short, by the upstream or by the client.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_abort_mid_stream_does_not_look_like_a_clean_end() {
    let events = [
        Bytes::from_static(b"data: {\"n\":1}\n\n"),
        Bytes::from_static(b"data: {\"n\":2}\n\n"),
    ];
    let chunks: Vec<(Duration, Bytes)> =
        vec![(ms(0), events[0].clone()), (ms(20), events[1].clone())];
    let mock = Mock::start(move |r| {
        if r.uri == "/events" {
            Reply::sse(chunks.clone()).then_abort(ms(50))
        } else {
            Reply::status(200)
                .header("content-type", "application/octet-stream")
                .chunks(chunks.clone())
                .then_abort(ms(50))
        }
    });
    let proxy = Proxy::start(&config(&[&mock.url()], ""));
    let sent = String::from_utf8(events.concat()).unwrap();

    // Pass-through bodies are never added to, event streams included (as on Pingora's proxy
    // path): exactly what was sent, then a broken body.
    for path in ["/raw/events", "/raw/blob"] {
        let resp = client().get(proxy.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let (got, failed) = read_until_end(resp).await;
        assert_eq!(String::from_utf8_lossy(&got), sent, "{path}");
        assert!(
            failed.is_some(),
            "{path}: the body must not end cleanly after the upstream broke off"
        );
    }
    let event_stream = mock.requests().iter().any(|r| r.uri == "/events");
    assert!(event_stream, "the event stream was requested");

    let ends: Vec<Option<StreamEnd>> = mock
        .streams()
        .iter()
        .map(|s| s.end().map(|e| e.1))
        .collect();
    assert_eq!(ends, [Some(StreamEnd::Aborted), Some(StreamEnd::Aborted)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_closes_the_upstream_request() {
    let chunk = Bytes::from_static(b"data: {\"tick\":true}\n\n");
    let chunks: Vec<(Duration, Bytes)> = (0..100).map(|_| (ms(100), chunk.clone())).collect();
    let mock = Mock::replying(Reply::sse(chunks));
    let proxy = Proxy::start(&config(&[&mock.url()], ""));

    let mut resp = client()
        .get(proxy.url("/raw/v1/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let first = within(EXCHANGE, "the first chunk", resp.chunk())
        .await
        .unwrap()
        .expect("a first chunk");
    assert_eq!(first, chunk);
    let log = mock.wait_stream(1, ms(1000)).await;
    assert_eq!(log.uri, "/v1/events");
    assert!(log.end().is_none(), "the upstream is still streaming");
    drop(resp);
    let dropped_at = Instant::now();

    common::assert_upstream_dropped_soon(&log, dropped_at).await;
}

// ---------------------------------------------------------------------------------------------
// A pooled connection the upstream closes when it gets the next request.
// ---------------------------------------------------------------------------------------------

/// A raw upstream that answers the first request on each connection with a keep-alive 200
/// (`{"conn":N}`, with `Content-Length`), and closes the connection, unanswered, when a second
/// request arrives on it: what a server does when its keep-alive timeout and the request cross.
struct ClosingUpstream {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Requests read on each connection, by connection index.
    per_conn: Arc<Mutex<Vec<usize>>>,
    /// Request heads, in order.
    heads: Arc<Mutex<Vec<String>>>,
}

impl ClosingUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Self {
            addr,
            accepted: Arc::default(),
            per_conn: Arc::default(),
            heads: Arc::default(),
        };
        let (accepted, per_conn, heads) =
            (up.accepted.clone(), up.per_conn.clone(), up.heads.clone());
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let index = accepted.fetch_add(1, Ordering::SeqCst);
                per_conn.lock().unwrap().push(0);
                let (per_conn, heads) = (per_conn.clone(), heads.clone());
                tokio::spawn(serve_closing(conn, index, per_conn, heads));
            }
        });
        up
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn serve_closing(
    mut conn: TcpStream,
    index: usize,
    per_conn: Arc<Mutex<Vec<usize>>>,
    heads: Arc<Mutex<Vec<String>>>,
) {
    let mut pending = Vec::new();
    let mut chunk = [0u8; 8192];
    for nth in 0.. {
        // One request: the head, then `Content-Length` body bytes.
        let head_end = loop {
            if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
        let len: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.trim().parse().expect("request content-length"))
            .unwrap_or(0);
        while pending.len() < head_end + len {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
            }
        }
        pending.drain(..head_end + len);
        heads.lock().unwrap().push(head);
        per_conn.lock().unwrap()[index] += 1;
        if nth > 0 {
            // The request was read whole: closing now sends a FIN, not a reset.
            let _ = conn.shutdown().await;
            return;
        }
        let body = format!("{{\"conn\":{index}}}");
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if conn.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Sends request A, waits until its connection is back in the pool, then request B, which
/// the proxy sends on that pooled connection: the upstream closes it unanswered, and B must
/// still get its answer, from a fresh connection to the same (only) replica.
async fn pooled_connection_closed_on_the_next_request_is_retried_fresh(
    send: impl Fn(&Proxy) -> reqwest::RequestBuilder,
    upstream_path: &str,
) {
    let up = ClosingUpstream::start().await;
    let proxy = Proxy::start(&config(&[&up.url()], ""));

    for (n, expected) in [(0, "{\"conn\":0}"), (1, "{\"conn\":1}")] {
        let resp = within(EXCHANGE, "a request", send(&proxy).send())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {n}");
        let body = within(EXCHANGE, "the body", resp.text()).await.unwrap();
        assert_eq!(body, expected, "request {n}");
        wait_logged(&proxy, n + 1).await;
    }

    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        2,
        "one fresh connection"
    );
    assert_eq!(
        *up.per_conn.lock().unwrap(),
        [2, 1],
        "B went on the pooled connection first, then on a fresh one"
    );
    let heads = up.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 3);
    for head in &heads {
        assert!(
            head.starts_with(&format!("{upstream_path} HTTP/1.1\r\n")),
            "{head}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_get_on_a_pooled_connection_closed_unanswered_is_retried_on_a_fresh_one() {
    pooled_connection_closed_on_the_next_request_is_retried_fresh(
        |proxy| client().get(proxy.url("/raw/v1/models")),
        "GET /v1/models",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_call_on_a_pooled_connection_closed_unanswered_is_retried_on_a_fresh_one() {
    pooled_connection_closed_on_the_next_request_is_retried_fresh(
        |proxy| {
            client()
                .post(proxy.url(CHAT))
                .header("content-type", "application/json")
                .body("{\"model\":\"m1\"}")
        },
        &format!("POST {CHAT}"),
    )
    .await;
}

/// A body cut short by the client: with the whole body read before anything is sent, the
/// upstream never sees a partial request (Pingora's path would have started forwarding it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_by_the_client_never_reaches_the_upstream() {
    let mock = Mock::replying(Reply::json(200, "{}"));
    let proxy = Proxy::start(&config(&[&mock.url()], ""));

    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    let head = "POST /raw/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n";
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&binary(400)).await.unwrap();
    drop(conn);

    // The proxy logs the request once it gave up on it; then the upstream count is final.
    wait_logged(&proxy, 1).await;
    assert_eq!(
        mock.accepted(),
        0,
        "no upstream connection for a cut request"
    );
    assert!(mock.requests().is_empty());
}
