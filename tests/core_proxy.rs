//! End-to-end tests of the core proxy: llm-edge runs in-process in front of recording mock
//! upstreams, and each test asserts exact bytes, statuses and counts.

mod common;

use bytes::Bytes;
use common::harness::{free_port, Proxy};
use common::mock::{Mock, Reply, StreamEnd, StreamLog};
use common::{assert_error, client, post, within};
use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHAT: &str = "/v1/chat/completions";

/// One vLLM upstream `u` at `url`; `m1` keeps its name upstream, `m2` is renamed; `/raw/` is a
/// pass-through route to `u` with the prefix stripped.
fn vllm_config(url: &str) -> String {
    format!(
        r#"
upstreams:
  u:
    kind: vllm
    endpoints: ["{url}"]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
models:
  - {{name: m1, upstream: u}}
  - {{name: m2, upstream: u, model: "org/upstream-model"}}
routes:
  - {{prefix: /raw/, upstream: u, strip_prefix: true}}
"#
    )
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

/// Reads a response body chunk by chunk, noting when each piece arrived.
async fn read_timed(mut resp: reqwest::Response) -> Vec<(Instant, Bytes)> {
    let mut pieces = Vec::new();
    while let Some(chunk) = within(Duration::from_secs(10), "reading a chunk", resp.chunk())
        .await
        .expect("body chunk")
    {
        pieces.push((Instant::now(), chunk));
    }
    pieces
}

/// The instant the received byte count first reached `len`.
fn arrival_of_byte(pieces: &[(Instant, Bytes)], len: usize) -> Instant {
    let mut total = 0;
    for (at, chunk) in pieces {
        total += chunk.len();
        if total >= len {
            return *at;
        }
    }
    panic!("only {total} bytes arrived, wanted {len}");
}

fn concat(pieces: &[(Instant, Bytes)]) -> Vec<u8> {
    pieces.iter().flat_map(|(_, c)| c.to_vec()).collect()
}

/// SSE chunks of a short chat stream: the second comes 300 ms after the first.
fn paced_sse_chunks() -> Vec<(Duration, Bytes)> {
    vec![
        (
            ms(0),
            Bytes::from_static(
                b"data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            ),
        ),
        (
            ms(300),
            Bytes::from(
                "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo \u{2713}\"},\"finish_reason\":\"stop\"}]}\n\n",
            ),
        ),
        (ms(0), Bytes::from_static(b"data: [DONE]\n\n")),
    ]
}

/// Asserts a paced stream (see [`paced_sse_chunks`]) was relayed incrementally and intact.
fn assert_relayed_incrementally(
    sent_at: Instant,
    pieces: &[(Instant, Bytes)],
    chunks: &[(Duration, Bytes)],
    log: &StreamLog,
) {
    let expected: Vec<u8> = chunks.iter().flat_map(|(_, c)| c.to_vec()).collect();
    assert_eq!(
        String::from_utf8_lossy(&concat(pieces)),
        String::from_utf8_lossy(&expected),
        "the stream arrives byte-identical"
    );
    let emitted = log.emitted();
    assert_eq!(emitted.len(), chunks.len(), "the mock sent every chunk");
    let first_len = chunks[0].1.len();
    let first_arrived = arrival_of_byte(pieces, first_len);
    let second_arrived = arrival_of_byte(pieces, first_len + 1);
    assert!(
        first_arrived < emitted[1],
        "the first chunk reached the client before the upstream sent the second \
         (arrived {:?} after the first was sent; the second was sent {:?} after it)",
        first_arrived.duration_since(emitted[0]),
        emitted[1].duration_since(emitted[0]),
    );
    assert!(
        first_arrived.duration_since(emitted[0]) < ms(150),
        "the first chunk was relayed within 150 ms, took {:?}",
        first_arrived.duration_since(emitted[0])
    );
    assert!(
        first_arrived.duration_since(sent_at) < ms(150),
        "the first chunk arrived within 150 ms of the request, took {:?}",
        first_arrived.duration_since(sent_at)
    );
    assert!(
        second_arrived.duration_since(first_arrived) >= ms(250),
        "the second chunk came with the upstream's pause, {:?} after the first",
        second_arrived.duration_since(first_arrived)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_stream_chat_is_routed_by_model_and_relayed_byte_identical() {
    let reply_body = "{\"id\":\"chatcmpl-1\",  \"object\":\"chat.completion\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"h\\u00e9 \u{2713} \\\"q\\\"\"},\"finish_reason\":\"stop\"}],\n\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n";
    let mock =
        Mock::replying(Reply::json(200, reply_body).header("x-upstream-request-id", "req-42"));
    let proxy = Proxy::start(&vllm_config(&mock.url()));
    let sent = r#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#;

    let resp = post(&proxy, CHAT, sent).await;

    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), Some("application/json"));
    let len = reply_body.len().to_string();
    assert_eq!(header(&resp, "content-length"), Some(len.as_str()));
    assert_eq!(header(&resp, "transfer-encoding"), None, "not re-chunked");
    assert_eq!(header(&resp, "x-upstream-request-id"), Some("req-42"));
    assert_eq!(resp.bytes().await.unwrap(), reply_body.as_bytes());
    let got = mock.only_request();
    assert_eq!(got.method, "POST");
    assert_eq!(got.uri, CHAT);
    assert_eq!(
        got.body_str(),
        sent,
        "no rename for m1: body forwarded as sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_around_the_client_write_buffer_size_arrive_whole_on_both_routes() {
    // A reply head waits in the connection's write buffer for its body: these sizes fit in it
    // with the head, fill it exactly, overflow it by a byte and need many of it.
    for size in [
        1,
        1_000,
        8_000,
        (8 << 10) - 200,
        8 << 10,
        (8 << 10) + 1,
        100_000,
    ] {
        let reply_body = common::letters(size);
        let mock = Mock::replying(Reply::json(200, reply_body.clone()));
        let proxy = Proxy::start(&vllm_config(&mock.url()));
        let c = client();
        let sent = r#"{"model":"m1","messages":[]}"#;
        for path in [CHAT.to_string(), format!("/raw{CHAT}")] {
            let resp = c.post(proxy.url(&path)).body(sent).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{path}, {size} bytes");
            let len = size.to_string();
            assert_eq!(
                header(&resp, "content-length"),
                Some(len.as_str()),
                "{path}, {size} bytes"
            );
            let got = resp.bytes().await.unwrap();
            assert!(
                got == reply_body.as_bytes(),
                "{path}: {size} bytes sent, {} received, not byte-identical",
                got.len()
            );
        }
        assert_eq!(mock.requests().len(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_rename_changes_only_the_model_value() {
    let mock = Mock::replying(Reply::json(200, "{}"));
    let proxy = Proxy::start(&vllm_config(&mock.url()));
    // Odd whitespace, escapes, raw unicode, an exponent: re-serialising would change them.
    let sent = "{ \"messages\" : [ {\"role\":\"user\",\n  \"content\":\"caf\\u00e9 \\\"q\\\" \\\\ \u{2713} \u{65e5}\u{672c}\\n\"} ],\n  \"model\"  :  \"m2\" ,\t\"temperature\":0.50, \"n\":1e0 }";
    let expected = "{ \"messages\" : [ {\"role\":\"user\",\n  \"content\":\"caf\\u00e9 \\\"q\\\" \\\\ \u{2713} \u{65e5}\u{672c}\\n\"} ],\n  \"model\"  :  \"org/upstream-model\" ,\t\"temperature\":0.50, \"n\":1e0 }";

    let resp = post(&proxy, CHAT, sent).await;

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), "{}".as_bytes());
    let got = mock.only_request();
    assert_eq!(got.body_str(), expected);
    assert_eq!(
        got.header("content-length"),
        Some(expected.len().to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_request_body_is_forwarded_intact() {
    let mock = Mock::replying(Reply::json(200, "{\"ok\":true}"));
    let proxy = Proxy::start(&vllm_config(&mock.url()));
    let filler = common::letters(1 << 20);
    let sent = format!(
        "{{\"model\":\"m1\",\"messages\":[{{\"role\":\"user\",\"content\":\"{filler}\"}}]}}"
    );
    assert!(sent.len() > 1 << 20);

    let resp = post(&proxy, CHAT, sent.clone()).await;

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), "{\"ok\":true}".as_bytes());
    let got = mock.only_request();
    assert_eq!(got.body.len(), sent.len());
    assert!(
        got.body == sent.as_bytes(),
        "the body arrived byte-identical"
    );
}

fn small_limit_config(url: &str) -> String {
    format!("limits: {{max_body: 64KiB}}\n{}", vllm_config(url))
}

fn oversized_body() -> String {
    let filler = "x".repeat(100 << 10);
    format!("{{\"model\":\"m1\",\"messages\":[{{\"role\":\"user\",\"content\":\"{filler}\"}}]}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_max_body_is_refused_with_413() {
    let mock = Mock::replying(Reply::json(200, "{}"));
    let proxy = Proxy::start(&small_limit_config(&mock.url()));

    let resp = post(&proxy, CHAT, oversized_body()).await;

    assert_error(resp, 413, "request_too_large").await;
    assert!(mock.requests().is_empty(), "the upstream saw no request");
    assert_eq!(mock.accepted(), 0, "no upstream connection was opened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_max_body_is_refused_with_413() {
    let mock = Mock::replying(Reply::json(200, "{}"));
    let proxy = Proxy::start(&small_limit_config(&mock.url()));
    // No Content-Length: the proxy finds out while reading.
    let body = oversized_body().into_bytes();
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(10 << 10).map(|c| Ok(c.to_vec())).collect();
    let stream = reqwest::Body::wrap_stream(futures::stream::iter(pieces));

    let resp = post(&proxy, CHAT, stream).await;

    assert_error(resp, 413, "request_too_large").await;
    assert!(mock.requests().is_empty(), "the upstream saw no request");
    assert_eq!(mock.accepted(), 0, "no upstream connection was opened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_is_not_buffered() {
    let chunks = paced_sse_chunks();
    let mock = Mock::replying(Reply::sse(chunks.clone()));
    let proxy = Proxy::start(&vllm_config(&mock.url()));

    let sent_at = Instant::now();
    let resp = post(
        &proxy,
        CHAT,
        r#"{"model":"m1","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;

    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), Some("text/event-stream"));
    let pieces = read_timed(resp).await;
    let log = mock.wait_stream(1, ms(1000)).await;
    assert_relayed_incrementally(sent_at, &pieces, &chunks, &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_upstream_connections() {
    let mock = Mock::replying(Reply::json(200, "{\"ok\":true}"));
    let proxy = Proxy::start(&vllm_config(&mock.url()));
    let c = client();

    for i in 0..100 {
        let resp = c
            .post(proxy.url(CHAT))
            .header("content-type", "application/json")
            .body(format!("{{\"model\":\"m1\",\"n\":{i}}}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.bytes().await.unwrap(), "{\"ok\":true}".as_bytes());
    }

    assert_eq!(mock.requests().len(), 100);
    assert!(
        mock.accepted() <= 2,
        "100 sequential requests opened {} upstream connections",
        mock.accepted()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_is_not_used_again() {
    // An upstream that answers one request per connection with keep-alive, then closes the
    // connection 100 ms later, as servers with a short keep-alive timeout do. With one replica
    // there is nowhere to retry: a request sent on the closed connection would fail.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                             content-length: 11\r\n\r\n{\"ok\":true}";
                let _ = conn.write_all(reply.as_bytes());
                std::thread::sleep(Duration::from_millis(100));
            });
        }
    });
    let cfg = vllm_config(&url).replace("timeouts:", "retries: {max_attempts: 1}\n    timeouts:");
    let proxy = Proxy::start(&cfg);

    for i in 0..3 {
        let resp = post(&proxy, CHAT, "{\"model\":\"m1\"}").await;
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.text().await.unwrap(), "{\"ok\":true}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_replica_is_skipped() {
    let mock = Mock::replying(Reply::json(200, "{\"ok\":true}"));
    let down = format!("http://127.0.0.1:{}", free_port());
    let yaml = format!(
        r#"
upstreams:
  u:
    kind: vllm
    endpoints: ["{down}", "{live}"]
    timeouts: {{connect: 1s}}
models:
  - {{name: m1, upstream: u}}
"#,
        live = mock.url()
    );
    let proxy = Proxy::start(&yaml);
    let c = client();

    for i in 0..20 {
        let resp = c
            .post(proxy.url(CHAT))
            .body(format!("{{\"model\":\"m1\",\"n\":{i}}}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.bytes().await.unwrap(), "{\"ok\":true}".as_bytes());
    }

    let got = mock.requests();
    assert_eq!(got.len(), 20, "the live replica served every request");
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.body_str(), format!("{{\"model\":\"m1\",\"n\":{i}}}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_alternate_evenly_over_replicas() {
    let a = Mock::replying(Reply::json(200, "{\"ok\":\"a\"}"));
    let b = Mock::replying(Reply::json(200, "{\"ok\":\"b\"}"));
    let yaml = format!(
        r#"
upstreams:
  u:
    kind: vllm
    endpoints: ["{a}", "{b}"]
models:
  - {{name: m1, upstream: u}}
routes:
  - {{prefix: /pass/, upstream: u, strip_prefix: true}}
"#,
        a = a.url(),
        b = b.url()
    );
    let proxy = Proxy::start(&yaml);
    let c = client();
    let mut answers = Vec::new();
    for i in 0..20 {
        let req = if i % 2 == 0 {
            c.post(proxy.url(CHAT)).body("{\"model\":\"m1\"}")
        } else {
            c.get(proxy.url("/pass/v1/models"))
        };
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        answers.push(resp.text().await.unwrap());
    }
    // API calls and pass-through requests share the upstream's rotation.
    assert_eq!(a.requests().len(), 10);
    assert_eq!(b.requests().len(), 10);
    for pair in answers.chunks(2) {
        assert_ne!(pair[0], pair[1], "consecutive requests went to one replica");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_statuses_and_bodies_pass_through_unchanged() {
    let limited = "{\"error\":{\"message\":\"Rate limit reached\",\"type\":\"requests\",\"param\":null,\"code\":\"rate_limit_exceeded\"}}";
    let broken = "upstream exploded: \u{2620}\n";
    let mock = Mock::start(move |req| {
        if req.body_str().contains("\"limited\"") {
            Reply::json(429, limited)
                .header("retry-after", "7")
                .header("x-ratelimit-remaining-requests", "0")
        } else {
            Reply::status(500)
                .header("content-type", "text/plain; charset=utf-8")
                .body(broken)
        }
    });
    let yaml = format!(
        "{}  - {{name: limited, upstream: u}}\n  - {{name: broken, upstream: u}}\n",
        vllm_config(&mock.url()).replace(
            "routes:\n  - {prefix: /raw/, upstream: u, strip_prefix: true}\n",
            ""
        )
    );
    let proxy = Proxy::start(&yaml);

    let resp = post(&proxy, CHAT, r#"{"model":"limited"}"#).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "retry-after"), Some("7"));
    assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(header(&resp, "content-type"), Some("application/json"));
    assert_eq!(resp.bytes().await.unwrap(), limited.as_bytes());

    let resp = post(&proxy, CHAT, r#"{"model":"broken"}"#).await;
    assert_eq!(resp.status(), 500);
    assert_eq!(
        header(&resp, "content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(resp.bytes().await.unwrap(), broken.as_bytes());

    assert_eq!(mock.requests().len(), 2, "no retry with a single replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_abort_mid_stream_ends_with_error_event_and_broken_body() {
    let chunks = vec![
        (
            ms(0),
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"),
        ),
        (
            ms(20),
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n"),
        ),
    ];
    let mock = Mock::replying(Reply::sse(chunks.clone()).then_abort(ms(50)));
    let proxy = Proxy::start(&vllm_config(&mock.url()));

    let resp = post(&proxy, CHAT, r#"{"model":"m1","stream":true}"#).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut received = Vec::new();
    let mut failed = None;
    while let Some(item) = within(Duration::from_secs(10), "reading the stream", body.next()).await
    {
        match item {
            Ok(c) => received.extend_from_slice(&c),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }

    let log = mock.wait_stream(1, ms(1000)).await;
    assert_eq!(log.end().map(|e| e.1), Some(StreamEnd::Aborted));
    let sent: Vec<u8> = chunks.iter().flat_map(|(_, c)| c.to_vec()).collect();
    let sent = String::from_utf8(sent).unwrap();
    common::assert_sent_then_error_event(&received, failed, &sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_closes_the_upstream_request() {
    let chunk = Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"tick\"}}]}\n\n");
    let chunks: Vec<(Duration, Bytes)> = (0..100).map(|_| (ms(100), chunk.clone())).collect();
    let mock = Mock::replying(Reply::sse(chunks));
    let proxy = Proxy::start(&vllm_config(&mock.url()));

    let mut resp = post(&proxy, CHAT, r#"{"model":"m1","stream":true}"#).await;
    assert_eq!(resp.status(), 200);
    let first = within(Duration::from_secs(5), "the first chunk", resp.chunk())
        .await
        .unwrap()
        .expect("a first chunk");
    assert!(!first.is_empty());
    let log = mock.wait_stream(1, ms(1000)).await;
    assert!(log.end().is_none(), "the upstream is still streaming");
    drop(resp);
    let dropped_at = Instant::now();

    common::assert_upstream_dropped_soon(&log, dropped_at).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_are_openai_shaped() {
    let mock = Mock::replying(Reply::json(200, "{}"));
    let proxy = Proxy::start(&vllm_config(&mock.url()));

    let resp = post(&proxy, CHAT, r#"{"model": "m1", "messages": ["#).await;
    assert_error(resp, 400, "invalid_json").await;
    let resp = post(&proxy, CHAT, r#"{"messages":[]}"#).await;
    assert_error(resp, 400, "missing_model").await;
    let resp = post(&proxy, CHAT, r#"{"model":"no-such-model","messages":[]}"#).await;
    let v = assert_error(resp, 404, "model_not_found").await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-model"),
        "{v}"
    );
    let resp = client().get(proxy.url("/nope")).send().await.unwrap();
    assert_error(resp, 404, "not_found").await;

    assert!(mock.requests().is_empty(), "the upstream saw none of these");
}

fn credentials_config(vllm: &str, openai: &str, anthropic: &str) -> String {
    format!(
        r#"
upstreams:
  v: {{kind: vllm, endpoints: ["{vllm}"], keys: [os.environ/TEST_KEY]}}
  o: {{kind: openai, endpoints: ["{openai}"], keys: [os.environ/TEST_OPENAI_KEY]}}
  a: {{kind: anthropic, endpoints: ["{anthropic}"], keys: ["${{TEST_ANTHROPIC_KEY}}"]}}
models:
  - {{name: local, upstream: v}}
  - {{name: gpt, upstream: o}}
  - {{name: claude, upstream: a}}
routes:
  - {{prefix: /raw/, upstream: v, strip_prefix: true}}
"#
    )
}

const ENV: [(&str, &str); 3] = [
    ("TEST_KEY", "upstream-key-vllm-0001"),
    ("TEST_OPENAI_KEY", "sk-upstream-openai-0002"),
    ("TEST_ANTHROPIC_KEY", "sk-ant-upstream-0003"),
];

fn with_client_credentials(req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    req.header("authorization", "Bearer client-secret")
        .header("x-api-key", "client-secret")
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "prompt-caching-2024-07-31")
        .header("content-type", "application/json")
}

fn assert_no_client_secret(r: &common::mock::Recorded) {
    for (name, value) in &r.headers {
        assert!(
            !value.as_bytes().windows(13).any(|w| w == b"client-secret"),
            "client credential leaked upstream in {name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_never_reach_the_upstream() {
    let vllm = Mock::replying(Reply::json(200, "{}"));
    let openai = Mock::replying(Reply::json(200, "{}"));
    let anthropic = Mock::replying(Reply::json(200, "{}"));
    let proxy = Proxy::start_with_env(
        &credentials_config(&vllm.url(), &openai.url(), &anthropic.url()),
        &ENV,
    );
    let c = client();

    for (path, model) in [(CHAT, "local"), (CHAT, "gpt"), ("/v1/messages", "claude")] {
        let resp = with_client_credentials(c.post(proxy.url(path)))
            .body(format!("{{\"model\":\"{model}\",\"max_tokens\":8}}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{model}");
        resp.bytes().await.unwrap();
    }

    for (mock, key) in [
        (&vllm, "Bearer upstream-key-vllm-0001"),
        (&openai, "Bearer sk-upstream-openai-0002"),
    ] {
        let r = mock.only_request();
        assert_eq!(r.header_all("authorization"), [key]);
        assert_eq!(r.header("x-api-key"), None);
        assert_no_client_secret(&r);
    }
    let r = anthropic.only_request();
    assert_eq!(r.uri, "/v1/messages");
    assert_eq!(r.header_all("x-api-key"), ["sk-ant-upstream-0003"]);
    assert_eq!(r.header("authorization"), None);
    assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(
        r.header("anthropic-beta"),
        Some("prompt-caching-2024-07-31")
    );
    assert_no_client_secret(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_never_reach_the_upstream_on_pass_through() {
    let vllm = Mock::replying(Reply::json(200, "{}"));
    let unused = format!("http://127.0.0.1:{}", free_port());
    let proxy = Proxy::start_with_env(&credentials_config(&vllm.url(), &unused, &unused), &ENV);

    let resp = with_client_credentials(client().get(proxy.url("/raw/v1/models")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();

    let r = vllm.only_request();
    assert_eq!(r.uri, "/v1/models");
    assert_eq!(
        r.header_all("authorization"),
        ["Bearer upstream-key-vllm-0001"]
    );
    assert_eq!(r.header("x-api-key"), None);
    assert_no_client_secret(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_route_strips_the_prefix_and_keeps_the_query() {
    let listing = "{\"object\":\"list\",\"data\":[{\"id\":\"org/upstream-model\"}]}";
    let mock = Mock::replying(Reply::json(200, listing).header("x-upstream", "yes"));
    let proxy = Proxy::start(&vllm_config(&mock.url()));

    let resp = client()
        .get(proxy.url("/raw/v1/models?x=1"))
        .send()
        .await
        .unwrap();

    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-upstream"), Some("yes"));
    assert_eq!(resp.bytes().await.unwrap(), listing.as_bytes());
    let r = mock.only_request();
    assert_eq!(r.method, "GET");
    assert_eq!(r.uri, "/v1/models?x=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_streams_a_chunked_upload_intact() {
    let mock = Mock::replying(Reply::json(201, "{\"stored\":true}"));
    let proxy = Proxy::start(&vllm_config(&mock.url()));
    // 8 pieces of 16 KiB of every byte value, sent a few milliseconds apart.
    let pieces: Vec<Vec<u8>> = (0..8u8)
        .map(|p| (0..16 << 10).map(|i| (i as u8) ^ p).collect())
        .collect();
    let expected: Vec<u8> = pieces.concat();
    let stream = futures::stream::iter(pieces).then(|p| async move {
        tokio::time::sleep(ms(5)).await;
        Ok::<_, std::io::Error>(p)
    });

    let resp = client()
        .post(proxy.url("/raw/upload"))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();

    assert_eq!(resp.status(), 201);
    assert_eq!(resp.bytes().await.unwrap(), "{\"stored\":true}".as_bytes());
    let r = mock.only_request();
    assert_eq!(r.method, "POST");
    assert_eq!(r.uri, "/upload");
    assert_eq!(r.body.len(), expected.len());
    assert!(r.body == expected, "the upload arrived byte-identical");
    assert_eq!(
        r.header("transfer-encoding"),
        Some("chunked"),
        "streamed, not buffered into a Content-Length"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_stream_is_not_buffered() {
    let chunks = paced_sse_chunks();
    let mock = Mock::replying(Reply::sse(chunks.clone()));
    let proxy = Proxy::start(&vllm_config(&mock.url()));

    let sent_at = Instant::now();
    let resp = client()
        .get(proxy.url("/raw/v1/events"))
        .send()
        .await
        .unwrap();

    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), Some("text/event-stream"));
    let pieces = read_timed(resp).await;
    let log = mock.wait_stream(1, ms(1000)).await;
    assert_eq!(log.uri, "/v1/events");
    assert_relayed_incrementally(sent_at, &pieces, &chunks, &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_endpoint_lists_configured_models() {
    let mock = Mock::replying(Reply::json(200, "{}"));
    let proxy = Proxy::start(&vllm_config(&mock.url()));

    let resp = client().get(proxy.url("/v1/models")).send().await.unwrap();

    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), Some("application/json"));
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().expect("data is an array");
    let ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["m1", "m2"], "client-facing names, in config order");
    for m in data {
        assert_eq!(m["object"], "model", "{m}");
        assert!(m["created"].is_u64(), "{m}");
        assert_eq!(m["owned_by"], "u", "{m}");
    }
    assert!(mock.requests().is_empty(), "answered from config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_a_502() {
    let down = format!("http://127.0.0.1:{}", free_port());
    let proxy = Proxy::start(&vllm_config(&down));

    let resp = post(&proxy, CHAT, r#"{"model":"m1","messages":[]}"#).await;

    assert_error(resp, 502, "upstream_unreachable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_stream_stays_chunked_downstream() {
    let chunks = vec![(ms(0), Bytes::from_static(b"data: [DONE]\n\n"))];
    let mock = Mock::replying(Reply::sse(chunks));
    let proxy = Proxy::start(&vllm_config(&mock.url()));
    let c = client();

    let api = c
        .post(proxy.url(CHAT))
        .body(r#"{"model":"m1","stream":true}"#)
        .send()
        .await
        .unwrap();
    let pass = c.get(proxy.url("/raw/v1/events")).send().await.unwrap();

    let mut problems = Vec::new();
    for (what, resp) in [("API call", api), ("pass-through", pass)] {
        assert_eq!(resp.status(), 200, "{what}");
        // Without chunked framing an HTTP/1.1 body can only end by closing the connection,
        // which hides upstream aborts and defeats keep-alive.
        let framing = (
            header(&resp, "transfer-encoding").map(str::to_string),
            header(&resp, "content-length").map(str::to_string),
        );
        if framing != (Some("chunked".to_string()), None) {
            problems.push(format!(
                "{what}: (transfer-encoding, content-length) = {framing:?}"
            ));
        }
        assert_eq!(resp.bytes().await.unwrap(), "data: [DONE]\n\n".as_bytes());
    }
    assert!(
        problems.is_empty(),
        "a chunked upstream response stays chunked: {problems:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_upstream_is_a_504_after_the_first_byte_timeout() {
    // An upstream that accepts and reads but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let hold = std::thread::spawn(move || {
        let (conn, _) = silent.accept().unwrap();
        std::thread::sleep(Duration::from_secs(3));
        drop(conn);
    });
    let cfg = vllm_config(&url).replace("first_byte: 10s", "first_byte: 300ms");
    let proxy = Proxy::start(&cfg);

    let started = Instant::now();
    let resp = post(&proxy, CHAT, r#"{"model":"m1","messages":[]}"#).await;
    let took = started.elapsed();

    assert_error(resp, 504, "upstream_timeout").await;
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    drop(proxy);
    hold.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_still_flowing_at_the_total_timeout_ends_with_an_error_event() {
    // A chunk every 200 ms keeps the idle timer happy; the total deadline must still end it.
    let chunks: Vec<_> = (0..20)
        .map(|i| {
            let gap = if i == 0 { ms(0) } else { ms(200) };
            (gap, Bytes::from(format!("data: {{\"n\":{i}}}\n\n")))
        })
        .collect();
    let mock = Mock::replying(Reply::sse(chunks));
    let cfg = vllm_config(&mock.url()).replace("total: 30s", "total: 1s");
    let proxy = Proxy::start(&cfg);

    let started = Instant::now();
    let resp = post(&proxy, CHAT, r#"{"model":"m1","stream":true}"#).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    while let Some(item) = within(Duration::from_secs(5), "stream", body.next()).await {
        match item {
            Ok(b) => got.extend_from_slice(&b),
            Err(_) => break,
        }
    }
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("data: {\"n\":0}\n\n"), "{text}");
    assert!(text.contains("\"code\":\"upstream_timeout\""), "{text}");
    assert!(!text.contains("{\"n\":19}"), "{text}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "ended after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_with_gaps_under_the_idle_timeout_outlives_it_many_times() {
    // Gaps of 120 ms under an idle timeout of 300 ms, for 1.8 s: the stream's one idle timer
    // fires several times while data still flows, and each time it must wait on, not cut.
    let chunks: Vec<_> = (0..15)
        .map(|i| {
            let gap = if i == 0 { ms(0) } else { ms(120) };
            (gap, Bytes::from(format!("data: {{\"n\":{i}}}\n\n")))
        })
        .chain(std::iter::once((
            ms(120),
            Bytes::from_static(b"data: [DONE]\n\n"),
        )))
        .collect();
    let mock = Mock::replying(Reply::sse(chunks));
    let cfg = vllm_config(&mock.url()).replace("idle: 10s", "idle: 300ms");
    let proxy = Proxy::start(&cfg);

    let resp = post(&proxy, CHAT, r#"{"model":"m1","stream":true}"#).await;
    assert_eq!(resp.status(), 200);
    let text = within(Duration::from_secs(10), "stream", resp.text())
        .await
        .expect("the stream ends cleanly");
    let expected: String = (0..15)
        .map(|i| format!("data: {{\"n\":{i}}}\n\n"))
        .chain(std::iter::once("data: [DONE]\n\n".to_string()))
        .collect();
    assert_eq!(text, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_silent_past_the_idle_timeout_ends_with_an_error_event() {
    let chunks = vec![
        (ms(0), Bytes::from_static(b"data: {\"n\":1}\n\n")),
        (ms(1500), Bytes::from_static(b"data: {\"n\":2}\n\n")),
    ];
    let mock = Mock::replying(Reply::sse(chunks));
    let cfg = vllm_config(&mock.url()).replace("idle: 10s", "idle: 300ms");
    let proxy = Proxy::start(&cfg);

    let resp = post(&proxy, CHAT, r#"{"model":"m1","stream":true}"#).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    let mut broken = false;
    while let Some(item) = within(Duration::from_secs(5), "stream", body.next()).await {
        match item {
            Ok(b) => got.extend_from_slice(&b),
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("data: {\"n\":1}\n\n"), "{text}");
    assert!(text.contains("\"code\":\"upstream_timeout\""), "{text}");
    assert!(!text.contains("{\"n\":2}"), "{text}");
    assert!(broken, "the body must end as broken, not cleanly: {text}");
}
